"""K-FADE steps: identity curvature = normalised gradient ascent, the trust region meets its KL budget, a
non-finite step is rolled back, and the run's bookkeeping."""

import math

import pytest
import torch
from conftest import make_tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

from kfade.curvature import CurvatureConfig
from kfade.data.formatting import QAFormatter, qa_batches
from kfade.errors import ConfigError
from kfade.unlearn import UnlearnData, build_method
from kfade.unlearn.kfade import KFade, KFadeConfig

FORGET = [{"question": f"Where was author {i} born?", "answer": f"Author {i} was born in Port Lumen, ward {i}."}
          for i in range(6)]
RETAIN = [{"question": f"What does writer {i} write?", "answer": f"Writer {i} writes {'dark ' * (i % 3)}novels."}
          for i in range(6)]
IDENTITY = CurvatureConfig(estimator="identity", damping=0.3, damping_mode="absolute")


def qa_data(tokenizer, batch_size=3) -> UnlearnData:
    formatter = QAFormatter(tokenizer)
    return UnlearnData(forget=qa_batches(FORGET, formatter, batch_size), retain=qa_batches(RETAIN, formatter, 3))


def step_taken(before: dict, model) -> dict:
    return {n: p.detach().double() - before[n].double() for n, p in model.named_parameters()
            if not torch.equal(p, before[n])}


def reference_gradient(tokenizer, rows=FORGET) -> dict:
    """∇ of the mean answer NLL of ``rows`` (∇L_f by default) in float64, from the Hugging Face loss on all of them
    in one batch."""
    model = make_tiny_llama(tokenizer).double()
    model(**qa_batches(rows, QAFormatter(tokenizer), len(rows))[0]).loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def run(model, data, cache, curvature=IDENTITY, **cfg):
    """One plain direct trust-region step on the forget NLL (no retain term, no quadratic-regime check) unless the
    test says otherwise."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = {"n_steps": 1, "max_backtracks": 0, "solver": "direct", "step_rule": "trust_region", "max_kl_ratio": None,
           "forget_loss": "nll", "retain_weight": 0.0, **cfg}
    method = build_method("kfade", cfg, curvature=curvature, cache_root=cache)
    history = method.run(model, data)
    return method, history, step_taken(before, model)


def test_identity_curvature_normalized_step_is_normalized_gradient_ascent(tokenizer, tmp_path):
    _, history, delta = run(make_tiny_llama(tokenizer), qa_data(tokenizer), tmp_path, step_rule="normalized",
                            step_size=0.05)
    grad = reference_gradient(tokenizer)
    grad_norm = math.sqrt(sum(float(grad[n].square().sum()) for n in delta))
    assert math.sqrt(sum(float(d.square().sum()) for d in delta.values())) == pytest.approx(0.05, rel=1e-6)
    for name, d in delta.items():
        assert "layers." in name and "layernorm" not in name  # decoder nn.Linear weights only
        torch.testing.assert_close(d / 0.05, grad[name] / grad_norm, rtol=0, atol=1e-6)
    assert history[1]["step_norm"] == pytest.approx(0.05, rel=1e-6)
    assert history[1]["eta"] == pytest.approx(0.05 * 1.3 / grad_norm, rel=1e-5)  # ‖(I + 0.3 I)⁻¹ g‖ = ‖g‖/1.3


def test_identity_fixed_step_is_plain_gradient_ascent_whatever_the_batch_size(tokenizer, tmp_path):
    exact = CurvatureConfig(estimator="identity", damping=0.0, damping_mode="absolute")
    grad = reference_gradient(tokenizer)
    for batch_size in (1, 6):
        _, _, delta = run(make_tiny_llama(tokenizer), qa_data(tokenizer, batch_size), tmp_path, exact,
                          step_rule="fixed", step_size=1e-2)
        for name, d in delta.items():
            torch.testing.assert_close(d, 1e-2 * grad[name], rtol=1e-4, atol=1e-8)


def tiny_vocab_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trust_region_step_meets_its_kl_budget(seed, tmp_path):
    """Exact Fisher of one label token on one layer: Ĝ is that layer's exact GGN (the curvature tests check
    this), so for a small ε the measured KL of the step on that token matches ε = ½Δᵀ(Ĝ+λI)Δ."""
    ids = torch.randint(1, 16, (1, 2), generator=torch.Generator().manual_seed(seed))
    datum = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([[-100, ids[0, 1]]])}]
    data = UnlearnData(forget=datum, retain=datum)
    curvature = CurvatureConfig(estimator="ekfac", fisher="exact", damping=1e-8, damping_mode="absolute",
                                modules=r"layers\.1\.mlp\.down_proj$")
    epsilon = 1e-4
    _, history, _ = run(tiny_vocab_model(seed), data, tmp_path, curvature, step_rule="trust_region",
                        kl_budget=epsilon)
    assert history[1]["predicted_kl"] == pytest.approx(epsilon, rel=1e-3)
    assert epsilon / 2 < history[1]["retain_kl"] < 2 * epsilon


def test_trust_region_sets_the_damped_quadratic_form(tokenizer, tmp_path):
    """η makes ½Δᵀ(Ĝ+λI)Δ = ε: the curvature's own ½ΔᵀĜΔ plus ½λ‖Δ‖² adds up to the budget."""
    curvature = CurvatureConfig(estimator="kfac", fisher="empirical", damping=1e-3, damping_mode="absolute")
    _, history, _ = run(make_tiny_llama(tokenizer), qa_data(tokenizer), tmp_path, curvature,
                        step_rule="trust_region", kl_budget=1e-3, n_steps=2)
    for record in history[1:]:
        assert record["predicted_kl"] + 0.5 * 1e-3 * record["step_norm"] ** 2 == pytest.approx(1e-3, rel=1e-4)


