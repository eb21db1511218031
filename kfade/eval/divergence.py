"""Output-space distance to a reference (retrained) model: mean per-token KL(p_reference ‖ p_model).

KL(p ‖ q) = Σ_v p(v) (log p(v) − log q(v)) in nats, over the next-token distributions at every label token
(labels ≠ -100) of the batches, averaged over all those tokens. Logits are upcast to fp32 before the softmax,
so the two models may have any dtypes (and devices). A KL is ≥ 0; the fp32 rounding of identical distributions
can make a mean slightly negative (−6.6e-09 was seen), so the reported mean is clamped at 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from tqdm.auto import tqdm

from kfade.errors import ConfigError
from kfade.eval.modes import evaluating
from kfade.models.logits import label_logits, token_kl


def mean_token_kl(reference_model: torch.nn.Module, model: torch.nn.Module,
                  batches: Iterable[dict[str, torch.Tensor]], progress: bool = False) -> float:
    """Mean over label tokens of KL(p_reference ‖ p_model), nats per token."""
    return mean_token_kls({"kl": reference_model}, model, batches, progress)["kl"]


def mean_token_kls(references: Mapping[str, torch.nn.Module], model: torch.nn.Module,
                   batches: Iterable[dict[str, torch.Tensor]], progress: bool = False) -> dict[str, float]:
    """``mean_token_kl`` of ``model`` against each named reference model, one forward pass of ``model`` a batch."""
    totals, tokens = dict.fromkeys(references, 0.0), 0
    with evaluating(model, *references.values()):
        for batch in tqdm(batches, desc="KL to reference", disable=not progress, leave=False):
            logits = label_logits(model, batch).logits
            for name, reference_model in references.items():
                reference_logits = label_logits(reference_model, batch).logits
                if logits.shape[-1] != reference_logits.shape[-1]:
                    raise ConfigError("model", logits.shape[-1], "vocabulary size differs from the reference "
                                      f"model's ({reference_logits.shape[-1]})")
                kl = token_kl(reference_logits, logits.to(reference_logits.device), reduction="none")
                totals[name] += kl.double().sum().item()
            tokens += len(logits)
    if tokens == 0:
        raise ConfigError("batches", tokens, "no label tokens (labels all -100): the mean KL is undefined")
    return {name: max(total / tokens, 0.0) for name, total in totals.items()}
