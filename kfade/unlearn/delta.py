"""Unlearning deltas: Δθ = θ_after − θ_before, stored as safetensors so the update can be re-applied later.

Only changed parameters are stored. Δ is kept in a float type in which θ_after − θ_before is exact, so that
``apply_delta`` on a fresh copy of θ_before reproduces θ_after bit for bit: fp32 for 16-bit models (bf16/fp16;
the difference of two bf16 numbers fits fp32's mantissa) and fp64 for fp32/fp64 models (an fp32 difference of
two fp32 weights is not always exact: a weight that shrinks a lot loses low bits).
The file's metadata (string → string) carries at least ``method`` and ``base_fingerprint`` (the base model's,
e.g. ``kfade.curvature.model_fingerprint``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from kfade import fsdp
from kfade.cache import atomic_path
from kfade.errors import ConfigError

REQUIRED_METADATA = ("method", "base_fingerprint")


def delta_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The storage/arithmetic dtype of a parameter's delta: fp32 for 16-bit floats, else fp64."""
    return torch.float32 if param_dtype.itemsize <= 2 else torch.float64


@torch.no_grad()
def compute_delta(before: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """θ_after − θ_before (on the CPU) for every parameter in ``before`` whose value changed. For an FSDP model
    ``before`` holds this rank's rows (``fsdp.local``): each parameter changed on any rank is gathered whole onto
    rank 0, one at a time; the other ranks get an empty dict."""
    params = dict(model.named_parameters())
    changed = {n: not torch.equal(old.to("cpu"), fsdp.local(params[n].detach()).to("cpu")) for n, old in before.items()}
    sharded = fsdp.is_sharded(model)
    if sharded:  # the same decision on every rank: some rank's rows changed
        changed = {n: total > 0 for n, total in zip(changed, fsdp.sum_over_ranks(list(changed.values())), strict=True)}
    delta = {}
    for name, old in before.items():
        if not changed[name]:
            continue
        new = fsdp.local(params[name].detach())
        dtype = delta_dtype(new.dtype)
        d = new.to("cpu", dtype) - old.to("cpu", dtype)
        if sharded:
            d = fsdp.gather_rows(fsdp.like(d.to(new.device), params[name]), owner=0)
        if d is not None:
            delta[name] = d.to("cpu")
    return delta


def save_delta(path: str | Path, delta: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write ``delta`` atomically; metadata values that are not strings are stored as JSON."""
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ValueError(f"delta metadata lacks {missing}")
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in delta.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_delta(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(delta, metadata) from a file written by :func:`save_delta`."""
    if not Path(path).is_file():
        raise ConfigError("delta.path", str(path), "no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        delta = load_file(str(path))
    except SafetensorError as e:
        raise ConfigError("delta.path", str(path), f"not a safetensors file: {e}") from None
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ConfigError("delta.path", str(path), f"not an unlearning delta (metadata lacks {missing})")
    return delta, metadata


@torch.no_grad()
def apply_delta(model: torch.nn.Module, delta: dict[str, torch.Tensor], scale: float = 1.0) -> None:
    """θ ← cast(θ + scale·Δ) in place, in fp32 (16-bit models) or fp64; checks every name and shape first."""
    params = dict(model.named_parameters())
    for name, d in delta.items():
        if name not in params:
            raise ConfigError(f"delta.{name}", tuple(d.shape), "the model has no parameter of this name")
        if d.shape != params[name].shape:
            raise ConfigError(f"delta.{name}", tuple(d.shape),
                              f"shape does not match the model's {tuple(params[name].shape)}")
    for name, d in delta.items():
        param = params[name]
        d = d.to(param.device, torch.promote_types(d.dtype, delta_dtype(param.dtype)))
        param.copy_((param.to(d.dtype) + scale * d).to(param.dtype))
