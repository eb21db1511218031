"""FSDP (``distributed.strategy=fsdp``): the model sharded by torch's ``fully_shard``, and what the K-FADE path
needs around it.

``shard_model`` applies ``fully_shard`` to every decoder block and then to the root (FSDP2: each parameter
becomes a ``DTensor`` holding rows ``chunk(rank)`` of dim 0 on this rank; a block's weights are all-gathered for
its forward and backward and freed after). Parameters' gradients come from ``.backward()`` (FSDP reduce-scatters
them into sharded ``.grad``); the sharded parameters are not in the autograd graph (the forward uses unsharded
copies), so ``torch.autograd.grad`` with respect to them is not possible. Vectors over the parameters (forget
gradient, K-FADE direction, PCG vectors) stay ``DTensor`` shards: pointwise ops keep the sharding; inner
products sum the local shards and all-reduce (``kfade.curvature.cg.dot``).

Every model a run holds is sharded so: ``load_sharded`` fills a meta-device model from a checkpoint that rank 0
alone reads, ``copy_model`` builds a sharded copy from the shards (scoring, the method's copy, frozen copies).

Every rank must run the same sequence of forward and backward passes (each one all-gathers and reduce-scatters
with the others), so a data-parallel pass over a list of batches pads the shorter shards (``padded_shard``) with
passes that contribute nothing.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from kfade import distributed
from kfade.models.checkpointing import checkpointing_enabled, enable_gradient_checkpointing
from kfade.models.load import load_model, load_tokenizer, resolve_dtype

BLOCK_CONTAINERS = ("layers", "h", "blocks", "block")  # attribute names of decoder-block lists (Llama, Phi, GPT-2)


def is_sharded(model: nn.Module) -> bool:
    """True when ``model``'s parameters are FSDP shards (``DTensor``)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def shard_model(model: nn.Module) -> nn.Module:
    """``fully_shard`` every decoder block (each an ``nn.ModuleList`` item under a ``layers``/``h``/``blocks``
    attribute), then the root; in place, returned. Gradients are reduce-scattered in fp32 (fp64 for a fp64
    model). Every parameter requires grad from here on (FSDP fixes the flag of its unsharded copies once; the
    K-FADE path reads only the gradients it needs)."""
    for p in model.parameters():
        p.requires_grad_(True)
    dtype = next(model.parameters()).dtype
    policy = MixedPrecisionPolicy(reduce_dtype=torch.promote_types(dtype, torch.float32))  # gradients' sums
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rpartition(".")[2] in BLOCK_CONTAINERS:
            for block in module:
                fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy, reshard_after_forward=True)  # the root too: between passes every
    for module in model.modules():  # parameter is its shard (else named_parameters() gives the root's copies)
        if isinstance(module, FSDPModule):  # plain sums, then scaling (gloo has no NCCL PREMUL_SUM)
            module.set_force_sum_reduction_for_comms(True)
    return model


