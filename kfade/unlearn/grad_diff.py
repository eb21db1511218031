"""Gradient difference (Liu et al. 2022; TOFU baseline): ascend on the forget loss, descend on retain."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kfade import fsdp
from kfade.models.logits import label_logits, token_kl
from kfade.unlearn.base import Batch, UnlearnData, require_choice, require_nonnegative
from kfade.unlearn.first_order import FirstOrderConfig, FirstOrderMethod
from kfade.unlearn.losses import FORGET_LOSSES, forget_objective, mean_token_nll, with_forget_targets

RETAIN_LOSSES = ("nll", "kl")


@dataclass
class GradDiffConfig(FirstOrderConfig):
    """Defaults: TOFU's recipe (AdamW, lr 1e-5, 5 epochs, weight decay 0.01; both weights 1)."""

    name: str = "grad_diff"  # method name (registry key)
    retain_loss: str = "nll"  # "nll": retain-answer NLL; "kl": per-token KL(p_start ‖ p_θ) on retain
    forget_weight: float = 1.0  # weight of the (negated) forget NLL
    retain_weight: float = 1.0  # weight of the retain term
    forget_loss: str = "nll"  # the forget term: nll (−NLL of the answers) | kl_base | kl_no_answer (+KL to the
    #                           target on them; see method=kfade)

    def validate(self) -> None:
        super().validate()
        require_choice(self, "retain_loss", RETAIN_LOSSES)
        require_nonnegative(self, "forget_weight", "retain_weight")
        require_choice(self, "forget_loss", FORGET_LOSSES)

    def keeps_frozen_copy(self) -> bool:
        """The KL retain term compares with the frozen starting model."""
        return self.retain_loss == "kl" and self.retain_weight > 0


class GradDiff(FirstOrderMethod):
    """Loss −w_f·NLL_f + w_r·R; R = retain NLL or mean per-token KL from the frozen starting model (nats)."""

    retain_weight_field = "retain_weight"

    def with_forget_targets(self, model: torch.nn.Module, data: UnlearnData) -> UnlearnData:
        return with_forget_targets(self.cfg.forget_loss, model, data)

    def prepare(self, model: torch.nn.Module, data: UnlearnData) -> None:
        self.reference = None
        if self.cfg.keeps_frozen_copy():
            self.reference = fsdp.copy_model(model).eval().requires_grad_(False)

    def retain_term(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        if self.cfg.retain_loss == "nll":
            return mean_token_nll(model, batch)
        with torch.no_grad():
            reference = label_logits(self.reference, batch).logits
        logits = label_logits(model, batch).logits
        return token_kl(reference, logits) / max(logits.shape[0], 1)

    def loss(self, model: torch.nn.Module, index: int, forget: Batch, retain: Batch | None) -> torch.Tensor:
        loss = -self.cfg.forget_weight * forget_objective(model, forget)
        if self.cfg.retain_weight > 0:
            loss = loss + self.cfg.retain_weight * self.retain_term(model, retain)
        return loss
