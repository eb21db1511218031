"""Audits end to end through experiments/run.py (every model gets them, keys finite), and the attacks' own
contracts: deep copies only, determinism, the attack budget, quantization levels."""


import numpy as np
import pytest
import torch
from conftest import make_tiny_llama
from hydra import compose, initialize_config_dir
from test_run import ROOT, run_in_process

from kfade.data.formatting import QAFormatter, pad_id
from kfade.eval.quantize import quantize_weight, quantized
from kfade.eval.relearn import RelearnConfig, attack_split, recovery, relearned
from kfade.pipeline import load_config
from kfade.report.matched import columns_of, matched_rows
from kfade.report.report import REFERENCE_METHODS, _reference_rows, table_columns

MODELS = ("", "reference/", "retrain/")
AUDIT_KEYS = ["relearn/forget/prob", "relearn/forget_quality", "relearn_retain/forget/prob",
              "quant4/forget/prob", "quant4/model_utility",
              "mia/loss/auc", "mia/zlib/auc", "mia/min_k/auc", "mia/min_k_pp/auc", "privleak",
              "forget/extraction_strength", "forget/exact_memorization"]
RECOVERIES = ["relearn/recovery", "relearn_retain/recovery", "quant4/recovery"]


@pytest.mark.usefixtures("cache")
def test_every_audit_scores_the_unlearned_reference_and_retrain_models(tmp_path):
    results = run_in_process(tmp_path, "experiment=mini_tofu_reapply", "reapply.epochs=1", "method=grad_ascent",
                             "method.epochs=1", "eval.relearn.steps=2", "eval.quantize.bits=[4]",  # int8: below
                             "eval.audits=[relearn,relearn_retain,quantize,mia,extraction]")
    for prefix in MODELS:
        for key in AUDIT_KEYS:
            assert np.isfinite(results[prefix + key]), prefix + key
        for key in ("mia/min_k_pp/auc", "forget/extraction_strength", "forget/exact_memorization"):
            assert 0.0 <= results[prefix + key] <= 1.0
    assert results["time/audits_s"] > 0
    for prefix in ("", "retrain/"):  # the reference is the scale itself: no recovery of its own
        for key in RECOVERIES:
            assert np.isfinite(results[prefix + key]), prefix + key
    assert not any(f"reference/{key}" in results for key in RECOVERIES)
    assert results["retrain/privleak"] == 0.0  # the retrain model against itself
    assert results["reference/mia/loss/auc"] > results["retrain/mia/loss/auc"]  # it learnt the forget authors
    # reapply: the attacked unlearned model with its stored delta added again
    assert np.isfinite(results["reapply/relearn+delta/recovery"])
    assert results["reapply/relearn+delta/forget/prob"] != results["relearn/forget/prob"]


@pytest.mark.slow  # ~16 s: trains the mini-WMDP pair and scores lm-eval tasks 3 × 3 times
@pytest.mark.usefixtures("cache")
def test_relearn_and_quantize_on_mini_wmdp_hold_lm_eval_accuracies(tmp_path):
    results = run_in_process(tmp_path, "experiment=mini_wmdp", "method=grad_ascent", "method.epochs=1",
                             "eval.lm_eval_limit=8", "eval.relearn.steps=2", "eval.quantize.bits=[4]",
                             "eval.audits=[relearn,quantize]")
    for prefix in MODELS:
        for key in ("relearn/mini_wmdp/acc", "quant4/mini_wmdp/acc", "quant4/mini_mmlu/acc"):
            assert 0.0 <= results[prefix + key] <= 1.0
        for audit in ("", "relearn/", "quant4/"):  # the forget side in one number: the mean of the *wmdp* tasks
            assert results[f"{prefix}{audit}wmdp/acc"] == results[f"{prefix}{audit}mini_wmdp/acc"]
    assert "quant8/mini_wmdp/acc" not in results


