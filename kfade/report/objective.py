"""The scalar a hyperparameter sweeper (Hydra's Optuna plugin) minimises, read from a run's ``results.json``.

    value = metric                              if constraint ≤ max  (feasible)
          = penalty + (constraint − max)        otherwise            (infeasible: behind every feasible trial
                                                                       while metric < penalty, closer is better)
          = 2 · penalty                          if the metric or constraint is missing or not finite

Default: minimise ``kl_reference/retain`` (mean per-token KL from the reference on retain answers, nats)
subject to the forget-set P̄ ``forget/prob`` ≤ 0.38.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from kfade.errors import ConfigError
from kfade.report.numbers import number
from kfade.tracking import RESULTS_FILE, read_results


@dataclass
class ObjectiveConfig:
    metric: str = "kl_reference/retain"  # results.json key minimised
    constraint: str | None = "forget/prob"  # results.json key bounded above (None: unconstrained)
    max: float = 0.38  # the bound on ``constraint``
    penalty: float = 1000.0  # offset of infeasible trials (> any feasible metric value)

    def __post_init__(self):
        if not (math.isfinite(self.penalty) and self.penalty > 0):
            raise ConfigError("objective.penalty", self.penalty, "must be a finite number > 0")


def objective_value(results: dict, cfg: ObjectiveConfig) -> float:
    """The module docstring's value for one run's flat results."""
    metric = number(results.get(cfg.metric))
    bound = number(results.get(cfg.constraint)) if cfg.constraint is not None else None
    if metric is None or (cfg.constraint is not None and bound is None):
        return 2 * cfg.penalty
    if bound is not None and bound > cfg.max:
        return cfg.penalty + (bound - cfg.max)
    return metric


def objective_from_run(run_dir: str | Path, cfg: ObjectiveConfig) -> float:
    """``objective_value`` of the ``results.json`` in ``run_dir``."""
    return objective_value(read_results(Path(run_dir) / RESULTS_FILE), cfg)
