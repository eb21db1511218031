"""Per-item answer losses: mean token NLL of an answer given its question (TOFU's ``avg_gt_loss``).

For item i with answer tokens y_1..y_n (the labels ≠ -100 of ``QAFormatter.encode``: the answer and its
EOS), ``loss_i = -(1/n) Σ_t log p(y_t | prompt, y_<t)`` in nats per token, so P̄(a|q) = exp(-loss_i). Items
are sorted by length before batching (less padding) and returned in input order; right padding under a causal
attention mask does not change the numbers, so the batch size only changes floating-point noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kfade.data.formatting import IGNORE_INDEX, QAFormatter, batched, pad_id
from kfade.errors import ConfigError
from kfade.eval.modes import evaluating
from kfade.models.logits import label_logits


def answer_losses(model: torch.nn.Module, formatter: QAFormatter, questions: Sequence[str],
                  answers: Sequence[str], batch_size: int = 32,
                  progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Mean token NLL (nats) of each ``answers[i]`` given ``questions[i]``, and its answer-token count.

    Returns ``(losses float64 [n], counts int64 [n])``; ``losses * counts`` is the summed NLL (``gt_loss``).
    """
    if len(questions) != len(answers):
        raise ConfigError("answers", len(answers), f"need one per question ({len(questions)} questions)")
    features = [formatter.encode(q, a) for q, a in zip(questions, answers, strict=True)]
    for i, f in enumerate(features):
        if all(label == IGNORE_INDEX for label in f["labels"][1:]):
            raise ConfigError("max_length", formatter.max_length,
                              f"item {i} keeps no answer tokens after truncation; raise max_length")
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    batches = batched([features[i] for i in order], batch_size, pad_id(formatter.tokenizer))
    sums, counts = [], []
    with evaluating(model):
        for batch in tqdm(batches, desc="answer losses", disable=not progress, leave=False):
            logits, targets, rows = label_logits(model, batch)
            nll = F.cross_entropy(logits, targets, reduction="none").double()
            n_rows = batch["input_ids"].shape[0]
            row_sums = torch.zeros(n_rows, dtype=torch.float64, device=nll.device).index_add_(0, rows, nll)
            sums.append(row_sums.cpu())
            counts.append(torch.bincount(rows, minlength=n_rows).cpu())
    loss_sorted = (torch.cat(sums) / torch.cat(counts)).numpy() if batches else np.zeros(0)
    count_sorted = torch.cat(counts).numpy() if batches else np.zeros(0, dtype=np.int64)
    losses, token_counts = np.empty(len(order)), np.empty(len(order), dtype=np.int64)
    losses[order], token_counts[order] = loss_sorted, count_sorted
    return losses, token_counts


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
