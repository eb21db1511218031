"""``dry_run=true``: the run's memory plan from the model's config alone (no weights, no data, no network).

The architecture comes from ``model.path``'s config.json (a local dir, the Hugging Face cache, or the shipped
fixture ``conf/fixtures/models/<org>--<name>/`` when the Hub id is not available offline), built on the meta
device; the arithmetic is ``kfade.plan``. ``placement_fields(config)`` gives the resolved factor placement as the
``CurvatureConfig`` fields of the same names; ``planned_curvature(config)`` the curvature config a real run builds
its method with, ``planned_method(config)`` the method config (K-FADE's ``cg_retain_graphs`` decided).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections import defaultdict
from pathlib import Path

import torch
from transformers import LlamaConfig

from kfade.curvature import CurvatureConfig
from kfade.curvature.estimators import estimator as estimator_named
from kfade.models.config import ModelConfig
from kfade.pipeline.config import RunConfig
from kfade.plan import (
    GB,
    Architecture,
    MemoryConfig,
    Workload,
    architecture,
    factor_totals,
    layer_rows,
    load_model_config,
    resolve_placement,
)
from kfade.plan.memory import PHASES
from kfade.suites.models import is_log_dir

FIXTURES = Path(__file__).resolve().parents[2] / "conf" / "fixtures" / "models"


def fixture_configs() -> dict[str, Path]:
    """Hub id → shipped config dir (``conf/fixtures/models/<org>--<name>``), used when the id is not local."""
    return {d.name.replace("--", "/", 1): d for d in sorted(FIXTURES.iterdir()) if (d / "config.json").is_file()}


def model_architecture(model: ModelConfig, modules: str) -> tuple[Architecture, str]:
    """(the covered layers and size of ``model``, where its config came from)."""
    if model.path is None:  # the embedded tiny Llama: its config is the spec
        spec = LlamaConfig(vocab_size=model.vocab_size, **vars(model.spec))
        return architecture(spec, modules), "tiny Llama spec"
    return _path_architecture(model.path, modules)


@functools.lru_cache(maxsize=8)
def _path_architecture(path: str, modules: str) -> tuple[Architecture, str]:
    """Cached per process: a sweep of dry runs over methods builds each model once."""
    config, source = load_model_config(path, fixture_configs())
    return architecture(config, modules), source


def planned_device(device: str, dtype: str) -> tuple[str, list[str]]:
    """The device the plan is for: ``auto`` is where the run would go (CUDA if present, else the CPU), except
    that a 16-bit model on a machine without CUDA is planned for ``cuda`` (a plan is made before going to the
    GPU box); an explicit device is taken as given."""
    if device != "auto":
        return device, []
    if torch.cuda.is_available():
        return "cuda", []
    if dtype in ("float32", "fp32", "float64"):
        return "cpu", []
    return "cuda", [f"model.device=auto: no CUDA device here; planning the {dtype} model for cuda"]


def budgets(memory: MemoryConfig, device: str) -> tuple[float | None, float, str]:
    """(device bytes or None when unknown, host bytes, where they came from)."""
    machine = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    cpu = memory.cpu_gb * GB if memory.cpu_gb is not None else machine
    if memory.gpu_gb is not None:
        gpu, src = memory.gpu_gb * GB, "memory.gpu_gb"
    elif device.startswith("cuda") and torch.cuda.is_available():
        gpu, src = float(torch.cuda.mem_get_info(torch.device(device))[1]), "this machine's GPU"
    else:
        gpu, src = None, "unknown: set memory.gpu_gb"
    return gpu, cpu, f"gpu {src}, cpu {'memory.cpu_gb' if memory.cpu_gb is not None else 'this machine'}"


def workload(config: RunConfig, model: ModelConfig, device: str, arch: Architecture) -> Workload:
    """What the run holds (kfade.pipeline.job and the suites): the reference, the retrain model(s) when loaded as
    models, the method's copy and frozen reference; the pre-step copy of the weights in host memory (FSDP: each
    sharded, ``kfade.plan.memory``)."""
    name, method = config.method_name, config.method
    copies = ["reference"]
    if model.path is None or (model.retrain_path and not is_log_dir(model.retrain_path)):
        copies += ["retrain model"] + (["noise-floor retrain model"] if config.options.noise_floor else [])
    common = dict(model_dtype=model.dtype, device=device, batch_size=config.dataset.batch_size,
                  max_length=config.dataset.max_length, world_size=config.distributed.planned_world(),
                  strategy=config.distributed.strategy)
    if method is None:
        return Workload(method="none", weight_copies=tuple(copies), host_weight_copies=(), **common)
    copies.append("unlearned copy")
    if method.keeps_frozen_copy():
        copies.append(f"frozen reference ({name})")
    pattern, trained = method.trained_pattern(), None
    if pattern is not None:
        trained = sum(s.out_features * s.in_features for s in arch.layers if re.search(pattern, s.weight))
    kind = "kfade" if config.uses_curvature else "first_order"
    return Workload(method=kind, estimator=config.curvature.estimator, mc_samples=config.curvature.mc_samples,
                    weight_copies=tuple(copies), trained_params=trained, forget_targets=method.uses_forget_targets(),
                    **common, **method.plan_fields(config.dataset.fit_max_batches))


def plan_run(config: RunConfig) -> dict:
    """Everything the printed plan shows (``placement``, ``plan``, ``fits``, budgets, architecture, notes)."""
    model, memory = config.model_given, config.memory
    device, notes = planned_device(model.device, model.dtype)
    arch, source = model_architecture(model, config.curvature.modules)
    if not arch.shared_inputs_found:
        notes.append("shared inputs could not be traced: every layer's A factor is counted")
    work = workload(config, model, device, arch)
    gpu, cpu, budget_source = budgets(memory, device)
    if work.world_size > 1:  # the ranks of one node share its host memory
        cpu /= work.world_size
        budget_source += f"; host memory / {work.world_size} ranks"
    placement, plan, fits = resolve_placement(
        arch, work, memory, factor_dtype=config.curvature.factor_dtype, device_budget=gpu,
        cpu_budget=cpu, checkpoint_every=config.curvature.checkpoint_every)
    return {"model": model, "source": source, "arch": arch, "workload": work, "placement": placement,
            "plan": plan, "fits": fits, "gpu": gpu, "cpu": cpu, "budget_source": budget_source, "notes": notes,
            "memory": memory}


def placement_fields(config: RunConfig) -> dict:
    """The resolved placement as ``CurvatureConfig`` fields: ``dataclasses.replace(curvature, **this)``."""
    return vars(plan_run(config)["placement"]).copy()


def planned_curvature(config: RunConfig) -> CurvatureConfig:
    """The run's curvature config placed by the plan (``memory.*``: offload and layer groups where the factors do
    not fit); a placement chosen in ``curvature.offload`` / ``curvature.layer_groups`` is kept as given."""
    curvature = config.curvature
    if curvature.offload != "none" or curvature.layer_groups != 1:
        return curvature
    return dataclasses.replace(curvature, **placement_fields(config))


def planned_method(config: RunConfig):
    """The method's config as a real run builds it: K-FADE's ``cg_retain_graphs`` null becomes True when the plan
    with its ``cg_batches`` graphs retained fits the budgets (a known device budget, or the CPU), else False. Never
    retained under FSDP, with forward-mode products, with gradient checkpointing (memory chosen over speed) or
    with ``cg_batches`` null (all fitting batches, however many)."""
    method = config.method
    if getattr(method, "cg_retain_graphs", False) is not None:
        return method
    keep = (method.solver == "cg" and method.cg_batches is not None and method.ggn_mode != "forward"
            and config.distributed.strategy != "fsdp" and not config.model.gradient_checkpointing)
    if keep:  # ... and only where they fit
        info = plan_run(dataclasses.replace(config, method=dataclasses.replace(method, cg_retain_graphs=True)))
        keep = info["fits"] and (info["gpu"] is not None or info["workload"].device == "cpu")
    return dataclasses.replace(method, cg_retain_graphs=keep)


def _gb(n: float) -> str:
    return f"{n / GB:.2f}"


def _layer_table(arch: Architecture, estimator: str, factor_bytes: int) -> list[str]:
    """One row per covered layer; layers identical in every block are folded into one ``layers.*`` row."""
    rows, kronecker = layer_rows(arch, estimator, factor_bytes), estimator_named(estimator).kronecker
    folded = defaultdict(list)
    for row in rows:
        folded[re.sub(r"\.\d+\.", ".*.", row["name"], count=1)].append(row)
    lines = ["| covered layer | out × in' | A | S | eigenvalues | covered params |", "|---|---|---|---|---|---|"]
    for key, group in folded.items():
        same = all((r["out"], r["in"], r["A"], r["S"], r["eig"]) == (group[0]["out"], group[0]["in"],
                   group[0]["A"], group[0]["S"], group[0]["eig"]) for r in group)
        for r in [group[0]] if same else group:
            label = f"{key} (× {len(group)})" if same and len(group) > 1 else r["name"]
            shared = "" if r["group"] == r["name"] or not kronecker else " (shared)"
            lines.append(f"| {label} | {r['out']} × {r['in']} | {r['A'] / 1e6:.1f} MB{shared} | "
                         f"{r['S'] / 1e6:.1f} MB | {r['eig'] / 1e6:.1f} MB | {r['params'] / 1e6:.2f} M |")
    return lines


def print_plan(config: RunConfig) -> dict:
    """Print the plan of the run as it would be built (``planned_method``); the last line is ``total peak: <X> GB on
    <device>, <Y> GB on cpu``."""
    info = plan_run(dataclasses.replace(config, method=planned_method(config)) if config.method else config)
    arch, work, placement, plan = info["arch"], info["workload"], info["placement"], info["plan"]
    fb = 2 if placement.factor_dtype == "bfloat16" else 4
    print(f"plan: model={info['model'].path or 'tiny'} (config: {info['source']}), {arch.model_type}, "
          f"{arch.n_params / 1e9:.3g}B parameters, {work.model_dtype} on {work.device}; method={config.method_name}"
          + (f" ({work.solver}), curvature={work.estimator}" if work.method == "kfade" else ""))
    for note in info["notes"]:
        print(f"note: {note}")
    if work.method == "kfade" and estimator_named(work.estimator).passes:
        print(f"covered layers: {len(arch.layers)} (curvature.modules); A factors of layers reading the same "
              "input (q/k/v, gate/up) are stored once, at the first of them")
        print("\n".join(_layer_table(arch, work.estimator, fb)))
        t = factor_totals(arch)
        print(f"K-FAC factors A + S, fp32, shared A once: {_gb(4 * (t['A'] + t['S']))} GB "
              f"(A {_gb(4 * t['A'])} + S {_gb(4 * t['S'])}; with one A per layer: "
              f"{_gb(4 * (t['A_unshared'] + t['S']))} GB; GB = 1e9 bytes)")
        stored = sum(r["A"] + r["S"] + r["eig"] for r in layer_rows(arch, work.estimator, fb))
        print(f"stored by this framework ({work.estimator}, {placement.factor_dtype}): eigenvectors of A and S "
              f"{_gb(fb * (t['A'] + t['S']))} GB + eigenvalues {_gb(stored - fb * (t['A'] + t['S']))} GB = "
              f"{_gb(stored)} GB")
    print("| item | phase | on | GB |\n|---|---|---|---|")
    for item in plan.items:
        where = work.device if item.where == "device" else item.where
        phases = "all" if item.phases == PHASES else " + ".join(item.phases)
        print(f"| {item.name} | {phases} | {where} | {_gb(item.nbytes)} |")
    totals = ", ".join(f"{ph} {_gb(plan.total('device', ph))} / {_gb(plan.total('cpu', ph))}" for ph in PHASES
                       if plan.total("device", ph) or plan.total("cpu", ph))
    print(f"by phase, GB on {work.device} / cpu: {totals}")
    gpu = "unknown" if info["gpu"] is None else f"{_gb(info['gpu'])} GB"
    chosen = "forced" if info["memory"].offload != "auto" and info["memory"].layer_groups is not None else "auto"
    print(f"budget: {gpu} on {work.device}, {_gb(info['cpu'])} GB on cpu ({info['budget_source']})")
    print(f"placement ({chosen}): offload={placement.offload}, layer_groups={placement.layer_groups}, "
          f"factor_dtype={placement.factor_dtype}" + (f", {_gb(plan.peak('disk'))} GB on disk"
                                                       if plan.peak("disk") else ""))
    if not info["fits"]:
        print("does NOT fit the budget (the placement with the smallest peaks is shown)")
    elif info["gpu"] is None and work.device != "cpu":
        print(f"fits the cpu budget; the {work.device} budget is unknown (taken as unbounded: set memory.gpu_gb)")
    else:
        print("fits the budget")
    if work.world_size > 1:
        sharing = ("the models, the gradient/direction/CG vectors and the factors are sharded (rank 0 alone reads "
                   "the checkpoint into host memory)" if work.shards > 1 else
                   "every rank holds the whole model and every factor")
        print(f"per rank: {work.world_size} ranks, distributed.strategy={work.strategy}; {sharing}")
    print(f"total peak: {_gb(plan.peak('device'))} GB on {work.device}, {_gb(plan.peak('cpu'))} GB on cpu")
    return info

