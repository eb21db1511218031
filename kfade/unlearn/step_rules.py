"""K-FADE's step rules: the step size η of Δ = η·p, p the solver's direction, g = ∇L_f the forget gradient.

- ``fixed``: η = ``step_size``.
- ``normalized``: η = ``step_size`` / ‖p‖₂, so ‖Δ‖₂ = ``step_size`` over the covered parameters.
- ``trust_region``: η = sqrt(2ε / gᵀp), ε = ``kl_budget`` (nats per token): ½Δᵀ(G+λI)Δ = ε with the solver's G,
  since gᵀp = pᵀ(G+λI)p for an exact solve; η is then halved up to ``max_backtracks`` times while the measured KL
  from the run's start on the check batches exceeds step × ε (:attr:`StepRule.backtracks`).
- ``target_forget``: η such that the forget-set P̄ after this step is P̄·(target/P̄)^(1/r), P̄ the current value
  and r the steps left, so ``target_forget_prob`` is reached after the last step (log-scale bisection on η along
  p, ``kfade.unlearn.step_search``; it starts at the trust-region η of ``SEARCH_START_KL`` nats).

A step that leaves the quadratic regime is split (``kfade.unlearn.kfade``): :meth:`StepRule.shorter` gives its
new η — target_forget aims at the nearer P̄ of the longer schedule, the other rules halve η.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from kfade.curvature.cg import dot
from kfade.unlearn.base import Batch
from kfade.unlearn.step_search import eta_for_forget_prob

if TYPE_CHECKING:
    from kfade.unlearn.kfade import KFadeConfig

SEARCH_START_KL = 0.01  # target_forget starts its η search at the trust-region η of this many nats

Vector = dict[str, torch.Tensor]


def squared_norm(tensors: Vector) -> float:
    """‖v‖₂² over every tensor of ``v``, accumulated in fp64 (``DTensor`` shards: over every rank)."""
    return dot(tensors, tensors)


def trust_region_eta(grads: Vector, direction: Vector, kl: float) -> float:
    """η with ½η²·gᵀp = ``kl``: the step's predicted KL (nats per token) for an exactly solved direction p."""
    return math.sqrt(2 * kl / dot(grads, direction))


class StepRule:
    """η of a step (:meth:`eta`), and of a split step (:meth:`shorter`). ``target``: the forget P̄ the run aims at
    (None: none; a start at or below it takes no step); ``backtracks``: halvings of η allowed while the measured KL
    overshoots the trust region; ``knobs``: the config fields it reads (shown in a run's header)."""

    target: float | None = None
    backtracks: int = 0
    knobs: tuple[str, ...] = ()

    def __init__(self, cfg: KFadeConfig):
        self.cfg = cfg

    def eta(self, model: torch.nn.Module, grads: Vector, direction: Vector, forget: list[Batch], prob: float,
            steps_left: int) -> tuple[float, dict]:
        """(η, what to log about choosing it) for the step from forget P̄ ``prob`` with ``steps_left`` to go."""
        raise NotImplementedError

    def shorter(self, model: torch.nn.Module, grads: Vector, direction: Vector, forget: list[Batch], prob: float,
                steps_left: int, eta_taken: float) -> tuple[float, dict]:
        """(η, log) of a split step, now with ``steps_left`` to go: half the η taken."""
        return eta_taken / 2, {}


class Fixed(StepRule):
    """η = ``step_size``."""

    knobs = ("step_size",)

    def eta(self, model, grads, direction, forget, prob, steps_left):
        return self.cfg.step_size, {}


class Normalized(StepRule):
    """η = ``step_size`` / ‖p‖₂: every step has ‖Δ‖₂ = ``step_size``."""

    knobs = ("step_size",)

    def eta(self, model, grads, direction, forget, prob, steps_left):
        return self.cfg.step_size / math.sqrt(squared_norm(direction)), {}


class TrustRegion(StepRule):
    """η = sqrt(2ε / gᵀp), ε = ``kl_budget``; halved up to ``max_backtracks`` times while the measured KL
    overshoots."""

    knobs = ("kl_budget",)

    @property
    def backtracks(self) -> int:
        return self.cfg.max_backtracks

    def eta(self, model, grads, direction, forget, prob, steps_left):
        return trust_region_eta(grads, direction, self.cfg.kl_budget), {}


class TargetForget(StepRule):
    """η at which the forget P̄ after the step is P̄·(target/P̄)^(1/r), r the steps left (``target_forget_prob``
    after the last step); a split step aims along the longer schedule."""

    knobs = ("target_forget_prob",)

    @property
    def target(self) -> float:
        return self.cfg.target_forget_prob

    def eta(self, model, grads, direction, forget, prob, steps_left):
        aim = prob * (self.target / prob) ** (1 / steps_left)
        search = eta_for_forget_prob(model, direction, forget, aim, trust_region_eta(grads, direction,
                                                                                     SEARCH_START_KL))
        return search.eta, {"forget_evals": search.evaluations}

    def shorter(self, model, grads, direction, forget, prob, steps_left, eta_taken):
        return self.eta(model, grads, direction, forget, prob, steps_left)


STEP_RULES: dict[str, type[StepRule]] = {"fixed": Fixed, "normalized": Normalized, "trust_region": TrustRegion,
                                         "target_forget": TargetForget}
