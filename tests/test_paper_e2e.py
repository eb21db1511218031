"""Every paper config end to end on tiny random models of its architecture (``paper_models``): ``experiment=paper_*``
with only paths and sizes overridden, through the curvature fit, one direct and one CG K-FADE step (the sweep
scripts' fixed-η job), a first-order baseline, and the evaluation (TOFU metrics against a local retrain model or its
eval logs; lm-eval wmdp_bio / wmdp_cyber / mmlu from local question files)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import run_experiment
from paper_models import STYLES, save_tiny_model, tiny_tokenizer, tofu_dir, tofu_eval_logs, wmdp_dir
from safetensors.torch import load_file

from kfade.data.tofu import load_tofu
from kfade.data.wmdp import load_wmdp
from kfade.suites import tofu, wmdp


@dataclass(frozen=True)
class Paper:
    fixture: str  # conf/fixtures/models/<fixture>/config.json: the architecture
    baseline: tuple[str, ...]  # a first-order baseline of the paper table (with its size overrides)
    retrain: str = "none"  # TOFU: "model" (a retrain checkpoint) or "logs" (its TOFU eval logs)


PAPERS = {
    "paper_tofu_llama2_7b": Paper("locuslab--tofu_ft_llama2-7b", ("method=grad_diff",), retrain="model"),
    "paper_tofu_phi15": Paper("locuslab--tofu_ft_phi-1.5", ("method=npo",), retrain="logs"),
    "paper_wmdp_zephyr": Paper("HuggingFaceH4--zephyr-7b-beta", ("method=rmu", "method.layer=1")),  # 2 layers
    "paper_wmdp_llama3_8b": Paper("meta-llama--Meta-Llama-3-8B-Instruct", ("method=grad_ascent", "method.epochs=1")),
}
# experiments/sweeps/paper_*.sh's K-FADE job at the middle of its η grid
KFADE = ("method=kfade_paper", "method.step_size=5e-3")
SIZES = ("eval.max_new_tokens=4", "progress=false", "logger.mode=disabled")  # W&B's calls without its service
WMDP_TASKS = ("wmdp_bio", "wmdp_cyber", "mmlu")


@pytest.fixture(scope="module")
def local(tmp_path_factory, cache):
    """``local(experiment)``: the path overrides of that paper config (its tiny models and data), built once."""
    root, built = tmp_path_factory.mktemp("paper"), {}

    def paths(experiment: str) -> tuple[str, ...]:
        if experiment not in built:
            paper, where = PAPERS[experiment], root / experiment
            if "tofu" in experiment:
                data = tofu_dir(where / "data")
                sets = tofu.training_sets(load_tofu(str(data), "forget10"))
            else:
                data = wmdp_dir(where / "data")
                sets = wmdp.training_sets(load_wmdp(str(data)))
            tokenizer = tiny_tokenizer(sets.tokenizer_texts, STYLES[paper.fixture])
            model = save_tiny_model(paper.fixture, tokenizer, where / "model", sets.reference_qa,
                                    sets.reference_texts, seed=0)
            overrides = [f"dataset.source={data}", f"model.path={model}"]
            if paper.retrain != "none":
                retrain = save_tiny_model(paper.fixture, tokenizer, where / "retrain", sets.retrain_qa,
                                          sets.retrain_texts, seed=1)
                if paper.retrain == "logs":
                    retrain = tofu_eval_logs(retrain, data, where / "retrain_logs")
                overrides.append(f"model.retrain_path={retrain}")
            built[experiment] = tuple(overrides)
        return built[experiment]

    return paths


def run_paper(local, run_dir: Path, experiment: str, *method: str) -> dict:
    results = run_experiment(run_dir, f"experiment={experiment}", *local(experiment), *SIZES, *method)
    assert json.loads((run_dir / "results.json").read_text()) == json.loads(json.dumps(results))
    return results


def check_scores(experiment: str, results: dict) -> None:
    """The benchmark's headline scores of the unlearned model and of its reference, finite and in range."""
    for prefix in ("", "reference/"):
        if "tofu" in experiment:
            assert 0 <= results[f"{prefix}forget_quality"] <= 1 and 0 <= results[f"{prefix}model_utility"] <= 1
        else:
            for task in WMDP_TASKS:
                assert 0 <= results[f"{prefix}{task}/acc"] <= 1
    assert results["kl_reference/retain"] > 0  # the method changed the model
    if "tofu" in experiment:  # uphill on the forget loss
        assert results["forget/prob"] < results["reference/forget/prob"]
    retrain = PAPERS[experiment].retrain
    assert ("retrain/forget_quality" in results) == (retrain == "model")  # a retrain model is scored too
    assert ("kl_retrain/retain" in results) == (retrain == "model")


def check_delta(run_dir: Path, experiment: str) -> dict:
    """The saved delta: finite, non-zero, with the architecture's shapes (GQA: k_proj narrower than q_proj)."""
    delta = load_file(run_dir / "delta.safetensors")
    assert all(t.isfinite().all() for t in delta.values()) and any(t.abs().sum() > 0 for t in delta.values())
    q, k = (delta.get(f"model.layers.1.self_attn.{p}_proj.weight") for p in "qk")
    if q is not None and k is not None:
        gqa = "llama3" in experiment or "zephyr" in experiment
        assert (k.shape[0] < q.shape[0]) == gqa
    return delta


# One representative run in the default suite, the cheapest to build (WMDP has no retrain model): Llama-3-Instruct
# (GQA, a chat template, a 500k rope base), lm-eval WMDP/MMLU from local files, K-FADE's default solver; the rest
# are slow.
DEFAULT = ("paper_wmdp_llama3_8b", "cg")
KFADE_RUNS = [pytest.param(experiment, solver, marks=[] if (experiment, solver) == DEFAULT else [pytest.mark.slow])
              for experiment in sorted(PAPERS) for solver in ("direct", "cg")]


@pytest.mark.parametrize(("experiment", "solver"), KFADE_RUNS)
def test_paper_config_takes_one_kfade_step_end_to_end(cache, local, tmp_path, experiment, solver):
    results = run_paper(local, tmp_path, experiment, *KFADE, f"method.solver={solver}")
    assert results["method"] == "kfade" and results["hp/solver"] == solver
    assert results["hp/curvature/estimator"] == "ekfac" and results["hp/curvature/fisher"] == "mc"
    assert results["hp/curvature/damping"] == 1e-8 and results["hp/curvature/damping_mode"] == "absolute"
    assert results["hp/fit_sets"] == "retain" and results["time/fit_s"] > 0
    # one step, inside the quadratic regime (not split by the safeguard), not rolled back
    assert results["steps"] == 1 and results["splits"] == 0 and "last_step/rejected" not in results
    assert results["last_step/eta"] == 5e-3 and 0.5 <= results["last_step/kl_ratio"] <= 2
    if solver == "cg":
        assert results["last_step/cg_iters"] >= 1
    check_scores(experiment, results)
    delta = check_delta(tmp_path, experiment)
    if "phi" in experiment:  # Phi's linears have biases: K-FADE moves them too
        assert delta["model.layers.0.mlp.fc1.bias"].abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("experiment", sorted(PAPERS))
def test_paper_config_runs_a_first_order_baseline_end_to_end(cache, local, tmp_path, experiment):
    baseline = PAPERS[experiment].baseline
    results = run_paper(local, tmp_path, experiment, *baseline)
    assert results["method"] == baseline[0].removeprefix("method=")
    assert results["steps"] == results["hp/epochs"] and "last_step/stopped" not in results  # every epoch ran
    check_scores(experiment, results)
    check_delta(tmp_path, experiment)
