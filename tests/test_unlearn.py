"""Unlearning: shared losses and data, configs and the registry, and the first-order baselines."""

import copy
import math
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from omegaconf import OmegaConf

from kfade.data.formatting import QAFormatter, collate, qa_batches
from kfade.errors import ConfigError
from kfade.models.checkpointing import enable_gradient_checkpointing
from kfade.models.logits import label_logits, token_kl
from kfade.unlearn import METHODS, UnlearnData, build_method, first_order
from kfade.unlearn.base import batches_fingerprint
from kfade.unlearn.grad_diff import GradDiffConfig
from kfade.unlearn.losses import (
    FORGET_TARGET,
    OWN_TARGET,
    RetainKLProbe,
    forget_gradient,
    forget_nll,
    forget_objective,
    forget_scores,
    mean_answer_prob,
    sequence_logprob,
    with_forget_targets,
)
from kfade.unlearn.npo import NPO, NPOConfig
from kfade.unlearn.rmu import RMUConfig

CONF = Path(__file__).resolve().parents[1] / "conf" / "method"
FORGET = [{"question": f"Where was author {i} born?", "answer": f"Author {i} was born in Port Lumen, ward {i}."}
          for i in range(8)]
RETAIN = [{"question": f"What does writer {i} write?", "answer": f"Writer {i} writes {'mystery ' * (i % 3)}novels."}
          for i in range(8)]


def batches(tokenizer, rows, batch_size):
    return qa_batches(rows, QAFormatter(tokenizer), batch_size)


def hf_mean_nll(model, batch) -> float:
    """Independent reference: the Hugging Face model's own shifted, -100-masked mean token loss."""
    with torch.no_grad():
        return model(**batch).loss.item()


@pytest.fixture(scope="module")
def data(tokenizer):
    return UnlearnData(forget=batches(tokenizer, FORGET, 3), retain=batches(tokenizer, RETAIN, 3))


@pytest.fixture(scope="module")
def trained(tokenizer):
    """A tiny model fitted briefly to the forget and retain answers (their NLL well below chance)."""
    model = make_tiny_llama(tokenizer).train()
    batch = batches(tokenizer, FORGET + RETAIN, 16)[0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    return model.eval()


# --- shared losses -----------------------------------------------------------------------------------------------

def test_forget_nll_is_the_token_weighted_mean(tiny_model, tokenizer):
    whole = batches(tokenizer, FORGET, 8)[0]
    for size in (1, 3, 8):
        assert forget_nll(tiny_model, batches(tokenizer, FORGET, size)) == pytest.approx(
            hf_mean_nll(tiny_model, whole), rel=1e-6)


def test_forget_gradient_is_batch_size_invariant(tiny_model, tokenizer):
    names = [n for n, _ in tiny_model.named_parameters() if "layers.1." in n]
    reference = make_tiny_llama(tokenizer).double()
    reference(**batches(tokenizer, FORGET, 8)[0]).loss.backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if n in names}
    for size in (1, 3, 8):
        grads, scores = forget_gradient(tiny_model, batches(tokenizer, FORGET, size), names)
        assert scores.nll == pytest.approx(hf_mean_nll(tiny_model, batches(tokenizer, FORGET, 8)[0]), rel=1e-6)
        assert scores.prob == pytest.approx(mean_answer_prob(tiny_model, batches(tokenizer, FORGET, 8)), rel=1e-6)
        for n in names:
            assert grads[n].dtype == torch.float32
            torch.testing.assert_close(grads[n].double(), expected[n], rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in tiny_model.parameters())


def with_targets(base, rows):
    """The forget batches carrying ``base``'s log-probabilities at their label positions (kl_base)."""
    with torch.no_grad():
        return [{**b, FORGET_TARGET: label_logits(base, b).logits.log_softmax(-1)} for b in rows]


