"""Slow end-to-end checks of the paper-scale tooling (deselected by default; ``pytest -m slow``)."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_gpu_check_runs_on_cpu_with_tiny(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import main

    assert main(["--tiny", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for needle in ("tokens/s", "× forward+backward", "K-FADE direct step", "K-FADE cg step", "dry-run plan",
                   "bf16 factors vs fp32"):
        assert needle in out


def test_optuna_mini_sweep_on_the_tiny_default(tmp_path):
    """Two Optuna trials over η and λ on the embedded mini-TOFU; each returns its objective to the sweeper."""
    out = subprocess.run(
        [sys.executable, "experiments/run.py", "-m", "hydra/sweeper=eta_lambda", "hydra.sweeper.n_trials=2",
         "hydra.sweeper.sampler.n_startup_trials=2", "logger=none", "progress=false",
         f"hydra.sweep.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    best = (tmp_path / "optimization_results.yaml").read_text()
    assert "best_value" in best and "method.step_size" in best
    value = float(best.split("best_value:")[1].split()[0])
    assert math.isfinite(value) and value >= 0
