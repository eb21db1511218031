"""Preconditioned conjugate gradients on {param: tensor} vectors: x ≈ (G + λI)⁻¹ b.

G is any symmetric positive semi-definite operator (here the exact Gauss-Newton product, ``ggn.GaussNewton``),
M ≈ (G + λI)⁻¹ a symmetric positive definite preconditioner (here the fitted curvature's (Ĝ + δI)⁻¹). Dot products
and norms are accumulated in fp64; the vectors keep their own dtype. Started from x₀ = 0, the first iterate is
the preconditioned direct step itself, x₁ = α M b; later iterations correct it inside the Krylov space
span{Mb, M(G+λI)Mb, …}. Stopping after few iterations regularises (the large-curvature directions converge
first).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Vector = dict[str, torch.Tensor]
Operator = Callable[[Vector], Vector]


def dot(a: Vector, b: Vector) -> float:
    """⟨a, b⟩ summed over every tensor, in fp64."""
    return sum(float(torch.vdot(a[n].double().flatten(), b[n].double().flatten())) for n in a)


def axpy(alpha: float, x: Vector, y: Vector) -> Vector:
    """α x + y (new tensors)."""
    return {n: y[n] + alpha * x[n] for n in y}


@dataclass
class CGResult:
    """The solve: ``x``, the iterations taken, the relative residual ‖b − (G+λI)x‖/‖b‖ after each iteration
    (``residuals[0]``: of x₀), and why it stopped (``converged`` at ``tol``, ``max_iters``, ``breakdown`` when
    a search direction had non-positive curvature pᵀ(G+λI)p ≤ 0, ``non_finite``)."""

    x: Vector
    iterations: int = 0
    residuals: list[float] = field(default_factory=list)
    stop_reason: str = "max_iters"


def conjugate_gradient(matvec: Operator, b: Vector, damping: float = 0.0, precondition: Operator | None = None,
                       max_iters: int = 30, tol: float = 0.0, x0: Vector | None = None,
                       callback: Callable[[int, float], None] | None = None) -> CGResult:
    """Solve (G + λI) x = b by PCG with ``matvec`` = G·, λ = ``damping``, ``precondition`` = M· (None: M = I).

    Stops after ``max_iters`` iterations or once the relative residual is ≤ ``tol``; ``x0`` warm-starts (e.g.
    the previous step's solution). ``callback(iteration, relative residual)`` is called after each iteration.
    """
    def apply(v: Vector) -> Vector:
        gv = matvec(v)
        return {n: gv[n].to(v[n].dtype) + damping * v[n] for n in v}

    b_norm = math.sqrt(dot(b, b))
    if b_norm == 0:
        return CGResult({n: torch.zeros_like(t) for n, t in b.items()}, 0, [0.0], "converged")
    if x0 is None:
        x, r = {n: torch.zeros_like(t) for n, t in b.items()}, {n: t.clone() for n, t in b.items()}
    else:
        x = {n: x0[n].to(b[n]) for n in b}
        r = axpy(-1.0, apply(x), b)
    result = CGResult(x, residuals=[math.sqrt(dot(r, r)) / b_norm])
    if result.residuals[0] <= tol:
        result.stop_reason = "converged"
        return result
    z = precondition(r) if precondition else r
    p = {n: t.clone() for n, t in z.items()}
    rz = dot(r, z)
    for it in range(1, max_iters + 1):
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
    return result
