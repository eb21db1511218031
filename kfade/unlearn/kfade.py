"""K-FADE: uphill Gauss-Newton steps on the forget loss, preconditioned by the retain-set curvature.

Each step takes Δ = η·p with p ≈ (G + λI)⁻¹∇L_f(θ), ∇L_f the gradient of the mean label-token NLL of the forget
set at the current weights and G the retain-set Gauss-Newton matrix of the mean per-token loss (½ΔᵀGΔ ≈ mean
per-token KL(p_θ ‖ p_θ+Δ), nats). Ĝ, the fitted curvature (K-FAC / EK-FAC / diagonal / identity), is fit once on
``data.fit`` at the starting weights (``kfade.curvature.load_or_fit``: cached, so sweeps over η, λ and n_steps
reuse it). The direction p comes from a solver:

- ``direct`` (the paper's K-FAC step): p = (Ĝ + δI)⁻¹∇L_f, δ the curvature's damping.
- ``cg``: p = ``cg_iters`` iterations of preconditioned conjugate gradients on (G + λI)p = ∇L_f with the *exact*
  G (matrix-free products on the fitting batches, re-linearised at the current weights each step) and the
  preconditioner M = (Ĝ + δI + λI)⁻¹; λ = ``cg_damping`` × the mean eigenvalue of G (relative) or absolute.
  Each step warm-starts from the previous step's p (``cg_warm_start``); from 0, the first iterate is the
  preconditioned gradient M∇L_f, the direct step's direction with δ + λ. With ``cg_checkpoint`` each PCG
  iteration's state is saved under ``<cache>/cg/<run key>/`` (run key: starting weights, data, both configs)
  and the same run started again after a crash resumes there and ends bit-equal; removed when the run ends.
  The PCG vectors are kept in ``cg_dtype`` (bfloat16 halves them; dot products stay fp64) and, with
  ``cg_offload=cpu``, in host memory: only the vector of a product or a preconditioning visits the device.

Step rules (η):
- ``fixed``: η = ``step_size``.
- ``normalized``: η = ``step_size`` / ‖p‖₂, so ‖Δ‖₂ = ``step_size`` over the covered parameters.
- ``trust_region``: η = sqrt(2ε / gᵀp), ε = ``kl_budget``: ½Δᵀ(G+λI)Δ = ε with the solver's G (Ĝ for direct),
  since gᵀp = pᵀ(G+λI)p for an exact solve. With ``max_backtracks`` > 0 the step is also checked against the
  *measured* KL on the check batches (training batches of the fitting set, never an eval set): while the KL from
  the starting model exceeds ``step × kl_budget``, η is halved (a block-diagonal Ĝ can under-predict the KL of
  its own direction 10–10⁴×).
- ``target_forget``: η such that the forget-set P̄ (TOFU's ``forget/prob``) after this step is
  P̄·(target/P̄)^(1/r), P̄ the current value and r the steps left, so ``target_forget_prob`` is reached after the
  last step: found by a log-scale bisection on η along p (``kfade.unlearn.step_search``; the evaluations are
  logged). Compares methods at matched forgetting. A start already at or below the target takes no step
  (``skipped`` in the step-0 record).

Quadratic-regime safeguard (``max_kl_ratio``): a Gauss-Newton step is only trusted where the quadratic model
holds. After each step the mean per-token KL from the step's start is measured on ``check_batches`` training
batches of the fitting set and compared with ½ΔᵀGΔ of the *exact* G on the same batches at the step's start (one
GGN product per step). If measured / predicted lies outside [1/``max_kl_ratio``, ``max_kl_ratio``] (a KL growing
faster than quadratic, or saturating), the step is undone and split: one more step
is planned (``n_steps`` is the minimum, ``max_steps`` the cap) and this one is shortened — target_forget aims at
the nearer P̄ of the longer schedule along the same direction, the other rules halve η — then the next step
re-linearises at its own weights. Each split is logged (``split/…`` records; ``splits`` in the step's record).
"""

from __future__ import annotations

