"""Per-item answer losses: mean token NLL of an answer given its question (TOFU's ``avg_gt_loss``).

For item i with answer tokens y_1..y_n (the labels ≠ -100 of ``QAFormatter.encode``: the answer and its
EOS), ``loss_i = -(1/n) Σ_t log p(y_t | prompt, y_<t)`` in nats per token, so P̄(a|q) = exp(-loss_i). Items
are sorted by length before batching (less padding) and returned in input order; right padding under a causal
attention mask does not change the numbers, so the batch size only changes floating-point noise.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kfade.data.formatting import IGNORE_INDEX, QAFormatter, collate, pad_id
from kfade.errors import ConfigError
from kfade.eval.modes import evaluating
from kfade.models.logits import LabelLogits, label_logits


def label_batches(model: torch.nn.Module, formatter: QAFormatter, questions: Sequence[str], answers: Sequence[str],
                  batch_size: int = 32, progress: bool = False) -> Iterator[tuple[list[int], LabelLogits]]:
    """One eval-mode forward pass per batch of (question, answer) pairs batched by length: the input indices of the
    batch's rows and its :class:`~kfade.models.logits.LabelLogits` (``rows`` index into those indices)."""
    if len(questions) != len(answers):
        raise ConfigError("answers", len(answers), f"need one per question ({len(questions)} questions)")
    features = [formatter.encode(q, a) for q, a in zip(questions, answers, strict=True)]
    for i, f in enumerate(features):
        if all(label == IGNORE_INDEX for label in f["labels"][1:]):
            raise ConfigError("max_length", formatter.max_length,
                              f"item {i} keeps no answer tokens after truncation; raise max_length")
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    with evaluating(model):
        for items in tqdm(chunks, desc="answer losses", disable=not progress, leave=False):
            yield items, label_logits(model, collate([features[i] for i in items], pad_id(formatter.tokenizer)))


def answer_losses(model: torch.nn.Module, formatter: QAFormatter, questions: Sequence[str],
                  answers: Sequence[str], batch_size: int = 32,
                  progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Mean token NLL (nats) of each ``answers[i]`` given ``questions[i]``, and its answer-token count.

    Returns ``(losses float64 [n], counts int64 [n])``; ``losses * counts`` is the summed NLL (``gt_loss``).
    """
    losses, counts = np.zeros(len(questions)), np.zeros(len(questions), dtype=np.int64)
    for items, (logits, targets, rows) in label_batches(model, formatter, questions, answers, batch_size, progress):
        nll = F.cross_entropy(logits, targets, reduction="none").double()
        row_sums = torch.zeros(len(items), dtype=torch.float64, device=nll.device).index_add_(0, rows, nll)
        row_counts = torch.bincount(rows, minlength=len(items))
        losses[items], counts[items] = (row_sums / row_counts).cpu().numpy(), row_counts.cpu().numpy()
    return losses, counts


class TokenStats(NamedTuple):
    """Per answer token t of one item (float64 / bool ``[n]``): log p(y_t), the mean μ_t and standard deviation σ_t
    of log p(z) under z ~ p(·|prompt, y_<t) (nats), and whether y_t is the argmax prediction."""

    logprob: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    hit: np.ndarray


def answer_token_stats(model: torch.nn.Module, formatter: QAFormatter, questions: Sequence[str],
                       answers: Sequence[str], batch_size: int = 32, progress: bool = False) -> list[TokenStats]:
    """:class:`TokenStats` of each answer's tokens given its question, in input order, without the closing EOS
    (as OpenUnlearning's token-wise metrics: the EOS is no part of the fact).

    μ_t = Σ_z p(z) log p(z), σ_t² = Σ_z p(z) (log p(z))² − μ_t² (clamped at 1e-6 before the square root).
    """
    eos = formatter.tokenizer.eos_token_id
    out: list[TokenStats | None] = [None] * len(questions)
    for items, (logits, targets, rows) in label_batches(model, formatter, questions, answers, batch_size, progress):
        logp = F.log_softmax(logits.double(), -1)
        mean = (logp.exp() * logp).sum(-1)
        std = ((logp.exp() * logp.square()).sum(-1) - mean.square()).clamp_min(1e-6).sqrt()
        columns = [t.cpu().numpy() for t in (logp.gather(-1, targets[:, None])[:, 0], mean, std,
                                             logits.argmax(-1) == targets)]
        rows, targets = rows.cpu().numpy(), targets.cpu().numpy()
        for r, item in enumerate(items):
            keep = np.flatnonzero(rows == r)
            if len(keep) > 1 and targets[keep[-1]] == eos:
                keep = keep[:-1]
            out[item] = TokenStats(*(c[keep] for c in columns))
    return out


def grouped_answer_losses(model: torch.nn.Module, formatter: QAFormatter, questions: Sequence[str],
                          answer_groups: Sequence[Sequence[str]], batch_size: int = 32,
                          progress: bool = False) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``answer_losses`` for several answers per question (e.g. TOFU's perturbed answers), batched together.

    All (question, answer) pairs are scored in one flat pass and split back per question.
    """
    if len(questions) != len(answer_groups):
        raise ConfigError("answer_groups", len(answer_groups),
                          f"need one answer list per question ({len(questions)} questions)")
    if not answer_groups:
        return [], []
    flat_questions = [q for q, group in zip(questions, answer_groups, strict=True) for _ in group]
    flat_answers = [a for group in answer_groups for a in group]
    losses, counts = answer_losses(model, formatter, flat_questions, flat_answers, batch_size, progress)
    bounds = np.cumsum([len(group) for group in answer_groups])[:-1]
    return np.split(losses, bounds), np.split(counts, bounds)
