"""Token-level losses shared by the unlearning methods (in nats; logits upcast to fp32 before the softmax).

Labels follow the Hugging Face convention: ``logits[:, t]`` predicts ``labels[:, t + 1]``; -100 is ignored.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kfade import distributed, fsdp
from kfade.errors import ConfigError
from kfade.models.logits import label_logits, token_kl
from kfade.models.params import requires_grad_only
from kfade.unlearn.base import Batch, UnlearnData, count_label_tokens

FORGET_TARGET = "target_logprobs"  # forget-batch key: a non-knowing model's log-probs at the label positions [N, V]
OWN_TARGET = "target_own_no_answer"  # forget-batch flag: the target is the model's own prediction without the answer,
#                                      taken from the same forward pass (exact while the weights are the start's)
FORGET_LOSSES = ("nll", "kl_base", "kl_no_answer")  # method.forget_loss (see with_forget_targets)


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


class ForgetScores(NamedTuple):
    """L_f (``nll``: mean NLL per label token, nats) and ``prob``: the mean over sequences of P̄ = exp(−mean
    label-token NLL of the sequence), TOFU's ``<set>/prob``."""

    nll: float
    prob: float


class _ScoreSums:
    """Running sums of one pass over batches: token NLL sum and count, per-sequence P̄ values."""

    def __init__(self):
        self.nll, self.tokens, self.probs = 0.0, 0, []

    def add(self, token_nll: torch.Tensor, rows: torch.Tensor, n_rows: int) -> None:
        token_nll = token_nll.detach()
        self.nll += token_nll.sum().item()
        self.tokens += token_nll.numel()
        total = torch.zeros(n_rows, dtype=token_nll.dtype, device=token_nll.device).index_add(0, rows, token_nll)
        count = torch.zeros_like(total).index_add(0, rows, torch.ones_like(token_nll))
        self.probs += torch.exp(-total[count > 0] / count[count > 0]).tolist()

    def scores(self, over_ranks: bool = False) -> ForgetScores:
        """The scores of the batches seen here, or with ``over_ranks`` of those seen by every rank."""
        sums = [self.nll, self.tokens, sum(self.probs), len(self.probs)]
        nll, tokens, probs, count = fsdp.sum_over_ranks(sums) if over_ranks else sums
        return ForgetScores(nll / tokens, probs / count)


