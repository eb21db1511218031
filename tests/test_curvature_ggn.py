"""Exact Gauss-Newton products (kfade.curvature.ggn) against a dense float64 GGN over all covered layers (cross-layer
blocks included), the KL they are the second-order term of, and their invariances."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_curvature_reference import batches_of, collate, label_logits, linear_names, mean_token_kl, qa_sequences
from test_curvature_reference import tiny_llama as reference_llama
from torch.func import jacrev

from kfade.curvature.ggn import GaussNewton, output_hessian_product
from kfade.errors import ConfigError

MODES = [("forward", False), ("double_backward", False), ("double_backward", True)]


def covered_names(model) -> list[str]:
    params = dict(model.named_parameters())
    return [n for layer in linear_names(model) for n in (f"{layer}.weight", f"{layer}.bias") if n in params]


def dense_ggn(model, batches, names) -> torch.Tensor:
    """(1/N_tok) Σ_t J_tᵀ (diag p − ppᵀ) J_t over vec of ``names`` (concatenated, row-major), by torch.func."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    total, n_tok = 0, 0
    for batch in batches:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            jac = jacrev(lambda sub, b=batch: label_logits(model, b, {**params, **sub}))({n: params[n] for n in names})
        j = torch.cat([jac[n].flatten(2) for n in names], dim=-1)  # (N, V, P)
        p = torch.softmax(label_logits(model, batch), -1).detach()
        h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        total = total + torch.einsum("nvd,nvw,nwe->de", j, h, j)
        n_tok += len(p)
    return total / n_tok


def flat(v: dict, names) -> torch.Tensor:
    return torch.cat([v[n].flatten() for n in names])


def random_vector(model, names, seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return {n: scale * torch.randn(params[n].shape, generator=g, dtype=params[n].dtype) for n in names}


@pytest.fixture(scope="module")
def setup():
    model = reference_llama(bias=True, layers=2)
    batches = batches_of(qa_sequences(6, seed=3), 3)
    names = covered_names(model)
    return model, batches, names, dense_ggn(model, batches, names)


@pytest.mark.parametrize("mode,retain", MODES)
def test_products_equal_the_dense_exact_ggn(setup, mode, retain):
    model, batches, names, dense = setup
    op = GaussNewton(model, batches, names, mode=mode, retain_graphs=retain)
    for seed in range(2):  # twice: a retained graph is reused by the second product
        v = random_vector(model, names, seed)
        want = dense @ flat(v, names)
        got = flat(op(v), names)
        assert torch.linalg.norm(got - want) <= 1e-8 * torch.linalg.norm(want)
    assert op.products == 2
    assert model.config._attn_implementation == "sdpa"  # switched to eager for the products, then back


def test_cross_layer_blocks_are_present(setup):
    """The exact GGN couples layers: a vector on one layer has a product on the others (Ĝ's blocks would not)."""
    model, batches, names, _ = setup
    v = {n: torch.zeros_like(t) for n, t in random_vector(model, names, 0).items()}
    first = names[0]
    v[first] = random_vector(model, [first], 1)[first]
    out = GaussNewton(model, batches, names)(v)
    assert any(float(out[n].norm()) > 1e-6 * float(out[first].norm()) for n in names if n != first)


def test_quadratic_form_is_the_second_order_term_of_the_kl(setup):
    """2·KL(p_θ ‖ p_θ+εv) / (ε² vᵀGv) → 1 as ε → 0 (the error shrinks with ε)."""
    model, batches, names, _ = setup
    v = random_vector(model, names, 5)
    quad = float(flat(GaussNewton(model, batches, names)(v), names) @ flat(v, names))
    errors = []
    for eps in (1e-1, 1e-2, 1e-3):
        kl = mean_token_kl(model, batches, {n: eps * t for n, t in v.items()})
        errors.append(abs(2 * kl / (eps**2 * quad) - 1))
    assert errors[-1] < 1e-2
    assert errors[0] > errors[1] > errors[2]


def test_symmetric_and_linear(setup):
    model, batches, names, _ = setup
    op = GaussNewton(model, batches, names)
    u, v = random_vector(model, names, 1), random_vector(model, names, 2)
    gu, gv = op(u), op(v)
    assert float(flat(gu, names) @ flat(v, names)) == pytest.approx(float(flat(gv, names) @ flat(u, names)), rel=1e-10)
    combo = flat(op({n: 2.0 * u[n] - 3.0 * v[n] for n in names}), names)
    want = 2.0 * flat(gu, names) - 3.0 * flat(gv, names)
    assert torch.linalg.norm(combo - want) <= 1e-10 * torch.linalg.norm(want)


def test_invariant_to_batch_size_and_padding(setup):
    model, _, names, _ = setup
    seqs = qa_sequences(6, seed=3)
    v = random_vector(model, names, 4)
    want = flat(GaussNewton(model, batches_of(seqs, 6), names)(v), names)
    # Extra padding only changes rounding: the products run eager attention, whose softmax Hugging Face takes in
    # float32 even for a float64 model, and a row padded wider is reduced in another order on some CPUs (2.9e-9 on
    # an AMD EPYC, 0 elsewhere); float32's own precision bounds it.
    padded = [collate(seqs[:3], width=12), collate(seqs[3:], 15)]
    for batches, tol in ((batches_of(seqs, 1), 1e-10), (batches_of(seqs, 4), 1e-10), (padded, 1e-7)):
        got = flat(GaussNewton(model, batches, names)(v), names)
        assert torch.linalg.norm(got - want) <= tol * torch.linalg.norm(want)


def test_output_hessian_product_matches_the_dense_hessian():
    logits = torch.randn(5, 7, dtype=torch.float64)
    v = torch.randn(5, 7, dtype=torch.float64)
    p = torch.softmax(logits, -1)
    h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    torch.testing.assert_close(output_hessian_product(logits, v), torch.einsum("nvw,nw->nv", h, v))


def test_bf16_model_products_in_fp32(tokenizer):
    from conftest import make_tiny_llama

    model32 = make_tiny_llama(tokenizer)
    model16 = make_tiny_llama(tokenizer, dtype=torch.bfloat16)
    batches = batches_of(qa_sequences(4, seed=0, vocab=len(tokenizer), min_len=5, max_len=9), 2)
    names = [n for n, _ in model32.named_parameters() if ".layers." in n and n.endswith("proj.weight")]
    v = random_vector(model32, names, 0)
    want = GaussNewton(model32, batches, names)(v)
    got = GaussNewton(model16, batches, names)({n: t.bfloat16() for n, t in v.items()})
    assert all(t.dtype == torch.float32 for t in got.values())
    rel = float(flat(got, names).sub(flat(want, names)).norm() / flat(want, names).norm())
    assert rel < 0.1


def test_bad_arguments_are_one_line_errors(setup):
    model, batches, names, _ = setup
    with pytest.raises(ConfigError, match="ggn_mode"):
        GaussNewton(model, batches, names, mode="sideways")
    with pytest.raises(ConfigError, match="no batches"):
        GaussNewton(model, [], names)
    with pytest.raises(ConfigError, match="retained graphs"):
        GaussNewton(model, batches, names, mode="forward", retain_graphs=True)
    with pytest.raises(ConfigError, match="keys differ"):
        GaussNewton(model, batches, names)({names[0]: torch.zeros(1)})
