"""A fitted curvature: block-diagonal Ĝ over the covered layers, preconditioning, predicted KL, storage."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from kfade.cache import atomic_path
from kfade.curvature.config import DAMPING_MODES, CurvatureConfig
from kfade.curvature.estimators import Estimator, estimator
from kfade.curvature.factors import FactorStore, layer_file, layer_of, sha256_file
from kfade.curvature.layers import LayerSpec
from kfade.errors import ConfigError

FORMAT_VERSION = 2  # 2: one safetensors file per layer, each with its SHA-256 in the manifest
MANIFEST_FILE = "manifest.json"


class Curvature:
    """Ĝ = blockdiag over layers of G_W̄ ≈ (Q_S ⊗ Q_A) diag(Λ) (Q_S ⊗ Q_A)ᵀ (K-FAC: Λ = λ_S λ_Aᵀ; EK-FAC: Λ*),
    diag(D) (diagonal) or I (identity), for the mean per-token loss (see ``kfade.curvature``).

    ``tensors`` keys: ``A/<group>/eigvecs`` and ``S/<layer>/eigvecs`` (kfac, ekfac), ``A/<group>/eigvals`` and
    ``S/<layer>/eigvals`` (kfac), ``eigvals/<layer>`` (ekfac Λ*, shape (out, in')), ``diag/<layer>`` (diagonal),
    stored at the config's ``factor_dtype`` in a ``FactorStore`` (memory, CPU or per-layer files: ``offload``).
    """

    def __init__(self, config: CurvatureConfig, layers: list[LayerSpec], groups: dict[str, str],
                 tensors: Mapping[str, torch.Tensor], n_tokens: int, n_positions: int, model_fingerprint: str,
                 data_fingerprint: str | None = None):
        self.config, self.layers, self.groups, self.tensors = config, layers, groups, tensors
        self.n_tokens, self.n_positions = n_tokens, n_positions
        self.model_fingerprint, self.data_fingerprint = model_fingerprint, data_fingerprint

    @property
    def param_names(self) -> list[str]:
        """Covered parameters (weights, and biases where present), as in ``model.named_parameters()``."""
        return [name for spec in self.layers for name in spec.param_names]

    @property
    def estimator(self) -> Estimator:
        """The estimator that fitted (and applies) Ĝ: ``kfade.curvature.estimators``."""
        return estimator(self.config.estimator)

    def basis(self, layer: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(Q_S, Q_A)`` of a Kronecker-factored layer, None for diagonal / identity."""
        return self.estimator.basis(self.tensors, self.groups, layer)

    def eigenvalues(self, layer: LayerSpec) -> torch.Tensor:
        """Λ of shape (out, in'): Ĝ's eigenvalues in the layer's basis (undamped, ≥ 0)."""
        return self.estimator.eigenvalues(self.tensors, self.groups, layer, self._compute_dtype())

    def mean_eigenvalue(self) -> float | None:
        """tr(Ĝ) / (number of covered parameters), the scale of a relative λ and of global damping; None for the
        identity (no data). For EK-FAC and the diagonal, tr(Ĝ) estimates tr(G) without bias (the diagonals match
        in expectation). Computed once (the factors do not change)."""
        if not self.estimator.passes:
            return None
        if not hasattr(self, "_mean_eigenvalue"):
            total = sum(float(self.eigenvalues(spec).double().sum()) for spec in self.layers)
            self._mean_eigenvalue = total / sum(spec.out_features * spec.in_features for spec in self.layers)
        return self._mean_eigenvalue

    def zero_eigenvalues(self) -> int:
        """Entries of Λ at the ≥ 0 clamp, over every covered layer."""
        return sum(int((self.eigenvalues(spec) == 0).sum()) for spec in self.layers)

    def precondition(self, grads: dict[str, torch.Tensor], damping: float | None = None,
                     damping_mode: str | None = None, shift: float = 0.0) -> dict[str, torch.Tensor]:
        """(Ĝ + δI)⁻¹ g per layer, V = Q_S[(Q_Sᵀ ∇W̄ Q_A) / (Λ + δ)]Q_Aᵀ; δ = ``damping`` (absolute),
        ``damping``·mean(Λ) of the layer (relative) or ``damping``·tr(Ĝ)/n over all covered layers (global: one δ,
        so layers with small curvature are damped as much as the others in absolute terms), plus ``shift``
        (absolute: e.g. the λ of a system (G + λI)x = g this preconditions). Defaults from the config; computed
        in fp32 (fp64 for a fp64 fit), returned in each grad's dtype under the same keys. Cached tensors are never
        modified."""
        damping, damping_mode = self.config.damping_of(damping, damping_mode)
        if not float(damping) >= 0:
            raise ConfigError("damping", damping, "must be ≥ 0")
        if damping_mode not in DAMPING_MODES:
            raise ConfigError("damping_mode", damping_mode, f"must be one of {', '.join(DAMPING_MODES)}")
        if damping_mode == "global":
            damping, damping_mode = damping * (self.mean_eigenvalue() or 1.0), "absolute"
        out = {}
        for spec, g in self._augmented(grads, "grads"):
            eigvals = self.eigenvalues(spec).to(g)
            delta = (damping * eigvals.mean() if damping_mode == "relative" else damping) + shift
            v = self._rotate(spec, g, to_eigenbasis=True) / (eigvals + delta)
            v = self._rotate(spec, v, to_eigenbasis=False)
            if not torch.isfinite(v).all():
                raise ConfigError("damping", damping, f"preconditioned {spec.name} is not finite: Ĝ is singular "
                                  "there, use a positive damping")
            out.update(self._split(spec, v, grads))
        return out

    def predicted_kl(self, delta: dict[str, torch.Tensor]) -> float:
        """½ Δᵀ Ĝ Δ (undamped) summed over the covered layers present in ``delta``: the predicted mean
        per-token KL(p_θ ‖ p_θ+Δ) on the fitting set, in nats."""
        total = 0.0
        for spec, d in self._augmented(delta, "delta"):
            total += 0.5 * float((self.eigenvalues(spec).to(d) * self._rotate(spec, d, True).square()).sum())
        return total

    def _augmented(self, tensors: dict[str, torch.Tensor], key: str) -> Iterator[tuple[LayerSpec, torch.Tensor]]:
        """(layer, [W | b]) for each covered layer present in ``tensors``, in fp32 or wider (factors', input's)."""
        unknown = sorted(set(tensors) - set(self.param_names))
        if unknown:
            raise ConfigError(key, unknown[:3], "parameters not covered by this curvature")
        compute = self._compute_dtype()
        for spec in self.layers:
            present = [name in tensors for name in spec.param_names]
            if not any(present):
                continue
            if not all(present):
                raise ConfigError(key, spec.param_names, "a layer's weight and bias must be given together")
            w = tensors[spec.weight]
            if tuple(w.shape) != (spec.out_features, spec.in_features - (spec.bias is not None)):
                raise ConfigError(key, spec.weight, f"has shape {tuple(w.shape)}, the layer is "
                                  f"{spec.out_features}×{spec.in_features - (spec.bias is not None)}")
            parts = [w] + ([tensors[spec.bias].unsqueeze(1)] if spec.bias else [])
            yield spec, torch.cat(parts, dim=1).to(torch.promote_types(compute, w.dtype))

    def _rotate(self, spec: LayerSpec, x: torch.Tensor, to_eigenbasis: bool) -> torch.Tensor:
        basis = self.basis(spec.name)
        if basis is None:
            return x
        q_s, q_a = (q.to(x) for q in basis)
        return q_s.T @ x @ q_a if to_eigenbasis else q_s @ x @ q_a.T

    @staticmethod
    def _split(spec: LayerSpec, v: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {spec.weight: v[:, : v.shape[1] - (spec.bias is not None)].to(like[spec.weight].dtype)}
        if spec.bias:
            out[spec.bias] = v[:, -1].to(like[spec.bias].dtype)
        return out

    def _compute_dtype(self) -> torch.dtype:
        """fp32, or fp64 for a fp64 fit (bf16-stored factors are applied in fp32)."""
        if not hasattr(self, "_compute"):
            stored = next(iter(self.tensors.values())).dtype if self.tensors else torch.float32
            self._compute = torch.promote_types(stored, torch.float32)
        return self._compute

    def manifest(self, checksums: dict[str, str] | None = None, shapes: dict[str, list[int]] | None = None) -> dict:
        """The JSON-serialisable description stored beside the tensors (``files``: SHA-256 per layer file;
        ``shapes``: of every tensor, when ``tensors`` holds only some of them)."""
        return {
            "format_version": FORMAT_VERSION,
            "config": asdict(self.config),
            "model_fingerprint": self.model_fingerprint,
            "data_fingerprint": self.data_fingerprint,
            "n_tokens": self.n_tokens,
            "n_positions": self.n_positions,
            "layers": [{**asdict(spec), "group": self.groups.get(spec.name)} for spec in self.layers],
            "tensors": shapes if shapes is not None else self.shapes(),
            "files": checksums or {},
        }

    def shapes(self) -> dict[str, list[int]]:
        """key → shape of every tensor held (without reading offloaded ones)."""
        if isinstance(self.tensors, FactorStore):
            return self.tensors.shapes()
        return {key: list(t.shape) for key, t in self.tensors.items()}

    def save(self, path: str | Path) -> None:
        """Write the directory ``path`` atomically: ``<layer>.safetensors`` per layer (written one layer at a time)
        and ``manifest.json`` with each file's SHA-256. A disk-offloaded curvature then reads from ``path``."""
        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.mkdir()
            checksums = self.write_layers(tmp)
            write_manifest(tmp, self.manifest(checksums))
        self.reopen(path)

    def write_layers(self, directory: Path) -> dict[str, str]:
        """``<layer>.safetensors`` for every layer holding tensors here; returns layer → SHA-256 of its file."""
        store = self.tensors if isinstance(self.tensors, FactorStore) else None
        layers = store.layers() if store else list(dict.fromkeys(layer_of(k) for k in self.tensors))
        checksums = {}
        for layer in layers:
            tensors = store.layer_tensors(layer) if store else {k: t for k, t in self.tensors.items()
                                                                if layer_of(k) == layer}
            save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, layer_file(directory, layer))
            checksums[layer] = sha256_file(layer_file(directory, layer))
        return checksums

    def reopen(self, path: Path) -> None:
        """After a save, a disk-offloaded curvature reads from ``path``."""
        if isinstance(self.tensors, FactorStore) and self.tensors.offload == "disk":
            self.tensors = FactorStore.open(path, {k: layer_of(k) for k in self.tensors})

    @classmethod
    def load(cls, path: str | Path, offload: str = "none", device: torch.device | str = "cpu",
             select: Callable[[dict], set[str]] | None = None) -> Curvature:
        """Read a directory written by ``save`` into a store at ``offload`` (``none``: on ``device``). Every file's
        checksum, shapes and finiteness are checked first; a missing, truncated, tampered or inconsistent file
        raises ConfigError. ``select(manifest)``: the layer files to read (default: all of them)."""
        path = Path(path)
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text())
            if manifest["format_version"] != FORMAT_VERSION:
                raise ValueError(f"format version {manifest['format_version']} ≠ {FORMAT_VERSION}")
            owners = {key: layer_of(key) for key in manifest["tensors"]}
            if set(owners.values()) != set(manifest["files"]):
                raise ValueError("the files do not match the manifest")
            wanted = set(manifest["files"]) if select is None else select(manifest)
            owners = {key: layer for key, layer in owners.items() if layer in wanted}
            for layer in sorted(wanted):
                if sha256_file(layer_file(path, layer)) != manifest["files"][layer]:
                    raise ValueError(f"checksum mismatch in {layer}.safetensors (truncated or modified)")
            store = FactorStore.open(path, owners)
            if store.shapes() != {key: manifest["tensors"][key] for key in owners}:
                raise ValueError("tensors do not match the manifest")
            if offload != "disk":
                store = store.moved(offload, device)
                if not all(torch.isfinite(t).all() for t in store.values()):
                    raise ValueError("non-finite factors")
            layers = [LayerSpec(**{k: v for k, v in d.items() if k != "group"}) for d in manifest["layers"]]
            groups = {d["name"]: d["group"] for d in manifest["layers"] if d["group"] is not None}
            return cls(CurvatureConfig(**manifest["config"]), layers, groups, store, manifest["n_tokens"],
                       manifest["n_positions"], manifest["model_fingerprint"], manifest["data_fingerprint"])
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            raise ConfigError("curvature.path", str(path), f"unreadable curvature file ({e})") from None


def write_manifest(directory: Path, manifest: dict) -> None:
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