import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kfade.cache import cache_dir, fingerprint
from kfade.curvature import Curvature, CurvatureConfig, load_or_fit, model_fingerprint
from kfade.curvature.cg import CGResult, conjugate_gradient, dot
from kfade.curvature.config import DAMPING_MODES
from kfade.curvature.ggn import MODES as GGN_MODES
from kfade.curvature.ggn import GaussNewton
from kfade.data.formatting import evenly_spaced
from kfade.errors import ConfigError
from kfade.unlearn.base import (
    LogFn,
    UnlearnData,
    batches_fingerprint,
    non_finite,
    require_choice,
    require_nonnegative,
    require_positive,
    restore,
    snapshot,
    target_reached_at_start,
)
from kfade.unlearn.delta import apply_delta
from kfade.unlearn.losses import RetainKLProbe, forget_gradient, forget_scores
from kfade.unlearn.step_search import eta_for_forget_prob

STEP_RULES = ("fixed", "normalized", "trust_region", "target_forget")
SOLVERS = ("direct", "cg")
CG_DAMPING_MODES = ("absolute", "relative")
CG_DTYPES = ("float32", "bfloat16")  # the PCG vectors' dtype (dot products are fp64 either way)
CG_OFFLOADS = ("none", "cpu")  # where the PCG vectors live: with the model, or in host memory
SEARCH_START_KL = 0.01  # target_forget starts its η search at the trust-region η of this many nats
TINY_KL = 1e-12  # predicted KLs below this count as this (a zero step has no ratio)


@dataclass
class KFadeConfig:
    """K-FADE step settings; the curvature's own settings come separately as a ``CurvatureConfig``."""

    name: str = "kfade"  # method name (registry key)
    solver: str = "cg"  # direct ((Ĝ+δI)⁻¹g) | cg (PCG on the exact GGN, preconditioned by Ĝ)
    step_rule: str = "target_forget"  # fixed | normalized | trust_region | target_forget (module docstring)
    step_size: float = 5e-3  # η (fixed; the paper reports 2.5e-3 … 1.1e-2) or ‖Δ‖₂ (normalized)
    kl_budget: float = 0.1  # ε for trust_region: allowed ½Δᵀ(G+λI)Δ per step, nats per token
    target_forget_prob: float = 0.38  # target_forget: forget-set P̄ after the last step, in (0, 1)
    n_steps: int = 3  # Gauss-Newton steps at least, each with a fresh forget gradient (the paper uses 1–5)
    max_steps: int = 6  # cap on the steps when the safeguard splits them (≥ n_steps; = n_steps: never split)
    max_kl_ratio: float | None = 2.0  # split a step whose measured KL / ½ΔᵀGΔ is > this or < 1/this (None: off)
    check_batches: int = 4  # fitting batches (evenly spaced) on which the safeguard measures and predicts KL
    max_backtracks: int = 12  # trust_region: halvings of η while the measured check KL exceeds step × kl_budget
    damping: float | None = None  # δ override (absolute) or α (relative, global); None → the curvature config's
    damping_mode: str | None = None  # absolute | relative | global override; None → the curvature config's
    cg_iters: int = 5  # cg: maximum PCG iterations per step (truncation regularises; README: measured)
    cg_tol: float = 1e-4  # cg: stop once ‖g − (G+λI)p‖ ≤ cg_tol·‖g‖
    cg_damping: float = 0.1  # cg: λ, × the mean eigenvalue of G (relative) or in GGN units (absolute)
    cg_damping_mode: str = "relative"  # cg: relative | absolute
    cg_batches: int | None = None  # cg: fitting batches used for the G products (evenly spaced); None: all
    cg_dtype: str = "float32"  # cg: PCG vectors x, r, z, p, (G+λI)p in float32 (fp64 for a fp64 model) | bfloat16
    cg_offload: str = "none"  # cg: none (vectors on the model's device) | cpu (host memory; only the vector of a
    #   product or a preconditioning visits the device)
    cg_warm_start: bool = True  # cg: start each step's PCG from the previous step's direction (else from 0)
    cg_retain_graphs: bool = False  # cg: keep each batch's graphs for all products of a step (faster, more memory)
    cg_checkpoint: bool = True  # cg: save the PCG state every iteration; a rerun of a killed run resumes from it
    ggn_mode: str = "auto"  # cg: auto | forward | double_backward (how J v is computed, kfade.curvature.ggn)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        require_choice(self, "solver", SOLVERS)
        require_choice(self, "step_rule", STEP_RULES)
        require_choice(self, "cg_damping_mode", CG_DAMPING_MODES)
        require_choice(self, "cg_dtype", CG_DTYPES)
        require_choice(self, "cg_offload", CG_OFFLOADS)
        require_choice(self, "ggn_mode", GGN_MODES)
        require_positive(self, "step_size", "kl_budget", "n_steps", "cg_iters", "check_batches")
        if self.max_steps < self.n_steps:
            raise ConfigError("method.max_steps", self.max_steps, f"must be ≥ method.n_steps ({self.n_steps})")
        if self.max_kl_ratio is not None and not (math.isfinite(self.max_kl_ratio) and self.max_kl_ratio >= 1):
            raise ConfigError("method.max_kl_ratio", self.max_kl_ratio, "must be a finite number ≥ 1, or null")
        if not 0 < self.target_forget_prob < 1:
            raise ConfigError("method.target_forget_prob", self.target_forget_prob, "must be in (0, 1)")
        require_nonnegative(self, "cg_tol", "cg_damping")
        if self.cg_batches is not None and self.cg_batches < 1:
            raise ConfigError("method.cg_batches", self.cg_batches, "must be >= 1 or null")
        if self.cg_retain_graphs and self.ggn_mode == "forward":
            raise ConfigError("method.ggn_mode", self.ggn_mode, "cg_retain_graphs needs double_backward (or auto)")
        if self.max_backtracks < 0:
            raise ConfigError("method.max_backtracks", self.max_backtracks, "must be >= 0")
        if self.damping is not None and not (math.isfinite(self.damping) and self.damping >= 0):
            raise ConfigError("method.damping", self.damping, "must be a finite number >= 0 or null")
        if self.damping_mode is not None:
            require_choice(self, "damping_mode", DAMPING_MODES)


