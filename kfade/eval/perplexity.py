"""Perplexity of a causal LM on text: exp(mean NLL per label token), the NLL in nats.

Token-weighted over all batches (independent of batching and padding); logits upcast to fp32.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from kfade.errors import ConfigError
from kfade.eval.modes import evaluating
from kfade.models.logits import label_logits


def perplexity(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """exp(Σ NLL / number of label tokens) over ``batches``."""
    total, tokens = 0.0, 0
    with evaluating(model):
        for batch in batches:
            out = label_logits(model, batch)
            total += F.cross_entropy(out.logits, out.labels, reduction="sum").double().item()
            tokens += out.labels.numel()
    if tokens == 0:
        raise ConfigError("batches", tokens, "no label tokens (labels all -100): perplexity is undefined")
    return math.exp(total / tokens)
