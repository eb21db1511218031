"""``fit_curvature``: one pass over the batches for K-FAC and diagonal, two for EK-FAC (factors, then the
eigenvalue correction in the fixed eigenbasis) — per layer group when ``layer_groups`` > 1.

Scheduling options never change the result (tests: bit-equal in fp32): ``layer_groups`` splits the covered
layers into contiguous groups (whole parent modules, so layers sharing an input stay together) fitted in turn,
each pass replaying the same batches with the same random draws; ``offload`` puts finished factors on the CPU or
on disk, written one layer at a time right after its eigendecomposition; ``checkpoint_every`` saves the running
sums so that a restarted fit continues (``kfade.curvature.checkpoint``).
"""

from __future__ import annotations

import itertools
import shutil
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from kfade import distributed, fsdp
from kfade.cache import fingerprint
from kfade.curvature.capture import CapturedBatch, LayerCapture
from kfade.curvature.checkpoint import FitCheckpoint, batch_digest, new_digest
from kfade.curvature.config import CurvatureConfig, fit_key
from kfade.curvature.curvature import Curvature
from kfade.curvature.estimators import estimator
from kfade.curvature.factors import FactorStore, layer_of
from kfade.curvature.fingerprint import model_fingerprint
from kfade.curvature.fisher import IGNORE_INDEX, label_positions, signals_per_token
from kfade.curvature.layers import LayerSpec, select_layers
from kfade.curvature.owners import assign_owners
from kfade.curvature.passes import Sums, covariance_pass, eigh, progress_bar, squared_gradient_pass
from kfade.curvature.sharded import ShardedCurvature
from kfade.errors import ConfigError

BatchDict = dict[str, torch.Tensor]
DESCRIPTIONS = {"diagonal": "diagonal Fisher", "factors": "K-FAC factors", "correction": "EK-FAC correction"}


def fit_curvature(model: nn.Module, batches: Iterable[BatchDict], cfg: CurvatureConfig, progress: bool = False,
                  workdir: str | Path | None = None) -> Curvature:
    """Fit ``cfg.estimator`` on ``batches`` (dicts of ``input_ids``, ``attention_mask``, ``labels``).

    The model is used in its current train/eval mode (call ``model.eval()`` for deterministic factors; Hugging
    Face applies gradient checkpointing in train mode only). With a torch.distributed process group, each rank
    fits on the batches it is given and the sums are all-reduced: the result is the fit on the union. On an FSDP
    model (``kfade.fsdp``) each sum is reduced to the rank owning its layer instead, which alone eigendecomposes
    and keeps it: the result is a ``ShardedCurvature`` (the shorter shards of batches are padded with passes that
    add nothing, so that every rank runs as many forward and backward passes).
    ``identity`` reads no data (Ĝ = I over the selected layers). ``workdir`` (default ``cfg.offload_dir``) holds
    the checkpoint and, while fitting with checkpoints or ``offload=disk``, the finished per-layer factor files;
    checkpointing needs one.
    """
    cfg.validate()
    layers = select_layers(model, cfg.modules)
    first = next(model.parameters())
    accumulate = torch.float64 if first.dtype == torch.float64 else torch.float32
    fingerprint_ = model_fingerprint(model)
    sharded = distributed.world_size() > 1 and fsdp.is_sharded(model)
    if sharded and cfg.fisher == "exact":
        raise ConfigError("curvature.fisher", cfg.fisher, "not with distributed.strategy=fsdp: one backward per class "
                          "and label position would differ between ranks; use mc or empirical")
    kind = ShardedCurvature if sharded else Curvature
    if not estimator(cfg.estimator).passes:
        return kind(cfg, layers, {}, {}, 0, 0, fingerprint_)
    directory = workdir if workdir is not None else cfg.offload_dir
    if cfg.checkpoint_every is not None and directory is None:
        raise ConfigError("curvature.checkpoint_every", cfg.checkpoint_every,
                          "needs a directory: set curvature.offload_dir (load_or_fit uses its cache)")
    if directory is not None and distributed.world_size() > 1:
        directory = Path(directory) / f"rank{distributed.rank()}"
    fit = _Fit(model, layers, cfg, accumulate, directory, fingerprint_, sharded)
    with torch.enable_grad(), LayerCapture(model, layers, accumulate) as capture:
        fit.run(_Source(batches, cfg), capture, progress)
    return kind(cfg, layers, dict(capture.groups), fit.result_store(), fit.n_tokens, fit.n_positions, fingerprint_)