def test_kl_base_forget_gradient_is_minus_the_gradient_of_the_mean_kl(tiny_model, tokenizer):
    """With targets q: ∇L_f = −∇ (1/N) Σ_t KL(q_t ‖ p_θ,t), against a float64 hand-written KL over the whole set."""
    names = [n for n, _ in tiny_model.named_parameters() if "layers.1." in n]
    base = make_tiny_llama(tokenizer, seed=7)
    whole = with_targets(base, batches(tokenizer, FORGET, 8))[0]
    reference = make_tiny_llama(tokenizer).double()
    logp = label_logits(reference, whole).logits.log_softmax(-1)
    q = whole[FORGET_TARGET].double()
    (-(q.exp() * (q - logp)).sum(-1).mean()).backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if n in names}
    plain = forget_gradient(tiny_model, batches(tokenizer, FORGET, 8), names)[1]
    for size in (1, 3):
        grads, scores = forget_gradient(tiny_model, with_targets(base, batches(tokenizer, FORGET, size)), names)
        assert scores.nll == pytest.approx(plain.nll, rel=1e-6)  # the scores stay the answers' NLL and P̄
        for n in names:
            torch.testing.assert_close(grads[n].double(), expected[n], rtol=1e-4, atol=1e-7)


def test_kl_base_needs_targets_and_moves_graddiff_towards_the_base(tokenizer, trained, data):
    with pytest.raises(ConfigError, match="method.forget_loss='kl_base': the forget batches carry no target_logprobs"):
        build_method("grad_diff", {"forget_loss": "kl_base", "epochs": 1}).run(copy.deepcopy(trained), data)
    base = make_tiny_llama(tokenizer, seed=7)
    targeted = UnlearnData(forget=with_targets(base, data.forget), retain=data.retain)
    model = copy.deepcopy(trained)

    def kl(m):
        return sum(token_kl(b[FORGET_TARGET], label_logits(m, b).logits).item() for b in targeted.forget)

    before = kl(model)
    build_method("grad_diff", {"forget_loss": "kl_base", "epochs": 3, "lr": 1e-3}).run(model, targeted)
    with torch.no_grad():
        assert kl(model) < 0.5 * before


def test_kl_no_answer_targets_are_the_start_without_the_answer(trained, data):
    targeted = with_forget_targets("kl_no_answer", trained, data)
    assert with_forget_targets("nll", trained, data) is data and FORGET_TARGET not in data.forget[0]
    for plain, batch in zip(data.forget, targeted.forget, strict=True):
        with torch.no_grad():
            out = label_logits(trained, plain)
        p, q = out.logits.double().softmax(-1), batch[FORGET_TARGET].double().exp()
        rows = torch.arange(len(out.labels))
        assert (q[rows, out.labels] < 1e-12).all()  # the answer's token is gone
        p[rows, out.labels] = 0.0
        torch.testing.assert_close(q, p / p.sum(-1, keepdim=True), rtol=1e-5, atol=1e-9)  # the rest renormalised
    model = copy.deepcopy(trained)
    build_method("grad_diff", {"forget_loss": "kl_no_answer", "epochs": 3, "lr": 1e-3}).run(model, data)
    assert mean_answer_prob(model, data.forget) < 0.5 * mean_answer_prob(trained, data.forget)


def test_kl_no_answer_at_the_start_needs_no_stored_targets(trained, data):
    """A single K-FADE step uses the objective at the starting weights only: flagged batches take the target from
    the pass's own logits (nothing stored) and give the stored targets' objective and gradient."""
    names = [n for n, _ in trained.named_parameters() if "layers.1." in n]
    flagged = with_forget_targets("kl_no_answer", trained, data, once=True)
    stored = with_forget_targets("kl_no_answer", trained, data)
    assert all(b[OWN_TARGET] and FORGET_TARGET not in b for b in flagged.forget)
    (own, own_scores), (want, want_scores) = (forget_gradient(trained, d.forget, names) for d in (flagged, stored))
    assert own_scores == want_scores
    for n in names:
        torch.testing.assert_close(own[n], want[n], rtol=1e-6, atol=1e-10)
    with torch.no_grad():
        objective = forget_objective(trained, flagged.forget[0])
        assert objective == pytest.approx(forget_objective(trained, stored.forget[0]).item(), rel=1e-6)
        assert objective != pytest.approx(forget_objective(trained, data.forget[0]).item(), rel=1e-3)  # not the NLL


