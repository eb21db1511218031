"""K-FADE's solvers: the step direction p ≈ (G + λI)⁻¹g for the forget gradient g, G the retain-set Gauss-Newton
matrix of the mean per-token loss and Ĝ its fitted approximation (``kfade.curvature``).

- ``direct`` (the paper's K-FAC step): p = (Ĝ + δI)⁻¹g, δ the curvature's damping.
- ``cg``: ``cg_iters`` iterations of preconditioned conjugate gradients on (G + λI)p = g with the *exact* G
  (matrix-free products on the fitting batches, re-linearised at the current weights each step) and the
  preconditioner M = (Ĝ + δI + λI)⁻¹; λ = ``cg_damping`` × the mean eigenvalue of G (relative) or absolute.
  Warm-started from the previous step's p; from 0, the first iterate is the preconditioned gradient Mg, the direct
  step's direction with δ + λ. With a checkpoint path each iteration's state is saved there, and the same solve
  started again resumes bit-equal. Its record's ``cg_curvature`` is pᵀGp on its batches, from PCG's final residual
  (the quadratic-regime check's prediction without another product). The PCG vectors are kept in ``cg_dtype``
  (bfloat16 halves them; dot products stay fp64) and, with ``cg_offload=cpu``, in host memory: only the vector of a
  product or a preconditioning visits the device.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from tqdm.auto import tqdm

from kfade.curvature import Curvature
from kfade.curvature.cg import CGResult, conjugate_gradient, dot
from kfade.curvature.sharded_ggn import gauss_newton
from kfade.data.formatting import evenly_spaced
from kfade.unlearn.base import Batch, LogFn

if TYPE_CHECKING:
    from kfade.unlearn.kfade import KFadeConfig

Vector = dict[str, torch.Tensor]


def vector_dtype(gradient: torch.dtype, cg_dtype: str) -> torch.dtype:
    """The PCG vectors' dtype: bfloat16, or ``float32`` meaning fp32 or the gradient's dtype when wider (fp64)."""
    return torch.bfloat16 if cg_dtype == "bfloat16" else torch.promote_types(gradient, torch.float32)


class Solver:
    """``solve`` gives a step's direction and what to log about it. ``on_host``: the forget gradient and the
    direction live in host memory (moved to the device a layer or a product at a time); ``checkpointed``: the solve
    saves its state for a rerun to resume; ``knobs``: the config fields a reader checks first (a run's header).
    For the memory plan (``kfade.plan.memory``): ``vectors``, those over the covered parameters it holds at its
    peak besides the gradient and the direction (at ``cg_dtype``, on the host with ``cg_offload=cpu``);
    ``products``, whether it multiplies by the exact G (activations with eager attention)."""

    on_host = False
    checkpointed = False
    knobs: ClassVar[tuple[str, ...]] = ()
    vectors: ClassVar[tuple[str, ...]] = ()
    products: ClassVar[bool] = False

    def __init__(self, cfg: KFadeConfig, seed: int = 0, progress: bool = False):
        self.cfg, self.seed, self.progress = cfg, seed, progress

    def solve(self, model: torch.nn.Module, curvature: Curvature, grads: Vector, fit: list[Batch], step: int,
              warm_start: Vector | None = None, emit: LogFn | None = None,
              checkpoints: Path | None = None) -> tuple[Vector, dict]:
        """(p for the gradient ``grads`` at the model's current weights, log record); ``fit``: the fitting batches,
        ``step``: the step's number (logs and checkpoint names)."""
        raise NotImplementedError

    def product_batches(self, fit: list[Batch]) -> list[Batch]:
        """The fitting batches its exact G products run on (none: it takes no products)."""
        return []


class Direct(Solver):
    def solve(self, model, curvature, grads, fit, step, warm_start=None, emit=None, checkpoints=None):
        return curvature.precondition(grads, damping=self.cfg.damping, damping_mode=self.cfg.damping_mode), {}


class CG(Solver):
    knobs = ("cg_iters", "cg_batches")
    vectors = ("x", "r", "z", "p", "(G+λI)p", "new x", "new r")  # at peak, during the update (kfade.curvature.cg)
    products = True

    def __init__(self, cfg: KFadeConfig, seed: int = 0, progress: bool = False):
        super().__init__(cfg, seed, progress)
        self.on_host, self.checkpointed = cfg.cg_offload == "cpu", cfg.cg_checkpoint

    def product_batches(self, fit):
        return evenly_spaced(fit, self.cfg.cg_batches)

    def solve(self, model, curvature, grads, fit, step, warm_start=None, emit=None, checkpoints=None):
        cfg, emit = self.cfg, emit or (lambda record: None)
        ggn = gauss_newton(model, self.product_batches(fit), list(grads), mode=cfg.ggn_mode,
                           retain_graphs=bool(cfg.cg_retain_graphs))
        lam = cfg.cg_damping
        if cfg.cg_damping_mode == "relative":
            scale = curvature.mean_eigenvalue()
            lam *= scale if scale is not None else ggn.mean_eigenvalue(seed=self.seed)

        device = next(model.parameters()).device
        placed = {n: g.to("cpu" if self.on_host else g.device, vector_dtype(g.dtype, cfg.cg_dtype))
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
                           "cg_stop": result.stop_reason, "cg_lambda": lam, "ggn_products": ggn.products,
                           "cg_curvature": result.curvature - lam * dot(result.x, result.x)}


SOLVERS: dict[str, type[Solver]] = {"direct": Direct, "cg": CG}
