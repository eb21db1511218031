"""The quadratic-regime safeguard's measurement: a step's measured KL against the KL its Gauss-Newton model predicts."""

from __future__ import annotations

import torch

from kfade.curvature.cg import dot
from kfade.curvature.sharded_ggn import gauss_newton
from kfade.unlearn.losses import RetainKLProbe


class QuadraticCheck:
    """Measured against predicted KL of a step on a few training batches of the fitting set.

    Built at the step's start: caches those batches' logits (the measured KL's reference) and pᵀGp for the step's
    direction p with the exact G of the same batches — ``curvature`` when the solver already has it (PCG, from its
    final residual), else one GGN product — so any step Δ = η·p has ½ΔᵀGΔ = ½η²·pᵀGp.
    """

    def __init__(self, model: torch.nn.Module, batches: list, direction: dict[str, torch.Tensor] | None = None,
                 mode: str = "auto", curvature: float | None = None):
        self.probe = RetainKLProbe(model, batches)
        if curvature is None:
            ggn = gauss_newton(model, batches, list(direction), mode=mode)
            curvature = dot(direction, ggn(direction))
        self.curvature = curvature  # pᵀGp, nats per token per unit η²

    def __call__(self, model: torch.nn.Module, eta: float) -> tuple[float, float]:
        """(measured KL from the step's start, predicted ½η²pᵀGp), nats per token."""
        return self.probe(model), 0.5 * eta**2 * self.curvature


