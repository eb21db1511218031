"""``fit_curvature``: one pass over the batches for K-FAC and diagonal, two for EK-FAC (factors, then the
eigenvalue correction in the fixed eigenbasis)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from kfade.curvature.capture import CapturedBatch, LayerCapture
from kfade.curvature.config import CurvatureConfig
from kfade.curvature.curvature import Curvature
from kfade.curvature.estimators import covariance_pass, eigh, progress_bar, squared_gradient_pass
from kfade.curvature.fingerprint import model_fingerprint
from kfade.curvature.fisher import signals_per_token
from kfade.curvature.layers import select_layers
from kfade.errors import ConfigError

BatchDict = dict[str, torch.Tensor]


def fit_curvature(model: nn.Module, batches: Iterable[BatchDict], cfg: CurvatureConfig,
                  progress: bool = False) -> Curvature:
    """Fit ``cfg.estimator`` on ``batches`` (dicts of ``input_ids``, ``attention_mask``, ``labels``).

    The model is used in its current train/eval mode (call ``model.eval()`` for deterministic factors; Hugging
    Face applies gradient checkpointing in train mode only). With a torch.distributed process group, each rank
    fits on the batches it is given and the sums are all-reduced: the result is the fit on the union.
    ``identity`` reads no data (Ĝ = I over the selected layers).
    """
    cfg.validate()
    layers = select_layers(model, cfg.modules)
    first = next(model.parameters())
    factor_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    fingerprint = model_fingerprint(model)
    if cfg.estimator == "identity":
        return Curvature(cfg, layers, {}, {}, 0, 0, fingerprint)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    generator = torch.Generator(device=first.device).manual_seed(cfg.seed + rank)
    used: list[BatchDict] = []  # the batches within the caps, replayed by the EK-FAC correction pass

    def first_pass(desc: str) -> Iterator[CapturedBatch]:
        n_tokens = 0
        total = _length(batches, cfg.max_batches)
        for batch in progress_bar(batches, desc, total, progress):
            if len(used) == cfg.max_batches or (cfg.max_tokens is not None and n_tokens >= cfg.max_tokens):
                break
            used.append(batch)
            captured = capture.capture(_to(batch, first.device), cfg, generator)
            n_tokens += captured.n_tokens
            yield captured
        if not used:
            raise ConfigError("batches", "[]", "no batches to fit the curvature on")

    def replay(desc: str) -> Iterator[CapturedBatch]:
        for batch in progress_bar(used, desc, len(used), progress):
            yield capture.capture(_to(batch, first.device), cfg, generator)

    with torch.enable_grad(), LayerCapture(model, layers, factor_dtype) as capture:
        if cfg.estimator == "diagonal":
            sums = squared_gradient_pass(first_pass("diagonal Fisher"), None)
            per_token = sums.n_tokens * signals_per_token(cfg.fisher, cfg.mc_samples)
            tensors = {f"diag/{name}": _finite(t / per_token, name) for name, t in sums.tensors.items()}
            return Curvature(cfg, layers, {}, tensors, sums.n_tokens, sums.n_positions, fingerprint)
        sums = covariance_pass(first_pass("K-FAC factors"))
        per_token = sums.n_tokens * signals_per_token(cfg.fisher, cfg.mc_samples)
        tensors, bases = {}, {}
        for key, total in sums.tensors.items():
            kind, name = key.split("/", 1)
            vals, vecs = eigh(total / (sums.n_positions if kind == "A" else per_token), name, factor_dtype)
            tensors[f"{key}/eigvecs"] = vecs
            if cfg.estimator == "kfac":
                tensors[f"{key}/eigvals"] = vals
        if cfg.estimator == "ekfac":
            bases = {spec.name: (tensors[f"S/{spec.name}/eigvecs"], tensors[f"A/{capture.groups[spec.name]}/eigvecs"])
                     for spec in layers}
            corrected = squared_gradient_pass(replay("EK-FAC correction"), bases)
            tensors.update({f"eigvals/{name}": _finite(t / per_token, name) for name, t in corrected.tensors.items()})
        return Curvature(cfg, layers, dict(capture.groups), tensors, sums.n_tokens, sums.n_positions, fingerprint)


def _finite(t: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.isfinite(t).all():
        raise ConfigError("model", name, "curvature has non-finite entries (NaN/inf weights or inputs?)")
    return t


def _to(batch: BatchDict, device: torch.device) -> BatchDict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _length(batches: Iterable, cap: int | None) -> int | None:
    n = len(batches) if hasattr(batches, "__len__") else None
    return min(n, cap) if n is not None and cap is not None else (n if cap is None else cap)
