"""Bad input through the real entry points fails early and clearly, or is recovered from where that is the contract.

Each case: a ``ConfigError`` (the CLI: ``error: key=value: reason`` on one line of stderr, exit code 2, no
traceback) that names the key and the value, raised by the same ``kfade.pipeline.load_config`` that
``experiments/run.py`` calls before any data is built or model trained (the cache starts cold and holds no model
afterwards), and every file that existed before is intact afterwards.
"""

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import file_digests, make_tiny_llama
from hydra import compose, initialize_config_dir
from safetensors.torch import save_file
from test_unlearn_kfade import qa_data

from kfade.curvature import CurvatureConfig
from kfade.data.files import materialise
from kfade.data.tofu import load_tofu, mini_tofu_dir
from kfade.errors import ConfigError
from kfade.models.mini import mini_tokenizer, trained_tiny_model
from kfade.models.tiny import TinyLlamaSpec
from kfade.models.train import TrainRecipe
from kfade.pipeline import load_config, run
from kfade.unlearn import build_method
from kfade.unlearn.delta import apply_delta, load_delta, save_delta

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "experiments" / "report.py"


def report_main(argv: list[str]) -> int:
    """``experiments/report.py argv…`` in this process; its exit code."""
    return runpy.run_path(str(REPORT))["main"](argv)


