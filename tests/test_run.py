"""The entry point end to end on a miniature recipe: results keys, caching, the delta, and one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, file_digests, run_experiment

from kfade.data.general_text import GeneralText
from kfade.errors import ConfigError
from kfade.pipeline import job

# A model small and briefly trained enough for seconds-long runs; only the plumbing is under test here.
FAST = ["model.spec.hidden_size=32", "model.spec.intermediate_size=64", "model.spec.num_hidden_layers=1",
        "model.spec.num_attention_heads=2", "model.spec.num_key_value_heads=2", "model.recipe.max_epochs=2",
        "model.vocab_size=400", "eval.max_new_tokens=4", "logger=none", "progress=false"]


def run_in_process(run_dir: Path, *overrides: str) -> dict:
    return run_experiment(run_dir, *FAST, *overrides)


def test_baseline_run_scores_reference_and_retrain_and_caches_them(cache, tmp_path):
    results = run_in_process(tmp_path / "a", "method=none", "noise_floor=true")
    on_disk = json.loads((tmp_path / "a" / "results.json").read_text())
    assert on_disk["method"] == "none"
    assert on_disk["retrain/forget_quality"] == 1.0 and on_disk["retrain/kl_retrain/forget"] == 0.0
    for prefix in ("reference", "noise_floor"):
        assert 0.0 <= on_disk[f"{prefix}/forget_quality"] <= 1.0
        assert on_disk[f"{prefix}/kl_retrain/retain"] > 0.0
        assert on_disk[f"{prefix}/train_epochs"] == 2
    assert set(results) == set(on_disk)
    models = sorted(p.name for p in (cache / "models").iterdir())
    assert len(models) == 3  # reference, retrain, and the noise-floor retrain (another seed)
    again = run_in_process(tmp_path / "b", "method=none", "noise_floor=true")
    assert sorted(p.name for p in (cache / "models").iterdir()) == models  # nothing retrained
    assert {k: v for k, v in again.items() if not k.startswith("time/")} == \
        {k: v for k, v in results.items() if not k.startswith("time/")}


def test_kfade_run_saves_a_delta_scores_it_and_a_sweep_reuses_one_curvature_fit(cache, tmp_path):
    results = run_in_process(tmp_path / "a", "method=kfade_cg", "method.n_steps=2", "method.cg_iters=2",
                             "method.target_forget_prob=0.01")  # the 2-epoch test model starts near 0.02
    assert results["method"] == "kfade" and results["hp/solver"] == "cg" and results["hp/n_steps"] == 2
    assert results["hp/curvature/estimator"] == "ekfac" and results["time/fit_s"] > 0
    for key in ("forget_quality", "model_utility", "kl_retrain/retain", "kl_retrain/forget", "kl_reference/retain",
                "last_step/retain_kl"):
        assert key in results
    assert results["last_step/cg_iters"] == 2 and results["last_step/forget_evals"] >= 1
    assert results["forget/prob"] == pytest.approx(0.01, rel=0.01)  # the scored P̄ is the one the step rule matched
    assert results["last_step/retain_kl"] == pytest.approx(results["kl_reference/retain"], rel=1e-4)  # same probe
    assert (tmp_path / "a" / "delta.safetensors").is_file()
    assert (tmp_path / "a" / "tofu_logs" / "eval_log_forget.json").is_file()
    fits = sorted(p.name for p in (cache / "curvature").iterdir())
    assert len(fits) == 1
    other = run_in_process(tmp_path / "b", "method=kfade", "method.n_steps=1", "method.cg_iters=1",
                           "method.cg_damping=1.0", "curvature.damping=1.0")
    assert sorted(p.name for p in (cache / "curvature").iterdir()) == fits  # λ, δ, target sweeps: no refit
    assert other["hp/curvature/damping"] == 1.0 and other["hp/cg_damping"] == 1.0
    run_in_process(tmp_path / "c", "method=kfade", "curvature=kfac", "method.solver=direct", "method.n_steps=1")
    assert len(list((cache / "curvature").iterdir())) == 2  # another estimator: one more fit


def test_mini_wmdp_run_scores_lm_eval_tasks_for_every_model(cache, tmp_path):
    results = run_in_process(tmp_path, "experiment=mini_wmdp", "method=none", "eval.lm_eval_limit=8")
    for prefix in ("reference", "retrain"):
        for task in ("mini_wmdp", "mini_mmlu"):
            assert 0.0 <= results[f"{prefix}/{task}/acc"] <= 1.0
    assert results["retrain/kl_retrain/retain"] == 0.0 and results["reference/kl_retrain/forget"] > 0.0


@pytest.mark.parametrize(("override", "key"), [
    ("dataset.forget_split=forget42", "dataset.forget_split"),
    ("dataset.source=/no/such/dir", "dataset.source"),
    ("model.path=/no/such/model", "model.path"),
    ("dataset.batch_size=many", "dataset.batch_size"),
    ("dataset.fit_sets=[forget]", "dataset.fit_sets"),
])
def test_bad_input_is_a_config_error_naming_the_key(cache, tmp_path, override, key):
    method = "method=kfade" if "fit_sets" in override else "method=none"
    with pytest.raises(ConfigError) as err:
        run_in_process(tmp_path, method, override)
    assert str(err.value).startswith(key)


@pytest.mark.slow  # a CLI process (~10 s); the one-line CLI path runs in test_bad_inputs
def test_cli_prints_one_line_and_exits_2_on_bad_input(cache, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), *FAST, "method=none",
                           "model.path=/no/such/model", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: model.path='/no/such/model': no such local path, and not a "
                                                "Hub id of the form org/name"]


def test_header_first_and_the_reapply_rows_in_the_table(cache, tmp_path, capsys):
    run_in_process(tmp_path, "experiment=mini_tofu_reapply", "method.solver=direct", "method.n_steps=1",
                   "reapply.epochs=1")
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first.startswith("run: model=tiny_llama (tiny, trained here, ") and "method=kfade (solver=direct" in first
    tables = [[line.split(" | ")[0] for line in block.splitlines() if line.startswith("| ")][1:]
              for block in out.split("\n\n") if block.startswith("| model")]
    assert tables[0] == ["| reference", "| retrain", "| unlearned", "| reapply/finetuned", "| reapply/finetuned+delta"]
    assert tables[1] == ["| reference", "| retrain", "| unlearned"]  # its audit (relearn), without the reapply rows


def test_runs_never_write_the_source_model_or_the_cached_models(cache, tmp_path, monkeypatch):
    run_in_process(tmp_path / "a", "method=none")  # the tiny pair, trained once into the cache
    models = cache / "models"
    reference = next(p for p in models.iterdir() if "-reference-" in p.name)
    retrain = next(p for p in models.iterdir() if "-retrain-" in p.name)
    before = file_digests(models)
    given = [f"model.path={reference}", f"model.retrain_path={retrain}", "method=grad_ascent", "method.epochs=1"]
    run_in_process(tmp_path / "b", *given)  # the cached reference as a user's source model
    assert (tmp_path / "b" / "results.json").is_file() and file_digests(models) == before

    def fail(*_):
        raise RuntimeError("killed mid-run")

    monkeypatch.setattr(job, "unlearn", fail)  # a run that dies after its models are loaded
    with pytest.raises(RuntimeError):
        run_in_process(tmp_path / "c", *given)
    assert file_digests(models) == before
    assert not (tmp_path / "c" / "results.json").exists() and not (tmp_path / "c" / "delta.safetensors").exists()


SMALL_GENERAL = GeneralText("python_docs", train=[
    "The quick brown fox jumps over the lazy dog while the cat sleeps by the fire.",
    "Paris is the capital of France, and Canberra is the capital of Australia.",
    "A list is a mutable sequence; a tuple is an immutable one.",
    "Return the number of items in a container, or raise an error if it has no length."] * 4,
    heldout=["The module provides functions for working with text.", "Rivers flow to the sea."])


def test_pretrained_regime_finetunes_one_base_and_scores_general_text(cache, tmp_path, monkeypatch):
    monkeypatch.setattr("kfade.suites.tofu.load_general_text", lambda name: SMALL_GENERAL)
    results = run_in_process(tmp_path, "experiment=mini_tofu_pretrained", "model.pretrain.max_epochs=1",
                             "method=kfade", "method.solver=direct", "method.n_steps=1", "curvature=kfac",
                             "method.step_rule=normalized", "method.step_size=0.5", "dataset.fit_sets=[retain,general]")
    assert len(list((cache / "models").glob("mini_tofu-base-*"))) == 1
    assert results["reference/kl_reference/general"] == 0.0 and results["retrain/kl_reference/general"] > 0.0
    assert results["kl_reference/general"] > 0.0 and results["general/ppl"] > 1.0
    assert results["reference/general/ppl"] != results["general/ppl"]


def test_kl_base_descends_towards_the_pretrained_base_and_needs_one(cache, tmp_path, monkeypatch):
    monkeypatch.setattr("kfade.suites.tofu.load_general_text", lambda name: SMALL_GENERAL)
    results = run_in_process(tmp_path, "experiment=mini_tofu_pretrained", "model.pretrain.max_epochs=1",
                             "method=kfade", "method.solver=direct", "method.n_steps=1", "curvature=kfac",
                             "method.forget_loss=kl_base", "method.step_rule=normalized", "method.step_size=0.5",
                             "method.retain_weight=0")  # the objective alone (an untrained model's retain NLL is big)
    assert results["hp/forget_loss"] == "kl_base" and results["forget/prob"] < results["reference/forget/prob"]
    with pytest.raises(ConfigError, match="model.base_path=None: method.forget_loss=kl_base needs a model"):
        run_in_process(tmp_path / "scratch", "method=kfade", "method.forget_loss=kl_base")


def test_general_fit_set_needs_a_general_corpus(cache, tmp_path):
    with pytest.raises(ConfigError, match="dataset.fit_sets='general': needs a general corpus"):
        run_in_process(tmp_path, "method=kfade", "dataset.fit_sets=[retain,general]")
