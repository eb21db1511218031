"""The loop the first-order baselines share: AdamW on a method-specific loss over the forget batches.

A baseline subclasses :class:`FirstOrderMethod` and overrides :meth:`loss` (and :meth:`prepare` when it needs
reference state such as a frozen model, :meth:`trainable` when it updates only some parameters). One epoch is
one pass over the forget batches; retain batch ``i mod len(retain)`` accompanies forget batch ``i``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from kfade.errors import ConfigError
from kfade.models.params import requires_grad_only
from kfade.unlearn.base import (
    Batch,
    LogFn,
    UnlearnData,
    non_finite,
    require_nonnegative,
    require_positive,
)
from kfade.unlearn.losses import RetainKLProbe, forget_nll


@dataclass
class FirstOrderConfig:
    """Optimiser settings of the first-order baselines (defaults: the TOFU paper's finetuning recipe)."""

    epochs: int = 5  # passes over the forget set
    lr: float = 1e-5  # AdamW learning rate (constant)
    weight_decay: float = 0.01  # AdamW decoupled weight decay

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        require_positive(self, "epochs", "lr")
        require_nonnegative(self, "weight_decay")


class FirstOrderMethod:
    """AdamW on :meth:`loss` for ``cfg.epochs`` epochs; history: one record per epoch (epoch 0 = the start).

    Record keys: ``epoch``, ``loss`` (mean training loss of the epoch), ``forget_nll`` (L_f, nats/token),
    ``retain_kl`` (mean per-token KL from the starting model on ``data.kl_probe``). A non-finite training loss or
    gradient stops the run before that update is applied (record ``stopped``: ``"non-finite loss"`` or
    ``"non-finite gradient in <parameter>"``).
    ``timings["unlearn_s"]``: wall time of the whole run.
    """

    retain_weight_field: str | None = None  # config field that makes the method need retain batches

    def __init__(self, cfg: FirstOrderConfig, progress: bool = False):
        cfg.validate()
        self.cfg, self.progress = cfg, progress
        self.timings: dict[str, float] = {}

    def trainable(self, model: torch.nn.Module) -> list[str]:
        """Names of the parameters the optimiser updates (default: every parameter)."""
        return [n for n, _ in model.named_parameters()]

    def prepare(self, model: torch.nn.Module, data: UnlearnData) -> None:
        """Capture whatever the loss needs from the starting model (default: nothing)."""

    def loss(self, model: torch.nn.Module, index: int, forget: Batch, retain: Batch | None) -> torch.Tensor:
        """The scalar minimised on forget batch number ``index`` (with its retain companion, if any)."""
        raise NotImplementedError

    def needs_retain(self) -> bool:
        return self.retain_weight_field is not None and getattr(self.cfg, self.retain_weight_field) > 0

    def run(self, model: torch.nn.Module, data: UnlearnData, log: LogFn | None = None) -> list[dict]:
        if self.needs_retain() and not data.retain:
            field = self.retain_weight_field
            raise ConfigError(f"method.{field}", getattr(self.cfg, field),
                              "needs retain batches; the retain set is empty")
        emit = log or (lambda record: None)
        start = time.perf_counter()
        probe = RetainKLProbe(model, data.kl_probe)
        self.prepare(model, data)
        history = [{"epoch": 0, "forget_nll": forget_nll(model, data.forget), "retain_kl": 0.0}]
        emit(history[-1])
        names = self.trainable(model)
        with requires_grad_only(model, names) as params:
            optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
            for epoch in range(1, self.cfg.epochs + 1):
                losses = []
                for i, batch in enumerate(tqdm(data.forget, desc=f"epoch {epoch}", leave=False,
                                               disable=not self.progress)):
                    companion = data.retain[i % len(data.retain)] if data.retain else None
                    loss = self.loss(model, i, batch, companion)
                    stopped = None if torch.isfinite(loss) else "non-finite loss"
                    if stopped is None:
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        stopped = non_finite("gradient", {n: p.grad for n, p in zip(names, params, strict=True)
                                                          if p.grad is not None})
                    if stopped is not None:
                        break
                    optimizer.step()
                    losses.append(loss.item())
                record = {"epoch": epoch, "loss": sum(losses) / max(len(losses), 1),
                          "forget_nll": forget_nll(model, data.forget), "retain_kl": probe(model)}
                if stopped is not None:
                    record["stopped"] = stopped
                    warnings.warn(f"{type(self).__name__}: {stopped} in epoch {epoch}; stopped before that update",
                                  stacklevel=2)
                history.append(record)
                emit(record)
                if stopped:
                    break
            optimizer.zero_grad(set_to_none=True)
        self.timings["unlearn_s"] = time.perf_counter() - start
        return history