def layer_groups(layers: list[LayerSpec], count: int) -> list[list[LayerSpec]]:
    """``count`` contiguous groups of whole parent modules (q/k/v of one attention stay together)."""
    units = [list(g) for _, g in itertools.groupby(layers, key=lambda spec: spec.name.rpartition(".")[0])]
    if count > len(units):
        raise ConfigError("curvature.layer_groups", count, f"more groups than the {len(units)} modules that "
                          "hold the covered layers")
    return [[spec for unit in units[i * len(units) // count : (i + 1) * len(units) // count] for spec in unit]
            for i in range(count)]


class _Source:
    """The fitting batches within the caps: read once from the iterable, replayed by later passes."""

    def __init__(self, batches: Iterable[BatchDict], cfg: CurvatureConfig):
        self._iter, self.cfg = iter(batches), cfg
        self.total = _length(batches, cfg.max_batches)
        self.used: list[BatchDict] = []
        self.tokens, self.digest, self.exhausted = 0, new_digest(), False

    def read_until(self, count: int) -> None:
        while len(self.used) < count and self._read_one():
            pass

    def from_index(self, start: int) -> Iterator[tuple[int, BatchDict]]:
        self.read_until(start)
        index = start
        while index < len(self.used) or self._read_one():
            yield index, self.used[index]
            index += 1

    def _read_one(self) -> bool:
        cap_tokens = self.cfg.max_tokens is not None and self.tokens >= self.cfg.max_tokens
        if self.exhausted or len(self.used) == self.cfg.max_batches or cap_tokens:
            self.exhausted = True
            return False
        try:
            batch = next(self._iter)
        except StopIteration:
            self.exhausted = True
            return False
        self.used.append(batch)
        self.tokens += int((label_positions(batch)[0] != IGNORE_INDEX).sum())
        batch_digest(self.digest, batch)
        return True


class _Fit:
    """The passes of one fit, their finished factors (``store``) and checkpoints."""

    def __init__(self, model: nn.Module, layers: list[LayerSpec], cfg: CurvatureConfig, accumulate: torch.dtype,
                 directory: str | Path | None, model_fp: str, sharded: bool = False):
        self.model, self.layers, self.cfg, self.accumulate, self.sharded = model, layers, cfg, accumulate, sharded
        self.device = next(model.parameters()).device
        self.storage = torch.bfloat16 if cfg.factor_dtype == "bfloat16" else accumulate
        self.groups = layer_groups(layers, cfg.layer_groups)
        self.estimator = estimator(cfg.estimator)
        self.passes = [(g, kind) for g in range(len(self.groups)) for kind in self.estimator.passes]
        self.seed = cfg.seed + distributed.rank()
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed)
        self.directory = Path(directory) if directory is not None else None
        key = fingerprint({"config": fit_key(cfg), "model": model_fp, "layers": [s.name for s in layers],
                           "world": distributed.world_size()})
        self.checkpoint = (FitCheckpoint(self.directory, key) if cfg.checkpoint_every is not None else None)
        self.n_tokens = self.n_positions = 0
        self.store: FactorStore | None = None

    def _factor_dir(self) -> Path | None:
        return self.directory / "factors" if self.directory is not None else None

    def run(self, source: _Source, capture: LayerCapture, progress: bool) -> None:
        start_pass, start_batch, sums = self._resume(source, capture)
        for p in range(start_pass, len(self.passes)):
            group, kind = self.passes[p]
            if p != start_pass or start_batch == 0:
                sums = Sums()
                if kind != "correction":  # every group's factor pass sees the same draws
                    self.generator.manual_seed(self.seed)
            start = start_batch if p == start_pass else 0
            active = {spec.name for spec in self.groups[group]}
            captured = self._captured(source, capture, p, start, active, sums, progress)
            if kind == "factors":
                sums = covariance_pass(captured, sums)
            else:
                sums = squared_gradient_pass(captured, self._bases(group, capture) if kind == "correction" else None,
                                             sums)
            if not source.used:
                raise ConfigError("batches", "[]", "no batches to fit the curvature on")
            sums.reduce(self._owners(capture))
            self._finish(kind, sums)
            self._save(source, capture, p + 1, 0, Sums())
        if self.checkpoint is not None:
            self.checkpoint.clear()

    def _captured(self, source, capture, p, start, active, sums, progress) -> Iterator[CapturedBatch]:
        group, kind = self.passes[p]
        desc = DESCRIPTIONS[kind] + (f", layer group {group + 1}/{len(self.groups)}" if len(self.groups) > 1 else "")
        total = None if source.total is None else source.total - start
        pads = 0
        if self.sharded:  # as many passes as the rank with the most batches, agreed before the first forward
            source.read_until(sys.maxsize)
            pads = distributed.maximum(len(source.used)) - len(source.used)
        for index, batch in progress_bar(source.from_index(start), desc, total, progress):
            yield capture.capture(_to(batch, self.device), self.cfg, self.generator, active)
            every = self.cfg.checkpoint_every
            if every is not None and (index + 1) % every == 0:  # batch ``index`` is in ``sums`` by now
                self._save(source, capture, p, index + 1, sums)
        for _ in range(pads):  # padding passes add nothing
            padding = capture.capture(_to(source.used[0], self.device), self.cfg,
                                      torch.Generator(self.device).manual_seed(0), active)
            for _ in padding.output_grads:
                pass

    def _owners(self, capture: LayerCapture) -> dict[str, int] | None:
        """layer → owning rank on an FSDP model (None: every rank keeps every sum)."""
        if not self.sharded:
            return None
        return assign_owners(self.layers, capture.groups, self.cfg.estimator, distributed.world_size())

    def _finish(self, kind: str, sums: Sums) -> None:
        """Normalise the pass's sums and store them one layer at a time (eigendecomposed for the factor pass)."""
        per_token = sums.n_tokens * signals_per_token(self.cfg.fisher, self.cfg.mc_samples)
        self.n_tokens, self.n_positions = sums.n_tokens, sums.n_positions
        by_layer: dict[str, list[str]] = {}
        for key in sums.tensors:
            by_layer.setdefault(key if kind != "factors" else layer_of(key), []).append(key)
        for layer, keys in by_layer.items():
            out = {}
            for key in keys:
                total = sums.tensors.pop(key)
                if kind == "factors":
                    vals, vecs = eigh(total / (sums.n_positions if key.startswith("A/") else per_token), layer,
                                      self.storage)
                    out |= self.estimator.factor_tensors(key, vals, vecs)
                else:
                    out |= self.estimator.outer_tensors(key, _finite(total / per_token, key).to(self.storage))
            self.store.put(layer, out)

    def _bases(self, group: int, capture: LayerCapture) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(Q_S, Q_A) of the group's layers as stored (at the factor dtype), on the device in the sums' dtype. On
        an FSDP model each owner broadcasts its layers' bases (every rank projects its own per-sequence
        gradients)."""
        owners = self._owners(capture)
        size = {spec.name: (spec.out_features, spec.in_features) for spec in self.layers}

        def load(key: str) -> torch.Tensor:
            kind, layer = key.split("/")[:2]
            if owners is None or owners[layer] == distributed.rank():
                basis = self.store[key].to(self.device, self.accumulate)
            else:
                n = size[layer][0 if kind == "S" else 1]
                basis = torch.empty(n, n, dtype=self.accumulate, device=self.device)
            if owners is not None:
                torch.distributed.broadcast(basis, src=owners[layer])
            return basis

        q_a = {capture.groups[spec.name] for spec in self.groups[group]}
        q_a = {name: load(f"A/{name}/eigvecs") for name in sorted(q_a)}
        return {spec.name: (load(f"S/{spec.name}/eigvecs"), q_a[capture.groups[spec.name]])
                for spec in self.groups[group]}

    def _save(self, source: _Source, capture: LayerCapture, p: int, batch: int, sums: Sums) -> None:
        if self.checkpoint is None:
            return
        state = {"pass": p, "batch": batch, "n_used": len(source.used), "digest": source.digest.hexdigest(),
                 "sum_counts": [sums.n_tokens, sums.n_positions], "counts": [self.n_tokens, self.n_positions],
                 "groups": capture.groups}
        self.checkpoint.save(state, sums.tensors, self.generator)

    def _resume(self, source: _Source, capture: LayerCapture) -> tuple[int, int, Sums]:
        """(pass, batch, sums) to start from: a valid checkpoint's, else the beginning (fresh factor files)."""
        saved = self.checkpoint.load() if self.checkpoint is not None else None
        if saved is not None:
            state, tensors, generator_state = saved
            source.read_until(state["n_used"] + (state["pass"] > 0))  # after pass 0, the data must end there
            if len(source.used) != state["n_used"] or source.digest.hexdigest() != state["digest"]:
                warnings.warn(f"ignoring the curvature checkpoint {self.checkpoint.path}: the batches differ",
                              stacklevel=4)
                saved = None  # the batches read so far are still this fit's: they are replayed from the start
        start = distributed.agree(state["pass"] if saved is not None else -1)
        if saved is None or start != state["pass"]:
            if self.directory is not None:
                shutil.rmtree(self._factor_dir(), ignore_errors=True)
            self.store = self._new_store()
            return 0, 0, Sums()
        self.store = FactorStore.open(self._factor_dir())
        self.generator.set_state(generator_state.to(self.generator.get_state().device))
        capture.groups = state["groups"]
        self.n_tokens, self.n_positions = state["counts"]
        sums = Sums({k: t.to(self.device) for k, t in tensors.items()}, *state["sum_counts"])
        return state["pass"], state["batch"], sums

    def _new_store(self) -> FactorStore:
        if self.directory is not None and (self.checkpoint is not None or self.cfg.offload == "disk"):
            return FactorStore("disk", directory=self._factor_dir())
        return FactorStore(self.cfg.offload, self.device)

    def result_store(self) -> FactorStore:
        """The finished factors at ``cfg.offload`` (moved off the checkpoint's files when those are not it)."""
        if self.store.offload == self.cfg.offload:
            return self.store
        moved = self.store.moved(self.cfg.offload, self.device)
        shutil.rmtree(self._factor_dir(), ignore_errors=True)
        return moved


def _finite(t: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.isfinite(t).all():
        raise ConfigError("model", name, "curvature has non-finite entries (NaN/inf weights or inputs?)")
    return t


def _to(batch: BatchDict, device: torch.device) -> BatchDict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _length(batches: Iterable, cap: int | None) -> int | None:
    n = len(batches) if hasattr(batches, "__len__") else None
    return min(n, cap) if n is not None and cap is not None else (n if cap is None else cap)
