"""Matched-forget step sizes: the η at which the forget-set P̄ after Δ = η·d reaches a target.

P̄ = mean over forget sequences of exp(−mean answer-token NLL) (TOFU's ``forget/prob``), measured on the model
itself (one no-grad pass over the forget batches per evaluation). P̄(η) is searched on a log grid of η: doubled
or halved from ``eta0`` until the target is bracketed, then bisected geometrically until |P̄ − target| ≤
``rtol``·target or ``max_evals`` evaluations were spent; the η whose P̄ came closest is returned (the model is
left unchanged).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kfade.unlearn.base import Batch, restore, snapshot
from kfade.unlearn.delta import apply_delta
from kfade.unlearn.losses import mean_answer_prob


@dataclass
class StepSearch:
    """The chosen ``eta``, the P̄ it gives, and the number of forget-set evaluations it took."""

    eta: float
    forget_prob: float
    evaluations: int


def eta_for_forget_prob(model: torch.nn.Module, direction: dict[str, torch.Tensor], forget: Sequence[Batch],
                        target: float, eta0: float, rtol: float = 5e-3, max_evals: int = 40,
                        known: dict[float, float] | None = None) -> StepSearch:
    """η > 0 with P̄(θ + η·direction) ≈ ``target`` (see the module docstring); ``eta0`` > 0 starts the search.
    ``known``: {η: P̄} already measured (not evaluated again, not counted in ``evaluations``)."""
    saved = snapshot(model, list(direction))
    tried: dict[float, float] = dict(known or {})
    given = len(tried)

    def prob(eta: float) -> float:
        if eta in tried:
            return tried[eta]
        apply_delta(model, {n: eta * d for n, d in direction.items()})
        try:
            value = mean_answer_prob(model, forget)
        finally:
            restore(model, saved)
        tried[eta] = value if math.isfinite(value) else -math.inf  # a broken model counts as overshooting
        return tried[eta]

    low, high = None, None  # P̄(low) > target ≥ P̄(high)
    eta = eta0
    seen: set[float] = set()
    while len(tried) - given < max_evals and eta not in seen:  # a repeated η: the bracket collapsed
        seen.add(eta)
        if abs(prob(eta) - target) <= rtol * target:
            break
        if tried[eta] > target:
            low = eta
            eta = eta * 2 if high is None else math.sqrt(eta * high)
        else:
            high = eta
            eta = eta / 2 if low is None else math.sqrt(low * eta)
    best = min(tried, key=lambda e: abs(tried[e] - target))
    return StepSearch(best, tried[best], len(tried) - given)
