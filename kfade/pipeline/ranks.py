"""torchrun support for ``experiments/run.py``: the process group from the environment, and rank > 0 kept quiet.

    torchrun --nproc_per_node=2 experiments/run.py curvature.estimator=ekfac method.solver=cg

Every rank runs the whole pipeline on the same model; the curvature fit and the Gauss-Newton products take one
shard of their batches per rank and all-reduce (``kfade.distributed``). Only rank 0 prints, logs and writes
(results.json, the delta, the Hydra run directory); the others run in a temporary directory. ``--multirun`` is not
combined with torchrun (launch one torchrun per job, e.g. from the submitit launcher).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

from kfade import distributed


def rank_overrides() -> list[str]:
    """Hydra overrides for a rank > 0 of torchrun: no run directory of its own, no log files."""
    if int(os.environ.get("RANK", "0")) == 0:
        return []
    scratch = tempfile.mkdtemp(prefix="kfade-rank-")
    atexit.register(shutil.rmtree, scratch, True)
    return ["hydra.output_subdir=null", f"hydra.run.dir={scratch}", "hydra/job_logging=disabled",
            "hydra/hydra_logging=disabled"]


def start() -> None:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); silence stdout on rank > 0."""
    distributed.init_from_env()
    if not distributed.is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
