"""`make compare`'s job queue (experiments/sweeps/compare.sh), run with a stand-in Python that records each job's
overrides instead of running it: every sweep at every level, the retrain level read from the reference run, and
SKIP leaving sweeps out."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAKE_PYTHON = """#!/usr/bin/env bash
[ "$1" = "-c" ] && exec "{python}" "$@"   # compare.sh reads the retrain P̄ with python -c
echo "$*" >> "$JOBS"
for a in "$@"; do case "$a" in hydra.sweep.dir=*) dir=${{a#hydra.sweep.dir=}} ;; esac; done
if [[ " $* " == *" method=none "* ]]; then
  mkdir -p "$dir/none-0" && echo '{{"retrain/forget/prob": 0.0813}}' > "$dir/none-0/results.json"
fi
"""


def queued_jobs(tmp_path: Path, **env: str) -> list[str]:
    tmp_path.mkdir()
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    jobs = tmp_path / "jobs.txt"
    subprocess.run(["bash", "experiments/sweeps/compare.sh", str(tmp_path / "out")], cwd=ROOT, check=True,
                   env={**os.environ, "PY": str(fake), "JOBS": str(jobs), "REGIMES": "pretrained", **env})
    return [line for line in jobs.read_text().splitlines() if "experiments/run.py" in line]


def sweep_of(job: str) -> str:
    return next(a for a in job.split() if a.startswith("hydra.sweep.dir=")).split("/pretrained/")[1]


def test_compare_queues_every_sweep_at_every_level_and_skip_leaves_some_out(tmp_path):
    jobs = queued_jobs(tmp_path / "all")
    sweeps = {sweep_of(j): j for j in jobs}
    for level, target in (("0.62", "0.62"), ("0.38", "0.38"), ("0.1", "0.1"), ("retrain", "0.0813")):
        for sweep in ("kfade_default", "kfade_cg"):
            assert f"method.target_forget_prob={target}" in sweeps[f"{sweep}/{level}"].split()
    assert "method=kfade_cg" in sweeps["kfade_cg/retrain"].split()
    assert {"method=kfade_direct", "method.forget_loss=nll"} <= set(sweeps["kfade_direct"].split())  # the paper's
    assert "method=kfade_direct" in sweeps["kfade_onestep"].split()
    assert "method.target_forget_prob=0.62,0.38,0.1,0.0813" in sweeps["grad_diff"].split()
    assert {"none", "seeds_kfade_default", "seeds_grad_diff", "grad_ascent", "npo", "rmu"} <= set(sweeps)
    skipped = {sweep_of(j) for j in queued_jobs(tmp_path / "skip", SKIP=r"kfade_cg/0\.|rmu")}
    assert skipped == set(sweeps) - {"kfade_cg/0.62", "kfade_cg/0.38", "kfade_cg/0.1", "rmu"}
