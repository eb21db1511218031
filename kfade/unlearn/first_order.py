"""The loop the first-order baselines share: AdamW on a method-specific loss over the forget batches.

A baseline subclasses :class:`FirstOrderMethod` and overrides :meth:`loss` (and :meth:`prepare` when it needs
reference state such as a frozen model, :meth:`trainable` when it updates only some parameters). One epoch is
one pass over the forget batches; retain batch ``i mod len(retain)`` accompanies forget batch ``i``.

Matched forgetting (``target_forget_prob``): the forget-set P̄ is measured every ``check_every`` optimizer steps
(default: ⌈forget batches / 4⌉, about four checks an epoch, as a check is a pass over the whole forget set) and
training stops at the first check where P̄ ≤ the target (``epochs`` is then a cap). The last interval is
bisected: the weights are set to θ_prev + α(θ_now − θ_prev), θ_prev those of the previous check, with α ∈ (0, 1]
found by the same log-scale search as K-FADE's η (``kfade.unlearn.step_search``), so the run ends at the target
P̄ (within the search's tolerance) whatever the learning rate.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from kfade.errors import ConfigError, require_range
from kfade.models.params import requires_grad_only
from kfade.unlearn.base import (
    Batch,
    LogFn,
    MethodConfig,
    UnlearnData,
    non_finite,
    require_nonnegative,
    require_positive,
    restore,
    snapshot,
    target_reached_at_start,
)
from kfade.unlearn.losses import RetainKLProbe, forget_scores
from kfade.unlearn.step_search import eta_for_forget_prob


@dataclass
class FirstOrderConfig(MethodConfig):
    """Optimiser settings of the first-order baselines (defaults: the TOFU paper's finetuning recipe)."""

    epochs: int = 5  # passes over the forget set
    lr: float = 1e-5  # AdamW learning rate (constant)
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    target_forget_prob: float | None = None  # stop once the forget-set P̄ is ≤ this (None: run every epoch)
    check_every: int | None = None  # optimizer steps between forget-P̄ checks (with target_forget_prob); None:
    #   ⌈forget batches / CHECKS_PER_EPOCH⌉

    def validate(self) -> None:
        require_positive(self, "epochs", "lr")
        require_range("method.check_every", self.check_every, 0, open_low=True, optional=True)
        require_nonnegative(self, "weight_decay")
        if self.target_forget_prob is not None and not 0 < self.target_forget_prob < 1:
            raise ConfigError("method.target_forget_prob", self.target_forget_prob, "must be in (0, 1), or null")


CHECKS_PER_EPOCH = 4  # default forget-P̄ checks an epoch: a check costs a pass over every forget batch


def check_interval(cfg: FirstOrderConfig, forget_batches: int) -> int:
    """Optimizer steps between forget-P̄ checks: ``cfg.check_every``, or ⌈forget batches / CHECKS_PER_EPOCH⌉.
    A check is a no-grad pass over the whole forget set, F forward passes for F forget batches against the 3–6
    forward-pass equivalents of an optimizer step: checked every step, TOFU forget10 at batch 4 (F = 100) would
    spend over 90 % of its time checking. The default: every step on the mini benchmarks' 4 forget batches, every
    25 on TOFU forget10."""
    return cfg.check_every or max(1, math.ceil(forget_batches / CHECKS_PER_EPOCH))


class FirstOrderMethod:
    """AdamW on :meth:`loss` for ``cfg.epochs`` epochs; history: one record per epoch (epoch 0 = the start).

    Record keys: ``epoch``, ``loss`` (mean training loss of the epoch), ``forget_nll`` (L_f, nats/token),
    ``forget_prob`` (forget-set P̄), ``retain_kl`` (mean per-token KL from the starting model on ``data.kl_probe``,
    logged only), ``optimizer_steps``. A non-finite training loss or gradient stops the run before that update is
    applied (record ``stopped``: ``"non-finite loss"`` or ``"non-finite gradient in <parameter>"``). With
    ``target_forget_prob`` (module docstring) each check is logged as ``{"check/step", "check/forget_prob"}``, the
    last record has ``target_reached``, ``check_every`` (the interval used) and, once reached, ``interval_fraction``
    (α of the bisected interval); a start already at or below the target trains nothing (``skipped`` in the
    epoch-0 record).
    ``timings["unlearn_s"]``: wall time of the whole run.
    """

    uses_curvature = False
    curvature_cfg = None
    retain_weight_field: str | None = None  # config field that makes the method need retain batches

    def __init__(self, cfg: FirstOrderConfig, progress: bool = False):
        self.cfg, self.progress = cfg, progress
        self.timings: dict[str, float] = {}

    def trainable(self, model: torch.nn.Module) -> list[str]:
        """Names of the parameters the optimiser updates (default: every parameter)."""
        return [n for n, _ in model.named_parameters()]

    def with_forget_targets(self, model: torch.nn.Module, data: UnlearnData) -> UnlearnData:
        """The data to train on, with the targets its forget loss needs from the starting model (default: as is)."""
        return data

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
        data = self.with_forget_targets(model, data)
        self.prepare(model, data)
        scores = forget_scores(model, data.forget)
        history = [{"epoch": 0, "forget_nll": scores.nll, "forget_prob": scores.prob, "retain_kl": 0.0}]
        target = self.cfg.target_forget_prob
        if (skipped := target_reached_at_start(scores.prob, target)) is not None:
            history[0]["skipped"] = skipped
        emit(history[-1])
        names = self.trainable(model)
        steps, reached, every = 0, None, check_interval(self.cfg, len(data.forget))
        with requires_grad_only(model, names) as params:
            optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
            last_check = snapshot(model, names) if target is not None else None
            for epoch in range(1, 0 if "skipped" in history[0] else self.cfg.epochs + 1):
                losses, checked = [], None  # checked: the forget scores of a check at the current weights
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
                    steps, checked = steps + 1, None
                    if target is not None and steps % every == 0:
                        checked = forget_scores(model, data.forget)
                        emit({"check/step": steps, "check/forget_prob": checked.prob})
                        if checked.prob <= target:
                            reached = self.bisect_last_interval(model, names, last_check, data, target,
                                                                checked.prob)
                            checked = None
                            break
                        last_check = snapshot(model, names)
                scores = checked if checked is not None else forget_scores(model, data.forget)  # reuse a last check
                record = {"epoch": epoch, "loss": sum(losses) / max(len(losses), 1), "forget_nll": scores.nll,
                          "forget_prob": scores.prob, "retain_kl": probe(model), "optimizer_steps": steps}
                if stopped is not None:
                    record["stopped"] = stopped
                    warnings.warn(f"{type(self).__name__}: {stopped} in epoch {epoch}; stopped before that update",
                                  stacklevel=2)
                history.append(record)
                emit(record)
                if stopped or reached is not None:
                    break
            optimizer.zero_grad(set_to_none=True)
        if target is not None:
            history[-1] |= {"target_reached": reached is not None, "check_every": every} | (
                {"interval_fraction": reached} if reached is not None else {})
        self.timings["unlearn_s"] = time.perf_counter() - start
        return history

    @torch.no_grad()
    def bisect_last_interval(self, model: torch.nn.Module, names: list[str], last_check: dict[str, torch.Tensor],
                             data: UnlearnData, target: float, prob_now: float) -> float:
        """Move the weights to θ_prev + α(θ_now − θ_prev) with P̄ ≈ ``target``; returns α ∈ (0, 1]. ``prob_now``:
        P̄(θ_now), measured by the check (the search's first point, α = 1)."""
        params = dict(model.named_parameters())
        update = {n: params[n].detach() - last_check[n].to(params[n].device) for n in names}
        restore(model, last_check)
        search = eta_for_forget_prob(model, update, data.forget, target, eta0=1.0, known={1.0: prob_now})
        alpha = min(search.eta, 1.0)
        for n in names:
            params[n].add_(alpha * update[n])
        return alpha
