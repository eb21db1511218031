"""torch.distributed helpers for data-parallel curvature fits and Gauss-Newton products (torchrun, accelerate).

Without an initialised process group every helper is the single-process identity (rank 0 of 1). Under torchrun
(``WORLD_SIZE`` > 1) ``init_from_env`` starts the group: NCCL when CUDA is available (one device per local rank),
gloo on CPU. Each rank takes its shard ``items[rank::world]`` of the fitting / product batches. With
``strategy=replicate`` every rank holds the whole model and every factor: sums are all-reduced, so every rank
ends with the same result, and only rank 0 writes files. With ``strategy=fsdp`` the model is sharded by
``fully_shard`` (``kfade.fsdp``) and each rank owns the factors of some layers (``kfade.curvature.sharded``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kfade.errors import ConfigError, require_one_of

STRATEGIES = ("replicate", "fsdp")


@dataclass
class DistributedConfig:
    """``distributed.*``: how torchrun's processes share the work (one process: nothing to share)."""

    strategy: str = "replicate"  # replicate (whole model and factors on every rank) | fsdp (sharded: kfade.fsdp)
    world_size: int | None = None  # processes: null = torchrun's WORLD_SIZE; a dry run plans for this many

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        require_one_of("distributed.strategy", self.strategy, STRATEGIES)
        if self.world_size is not None and int(self.world_size) < 1:
            raise ConfigError("distributed.world_size", self.world_size, "must be >= 1 or null (torchrun's)")

    def planned_world(self) -> int:
        """The world size a plan is for: ``world_size``, else torchrun's ``WORLD_SIZE`` (1 without torchrun)."""
        return int(self.world_size) if self.world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))

    def check_launch(self) -> None:
        """ConfigError unless this process was launched as configured (called before any work, not for plans)."""
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if self.world_size is not None and int(self.world_size) != launched:
            raise ConfigError("distributed.world_size", self.world_size, f"but torchrun started {launched} "
                              "process(es) (WORLD_SIZE); set it to that, or null")
        if self.strategy == "fsdp" and launched < 2:
            raise ConfigError("distributed.strategy", self.strategy, "needs torchrun with ≥ 2 processes, e.g. "
                              "torchrun --nproc_per_node=8 experiments/run.py … (WORLD_SIZE is 1 here); plan it "
                              "with dry_run=true distributed.world_size=N")


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env() -> bool:
    """Start the process group from torchrun's environment when ``WORLD_SIZE`` > 1 (True if one is running)."""
    if is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def shard(items: Iterable) -> Iterable:
    """This rank's share of ``items``: every ``world``-th item from index ``rank`` (``items`` itself, untouched,
    in a single process)."""
    return items if world_size() == 1 else list(items)[rank() :: world_size()]


def barrier() -> None:
    if is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. filling a cache); the others run it after, reading what it wrote."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def all_reduce_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over the process group, in place (no-op without one)."""
    if is_initialized():
        for t in tensors:
            dist.all_reduce(t)


def collective_device() -> str:
    """Where tensors for this backend's collectives live: ``cuda`` under NCCL, else ``cpu``."""
    return "cuda" if is_initialized() and dist.get_backend() == "nccl" else "cpu"


def from_main(value):
    """Rank 0's ``value`` (any picklable object) on every rank; ``value`` itself without a process group."""
    if not is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def maximum(value: int) -> int:
    """The largest ``value`` passed by any rank."""
    if not is_initialized():
        return value
    t = torch.tensor([value], device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def agree(value: int) -> int:
    """``value`` if every rank passes the same one, else −1 (e.g. ranks resuming from different checkpoints)."""
    if not is_initialized():
        return value
    low = torch.tensor([value], device=collective_device())
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return value if int(low) == int(high) else -1
