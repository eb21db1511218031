"""K-FADE: uphill Gauss-Newton steps on the forget loss, preconditioned by the retain-set curvature.

Each step takes Δ = η·p with p ≈ (G + λI)⁻¹g, g = ∇L_f(θ) − μ∇L_r(θ) at the current weights: L_f the forget
objective (``forget_loss``: by default −KL(q ‖ p_θ) on the forget answers, q the starting model's own prediction
with the answer token removed; ``nll``: the mean label-token NLL, the paper's), L_r the mean answer NLL on
``retain_batches`` evenly spaced retain batches and μ = ``retain_weight`` (GradDiff's retain term, here
preconditioned: G⁻¹∇L_r is a Gauss-Newton step on the retain loss; 0: the paper's step), and G the retain-set
Gauss-Newton matrix of the mean per-token loss (½ΔᵀGΔ ≈ mean per-token KL(p_θ ‖ p_θ+Δ), nats). The default is 3
steps with μ = 3, each p by 2 PCG iterations on exact GGN products over 8 fitting batches, preconditioned by
(Ĝ + δI) with one global δ and warm-started from the previous step's p (conf/method/kfade.yaml;
``kfade_direct.yaml``: one direct step p = (Ĝ + δI)⁻¹∇L_f; ``kfade_cg.yaml``: 5 iterations on every batch,
both without the retain term). Ĝ, the fitted
curvature (K-FAC / EK-FAC / diagonal / identity), is fit once on ``data.fit`` at the starting weights
(``kfade.curvature.load_or_fit``: cached, so sweeps over η, λ and n_steps reuse it). A step is: forget gradient
→ direction p (``solver``: direct or cg, ``kfade.unlearn.solvers``) → η (``step_rule``: fixed, normalized,
trust_region or target_forget, ``kfade.unlearn.step_rules``) → apply Δ → check.
With ``cg_checkpoint`` each PCG iteration's state is saved under ``<cache>/cg/<run key>/`` (run key: starting
weights, data, both configs) and the same run started again after a crash resumes there and ends bit-equal;
removed when the run ends.

Quadratic-regime safeguard (``max_kl_ratio``): a Gauss-Newton step is only trusted where the quadratic model holds.
After each step the mean per-token KL from the step's start is measured on training batches of the fitting set and
compared with ½ΔᵀGΔ of the *exact* G on the same batches at the step's start: with ``cg`` on PCG's own batches, pᵀGp
read off its final residual, when they are at most ``check_batches`` (the check caches their logits); else on
``check_batches`` batches, one GGN product per step. If measured / predicted lies outside [1/``max_kl_ratio``,
``max_kl_ratio``] (a KL growing faster than quadratic, or saturating), the step is undone and split: one more step
is planned (``n_steps`` is the minimum, ``max_steps`` the cap) and this one is shortened (``StepRule.shorter``),
then the next step re-linearises at its own weights. Each split is logged (``split/…`` records; ``splits`` in the
step's record).
"""

from __future__ import annotations

