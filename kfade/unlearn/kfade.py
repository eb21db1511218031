"""K-FADE: uphill Gauss-Newton steps on the forget loss, preconditioned by the retain-set curvature.

Each step takes Δ = η·p with p = (Ĝ + λI)⁻¹∇L_f(θ), ∇L_f the gradient of the mean label-token NLL of the forget
set at the current weights, and Ĝ the curvature (K-FAC / EK-FAC / diagonal / identity) fit once on ``data.fit``
at the starting weights (``kfade.curvature.load_or_fit``: cached, so sweeps over η, λ and n_steps reuse it).
Ĝ approximates the GGN of the mean per-token loss, so ½ΔᵀĜΔ ≈ the mean per-token KL(p_θ ‖ p_θ+Δ) in nats.

Step rules (η):
- ``fixed``: η = ``step_size``.
- ``normalized``: η = ``step_size`` / ‖p‖₂, so ‖Δ‖₂ = ``step_size`` over the covered parameters.
- ``trust_region``: η = sqrt(2ε / gᵀp), ε = ``kl_budget``. Since gᵀp = pᵀ(Ĝ+λI)p this sets the *damped*
  quadratic form ½Δᵀ(Ĝ+λI)Δ = ε (the design's formula, and one dot product, no extra curvature product).
  The predicted KL ½ΔᵀĜΔ = ε − ½λ‖Δ‖² is then at most ε (equal as λ → 0), and the damping also bounds the
  step, ‖Δ‖² ≤ 2ε/λ, along directions Ĝ barely sees; with a large (e.g. relative) damping the step is
  conservative, which the logged ``predicted_kl`` shows.

  The block-diagonal curvature can badly under-predict the KL along preconditioned directions (on the mini-TOFU
  tiny model measured/predicted ratios of 10–10⁴ were seen: cross-layer terms and the Kronecker tails are not in
  Ĝ). So, with ``max_backtracks`` > 0, a trust-region step is also checked against the *measured* retain KL on
  ``data.kl_probe``: while the KL from the starting model exceeds ``step × kl_budget``, η is halved (a
  backtracking line search, at most ``max_backtracks`` times; the last try is kept and logged as such).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from kfade.cache import cache_dir
from kfade.curvature import CurvatureConfig, load_or_fit
from kfade.curvature.config import DAMPING_MODES
from kfade.errors import ConfigError
from kfade.unlearn.base import LogFn, UnlearnData, require_choice, require_positive, restore, snapshot
from kfade.unlearn.delta import apply_delta
from kfade.unlearn.losses import RetainKLProbe, forget_gradient, forget_nll

STEP_RULES = ("fixed", "normalized", "trust_region")


@dataclass
class KFadeConfig:
    """K-FADE step settings; the curvature's own settings come separately as a ``CurvatureConfig``."""

    name: str = "kfade"  # method name (registry key)
    step_rule: str = "trust_region"  # fixed | normalized | trust_region (see the module docstring)
    step_size: float = 5e-3  # η (fixed; the paper reports 2.5e-3 … 1.1e-2) or ‖Δ‖₂ (normalized)
    kl_budget: float = 0.1  # ε for trust_region: allowed ½Δᵀ(Ĝ+λI)Δ per step, nats per token
    n_steps: int = 5  # Gauss-Newton steps, each with a fresh forget gradient (the paper uses 1–5)
    max_backtracks: int = 12  # trust_region: halvings of η while the measured retain KL exceeds step × kl_budget
    damping: float | None = None  # λ override (absolute) or α (relative); None → the curvature config's
    damping_mode: str | None = None  # absolute | relative override; None → the curvature config's

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        require_choice(self, "step_rule", STEP_RULES)
        require_positive(self, "step_size", "kl_budget", "n_steps")
        if self.max_backtracks < 0:
            raise ConfigError("method.max_backtracks", self.max_backtracks, "must be >= 0")
        if self.damping is not None and not (math.isfinite(self.damping) and self.damping >= 0):
            raise ConfigError("method.damping", self.damping, "must be a finite number >= 0 or null")
        if self.damping_mode is not None:
            require_choice(self, "damping_mode", DAMPING_MODES)


def squared_norm(tensors: dict[str, torch.Tensor]) -> float:
    return sum(float(t.double().square().sum()) for t in tensors.values())


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


