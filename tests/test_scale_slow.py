"""Slow end-to-end checks of the paper-scale tooling (deselected by default; ``pytest -m slow``)."""

import math
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_gpu_check_runs_on_cpu_with_tiny(capsys):
    main = runpy.run_path(str(ROOT / "benchmarks" / "gpu_check.py"))["main"]

    assert main(["--tiny", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for needle in ("tokens/s", "× forward+backward", "K-FADE direct step", "K-FADE cg step", "dry-run plan",
                   "bf16 factors vs fp32", "CG solve, vectors bf16 on the host"):
        assert needle in out
    assert "vectors fp32 on the host: " in out and out.split("vectors fp32 on the host: ")[1].split("\n")[0].endswith(
        "error vs fp32 0.00e+00")  # host-resident vectors change nothing but where they live


def test_optuna_mini_sweep_on_the_tiny_default(tmp_path):
    """Two Optuna trials over η and λ on the embedded mini-TOFU; each returns its objective to the sweeper."""
    out = subprocess.run(
        [sys.executable, "experiments/run.py", "-m", "hydra/sweeper=eta_lambda", "method=kfade_paper",
         "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2", "logger=none", "progress=false",
         f"hydra.sweep.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    best = (tmp_path / "optimization_results.yaml").read_text()
    assert "best_value" in best and "method.step_size" in best
    value = float(best.split("best_value:")[1].split()[0])
    assert math.isfinite(value) and value >= 0


def test_dry_run_cli_of_the_7b_experiment():
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "experiments/run.py", "experiment=tofu_llama2_7b", "dry_run=true",
                          "memory.gpu_gb=141"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert "shared A once: 63.71 GB" in out.stdout
    assert re.fullmatch(r"total peak: \d+\.\d\d GB on cuda, \d+\.\d\d GB on cpu", out.stdout.strip().splitlines()[-1])
    bad = subprocess.run([sys.executable, "experiments/run.py", "model=hf", "model.path=org/not-here", "dry_run=true"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: model.path='org/not-here'")
    assert len(bad.stderr.strip().splitlines()) == 1
