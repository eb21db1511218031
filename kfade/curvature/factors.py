"""Where a fitted curvature's tensors live (``curvature.offload``): on the model's device (``none``), on the CPU
(``cpu``, pinned when CUDA is available) or on disk (``disk``: one safetensors file per layer, each read when
used, so one layer at a time is in memory). Keys are those of ``Curvature.tensors``; a key's layer is its second
component (``A/<group>/eigvecs`` lives in the file of the group's first layer). Files carry SHA-256 checksums.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kfade.cache import atomic_path

CHUNK = 2**24  # bytes read at a time when hashing a file


def layer_of(key: str) -> str:
    """The layer whose file holds ``key`` (``S/<layer>/eigvecs``, ``A/<group>/…``, ``eigvals/<layer>``, …)."""
    return key.split("/")[1]


def layer_file(directory: Path, layer: str) -> Path:
    return directory / f"{layer}.safetensors"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


class FactorStore(Mapping[str, torch.Tensor]):
    """A read-mostly mapping key → tensor; ``put`` adds one layer's tensors at a time.

    In memory (``none``/``cpu``) tensors are kept on ``device`` (``none``) or the CPU; on ``disk`` each access
    reads the tensor from its layer's file in ``directory`` (a temporary directory, removed with the store, when
    None). Tensors come back exactly as stored (dtype and bits).
    """

    def __init__(self, offload: str = "none", device: torch.device | str = "cpu", directory: str | Path | None = None):
        self.offload = offload
        self.device = torch.device(device) if offload == "none" else torch.device("cpu")
        self._memory: dict[str, torch.Tensor] = {}
        self._layer: dict[str, str] = {}  # key → layer (file), for every key
        self.directory = Path(directory) if directory is not None else None
        if offload == "disk" and self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="kfade-factors-"))
            weakref.finalize(self, shutil.rmtree, self.directory, True)
        if offload == "disk":
            self.directory.mkdir(parents=True, exist_ok=True)

    @classmethod
    def open(cls, directory: str | Path, layers_of_keys: dict[str, str] | None = None) -> FactorStore:
        """A disk store over existing files (their keys read from the files unless given)."""
        store = cls("disk", directory=directory)
        if layers_of_keys is None:
            layers_of_keys = {}
            for path in sorted(store.directory.glob("*.safetensors")):
                with safe_open(path, "pt") as f:
                    layers_of_keys.update({key: path.name[: -len(".safetensors")] for key in f.keys()})  # noqa: SIM118
        store._layer = dict(layers_of_keys)
        return store

    def put(self, layer: str, tensors: dict[str, torch.Tensor]) -> None:
        """Add (or replace) tensors of ``layer``; on disk the layer's file is rewritten atomically."""
        if self.offload == "disk":
            merged = self.layer_tensors(layer) | {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
            with atomic_path(layer_file(self.directory, layer)) as tmp:
                save_file(merged, tmp)
        else:
            for key, t in tensors.items():
                t = t.detach().to(self.device)
                self._memory[key] = t.pin_memory() if self.offload == "cpu" and torch.cuda.is_available() else t
        self._layer.update(dict.fromkeys(tensors, layer))

    def layers(self) -> list[str]:
        """The layers holding tensors, in insertion order."""
        return list(dict.fromkeys(self._layer.values()))

    def layer_tensors(self, layer: str) -> dict[str, torch.Tensor]:
        """Every tensor of one layer (one file read on disk)."""
        if self.offload == "disk":
            path = layer_file(self.directory, layer)
            return load_file(path) if path.exists() else {}
        return {k: self._memory[k] for k, owner in self._layer.items() if owner == layer}

    def __getitem__(self, key: str) -> torch.Tensor:
        if self.offload != "disk":
            return self._memory[key]
        if key not in self._layer:
            raise KeyError(key)
        with safe_open(layer_file(self.directory, self._layer[key]), "pt") as f:
            return f.get_tensor(key)

    def shapes(self) -> dict[str, list[int]]:
        """key → shape, without reading tensors from disk."""
        if self.offload != "disk":
            return {k: list(t.shape) for k, t in self._memory.items()}
        shapes = {}
        for layer in self.layers():
            with safe_open(layer_file(self.directory, layer), "pt") as f:
                shapes |= {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        return shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self._layer)

    def __len__(self) -> int:
        return len(self._layer)

    def moved(self, offload: str, device: torch.device | str, directory: str | Path | None = None) -> FactorStore:
        """A copy of this store at another location, built one layer at a time."""
        store = FactorStore(offload, device, directory)
        for layer in self.layers():
            store.put(layer, self.layer_tensors(layer))
        return store
