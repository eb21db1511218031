"""A cheap fingerprint of a model: parameter names, shapes, dtypes and a strided sample of every weight."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from kfade import fsdp

SAMPLES_PER_PARAM = 4096


def model_fingerprint(model: nn.Module, length: int = 16) -> str:
    """Hex digest that changes when any parameter's name, shape or dtype changes, or when the weights change
    at any of ≤ 4096 evenly spaced entries per parameter (cost independent of the model size)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            digest.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
            flat = fsdp.full(p.detach()).reshape(-1)  # an FSDP shard: the whole parameter, as in one process
            count = min(SAMPLES_PER_PARAM, flat.numel())  # integer spacing: fp32 linspace overshoots past 2^24
            index = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
            digest.update(flat[index].double().cpu().numpy().tobytes())
    return digest.hexdigest()[:length]
