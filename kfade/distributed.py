"""torch.distributed helpers for data-parallel curvature fits and Gauss-Newton products (torchrun, accelerate).

Without an initialised process group every helper is the single-process identity (rank 0 of 1). Under torchrun
(``WORLD_SIZE`` > 1) ``init_from_env`` starts the group: NCCL when CUDA is available (one device per local rank),
gloo on CPU. Each rank takes its shard ``items[rank::world]`` of the fitting / product batches; sums are
all-reduced, so every rank ends with the same result; only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist


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


def agree(value: int) -> int:
    """``value`` if every rank passes the same one, else −1 (e.g. ranks resuming from different checkpoints)."""
    if not is_initialized():
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    low = torch.tensor([value], device=device)
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return value if int(low) == int(high) else -1
