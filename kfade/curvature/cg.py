"""Preconditioned conjugate gradients on {param: tensor} vectors: x ≈ (G + λI)⁻¹ b.

G is any symmetric positive semi-definite operator (here the exact Gauss-Newton product, ``ggn.GaussNewton``),
M ≈ (G + λI)⁻¹ a symmetric positive definite preconditioner (here the fitted curvature's (Ĝ + δI)⁻¹). Dot products
and norms are accumulated in fp64; the vectors keep their own dtype and device (those of b: e.g. bf16 vectors in
host memory), and the operator's results are cast to them. Started from x₀ = 0, the first iterate is
the preconditioned direct step itself, x₁ = α M b; later iterations correct it inside the Krylov space
span{Mb, M(G+λI)Mb, …}. Stopping after few iterations regularises (the large-curvature directions converge
first).

With ``checkpoint`` (a file path) the PCG state (x, r, p, ⟨r, z⟩, residuals) is written atomically after setup
and after every iteration; a later call with the same right-hand side and ``key`` continues from it, bit-equal
to an uninterrupted solve (a finished solve is returned as is). An unreadable or mismatched checkpoint is
ignored with a warning.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch.distributed.tensor import DTensor

from kfade import fsdp
from kfade.cache import atomic_path

Vector = dict[str, torch.Tensor]
Operator = Callable[[Vector], Vector]


def dot(a: Vector, b: Vector) -> float:
    """⟨a, b⟩ summed over every tensor, in fp64 (on a's device); FSDP shards (``DTensor``) are summed locally, then
    over the ranks."""
    total = sum(float(torch.vdot(fsdp.local(a[n]).double().flatten(),
                                 fsdp.local(b[n]).to(fsdp.local(a[n]).device).double().flatten())) for n in a)
    return fsdp.sum_over_ranks([total])[0] if any(isinstance(t, DTensor) for t in a.values()) else total


def axpy(alpha: float, x: Vector, y: Vector) -> Vector:
    """α x + y (new tensors)."""
    return {n: y[n] + alpha * x[n] for n in y}


@dataclass
class CGResult:
    """The solve: ``x``, the iterations taken, the relative residual ‖b − (G+λI)x‖/‖b‖ after each iteration
    (``residuals[0]``: of x₀), why it stopped (``converged`` at ``tol``, ``max_iters``, ``breakdown`` when
    a search direction had non-positive curvature pᵀ(G+λI)p ≤ 0, ``non_finite``), and ``curvature`` =
    xᵀ(G+λI)x, read off the final residual r = b − (G+λI)x as xᵀ(b − r) without another product (exact up to the
    recurrence's rounding)."""

    x: Vector
    iterations: int = 0
    residuals: list[float] = field(default_factory=list)
    stop_reason: str = "max_iters"
    curvature: float = 0.0


def digest(v: Vector) -> str:
    """SHA-256 of a vector's names, shapes, dtypes and bytes (what a checkpoint must have been solved for)."""
    h = hashlib.sha256()
    for n in sorted(v):
        t = v[n].detach().to("cpu").contiguous()
        h.update(f"{n}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_state(path: Path, key: str, state: dict[str, Vector], rz: float, result: CGResult, done: bool) -> None:
    """Write the PCG state atomically (safetensors; scalars in the metadata, floats as exact JSON reprs)."""
    tensors = {f"{part}/{n}": t.detach().to("cpu").contiguous() for part, v in state.items() for n, t in v.items()}
    meta = {"key": key, "rz": json.dumps(rz), "iterations": str(result.iterations), "done": json.dumps(done),
            "residuals": json.dumps(result.residuals), "stop_reason": result.stop_reason}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_state(path: Path, key: str, like: Vector) -> tuple[dict[str, Vector], float, CGResult, bool] | None:
    """The state :func:`save_state` wrote for ``key`` (tensors on ``like``'s devices), or None (with a warning
    when a file is there but unreadable or for another solve)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("key") != key:
            raise ValueError("written for another solve")
        flat = load_file(str(path))
        state = {part: {n: flat[f"{part}/{n}"].to(like[n].device) for n in like} for part in ("x", "r", "p")}
        result = CGResult(state["x"], int(meta["iterations"]), json.loads(meta["residuals"]), meta["stop_reason"])
        return state, json.loads(meta["rz"]), result, json.loads(meta["done"])
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        warnings.warn(f"ignoring CG checkpoint {path} ({e}); solving from the start", stacklevel=3)
        return None


def conjugate_gradient(matvec: Operator, b: Vector, damping: float = 0.0, precondition: Operator | None = None,
                       max_iters: int = 30, tol: float = 0.0, x0: Vector | None = None,
                       callback: Callable[[int, float], None] | None = None,
                       checkpoint: str | Path | None = None, key: str = "") -> CGResult:
    """Solve (G + λI) x = b by PCG with ``matvec`` = G·, λ = ``damping``, ``precondition`` = M· (None: M = I).

    Stops after ``max_iters`` iterations or once the relative residual is ≤ ``tol``; ``x0`` warm-starts (e.g.
    the previous step's solution). ``callback(iteration, relative residual)`` is called after each iteration.
    ``checkpoint``: resumable state file (module docstring); ``key`` names what else the solve depends on (the
    operator and preconditioner; b, λ, tol and x₀ are added), so that only the same solve resumes a checkpoint.
    """
    def apply(v: Vector) -> Vector:
        gv = matvec(v)
        return {n: gv[n].to(v[n]) + damping * v[n] for n in v}

    b_norm = math.sqrt(dot(b, b))
    if b_norm == 0:
        return CGResult({n: torch.zeros_like(t) for n, t in b.items()}, 0, [0.0], "converged")
    path, resumed = None if checkpoint is None else Path(checkpoint), None
    if path is not None:
        key = f"{key}:{damping!r}:{tol!r}:{digest(b)}:{'' if x0 is None else digest(x0)}"
        resumed = load_state(path, key, b)
    if resumed is not None:
        state, rz, result, done = resumed
        if result.iterations >= max_iters or (done and result.stop_reason != "max_iters"):
            return with_curvature(result, b, state["r"])
        x, r, p = state["x"], state["r"], state["p"]
    else:
        if x0 is None:
            x, r = {n: torch.zeros_like(t) for n, t in b.items()}, {n: t.clone() for n, t in b.items()}
        else:
            x = {n: x0[n].to(b[n]) for n in b}
            r = axpy(-1.0, apply(x), b)
        result = CGResult(x, residuals=[math.sqrt(dot(r, r)) / b_norm])
        if result.residuals[0] <= tol:
            result.stop_reason = "converged"
            return with_curvature(result, b, r)
        z = precondition(r) if precondition else r
        p = {n: t.clone() for n, t in z.items()}
        rz = dot(r, z)
    for it in range(result.iterations + 1, max_iters + 1):
        if path is not None:
            save_state(path, key, {"x": x, "r": r, "p": p}, rz, result, done=False)
        ap = apply(p)
        curvature = dot(p, ap)
        if not math.isfinite(curvature) or curvature <= 0:
            result.stop_reason = "breakdown" if math.isfinite(curvature) else "non_finite"
            break
        alpha = rz / curvature
        x, r = axpy(alpha, p, x), axpy(-alpha, ap, r)
        rel = math.sqrt(dot(r, r)) / b_norm
        result.x, result.iterations = x, it
        result.residuals.append(rel)
        if callback:
            callback(it, rel)
        if not math.isfinite(rel):
            result.stop_reason = "non_finite"
            break
        if rel <= tol:
            result.stop_reason = "converged"
            break
        z = precondition(r) if precondition else r
        rz_next = dot(r, z)
        p = axpy(rz_next / rz, p, z)
        rz = rz_next
    if path is not None:
        save_state(path, key, {"x": x, "r": r, "p": p}, rz, result, done=True)
    return with_curvature(result, b, r)


def with_curvature(result: CGResult, b: Vector, r: Vector) -> CGResult:
    """``result`` with ``curvature`` = xᵀ(b − r), r its residual b − (G+λI)x."""
    result.curvature = dot(result.x, b) - dot(result.x, r)
    return result
