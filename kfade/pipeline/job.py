"""The job: data → models → (curvature →) unlearning → evaluation and audits → tracking, as library functions.

``run(load_config(cfg), run_dir)`` builds the benchmark suite (reference and retrain models, their cached scores),
runs the method on a copy of the reference model, scores and audits the result, optionally re-applies its delta to
a further finetuned model, and writes ``results.json`` (flat keys; written last: it marks the run done), the
suite's eval record and ``delta.safetensors`` into ``run_dir``. A dry run prints the memory plan instead.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path

from kfade import distributed, fsdp
from kfade.cache import cache_dir
from kfade.curvature import CurvatureConfig, model_fingerprint
from kfade.data.formatting import pad_id
from kfade.eval.audits import HEADLINE_KEYS as AUDIT_KEYS
from kfade.eval.audits import PRIVLEAK_KEY, run_audits, with_privleak
from kfade.models.train import TrainRecipe, train_causal_lm
from kfade.pipeline.config import ReapplyConfig, RunConfig
from kfade.pipeline.console import header, table
from kfade.pipeline.plan import planned_curvature, planned_method, print_plan
from kfade.progress import library_bars
from kfade.suites import Suite, build_suite
from kfade.tracking import NullTracker, make_tracker, require_unfinished, write_results
from kfade.unlearn import Method, apply_delta, build_method, compute_delta, save_delta


def run(config: RunConfig, run_dir: Path, *, choices: Mapping[str, str | None] | None = None,
        group: str | None = None, name: str | None = None, logged: Mapping | None = None) -> dict:
    """Run the job into ``run_dir`` (which must hold no finished run) and print its header and tables; returns the
    flat results. ``choices`` label the header (the config groups' options); ``group``, ``name`` and ``logged`` (the
    resolved config) go to the tracker. A dry run prints the memory plan and returns what it shows."""
    if config.options.dry_run:  # the memory plan from the model's config alone: no weights, no data
        return print_plan(config)
    require_unfinished(run_dir)
    print(header(config, run_dir, choices or {}), flush=True)
    for notice in config.notices:  # stdout, with the header: stderr stays one line for errors
        print(f"note: {notice}", flush=True)
    options, logger = config.options, config.logger
    kind = logger.kind if distributed.is_main() else "none"  # under torchrun only rank 0 logs
    logged = {**(logged if logged is not None else dataclasses.asdict(config)), "progress": options.progress}
    group = logger.group if logger.group is not None else group
    tracker = make_tracker(kind, run_dir, logged, logger.project, logger.entity, group, logger.tags, logger.mode,
                           name=name)
    with tracker, library_bars(options.progress):
        t0 = time.perf_counter()
        suite, results = build_suite(config.model, config.dataset, config.eval, options.noise_floor,
                                     options.progress, sharded=config.distributed.strategy == "fsdp")
        results["time/prepare_s"] = time.perf_counter() - t0
        rows = ["reference", "retrain"] + (["noise_floor"] if options.noise_floor else [])
        results["method"], results["seed"] = config.method_name, options.seed
        if config.method is not None:
            results |= unlearn(config, suite, run_dir, tracker, results)
            rows.append("unlearned")
            if options.reapply.epochs > 0:
                rows += ["reapply/finetuned", "reapply/finetuned+delta"]
        if distributed.is_main():
            write_results(run_dir, results)
        tracker.summary(results)
    print(table(results, rows, suite.headline_keys()))
    audited = [k for k in AUDIT_KEYS if any(f"{row}/{k}" in results or k in results for row in rows)]
    if audited:  # eval.audits: a second table, the models' audits
        print(table(results, [row for row in rows if not row.startswith("reapply/")], audited))
    print(f"\nresults: {run_dir / 'results.json'}")
    return results


def build(config: RunConfig) -> Method:
    """The configured method, with what the memory plan decides (``kfade.pipeline.plan``): the curvature's placement
    (offload, layer groups) for one that fits a curvature, K-FADE's retained graphs."""
    curvature = planned_curvature(config) if config.uses_curvature else config.curvature
    return build_method(config.method_name, planned_method(config), curvature=curvature,
                        cache_root=str(cache_dir() / "curvature"), progress=config.options.progress)


