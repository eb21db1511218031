"""Hydra entry point: data → models → (curvature →) unlearning → evaluation → tracking.

    python experiments/run.py                                   # experiment=mini_tofu: K-FADE (EK-FAC) on mini-TOFU
    python experiments/run.py method=grad_ascent                # a baseline, same data and evaluation
    python experiments/run.py method=none noise_floor=true      # only the reference / retrain models
    python experiments/run.py -m method.step_size=0.01,0.02 curvature.damping=0.01,0.1   # a sweep (one curvature fit)

Every run writes ``results.json`` (flat keys) in its run directory; bad config is one line on stderr, exit 2.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from pathlib import Path

import datasets
import hydra
import transformers
from dry_run import planned_curvature, print_plan
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from ranks import rank_overrides, start
from run_names import run_name
from schema import DatasetConfig, EvalConfig, LoggerConfig, ModelConfig, RunOptions, typed

from kfade import distributed
from kfade.cache import cache_dir
from kfade.curvature import CurvatureConfig, model_fingerprint
from kfade.data.formatting import pad_id
from kfade.errors import ConfigError
from kfade.eval.audits import HEADLINE_KEYS as AUDIT_KEYS
from kfade.eval.audits import PRIVLEAK_KEY, run_audits, with_privleak
from kfade.models.train import TrainRecipe, train_causal_lm
from kfade.preflight import check_run
from kfade.report.objective import ObjectiveConfig, objective_from_run
from kfade.suites import build_suite
from kfade.tracking import make_tracker, require_unfinished, write_results
from kfade.unlearn import METHODS, apply_delta, build_method, compute_delta, save_delta


def print_table(results: dict, rows: list[str], keys: list[str]) -> None:
    """The headline metrics, one row per model (``reference``, ``retrain``, …, and the ``unlearned`` one)."""
    print("\n| model | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 1))
    for row in rows:
        prefix = "" if row == "unlearned" else f"{row}/"
        cells = [results.get(prefix + k) for k in keys]
        print(f"| {row} | " + " | ".join("—" if c is None else f"{c:.4g}" for c in cells) + " |")


def hyperparameters(method_cfg, curvature: CurvatureConfig | None, fit_sets: list[str]) -> dict:
    hp = {f"hp/{k}": v for k, v in vars(method_cfg).items() if k != "name"}
    if curvature is not None:
        hp |= {f"hp/curvature/{k}": v for k, v in vars(curvature).items()} | {"hp/fit_sets": ",".join(fit_sets)}
    return hp


OmegaConf.register_new_resolver("run_name", run_name, replace=True)  # used by conf/config.yaml's run dir


def method_knobs(method: DictConfig) -> str:
    """The method settings a reader checks first (those of its step rule and solver only)."""
    rule = method.get("step_rule")
    shown = {"solver": True, "step_rule": True, "target_forget_prob": rule == "target_forget",
             "kl_budget": rule == "trust_region", "step_size": rule in ("fixed", "normalized"), "n_steps": True,
             "cg_iters": method.get("solver") == "cg", "lr": True, "epochs": True}
    return ", ".join(f"{k}={method[k]}" for k, show in shown.items() if show and k in method)


def header(cfg: DictConfig, model_cfg: ModelConfig, dataset_cfg: DatasetConfig, run_dir: Path) -> str:
    """The run's resolved choices in two lines: what a user checks first when a sweep looks wrong."""
    choices = HydraConfig.get().runtime.choices
    parts = [f"model={choices.get('model')} ({model_cfg.path or 'tiny, trained here'}, {model_cfg.device}, "
             f"{model_cfg.dtype})",
             f"dataset={choices.get('dataset')} ({dataset_cfg.source}, {dataset_cfg.forget_split})"]
    if cfg.method.name == "kfade":
        parts.append(f"curvature={choices.get('curvature')} ({cfg.curvature.damping_mode} damping "
                     f"{cfg.curvature.damping})")
    knobs = method_knobs(cfg.method)
    parts += [f"method={choices.get('method')}" + (f" ({knobs})" if knobs else ""),
              f"eval={choices.get('eval')}", f"logger={choices.get('logger')}"]
    return "run: " + " · ".join(parts) + f"\ndir: {run_dir}"


