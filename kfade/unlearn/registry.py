"""Methods by name: ``METHODS[name] = (ConfigDataclass, MethodClass)``, :func:`method_classes` and
:func:`build_method`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from kfade.errors import ConfigError
from kfade.unlearn.base import Method
from kfade.unlearn.grad_ascent import GradAscent, GradAscentConfig
from kfade.unlearn.grad_diff import GradDiff, GradDiffConfig
from kfade.unlearn.kfade import KFade, KFadeConfig
from kfade.unlearn.npo import NPO, NPOConfig
from kfade.unlearn.rmu import RMU, RMUConfig

METHODS: dict[str, tuple[type, type]] = {
    "kfade": (KFadeConfig, KFade),
    "grad_ascent": (GradAscentConfig, GradAscent),
    "grad_diff": (GradDiffConfig, GradDiff),
    "npo": (NPOConfig, NPO),
    "rmu": (RMUConfig, RMU),
}


def method_classes(name: str) -> tuple[type, type[Method]]:
    """``(config dataclass, method class)`` of ``name``; ConfigError ``method.name`` for an unknown one."""
    if name not in METHODS:
        raise ConfigError("method.name", name, f"unknown method; choose one of {sorted(METHODS)} (or none in a run)")
    return METHODS[name]


def build_method(name: str, cfg=None, *, curvature=None, cache_root: str | None = None,
                 progress: bool = False) -> Method:
    """The method ``name`` configured by ``cfg``: a dict of its fields, its config dataclass (validated when it
    was constructed) or None (the defaults).

    ``curvature`` (a ``CurvatureConfig``) and ``cache_root`` (curvature cache directory) go to the methods
    that fit a curvature (K-FADE) and are ignored by the others.
    """
    config_cls, method_cls = method_classes(name)
    if cfg is None:
        cfg = config_cls()
    elif isinstance(cfg, Mapping):
        known = {f.name for f in dataclasses.fields(config_cls)}
        for key in cfg:
            if key not in known:
                raise ConfigError(f"method.{key}", cfg[key],
                                  f"not a field of method {name!r}; fields: {sorted(known)}")
        cfg = config_cls(**cfg)
    elif not isinstance(cfg, config_cls):
        raise ConfigError("method.name", name,
                          f"config is a {type(cfg).__name__}, expected {config_cls.__name__}")
    if cfg.name != name:
        raise ConfigError("method.name", cfg.name, f"config is for {cfg.name!r}, not {name!r}")
    if method_cls.uses_curvature:
        return method_cls(cfg, curvature=curvature, cache_root=cache_root, progress=progress)
    return method_cls(cfg, progress=progress)