def test_stored_forget_targets_that_would_fill_the_host_are_a_config_error(trained, data, monkeypatch):
    monkeypatch.setattr("kfade.unlearn.losses.os.sysconf", lambda key: 4096 if key == "SC_PAGE_SIZE" else 16)  # 64 KiB
    with pytest.raises(ConfigError, match=r"^method\.forget_loss='kl_no_answer': its forget targets need .* GB"):
        with_forget_targets("kl_no_answer", trained, data)
    assert with_forget_targets("kl_no_answer", trained, data, once=True).forget[0][OWN_TARGET]  # nothing stored


def test_sequence_logprob_matches_float64_gather(tiny_model, tokenizer):
    batch = batches(tokenizer, FORGET, 4)[0]
    with torch.no_grad():
        logp = torch.log_softmax(tiny_model(**batch).logits.double(), -1)
        expected = torch.zeros(4, dtype=torch.float64)
        for row in range(4):
            for t in range(batch["labels"].shape[1] - 1):
                label = batch["labels"][row, t + 1].item()
                if label != -100:
                    expected[row] += logp[row, t, label]
        got = sequence_logprob(tiny_model, batch)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_retain_kl_probe_matches_float64_kl(tokenizer):
    probe_batches = batches(tokenizer, RETAIN, 4)
    start, moved = make_tiny_llama(tokenizer, seed=0), make_tiny_llama(tokenizer, seed=1)
    probe = RetainKLProbe(start, probe_batches)
    assert probe(start) == 0.0
    total, tokens = 0.0, 0
    with torch.no_grad():
        for b in probe_batches:
            mask = b["labels"][:, 1:] != -100
            p = torch.log_softmax(start(**b).logits[:, :-1][mask].double(), -1)
            q = torch.log_softmax(moved(**b).logits[:, :-1][mask].double(), -1)
            total += (p.exp() * (p - q)).sum().item()
            tokens += int(mask.sum())
    assert probe(moved) == pytest.approx(total / tokens, rel=1e-5)
    assert math.isnan(RetainKLProbe(start, [])(moved))


# --- data, configs, registry -------------------------------------------------------------------------------------

