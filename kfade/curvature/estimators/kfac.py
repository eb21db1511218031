"""K-FAC: G_W̄ ≈ S ⊗ A, so Λ = λ_S λ_Aᵀ (the outer product of the factors' eigenvalues)."""

from __future__ import annotations

import torch

from kfade.curvature.estimators.base import KroneckerEstimator, register


@register
class KFAC(KroneckerEstimator):
    name = "kfac"

    def eigenvalue_elements(self, spec, owns_a):
        return spec.out_features + (spec.in_features if owns_a else 0)

    def factor_tensors(self, key, eigvals, eigvecs):
        return {f"{key}/eigvecs": eigvecs, f"{key}/eigvals": eigvals}

    def eigenvalues(self, tensors, groups, spec, dtype):
        return torch.outer(tensors[f"S/{spec.name}/eigvals"].to(dtype),
                           tensors[f"A/{groups[spec.name]}/eigvals"].to(dtype))
