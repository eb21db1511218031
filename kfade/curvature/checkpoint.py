"""Resumable curvature fits: the running sums of the current pass, saved atomically every N batches.

A fit is a sequence of passes over the data (per layer group: the factor pass, then for EK-FAC the correction
pass); factors finished by earlier passes are already in per-layer files beside the checkpoint. The checkpoint
holds the pass index, the batches done in it, the running sums and counts, the random generator's state, the
activation groups, and a SHA-256 of the batches read so far with the fit's key: a restarted fit with the same
config, model and data continues exactly where the checkpoint was taken (same sums, same random draws, same
order of additions, hence bit-equal factors); anything else starts afresh.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kfade.cache import atomic_path

CHECKPOINT_FILE = "checkpoint.safetensors"
GENERATOR_KEY = "__generator_state__"


def batch_digest(digest, batch: dict[str, torch.Tensor]) -> None:
    """Feed one batch's token ids, attention mask and labels into a running ``hashlib`` digest."""
    for key in ("input_ids", "attention_mask", "labels"):
        if key in batch:
            t = batch[key].detach().to("cpu", torch.long).contiguous()
            digest.update(f"{key}{tuple(t.shape)}".encode())
            digest.update(t.numpy().tobytes())


def new_digest():
    return hashlib.sha256()


class FitCheckpoint:
    """The checkpoint file of one fit (``directory/checkpoint.safetensors``) for the fit identified by ``key``."""

    def __init__(self, directory: str | Path, key: str):
        self.path = Path(directory) / CHECKPOINT_FILE
        self.key = key

    def save(self, state: dict, sums: dict[str, torch.Tensor], generator: torch.Generator) -> None:
        """Write ``state`` (JSON-serialisable), ``sums`` and the generator state atomically."""
        tensors = {k: t.detach().cpu().contiguous() for k, t in sums.items()}
        tensors[GENERATOR_KEY] = generator.get_state().cpu()
        with atomic_path(self.path) as tmp:
            save_file(tensors, tmp, metadata={"state": json.dumps({**state, "key": self.key})})

    def load(self) -> tuple[dict, dict[str, torch.Tensor], torch.Tensor] | None:
        """``(state, sums, generator state)`` of a checkpoint of this fit, or None (none, or another fit's, or
        unreadable: warned)."""
        if not self.path.exists():
            return None
        try:
            with safe_open(self.path, "pt") as f:
                state = json.loads(f.metadata()["state"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            warnings.warn(f"ignoring the unreadable curvature checkpoint {self.path} ({e})", stacklevel=3)
            return None
        if state.get("key") != self.key:
            warnings.warn(f"ignoring the curvature checkpoint {self.path}: it belongs to another fit "
                          "(config, model or layers differ)", stacklevel=3)
            return None
        generator = tensors.pop(GENERATOR_KEY)
        return state, tensors, generator

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
