"""Ĝ sharded by layer across ranks (``distributed.strategy=fsdp``): each rank holds, stores and applies the
factors of the layers it owns (``owners.assign_owners``); every other method is collective (all ranks call it).

- ``precondition``: per layer, the gradient's row shards (``DTensor``, as FSDP lays out the parameter) are
  gathered on the owner, (Ĝ + δI)⁻¹ is applied there, and the result is scattered back into the same shards.
- ``predicted_kl`` / ``mean_eigenvalue`` / ``zero_eigenvalues``: each owner's part, summed over the ranks.
- ``save``: one directory, each rank writing its own layers' files (≈ 1/world of the bytes) into it, rank 0 the
  manifest (every file's SHA-256, the writing world size and owners), renamed into place atomically once all are
  written. ``load``: each rank reads and checks the files of the layers it owns under *this* run's world size, so
  a cache written by another world size is re-sharded on reading; ``Curvature.load`` (one process) reads all.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist

from kfade import distributed
from kfade.cache import atomic_path
from kfade.curvature.curvature import Curvature, write_manifest
from kfade.curvature.factors import layer_of
from kfade.curvature.layers import LayerSpec
from kfade.curvature.owners import assign_owners
from kfade.errors import ConfigError
from kfade.fsdp import gather_rows, scatter_rows, sum_over_ranks


def _owned_files(manifest: dict) -> set[str]:
    """The layer files of ``manifest`` this rank owns under the current world size."""
    layers = [LayerSpec(**{k: v for k, v in d.items() if k != "group"}) for d in manifest["layers"]]
    groups = {d["name"]: d["group"] for d in manifest["layers"] if d["group"] is not None}
    owners = assign_owners(layers, groups, manifest["config"]["estimator"], distributed.world_size())
    return {layer for layer in manifest["files"] if owners[layer] == distributed.rank()}


class ShardedCurvature(Curvature):
    """A ``Curvature`` whose ``tensors`` hold only this rank's layers; ``owners``: layer → rank."""

    def __init__(self, *args, owners: dict[str, int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.owners = owners if owners is not None else assign_owners(
            self.layers, self.groups, self.config.estimator, distributed.world_size())

    def _owned(self) -> list[LayerSpec]:
        return [spec for spec in self.layers if self.owners[spec.name] == distributed.rank()]

    def mean_eigenvalue(self) -> float | None:
        if not self.estimator.passes:
            return None
        if not hasattr(self, "_mean_eigenvalue"):
            (total,) = sum_over_ranks([sum(float(self.eigenvalues(s).double().sum()) for s in self._owned())])
            self._mean_eigenvalue = total / sum(spec.out_features * spec.in_features for spec in self.layers)
        return self._mean_eigenvalue

    def zero_eigenvalues(self) -> int:
        (count,) = sum_over_ranks([sum(int((self.eigenvalues(s) == 0).sum()) for s in self._owned())])
        return int(count)

    def precondition(self, grads: dict[str, torch.Tensor], damping: float | None = None,
                     damping_mode: str | None = None, shift: float = 0.0) -> dict[str, torch.Tensor]:
        """(Ĝ + δI)⁻¹ g for ``DTensor`` row shards ``grads`` (see ``Curvature.precondition``), on each layer's
        owner; the result is sharded like ``grads``. A non-finite layer is ConfigError on every rank."""
        damping, damping_mode = self.config.damping_of(damping, damping_mode)
        if damping_mode == "global":  # one δ for every layer: resolved on every rank (a collective)
            damping, damping_mode = damping * (self.mean_eigenvalue() or 1.0), "absolute"
        out, failed = {}, None
        for spec in self.layers:
            names = [n for n in spec.param_names if n in grads]
            if not names:
                continue
            owner = self.owners[spec.name]
            whole = {n: gather_rows(grads[n], owner) for n in names}
            if owner == distributed.rank():
                try:
                    whole = super().precondition(whole, damping, damping_mode, shift)
                except ConfigError as e:
                    failed = failed or e
                    whole = {n: torch.full_like(t, float("nan")) for n, t in whole.items()}
            out |= {n: scatter_rows(whole[n], grads[n], owner) for n in names}
        (failures,) = sum_over_ranks([failed is not None])
        if failures:
            raise failed or ConfigError("damping", damping, "a preconditioned layer is not finite on another rank: "
                                        "Ĝ is singular there, use a positive damping")
        return out

    def predicted_kl(self, delta: dict[str, torch.Tensor]) -> float:
        """½ Δᵀ Ĝ Δ for ``DTensor`` row shards ``delta``: each layer on its owner, summed over the ranks."""
        total = 0.0
        for spec in self.layers:
            names = [n for n in spec.param_names if n in delta]
            if names:
                whole = {n: gather_rows(delta[n], self.owners[spec.name]) for n in names}
                if self.owners[spec.name] == distributed.rank():
                    total += super().predicted_kl(whole)
        return sum_over_ranks([total])[0]

    def save(self, path: str | Path) -> None:
        """Every rank writes its layers' files into one temporary directory; rank 0 adds the manifest and renames
        it onto ``path`` (module docstring). Collective."""
        path = Path(path)
        with contextlib.ExitStack() as stack:
            tmp = [stack.enter_context(atomic_path(path)) if distributed.is_main() else None]
            dist.broadcast_object_list(tmp, src=0)
            if distributed.is_main():
                tmp[0].mkdir()
            distributed.barrier()
            mine = (self.write_layers(tmp[0]), self.shapes())
            shards = [None] * distributed.world_size() if distributed.is_main() else None
            dist.gather_object(mine, shards, dst=0)
            if distributed.is_main():
                checksums = {layer: sha for files, _ in shards for layer, sha in files.items()}
                shapes = {key: shape for _, part in shards for key, shape in part.items()}
                manifest = self.manifest(checksums, shapes)
                manifest["shards"] = {"world_size": distributed.world_size(),
                                      "owners": {layer_of(k): self.owners[layer_of(k)] for k in shapes}}
                write_manifest(tmp[0], manifest)
        distributed.barrier()
        self.reopen(path)

    @classmethod
    def load(cls, path: str | Path, offload: str = "none", device: torch.device | str = "cpu",
             select=None) -> ShardedCurvature:
        """This rank's layers of a stored curvature (written by any world size, or by one process)."""
        return super().load(path, offload, device, select=select or _owned_files)
