"""Evaluation mode: ``eval()`` and no autograd inside, each module's training flag restored after."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def evaluating(*models: torch.nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode under ``torch.no_grad``; restore every ``training`` flag on exit."""
    flags = [{m: m.training for m in model.modules()} for model in models]
    try:
        for model in models:
            model.eval()
        with torch.no_grad():
            yield
    finally:
        for saved in flags:
            for module, training in saved.items():
                module.training = training
