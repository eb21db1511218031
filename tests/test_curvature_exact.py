"""Estimators against the exact block-diagonal GGN (torch.func, float64) and the Fisher types' definitions."""

import pytest
import torch
from test_curvature_reference import (
    assert_blocks_close,
    batches_of,
    collate,
    dense_blocks,
    exact_ggn_blocks,
    linear_names,
    qa_sequences,
)
from torch.func import functional_call, grad

from kfade.curvature import CurvatureConfig, fit_curvature

ALL_LINEAR = r"\.layers\."


def fit(model, batches, estimator, fisher="exact", **kw):
    return fit_curvature(model, batches, CurvatureConfig(estimator=estimator, fisher=fisher, modules=ALL_LINEAR,
                                                          **kw))


@pytest.fixture(scope="module")
def random_data(model):
    batches = batches_of(qa_sequences(6, seed=3), 3)
    return batches, exact_ggn_blocks(model, batches, linear_names(model))


ONE_TOKEN = {"input_ids": torch.tensor([3, 5]), "labels": torch.tensor([-100, 5])}


@pytest.mark.parametrize("estimator", ["kfac", "ekfac"])
@pytest.mark.parametrize("copies", [1, 3])
def test_exact_for_one_label_token(model, estimator, copies):
    """One label predicted at position 0: one fed position, so G_W̄ = S ⊗ A exactly (also for a batch
    repeating the datum, which checks the mean-not-sum normalisation)."""
    batches = [collate([ONE_TOKEN] * copies)]
    reference = exact_ggn_blocks(model, batches, linear_names(model))
    assert_blocks_close(dense_blocks(fit(model, batches, estimator)), reference, rtol=1e-8)


def test_kfac_is_not_exact_with_several_positions(model, random_data):
    """The exactness above is a property of the one-position case, not of the comparison."""
    batches, reference = random_data
    got = dense_blocks(fit(model, batches, "kfac"))
    errors = [float((got[k] - r).norm() / r.norm()) for k, r in reference.items()]
    assert max(errors) > 0.1


def test_ekfac_eigenvalues_are_the_exact_ggn_diagonal_in_the_kfac_basis(model, random_data):
    batches, reference = random_data
    curv = fit(model, batches, "ekfac")
    for spec in curv.layers:
        q = torch.kron(*curv.basis(spec.name))
        want = torch.diagonal(q.T @ reference[spec.name] @ q)
        torch.testing.assert_close(curv.eigenvalues(spec).flatten(), want, rtol=1e-8, atol=1e-12 * want.max())


def test_ekfac_frobenius_error_at_most_kfac(model, random_data):
    batches, reference = random_data
    kfac, ekfac = dense_blocks(fit(model, batches, "kfac")), dense_blocks(fit(model, batches, "ekfac"))
    for name, r in reference.items():
        assert (ekfac[name] - r).norm() <= (kfac[name] - r).norm() * (1 + 1e-10), name


def test_diagonal_is_the_exact_ggn_diagonal(model, random_data):
    batches, reference = random_data
    curv = fit(model, batches, "diagonal")
    for spec in curv.layers:
        want = torch.diagonal(reference[spec.name])
        torch.testing.assert_close(curv.eigenvalues(spec).flatten(), want, rtol=1e-8, atol=1e-12 * want.max())


def test_empirical_diagonal_is_the_squared_per_sequence_loss_gradient(model):
    """Empirical Fisher: D = Σ_n (∇ summed token loss of sequence n)² / N_tok, gradients by torch.func."""
    seqs = qa_sequences(3, seed=5)
    batch = collate(seqs)
    curv = fit(model, [batch], "diagonal", fisher="empirical")
    params = {n: p.detach() for n, p in model.named_parameters()}

    def summed_loss(sub, seq):
        logits = functional_call(model, {**params, **sub}, (seq["input_ids"][None],)).logits[0, :-1]
        return torch.nn.functional.cross_entropy(logits, seq["labels"][1:], ignore_index=-100, reduction="sum")

    names = curv.param_names
    squares = {n: 0 for n in names}
    for seq in seqs:
        g = grad(summed_loss)({n: params[n] for n in names}, seq)
        squares = {n: squares[n] + g[n].square() for n in names}
    n_tok = int((batch["labels"][:, 1:] != -100).sum())
    for spec in curv.layers:
        want = torch.cat([squares[spec.weight], squares[spec.bias][:, None]], dim=1) / n_tok
        torch.testing.assert_close(curv.eigenvalues(spec), want, rtol=1e-8, atol=1e-14)


def test_mc_fisher_converges_to_exact_and_empirical_does_not(model, random_data):
    batches, reference = random_data
    exact = torch.cat([torch.diagonal(r) for r in reference.values()])

    def error(curv):
        got = torch.cat([curv.eigenvalues(spec).flatten() for spec in curv.layers])
        return float((got - exact).norm() / exact.norm())

    mc = error(fit(model, batches, "diagonal", fisher="mc", mc_samples=256, seed=1))
    empirical = error(fit(model, batches, "diagonal", fisher="empirical"))
    assert mc < 0.15
    assert empirical > 3 * mc
