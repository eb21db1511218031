"""Negative Preference Optimization (Zhang et al. 2024, arXiv 2404.05868).

Loss on a forget sequence (x, y): −(2/β)·log σ(−β·(log π_θ(y|x) − log π_ref(y|x))) = (2/β)·softplus(β·r),
with r the log-likelihood ratio of the whole answer (sum over its label tokens, nats) and π_ref the frozen
starting model. As β → 0 it reduces to gradient ascent on the sequence NLL; for β > 0 the push fades once
π_θ(y|x) ≪ π_ref(y|x), which is what keeps NPO from collapsing. NPO+RT adds ``retain_weight``·retain NLL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kfade.unlearn.base import Batch, UnlearnData, require_nonnegative, require_positive
from kfade.unlearn.first_order import FirstOrderConfig, FirstOrderMethod
from kfade.unlearn.losses import mean_token_nll, sequence_logprob


@dataclass
class NPOConfig(FirstOrderConfig):
    """Defaults: the NPO paper's TOFU setting (β 0.1, AdamW lr 1e-5, 10 epochs, weight decay 0.01)."""

    name: str = "npo"  # method name (registry key)
    epochs: int = 10  # passes over the forget set
    beta: float = 0.1  # inverse temperature β of the preference loss
    retain_weight: float = 0.0  # weight of the retain NLL term (0 = plain NPO, > 0 = NPO+RT)

    def validate(self) -> None:
        super().validate()
        require_positive(self, "beta")
        require_nonnegative(self, "retain_weight")


class NPO(FirstOrderMethod):
    """Mean over the batch's sequences of (2/β)·softplus(β·(log π_θ − log π_ref)), + optional retain NLL."""

    retain_weight_field = "retain_weight"

    @torch.no_grad()
    def prepare(self, model: torch.nn.Module, data: UnlearnData) -> None:
        self.reference_logprobs = [sequence_logprob(model, b) for b in data.forget]

    def loss(self, model: torch.nn.Module, index: int, forget: Batch, retain: Batch | None) -> torch.Tensor:
        beta = self.cfg.beta
        ratio = sequence_logprob(model, forget) - self.reference_logprobs[index]
        loss = (2.0 / beta) * F.softplus(beta * ratio).mean()
        if self.cfg.retain_weight > 0:
            loss = loss + self.cfg.retain_weight * mean_token_nll(model, retain)
        return loss
