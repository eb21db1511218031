"""Every paper-table config composes, validates and plans its memory against the shipped model config fixtures;
the cluster launcher and Optuna sweeper configs compose; the sweep objective and the paper table."""

import math
from pathlib import Path

import pytest
from conftest import composed
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kfade.curvature import CurvatureConfig
from kfade.data.config import DatasetConfig
from kfade.eval.config import EvalConfig
from kfade.models.config import ModelConfig
from kfade.pipeline import load_config, placement_fields, plan_run, typed
from kfade.plan import MemoryConfig
from kfade.report.objective import ObjectiveConfig, objective_value
from kfade.report.paper_table import paper_table
from kfade.tracking import LoggerConfig, write_results
from kfade.unlearn import METHODS

ROOT = Path(__file__).resolve().parents[1]

KFADE = [("method=kfade", "method.solver=direct"), ("method=kfade", "method.solver=cg")]
TOFU = ([("dataset.forget_split", s) for s in ("forget01", "forget05", "forget10")],
        KFADE + [("method=grad_ascent",), ("method=grad_diff",), ("method=npo",)])
WMDP = ([("dataset.forget_corpora", [c]) for c in ("bio_remove_dataset", "cyber-forget-corpus")],
        KFADE + [("method=rmu",), ("method=grad_ascent",)])
TABLES = {"paper_tofu_llama2_7b": TOFU, "paper_tofu_phi15": TOFU, "paper_wmdp_zephyr": WMDP,
          "paper_wmdp_llama3_8b": WMDP}  # experiment → (settings: the sweep scripts' per-setting overrides, methods)
FIXTURE_OF = {"paper_tofu_llama2_7b": "locuslab--tofu_ft_llama2-7b", "paper_tofu_phi15": "locuslab--tofu_ft_phi-1.5",
              "paper_wmdp_zephyr": "HuggingFaceH4--zephyr-7b-beta",
              "paper_wmdp_llama3_8b": "meta-llama--Meta-Llama-3-8B-Instruct"}


@pytest.mark.parametrize("experiment", sorted(TABLES))
def test_paper_configs_compose_validate_and_plan_offline(experiment):
    settings, methods = TABLES[experiment]
    local = ("dataset.source=/data/wmdp",) if "wmdp" in experiment else ("model.retrain_path=/models/retain90",)
    peaks = {}
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        by_method = {method: compose(config_name="config", overrides=[
            f"experiment={experiment}", *local, *method, "memory.gpu_gb=80", "memory.cpu_gb=512", "dry_run=true"])
            for method in methods}
    configs = {}
    for method, base in by_method.items():
        for key, value in settings:  # composing once per method: the settings are plain value overrides
            cfg = base.copy()
            OmegaConf.update(cfg, key, value)
            configs[(key, str(value), method)] = cfg
    for setting, cfg in configs.items():
        for key, schema in (("model", ModelConfig), ("dataset", DatasetConfig), ("eval", EvalConfig),
                            ("logger", LoggerConfig), ("memory", MemoryConfig), ("objective", ObjectiveConfig)):
            typed(cfg[key], schema, key)
        assert isinstance(typed(cfg.method, METHODS[cfg.method.name][0], "method"), METHODS[cfg.method.name][0])
        assert typed(cfg.curvature, CurvatureConfig, "curvature").estimator == "ekfac"
        info = plan_run(load_config(cfg))  # the model's config from the shipped fixture (a dry run: no preflight)
        assert info["source"].endswith(FIXTURE_OF[experiment]) and info["plan"].peak("device") > 0
        peaks[setting] = info["plan"].peak("device")
    if "wmdp" in experiment:
        assert cfg.eval.lm_eval_tasks == ["wmdp_bio", "wmdp_cyber", "mmlu"] and cfg.dataset.fit_sets == ["retain"]
    assert len(set(peaks.values())) > 1  # K-FADE CG, direct and the baselines plan differently


def test_submitit_launcher_and_optuna_sweeper_configs_compose():
    cfg = composed("hydra/launcher=slurm_gpu", "hydra/sweeper=eta_lambda", hydra=True)
    launcher, sweeper = cfg.hydra.launcher, cfg.hydra.sweeper
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher") and launcher.gpus_per_node == 1
    assert launcher.timeout_min > 0 and "partition" in launcher
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert set(sweeper.params) == {"method.solver", "method.forget_loss", "method.step_rule", "method.step_size",
                                   "method.cg_damping"}
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"


