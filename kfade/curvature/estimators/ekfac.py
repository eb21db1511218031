"""EK-FAC: K-FAC's eigenbasis with the corrected eigenvalues Λ* = (1/N_tok) Σ_k (Q_Sᵀ G_k Q_A)², fitted in a
second pass over the data (G_k: one backward signal's per-sequence gradient of W̄)."""

from __future__ import annotations

from kfade.curvature.estimators.base import KroneckerEstimator, register


@register
class EKFAC(KroneckerEstimator):
    name = "ekfac"
    passes = ("factors", "correction")

    def eigenvalue_elements(self, spec, owns_a):
        return spec.out_features * spec.in_features

    def outer_tensors(self, layer, outer):
        return {f"eigvals/{layer}": outer}

    def eigenvalues(self, tensors, groups, spec, dtype):
        return tensors[f"eigvals/{spec.name}"].to(dtype)
