"""Factor sums over the data (one pass each), their reduction across ranks, and the eigendecompositions.

Sums stay unnormalised until every rank's contribution is in (one all-reduce per tensor, or with layer owners one
``dist.reduce`` to the layer's owner, the other ranks dropping it), then:
A = Σ ā āᵀ / N_pos,  S = Σ_k Σ_s g gᵀ / (N_tok·K),  Λ* (EK-FAC) or D (diagonal) = Σ_k (projected G_k)² / (N_tok·K),
with K the signals per token (``fisher.signals_per_token``) and G_k = Σ_s g_s ā_sᵀ one signal's per-sequence
gradient of W̄ — the same normalisation for every estimator.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from kfade import distributed
from kfade.curvature.capture import CapturedBatch
from kfade.errors import ConfigError

PER_SAMPLE_CHUNK_ELEMENTS = 2**26  # bound on sequences·out·in of one batched per-sample gradient einsum


class Sums:
    """Named running sums plus the token / position counts, all-reducible in one go."""

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None, n_tokens: int = 0, n_positions: int = 0):
        self.tensors: dict[str, torch.Tensor] = dict(tensors or {})
        self.n_tokens = n_tokens
        self.n_positions = n_positions

    def add(self, key: str, value: torch.Tensor) -> None:
        if key in self.tensors:
            self.tensors[key] += value
        else:
            self.tensors[key] = value.clone()

    def count(self, batch: CapturedBatch) -> None:
        self.n_tokens += batch.n_tokens
        self.n_positions += batch.n_positions

    def reduce(self, owners: dict[str, int] | None = None) -> None:
        """Sum every tensor and count over the process group (a no-op without torch.distributed): onto every rank,
        or with ``owners`` (layer → rank) only onto the owner of each tensor's layer (``A/<group>``: the group's
        first layer), which alone keeps it. Counts reach every rank."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        for key in list(self.tensors):
            if owners is None:
                dist.all_reduce(self.tensors[key])
                continue
            owner = owners[key.split("/")[1] if "/" in key else key]
            dist.reduce(self.tensors[key], dst=owner)
            if owner != dist.get_rank():
                del self.tensors[key]
        counts = torch.tensor([self.n_tokens, self.n_positions], dtype=torch.float64,
                              device=distributed.collective_device())
        dist.all_reduce(counts)
        self.n_tokens, self.n_positions = (int(c) for c in counts.tolist())


def covariance_pass(batches: Iterable[CapturedBatch], sums: Sums | None = None) -> Sums:
    """K-FAC sums: ``A/<group>`` = Σ ā āᵀ over fed positions, ``S/<layer>`` = Σ_signals Σ_s g gᵀ (added to
    ``sums``, e.g. those of a checkpoint; not yet reduced across ranks)."""
    sums = Sums() if sums is None else sums
    for batch in batches:
        sums.count(batch)
        for group, a in batch.activations.items():
            flat = a.flatten(0, -2)
            sums.add(f"A/{group}", flat.T @ flat)
        for grads in batch.output_grads:
            for layer, g in grads.items():
                flat = g.flatten(0, -2)
                sums.add(f"S/{layer}", flat.T @ flat)
    return sums


def squared_gradient_pass(batches: Iterable[CapturedBatch], bases: dict[str, tuple[torch.Tensor, torch.Tensor]] | None,
                          sums: Sums | None = None) -> Sums:
    """Σ over signals and sequences of (Q_Sᵀ G_k Q_A)² per layer (``bases[layer] = (Q_S, Q_A)``), or of G_k²
    when ``bases`` is None, added to ``sums`` (not yet reduced across ranks). Per-sequence gradients are formed
    batched (einsum)."""
    sums = Sums() if sums is None else sums
    for batch in batches:
        sums.count(batch)
        if bases is None:
            acts = batch.activations
        else:
            basis_of_group = {batch.groups[layer]: q_a for layer, (_, q_a) in bases.items()}
            acts = {group: a @ basis_of_group[group] for group, a in batch.activations.items()}
        for grads in batch.output_grads:
            for layer, g in grads.items():
                g = g if bases is None else g @ bases[layer][0]
                sums.add(layer, _sum_squared_per_sample(g, acts[batch.groups[layer]]))
    return sums


def _sum_squared_per_sample(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Σ_{k,b} (Σ_t g[k,b,t] a[b,t]ᵀ)² for g (K, B, T, out) and a (B, T, in), in chunks of sequences."""
    signals, n_seq, _, out = g.shape
    chunk = max(1, PER_SAMPLE_CHUNK_ELEMENTS // (signals * out * a.shape[-1]))
    total = 0
    for start in range(0, n_seq, chunk):
        per_sample = torch.einsum("kbto,bti->kboi", g[:, start : start + chunk], a[start : start + chunk])
        total = total + per_sample.square().sum((0, 1))
    return total


def eigh(matrix: torch.Tensor, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped ≥ 0) and eigenvectors of the symmetrised ``matrix``, computed in fp64."""
    m = matrix.double()
    if not torch.isfinite(m).all():
        raise ConfigError("model", name, "curvature factor has non-finite entries (NaN/inf weights or inputs?)")
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    clamped = int((vals < 0).sum())
    if clamped:  # rounding makes PSD factors' smallest eigenvalues slightly negative
        logging.getLogger(__name__).info("%s: %d of %d eigenvalues < 0 (min %.3g) clamped to 0", name, clamped,
                                         vals.numel(), float(vals.min()))
    return vals.clamp_min(0).to(dtype), vecs.to(dtype).contiguous()


def progress_bar(items: Iterable, desc: str, total: int | None, show: bool) -> Iterator:
    """tqdm over ``items`` on rank 0 only (or nothing when ``show`` is False)."""
    rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    return iter(tqdm(items, desc=desc, total=total, disable=not (show and rank0), leave=False))