def test_unlearn_data_rejects_an_empty_forget_set(tokenizer):
    with pytest.raises(ConfigError, match=r"dataset.forget_split='forget01': empty forget set"):
        UnlearnData(forget=[], forget_split="forget01")
    unlabeled = collate([{"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}], pad_token_id=0)
    with pytest.raises(ConfigError, match="empty forget set"):
        UnlearnData(forget=[unlabeled])


def test_unlearn_data_defaults(data, tokenizer):
    assert data.fit is data.retain and data.kl_probe == data.retain[:2]
    assert data.fit_fingerprint == batches_fingerprint(batches(tokenizer, RETAIN, 3))
    assert data.fit_fingerprint != batches_fingerprint(batches(tokenizer, RETAIN[:-1], 3))


@pytest.mark.parametrize("name, field, value", [
    ("grad_ascent", "epochs", 0), ("grad_ascent", "lr", 0.0), ("grad_ascent", "lr", float("nan")),
    ("grad_diff", "retain_loss", "mse"), ("grad_diff", "retain_weight", -1.0), ("npo", "beta", 0.0),
    ("npo", "epochs", -2), ("rmu", "layer", -1), ("rmu", "param_regex", "(["), ("rmu", "steering_coeff", 0.0),
])
def test_bad_config_names_its_field(name, field, value):
    with pytest.raises(ConfigError, match=rf"^method\.{field}="):
        build_method(name, {field: value})


def test_build_method_errors():
    with pytest.raises(ConfigError, match=r"^method\.name='sgd': unknown method"):
        build_method("sgd", {})
    with pytest.raises(ConfigError, match=r"^method\.step_size=0.1: not a field of method 'npo'"):
        build_method("npo", {"step_size": 0.1})
    with pytest.raises(ConfigError, match=r"^method\.name='npo': config is a GradDiffConfig, expected NPOConfig"):
        build_method("npo", GradDiffConfig())
    with pytest.raises(ConfigError, match=r"^method\.name='grad_diff': config is for 'grad_diff', not 'npo'"):
        build_method("npo", {"name": "grad_diff"})
    method = build_method("npo", {"name": "npo", "beta": 0.5})
    assert isinstance(method, NPO) and method.cfg == NPOConfig(beta=0.5)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_yaml_matches_its_config_defaults(name):
    config_cls = METHODS[name][0]
    node = OmegaConf.load(CONF / f"{name}.yaml")
    assert OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(config_cls), node)) == config_cls()
    assert set(node) == {f for f in OmegaConf.structured(config_cls)}


# --- baselines ---------------------------------------------------------------------------------------------------

BASELINES = {
    "grad_ascent": {"epochs": 3, "lr": 3e-3},
    "grad_diff": {"epochs": 3, "lr": 3e-3, "retain_loss": "kl"},
    "npo": {"epochs": 3, "lr": 3e-3, "beta": 0.1, "retain_weight": 1.0},
    "rmu": {"epochs": 3, "lr": 1e-2, "layer": 1, "alpha": 10.0},
}


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_raises_the_forget_loss(name, trained, tokenizer, data):
    model = copy.deepcopy(trained)
    records = []
    history = build_method(name, BASELINES[name]).run(model, data, log=records.append)
    assert records == history and [r["epoch"] for r in history] == [0, 1, 2, 3]
    whole = batches(tokenizer, FORGET, 8)[0]
    assert history[0]["forget_nll"] == pytest.approx(hf_mean_nll(trained, whole), rel=1e-5)
    assert history[-1]["forget_nll"] == pytest.approx(hf_mean_nll(model, whole), rel=1e-5)
    # forget P̄ = exp(−NLL) drops by at least a factor 2
    assert history[-1]["forget_nll"] > history[0]["forget_nll"] + math.log(2)
    assert all(r["retain_kl"] >= 0 for r in history)


def test_grad_diff_kl_term_is_measured_from_the_starting_model(trained, tokenizer, data):
    """R = mean per-token KL(p_start ‖ p_θ) on the retain batch: 0 at the start, the float64 KL after a move."""
    model = copy.deepcopy(trained)
    method = build_method("grad_diff", {"retain_loss": "kl"})
    method.prepare(model, data)
    batch = data.retain[0]
    assert method.retain_term(model, batch).item() == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.add_(0.05 * torch.randn(32, 64))
        mask = batch["labels"][:, 1:] != -100
        p = torch.log_softmax(trained(**batch).logits[:, :-1][mask].double(), -1)
        q = torch.log_softmax(model(**batch).logits[:, :-1][mask].double(), -1)
        expected = (p.exp() * (p - q)).sum(-1).mean().item()
    assert expected > 1e-4
    assert method.retain_term(model, batch).item() == pytest.approx(expected, rel=1e-4)


def test_npo_loss_at_the_reference(trained, data):
    """At θ = θ_ref the log-ratio is 0: loss = (2/β)·ln 2 and ∇loss = ∇ mean_seq log π_θ(y|x)."""
    model = copy.deepcopy(trained)
    method = build_method("npo", {"beta": 0.3})
    method.prepare(model, data)
    loss = method.loss(model, 0, data.forget[0], None)
    assert loss.item() == pytest.approx(2 / 0.3 * math.log(2), rel=1e-6)
    weight = model.model.layers[0].mlp.down_proj.weight
    (got,) = torch.autograd.grad(loss, weight)
    (expected,) = torch.autograd.grad(sequence_logprob(model, data.forget[0]).mean(), weight)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())