def _token_nll(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    out = label_logits(model, batch)
    return F.cross_entropy(out.logits, out.labels, reduction="none"), out.rows


def without_answer(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [N, V] of ``logits`` with each row's label token removed (its logit set 30 below the row's
    minimum, so its probability is ~e⁻³⁰ of the least likely token's) and the rest renormalised."""
    logits = logits.clone()
    logits[torch.arange(len(labels), device=logits.device), labels] = logits.min(-1).values - 30.0
    return logits.log_softmax(-1)


def _forget_terms(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per label token: (the forget objective to ascend, the NLL, the row index). The objective is the NLL, or, for
    a batch carrying ``FORGET_TARGET`` log-probabilities q (or flagged ``OWN_TARGET``: q from this pass's own
    logits, detached), −KL(q ‖ p_θ): ascending it moves the answers towards the target (``method.forget_loss``: a
    model that never learnt them, or the model's own guess without the answer)."""
    out = label_logits(model, batch)
    token_nll = F.cross_entropy(out.logits, out.labels, reduction="none")
    if batch.get(OWN_TARGET):
        target = without_answer(out.logits.detach(), out.labels)
    elif FORGET_TARGET in batch:
        target = batch[FORGET_TARGET].to(out.logits.device)
    else:
        return token_nll, token_nll, out.rows
    return -token_kl(target, out.logits, reduction="none"), token_nll, out.rows


@torch.no_grad()
def with_answer_logprobs(model: torch.nn.Module, batches: Sequence[Batch], no_answer: bool = False) -> list[Batch]:
    """``batches`` carrying ``FORGET_TARGET`` (in host memory: label tokens × vocabulary fp32 values): ``model``'s
    next-token log-probabilities at each label position; ``no_answer``: with the label's token removed
    (``without_answer``). ConfigError, before any pass, when they would take over half the machine's memory."""
    tokens, vocab = count_label_tokens(batches), model.get_output_embeddings().weight.shape[0]
    need, host = tokens * vocab * 4, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > host / 2:
        raise ConfigError("method.forget_loss", "kl_no_answer" if no_answer else "kl_base",
                          f"its forget targets need {need / 1e9:.1f} GB of host memory ({tokens} "
                          f"forget tokens × {vocab} vocabulary × 4 bytes), over half of this machine's "
                          f"{host / 1e9:.1f} GB; use one K-FADE step (method=kfade_direct: nothing stored), "
                          "method.forget_loss=nll, or a smaller forget set")
    out_batches = []
    for batch in batches:
        out = label_logits(model, batch)
        target = without_answer(out.logits, out.labels) if no_answer else out.logits.log_softmax(-1)
        out_batches.append({**batch, FORGET_TARGET: target.cpu()})
    return out_batches


def with_forget_targets(forget_loss: str, model: torch.nn.Module, data: UnlearnData, once: bool = False
                        ) -> UnlearnData:
    """The data a forget loss trains on. ``kl_no_answer``: the forget batches carry the starting ``model``'s own
    log-probabilities without the answer (``with_answer_logprobs``): keep what the model predicted there, except the
    answer; with ``once`` (the objective is used at the starting weights only: a single K-FADE step) they are only
    flagged ``OWN_TARGET`` and nothing is stored. ``kl_base``: the batches must carry the base model's already
    (``kfade.suites.Suite.with_forget_targets``; ConfigError otherwise). ``nll``: ``data`` unchanged."""
    if forget_loss == "kl_base" and any(FORGET_TARGET not in b for b in data.forget):
        raise ConfigError("method.forget_loss", forget_loss, f"the forget batches carry no {FORGET_TARGET} "
                          "(kfade.suites.Suite.with_forget_targets adds the base model's)")
    if forget_loss != "kl_no_answer":
        return data
    if once:
        return dataclasses.replace(data, forget=[{**b, OWN_TARGET: True} for b in data.forget])
    return dataclasses.replace(data, forget=with_answer_logprobs(model, data.forget, no_answer=True))


def forget_objective(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The forget objective L_f of one batch, mean per label token (differentiable; see ``_forget_terms``)."""
    if FORGET_TARGET not in batch and not batch.get(OWN_TARGET):
        return mean_token_nll(model, batch)
    objective = _forget_terms(model, batch)[0]
    return objective.sum() / max(objective.numel(), 1)


@torch.no_grad()
def forget_scores(model: torch.nn.Module, batches: Sequence[Batch]) -> ForgetScores:
    """L_f and the mean answer P̄ over all ``batches`` in one pass (token-weighted L_f: batching-independent)."""
    sums = _ScoreSums()
    for batch in batches:
        sums.add(*_token_nll(model, batch), batch["labels"].shape[0])
    return sums.scores()


def mean_answer_prob(model: torch.nn.Module, batches: Sequence[Batch]) -> float:
    """Mean over sequences of P̄ = exp(−mean label-token NLL of the sequence): TOFU's ``<set>/prob``."""
    return forget_scores(model, batches).prob


def forget_nll(model: torch.nn.Module, batches: Sequence[Batch]) -> float:
    """L_f: mean NLL per label token over all ``batches`` (token-weighted, so independent of batching)."""
    return forget_scores(model, batches).nll


def forget_gradient(model: torch.nn.Module, batches: Sequence[Batch], names: Sequence[str],
                    progress: bool = False, scale: float = 1.0, into: dict[str, torch.Tensor] | None = None
                    ) -> tuple[dict[str, torch.Tensor], ForgetScores]:
    """(``into`` + ``scale``·∇L_f for the named parameters, the scores of the same pass) with L_f the mean label-token
    NLL over all ``batches`` (or −KL(target ‖ p_θ) for batches carrying ``FORGET_TARGET``; the scores stay NLL and
    P̄). ``into`` (None: zeros) is accumulated in place, so a second objective adds no gradient-sized buffer.

    Gradients are accumulated in fp32 (fp64 for fp64 parameters). Each minibatch contributes
    Σ_batch NLL / N_total, so the accumulated gradient equals the full-set mean's whatever the batch size.
    """
    if distributed.world_size() > 1 and fsdp.is_sharded(model):
        return _sharded_forget_gradient(model, batches, names, progress, scale, into)
    total = count_label_tokens(batches)
    grads, sums = None if into is None else [into[n] for n in names], _ScoreSums()
    with requires_grad_only(model, names) as params:
        for batch in tqdm(batches, desc="forget gradient", leave=False, disable=not progress):
            objective, token_nll, rows = _forget_terms(model, batch)
            parts = torch.autograd.grad(objective.sum() / total * scale, params)  # × 1.0 is exact
            if grads is None:
                grads = [g.to(torch.promote_types(g.dtype, torch.float32)) for g in parts]
            else:
                for acc, g in zip(grads, parts, strict=True):
                    acc.add_(g)
            sums.add(token_nll, rows, batch["labels"].shape[0])
    return dict(zip(names, grads, strict=True)), sums.scores()


def _sharded_forget_gradient(model: torch.nn.Module, batches: Sequence[Batch], names: Sequence[str],
                             progress: bool, scale: float, into: dict[str, torch.Tensor] | None
                             ) -> tuple[dict[str, torch.Tensor], ForgetScores]:
    """``forget_gradient`` on an FSDP model: each rank backpropagates its shard of the batches (padded with
    zero-weight passes); FSDP sums the gradients over the ranks into ``DTensor`` row shards."""
    total, grads, sums = count_label_tokens(batches), into, _ScoreSums()
    dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
    with fsdp.summed_gradients(model):
        for batch, real in tqdm(fsdp.padded_shard(batches), desc="forget gradient", leave=False,
                                disable=not progress):
            objective, token_nll, rows = _forget_terms(model, batch)
            (objective.sum() * (float(real) / total) * scale).backward()
            grads = fsdp.take_grads(model, names, grads, dtype)
            if real:
                sums.add(token_nll, rows, batch["labels"].shape[0])
    return grads, sums.scores(over_ranks=True)


class RetainKLProbe:
    """Mean per-token KL(p_start ‖ p_θ) over the label tokens of a few batches (retain eval batches for logging,
    fitting batches for K-FADE's checks), in nats per token.

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
        return max(total / self.tokens, 0.0)  # fp32 rounding of equal distributions can dip below 0
