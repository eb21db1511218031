"""Experiment tracking: Weights & Biases (offline by default) or nothing, plus the local ``results.json``.

The local results file is the source of truth (the report reads it); W&B is a view of the same numbers.
A tracker has four calls: ``log`` (a step of a curve), ``summary`` (final metrics), ``log_artifact`` (a file
or directory, e.g. the unlearning delta) and ``finish``; it is also a context manager that finishes on exit.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kfade.cache import write_json
from kfade.errors import ConfigError, require_one_of

RESULTS_FILE = "results.json"
TRACKER_KINDS = ("wandb", "none")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class LoggerConfig:
    """The ``logger`` config group."""

    kind: str = "none"  # "wandb" or "none"
    mode: str = "offline"  # W&B mode: offline (files in the run dir; `wandb sync` later), online, disabled
    project: str = "kfade"  # W&B project
    entity: str | None = None  # W&B team or user; None: the account's default
    group: str | None = None  # W&B run group, e.g. one per sweep; None: ungrouped
    tags: list[str] = field(default_factory=list)  # W&B run tags

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        require_one_of("logger.kind", self.kind, TRACKER_KINDS)
        require_one_of("logger.mode", self.mode, WANDB_MODES)


class NullTracker:
    """Tracks nothing: every call is a no-op (``logger=none``)."""

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record ``metrics`` as one point of the run's curves, at ``step`` (None: the next step)."""

    def summary(self, metrics: Mapping[str, float]) -> None:
        """Record the run's final ``metrics`` (one value per key)."""

    def log_artifact(self, path: str | os.PathLike, name: str, type: str) -> None:
        """Store the file or directory at ``path`` as a versioned artifact ``name`` of kind ``type``."""

    def finish(self) -> None:
        """Close the run (flushes everything to disk)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.finish()


class WandbTracker(NullTracker):
    """A W&B run whose files live under ``<run_dir>/wandb/``."""

    def __init__(self, run_dir: str | os.PathLike, config: Mapping, project: str, entity: str | None,
                 group: str | None, tags: Sequence[str], mode: str, name: str | None):
        import wandb

        Path(run_dir).mkdir(parents=True, exist_ok=True)
        # finish_previous: in a sequential multirun a crashed job's run is closed, never logged into again
        self._run = wandb.init(dir=str(run_dir), mode=mode, project=project, entity=entity, group=group,
                               tags=list(tags), config=dict(config), name=name, reinit="finish_previous")

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._run.log(dict(metrics), step=step)

    def summary(self, metrics: Mapping[str, float]) -> None:
        self._run.summary.update(dict(metrics))

    def log_artifact(self, path: str | os.PathLike, name: str, type: str) -> None:
        import wandb

        artifact = wandb.Artifact(name=name, type=type)
        # immutable: referenced in place, not copied to a staging dir (a 7B delta is GBs); it must stay put
        # until the run is synced, as the run's own files do
        if Path(path).is_dir():
            artifact.add_dir(str(path), policy="immutable")
        else:
            artifact.add_file(str(path), policy="immutable")
        self._run.log_artifact(artifact)

    def finish(self) -> None:
        self._run.finish()


def make_tracker(kind: str, run_dir: str | os.PathLike, config: Mapping, project: str = "kfade",
                 entity: str | None = None, group: str | None = None, tags: Sequence[str] = (),
                 mode: str = "offline", name: str | None = None) -> NullTracker:
    """The tracker of ``kind`` ("wandb" or "none"); ``config`` is the run's resolved config (a plain dict)."""
    require_one_of("logger.kind", kind, TRACKER_KINDS)
    if kind == "none":
        return NullTracker()
    require_one_of("logger.mode", mode, WANDB_MODES)
    return WandbTracker(run_dir, config, project, entity, group, tags, mode, name)


def flatten(metrics: Mapping, prefix: str = "") -> dict:
    """Nested mappings → one level with "/"-joined keys: ``{"a": {"b": 1}}`` → ``{"a/b": 1}``."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


def write_results(run_dir: str | os.PathLike, results: Mapping) -> Path:
    """Atomically write ``results`` (flattened, "/"-joined keys) to ``<run_dir>/results.json``; returns its
    path. Non-finite floats are written as null (strict JSON)."""
    path = Path(run_dir) / RESULTS_FILE
    write_json(path, {key: _strict_json(value) for key, value in flatten(results).items()})
    return path


def require_unfinished(run_dir: str | os.PathLike) -> None:
    """ConfigError if ``run_dir`` already holds a finished run's results: a run never overwrites another's."""
    if (Path(run_dir) / RESULTS_FILE).exists():
        raise ConfigError("run_dir", str(run_dir), f"holds a finished run ({RESULTS_FILE}); nothing is overwritten: "
                                                   "choose another hydra.run.dir / hydra.sweep.dir")


def _strict_json(value):
    """NaN/±inf → None (JSON has no literal for them)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read_results(path: str | os.PathLike) -> dict:
    """The flat results in ``path``, a results.json or a run dir holding one (``ValueError`` if not JSON)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    results = json.loads(path.read_text())
    if not isinstance(results, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(results).__name__}")
    return results