def test_rmu_updates_only_the_selected_down_projections(trained, data):
    model = copy.deepcopy(trained)
    build_method("rmu", BASELINES["rmu"] | {"epochs": 1}).run(model, data)
    changed = {n for (n, a), (_, b) in zip(trained.named_parameters(), model.named_parameters(), strict=True)
               if not torch.equal(a, b)}
    assert changed == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_rmu_forward_stops_at_the_steered_layer(trained, data, checkpointing):
    """Layer 1 and the head never run, and the loss and its gradient equal the whole pass's (hidden state read from
    ``output_hidden_states``), also when gradient checkpointing recomputes layer 0 in the backward."""
    model = copy.deepcopy(trained)
    if checkpointing:
        enable_gradient_checkpointing(model)
    method = build_method("rmu", BASELINES["rmu"] | {"layer": 0})
    method.prepare(model, data)
    ran = []
    for module in (model.model.layers[1], model.lm_head):
        module.register_forward_hook(lambda *_: ran.append(True))
    weight = model.model.layers[0].mlp.down_proj.weight
    loss = method.loss(model, 0, data.forget[0], data.retain[0])
    (got,) = torch.autograd.grad(loss, weight)
    assert ran == []

    def hidden(m, batch):  # the output of layer 0 at the real tokens, from the whole pass
        mask = batch["attention_mask"].bool()
        return m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 output_hidden_states=True).hidden_states[1][mask].float()

    whole = copy.deepcopy(trained)
    with torch.no_grad():
        start = hidden(trained, data.retain[0])
    expected = ((hidden(whole, data.forget[0]) - method.target).pow(2).mean()
                + 10.0 * (hidden(whole, data.retain[0]) - start).pow(2).mean())
    assert torch.equal(loss.detach(), expected.detach())
    (want,) = torch.autograd.grad(expected, whole.model.layers[0].mlp.down_proj.weight)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_rmu_bad_layer_and_regex(trained, data):
    with pytest.raises(ConfigError, match=r"^method\.layer=2: the model has 2 decoder layers"):
        build_method("rmu", {"layer": 2}).run(copy.deepcopy(trained), data)
    with pytest.raises(ConfigError, match=r"^method\.param_regex=.lm_head.bias.: matches no parameter"):
        build_method("rmu", RMUConfig(layer=1, param_regex="lm_head.bias")).run(copy.deepcopy(trained), data)


@pytest.mark.parametrize("name, field", [("grad_diff", "retain_weight"), ("npo", "retain_weight"),
                                         ("rmu", "alpha")])
def test_retain_terms_need_retain_data(name, field, trained, data):
    forget_only = UnlearnData(forget=data.forget)
    cfg = {field: 1.0} | ({"layer": 1} if name == "rmu" else {})
    with pytest.raises(ConfigError, match=rf"^method\.{field}=1.0: needs retain batches"):
        build_method(name, cfg).run(copy.deepcopy(trained), forget_only)


# --- matched forgetting: early stopping at a target P̄ ----------------------------------------------------------

def checks_of(records: list[dict]) -> list[tuple[int, float]]:
    return [(r["check/step"], r["check/forget_prob"]) for r in records if "check/step" in r]