@dataclasses.dataclass
class Checked:
    """A run's configs, typed, range-checked and checked against the machine and the disk (:func:`validated`)."""

    model: ModelConfig  # device and dtype resolved for this machine
    dataset: DatasetConfig
    eval: EvalConfig
    logger: LoggerConfig
    options: RunOptions  # progress resolved: bars only where a person watches them (stderr is a terminal)
    method: object | None  # the configured method; None for method=none
    notices: list[str]  # what was resolved differently from what was asked (e.g. device=auto → cpu)


def validated(cfg: DictConfig) -> Checked:
    """Every config of the run typed and validated, then checked against the machine and the disk
    (``kfade.preflight``) — before any data is built or model loaded. The first problem raises ConfigError."""
    options = typed(OmegaConf.masked_copy(cfg, [f.name for f in dataclasses.fields(RunOptions)]), RunOptions, "")
    options.progress = options.progress and sys.stderr.isatty() and distributed.is_main()
    model_cfg = typed(cfg.model, ModelConfig, "model")
    dataset_cfg = typed(cfg.dataset, DatasetConfig, "dataset")
    eval_cfg = typed(cfg.eval, EvalConfig, "eval")
    logger_cfg = typed(cfg.logger, LoggerConfig, "logger")
    method_name = cfg.method.name
    if method_name != "none" and method_name not in METHODS:
        raise ConfigError("method.name", method_name, f"unknown method; choose one of {sorted(METHODS)} or none")
    method = None if method_name == "none" else configured_method(cfg, options.progress)
    if options.dry_run:  # the plan reads the model's config only: no device, path or data checks
        return Checked(model_cfg, dataset_cfg, eval_cfg, logger_cfg, options, method, [])
    model_cfg, notices = check_run(model_cfg, dataset_cfg, eval_cfg)  # devices, paths, names, lm-eval tasks
    return Checked(model_cfg, dataset_cfg, eval_cfg, logger_cfg, options, method, notices)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    checked = validated(cfg)  # every config checked before any work
    if checked.options.dry_run:  # the memory plan from the model's config alone: no weights, no data
        return print_plan(cfg, checked.method)
    require_unfinished(run_dir)
    model_cfg, dataset_cfg, logger_cfg, method = checked.model, checked.dataset, checked.logger, checked.method
    cfg.progress, noise_floor = checked.options.progress, checked.options.noise_floor
    method_name = cfg.method.name
    print(header(cfg, model_cfg, dataset_cfg, run_dir), flush=True)
    for notice in checked.notices:  # stdout, with the header: stderr stays one line for errors
        print(f"note: {notice}", flush=True)

    group = logger_cfg.group
    if group is None and HydraConfig.get().mode == RunMode.MULTIRUN:
        group = Path(HydraConfig.get().sweep.dir).name  # every job of one --multirun shares a W&B group
    kind = logger_cfg.kind if distributed.is_main() else "none"  # under torchrun only rank 0 logs
    tracker = make_tracker(kind, run_dir, OmegaConf.to_container(cfg, resolve=True), logger_cfg.project,
                           logger_cfg.entity, group, logger_cfg.tags, logger_cfg.mode,
                           name=run_name(HydraConfig.get().overrides.task).lstrip("-") or None)
    with tracker:
        t0 = time.perf_counter()
        with distributed.main_first():  # under torchrun rank 0 fills the model and data caches first
            suite, results = build_suite(model_cfg, dataset_cfg, checked.eval, noise_floor, cfg.progress)
        results["time/prepare_s"] = time.perf_counter() - t0
        rows = ["reference", "retrain"] + (["noise_floor"] if noise_floor else [])
        results["method"], results["seed"] = method_name, cfg.seed
        if method is not None:
            results |= unlearn(cfg, method, suite, run_dir, tracker, results)
            rows.append("unlearned")
            if cfg.reapply.epochs > 0:
                rows += ["reapply/finetuned", "reapply/finetuned+delta"]
        if distributed.is_main():
            write_results(run_dir, results)
        tracker.summary(results)
    print_table(results, rows, suite.headline_keys())
    audited = [k for k in AUDIT_KEYS if any(f"{row}/{k}" in results or k in results for row in rows)]
    if audited:  # eval.audits: a second table, the models' audits
        print_table(results, [row for row in rows if not row.startswith("reapply/")], audited)
    print(f"\nresults: {run_dir / 'results.json'}")
    return results


