"""torchrun support of the entry point: rank > 0 gets no run directory or log files of its own."""

from pathlib import Path

from hydra import compose, initialize_config_dir

from kfade.pipeline.ranks import rank_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_rank_zero_keeps_its_run_directory_and_others_write_nothing(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    assert rank_overrides() == []
    monkeypatch.setenv("RANK", "1")
    overrides = rank_overrides()
    scratch = Path(next(o for o in overrides if o.startswith("hydra.run.dir=")).split("=", 1)[1])
    assert scratch.is_dir() and scratch.name.startswith("kfade-rank-")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.output_subdir is None and cfg.hydra.run.dir == str(scratch)
    assert cfg.hydra.job_logging.get("root", {}).get("handlers", []) == []
