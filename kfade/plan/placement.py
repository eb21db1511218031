"""The factor placement that fits: the first of none → cpu (1, 2, 4, … layer groups) → disk (same) whose
plan is within both budgets, or the forced choices of ``MemoryConfig``."""

from __future__ import annotations

from kfade.plan.architecture import Architecture
from kfade.plan.config import OFFLOADS, MemoryConfig, Placement
from kfade.plan.memory import PHASES, MemoryPlan, Workload, layer_chunks, plan_memory


def _group_counts(n_layers: int) -> list[int]:
    counts, g = [], 1
    while g < n_layers:
        counts.append(g)
        g *= 2
    return counts + [n_layers]


def resolve_placement(arch: Architecture, workload: Workload, memory: MemoryConfig, factor_dtype: str = "float32",
                      device_budget: float | None = None, cpu_budget: float | None = None,
                      checkpoint_every: int | None = None) -> tuple[Placement, MemoryPlan, bool]:
    """``(placement, its plan, fits)``: the cheapest candidate within the budgets (bytes; None = unbounded).

    Candidates, cheapest first: offload none, cpu, disk (each layer streamed from the host costs a transfer;
    from disk a read); for each, 1, 2, 4, … layer groups (each group costs one more pass over the fitting data).
    ``memory.offload`` / ``memory.layer_groups`` fix one axis. When nothing fits, the candidate with the
    smallest device peak is returned with ``fits`` False (ties: the smaller next-largest phase, then host peak).
    """
    offloads = OFFLOADS if memory.offload == "auto" else (memory.offload,)
    modules = len(layer_chunks([s.name for s in arch.layers], len(arch.layers)))  # the most groups there can be
    groups = _group_counts(modules) if memory.layer_groups is None else [int(memory.layer_groups)]
    best = None
    for offload in offloads:
        for g in groups:
            placement = Placement(factor_dtype, offload, memory.offload_dir, g, checkpoint_every)
            plan = plan_memory(arch, workload, placement)
            if plan.fits(device_budget, cpu_budget):
                return placement, plan, True
            key = (sorted((plan.total("device", ph) for ph in PHASES), reverse=True), plan.peak("cpu"))
            if best is None or key < best[0]:
                best = (key, placement, plan)
    return best[1], best[2], False