def unlearn(config: RunConfig, suite: Suite, run_dir: Path, tracker=None, baseline: Mapping | None = None) -> dict:
    """Run the method on a copy of the reference model; save its delta, score and audit it (``eval.audits``, against
    the ``baseline`` scores of the reference and retrain models). Returns the flat results of the unlearned model."""
    tracker, baseline = tracker or NullTracker(), baseline or {}
    method = build(config)
    model = fsdp.copy_model(suite.reference)  # FSDP: sharded like the reference; the method and scoring run on it
    before = {n: fsdp.local(p.detach()).to("cpu", copy=True)  # in host memory; FSDP: this rank's rows only
              for n, p in model.named_parameters()}
    data = suite.unlearn_data()
    if method.cfg.uses_forget_targets():  # forget_loss=kl_base: the base model's answers, computed once
        data = suite.with_forget_targets(data)
    t0 = time.perf_counter()
    history = method.run(model, data, log=lambda rec: tracker.log(rec))
    elapsed = time.perf_counter() - t0
    if "skipped" in history[-1]:
        print(f"note: {config.method_name} took no step: {history[-1]['skipped']}", flush=True)
    delta = compute_delta(before, model)
    reapply_cfg = config.options.reapply
    metrics, record = suite.score(model)
    t0 = time.perf_counter()
    metrics |= run_audits(suite, model, metrics, baseline, delta=delta if reapply_cfg.epochs > 0 else None)
    if suite.eval.audits:
        metrics["time/audits_s"] = time.perf_counter() - t0  # the unlearned model's audits (the baselines' are cached)
    metrics |= with_privleak(metrics, [""], baseline.get(f"retrain/{PRIVLEAK_KEY}"))
    if reapply_cfg.epochs > 0:
        metrics |= reapply(suite, delta, reapply_cfg, config.options.progress)
    base = model_fingerprint(suite.reference)  # FSDP: gathers each parameter, so on every rank
    if distributed.is_main():  # outputs at the end, each atomic; results.json (written last) marks done
        suite.save_record(record, run_dir)
        delta_path = run_dir / "delta.safetensors"
        save_delta(delta_path, delta, {"method": config.method_name, "base_fingerprint": base})
        tracker.log_artifact(delta_path, name="unlearning-delta", type="delta")
    return {**metrics, **hyperparameters(method.cfg, method.curvature_cfg, suite.dataset.fit_set_names()),
            "time/fit_s": method.timings.get("fit_s", 0.0), "time/unlearn_s": method.timings.get("unlearn_s", elapsed),
            "steps": len(history) - 1, "splits": sum(r.get("splits", 0) for r in history),
            **{f"last_step/{k}": v for k, v in history[-1].items() if k != "step"}}


def hyperparameters(method_cfg, curvature: CurvatureConfig | None, fit_sets: list[str]) -> dict:
    """``hp/<field>`` of the method's config; with a curvature, ``hp/curvature/<field>`` and ``hp/fit_sets`` too."""
    hp = {f"hp/{k}": v for k, v in vars(method_cfg).items() if k != "name"}
    if curvature is not None:
        hp |= {f"hp/curvature/{k}": v for k, v in vars(curvature).items()} | {"hp/fit_sets": ",".join(fit_sets)}
    return hp


def reapply(suite: Suite, delta: dict, cfg: ReapplyConfig, progress: bool) -> dict:
    """Finetune the reference further on retain data, then add the stored delta: does the forgetting survive?

    ``reapply/finetuned/…`` scores the finetuned model, ``reapply/finetuned+delta/…`` the same plus the delta.
    """
    finetuned = copy.deepcopy(suite.reference)
    recipe = TrainRecipe(max_epochs=cfg.epochs, lr=cfg.lr, warmup_steps=1, target_accuracy=1.0, seed=cfg.seed)
    train_causal_lm(finetuned, suite.retain_features(), pad_id(suite.tokenizer), recipe, progress)
    results = {f"reapply/finetuned/{k}": v for k, v in suite.score(finetuned)[0].items()}
    apply_delta(finetuned, delta)
    return results | {f"reapply/finetuned+delta/{k}": v for k, v in suite.score(finetuned)[0].items()}
