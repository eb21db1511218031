"""``load_or_fit``: reuse a stored fit when its fingerprint matches, refit otherwise (sweeps over damping and
step sizes share one fit: damping is not part of the key)."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

from torch import nn

from kfade import distributed, fsdp
from kfade.cache import fingerprint
from kfade.curvature.config import APPLY_TIME_FIELDS, SCHEDULE_FIELDS, CurvatureConfig, fit_key
from kfade.curvature.curvature import Curvature
from kfade.curvature.fingerprint import model_fingerprint
from kfade.curvature.fit import fit_curvature
from kfade.curvature.layers import select_layers
from kfade.curvature.sharded import ShardedCurvature
from kfade.errors import ConfigError

__all__ = ["APPLY_TIME_FIELDS", "SCHEDULE_FIELDS", "fit_fingerprint", "fit_key", "load_or_fit"]


def fit_fingerprint(cfg: CurvatureConfig, model_fp: str, data_fp: str | None) -> str:
    return fingerprint({"config": fit_key(cfg), "model": model_fp, "data": data_fp})


def load_or_fit(model: nn.Module, batches_fn: Callable[[], Iterable[dict]], cfg: CurvatureConfig,
                cache_root: str | Path, data_fingerprint: str, progress: bool = False) -> Curvature:
    """The fit stored under ``cache_root`` for (``cfg``, ``data_fingerprint``) if its model fingerprint matches
    ``model``; otherwise fit on ``batches_fn()`` and store it. An unreadable, truncated or tampered file is refit
    (with a warning); a stored fit whose layer shapes differ from the model's raises ``ConfigError``. The returned
    curvature uses ``cfg``'s apply-time fields (damping, offload). Under torch.distributed each rank fits its shard
    of the batches (``batches[rank::world]``; the caps then apply per rank), rank 0 writes the cache and the other
    ranks read it back; on an FSDP model every rank fits, writes and reads only the layers it owns
    (``ShardedCurvature``: a cache written by another world size, or by one process, is re-sharded on reading).
    Checkpoints (``checkpoint_every``) and disk-offloaded factors go to ``cfg.offload_dir``,
    else to ``<cache entry>.work`` (kept after a crash so that the next call resumes, removed after the save)."""
    key = fingerprint({"config": fit_key(cfg), "data": data_fingerprint})
    path = Path(cache_root) / f"curvature-{cfg.estimator}-{key}"
    expected = fit_fingerprint(cfg, model_fingerprint(model), data_fingerprint)
    device = next(model.parameters()).device
    sharded = distributed.world_size() > 1 and fsdp.is_sharded(model)
    kind = ShardedCurvature if sharded else Curvature
    stored = None
    if path.exists():
        try:
            stored = kind.load(path, cfg.offload, device)
        except ConfigError as e:
            warnings.warn(f"refitting the curvature: {e}", stacklevel=2)
        else:
            _check_layers(stored, model, cfg, path)
            if fit_fingerprint(stored.config, stored.model_fingerprint, stored.data_fingerprint) != expected:
                warnings.warn(f"refitting the curvature: {path} was fit on other weights or data", stacklevel=2)
                stored = None
    if sharded and distributed.agree(int(stored is not None)) != 1:  # each rank read only its own files
        stored = None
    if stored is not None:
        return _with_apply_time_fields(stored, cfg)
    distributed.barrier()  # every rank has read the old entry before it is replaced
    workdir = path.with_name(path.name + ".work")
    curvature = fit_curvature(model, distributed.shard(batches_fn()), cfg, progress=progress,
                              workdir=cfg.offload_dir or workdir)
    curvature.data_fingerprint = data_fingerprint
    if sharded or distributed.is_main():
        curvature.save(path)  # sharded: every rank writes its own layers
    distributed.barrier()
    if not (sharded or distributed.is_main()):
        curvature = _with_apply_time_fields(Curvature.load(path, cfg.offload, device), cfg)
    distributed.barrier()
    if distributed.is_main():
        shutil.rmtree(workdir, ignore_errors=True)
    return curvature


def _with_apply_time_fields(stored: Curvature, cfg: CurvatureConfig) -> Curvature:
    stored.config = replace(stored.config, **{k: getattr(cfg, k) for k in APPLY_TIME_FIELDS + SCHEDULE_FIELDS})
    return stored


def _check_layers(stored: Curvature, model: nn.Module, cfg: CurvatureConfig, path: Path) -> None:
    have = [(s.name, s.out_features, s.in_features) for s in select_layers(model, cfg.modules)]
    want = [(s.name, s.out_features, s.in_features) for s in stored.layers]
    if have != want:
        padded = zip(want + [None] * len(have), have + [None] * len(want), strict=True)
        first = next((w, h) for w, h in padded if w != h)
        raise ConfigError("curvature.path", str(path), f"stored layers do not match the model: stored "
                          f"{first[0]} vs model {first[1]} (name, out, in')")
