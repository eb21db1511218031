"""Hydra entry point: composes the config and runs the job (``kfade.pipeline``).

    python experiments/run.py                                   # experiment=mini_tofu: K-FADE (EK-FAC) on mini-TOFU
    python experiments/run.py method=grad_ascent                # a baseline, same data and evaluation
    python experiments/run.py method=none noise_floor=true      # only the reference / retrain models
    python experiments/run.py -m method.step_size=0.01,0.02 curvature.damping=0.01,0.1   # a sweep (one curvature fit)

Every run writes ``results.json`` (flat keys) in its run directory; bad config is one line on stderr, exit 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kfade import distributed, pipeline
from kfade.errors import ConfigError
from kfade.pipeline.ranks import rank_overrides, start
from kfade.report.objective import objective_from_run

OmegaConf.register_new_resolver("run_name", pipeline.run_name, replace=True)  # used by conf/config.yaml's run dir


def run(config: pipeline.RunConfig, cfg: DictConfig, run_dir: Path) -> dict:
    """The job of ``config`` (typed from the composed ``cfg``), named and grouped from Hydra's run state."""
    hydra_cfg = HydraConfig.get()
    group = Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode == RunMode.MULTIRUN else None  # one W&B group a sweep
    return pipeline.run(config, run_dir, choices=hydra_cfg.runtime.choices, group=group,
                        name=pipeline.run_name(hydra_cfg.overrides.task).lstrip("-") or None,
                        logged=OmegaConf.to_container(cfg, resolve=True))


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Returns the sweeper's objective (``objective.*``, read from results.json); None for a dry run."""
    start()  # torchrun: join the process group (rank 0 alone writes)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        config = pipeline.load_config(cfg)  # every config checked before any work
        run(config, cfg, run_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if config.options.dry_run or not distributed.is_main():  # rank > 0 writes no results.json
        return None
    return objective_from_run(run_dir, config.objective)


if __name__ == "__main__":
    sys.argv += rank_overrides()
    main()
