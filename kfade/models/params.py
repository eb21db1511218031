"""Which parameters require grad: a context manager shared by the curvature products and the methods."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


@contextlib.contextmanager
def requires_grad_only(model: torch.nn.Module, names: Sequence[str]) -> Iterator[list[torch.nn.Parameter]]:
    """Within the block exactly the named parameters require grad (yielded in order); flags restored after."""
    wanted = set(names)
    params = dict(model.named_parameters())
    before = {n: p.requires_grad for n, p in params.items()}
    try:
        for n, p in params.items():
            p.requires_grad_(n in wanted)
        yield [params[n] for n in names]
    finally:
        for n, p in params.items():
            p.requires_grad_(before[n])
