"""Tracking: an offline W&B run's transaction log holds what was logged; results.json round-trips."""

import json
import subprocess
import sys

import pytest

from kfade.errors import ConfigError
from kfade.tracking import make_tracker, read_results, write_results


def wandb_records(run_dir) -> list[dict]:
    """The records of the offline run under ``run_dir``, decoded by W&B's own inspector (``wandb leet``)."""
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_file)],
                         capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_offline_wandb_run_records_curves_summary_config_and_delta_artifact(tmp_path, offline_wandb):
    run_dir = tmp_path / "job0"
    delta = tmp_path / "delta.safetensors"
    delta.write_bytes(b"0123456789")
    curve = [2.5, 3.25, 4.0]
    tracker = make_tracker("wandb", run_dir, {"method": {"name": "kfade", "eta": 0.01}}, project="kfade",
                           group="sweep-1", tags=["mini"], name="job0")
    for step, loss in enumerate(curve):
        tracker.log({"unlearn/forget_loss": loss}, step=step)
    tracker.summary({"forget_quality": 0.125, "model_utility": 0.5})
    tracker.log_artifact(delta, name="unlearning-delta", type="delta")
    tracker.finish()

    records = wandb_records(run_dir)
    by_type = {}
    for record in records:
        by_type.setdefault(record["type"], []).append(record[record["type"]])
    history = {h["step"].get("num", 0): h["item"]["unlearn/forget_loss"] for h in by_type["history"]}
    assert history == dict(enumerate(curve))
    summary = {}
    for update in by_type["summary"]:
        summary.update(update.get("update", {}))
    assert (summary["forget_quality"], summary["model_utility"]) == (0.125, 0.5)
    (run,) = by_type["run"]
    assert run["config"]["update"]["method"] == {"name": "kfade", "eta": 0.01}
    assert (run["run_group"], run["tags"], run["display_name"]) == ("sweep-1", ["mini"], "job0")
    (artifact,) = by_type["artifact"]
    assert (artifact["name"], artifact["type"]) == ("unlearning-delta", "delta")
    files = [(f["path"], int(f["size"])) for f in artifact["manifest"]["contents"]]
    assert files == [("delta.safetensors", 10)]


def test_null_tracker_writes_nothing_and_bad_kinds_are_config_errors(tmp_path):
    with make_tracker("none", tmp_path / "job", {"a": 1}) as tracker:
        tracker.log({"x": 1.0}, step=0)
        tracker.summary({"x": 1.0})
        tracker.log_artifact(tmp_path, name="d", type="delta")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="logger.kind='tensorboard'"):
        make_tracker("tensorboard", tmp_path, {})
    with pytest.raises(ConfigError, match="logger.mode='cloud'"):
        make_tracker("wandb", tmp_path, {}, mode="cloud")


def test_results_file_is_flat_strict_json_and_reads_back(tmp_path):
    results = {"method": "kfade", "hp": {"eta": 0.01, "n_steps": 2}, "forget_quality": float("nan"),
               "kl_retrain/retain": 0.25}
    path = write_results(tmp_path, results)
    assert path == tmp_path / "results.json"
    expected = {"method": "kfade", "hp/eta": 0.01, "hp/n_steps": 2, "forget_quality": None,
                "kl_retrain/retain": 0.25}
    assert json.loads(path.read_text(), parse_constant=pytest.fail) == expected  # no NaN literal
    assert read_results(tmp_path) == read_results(path) == expected
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left behind
    path.write_text('{"forget_quality": 0.')
    with pytest.raises(ValueError):
        read_results(path)