def skeleton(config, dtype: torch.dtype, generation_config=None, gradient_checkpointing: bool = False) -> nn.Module:
    """The Hugging Face causal LM of ``config`` built on the meta device (no storage), in eval mode, with
    ``generation_config`` (its stop tokens) and gradient checkpointing as given."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if generation_config is not None:
        model.generation_config = copy.deepcopy(generation_config)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model.eval()


@torch.no_grad()
def _filled(model: nn.Module, device: torch.device | str, state: dict, options: StateDictOptions,
            buffers: dict[str, torch.Tensor] | None) -> nn.Module:
    """The meta-device ``model`` sharded (:func:`shard_model`), this rank's rows allocated on ``device`` and filled
    from ``state`` (``set_model_state_dict`` with ``options``); every buffer, the ones outside the state dict
    (rotary frequencies) too, copied from ``buffers`` (None: rank > 0 of a load) and broadcast from rank 0."""
    shard_model(model)
    model.to_empty(device=device)
    set_model_state_dict(model, state, options=options)
    for name, buffer in model.named_buffers():
        if buffers is not None:
            buffer.copy_(buffers[name])
        dist.broadcast(buffer, src=0)
    return model


def load_sharded(path: str, dtype: str, device: str, key: str = "model.path",
                 gradient_checkpointing: bool = False) -> tuple[nn.Module, object]:
    """``(model, tokenizer)``: the checkpoint at ``path`` FSDP-sharded, never whole on a rank's device. Rank 0
    alone reads it into host memory (``load_model``: one whole host copy, freed after) and broadcasts it one
    tensor at a time; every rank builds the model on the meta device (rank 0's config and generation config),
    shards it and keeps its rows (``set_model_state_dict``, ``full_state_dict`` and ``broadcast_from_rank0``)."""
    tokenizer = load_tokenizer(path, key)
    whole = load_model(path, dtype, "cpu", key=key)[0] if distributed.is_main() else None
    config, generation = distributed.from_main((whole.config, whole.generation_config) if whole is not None else None)
    model = skeleton(config, resolve_dtype(dtype), generation, gradient_checkpointing)
    state = whole.state_dict() if whole is not None else {}
    buffers = dict(whole.named_buffers()) if whole is not None else None
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    return _filled(model, device, state, options, buffers), tokenizer


def copy_model(model: nn.Module) -> nn.Module:
    """A copy of ``model``: ``copy.deepcopy``, or for an FSDP model (which cannot be deep-copied) the same model
    built again on the meta device and sharded likewise, each rank copying its own rows (no communication)."""
    if not is_sharded(model):
        return copy.deepcopy(model)
    first = next(model.parameters())
    twin = skeleton(model.config, first.dtype, model.generation_config, checkpointing_enabled(model))
    buffers = dict(model.named_buffers())  # the same on every rank
    return _filled(twin, local(first).device, get_model_state_dict(model), StateDictOptions(), buffers)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (the tensor itself otherwise)."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (all-gathered on every rank for a ``DTensor``)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def row_counts(rows: int, world: int) -> list[int]:
    """Rows of dim 0 per rank as FSDP shards them (``torch.chunk``: ⌈rows/world⌉ each, the last ones shorter or
    empty)."""
    size = math.ceil(rows / world)
    return [max(0, min(size, rows - r * size)) for r in range(world)]


def like(t: torch.Tensor, sharded: torch.Tensor) -> torch.Tensor:
    """``t`` (this rank's rows) as a ``DTensor`` laid out like ``sharded``."""
    return DTensor.from_local(t, sharded.device_mesh, sharded.placements, shape=sharded.shape,
                              stride=sharded.stride(), run_check=False)


def shard_like(whole: torch.Tensor, sharded: torch.Tensor) -> torch.Tensor:
    """This rank's rows of the whole tensor ``whole`` as a ``DTensor`` laid out like ``sharded``."""
    counts = row_counts(sharded.shape[0], distributed.world_size())
    start = sum(counts[: distributed.rank()])
    return like(whole[start : start + counts[distributed.rank()]].contiguous(), sharded)


@torch.no_grad()
def assign(param: torch.Tensor, whole: torch.Tensor) -> None:
    """``param`` ← the whole tensor ``whole`` (for a ``DTensor``, this rank's rows of it)."""
    if isinstance(param, DTensor):
        param.to_local().copy_(shard_like(whole, param).to_local())
    else:
        param.copy_(whole)


def gather_rows(t: torch.Tensor, owner: int) -> torch.Tensor | None:
    """The whole tensor on rank ``owner`` from the ``DTensor`` shards ``t`` (None on the other ranks)."""
    shard = t.to_local().contiguous()
    if distributed.rank() != owner:
        dist.gather(shard, None, dst=owner)
        return None
    parts = [shard.new_empty((n, *t.shape[1:])) for n in row_counts(t.shape[0], distributed.world_size())]
    dist.gather(shard, parts, dst=owner)
    return torch.cat(parts)


def scatter_rows(whole: torch.Tensor | None, sharded: torch.Tensor, owner: int) -> torch.Tensor:
    """Rank ``owner``'s ``whole`` tensor scattered back into shards laid out like ``sharded`` (a ``DTensor``)."""
    counts = row_counts(sharded.shape[0], distributed.world_size())
    out = sharded.to_local().new_empty((counts[distributed.rank()], *sharded.shape[1:]))
    if whole is None:
        dist.scatter(out, None, src=owner)
    else:
        dist.scatter(out, [p.contiguous() for p in whole.to(out.dtype).split(counts)], src=owner)
    return like(out, sharded)


def padded_shard(items: Sequence) -> list[tuple[object, bool]]:
    """This rank's items ``items[rank::world]`` as ``(item, True)``, then ``(items[0], False)`` until every rank
    has ⌈len/world⌉: the padding passes keep the ranks' forward/backward sequences equal and add nothing."""
    world = distributed.world_size()
    mine = [(item, True) for item in list(items)[distributed.rank() :: world]]
    return mine + [(items[0], False)] * (math.ceil(len(items) / world) - len(mine))


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """Each value summed over the process group, in fp64."""
    t = torch.tensor(list(values), dtype=torch.float64, device=distributed.collective_device())
    distributed.all_reduce_([t])
    return t.tolist()


@contextlib.contextmanager
def summed_gradients(model: nn.Module) -> Iterator[None]:
    """FSDP reduce-scatters the *sum* of the ranks' gradients inside the block (its default is the mean); every
    ``.grad`` is cleared before and after."""
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    model.zero_grad(set_to_none=True)
    for m in modules:
        m.set_gradient_divide_factor(1.0)
    try:
        yield
    finally:
        for m in modules:
            m.set_gradient_divide_factor(None)  # back to FSDP's default (the mean over ranks)
        model.zero_grad(set_to_none=True)


def take_grads(model: nn.Module, names: Sequence[str], into: dict[str, torch.Tensor] | None,
               dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``into`` (None: zeros) plus the named parameters' sharded ``.grad`` at ``dtype``; every ``.grad`` is cleared
    (so a 16-bit model's gradients are summed over batches at ``dtype``, not at its own)."""
    params = dict(model.named_parameters())
    into = into if into is not None else {n: torch.zeros_like(params[n], dtype=dtype) for n in names}
    for n in names:
        if params[n].grad is not None:
            into[n] += params[n].grad.to(dtype)
    model.zero_grad(set_to_none=True)
    return into
