"""K-FADE with the CG solver and matched-forget steps: the step equals a dense solve with the exact GGN, λ's
relative scale, residual logging, the target_forget step rule reaching its P̄, the skip at a start below the
target, and the quadratic-regime safeguard (its prediction against a dense GGN; its split of a long step)."""

import math

import pytest
import torch
from test_curvature_ggn import dense_ggn, flat
from test_curvature_reference import batches_of, qa_sequences
from test_curvature_reference import tiny_llama as reference_llama

from kfade.curvature import CurvatureConfig, fit_curvature
from kfade.unlearn import UnlearnData, build_method
from kfade.unlearn.losses import forget_gradient, mean_answer_prob
from kfade.unlearn.step_search import eta_for_forget_prob


@pytest.fixture(scope="module")
def problem():
    model = reference_llama(layers=1)
    data = UnlearnData(forget=batches_of(qa_sequences(4, seed=7), 2), retain=batches_of(qa_sequences(24, seed=2), 8))
    return model, data


def run(model, data, cache, curvature, records=None, **cfg):
    cfg = {"solver": "cg", "n_steps": 1, "max_kl_ratio": None, "forget_loss": "nll", "retain_weight": 0.0, **cfg}
    method = build_method("kfade", cfg, curvature=curvature, cache_root=cache)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    history = method.run(model, data, log=None if records is None else records.append)
    delta = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    with torch.no_grad():  # leave the module-scoped model as it was
        for n, p in model.named_parameters():
            p.copy_(before[n])
    return history, delta


def test_cg_step_is_the_dense_solve_with_the_exact_ggn(problem, tmp_path):
    model, data = problem
    curvature = CurvatureConfig(estimator="ekfac", fisher="exact", damping=0.1)
    fitted = fit_curvature(model, data.fit, curvature)
    names = fitted.param_names
    lam = 0.5 * fitted.mean_eigenvalue()
    grads, _ = forget_gradient(model, data.forget, names)
    dense = dense_ggn(model, data.fit, names)
    want = torch.linalg.solve(dense + lam * torch.eye(len(dense), dtype=dense.dtype), flat(grads, names))
    records = []
    history, delta = run(model, data, tmp_path, curvature, records, step_rule="fixed", step_size=1.0, cg_iters=300,
                         cg_tol=1e-10, cg_damping=0.5)
    assert history[1]["cg_stop"] == "converged" and history[1]["cg_residual"] <= 1e-10
    assert history[1]["cg_lambda"] == pytest.approx(lam, rel=1e-12)  # relative λ: × Ĝ's mean eigenvalue
    assert torch.linalg.norm(flat(delta, names) - want) <= 1e-7 * torch.linalg.norm(want)
    curve = [r for r in records if "cg/iteration" in r]
    assert [r["cg/iteration"] for r in curve] == list(range(1, history[1]["cg_iters"] + 1))
    assert curve[-1]["cg/residual"] == history[1]["cg_residual"]
    assert all("cg/iteration" not in r for r in history)


def test_cg_batches_subsample_and_absolute_lambda(problem, tmp_path):
    model, data = problem
    history, _ = run(model, data, tmp_path, CurvatureConfig(estimator="identity"), step_rule="fixed",
                     step_size=1.0, cg_iters=3, cg_batches=1, cg_damping=1e-3, cg_damping_mode="absolute")
    assert history[1]["cg_lambda"] == 1e-3 and history[1]["cg_iters"] == 3 and history[1]["ggn_products"] == 3


def test_relative_lambda_without_a_fitted_curvature_estimates_the_trace(problem, tmp_path):
    model, data = problem
    history, _ = run(model, data, tmp_path, CurvatureConfig(estimator="identity"), step_rule="fixed",
                     step_size=1.0, cg_iters=1, cg_damping=1.0)
    names = [n for n, _ in model.named_parameters() if ".layers." in n and n.endswith("proj.weight")]
    trace = float(torch.diagonal(dense_ggn(model, data.fit, names)).mean())
    assert history[1]["cg_lambda"] == pytest.approx(trace, rel=0.5)  # Hutchinson, 4 probes


@pytest.mark.parametrize("solver", ["cg", "direct"])
def test_target_forget_reaches_its_forget_prob(problem, tmp_path, solver):
    model, data = problem
    start = mean_answer_prob(model, data.forget)
    target = 0.5 * start
    history, _ = run(model, data, tmp_path, CurvatureConfig(estimator="kfac", fisher="empirical"),
                     solver=solver, step_rule="target_forget", target_forget_prob=target, n_steps=2, cg_iters=3)
    assert history[0]["forget_prob"] == pytest.approx(start)
    assert history[1]["forget_prob"] == pytest.approx(start * math.sqrt(target / start), rel=5e-3)
    assert history[2]["forget_prob"] == pytest.approx(target, rel=5e-3)
    assert all(r["forget_evals"] >= 1 for r in history[1:])


