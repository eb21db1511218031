"""Gradient ascent (Maini et al. 2024, TOFU): minimise −L_f, i.e. push the forget answers' NLL up."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kfade.unlearn.base import Batch
from kfade.unlearn.first_order import FirstOrderConfig, FirstOrderMethod
from kfade.unlearn.losses import mean_token_nll


@dataclass
class GradAscentConfig(FirstOrderConfig):
    """Defaults: TOFU's recipe (AdamW, lr 1e-5, 5 epochs, weight decay 0.01)."""

    name: str = "grad_ascent"  # method name (registry key)


class GradAscent(FirstOrderMethod):
    """Loss −(mean label-token NLL of the forget batch)."""

    def loss(self, model: torch.nn.Module, index: int, forget: Batch, retain: Batch | None) -> torch.Tensor:
        return -mean_token_nll(model, forget)