def test_objective_is_the_metric_when_feasible_else_penalised():
    cfg = ObjectiveConfig(metric="kl_reference/retain", constraint="forget/prob", max=0.38, penalty=1000.0)
    assert objective_value({"kl_reference/retain": 0.02, "forget/prob": 0.3}, cfg) == 0.02
    infeasible = objective_value({"kl_reference/retain": 0.02, "forget/prob": 0.5}, cfg)
    assert infeasible == pytest.approx(1000.12) and infeasible > 999  # behind every feasible trial
    assert objective_value({"kl_reference/retain": 0.02, "forget/prob": 0.9}, cfg) > infeasible  # farther: worse
    assert objective_value({"kl_reference/retain": math.nan, "forget/prob": 0.1}, cfg) == 2000.0
    assert objective_value({"forget/prob": 0.1}, cfg) == 2000.0
    unconstrained = ObjectiveConfig(constraint=None)
    assert objective_value({"kl_reference/retain": 0.5, "forget/prob": 0.99}, unconstrained) == 0.5


def _job(root: Path, name: str, **results) -> None:
    (root / name).mkdir(parents=True)
    write_results(root / name, results)


def test_paper_table_selects_one_run_per_variant_and_setting(tmp_path):
    hp = {"hp/curvature/estimator": "ekfac", "hp/solver": "direct", "hp/n_steps": 1}
    for split, best in (("forget01", 0.4), ("forget05", 0.2)):
        ref = {"retrain/forget_quality": 1.0, "retrain/model_utility": 0.62, "reference/forget_quality": 1e-5,
               "reference/model_utility": 0.63}
        _job(tmp_path / split, "kfade-0", method="kfade", forget_quality=0.01, model_utility=0.6, **hp, **ref)
        _job(tmp_path / split, "kfade-1", method="kfade", forget_quality=best, model_utility=0.5, **hp, **ref)
        _job(tmp_path / split, "ga-0", method="grad_ascent", forget_quality=0.1, model_utility=math.nan, **ref)
    table = paper_table(tmp_path, "tofu").splitlines()
    assert table[0] == ("| method | forget01 forget_quality | forget01 model_utility | forget05 forget_quality | "
                        "forget05 model_utility |")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table[2:]}
    assert list(rows) == ["retrain", "reference", "grad_ascent", "kfade/ekfac/direct"]
    assert rows["kfade/ekfac/direct"] == "| kfade/ekfac/direct | 0.4 | 0.5 | 0.2 | 0.5 |"
    assert rows["retrain"] == "| retrain | 1 | 0.62 | 1 | 0.62 |"


def test_wmdp_paper_table_keeps_mmlu_within_the_drop(tmp_path):
    ref = {"reference/mmlu/acc": 0.58, "reference/wmdp_bio/acc": 0.64, "reference/wmdp_cyber/acc": 0.44}
    _job(tmp_path / "bio", "rmu-0", method="rmu", **{"wmdp_bio/acc": 0.26, "wmdp_cyber/acc": 0.4, "mmlu/acc": 0.4},
         **ref)  # forgets most but loses MMLU: not selected
    _job(tmp_path / "bio", "rmu-1", method="rmu", **{"wmdp_bio/acc": 0.31, "wmdp_cyber/acc": 0.41, "mmlu/acc": 0.57},
         **ref)
    rows = paper_table(tmp_path, "wmdp").splitlines()
    assert rows[0] == "| method | bio wmdp_bio | bio wmdp_cyber | bio mmlu |"
    assert "| rmu | 0.31 | 0.41 | 0.57 |" in rows and "| reference | 0.64 | 0.44 | 0.58 |" in rows


def test_placement_fields_are_the_curvature_config_fields_the_plan_chose():
    paper = ("dry_run=true", "experiment=paper_tofu_llama2_7b", "model.retrain_path=/models/retain90", "method=kfade")
    cfg = composed(*paper, "method.solver=direct", "memory.gpu_gb=141", "memory.cpu_gb=512")
    fields = placement_fields(load_config(cfg))
    assert fields == {"factor_dtype": "float32", "offload": "cpu", "offload_dir": None, "layer_groups": 2,
                      "checkpoint_every": None}
    forced = composed(*paper, "memory.gpu_gb=141", "memory.offload=disk", "memory.layer_groups=2",
                      "memory.offload_dir=/scratch")
    assert placement_fields(load_config(forced)) == {"factor_dtype": "float32", "offload": "disk",
                                                     "offload_dir": "/scratch", "layer_groups": 2,
                                                     "checkpoint_every": None}