def test_kl_no_answer_steps_lower_the_forget_prob(problem, tmp_path):
    """Descending KL(start without the answer ‖ θ): a short CG step lowers the answers' P̄ (only the direction is
    checked: along a KL direction P̄ need not fall without bound, so a target_forget η may not reach any target)."""
    model, data = problem
    history, _ = run(model, data, tmp_path, CurvatureConfig(estimator="kfac", fisher="empirical"), step_rule="fixed",
                     step_size=0.1, cg_iters=3, forget_loss="kl_no_answer")
    assert history[1]["forget_prob"] < history[0]["forget_prob"]


def test_mean_answer_prob_is_the_mean_of_per_sequence_geometric_means(problem):
    model, data = problem
    probs = []
    for batch in data.forget:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach()
        for row in range(len(logits)):
            labels = batch["labels"][row, 1:]
            keep = labels != -100
            logp = torch.log_softmax(logits[row, :-1][keep], -1).gather(1, labels[keep, None])
            probs.append(math.exp(float(logp.mean())))
    assert mean_answer_prob(model, data.forget) == pytest.approx(sum(probs) / len(probs), rel=1e-6)


@pytest.mark.parametrize("warm", [True, False])
def test_each_step_warm_starts_from_the_previous_direction(problem, tmp_path, monkeypatch, warm):
    import kfade.unlearn.solvers as solvers_module

    starts, solve = [], solvers_module.conjugate_gradient

    def recording(*args, x0=None, **kwargs):
        starts.append(x0)
        result = solve(*args, x0=x0, **kwargs)
        starts.append(result.x)
        return result

    monkeypatch.setattr(solvers_module, "conjugate_gradient", recording)
    model, data = problem
    run(model, data, tmp_path, CurvatureConfig(estimator="identity"), step_rule="fixed", step_size=1e-3,
        n_steps=2, cg_iters=2, cg_warm_start=warm)
    assert starts[0] is None
    if warm:
        assert all(torch.equal(starts[2][n], starts[1][n]) for n in starts[1])
    else:
        assert starts[2] is None


def test_step_search_stops_when_the_target_is_out_of_reach(problem):
    """P̄ cannot rise by ascending: the search ends within its budget, at the closest η, model unchanged."""
    model, data = problem
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads, scores = forget_gradient(model, data.forget, [n for n, _ in model.named_parameters() if "proj" in n])
    search = eta_for_forget_prob(model, grads, data.forget, target=min(0.99, 2 * scores.prob), eta0=1e-3,
                                 max_evals=12)
    assert search.evaluations <= 12 and search.forget_prob <= scores.prob + 1e-6
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_start_already_below_the_target_takes_no_step(problem, tmp_path):
    model, data = problem
    start = mean_answer_prob(model, data.forget)
    history, delta = run(model, data, tmp_path, CurvatureConfig(estimator="identity"), step_rule="target_forget",
                         target_forget_prob=min(2 * start, 0.99))
    assert len(history) == 1 and "already at or below" in history[0]["skipped"]
    assert all(float(d.abs().max()) == 0 for d in delta.values())


def test_safeguard_predicts_the_exact_ggn_quadratic_on_its_check_batches(problem, tmp_path):
    """check_predicted_kl = ½ΔᵀGΔ with G the dense GGN of the check batches at the step's start; check_kl the
    measured KL on the same batches, which a small step matches to second order."""
    model, data = problem
    names = [n for n, _ in model.named_parameters() if ".layers." in n and n.endswith("proj.weight")]
    check = data.fit[:1]
    dense = dense_ggn(model, check, names)
    history, delta = run(model, data, tmp_path, CurvatureConfig(estimator="identity"), solver="direct",
                         step_rule="normalized", step_size=1e-3, max_kl_ratio=2.0, max_steps=1, check_batches=1)
    d = flat(delta, names)
    assert history[1]["check_predicted_kl"] == pytest.approx(0.5 * float(d @ dense @ d), rel=1e-6)
    assert history[1]["kl_ratio"] == pytest.approx(1.0, abs=0.05) and history[1]["splits"] == 0