def vector_dtype(gradient: torch.dtype, cg_dtype: str) -> torch.dtype:
    """The PCG vectors' dtype: bfloat16, or ``float32`` meaning fp32 or the gradient's dtype when wider (fp64)."""
    return torch.bfloat16 if cg_dtype == "bfloat16" else torch.promote_types(gradient, torch.float32)


def squared_norm(tensors: dict[str, torch.Tensor]) -> float:
    return sum(float(t.double().square().sum()) for t in tensors.values())


class QuadraticCheck:
    """Measured against predicted KL of a step on a few training batches of the fitting set.

    Built at the step's start: caches those batches' logits (the measured KL's reference) and one exact GGN product
    G·p for the step's direction p, so any step Δ = η·p has ½ΔᵀGΔ = ½η²·pᵀGp without another product.
    """

    def __init__(self, model: torch.nn.Module, batches: list, direction: dict[str, torch.Tensor], mode: str):
        self.probe = RetainKLProbe(model, batches)
        ggn = GaussNewton(model, batches, list(direction), mode=mode)
        self.curvature = dot(direction, ggn(direction))  # pᵀGp, nats per token per unit η²

    def __call__(self, model: torch.nn.Module, eta: float) -> tuple[float, float]:
        """(measured KL from the step's start, predicted ½η²pᵀGp), nats per token."""
        return self.probe(model), 0.5 * eta**2 * self.curvature