def intact(before: dict[str, str], *roots: Path) -> bool:
    """Every file of ``before`` still there with the same bytes (new files are allowed)."""
    after = file_digests(*roots)
    return all(after.get(path) == digest for path, digest in before.items())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A cold cache and local inputs: a TOFU copy (and broken variants), a model dir without config.json, a dir
    that is neither a model nor eval logs."""
    root = tmp_path_factory.mktemp("bad-inputs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KFADE_CACHE", str(root / "cache"))
        tofu = root / "tofu"
        shutil.copytree(mini_tofu_dir(), tofu, ignore=shutil.ignore_patterns("checksums.json"))
        for name, change in (("tofu_missing", "full.json"), ("tofu_empty", "retain90.json")):
            shutil.copytree(tofu, root / name)
            (root / name / change).unlink()
        (root / "tofu_empty" / "retain90.json").write_text("")
        (root / "no_config").mkdir()
        (root / "no_config" / "tokenizer.json").write_text("{}")
        (root / "neither").mkdir()
        (root / "neither" / "weights.bin").write_bytes(b"\0" * 8)
        yield root


NO_SUCH_GPU = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
CONFIG_CASES = [  # (overrides, key, value as printed)
    (["dataset.batch_size=0"], "dataset.batch_size", "0"),
    (["dataset.batch_size=-4"], "dataset.batch_size", "-4"),
    (["dataset.batch_size=many"], "dataset.batch_size", "'many'"),
    (["dataset.max_length=1"], "dataset.max_length", "1"),
    (["dataset.forget_split=forget42"], "dataset.forget_split", "'forget42'"),
    (["dataset.fit_sets=[forget]"], "dataset.fit_sets", "'forget'"),
    (["dataset.fit_sets=[]"], "dataset.fit_sets", "[]"),
    (["dataset.name=imagenet"], "dataset.name", "'imagenet'"),
    (["dataset.source=/no/such/dir"], "dataset.source", "'/no/such/dir'"),
    (["dataset.source={root}/tofu_missing"], "dataset.source", "tofu_missing"),  # a split file missing
    (["dataset.source={root}/tofu_empty"], "dataset.source", "tofu_empty"),  # an empty split file
    (["experiment=mini_wmdp", "dataset.fit_sets=[retain,forget]"], "dataset.fit_sets", "['retain', 'forget']"),
    (["dataset.general=wiki"], "dataset.general", "'wiki'"),
    (["dataset.fit_sets=[retain,general]"], "dataset.fit_sets", "'general'"),  # no general corpus to fit on
    (["experiment=mini_tofu_pretrained", "dataset.general=null"], "model.pretrain", "'set'"),
    (["model.recipe.replay=64"], "model.recipe.replay", "64"),  # rehearsal without a pretrained base
    (["experiment=mini_tofu_pretrained", "model.recipe.replay=-1"], "model.recipe.replay", "-1"),
    (["experiment=mini_tofu_pretrained", "+model.pretrain.replay=8"], "model.pretrain.replay", "8"),
    (["experiment=mini_wmdp", "+dataset.general=python_docs"], "dataset.general", "'python_docs'"),
    (["curvature.damping=nan"], "curvature.damping", "nan"),
    (["curvature.damping=-1"], "curvature.damping", "-1.0"),
    (["curvature.damping=inf"], "curvature.damping", "inf"),
    (["curvature.mc_samples=0"], "curvature.mc_samples", "0"),
    (["curvature.estimator=shampoo"], "curvature.estimator", "'shampoo'"),
    (["curvature.modules='(unclosed'"], "curvature.modules", "'(unclosed'"),
    (["method.step_size=0"], "method.step_size", "0.0"),
    (["method.target_forget_prob=1.0"], "method.target_forget_prob", "1.0"),
    (["method.target_forget_prob=nan"], "method.target_forget_prob", "nan"),
    (["method.n_steps=0"], "method.n_steps", "0"),
    (["method.solver=newton"], "method.solver", "'newton'"),
    (["method.cg_dtype=float16"], "method.cg_dtype", "'float16'"),
    (["method.cg_offload=disk"], "method.cg_offload", "'disk'"),
    (["method=grad_ascent", "method.lr=-1e-5"], "method.lr", "-1e-05"),
    (["method.name=sgd"], "method.name", "'sgd'"),
    ([f"model.device={NO_SUCH_GPU}"], "model.device", f"'{NO_SUCH_GPU}'"),
    (["model.device=tpu"], "model.device", "'tpu'"),
    (["model.dtype=float8"], "model.dtype", "'float8'"),
    (["model.path=/no/such/model"], "model.path", "'/no/such/model'"),
    (["model=hf", "model.path=nobody/no-such-model"], "model.path", "'nobody/no-such-model'"),  # offline, uncached
    (["model.path={root}/no_config"], "model.path", "no_config"),
    (["model.retrain_path={root}/neither"], "model.retrain_path", "neither"),
    (["model.vocab_size=10"], "model.vocab_size", "10"),
    (["model.spec.num_attention_heads=3"], "model.spec.num_attention_heads", "3"),
    (["model.recipe.lr=nan"], "model.recipe.lr", "nan"),
    (["model.recipe.max_epochs=0"], "model.recipe.max_epochs", "0"),
    (["eval.metrics=[prob,bleu]"], "eval.metrics", "'bleu'"),
    (["eval.batch_size=0"], "eval.batch_size", "0"),
    (["eval.lm_eval_limit=0"], "eval.lm_eval_limit", "0"),
    (["eval.lm_eval_tasks=[mini_wmdp]", "eval.lm_eval_data_dir=/no/such/dir"], "eval.lm_eval_data_dir", "/no/such"),
    (["experiment=mini_wmdp", "eval.lm_eval_tasks=[nonexistent]"], "eval.lm_eval_tasks", "'nonexistent'"),
    (["logger.kind=tensorboard"], "logger.kind", "'tensorboard'"),
    (["logger=wandb", "logger.mode=sometimes"], "logger.mode", "'sometimes'"),
    (["seed=abc"], "seed", "'abc'"),
    (["progress=maybe"], "progress", "'maybe'"),
    (["reapply.epochs=-1"], "reapply.epochs", "-1"),
    (["reapply.lr=nan"], "reapply.lr", "nan"),
    (["eval.audits=[relearn,bogus]"], "eval.audits", "'bogus'"),
    (["eval.audits=[quantize,quantize]"], "eval.audits", "'quantize'"),
    (["experiment=mini_wmdp", "eval.audits=[relearn,mia]"], "eval.audits", "'mia'"),  # TOFU only
    (["eval.relearn.steps=0"], "eval.relearn.steps", "0"),
    (["eval.quantize.bits=[3]"], "eval.quantize.bits", "3"),
    (["eval.mia.k=0"], "eval.mia.k", "0.0"),
]


@pytest.mark.parametrize("overrides", [[], ["experiment=mini_wmdp"], ["experiment=mini_tofu_reapply"],
                                       ["dataset.source={root}/tofu", "method=grad_ascent", "model.device=cpu"]])
def test_good_configs_pass_the_same_checks(inputs, overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[o.replace("{root}", str(inputs)) for o in overrides])
    checked = load_config(cfg)  # not a wall that stops everything: the shipped experiments pass
    assert checked.model.device in ("cpu", "cuda") and checked.method is not None
    assert not (inputs / "cache" / "models").exists()


@pytest.mark.parametrize(("overrides", "key", "value"), CONFIG_CASES, ids=[" ".join(c[0]) for c in CONFIG_CASES])
def test_bad_config_is_one_line_naming_key_and_value_before_any_work(inputs, overrides, key, value):
    before = file_digests(inputs)
    overrides = [o.replace("{root}", str(inputs)) for o in overrides]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    message = f"error: {err.value}"
    assert err.value.key == key and "\n" not in message
    assert message.startswith(f"error: {key}=") and value in message.split(": ", 2)[1]
    assert not (inputs / "cache" / "models").exists()  # nothing was trained
    assert intact(before, inputs)


def test_cli_exits_2_with_one_line_and_no_traceback(tmp_path):
    """The issue's ``range()`` traceback, through the real CLI (``model.device=cuda``: ``test_run_names``)."""
    proc = subprocess.run([sys.executable, "experiments/run.py", "dataset.batch_size=0", f"hydra.run.dir={tmp_path}"],
                          cwd=ROOT, env={**os.environ, "KFADE_CACHE": str(tmp_path / "cache")}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: dataset.batch_size=0: must be a finite number >= 1"]
    assert not (tmp_path / "cache" / "models").exists()


def test_a_finished_run_dir_is_never_overwritten(inputs, tmp_path):
    (tmp_path / "results.json").write_text('{"method": "kfade"}\n')
    before = file_digests(tmp_path)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["method=none", "logger=none"])
    with pytest.raises(ConfigError, match="holds a finished run") as err:
        run(load_config(cfg), tmp_path)
    assert err.value.key == "run_dir" and file_digests(tmp_path) == before