def test_cg_safeguard_predicts_with_pcgs_own_batches_and_no_extra_product(problem, tmp_path, monkeypatch):
    """With cg the prediction is ½η²pᵀGp, pᵀGp read off PCG's final residual: it equals the dense GGN's quadratic
    on PCG's batches (cg_batches=1: the first fitting batch, not check_batches'), and the check takes no product.
    With more PCG batches than check_batches the check falls back to its own batches and one product."""
    model, data = problem
    names = [n for n, _ in model.named_parameters() if ".layers." in n and n.endswith("proj.weight")]
    common = {"step_rule": "normalized", "step_size": 1e-3, "max_kl_ratio": 2.0, "max_steps": 1, "cg_iters": 3}
    with monkeypatch.context() as patched:
        patched.setattr("kfade.unlearn.quadratic_check.gauss_newton", lambda *a, **k: pytest.fail("a GGN product"))
        history, delta = run(model, data, tmp_path, CurvatureConfig(estimator="identity"), cg_batches=1,
                             check_batches=3, **common)
    dense = dense_ggn(model, data.fit[:1], names)
    d, eta = flat(delta, names), history[1]["eta"]
    assert history[1]["cg_curvature"] == pytest.approx(float(d @ dense @ d) / eta**2, rel=1e-8)
    assert history[1]["check_predicted_kl"] == pytest.approx(0.5 * float(d @ dense @ d), rel=1e-8)
    assert history[1]["kl_ratio"] == pytest.approx(1.0, abs=0.05)

    history, delta = run(model, data, tmp_path, CurvatureConfig(estimator="identity"), cg_batches=None,
                         check_batches=1, **common)  # 3 PCG batches > 1: the check's own (the first), a product
    d, middle = flat(delta, names), dense_ggn(model, data.fit[1:2], names)
    assert history[1]["check_predicted_kl"] == pytest.approx(0.5 * float(d @ dense @ d), rel=1e-6)
    assert history[1]["check_predicted_kl"] != pytest.approx(0.5 * float(d @ middle @ d), rel=1e-3)


def test_safeguard_splits_a_step_that_leaves_the_quadratic_regime(problem, tmp_path):
    """A long step whose measured KL is far from its quadratic prediction (here: saturating, 0.17× of it) is undone
    and halved, one more step planned each time, until measured / predicted is within [1/2, 2]; every split is
    logged."""
    model, data = problem
    records = []
    common = {"solver": "direct", "step_rule": "normalized", "step_size": 1.0, "n_steps": 1}
    unchecked, _ = run(model, data, tmp_path, CurvatureConfig(estimator="identity"), max_kl_ratio=2.0, max_steps=1,
                       **common)
    assert unchecked[1]["kl_ratio"] < 0.5 and unchecked[1]["splits"] == 0  # left the quadratic regime; at the cap
    history, delta = run(model, data, tmp_path, CurvatureConfig(estimator="identity"), records, max_kl_ratio=2.0,
                         max_steps=6, **common)
    first = history[1]
    assert first["splits"] >= 1 and 0.5 <= first["kl_ratio"] <= 2.0
    assert first["step_norm"] == pytest.approx(common["step_size"] / 2 ** first["splits"], rel=1e-6)
    splits = [r for r in records if "split/step" in r]
    assert len(splits) == sum(r.get("splits", 0) for r in history)
    assert splits[0]["split/kl_ratio"] == pytest.approx(unchecked[1]["kl_ratio"], rel=1e-6)
    assert len(history) - 1 == 1 + len(splits) <= 6  # each split added a step, up to max_steps


def test_bf16_and_host_resident_cg_vectors(problem, tmp_path):
    """bf16 PCG vectors (fp64 dots) give nearly the fp32-or-wider direction; host-resident vectors give exactly it
    (on this machine the model's device is the host too: the path is the same code, moving nothing)."""
    model, data = problem
    curvature = CurvatureConfig(estimator="ekfac", fisher="exact", damping=0.1, damping_mode="relative")
    kwargs = {"step_rule": "fixed", "step_size": 1.0, "cg_iters": 5, "cg_tol": 0.0}
    _, full = run(model, data, tmp_path, curvature, **kwargs)
    _, offloaded = run(model, data, tmp_path, curvature, cg_offload="cpu", **kwargs)
    history, half = run(model, data, tmp_path, curvature, cg_dtype="bfloat16", **kwargs)
    names = list(full)
    assert all(torch.equal(full[n], offloaded[n]) for n in names)
    error = torch.linalg.norm(flat(half, names) - flat(full, names)) / torch.linalg.norm(flat(full, names))
    assert 0 < error < 0.03 and history[1]["cg_iters"] == 5