import math
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kfade import fsdp
from kfade.cache import cache_dir, fingerprint
from kfade.curvature import Curvature, CurvatureConfig, load_or_fit, model_fingerprint
from kfade.curvature.config import DAMPING_MODES
from kfade.curvature.ggn import MODES as GGN_MODES
from kfade.data.formatting import evenly_spaced
from kfade.errors import ConfigError
from kfade.unlearn.base import (
    LogFn,
    MethodConfig,
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
from kfade.unlearn.losses import (
    FORGET_LOSSES,
    RetainKLProbe,
    forget_gradient,
    forget_scores,
    with_forget_targets,
)
from kfade.unlearn.quadratic_check import QuadraticCheck
from kfade.unlearn.solvers import SOLVERS
from kfade.unlearn.step_rules import STEP_RULES, squared_norm

CG_DAMPING_MODES = ("absolute", "relative")
CG_DTYPES = ("float32", "bfloat16")  # the PCG vectors' dtype (dot products are fp64 either way)
CG_OFFLOADS = ("none", "cpu")  # where the PCG vectors live: with the model, or in host memory
TINY_KL = 1e-12  # predicted KLs below this count as this (a zero step has no ratio)

Vector = dict[str, torch.Tensor]


@dataclass
class KFadeConfig(MethodConfig):
    """K-FADE step settings; the curvature's own settings come separately as a ``CurvatureConfig``."""

    name: str = "kfade"  # method name (registry key)
    solver: str = "cg"  # direct ((Ĝ+δI)⁻¹g) | cg (PCG on the exact GGN, preconditioned by Ĝ)
    step_rule: str = "target_forget"  # fixed | normalized | trust_region | target_forget (kfade.unlearn.step_rules)
    step_size: float = 5e-3  # η (fixed; the paper reports 2.5e-3 … 1.1e-2) or ‖Δ‖₂ (normalized)
    kl_budget: float = 0.1  # ε for trust_region: allowed ½Δᵀ(G+λI)Δ per step, nats per token
    target_forget_prob: float = 0.38  # target_forget: forget-set P̄ after the last step, in (0, 1)
    n_steps: int = 3  # Gauss-Newton steps at least, each with a fresh forget gradient (the paper uses 1–5)
    max_steps: int | None = None  # cap on the steps when the safeguard splits them (≥ n_steps; None: n_steps, never
    #                               split)
    max_kl_ratio: float | None = 2.0  # split a step whose measured KL / ½ΔᵀGΔ is > this or < 1/this (None: off)
    check_batches: int = 8  # fitting batches (evenly spaced) on which the safeguard measures and predicts KL (cg with
    #                         at most this many cg_batches: those, no product); trust_region: its measured KL budget's
    max_backtracks: int = 12  # trust_region: halvings of η while the measured check KL exceeds step × kl_budget
    damping: float | None = None  # δ override (absolute) or α (relative, global); None → the curvature config's
    damping_mode: str | None = None  # absolute | relative | global override; None → the curvature config's
    cg_iters: int = 2  # cg: maximum PCG iterations per step (truncation regularises; docs/results.md)
    cg_tol: float = 1e-4  # cg: stop once ‖g − (G+λI)p‖ ≤ cg_tol·‖g‖
    cg_damping: float = 0.1  # cg: λ, × the mean eigenvalue of G (relative) or in GGN units (absolute)
    cg_damping_mode: str = "relative"  # cg: relative | absolute
    cg_batches: int | None = 8  # cg: fitting batches used for the G products (evenly spaced); None: all
    cg_dtype: str = "float32"  # cg: PCG vectors x, r, z, p, (G+λI)p in float32 (fp64 for a fp64 model) | bfloat16
    cg_offload: str = "none"  # cg: none (vectors on the model's device) | cpu (host memory; only the vector of a
    #   product or a preconditioning visits the device)
    cg_warm_start: bool = True  # cg: start each step's PCG from the previous step's direction (else from 0)
    cg_retain_graphs: bool | None = None  # cg: keep each product batch's graphs for all products of a step (faster,
    #   more memory); None: the run's memory plan decides (kfade.pipeline.plan.planned_method; without one: not kept)
    cg_checkpoint: bool = True  # cg: save the PCG state every iteration; a rerun of a killed run resumes from it
    ggn_mode: str = "auto"  # cg: auto | forward | double_backward (how J v is computed, kfade.curvature.ggn)
    forget_loss: str = "kl_no_answer"  # the forget objective: kl_no_answer (descend KL to the starting model's own
    #   prediction with the answer token removed) | nll (ascend the answers' NLL: the paper's) | kl_base (descend
    #   KL(base ‖ θ) on the forget answers, base: a model that never learnt them, model.base_path)
    retain_weight: float = 3.0  # μ: each step ascends L_f − μ·L_r, L_r the retain answers' mean NLL (0: the paper's)
    retain_batches: int = 8  # retain batches (evenly spaced) on which L_r's gradient is taken each step

    @property
    def step_cap(self) -> int:
        """The most steps a run takes: ``max_steps``, or ``n_steps`` when it is None (never split)."""
        return self.max_steps or self.n_steps

    def plan_fields(self, fit_batches: int | None = None) -> dict:
        retained = 0
        if self.solver == "cg" and self.cg_retain_graphs:  # cg_batches null: every fitting batch's graphs
            retained = self.cg_batches or fit_batches
            if retained is None:
                raise ConfigError("method.cg_retain_graphs", self.cg_retain_graphs,
                                  "with method.cg_batches null it keeps the graphs of every fitting batch, more than "
                                  "the memory plan can count: set method.cg_batches or dataset.fit_max_batches")
        return {"solver": self.solver, "cg_dtype": self.cg_dtype, "cg_offload": self.cg_offload,
                "retained_graphs": retained}

    def validate(self) -> None:
        require_choice(self, "solver", list(SOLVERS))
        require_choice(self, "step_rule", list(STEP_RULES))
        require_choice(self, "cg_damping_mode", CG_DAMPING_MODES)
        require_choice(self, "cg_dtype", CG_DTYPES)
        require_choice(self, "cg_offload", CG_OFFLOADS)
        require_choice(self, "ggn_mode", GGN_MODES)
        require_choice(self, "forget_loss", FORGET_LOSSES)
        require_positive(self, "step_size", "kl_budget", "n_steps", "cg_iters", "check_batches", "retain_batches")
        require_nonnegative(self, "retain_weight")
        if self.max_steps is not None and self.max_steps < self.n_steps:
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



@dataclass
class Step:
    """One step in the making: its number, the steps planned, the forget gradient and P̄ at its start, the weights
    to roll back to, its history record, and once found its direction p and update Δ."""

    number: int
    plan: int
    grads: Vector
    prob: float
    saved: Vector
    record: dict
    direction: Vector | None = None
    delta: Vector | None = None


@dataclass
class Context:
    """What every step of one run shares."""

    model: torch.nn.Module
    curvature: Curvature
    data: UnlearnData
    emit: LogFn
    checkpoints: Path | None  # where the solver saves its state (None: nowhere)
    start_probe: Callable[[torch.nn.Module], float] | None  # KL from the run's start on the check batches
    warm_start: Vector | None = None  # the previous step's direction


class KFade:
    """``run`` fits/loads the curvature, then takes ``n_steps`` (up to ``max_steps``) uphill steps in place.

    History: ``{"step": 0, "forget_nll", "forget_prob", "retain_kl": 0.0, "zero_eigenvalues"}`` for the start
    (``zero_eigenvalues``: entries of Ĝ's Λ at the ≥ 0 clamp — for K-FAC the products with a factor eigenvalue
    that ``eigh`` clamped from below 0, each clamp also logged by ``kfade.curvature.passes``; ``skipped``
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
        self.solver = SOLVERS[cfg.solver](cfg, seed=self.curvature_cfg.seed, progress=progress)
        self.rule = STEP_RULES[cfg.step_rule](cfg)

    def step_gradient(self, model, data: UnlearnData, names):
        """(g = ∇L_f − μ∇L_r for the named parameters, the forget scores of the same pass)."""
        grads, scores = forget_gradient(model, data.forget, names, self.progress)
        if self.cfg.retain_weight > 0:  # retain batches carry no forget targets: their objective is the mean NLL
            forget_gradient(model, evenly_spaced(data.retain, self.cfg.retain_batches), names, self.progress,
                            scale=-self.cfg.retain_weight, into=grads)
        return ({n: g.to("cpu") for n, g in grads.items()} if self.solver.on_host else grads), scores

    def run(self, model: torch.nn.Module, data: UnlearnData, log: LogFn | None = None) -> list[dict]:
        if not data.fit:
            raise ConfigError("dataset.fit_sets", "[]", "K-FADE needs curvature fitting batches; the set is empty")
        if self.cfg.retain_weight > 0 and not data.retain:
            raise ConfigError("method.retain_weight", self.cfg.retain_weight,
                              "needs retain batches; the retain set is empty (0: no retain term)")
        once = self.cfg.step_cap == 1  # one step: the forget objective is only used at the starting weights
        data = with_forget_targets(self.cfg.forget_loss, model, data, once=once)
        emit = log or (lambda record: None)
        start = time.perf_counter()
        curvature = load_or_fit(model, lambda: data.fit, self.curvature_cfg, self.cache_root, data.fit_fingerprint,
                                progress=self.progress)
        self.timings["fit_s"] = time.perf_counter() - start

        start = time.perf_counter()
        cfg, names = self.cfg, curvature.param_names
        probe = RetainKLProbe(model, data.kl_probe)
        start_probe = RetainKLProbe(model, evenly_spaced(data.fit, cfg.check_batches)) if self.rule.backtracks else None
        grads, scores = self.step_gradient(model, data, names)
        history = [{"step": 0, "forget_nll": scores.nll, "forget_prob": scores.prob, "retain_kl": 0.0,
                    "zero_eigenvalues": curvature.zero_eigenvalues()}]
        if (skipped := target_reached_at_start(scores.prob, self.rule.target)) is not None:
            history[0]["skipped"] = skipped
        emit(history[-1])
        checkpointed = self.solver.checkpointed
        if checkpointed and fsdp.is_sharded(model):  # decided before the run key hashes the weights
            warnings.warn("method.cg_checkpoint=true: no PCG checkpoints under distributed.strategy=fsdp (the vectors "
                          "are sharded); a restarted run solves from the start", stacklevel=2)
            checkpointed = False
        checkpoints = self.checkpoint_dir(model, data) if checkpointed else None
        run = Context(model, curvature, data, emit, checkpoints, start_probe)
        plan, number = cfg.n_steps, 0
        while number < plan and "skipped" not in history[0]:
            number += 1
            step = Step(number, plan, grads, scores.prob, snapshot(model, names), {"step": number})
            problem = self.direction(run, step)  # forget gradient → direction
            if problem is None:
                problem = self.take(run, step)  # → η → apply → check
            plan = step.plan
            if problem is None:
                grads, scores = ((None, forget_scores(model, data.forget)) if number == plan
                                 else self.step_gradient(model, data, names))
                if not math.isfinite(scores.nll):
                    problem = "non-finite forget loss (logits) after the step"
            if problem is not None:
                restore(model, step.saved)
                step.record["rejected"] = f"{problem}; weights rolled back"
                warnings.warn(f"K-FADE step {number} rejected: {problem}; weights rolled back to before the step, "
                              "stopping", stacklevel=2)
                history.append(step.record)
                emit(step.record)
                break
            step.record.update(forget_nll=scores.nll, forget_prob=scores.prob, retain_kl=probe(model),
                               predicted_kl=curvature.predicted_kl(step.delta))
            history.append(step.record)
            emit(step.record)
            run.warm_start = step.direction if cfg.cg_warm_start else None
        if checkpoints is not None:
            shutil.rmtree(checkpoints, ignore_errors=True)
        self.timings["unlearn_s"] = time.perf_counter() - start
        return history

    def direction(self, run: Context, step: Step) -> str | None:
        """The step's direction p from its forget gradient (``step.direction``, the solver's record in
        ``step.record``); returns the first non-finite quantity (gradient, CG residual, direction), else None."""
        problem = non_finite("forget gradient", step.grads)
        if problem is not None:
            return problem
        step.direction, solved = self.solver.solve(run.model, run.curvature, step.grads, run.data.fit, step.number,
                                                   run.warm_start, run.emit, run.checkpoints)
        step.record |= solved
        if solved.get("cg_stop") == "non_finite":
            return f"non-finite CG residual after {solved['cg_iters']} iterations"
        return non_finite("step direction", step.direction)

    def take(self, run: Context, step: Step) -> str | None:
        """Choose η, apply Δ = η·p (``step.delta``) and split the step while it leaves the quadratic regime (more
        steps planned in ``step.plan``); returns the non-finite quantity (Δ) that stopped it, else None."""
        cfg, model, forget = self.cfg, run.model, run.data.forget
        check = None
        if cfg.max_kl_ratio is not None:
            solved_on = self.solver.product_batches(run.data.fit)
            if "cg_curvature" in step.record and len(solved_on) <= cfg.check_batches:  # PCG's pᵀGp: no product
                check = QuadraticCheck(model, solved_on, curvature=step.record["cg_curvature"])
            else:
                check = QuadraticCheck(model, evenly_spaced(run.data.fit, cfg.check_batches), step.direction,
                                       cfg.ggn_mode)
        splits = 0
        eta, chosen = self.rule.eta(model, step.grads, step.direction, forget, step.prob, step.plan - step.number + 1)
        while True:
            delta, halvings, problem = self.apply_checked(model, step.direction, eta, step.saved, run.start_probe,
                                                          step.number)
            if problem is not None:
                return problem
            eta_taken = eta / 2**halvings
            if check is None:
                break
            measured, predicted = check(model, eta_taken)
            ratio = measured / max(predicted, TINY_KL)
            step.record |= {"check_kl": measured, "check_predicted_kl": predicted, "kl_ratio": ratio}
            if 1 / cfg.max_kl_ratio <= ratio <= cfg.max_kl_ratio or step.plan >= cfg.step_cap:
                break
            restore(model, step.saved)  # undo; one more step, this one shorter
            step.plan, splits = step.plan + 1, splits + 1
            run.emit({"split/step": step.number, "split/kl_ratio": ratio, "split/steps": step.plan})
            eta, chosen = self.rule.shorter(model, step.grads, step.direction, forget, step.prob,
                                            step.plan - step.number + 1, eta_taken)
        step.delta = delta
        step.record |= chosen | {"eta": eta_taken, "step_norm": math.sqrt(squared_norm(delta))}
        if halvings:
            step.record["backtracks"] = halvings
        if check is not None:
            step.record["splits"] = splits
        return None

    def apply_checked(self, model, direction, eta, saved, start_probe, step) -> tuple[dict, int, str | None]:
        """Apply Δ = η·direction, halving η while a trust-region step overshoots the measured KL budget on the check
        batches (KL from the run's start). Returns (Δ, number of halvings, problem): ``problem`` names a non-finite
        Δ, which is then not applied; else None."""
        backtracks = self.rule.backtracks
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

    def checkpoint_dir(self, model: torch.nn.Module, data: UnlearnData) -> Path:
        """Where this run's PCG states go: keyed by the starting weights, the data and every setting, so only the
        same run resumes them (taken before the first step, while the model is at its starting weights)."""
        key = fingerprint({"model": model_fingerprint(model), "fit": data.fit_fingerprint,
                           "forget": batches_fingerprint(data.forget), "probe": batches_fingerprint(data.kl_probe),
                           "method": asdict(self.cfg), "curvature": asdict(self.curvature_cfg)})
        return self.cache_root.parent / "cg" / key
