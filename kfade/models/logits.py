"""What a causal LM predicts at the label tokens of a batch, and the KL between two such predictions.

Labels follow the Hugging Face convention (aligned with ``input_ids``): position t's logits predict label t+1;
``-100`` marks a position that does not count. Shared by evaluation (scoring, KL to retrain) and unlearning
(losses, the retain-KL probe).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from kfade.data.formatting import IGNORE_INDEX


class LabelLogits(NamedTuple):
    """fp32 logits ``[N, V]`` at the N positions that predict a label; their labels and batch rows ``[N]``."""

    logits: torch.Tensor
    labels: torch.Tensor
    rows: torch.Tensor


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (where its input ids must live)."""
    return next(model.parameters()).device


def label_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LabelLogits:
    """One forward pass; keeps only the positions whose next-token label counts.

    Only those positions are upcast to fp32: a bf16 model never holds a full fp32 ``[B, T, V]`` tensor.
    """
    device = model_device(model)
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
    logits = model(**inputs).logits
    targets = batch["labels"][:, 1:].to(device)
    mask = targets != IGNORE_INDEX
    rows = torch.arange(targets.shape[0], device=device)[:, None].expand_as(targets)[mask]
    return LabelLogits(logits[:, :-1][mask].float(), targets[mask], rows)


def token_kl(reference_logits: torch.Tensor, logits: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """KL(softmax(reference) ‖ softmax(logits)) per row ``[N]`` (``reduction="none"``) or summed, in nats; both
    ``[N, V]`` fp32; the gradient flows to ``logits``."""
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(reference_logits, -1), log_target=True,
                  reduction="none").sum(-1)
    return kl if reduction == "none" else kl.sum()