def configured_method(cfg: DictConfig, progress: bool = False):
    """The method of ``cfg.method`` with its validated config (and the curvature config, for K-FADE)."""
    method_cfg = typed(cfg.method, METHODS[cfg.method.name][0], "method")
    curvature = typed(cfg.curvature, CurvatureConfig, "curvature")  # damping/ lands in curvature too
    return build_method(cfg.method.name, method_cfg, curvature=curvature, cache_root=str(cache_dir() / "curvature"),
                        progress=progress)


def unlearn(cfg: DictConfig, method, suite, run_dir: Path, tracker, baseline: dict) -> dict:
    """Run the method on a copy of the reference model; save its delta, score and audit it (``eval.audits``, against
    the ``baseline`` scores of the reference and retrain models)."""
    model = copy.deepcopy(suite.reference)
    if getattr(method, "uses_curvature", False):  # the factors' placement (offload, layer groups) from the plan
        method.curvature_cfg = planned_curvature(cfg, method)
    before = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}  # host: frees the device
    t0 = time.perf_counter()
    history = method.run(model, suite.unlearn_data(), log=lambda rec: tracker.log(rec))
    elapsed = time.perf_counter() - t0
    timings = getattr(method, "timings", {})
    if "skipped" in history[-1]:
        print(f"note: {cfg.method.name} took no step: {history[-1]['skipped']}", flush=True)
    delta = compute_delta(before, model)
    metrics, record = suite.score(model)
    t0 = time.perf_counter()
    metrics |= run_audits(suite, model, metrics, baseline, delta=delta if cfg.reapply.epochs > 0 else None)
    if suite.eval.audits:
        metrics["time/audits_s"] = time.perf_counter() - t0  # the unlearned model's audits (the baselines' are cached)
    metrics |= with_privleak(metrics, [""], baseline.get(f"retrain/{PRIVLEAK_KEY}"))
    if cfg.reapply.epochs > 0:
        metrics |= reapply(suite, delta, cfg.reapply, cfg.progress)
    if distributed.is_main():  # outputs at the end, each atomic; results.json (written last) marks done
        suite.save_record(record, run_dir)
        delta_path = run_dir / "delta.safetensors"
        save_delta(delta_path, delta, {"method": cfg.method.name,
                                       "base_fingerprint": model_fingerprint(suite.reference)})
        tracker.log_artifact(delta_path, name="unlearning-delta", type="delta")
    curvature = method.curvature_cfg if getattr(method, "uses_curvature", False) else None
    return {**metrics, **hyperparameters(method.cfg, curvature, suite.dataset.fit_set_names()),
            "time/fit_s": timings.get("fit_s", 0.0), "time/unlearn_s": timings.get("unlearn_s", elapsed),
            "steps": len(history) - 1, "splits": sum(r.get("splits", 0) for r in history),
            **{f"last_step/{k}": v for k, v in history[-1].items() if k != "step"}}


def reapply(suite, delta: dict, cfg: DictConfig, progress: bool) -> dict:
    """Finetune the reference further on retain data, then add the stored delta: does the forgetting survive?

    ``reapply/finetuned/…`` scores the finetuned model, ``reapply/finetuned+delta/…`` the same plus the delta.
    """
    finetuned = copy.deepcopy(suite.reference)
    recipe = TrainRecipe(max_epochs=cfg.epochs, lr=cfg.lr, warmup_steps=1, target_accuracy=1.0, seed=cfg.seed)
    train_causal_lm(finetuned, suite.retain_features(), pad_id(suite.tokenizer), recipe, progress)
    results = {f"reapply/finetuned/{k}": v for k, v in suite.score(finetuned)[0].items()}
    apply_delta(finetuned, delta)
    return results | {f"reapply/finetuned+delta/{k}": v for k, v in suite.score(finetuned)[0].items()}


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Returns the sweeper's objective (``objective.*``, read from results.json); None for a dry run."""
    start()  # torchrun: join the process group (rank 0 alone writes)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        objective = typed(cfg.objective, ObjectiveConfig, "objective")
        run(cfg, run_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return None if cfg.dry_run else objective_from_run(run_dir, objective)


if __name__ == "__main__":
    sys.argv += rank_overrides()
    main()
