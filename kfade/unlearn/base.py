"""What every unlearning method shares: the :class:`Method` protocol, its input data, config checks, and parameter
bookkeeping.

A method is a small class with one entry point, ``run(model, data, log=None) -> list[dict]``: it updates
``model`` in place (the caller passes a copy of the source model) and returns a per-step (or per-epoch)
history; ``log`` is called with each history record as it is produced.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

import torch

from kfade.curvature.config import CurvatureConfig
from kfade.data.formatting import IGNORE_INDEX
from kfade.errors import ConfigError, require_one_of, require_range

Batch = dict[str, torch.Tensor]
LogFn = Callable[[dict], None]
KL_PROBE_BATCHES = 2  # retain batches used as the retain-KL probe when none are given


def count_label_tokens(batches: Sequence[Batch]) -> int:
    """Tokens that carry a loss: labels ≠ -100 after the causal shift (position 0 predicts nothing)."""
    return int(sum((b["labels"][:, 1:] != IGNORE_INDEX).sum() for b in batches))


def batches_fingerprint(batches: Sequence[Batch]) -> str:
    """SHA-256 (16 hex digits) of the batches' token ids, masks and labels: same tokens ⇔ same fingerprint."""
    digest = hashlib.sha256()
    for b in batches:
        for key in ("input_ids", "attention_mask", "labels"):
            t = b[key].detach().to("cpu", torch.long).contiguous()
            digest.update(f"{key}{tuple(t.shape)}".encode())
            digest.update(t.numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class UnlearnData:
    """The batches a method sees (each a dict of ``[B, T]`` input_ids, attention_mask, labels)."""

    forget: list[Batch]  # the forget set D_f; L_f is the mean NLL over its label tokens
    retain: list[Batch] = field(default_factory=list)  # the retain set D_r (baselines' retain terms)
    fit: list[Batch] | None = None  # K-FADE curvature fitting set; None → ``retain``
    fit_fingerprint: str = ""  # identifies ``fit`` in the curvature cache; "" → hash of its tokens
    kl_probe: list[Batch] | None = None  # retain batches for the logged retain KL; None → first 2 of retain
    forget_split: str = "forget"  # name of the forget split, for error messages

    def __post_init__(self):
        if not self.forget:
            raise ConfigError("dataset.forget_split", self.forget_split, "empty forget set")
        if count_label_tokens(self.forget) == 0:
            raise ConfigError("dataset.forget_split", self.forget_split, "empty forget set (no label tokens)")
        if self.fit is None:
            self.fit = self.retain
        if not self.fit_fingerprint:
            self.fit_fingerprint = batches_fingerprint(self.fit)
        if self.kl_probe is None:
            self.kl_probe = self.retain[:KL_PROBE_BATCHES]


class MethodConfig:
    """Base of every method's config dataclass: validated on construction (``validate`` raises ConfigError
    ``method.<field>``), and what the memory plan (``kfade.pipeline.plan.workload``) asks of the method before it
    is built."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError ``method.<field>`` for the first invalid field."""

    def keeps_frozen_copy(self) -> bool:
        """Whether the method holds a frozen copy of the starting model beside the one it updates."""
        return False

    def uses_forget_targets(self) -> bool:
        """Whether its forget batches must carry a non-knowing model's log-probabilities (a ``forget_loss`` field
        set to ``kl_base``: ``kfade.unlearn.losses.FORGET_TARGET``; the pipeline adds them)."""
        return getattr(self, "forget_loss", None) == "kl_base"

    def trained_pattern(self) -> str | None:
        """Regex (``re.search``) of the parameter names the method updates; None: every parameter."""
        return None

    def plan_fields(self, fit_batches: int | None = None) -> dict:
        """``kfade.plan.Workload`` fields this config decides (e.g. K-FADE's solver and its vectors' dtype);
        ``fit_batches``: the most fitting batches the run keeps (``dataset.fit_max_batches``; None: unbounded)."""
        return {}


@runtime_checkable
class Method(Protocol):
    """What every unlearning method provides (``kfade.unlearn.METHODS``).

    ``cfg``: its validated config dataclass (``hp/…`` in results.json). ``uses_curvature``: whether it fits a
    curvature, and so is built with a ``CurvatureConfig`` (``curvature_cfg``; None for the others). ``timings``: wall
    seconds of the last ``run``, ``unlearn_s`` (the steps or epochs) and, with a curvature, ``fit_s`` (fit or cache
    load).
    """

    uses_curvature: ClassVar[bool]
    cfg: object
    curvature_cfg: CurvatureConfig | None
    timings: dict[str, float]

    def run(self, model: torch.nn.Module, data: UnlearnData, log: LogFn | None = None) -> list[dict]:
        """Update ``model`` in place; the per-step (or per-epoch) history, each record also passed to ``log``."""
        ...


def require_positive(cfg, *names: str) -> None:
    """ConfigError ``method.<name>`` unless each named field is a finite number > 0."""
    for name in names:
        require_range(f"method.{name}", getattr(cfg, name), 0, open_low=True)


def require_nonnegative(cfg, *names: str) -> None:
    """ConfigError ``method.<name>`` unless each named field is a finite number ≥ 0."""
    for name in names:
        require_range(f"method.{name}", getattr(cfg, name), 0)


def require_choice(cfg, name: str, choices: Sequence[str]) -> None:
    """ConfigError ``method.<name>`` unless the field's value is one of ``choices``."""
    require_one_of(f"method.{name}", getattr(cfg, name), choices)


def non_finite(what: str, tensors: dict[str, torch.Tensor]) -> str | None:
    """``"non-finite <what> in <name>"`` for the first tensor holding NaN or ±inf, else None."""
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            return f"non-finite {what} in {name}"
    return None


def target_reached_at_start(prob: float, target: float | None) -> str | None:
    """The ``skipped`` notice of a run whose starting forget P̄ is already at or below its target, else None."""
    if target is None or prob > target:
        return None
    return f"forget P̄ {prob:.4g} is already at or below method.target_forget_prob={target:g}: no update taken"


def snapshot(model: torch.nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Copies of the named parameters on the CPU (exact; keeps accelerator memory free)."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().to("cpu", copy=True) for n in names}


@torch.no_grad()
def restore(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Write a :func:`snapshot` back into the model, bit for bit."""
    params = dict(model.named_parameters())
    for n, value in saved.items():
        params[n].copy_(value)
