"""What an estimator of Ĝ owns: the data passes of its fit, what it stores per layer (and so its planned bytes),
its eigenbasis and eigenvalues per layer — from which ``Curvature`` preconditions, (Ĝ + δI)⁻¹g =
Q_S[(Q_Sᵀ ∇W̄ Q_A) / (Λ + δ)]Q_Aᵀ (no basis: Q = I), and predicts ½ΔᵀĜΔ.

Fitting passes (``kfade.curvature.fit`` runs them in order, ``kfade.plan.memory`` plans them):
``factors`` sums A = Σ ā āᵀ and S = Σ g gᵀ, then eigendecomposes them; ``correction`` sums (Q_Sᵀ G_k Q_A)² in the
eigenbasis the factors gave; ``diagonal`` sums G_k². Stored tensor keys: ``A/<group>/…`` (shared by the layers
reading one input), ``S/<layer>/…``, and the estimator's own per-layer keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from kfade.curvature.layers import LayerSpec

Tensors = Mapping[str, torch.Tensor]
ESTIMATORS: dict[str, Estimator] = {}


def register(cls: type[Estimator]) -> type[Estimator]:
    """Class decorator: ``ESTIMATORS[cls.name] = cls()``."""
    ESTIMATORS[cls.name] = cls()
    return cls


def estimator(name: str) -> Estimator:
    """The registered estimator ``name`` (``CurvatureConfig`` has checked the name)."""
    return ESTIMATORS[name]


class Estimator:
    """Ĝ per covered layer. ``passes``: the fit's data passes, in order (none: Ĝ reads no data)."""

    name: ClassVar[str]
    passes: ClassVar[tuple[str, ...]] = ()

    @property
    def kronecker(self) -> bool:
        """Whether Ĝ is expressed in a Kronecker eigenbasis Q_S ⊗ Q_A (A factors shared by a group's layers)."""
        return "factors" in self.passes

    def stored_elements(self, spec: LayerSpec, owns_a: bool) -> dict[str, int]:
        """Elements stored for one layer: ``A`` (in'², only at its group's first layer), ``S`` (out²), ``eig``."""
        return {"A": 0, "S": 0, "eig": 0}

    def factor_tensors(self, key: str, eigvals: torch.Tensor, eigvecs: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the ``factors`` pass stores for the factor ``key`` (``A/<group>`` or ``S/<layer>``)."""
        raise NotImplementedError(f"{self.name} has no factors pass")

    def outer_tensors(self, layer: str, outer: torch.Tensor) -> dict[str, torch.Tensor]:
        """What a ``correction`` / ``diagonal`` pass stores for ``layer``: its normalised (out, in') sum."""
        raise NotImplementedError(f"{self.name} has no per-entry pass")

    def basis(self, tensors: Tensors, groups: Mapping[str, str],
              layer: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(Q_S, Q_A)`` of ``layer``, or None where Ĝ is diagonal in the parameters' own basis."""
        return None

    def eigenvalues(self, tensors: Tensors, groups: Mapping[str, str], spec: LayerSpec,
                    dtype: torch.dtype) -> torch.Tensor:
        """Λ of shape (out, in'): Ĝ's eigenvalues in the layer's basis (undamped, ≥ 0), in ``dtype``."""
        raise NotImplementedError


class KroneckerEstimator(Estimator):
    """Ĝ_W̄ = (Q_S ⊗ Q_A) diag(Λ) (Q_S ⊗ Q_A)ᵀ with Q_A, Q_S the eigenvectors of the factors A and S."""

    passes: ClassVar[tuple[str, ...]] = ("factors",)

    def stored_elements(self, spec: LayerSpec, owns_a: bool) -> dict[str, int]:
        out, inp = spec.out_features, spec.in_features
        return {"A": inp * inp if owns_a else 0, "S": out * out, "eig": self.eigenvalue_elements(spec, owns_a)}

    def eigenvalue_elements(self, spec: LayerSpec, owns_a: bool) -> int:
        raise NotImplementedError

    def factor_tensors(self, key, eigvals, eigvecs):
        return {f"{key}/eigvecs": eigvecs}

    def basis(self, tensors, groups, layer):
        return tensors[f"S/{layer}/eigvecs"], tensors[f"A/{groups[layer]}/eigvecs"]