def test_report_on_truncated_results_and_logs(tmp_path, capsys):
    good, broken = tmp_path / "sweep" / "0", tmp_path / "sweep" / "1"
    for job in (good, broken):
        job.mkdir(parents=True)
    (good / "results.json").write_text(json.dumps({"method": "grad_ascent", "forget/prob": 0.5}))
    (broken / "results.json").write_text('{"method": "kfa')  # truncated: listed, not used
    before = file_digests(tmp_path)
    assert report_main([str(tmp_path / "sweep")]) == 0
    assert "- 1: broken results.json" in capsys.readouterr().out
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "eval_log_forget.json").write_text('{"avg_paraphrased_loss": {"0": 1.')  # truncated
    assert report_main(["--tofu-logs", str(logs), "--retain-logs", str(logs)]) == 2
    assert capsys.readouterr().err.startswith(f"error: report.tofu_logs='{logs}': unreadable TOFU eval log")
    assert intact(before, tmp_path)


def test_unreachable_hub_dataset(inputs):
    with pytest.raises(ConfigError, match="cannot read config 'forget10' of nobody/no-such-tofu") as err:
        load_tofu("nobody/no-such-tofu", "forget10")  # HF_HUB_OFFLINE (conftest): nothing is reachable
    assert "\n" not in str(err.value)


def test_overlapping_forget_and_retain_splits(inputs, tmp_path):
    source = tmp_path / "tofu"
    shutil.copytree(inputs / "tofu", source)
    forget = (source / "forget10.json").read_text().splitlines()
    (source / "retain90.json").write_text("\n".join([forget[0], *(source / "retain90.json").read_text().splitlines()]))
    with pytest.raises(ConfigError, match="1 questions are in both forget10 and retain90") as err:
        load_tofu(str(source), "forget10")
    assert err.value.key == "dataset.forget_split"