def test_history_timings_and_cache_reuse(tokenizer, tmp_path):
    data, records = qa_data(tokenizer), []
    curvature = CurvatureConfig(estimator="ekfac", damping=0.1, damping_mode="relative")
    method = build_method("kfade", {"step_size": 0.5, "step_rule": "normalized", "n_steps": 3, "max_steps": 3,
                                    "solver": "direct", "retain_weight": 0.0}, curvature=curvature,
                          cache_root=tmp_path)  # retain term off: on a random model it outweighs the ascent
    history = method.run(make_tiny_llama(tokenizer), data, log=records.append)
    assert records == history and [r["step"] for r in history] == [0, 1, 2, 3]
    assert set(history[1]) == {"step", "forget_nll", "forget_prob", "retain_kl", "predicted_kl", "step_norm", "eta",
                               "check_kl", "check_predicted_kl", "kl_ratio", "splits"}
    assert history[3]["forget_nll"] > history[0]["forget_nll"] and all(r["retain_kl"] > 0 for r in history[1:])
    assert set(method.timings) == {"fit_s", "unlearn_s"}
    stored = sorted(tmp_path.iterdir())
    build_method("kfade", {"n_steps": 1, "cg_iters": 2}, curvature=curvature, cache_root=tmp_path).run(
        make_tiny_llama(tokenizer), data)
    assert sorted(tmp_path.iterdir()) == stored and len(stored) == 1


