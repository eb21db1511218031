"""Run names and run directories: flat, readable, without paths or secrets; the device a run resolves to."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kfade.errors import ConfigError
from kfade.models.load import resolve_device
from kfade.pipeline.names import MAX_NAME, run_name, short_value

ROOT = Path(__file__).resolve().parents[1]


def test_paths_become_a_stem_and_a_hash_and_secrets_are_dropped():
    name = run_name(["model.path=/data/models/tofu_ft_llama2-7b/", "logger.entity=my-team", "method=kfade",
                     "hydra.sweep.dir=/tmp/x", "curvature.damping=0.1"])
    assert name.startswith("-curvature.damping=0.1,method=kfade,model.path=tofu_ft_llama2-7b-")
    assert "/" not in name and "my-team" not in name and "hydra" not in name
    assert short_value("/a/b/c") != short_value("/z/b/c")  # same stem, different paths: different names
    assert short_value("ekfac") == "ekfac" and run_name([]) == ""


def test_long_names_are_capped():
    name = run_name([f"key{i}=value{i}" for i in range(40)])
    assert len(name) <= MAX_NAME + 1 and "/" not in name


def test_device_auto_picks_cpu_here_and_unavailable_devices_are_errors():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    device, dtype, notices = resolve_device("auto", "bfloat16")
    assert (device, dtype) == ("cpu", "float32") and len(notices) == 2
    assert resolve_device("cpu", "float32") == ("cpu", "float32", [])
    for bad in ("cuda", "cuda:0", "gpu", "cpu:1"):
        with pytest.raises(ConfigError, match=r"^model\.device="):
            resolve_device(bad, "float32")


def job_dirs(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_dir() and ".hydra" not in p.parts]


@pytest.mark.slow  # two CLI processes (~16 s): the run dir naming is unit-tested above
def test_run_and_multirun_directories_are_one_level_deep(tmp_path):
    """Path-valued overrides (and a secret) on the command line: one folder per run under outputs/<date>/ and
    per job under the sweep dir, none named after the path or the secret. (The runs stop at the missing source.)"""
    script = [sys.executable, str(ROOT / "experiments" / "run.py")]
    overrides = ["method=none", "logger=none", "progress=false", "logger.entity=secret-team"]
    single = subprocess.run([*script, *overrides, "dataset.source=/no/such/dir/deep/path"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 2 and single.stderr.strip().startswith("error: dataset.source=")
    (date,) = (tmp_path / "outputs").iterdir()
    (run,) = job_dirs(date)
    assert run.parent == date and "secret" not in run.name and "source=path-" in run.name
    sweep = subprocess.run([*script, "-m", *overrides, "dataset.source=/no/such/a/b,/no/such/c/d"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert sweep.returncode == 2
    (sweep_date,) = (tmp_path / "multirun").iterdir()
    (sweep_dir,) = sweep_date.iterdir()
    assert [p.relative_to(sweep_dir) for p in job_dirs(sweep_dir)] == [Path("none-0")]


@pytest.mark.slow  # a CLI process (~9 s); the one-line CLI path: test_bad_inputs, the device check: in-process
def test_cuda_on_a_machine_without_it_is_one_line_and_exit_2(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), "method=none", "logger=none",
                           "model.device=cuda", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: model.device='cuda': this machine has no CUDA device; "
                                                "use auto or cpu"]