class KFade:
    """``run`` fits/loads the curvature, then takes ``n_steps`` (up to ``max_steps``) uphill steps in place.

    History: ``{"step": 0, "forget_nll", "forget_prob", "retain_kl": 0.0, "zero_eigenvalues"}`` for the start
    (``zero_eigenvalues``: entries of Ĝ's Λ at the ≥ 0 clamp — for K-FAC the products with a factor eigenvalue
    that ``eigh`` clamped from below 0, each clamp also logged by ``kfade.curvature.estimators``; ``skipped``
    when the start is already at the target P̄), then per step ``step``, ``forget_nll`` (L_f after the step,
    nats/token), ``forget_prob`` (forget-set P̄), ``retain_kl`` (measured mean per-token KL from the starting model
    on ``data.kl_probe``, logged only), ``predicted_kl`` (½ΔᵀĜΔ, undamped), ``step_norm`` (‖Δ‖₂), ``eta``; with
    the safeguard ``check_kl`` / ``check_predicted_kl`` (measured KL from the step's start and ½ΔᵀGΔ with the exact
    G, on the check batches), ``kl_ratio`` (their ratio) and ``splits``; with cg ``cg_iters``, ``cg_residual``
    (relative), ``cg_stop``, ``cg_lambda``; with target_forget ``forget_evals``. Each PCG iteration is also logged
    as ``{"cg/step", "cg/iteration", "cg/residual"}`` and each split as ``{"split/step", "split/kl_ratio",
    "split/steps"}`` (not in the history). Numerical guard: a step whose forget gradient, CG residual, direction,
    update or resulting forget loss (logits) is not finite is undone (weights restored bit for bit), recorded with
    ``rejected`` = ``"non-finite <quantity> in <parameter>; weights rolled back"``, warned about, and ends the run
    (the earlier steps stand). ``timings``: ``fit_s`` (curvature fit or cache load), ``unlearn_s`` (steps).
    """

    uses_curvature = True

    def __init__(self, cfg: KFadeConfig, curvature: CurvatureConfig | None = None,
                 cache_root: str | Path | None = None, progress: bool = False):
        self.cfg, self.progress = cfg, progress
        self.curvature_cfg = curvature if curvature is not None else CurvatureConfig()
        self.timings: dict[str, float] = {}
        self.cache_root = Path(cache_root) if cache_root is not None else cache_dir() / "curvature"

    def on_host(self) -> bool:
        """With ``cg_offload=cpu`` the forget gradient and the direction live in host memory beside the PCG vectors
        (each is moved to the device a layer or a product at a time)."""
        return self.cfg.solver == "cg" and self.cfg.cg_offload == "cpu"

    def forget_gradient(self, model, batches, names):
        grads, scores = forget_gradient(model, batches, names, self.progress)
        return ({n: g.to("cpu") for n, g in grads.items()} if self.on_host() else grads), scores

    def eta(self, grads: dict[str, torch.Tensor], direction: dict[str, torch.Tensor], kl_budget: float) -> float:
        """η of the fixed / normalized / trust-region rules (trust region: ½ηpᵀ(G+λI)ηp = ``kl_budget``)."""
        rule = self.cfg.step_rule
        if rule == "fixed":
            return self.cfg.step_size
        if rule == "normalized":
            return self.cfg.step_size / math.sqrt(squared_norm(direction))
        return math.sqrt(2 * kl_budget / dot(grads, direction))

    def solve(self, model: torch.nn.Module, curvature: Curvature, grads: dict[str, torch.Tensor],
              data: UnlearnData, step: int, warm_start: dict[str, torch.Tensor] | None,
              emit: LogFn, checkpoints: Path | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        """The step's direction p and what to log about it (see the module docstring for the solvers)."""
        cfg = self.cfg
        if cfg.solver == "direct":
            return curvature.precondition(grads, damping=cfg.damping, damping_mode=cfg.damping_mode), {}
        ggn = GaussNewton(model, evenly_spaced(data.fit, cfg.cg_batches), list(grads), mode=cfg.ggn_mode,
                          retain_graphs=cfg.cg_retain_graphs)
        lam = cfg.cg_damping
        if cfg.cg_damping_mode == "relative":
            scale = curvature.mean_eigenvalue()
            lam *= scale if scale is not None else ggn.mean_eigenvalue(seed=self.curvature_cfg.seed)

        device = next(model.parameters()).device
        placed = {n: g.to("cpu" if self.on_host() else g.device, vector_dtype(g.dtype, cfg.cg_dtype))
                  for n, g in grads.items()}  # b, and so every PCG vector

        def precondition(v):  # one layer at a time on the device, in fp32 or wider
            out = {}
            for spec in curvature.layers:
                layer = {n: v[n].to(device, torch.promote_types(v[n].dtype, torch.float32)) for n in spec.param_names}
                out |= {n: t.to(v[n]) for n, t in curvature.precondition(
                    layer, damping=cfg.damping, damping_mode=cfg.damping_mode, shift=lam).items()}
            return out

        bar = tqdm(total=cfg.cg_iters, desc=f"CG, step {step}", leave=False, disable=not self.progress)

        def log_iteration(iteration: int, residual: float) -> None:
            bar.update()
            bar.set_postfix(residual=f"{residual:.3g}")
            emit({"cg/step": step, "cg/iteration": iteration, "cg/residual": residual})

        with bar:
            result: CGResult = conjugate_gradient(ggn, placed, damping=lam, precondition=precondition,
                                                  max_iters=cfg.cg_iters, tol=cfg.cg_tol, x0=warm_start,
                                                  callback=log_iteration, key=f"step{step}:{lam!r}",
                                                  checkpoint=checkpoints and checkpoints / f"step{step}.safetensors")
        direction = {n: result.x[n].to(g) for n, g in grads.items()}
        return direction, {"cg_iters": result.iterations, "cg_residual": result.residuals[-1],
                           "cg_stop": result.stop_reason, "cg_lambda": lam, "ggn_products": ggn.products}

    def step_eta(self, model, grads, direction, data, prob: float, steps_left: int) -> tuple[float, dict]:
        """η of this step (and what to log about choosing it); target_forget aims at P̄·(target/P̄)^(1/steps_left)."""
        if self.cfg.step_rule != "target_forget":
            return self.eta(grads, direction, self.cfg.kl_budget), {}
        target = prob * (self.cfg.target_forget_prob / prob) ** (1 / steps_left)
        search = eta_for_forget_prob(model, direction, data.forget, target,
                                     self.eta(grads, direction, SEARCH_START_KL))
        return search.eta, {"forget_evals": search.evaluations}

    def apply_checked(self, model, direction, eta, saved, start_probe, step) -> tuple[dict, int, str | None]:
        """Apply Δ = η·direction, halving η while a trust-region step overshoots the measured KL budget on the check
        batches (KL from the run's start). Returns (Δ, number of halvings, problem): ``problem`` names a non-finite
        Δ, which is then not applied; else None."""
        backtracks = self.cfg.max_backtracks if self.cfg.step_rule == "trust_region" else 0
        for halvings in range(backtracks + 1):
            delta = {n: (eta / 2**halvings) * d for n, d in direction.items()}
            problem = non_finite("step delta", delta)
            if problem is not None:
                return delta, halvings, problem
            apply_delta(model, delta)
            if halvings == backtracks or start_probe(model) <= step * self.cfg.kl_budget:
                return delta, halvings, None
            restore(model, saved)
        raise AssertionError("unreachable")

    def step(self, model, curvature, grads, data, step, previous, emit, checkpoints, saved, start_probe,
             prob: float, plan: int) -> tuple[dict, dict | None, dict | None, int, str | None]:
        """Solve for the direction, choose η, apply Δ and split it while it leaves the quadratic regime:
        ``(record, direction, Δ, planned steps, problem)``; ``problem`` names the first non-finite quantity
        (forget gradient, CG residual, direction, Δ) and its layer, else None (then Δ is applied)."""
        cfg = self.cfg
        record = {"step": step}
        problem = non_finite("forget gradient", grads)
        if problem is not None:
            return record, None, None, plan, problem
        direction, solved = self.solve(model, curvature, grads, data, step, previous, emit, checkpoints)
        record |= solved
        if solved.get("cg_stop") == "non_finite":
            return record, None, None, plan, f"non-finite CG residual after {solved['cg_iters']} iterations"
        problem = non_finite("step direction", direction)
        if problem is not None:
            return record, None, None, plan, problem
        check = None
        if cfg.max_kl_ratio is not None:
            check = QuadraticCheck(model, evenly_spaced(data.fit, cfg.check_batches), direction, cfg.ggn_mode)
        splits = 0
        eta, chosen = self.step_eta(model, grads, direction, data, prob, plan - step + 1)
        while True:
            delta, halvings, problem = self.apply_checked(model, direction, eta, saved, start_probe, step)
            if problem is not None:
                return record, direction, delta, plan, problem
            eta_taken = eta / 2**halvings
            if check is None:
                break
            measured, predicted = check(model, eta_taken)
            ratio = measured / max(predicted, TINY_KL)
            record |= {"check_kl": measured, "check_predicted_kl": predicted, "kl_ratio": ratio}
            if 1 / cfg.max_kl_ratio <= ratio <= cfg.max_kl_ratio or plan >= cfg.max_steps:
                break
            restore(model, saved)  # undo; one more step, this one shorter
            plan, splits = plan + 1, splits + 1
            emit({"split/step": step, "split/kl_ratio": ratio, "split/steps": plan})
            if cfg.step_rule == "target_forget":
                eta, chosen = self.step_eta(model, grads, direction, data, prob, plan - step + 1)
            else:
                eta = eta_taken / 2
        record |= chosen | {"eta": eta_taken, "step_norm": math.sqrt(squared_norm(delta))}
        if halvings:
            record["backtracks"] = halvings
        if check is not None:
            record["splits"] = splits
        return record, direction, delta, plan, None

    def run(self, model: torch.nn.Module, data: UnlearnData, log: LogFn | None = None) -> list[dict]:
        if not data.fit:
            raise ConfigError("dataset.fit_sets", "[]", "K-FADE needs curvature fitting batches; the set is empty")
        emit = log or (lambda record: None)
        start = time.perf_counter()
        curvature = load_or_fit(model, lambda: data.fit, self.curvature_cfg, self.cache_root, data.fit_fingerprint,
                                progress=self.progress)
        self.timings["fit_s"] = time.perf_counter() - start

        start = time.perf_counter()
        cfg, names = self.cfg, curvature.param_names
        probe = RetainKLProbe(model, data.kl_probe)
        start_probe = (RetainKLProbe(model, evenly_spaced(data.fit, cfg.check_batches))  # trust region's budget
                       if cfg.step_rule == "trust_region" and cfg.max_backtracks else None)
        grads, scores = self.forget_gradient(model, data.forget, names)
        zeros = sum(int((curvature.eigenvalues(spec) == 0).sum()) for spec in curvature.layers)
        history = [{"step": 0, "forget_nll": scores.nll, "forget_prob": scores.prob, "retain_kl": 0.0,
                    "zero_eigenvalues": zeros}]
        target = cfg.target_forget_prob if cfg.step_rule == "target_forget" else None
        if (skipped := target_reached_at_start(scores.prob, target)) is not None:
            history[0]["skipped"] = skipped
        emit(history[-1])
        previous, plan, step = None, cfg.n_steps, 0
        checkpoints = self.checkpoint_dir(model, data) if cfg.solver == "cg" and cfg.cg_checkpoint else None
        while step < plan and "skipped" not in history[0]:
            step += 1
            saved = snapshot(model, names)
            record, direction, delta, plan, problem = self.step(
                model, curvature, grads, data, step, previous, emit, checkpoints, saved, start_probe, scores.prob,
                plan)
            if problem is None:
                last = step == plan
                grads, scores = ((None, forget_scores(model, data.forget)) if last
                                 else self.forget_gradient(model, data.forget, names))
                if not math.isfinite(scores.nll):
                    problem = "non-finite forget loss (logits) after the step"
            if problem is not None:
                restore(model, saved)
                record["rejected"] = f"{problem}; weights rolled back"
                warnings.warn(f"K-FADE step {step} rejected: {problem}; weights rolled back to before the step, "
                              "stopping", stacklevel=2)
                history.append(record)
                emit(record)
                break
            record.update(forget_nll=scores.nll, forget_prob=scores.prob, retain_kl=probe(model),
                          predicted_kl=curvature.predicted_kl(delta))
            history.append(record)
            emit(record)
            previous = direction if cfg.cg_warm_start else None
        if checkpoints is not None:
            shutil.rmtree(checkpoints, ignore_errors=True)
        self.timings["unlearn_s"] = time.perf_counter() - start
        return history

    def checkpoint_dir(self, model: torch.nn.Module, data: UnlearnData) -> Path:
        """Where this run's PCG states go: keyed by the starting weights, the data and every setting, so only the
        same run resumes them (taken before the first step, while the model is at its starting weights)."""
        key = fingerprint({"model": model_fingerprint(model), "fit": data.fit_fingerprint,
                           "forget": batches_fingerprint(data.forget), "probe": batches_fingerprint(data.kl_probe),
                           "method": asdict(self.cfg), "curvature": asdict(self.curvature_cfg)})
        return self.cache_root.parent / "cg" / key
