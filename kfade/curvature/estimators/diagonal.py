"""Diagonal: Ĝ = diag(D), D = (1/N_tok) Σ_k G_k² (the squared per-sequence gradients), in the parameters' basis."""

from __future__ import annotations

from kfade.curvature.estimators.base import Estimator, register


@register
class Diagonal(Estimator):
    name = "diagonal"
    passes = ("diagonal",)

    def stored_elements(self, spec, owns_a):
        return {"A": 0, "S": 0, "eig": spec.out_features * spec.in_features}

    def outer_tensors(self, layer, outer):
        return {f"diag/{layer}": outer}

    def eigenvalues(self, tensors, groups, spec, dtype):
        return tensors[f"diag/{spec.name}"].to(dtype)