def test_truncated_foreign_and_mismatched_deltas(tmp_path, tokenizer):
    model = make_tiny_llama(tokenizer)
    name, param = next(iter(model.named_parameters()))
    path = tmp_path / "delta.safetensors"
    save_delta(path, {name: torch.ones_like(param, dtype=torch.float64)}, {"method": "x", "base_fingerprint": "y"})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ConfigError, match="not a safetensors file"):
        load_delta(truncated)
    save_file({name: torch.ones(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ConfigError, match="not an unlearning delta"):
        load_delta(tmp_path / "foreign.safetensors")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match="shape does not match") as err:
        apply_delta(model, {name: torch.ones(3, 3, dtype=torch.float64)})
    assert err.value.key == f"delta.{name}"
    with pytest.raises(ConfigError, match="no parameter of this name"):
        apply_delta(model, {"lm_head.nope": torch.ones(1)})
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # checked before any write


def test_tampered_cached_data_and_model_are_rebuilt_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("KFADE_CACHE", str(tmp_path))

    def write(directory, seed):
        directory.mkdir()
        (directory / "rows.json").write_text(json.dumps(list(range(seed, seed + 50))))

    data = materialise("toy", write, [], seed=3)
    original = (data / "rows.json").read_bytes()
    (data / "rows.json").write_bytes(original[:20])  # truncated
    with pytest.warns(UserWarning, match="rows.json does not match its checksum"):
        assert materialise("toy", write, [], seed=3) == data
    assert (data / "rows.json").read_bytes() == original
    rows = [{"question": f"Q{i}?", "answer": f"A{i}."} for i in range(4)]
    tokenizer_dir = mini_tokenizer([r["question"] + r["answer"] for r in rows], 270)
    spec = TinyLlamaSpec(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=32)
    recipe = TrainRecipe(max_epochs=1, batch_size=4, warmup_steps=1)
    model_dir = trained_tiny_model("toy", tokenizer_dir, rows, [], spec, recipe, progress=False)
    weights = (model_dir / "model.safetensors").read_bytes()
    (model_dir / "model.safetensors").write_bytes(weights[:-64])
    with pytest.warns(UserWarning, match="cached model .* model.safetensors does not match"):
        assert trained_tiny_model("toy", tokenizer_dir, rows, [], spec, recipe, progress=False) == model_dir
    assert (model_dir / "model.safetensors").read_bytes() == weights  # retrained, bit-identical (same seed)


def test_non_finite_weights_stop_the_step_and_name_the_layer(tokenizer, tmp_path):
    model = make_tiny_llama(tokenizer)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = build_method("kfade", {"solver": "direct", "step_rule": "fixed", "n_steps": 2},
                          curvature=CurvatureConfig(estimator="identity"), cache_root=tmp_path)
    with pytest.warns(UserWarning, match="non-finite forget gradient in model.layers.0"):
        history = method.run(model, qa_data(tokenizer))
    assert history[-1]["rejected"].startswith("non-finite forget gradient in model.layers.0.")
    assert all(torch.equal(p, before[n]) or p.isnan().any() for n, p in model.named_parameters())
    assert all(torch.equal(p.nan_to_num(), before[n].nan_to_num()) for n, p in model.named_parameters())


def test_clamped_eigenvalues_are_counted_and_logged(tokenizer, tmp_path, caplog):
    data = qa_data(tokenizer)
    data.fit = [{k: v[:1] for k, v in data.fit[0].items()}]  # one sequence: rank-deficient factors, whose
    # zero eigenvalues come out of eigh as ±rounding error
    method = build_method("kfade", {"solver": "direct", "step_rule": "fixed", "n_steps": 1},
                          curvature=CurvatureConfig(estimator="kfac", fisher="empirical"), cache_root=tmp_path)
    with caplog.at_level("INFO", logger="kfade.curvature.passes"):
        history = method.run(make_tiny_llama(tokenizer), data)
    assert history[0]["zero_eigenvalues"] > 0 and "clamped to 0" in caplog.text


def test_nothing_is_unpickled():
    """Weights, deltas, factors and checkpoints are safetensors, the rest JSON: no pickle, no torch.load."""
    sources = [p for d in ("kfade", "experiments", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    found = [f"{p.relative_to(ROOT)}: {word}" for p in sources for word in ("torch.load(", "import pickle", "pickle.")
             if word in p.read_text()]
    assert len(sources) > 50 and found == []
