"""Membership inference on forget vs never-seen holdout items, and MUSE's privleak.

Each attack gives every item a score that is *higher for items the model did not see* (as OpenUnlearning's
attacks do); the AUC is P(score(holdout) > score(forget)) + ½ P(tie) (scipy's Mann-Whitney U / (n₁ n₂), equal to
``sklearn.metrics.roc_auc_score`` with forget labelled 0, holdout 1). AUC 1: the forget items look seen; 0.5:
indistinguishable; below 0.5: the forget items look *less* seen than never-seen ones (over-unlearned).

Scores over an item's answer tokens y_1..y_n given its question (``kfade.eval.scoring``):

- ``loss``: the mean token NLL ℓ (nats, the closing EOS included, as TOFU's ``avg_gt_loss``);
- ``zlib`` (Carlini et al. 2021): ℓ / len(zlib.compress(answer as UTF-8)) (nats per compressed byte);
- ``min_k`` (Min-K%, Shi et al. 2024): −mean of the ⌊k n⌋ (≥ 1) lowest log p(y_t) (EOS excluded);
- ``min_k_pp`` (Min-K%++, Zhang et al. 2025): the same over (log p(y_t) − μ_t) / σ_t, μ_t and σ_t the mean and
  standard deviation of log p(z) under z ~ p(·|question, y_<t).

``privleak`` (MUSE) = (AUC_model − AUC_retrain) / AUC_retrain × 100 with Min-K%++: near 0 is good, positive = the
forget set still looks seen, negative = over-unlearned. MUSE and OpenUnlearning compute the ratio on 1 − AUC (their
AUC is oriented the other way), which flips the sign and changes the denominator.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
from scipy.stats import mannwhitneyu

from kfade.eval.scoring import TokenStats

ATTACKS = ("loss", "zlib", "min_k", "min_k_pp")
PRIVLEAK_ATTACK = "min_k_pp"


def min_k_score(values: np.ndarray, k: float) -> float:
    """−mean of the ``max(1, int(k · n))`` smallest of ``values`` (log-probabilities or normalised ones)."""
    return -float(np.mean(np.sort(values)[: max(1, int(len(values) * k))]))


def zlib_score(mean_nll: float, text: str) -> float:
    """Mean token NLL per byte of the zlib-compressed text."""
    return mean_nll / len(zlib.compress(text.encode("utf-8")))


def attack_scores(stats: Sequence[TokenStats], mean_nll: np.ndarray, answers: Sequence[str],
                  k: float) -> dict[str, np.ndarray]:
    """Every attack's per-item score (higher = looks unseen) from the items' token statistics, mean NLLs and
    answer texts."""
    return {
        "loss": np.asarray(mean_nll, dtype=np.float64),
        "zlib": np.array([zlib_score(loss, text) for loss, text in zip(mean_nll, answers, strict=True)]),
        "min_k": np.array([min_k_score(s.logprob, k) for s in stats]),
        "min_k_pp": np.array([min_k_score((s.logprob - s.mean) / s.std, k) for s in stats]),
    }


def auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """P(holdout score > forget score) + ½ P(tie): the ROC AUC of telling holdout (1) from forget (0) items."""
    u = mannwhitneyu(holdout_scores, forget_scores, alternative="two-sided").statistic
    return float(u / (len(forget_scores) * len(holdout_scores)))


def mia_aucs(forget: dict[str, np.ndarray], holdout: dict[str, np.ndarray]) -> dict[str, float]:
    """``mia/<attack>/auc`` for every attack of :func:`attack_scores`."""
    return {f"mia/{name}/auc": auc(forget[name], holdout[name]) for name in ATTACKS}


def privleak(auc_model: float, auc_retrain: float) -> float:
    """MUSE's privacy leakage in percent: (AUC_model − AUC_retrain) / AUC_retrain × 100."""
    return (auc_model - auc_retrain) / auc_retrain * 100.0