class KFade:
    """``run`` fits/loads the curvature, then takes ``n_steps`` uphill steps in place.

    History: ``{"step": 0, "forget_nll", "retain_kl": 0.0}`` for the start, then per step ``step``,
    ``forget_nll`` (L_f after the step, nats/token), ``retain_kl`` (measured mean per-token KL from the starting
    model on ``data.kl_probe``), ``predicted_kl`` (½ΔᵀĜΔ, undamped), ``step_norm`` (‖Δ‖₂), ``eta``. A step whose
    update or resulting forget loss is not finite is undone (weights restored bit for bit), recorded with
    ``rejected`` and ends the run. ``timings``: ``fit_s`` (curvature fit or cache load), ``unlearn_s`` (steps).
    """

    uses_curvature = True

    def __init__(self, cfg: KFadeConfig, curvature: CurvatureConfig | None = None,
                 cache_root: str | Path | None = None, progress: bool = False):
        cfg.validate()
        self.cfg, self.progress = cfg, progress
        self.curvature_cfg = curvature if curvature is not None else CurvatureConfig()
        self.cache_root = Path(cache_root) if cache_root is not None else cache_dir() / "curvature"
        self.timings: dict[str, float] = {}

    def eta(self, grads: dict[str, torch.Tensor], direction: dict[str, torch.Tensor]) -> float:
        rule = self.cfg.step_rule
        if rule == "fixed":
            return self.cfg.step_size
        if rule == "normalized":
            return self.cfg.step_size / math.sqrt(squared_norm(direction))
        damped_form = sum(float((grads[n].double() * direction[n].double()).sum()) for n in grads)
        return math.sqrt(2 * self.cfg.kl_budget / damped_form)

    def checked_step(self, model, direction, eta, saved, probe, step) -> tuple[dict, float | None, int]:
        """Apply Δ = η·direction, halving η while a trust-region step overshoots the measured retain KL budget.

        Returns (Δ applied, measured retain KL after it or None if Δ is not finite, number of halvings).
        """
        backtracks = self.cfg.max_backtracks if self.cfg.step_rule == "trust_region" else 0
        for halvings in range(backtracks + 1):
            delta = {n: (eta / 2**halvings) * d for n, d in direction.items()}
            if not all_finite(delta):
                return delta, None, halvings
            apply_delta(model, delta)
            retain_kl = probe(model)
            if halvings == backtracks or retain_kl <= step * self.cfg.kl_budget:
                return delta, retain_kl, halvings
            restore(model, saved)
        raise AssertionError("unreachable")

    def run(self, model: torch.nn.Module, data: UnlearnData, log: LogFn | None = None) -> list[dict]:
        if not data.fit:
            raise ConfigError("dataset.fit_sets", "[]", "K-FADE needs curvature fitting batches; the set is empty")
        emit = log or (lambda record: None)
        start = time.perf_counter()
        curvature = load_or_fit(model, lambda: data.fit, self.curvature_cfg, self.cache_root, data.fit_fingerprint,
                                progress=self.progress)
        self.timings["fit_s"] = time.perf_counter() - start

        start = time.perf_counter()
        names = curvature.param_names
        probe = RetainKLProbe(model, data.kl_probe)
        grads, loss = forget_gradient(model, data.forget, names, self.progress)
        history = [{"step": 0, "forget_nll": loss, "retain_kl": 0.0}]
        emit(history[-1])
        for step in range(1, self.cfg.n_steps + 1):
            direction = curvature.precondition(grads, damping=self.cfg.damping, damping_mode=self.cfg.damping_mode)
            eta = self.eta(grads, direction)
            saved = snapshot(model, names)
            delta, retain_kl, halvings = self.checked_step(model, direction, eta, saved, probe, step)
            record = {"step": step, "eta": eta / 2**halvings, "step_norm": math.sqrt(squared_norm(delta))}
            if halvings:
                record["backtracks"] = halvings
            accepted = retain_kl is not None
            if accepted:
                last = step == self.cfg.n_steps
                grads, loss = ((None, forget_nll(model, data.forget)) if last
                               else forget_gradient(model, data.forget, names, self.progress))
                accepted = math.isfinite(loss)
            if not accepted:
                restore(model, saved)
                record["rejected"] = "non-finite update or forget loss; weights rolled back"
                warnings.warn(f"K-FADE step {step} rejected: non-finite update or forget loss "
                              f"(eta={eta:.3g}); weights rolled back, stopping", stacklevel=2)
                history.append(record)
                emit(record)
                break
            record.update(forget_nll=loss, retain_kl=retain_kl, predicted_kl=curvature.predicted_kl(delta))
            history.append(record)
            emit(record)
        self.timings["unlearn_s"] = time.perf_counter() - start
        return history
