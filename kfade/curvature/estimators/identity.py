"""Identity: Ĝ = I over the covered layers. Reads no data and stores nothing; preconditioning is a scaling."""

from __future__ import annotations

import torch

from kfade.curvature.estimators.base import Estimator, register


@register
class Identity(Estimator):
    name = "identity"

    def eigenvalues(self, tensors, groups, spec, dtype):
        return torch.ones(spec.out_features, spec.in_features, dtype=torch.float32)
