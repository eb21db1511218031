"""Bytes a run holds, item by item, per phase and per device: pure functions of layer shapes and settings.

Units: bytes; GB = 1e9 bytes. Shapes: a covered layer y = W̄ [a; 1] has W̄ of (out, in') with in' = in (+1 with a
bias). What the framework allocates (``kfade.curvature.fit`` / ``curvature`` / ``cg``, ``kfade.unlearn.kfade``,
``experiments/run.py``):

- K-FAC factors: A = E[ā āᵀ] (in'×in') once per activation group (q/k/v and gate/up share theirs) and
  S = E[g gᵀ] (out×out) per layer. The fit accumulates their sums in fp32 (per layer group), then
  eigendecomposes each in fp64 and stores the eigenvectors (same sizes as the factors) at the factor dtype, plus
  the eigenvalues (K-FAC: vectors λ_A, λ_S; EK-FAC: the corrected Λ* of shape out×in' per layer, summed in fp32
  in a second pass). Diagonal: D (out×in') per layer.
- The forget gradient and the K-FADE direction: one fp32 value per covered parameter each (in host memory with
  ``cg_offload=cpu``).
- PCG (``kfade.curvature.cg``): x, r, z = M r, p, the product (G+λI)p, and during the update the new x and r
  beside the old ones: 7 vectors of the covered parameters at peak, at ``cg_dtype`` (fp32 or bf16) beside the
  model, or in host memory with ``cg_offload=cpu``; then the device holds the vector in flight: a product's input
  at the model dtype and its fp32 result (preconditioning moves one layer at a time).
- Activations of one batch (N = batch × length tokens) are an estimate: the inputs (shared ones once) and
  outputs of every covered linear at the model dtype, the fp32 logits, their softmax and gradient; for the fit
  instead the vocabulary-wide fp32 tensors of ``kfade.curvature.capture`` (logits, label logits, softmax, and
  per MC sample the backward signal and the logits' gradient), plus the captured fp32 inputs and output
  gradients (× MC samples); for GGN products (eager attention) the attention probabilities and scores of every
  layer. Not counted: what autograd saves inside a decoder layer besides the covered linears' inputs and
  outputs (norms, rotary q/k, the attention output, the MLP activation).
- Retained graphs (``cg_retain_graphs``): per product batch its forward and the graph of Jᵀu that the products
  differentiate, estimated as twice one batch's activations (eager attention), for every product batch.
- The eigendecomposition of an n×n factor: ``eigh_workspace_bytes`` (44n² bytes, CPU LAPACK).
- FSDP (``strategy=fsdp``, n ranks; the plan is per rank): every model (``kfade.fsdp.load_sharded``,
  ``copy_model``), the pre-step copy, the vectors and the factors are 1/n; two decoder blocks are all-gathered at
  a time; rank 0 alone reads the checkpoint into host memory and broadcasts it one tensor at a time.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from kfade.curvature.estimators import estimator
from kfade.curvature.owners import assign_owners
from kfade.plan.architecture import Architecture
from kfade.plan.config import Placement
from kfade.unlearn.solvers import SOLVERS

GB = 1e9
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "float64": 8}
PHASES = ("load", "fit", "correction", "step")  # fit: factor pass + eigh (diagonal: its pass); correction: EK-FAC
PASS_SUMS = {"factors": "A, S", "diagonal": "D", "correction": "Λ*"}  # what a fitting pass sums
ADAMW_STATES = 3  # gradient, exp_avg, exp_avg_sq at the parameter dtype (first-order baselines)


@dataclass(frozen=True)
class Workload:
    """What a run does, as far as memory goes (from its composed config)."""

    method: str = "kfade"  # kfade | first_order | none
    estimator: str = "ekfac"  # kfac | ekfac | diagonal | identity
    solver: str = "cg"  # cg | direct
    cg_dtype: str = "float32"  # the PCG vectors' dtype (float32 | bfloat16)
    cg_offload: str = "none"  # where the PCG vectors live: none (the model's device) | cpu
    model_dtype: str = "bfloat16"
    device: str = "cuda"  # the model's device; "cpu" puts every device item on the host
    batch_size: int = 4
    max_length: int = 512
    mc_samples: int = 1  # output-gradient signals per token in the fit
    weight_copies: tuple[str, ...] = ("reference", "unlearned copy")  # whole models on the device
    host_weight_copies: tuple[str, ...] = ("pre-step copy (run.py)",)  # whole models in host memory
    trained_params: int | None = None  # first-order: parameters the optimiser updates (None: all)
    forget_targets: bool = False  # forget_loss=kl_base: the base model is loaded once to score the forget answers
    world_size: int = 1  # torchrun processes; the plan is per rank
    strategy: str = "replicate"  # replicate | fsdp: the models, the vectors and the factors sharded
    retained_graphs: int = 0  # cg: product batches whose graphs each step keeps (method.cg_retain_graphs)

    @property
    def shards(self) -> int:
        """Ways the models, the vectors over their parameters and the factors are split (1: not)."""
        return self.world_size if self.strategy == "fsdp" else 1


@dataclass(frozen=True)
class Item:
    name: str
    nbytes: int
    where: str  # device | cpu | disk
    phases: tuple[str, ...]  # of PHASES


@dataclass
class MemoryPlan:
    """The items of a run; ``peak(where)`` is the largest phase total there."""

    device: str
    items: list[Item] = field(default_factory=list)

    def add(self, name: str, nbytes: float, where: str, *phases: str) -> None:
        """An item held during ``phases`` (``"all"``: every phase)."""
        if nbytes > 0:
            self.items.append(Item(name, int(nbytes), where, PHASES if phases == ("all",) else phases))

    def _at(self, item: Item, where: str) -> bool:
        return item.where == where or (where == "cpu" and item.where == "device" and self.device == "cpu")

    def total(self, where: str, phase: str) -> int:
        return sum(i.nbytes for i in self.items if self._at(i, where) and phase in i.phases)

    def peak(self, where: str) -> int:
        if where == "disk":
            return sum(i.nbytes for i in self.items if i.where == "disk")
        return max(self.total(where, phase) for phase in PHASES)

    def fits(self, device_budget: float | None, cpu_budget: float | None) -> bool:
        """Within both budgets (bytes; None = unbounded)."""
        device_ok = device_budget is None or self.device == "cpu" or self.peak("device") <= device_budget
        return device_ok and (cpu_budget is None or self.peak("cpu") <= cpu_budget)


def factor_totals(arch: Architecture) -> dict[str, int]:
    """Element counts: ``A`` (shared activation factors once), ``A_unshared`` (one per layer), ``S``,
    ``params`` (Σ out·in', the covered parameters), ``eigvals`` (K-FAC eigenvalue vectors)."""
    firsts = [spec for spec in arch.layers if arch.groups[spec.name] == spec.name]
    return {"A": sum(s.in_features**2 for s in firsts), "A_unshared": sum(s.in_features**2 for s in arch.layers),
            "S": sum(s.out_features**2 for s in arch.layers),
            "params": sum(s.out_features * s.in_features for s in arch.layers),
            "eigvals": sum(s.in_features for s in firsts) + sum(s.out_features for s in arch.layers)}


def layer_rows(arch: Architecture, name: str, factor_bytes: int) -> list[dict]:
    """Per covered layer: shape, activation group, and the stored bytes of its A (0 when it reads a shared input
    counted at its group's first layer), S, eigenvalues (K-FAC vectors, EK-FAC Λ*, diagonal D)."""
    rows, stored = [], estimator(name).stored_elements
    for spec in arch.layers:
        n = stored(spec, arch.groups[spec.name] == spec.name)
        rows.append({"name": spec.name, "out": spec.out_features, "in": spec.in_features,
                     "group": arch.groups[spec.name], **{k: factor_bytes * v for k, v in n.items()},
                     "params": spec.out_features * spec.in_features})
    return rows


def layer_chunks(names: list[str], groups: int) -> list[list[int]]:
    """``curvature.layer_groups``: ``groups`` contiguous groups of whole parent modules (the layers of one
    attention or MLP stay together), as indices into ``names``; at most one group per module."""
    units = [list(g) for _, g in itertools.groupby(range(len(names)), key=lambda i: names[i].rpartition(".")[0])]
    groups = max(1, min(groups, len(units)))
    return [[i for unit in units[k * len(units) // groups : (k + 1) * len(units) // groups] for i in unit]
            for k in range(groups)]


def _chunk_elements(rows: list[dict], chunk: list[int], fit_pass: str) -> int:
    """Elements of one layer group's sums in a fitting pass: ``factors`` (the A of every activation group its
    layers read, once, and their S), else out × in' per layer (EK-FAC's ``correction`` Λ*, the ``diagonal`` D)."""
    layers = [rows[i] for i in chunk]
    if fit_pass != "factors":
        return sum(r["params"] for r in layers)
    return sum(n * n for n in {r["group"]: r["in"] for r in layers}.values()) + sum(r["out"] ** 2 for r in layers)


def eigh_workspace_bytes(n: int) -> int:
    """Bytes ``kfade.curvature.passes.eigh`` allocates for one n×n factor beside its fp32 sum: the normalised
    sum (fp32, n²), its fp64 copy, the symmetrised copy and the eigenvectors (fp64, n² each), the eigenvalues
    (fp64, n) and LAPACK ``syevd``'s workspace (1 + 6n + 2n² doubles, 3 + 5n int32), all alive during the call:
    44n² + O(n) bytes."""
    return 4 * n * n + 3 * 8 * n * n + 8 * n + 8 * (1 + 6 * n + 2 * n * n) + 4 * (3 + 5 * n)


def activation_bytes(arch: Architecture, w: Workload, fit: bool, eager_attention: bool) -> int:
    """Estimate of one batch's forward + backward memory (module docstring)."""
    n = w.batch_size * w.max_length
    b = DTYPE_BYTES[w.model_dtype]
    inputs = sum(s.in_features for s in arch.layers if arch.groups[s.name] == s.name)
    outputs = sum(s.out_features for s in arch.layers)
    vocab_wide = 3 + 2 * w.mc_samples if fit else 3  # fp32 tensors of N × vocab (module docstring)
    total = n * (inputs + outputs) * b + vocab_wide * n * arch.vocab_size * 4
    if fit:
        total += n * (inputs + w.mc_samples * outputs) * 4
    if eager_attention:
        total += 2 * w.batch_size * arch.num_heads * w.max_length**2 * b * arch.num_layers
    return total


def plan_memory(arch: Architecture, w: Workload, placement: Placement) -> MemoryPlan:
    """Every item of the run with its bytes, device and phase (``load``, ``fit``, ``step``; ``all``: held
    throughout)."""
    p = MemoryPlan(w.device)
    b = DTYPE_BYTES[w.model_dtype]
    weights, n = arch.n_params * b, w.shards
    t = factor_totals(arch)
    of = f", 1/{n}" if n > 1 else ""
    for copy in w.weight_copies:  # FSDP: every model sharded (kfade.fsdp.load_sharded, copy_model)
        p.add(f"weights: {copy} ({w.model_dtype}{of})", weights / n, "device", "all")
    for copy in w.host_weight_copies:
        p.add(f"weights: {copy} ({w.model_dtype}{of})", weights / n, "cpu", "step")
    if n > 1:  # one model's forward at a time (scoring alternates between models, never overlaps them)
        p.add(f"FSDP: 2 decoder blocks all-gathered (one in use, one prefetched; {w.model_dtype})",
              2 * t["params"] / arch.num_layers * b, "device", "all")
        widest = max(arch.vocab_size * arch.hidden_size, *(s.out_features * s.in_features for s in arch.layers))
        p.add(f"FSDP load: one whole tensor broadcast from rank 0 ({w.model_dtype})", widest * b, "device", "load")
    p.add(f"weights: loading one model on the host ({w.model_dtype}" + (", rank 0 only)" if n > 1 else ")"), weights,
          "cpu", "load")
    if w.forget_targets:  # its label log-probs on the forget set (host, N_label × vocab × 4 bytes) are not counted
        p.add(f"weights: base model, scoring the forget answers once ({w.model_dtype}{of})", weights / n, "device",
              "load")
    if w.method == "first_order":
        trained = arch.n_params if w.trained_params is None else w.trained_params
        p.add(f"AdamW gradient + 2 moments ({w.model_dtype}{of})", ADAMW_STATES * trained * b / n, "device", "step")
        p.add("activations, one batch (estimate)", activation_bytes(arch, w, False, False), "device", "step")
        return p
    if w.method != "kfade":  # evaluation only: no gradients, so this bounds it from above
        p.add("activations, one batch (estimate, upper bound)", activation_bytes(arch, w, False, False), "device",
              "step")
        return p
    _curvature_items(p, arch, w, placement)
    solver = SOLVERS[w.solver]
    where = "cpu" if solver.vectors and w.cg_offload == "cpu" else "device"
    params = t["params"] / n
    p.add(f"forget gradient (fp32{of})", 4 * params, where, "step")
    p.add(f"K-FADE direction (fp32{of})", 4 * params, where, "step")
    if solver.vectors:
        count = len(solver.vectors)
        p.add(f"{w.solver.upper()} vectors: {', '.join(solver.vectors)} ({count} × {w.cg_dtype}{of}"
              + (", host memory)" if where == "cpu" else ")"), count * DTYPE_BYTES[w.cg_dtype] * params, where, "step")
        if where == "cpu":
            p.add(f"{w.solver.upper()} vector in flight: a product's input ({w.model_dtype}) and result (fp32{of})",
                  (b + 4) * params, "device", "step")
    widest = max(s.out_features * s.in_features for s in arch.layers)
    gathered = " gathered on its owner" if n > 1 else ""
    p.add(f"preconditioner workspace, one layer{gathered} (fp32)", 3 * 4 * widest, "device", "step")
    p.add(f"step snapshot of the covered weights ({w.model_dtype}{of})", t["params"] * b / n, "cpu", "step")
    p.add("activations, one batch (estimate" + (", eager attention for G·v)" if solver.products else ")"),
          activation_bytes(arch, w, False, solver.products), "device", "step")
    if w.retained_graphs:
        p.add(f"retained graphs of {w.retained_graphs} product batches (estimate: 2 × one batch's activations each)",
              2 * w.retained_graphs * activation_bytes(arch, w, False, True), "device", "step")
    return p


def _curvature_items(p: MemoryPlan, arch: Architecture, w: Workload, placement: Placement) -> None:
    """The fit's sums, workspaces and the stored curvature where ``placement`` keeps it (``kfade.curvature.fit``):
    per layer group, the factor pass holds its fp32 A/S sums (released one layer at a time into the eigh), the
    EK-FAC correction pass its fp32 Λ* sums and the group's eigenbases (fp32 copies on the device unless the
    stored ones are already that); stored layers accumulate where ``offload`` puts them (counted whole)."""
    fit_passes = estimator(w.estimator).passes
    if not fit_passes:
        return
    fb = DTYPE_BYTES[placement.factor_dtype]
    rows = layer_rows(arch, w.estimator, fb)
    stored = sum(r["A"] + r["S"] + r["eig"] for r in rows)
    mine = ""
    if w.shards > 1:  # this rank's layers: the largest share (kfade.curvature.owners)
        owners = assign_owners(arch.layers, arch.groups, w.estimator, w.shards)
        stored = max(sum(r["A"] + r["S"] + r["eig"] for r in rows if owners[r["name"]] == k) for k in range(w.shards))
        mine = f", the largest rank's layers of {w.shards}"
    one_layer = max(r["A"] + r["S"] + r["eig"] for r in rows)
    chunks = layer_chunks([r["name"] for r in rows], placement.layer_groups)
    of_groups = f", 1 of {len(chunks)} layer groups" if len(chunks) > 1 else ""
    every = ", every rank's own before the reduce to owners" if w.shards > 1 else ""
    p.add(f"factor sums ({PASS_SUMS[fit_passes[0]]}; fp32{of_groups}{every})",
          4 * max(_chunk_elements(rows, c, fit_passes[0]) for c in chunks), "device", "fit")
    if "factors" in fit_passes:
        largest = max(max(r["in"], r["out"]) for r in rows)
        p.add(f"eigh workspace, largest factor ({largest}², fp64)", eigh_workspace_bytes(largest), "device", "fit")
    fit_phases = ("fit", "correction") if "correction" in fit_passes else ("fit",)
    p.add("activations + captured inputs / output grads, one batch (estimate)",
          activation_bytes(arch, w, True, False), "device", *fit_phases)
    if "correction" in fit_passes:
        p.add(f"EK-FAC Λ* sums (fp32{of_groups})", 4 * max(_chunk_elements(rows, c, "correction") for c in chunks),
              "device", "correction")
        copies = placement.offload != "none" or fb != 4 or w.shards > 1  # FSDP: broadcast by the owners
        bases = max(sum(4 * (rows[i]["A"] + rows[i]["S"]) // fb for i in c) for c in chunks)
        p.add("eigenbases of the group being corrected (fp32 copies)", bases if copies else 0, "device", "correction")
    name = f"curvature, {w.estimator} as stored ({placement.factor_dtype}{mine})"
    if placement.offload == "none":
        p.add(name, stored, "device", *fit_phases, "step")
        return
    p.add("curvature, one layer streamed to the device", one_layer, "device", "step")
    if placement.offload == "cpu":
        p.add(name + ", pinned host memory", stored, "cpu", *fit_phases, "step")
    else:
        p.add(name + f", on disk ({placement.offload_dir or 'curvature cache'})", stored, "disk", "all")
        p.add("curvature, one layer passing through host memory", one_layer, "cpu", *fit_phases, "step")
