"""``load_or_fit``: reuse a stored fit when its fingerprint matches, refit otherwise (sweeps over damping and
step sizes share one fit: damping is not part of the key)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, replace
from pathlib import Path

from torch import nn

from kfade.cache import fingerprint
from kfade.curvature.config import CurvatureConfig
from kfade.curvature.curvature import Curvature
from kfade.curvature.fingerprint import model_fingerprint
from kfade.curvature.fit import fit_curvature
from kfade.curvature.layers import select_layers
from kfade.errors import ConfigError

APPLY_TIME_FIELDS = ("damping", "damping_mode")  # used when preconditioning, not when fitting


def fit_key(cfg: CurvatureConfig) -> dict:
    """The config fields that change the fitted factors."""
    return {k: v for k, v in asdict(cfg).items() if k not in APPLY_TIME_FIELDS}


def fit_fingerprint(cfg: CurvatureConfig, model_fp: str, data_fp: str | None) -> str:
    return fingerprint({"config": fit_key(cfg), "model": model_fp, "data": data_fp})


def load_or_fit(model: nn.Module, batches_fn: Callable[[], Iterable[dict]], cfg: CurvatureConfig,
                cache_root: str | Path, data_fingerprint: str, progress: bool = False) -> Curvature:
    """The fit stored under ``cache_root`` for (``cfg``, ``data_fingerprint``) if its model fingerprint matches
    ``model``; otherwise fit on ``batches_fn()`` and store it. An unreadable file is refit (with a warning); a
    stored fit whose layer shapes differ from the model's raises ``ConfigError``. The returned curvature uses
    ``cfg``'s damping."""
    key = fingerprint({"config": fit_key(cfg), "data": data_fingerprint})
    path = Path(cache_root) / f"curvature-{cfg.estimator}-{key}"
    expected = fit_fingerprint(cfg, model_fingerprint(model), data_fingerprint)
    if path.exists():
        try:
            stored = Curvature.load(path)
        except ConfigError as e:
            warnings.warn(f"refitting the curvature: {e}", stacklevel=2)
        else:
            _check_layers(stored, model, cfg, path)
            if fit_fingerprint(stored.config, stored.model_fingerprint, stored.data_fingerprint) == expected:
                stored.config = replace(stored.config, **{k: getattr(cfg, k) for k in APPLY_TIME_FIELDS})
                return stored
            warnings.warn(f"refitting the curvature: {path} was fit on other weights or data", stacklevel=2)
    curvature = fit_curvature(model, batches_fn(), cfg, progress=progress)
    curvature.data_fingerprint = data_fingerprint
    curvature.save(path)
    return curvature


def _check_layers(stored: Curvature, model: nn.Module, cfg: CurvatureConfig, path: Path) -> None:
    have = [(s.name, s.out_features, s.in_features) for s in select_layers(model, cfg.modules)]
    want = [(s.name, s.out_features, s.in_features) for s in stored.layers]
    if have != want:
        padded = zip(want + [None] * len(have), have + [None] * len(want), strict=True)
        first = next((w, h) for w, h in padded if w != h)
        raise ConfigError("curvature.path", str(path), f"stored layers do not match the model: stored "
                          f"{first[0]} vs model {first[1]} (name, out, in')")
