"""The job as library functions: typed configs in (``load_config``), results out (``run``).

    config = load_config(cfg)                   # every group typed and checked before any work
    results = run(config, run_dir)              # suite → method → score, audit, reapply → results.json

``experiments/run.py`` only composes the Hydra config into these and names the run; tests call them the same way.
"""

from kfade.pipeline.config import NO_METHOD, ReapplyConfig, RunConfig, RunOptions, load_config, typed
from kfade.pipeline.job import build, reapply, run, unlearn
from kfade.pipeline.names import run_name
from kfade.pipeline.plan import placement_fields, plan_run, planned_curvature, print_plan

__all__ = ["NO_METHOD", "ReapplyConfig", "RunConfig", "RunOptions", "build", "load_config", "placement_fields",
           "plan_run", "planned_curvature", "print_plan", "reapply", "run", "run_name", "typed", "unlearn"]