@pytest.mark.parametrize("every", [1, 2])
def test_early_stop_is_exact_to_the_check_interval(every, trained, data):
    """Training stops at the first check whose P̄ ≤ target: the check every k steps sees the same trajectory as
    the check every step (k = 1), so it stops within k − 1 optimizer steps of it; the bisected last interval then
    ends the run at the target P̄ itself."""
    start = mean_answer_prob(trained, data.forget)
    target = 0.4 * start
    cfg = {"epochs": 20, "lr": 1e-3, "target_forget_prob": target}
    every_step = []
    build_method("grad_ascent", cfg | {"check_every": 1}).run(copy.deepcopy(trained), data, log=every_step.append)
    first = next(step for step, prob in checks_of(every_step) if prob <= target)
    model, records = copy.deepcopy(trained), []
    history = build_method("grad_ascent", cfg | {"check_every": every}).run(model, data, log=records.append)
    checks = checks_of(records)
    assert [step for step, _ in checks] == list(range(every, checks[-1][0] + 1, every))
    assert all(prob > target for _, prob in checks[:-1]) and checks[-1][1] <= target
    assert first <= checks[-1][0] <= first + every - 1 and history[-1]["optimizer_steps"] == checks[-1][0]
    assert history[-1]["target_reached"] and 0 < history[-1]["interval_fraction"] <= 1
    assert mean_answer_prob(model, data.forget) == pytest.approx(target, rel=5e-3)
    assert history[-1]["forget_prob"] == pytest.approx(target, rel=5e-3)


def test_the_default_check_interval_is_about_four_checks_an_epoch(trained, tokenizer):
    """``check_every`` null: a check (a pass over the whole forget set) every ⌈forget batches / 4⌉ optimizer steps,
    so every step on the mini benchmarks' 4 batches and every 25 on TOFU forget10's 100; the interval used is in
    the last record."""
    assert [first_order.check_interval(GradDiffConfig(), n) for n in (1, 4, 5, 8, 100)] == [1, 1, 2, 2, 25]
    assert first_order.check_interval(GradDiffConfig(check_every=3), 100) == 3
    data = UnlearnData(forget=batches(tokenizer, FORGET, 1), retain=batches(tokenizer, RETAIN, 1))  # 8 batches
    cfg = {"epochs": 20, "lr": 1e-3, "target_forget_prob": 0.4 * mean_answer_prob(trained, data.forget)}
    records = []
    history = build_method("grad_ascent", cfg).run(copy.deepcopy(trained), data, log=records.append)
    steps = [step for step, _ in checks_of(records)]
    assert steps == list(range(2, steps[-1] + 1, 2)) and len(steps) > 1
    assert history[-1]["check_every"] == 2 and history[-1]["target_reached"]


def test_a_check_ending_the_epoch_scores_it(trained, data, monkeypatch):
    """An epoch whose last optimizer step was checked reports that check's P̄ with no further pass over the forget
    set: one scoring pass at the start and one per check."""
    passes = []
    monkeypatch.setattr(first_order, "forget_scores", lambda *a: passes.append(1) or forget_scores(*a))
    cfg = {"epochs": 2, "lr": 1e-4, "target_forget_prob": 1e-6, "check_every": 1}
    records = []
    history = build_method("grad_ascent", cfg).run(copy.deepcopy(trained), data, log=records.append)
    checks = checks_of(records)
    assert len(checks) == 2 * len(data.forget) and len(passes) == 1 + len(checks)
    ends = [prob for step, prob in checks if step % len(data.forget) == 0]
    assert [r["forget_prob"] for r in history[1:]] == ends


def test_early_stop_skips_a_start_already_below_the_target_and_reports_a_miss(trained, data):
    start = mean_answer_prob(trained, data.forget)
    model = copy.deepcopy(trained)
    history = build_method("grad_diff", {"target_forget_prob": min(2 * start, 0.99)}).run(model, data)
    assert len(history) == 1 and "already at or below" in history[0]["skipped"]
    assert all(torch.equal(a, b) for a, b in zip(trained.parameters(), model.parameters(), strict=True))
    missed = build_method("grad_diff", {"epochs": 1, "lr": 1e-6, "target_forget_prob": 0.01 * start}).run(
        copy.deepcopy(trained), data)
    assert missed[-1]["target_reached"] is False and "interval_fraction" not in missed[-1]
