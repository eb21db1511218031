"""TOFU's statistics (Maini et al. 2024), computed from per-item mean token losses ℓ (nats/token).

- Truth ratio of item i: R_i = exp(ℓ(ã_i) − mean_j ℓ(â_ij)) = geo-mean_j P̄(â_ij) / P̄(ã_i), with ã the
  paraphrased answer (the answer itself for real authors / world facts) and â_ij the perturbed answers.
  This is the ``truth_ratio`` field of TOFU's eval logs; R < 1 means the model prefers the true answer.
- Forget set score: mean min(R, 1/R); other sets: mean max(0, 1 − R).
- Normalised probability (real authors / world facts): P̄(a) / (P̄(a) + Σ_j P̄(â_j)).
- Forget quality: KS-test p-value between the per-item forget-set R of a model and of the retain model.
- Model utility: harmonic mean of retain / real-author / world-fact probability, ROUGE-L recall and
  truth-ratio score (0 if any of them is 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rouge_score import rouge_scorer
from scipy.special import logsumexp
from scipy.stats import hmean, ks_2samp


def truth_ratios(paraphrased_losses: Sequence[float],
                 perturbed_losses: Sequence[Sequence[float]]) -> np.ndarray:
    """Per-item R = exp(ℓ(paraphrased) − mean ℓ(perturbed)); ``perturbed_losses[i]`` may vary in length."""
    mean_perturbed = np.array([np.mean(losses) for losses in perturbed_losses], dtype=np.float64)
    return np.exp(np.asarray(paraphrased_losses, dtype=np.float64) - mean_perturbed)


def forget_truth_ratio_score(ratios: Sequence[float]) -> float:
    """Forget-set truth ratio: mean min(R, 1/R) (1 = no preference between true and false answers)."""
    r = np.asarray(ratios, dtype=np.float64)
    return float(np.mean(np.minimum(r, 1.0 / r)))


def truth_ratio_score(ratios: Sequence[float]) -> float:
    """Truth-ratio score of the other sets: mean max(0, 1 − R) (1 = true answer strongly preferred)."""
    return float(np.mean(np.maximum(0.0, 1.0 - np.asarray(ratios, dtype=np.float64))))


def normalized_probabilities(answer_losses: Sequence[float],
                             perturbed_losses: Sequence[Sequence[float]]) -> np.ndarray:
    """Per-item P̄(a) / (P̄(a) + Σ_j P̄(â_j)) with P̄ = exp(−ℓ), evaluated in log space (no underflow)."""
    return np.array([np.exp(-a - logsumexp(-np.asarray([a, *p], dtype=np.float64)))
                     for a, p in zip(answer_losses, perturbed_losses, strict=True)])


def forget_quality(model_ratios: Sequence[float], retain_model_ratios: Sequence[float]) -> float:
    """Two-sample KS-test p-value between per-item forget-set truth ratios (high = indistinguishable)."""
    return float(ks_2samp(model_ratios, retain_model_ratios).pvalue)


def model_utility(values: Sequence[float]) -> float:
    """Harmonic mean of the nine utility numbers (0 when any is 0)."""
    return float(hmean(np.asarray(values, dtype=np.float64)))


_ROUGE = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def rouge_recalls(generations: Sequence[str], answers: Sequence[str]) -> dict[str, list[float]]:
    """ROUGE-1 and ROUGE-L recall of each generation against its answer (Porter-stemmed, as TOFU scores)."""
    pairs = zip(generations, answers, strict=True)
    scores = [_ROUGE.score(answer, generation) for generation, answer in pairs]
    return {name: [s[name].recall for s in scores] for name in ("rouge1", "rougeL")}
