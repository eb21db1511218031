"""Which tokens carry loss, which positions feed the factors, and the backward signals of each Fisher type.

For softmax cross-entropy on logits z the Gauss-Newton / Fisher output matrix is H = diag(p) − ppᵀ. A *signal*
is a vector v on the logits of the label positions that is backpropagated once; the Fisher types are sets of
signals whose outer products average to H per token (or to its empirical surrogate):

- ``mc``: v = p − e_ŷ with ŷ ~ p (``mc_samples`` draws), E[v vᵀ] = H;
- ``empirical``: v = p − e_y with the data label y (the gradient of the token's loss);
- ``exact``: v_c = √p_c (e_c − p) for every class c, Σ_c v_c v_cᵀ = H exactly. Each signal touches ONE label
  position per sequence, so per-sequence gradients have no cross-position terms (tiny vocabularies only).
"""

from __future__ import annotations

import torch

from kfade.errors import ConfigError

IGNORE_INDEX = -100
MAX_EXACT_VOCAB = 4096  # exact Fisher backpropagates once per class and label position


def label_positions(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets, fed)`` for a batch in the Hugging Face convention (labels aligned with input_ids).

    ``targets[n, s]`` is the label predicted at position s (``labels[n, s+1]``, −100 where nothing counts,
    padding included); ``fed[n, s]`` marks the positions that feed the factors: real tokens at or before the
    sequence's last label-predicting position (later positions cannot influence any loss token, their output
    gradients are zero under causal attention, so counting them in A would only dilute it).
    """
    if "labels" not in batch:
        raise ConfigError("batch", sorted(batch), "has no 'labels': curvature needs label tokens (−100 = ignored)")
    labels, mask = batch["labels"], batch.get("attention_mask")
    real = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask.bool()
    labels = labels.masked_fill(~real, IGNORE_INDEX)
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    has_later_loss = (targets != IGNORE_INDEX).flip(1).int().cummax(1).values.flip(1).bool()
    return targets, has_later_loss & real


def signals(probs: torch.Tensor, targets: torch.Tensor, rank: torch.Tensor, fisher: str, mc_samples: int,
            generator: torch.Generator) -> torch.Tensor:
    """Backward signals ``(K, N, V)`` for the N label positions with predictive ``probs`` (N, V).

    ``rank[i]`` is the index of row i among its sequence's label positions (used by ``exact`` so that one signal
    touches one position per sequence). Per token, Σ_k v_k v_kᵀ / ``signals_per_token`` estimates H.
    """
    n, vocab = probs.shape
    if fisher == "empirical":
        return (probs - _one_hot(targets, vocab, probs.dtype)).unsqueeze(0)
    if fisher == "mc":
        return probs.unsqueeze(0) - _one_hot(sample_classes(probs, mc_samples, generator), vocab, probs.dtype)
    if vocab > MAX_EXACT_VOCAB:
        raise ConfigError("curvature.fisher", fisher, f"needs one backward per class; vocabulary {vocab} > "
                          f"{MAX_EXACT_VOCAB} is too large, use 'mc'")
    eye = torch.eye(vocab, dtype=probs.dtype, device=probs.device)
    per_class = probs.sqrt().unsqueeze(2) * (eye.unsqueeze(0) - probs.unsqueeze(1))  # (N, C, V): v_c per row
    depth = int(rank.max()) + 1
    onehot_rank = _one_hot(rank, depth, probs.dtype)  # (N, J)
    out = onehot_rank.T[:, None, :, None] * per_class.permute(1, 0, 2).unsqueeze(0)  # (J, C, N, V)
    return out.reshape(depth * vocab, n, vocab)


def sample_classes(probs: torch.Tensor, draws: int, generator: torch.Generator) -> torch.Tensor:
    """``(draws, N)`` classes ~ ``probs`` rows by inverse CDF (one uniform per draw; ``torch.multinomial`` with
    replacement draws an exponential per class and costs more than the backward at LLM vocabularies)."""
    cdf = probs.cumsum(-1)
    u = torch.rand(len(probs), draws, generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1).T


def signals_per_token(fisher: str, mc_samples: int) -> int:
    """How many signals' outer products sum to one token's H (the divisor of the output-gradient sums)."""
    return mc_samples if fisher == "mc" else 1


def _one_hot(index: torch.Tensor, classes: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.nn.functional.one_hot(index, classes).to(dtype)
