"""Token-level losses shared by the unlearning methods (in nats; logits upcast to fp32 before the softmax).

Labels follow the Hugging Face convention: ``logits[:, t]`` predicts ``labels[:, t + 1]``; -100 is ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kfade.models.logits import label_logits, token_kl
from kfade.models.params import requires_grad_only
from kfade.unlearn.base import Batch, count_label_tokens


def token_nll_sum(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """(Σ NLL over the batch's label tokens, their count)."""
    out = label_logits(model, batch)
    return F.cross_entropy(out.logits, out.labels, reduction="sum"), out.labels.numel()


def mean_token_nll(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean NLL per label token of one batch (differentiable)."""
    total, count = token_nll_sum(model, batch)
    return total / max(count, 1)


def sequence_logprob(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """log π(y|x) per sequence ``[B]``: the sum of label-token log-probabilities (differentiable)."""
    out = label_logits(model, batch)
    token_logp = -F.cross_entropy(out.logits, out.labels, reduction="none")
    return torch.zeros(batch["labels"].shape[0], device=token_logp.device).index_add(0, out.rows, token_logp)


@torch.no_grad()
def mean_answer_prob(model: torch.nn.Module, batches: Sequence[Batch]) -> float:
    """Mean over sequences of P̄ = exp(−mean label-token NLL of the sequence): TOFU's ``<set>/prob``."""
    probs = []
    for batch in batches:
        out = label_logits(model, batch)
        nll = F.cross_entropy(out.logits, out.labels, reduction="none")
        rows = batch["labels"].shape[0]
        total = torch.zeros(rows, device=nll.device).index_add(0, out.rows, nll)
        count = torch.zeros(rows, device=nll.device).index_add(0, out.rows, torch.ones_like(nll))
        probs += torch.exp(-total[count > 0] / count[count > 0]).tolist()
    return sum(probs) / len(probs)


@torch.no_grad()
def forget_nll(model: torch.nn.Module, batches: Sequence[Batch]) -> float:
    """L_f: mean NLL per label token over all ``batches`` (token-weighted, so independent of batching)."""
    sums = [token_nll_sum(model, b) for b in batches]
    return sum(s.item() for s, _ in sums) / sum(n for _, n in sums)


def forget_gradient(model: torch.nn.Module, batches: Sequence[Batch], names: Sequence[str],
                    progress: bool = False) -> tuple[dict[str, torch.Tensor], float]:
    """(∇L_f for the named parameters, L_f) with L_f the mean label-token NLL over all ``batches``.

    Gradients are accumulated in fp32 (fp64 for fp64 parameters). Each minibatch contributes
    Σ_batch NLL / N_total, so the accumulated gradient equals the full-set mean's whatever the batch size.
    """
    total = count_label_tokens(batches)
    grads, loss_sum = None, 0.0
    with requires_grad_only(model, names) as params:
        for batch in tqdm(batches, desc="forget gradient", leave=False, disable=not progress):
            nll, _ = token_nll_sum(model, batch)
            parts = torch.autograd.grad(nll / total, params)
            if grads is None:
                grads = [g.to(torch.promote_types(g.dtype, torch.float32)) for g in parts]
            else:
                for acc, g in zip(grads, parts, strict=True):
                    acc.add_(g)
            loss_sum += nll.item()
    return dict(zip(names, grads, strict=True)), loss_sum / total


class RetainKLProbe:
    """Mean per-token KL(p_start ‖ p_θ) over the label tokens of a few retain batches, in nats per token.

    The starting model's logits at those tokens are cached at construction, so no frozen copy is kept.
    An empty probe measures NaN (nothing to measure).
    """

    @torch.no_grad()
    def __init__(self, model: torch.nn.Module, batches: Sequence[Batch]):
        self.batches = list(batches)
        self.reference = [label_logits(model, b).logits for b in self.batches]
        self.tokens = sum(r.shape[0] for r in self.reference)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> float:
        if self.tokens == 0:
            return float("nan")
        total = sum(token_kl(ref, label_logits(model, b).logits).item()
                    for ref, b in zip(self.reference, self.batches, strict=True))
        return total / self.tokens
