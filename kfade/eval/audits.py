"""Audits: is the knowledge gone, or hidden? Each audit of ``eval.audits`` scores one model of a suite.

- ``relearn`` / ``relearn_retain`` (``kfade.eval.relearn``): finetune a copy on the forget set's attack half /
  on retain data only, score the held-out half: ``relearn/…`` (TOFU: ``forget/prob``, ``forget/truth_ratio``,
  ``forget_quality`` against the retrain model's truth ratios on the same held-out items; WMDP: every lm-eval
  score) and ``relearn/recovery`` (of the suite's forget score); ``relearn_retain/…`` likewise. With a stored
  delta (``experiment=mini_tofu_reapply``), the attacked model plus the delta again: ``reapply/relearn+delta/…``.
- ``quantize`` (``kfade.eval.quantize``): every suite score of int8 / int4 weight-only copies, ``quant8/…``,
  ``quant4/…``, and ``quant<bits>/recovery`` = (S_quant − S_model) / (S_reference − S_model) on the forget score.
- ``mia`` (``kfade.eval.mia``, TOFU): ``mia/<attack>/auc`` for forget vs holdout items; ``privleak`` is added
  once the retrain model's Min-K%++ AUC is known (:func:`with_privleak`).
- ``extraction`` (``kfade.eval.extraction``, TOFU): ``forget/extraction_strength``, ``forget/exact_memorization``.

A suite provides ``score``, ``forget_key``, ``relearn_split``, ``heldout_score``, ``retain_features`` and, for
TOFU, ``forget_rows`` and ``holdout_rows``. Every attack runs on a deep copy; all are deterministic given the seeds.
"""

from __future__ import annotations

import numpy as np

from kfade.data.formatting import pad_id
from kfade.eval.extraction import extraction_metrics
from kfade.eval.mia import PRIVLEAK_ATTACK, attack_scores, mia_aucs, privleak
from kfade.eval.quantize import quantized
from kfade.eval.relearn import recovery, relearned
from kfade.eval.scoring import answer_losses, answer_token_stats
from kfade.unlearn.delta import apply_delta

AUDITS = ("relearn", "relearn_retain", "quantize", "mia", "extraction")
HEADLINE_KEYS = ("relearn/recovery", "relearn_retain/recovery", "reapply/relearn+delta/recovery", "quant8/recovery",
                 "quant4/recovery", "mia/min_k_pp/auc", "privleak", "forget/extraction_strength",
                 "forget/exact_memorization")  # what a results table shows of the audits
TOFU_ONLY = ("mia", "extraction")  # need QA rows and never-seen holdout authors
PRIVLEAK_KEY = f"mia/{PRIVLEAK_ATTACK}/auc"


def run_audits(suite, model, own: dict[str, float], baseline: dict[str, float], delta: dict | None = None
               ) -> dict[str, float]:
    """The ``suite.eval.audits`` of ``model``, whose own scores are ``own``; ``baseline`` holds the reference
    model's scores as ``reference/…`` (the scale of every recovery). ``delta``: also re-add it after the attack."""
    audits = suite.eval.audits
    out: dict[str, float] = {}
    if "relearn" in audits:
        out |= relearn_audit(suite, model, "relearn", retain_only=False, delta=delta)
    if "relearn_retain" in audits:
        out |= relearn_audit(suite, model, "relearn_retain", retain_only=True)
    if "quantize" in audits:
        out |= quantize_audit(suite, model, own, baseline)
    if "mia" in audits:
        out |= mia_audit(suite, model)
    if "extraction" in audits:
        rows = suite.forget_rows()
        out |= extraction_metrics(answer_token_stats(model, suite.formatter, [r["question"] for r in rows],
                                                     [r["answer"] for r in rows], suite.eval.batch_size))
    return out


def relearn_audit(suite, model, name: str, retain_only: bool, delta: dict | None = None) -> dict[str, float]:
    """``<name>/…``: the held-out scores after the attack, and ``<name>/recovery``."""
    cfg = suite.eval.relearn
    attack, target = suite.relearn_split(cfg.seed)
    features = suite.retain_features() if retain_only else attack
    attacked = relearned(model, features, pad_id(suite.tokenizer), cfg, suite.progress)
    key = suite.forget_key()
    before, reference = suite.heldout_score(model, target), suite.heldout_score(suite.reference, target)
    results = {name: suite.heldout_score(attacked, target)}
    if delta is not None:  # the stored delta re-added after the attack: does the forgetting come back?
        apply_delta(attacked, delta)
        results["reapply/relearn+delta"] = suite.heldout_score(attacked, target)
    out: dict[str, float] = {}
    for prefix, scores in results.items():
        out |= {f"{prefix}/{k}": v for k, v in scores.items()}
        if key in scores and (r := recovery(scores[key], before[key], reference[key])) is not None:
            out[f"{prefix}/recovery"] = r
    return out


def quantize_audit(suite, model, own: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """``quant<bits>/…``: every suite score of the quantized copy, and ``quant<bits>/recovery``."""
    cfg, key = suite.eval.quantize, suite.forget_key()
    reference = baseline.get(f"reference/{key}")
    out: dict[str, float] = {}
    for bits in cfg.bits:
        scores = suite.score(quantized(model, bits, cfg.quant_type, cfg.blocksize))[0]
        out |= {f"quant{bits}/{k}": v for k, v in scores.items()}
        if key in scores and key in own and reference is not None:
            if (r := recovery(scores[key], own[key], reference)) is not None:
                out[f"quant{bits}/recovery"] = r
    return out


def mia_audit(suite, model) -> dict[str, float]:
    """``mia/<attack>/auc``: forget items (label 0) vs never-seen holdout items (label 1)."""
    k = suite.eval.mia.k
    scores = []
    for rows in (suite.forget_rows(), suite.holdout_rows()):
        questions, answers = [r["question"] for r in rows], [r["answer"] for r in rows]
        stats = answer_token_stats(model, suite.formatter, questions, answers, suite.eval.batch_size)
        losses = answer_losses(model, suite.formatter, questions, answers, suite.eval.batch_size)[0]
        scores.append(attack_scores(stats, losses, answers, k))
    return mia_aucs(*scores)


def with_privleak(scores: dict[str, float], prefixes: list[str], retrain_auc: float | None) -> dict[str, float]:
    """``<prefix>/privleak`` (``privleak`` for prefix "") for each prefix whose Min-K%++ AUC is in ``scores``."""
    out = {}
    for prefix in prefixes:
        at = f"{prefix}/" if prefix else ""
        if retrain_auc is not None and f"{at}{PRIVLEAK_KEY}" in scores and np.isfinite(retrain_auc):
            out[f"{at}privleak"] = privleak(scores[f"{at}{PRIVLEAK_KEY}"], retrain_auc)
    return out
