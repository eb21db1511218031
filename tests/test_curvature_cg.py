"""Preconditioned CG (kfade.curvature.cg) against dense solves: a random SPD matrix, and the exact GGN of a tiny
float64 Llama preconditioned by its fitted K-FAC / EK-FAC / diagonal / identity curvature."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from test_curvature_ggn import covered_names, dense_ggn, flat, random_vector
from test_curvature_reference import batches_of, qa_sequences
from test_curvature_reference import tiny_llama as reference_llama

from kfade.curvature import CurvatureConfig, fit_curvature
from kfade.curvature.cg import conjugate_gradient, dot
from kfade.curvature.ggn import GaussNewton


def matrix_operator(m: torch.Tensor):
    return lambda v: {"x": m @ v["x"]}


def test_cg_on_a_dense_spd_matrix_reaches_the_solve_and_logs_residuals():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    m = q @ torch.diag(torch.logspace(-3, 1, 40, dtype=torch.float64)) @ q.T
    b = {"x": torch.randn(40, generator=g, dtype=torch.float64)}
    seen = []
    result = conjugate_gradient(matrix_operator(m), b, damping=1e-2, max_iters=200, tol=1e-12,
                                callback=lambda it, rel: seen.append((it, rel)))
    want = torch.linalg.solve(m + 1e-2 * torch.eye(40, dtype=torch.float64), b["x"])
    torch.testing.assert_close(result.x["x"], want, rtol=1e-9, atol=1e-11)
    assert result.stop_reason == "converged" and result.iterations < 200
    assert [it for it, _ in seen] == list(range(1, result.iterations + 1))
    assert result.residuals[0] == 1.0 and result.residuals[-1] <= 1e-12
    capped = conjugate_gradient(matrix_operator(m), b, damping=1e-2, max_iters=3)
    assert capped.iterations == 3 and capped.stop_reason == "max_iters"


def test_warm_start_at_the_solution_stops_at_once():
    m = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    b = {"x": torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)}
    solution = {"x": torch.tensor([1.0, 0.5, 1 / 3], dtype=torch.float64)}
    result = conjugate_gradient(matrix_operator(m), b, max_iters=10, tol=1e-12, x0=solution)
    assert result.iterations == 0 and result.stop_reason == "converged"


@pytest.fixture(scope="module")
def problem():
    model = reference_llama(bias=False, layers=1)
    batches = batches_of(qa_sequences(24, seed=2), 8)  # G of full rank: label tokens × (vocab − 1) > parameters
    names = covered_names(model)
    return model, batches, names, dense_ggn(model, batches, names)


@pytest.mark.parametrize("estimator", ["ekfac", "kfac", "diagonal", "identity"])
def test_pcg_to_tolerance_equals_the_dense_solve(problem, estimator):
    model, batches, names, dense = problem
    curvature = fit_curvature(model, batches, CurvatureConfig(estimator=estimator, fisher="exact", damping=0.1))
    b = random_vector(model, names, 0)
    lam = float(torch.diagonal(dense).mean())
    precondition = functools.partial(curvature.precondition, shift=lam)  # M ≈ (Ĝ + δI + λI)⁻¹
    result = conjugate_gradient(GaussNewton(model, batches, names), b, damping=lam, precondition=precondition,
                                max_iters=300, tol=1e-10)
    want = torch.linalg.solve(dense + lam * torch.eye(len(dense), dtype=dense.dtype), flat(b, names))
    assert result.stop_reason == "converged"
    assert torch.linalg.norm(flat(result.x, names) - want) <= 1e-7 * torch.linalg.norm(want)


def test_first_pcg_iterate_is_the_preconditioned_direct_step(problem):
    model, batches, names, _ = problem
    curvature = fit_curvature(model, batches, CurvatureConfig(estimator="ekfac", fisher="exact", damping=0.1))
    b = random_vector(model, names, 1)
    one = conjugate_gradient(GaussNewton(model, batches, names), b, damping=1e-3,
                             precondition=curvature.precondition, max_iters=1)
    direct = curvature.precondition(b)
    cosine = dot(one.x, direct) / math.sqrt(dot(one.x, one.x) * dot(direct, direct))
    assert cosine == pytest.approx(1.0, abs=1e-12)