def test_non_finite_step_is_rolled_back(tokenizer, tmp_path):
    model = make_tiny_llama(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = build_method("kfade", {"step_rule": "fixed", "step_size": 1e30, "n_steps": 3, "max_steps": 3,
                                    "solver": "direct", "max_kl_ratio": None},
                          curvature=IDENTITY, cache_root=tmp_path)
    with pytest.warns(UserWarning, match="K-FADE step 1 rejected"):
        history = method.run(model, qa_data(tokenizer))
    assert len(history) == 2 and "rejected" in history[1] and "forget_nll" not in history[1]
    assert math.isfinite(history[1]["step_norm"])  # the update was applied, then undone
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("field, value", [("n_steps", 0), ("step_size", 0.0), ("step_size", -1.0),
                                          ("kl_budget", 0.0), ("step_rule", "newton"), ("damping", -1.0),
                                          ("damping_mode", "scaled"), ("solver", "lu"), ("cg_iters", 0),
                                          ("cg_tol", -1.0), ("cg_damping", float("nan")),
                                          ("cg_damping_mode", "scaled"), ("cg_batches", 0), ("ggn_mode", "reverse"),
                                          ("target_forget_prob", 1.0), ("target_forget_prob", 0.0),
                                          ("max_steps", 0), ("max_kl_ratio", 0.5), ("check_batches", 0)])
def test_bad_kfade_config_names_its_field(field, value):
    with pytest.raises(ConfigError, match=rf"^method\.{field}="):
        KFadeConfig(**{field: value})


def test_retain_term_steps_along_the_forget_minus_weighted_retain_gradient(tokenizer, tmp_path):
    """retain_weight μ: with identity curvature the normalized step is along g = ∇L_f − μ∇L_r, ∇L_r the retain
    answers' mean NLL gradient (all retain batches here: fewer than retain_batches)."""
    _, _, delta = run(make_tiny_llama(tokenizer), qa_data(tokenizer), tmp_path, step_rule="normalized",
                      step_size=0.05, retain_weight=2.0)
    forget, retain = reference_gradient(tokenizer), reference_gradient(tokenizer, RETAIN)
    g = {n: forget[n] - 2.0 * retain[n] for n in delta}
    norm = math.sqrt(sum(float(t.square().sum()) for t in g.values()))
    for name, d in delta.items():
        torch.testing.assert_close(d / 0.05, g[name] / norm, rtol=0, atol=1e-6)
    cosine = sum(float((delta[n] * forget[n]).sum()) for n in delta) / 0.05 / math.sqrt(
        sum(float(forget[n].square().sum()) for n in delta))
    assert cosine < 0.99  # the retain term turned the step away from plain gradient ascent
    no_retain = UnlearnData(forget=qa_data(tokenizer).forget, fit=qa_data(tokenizer).retain)
    with pytest.raises(ConfigError, match=r"^method\.retain_weight=2\.0: needs retain batches"):
        run(make_tiny_llama(tokenizer), no_retain, tmp_path, retain_weight=2.0)


def test_kfade_needs_fitting_batches(tokenizer, tmp_path):
    forget_only = UnlearnData(forget=qa_data(tokenizer).forget)
    with pytest.raises(ConfigError, match=r"^dataset\.fit_sets="):
        KFade(KFadeConfig(), IDENTITY, tmp_path).run(make_tiny_llama(tokenizer), forget_only)


def test_trust_region_backtracking_keeps_the_measured_retain_kl_within_budget(tokenizer, tmp_path):
    """A budget the quadratic model overshoots (huge ε for a random model): without backtracking the measured
    probe KL exceeds it; with backtracking η is halved until the measured KL is ≤ ε, and the log says so."""
    curvature = CurvatureConfig(estimator="ekfac", fisher="empirical", damping=1e-3, damping_mode="relative")
    budget = 1e-3
    _, plain, _ = run(make_tiny_llama(tokenizer), qa_data(tokenizer), tmp_path, curvature=curvature,
                      step_rule="trust_region", kl_budget=budget)
    assert plain[1]["retain_kl"] > budget and "backtracks" not in plain[1]
    _, checked, _ = run(make_tiny_llama(tokenizer), qa_data(tokenizer), tmp_path, curvature=curvature,
                        step_rule="trust_region", kl_budget=budget, max_backtracks=30)
    assert checked[1]["retain_kl"] <= budget and checked[1]["backtracks"] >= 1
    assert checked[1]["eta"] == pytest.approx(plain[1]["eta"] / 2 ** checked[1]["backtracks"])