def test_attack_split_is_seeded_disjoint_and_covers_everything():
    attack, heldout = attack_split(11, seed=3)
    assert (attack, heldout) == attack_split(11, seed=3) and attack != attack_split(11, seed=4)[0]
    assert len(attack) == 5 and sorted(attack + heldout) == list(range(11))


def test_recovery_is_relative_to_the_reference_and_undefined_for_it():
    assert recovery(after=0.5, model=0.2, reference=0.8) == pytest.approx(0.5)
    assert recovery(after=0.2, model=0.2, reference=0.8) == 0.0
    assert recovery(after=0.9, model=0.8, reference=0.8) is None


def test_relearned_copies_the_model_takes_exactly_the_budget_and_is_deterministic(tokenizer, monkeypatch):
    model = make_tiny_llama(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    formatter = QAFormatter(tokenizer)
    features = [formatter.encode(f"Question {i}?", f"Answer number {i}.") for i in range(5)]
    steps = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, _s=torch.optim.AdamW.step, **k:
                        (steps.append(1), _s(self, *a, **k))[1])
    cfg = RelearnConfig(steps=4, lr=1e-2, batch_size=2)  # 3 batches an epoch: the budget ends mid-epoch 2
    first = relearned(model, features, pad_id(tokenizer), cfg)
    assert len(steps) == 4
    second = relearned(model, features, pad_id(tokenizer), cfg)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the source is untouched
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())
    assert not torch.equal(first.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)


def test_quantized_copy_rounds_every_linear_but_the_head(tokenizer):
    model = make_tiny_llama(tokenizer, tie_word_embeddings=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q4, q8 = quantized(model, 4), quantized(model, 8)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the source is untouched
    assert torch.equal(q4.lm_head.weight, model.lm_head.weight)
    w, w4, w8 = (m.model.layers[0].mlp.up_proj.weight.detach() for m in (model, q4, q8))
    assert len(torch.unique(w4.flatten()[:64])) <= 16  # one block of 64: at most 16 levels
    assert all(len(torch.unique(row)) <= 255 for row in w8)
    err4, err8 = (w4 - w).abs().max(), (w8 - w).abs().max()
    assert 0 < err8 <= w.abs().max(1).values.max() / 127 and err8 < err4
    assert torch.equal(quantize_weight(w, 4), w4)  # deterministic


def test_no_audit_by_default():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for experiment in ("mini_tofu", "mini_wmdp"):
            cfg = compose(config_name="config", overrides=[f"experiment={experiment}"])
            assert load_config(cfg).eval.audits == []  # default: none (speed); the compare sweep turns them on


def test_audit_keys_become_report_and_matched_columns_only_when_present():
    rows = [{"job": f"gd/{i}", "method": "grad_diff", "forget/prob": p, "relearn/recovery": r, "privleak": 10 * r,
             "reference/forget/prob": 0.98, "retrain/relearn/recovery": 0.05}
            for i, (p, r) in enumerate([(0.5, 0.2), (0.3, 0.6)])]
    rows += _reference_rows(rows)
    columns = table_columns(rows)
    assert "relearn/recovery" in columns and "privleak" in columns and "quant4/recovery" not in columns
    assert next(r for r in rows if r["method"] == "retrain")["relearn/recovery"] == 0.05
    matched = matched_rows(rows, exclude_methods=REFERENCE_METHODS, levels=(0.38,))
    at = next(r for r in matched if r["level"] == "0.38")
    t = (np.log(0.38) - np.log(0.3)) / (np.log(0.5) - np.log(0.3))
    assert at["relearn/recovery"] == pytest.approx(0.6 + t * (0.2 - 0.6))  # interpolated like every metric
    assert "relearn/recovery" in columns_of(matched) and "quant4/recovery" not in columns_of(matched)
    assert "relearn/recovery" not in columns_of(matched_rows([{"method": "x", "forget/prob": 0.4}]))
