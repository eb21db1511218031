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
from transformers import DynamicCache

from kfade.data.formatting import IGNORE_INDEX, QAFormatter, collate, left_pad, pad_id
from kfade.errors import ConfigError
from kfade.eval.modes import evaluating
from kfade.models.logits import LabelLogits, label_logits, model_device


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
    return _mean_losses(label_batches(model, formatter, questions, answers, batch_size, progress), len(questions))


def _mean_losses(batches: Iterator[tuple[list[int], LabelLogits]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per item of ``batches`` (``label_batches``' items and logits): mean token NLL and answer-token count."""
    losses, counts = np.zeros(n), np.zeros(n, dtype=np.int64)
    for items, (logits, targets, rows) in batches:
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
    """``answer_losses`` for several answers per question (TOFU: the answer, its paraphrase, the perturbed
    answers), split back per question. Each question's prompt runs once (``shared_prompt_batches``)."""
    if len(questions) != len(answer_groups):
        raise ConfigError("answer_groups", len(answer_groups),
                          f"need one answer list per question ({len(questions)} questions)")
    if not answer_groups:
        return [], []
    sizes = [len(group) for group in answer_groups]
    losses, counts = _mean_losses(shared_prompt_batches(model, formatter, questions, answer_groups, batch_size,
                                                        progress), sum(sizes))
    bounds = np.cumsum(sizes)[:-1]
    return np.split(losses, bounds), np.split(counts, bounds)


def shared_prompt_batches(model: torch.nn.Module, formatter: QAFormatter, questions: Sequence[str],
                          answer_groups: Sequence[Sequence[str]], batch_size: int = 32,
                          progress: bool = False) -> Iterator[tuple[list[int], LabelLogits]]:
    """As ``label_batches`` for the pairs (questions[i], a) of every a in answer_groups[i], numbered in that order,
    with each question's prompt run once: two forward passes a batch instead of one over whole sequences.

    The prompts, left-padded (positions count real tokens only), fill a KV cache and keep only their last logits
    (which predict the first answer token); the cache is copied to each answer's row, and the right-padded answers
    continue from their own prompt's length. A batch holds at most ``batch_size`` prompts and ``batch_size``
    answers (a question with more answers is split). Same numbers as ``label_batches`` up to float rounding.
    """
    prompts = [formatter.prompt_ids(q) for q in questions]
    kept, units, item = [], [], 0  # kept: each pair's answer tokens after max_length truncation
    for i, group in enumerate(answer_groups):
        room = formatter.max_length - len(prompts[i])
        for start in range(0, len(group), batch_size):
            answers = [formatter.answer_ids(a)[:max(room, 0)] for a in group[start:start + batch_size]]
            if not all(answers):
                raise ConfigError("max_length", formatter.max_length,
                                  f"item {item} keeps no answer tokens after truncation; raise max_length")
            kept += answers
            units.append((i, list(range(item, item + len(answers)))))
            item += len(answers)
    units.sort(key=lambda unit: -len(prompts[unit[0]]))  # longest prompts first: less padding
    chunks, chunk = [], []
    for unit in units:
        if chunk and sum(len(items) for _, items in chunk) + len(unit[1]) > batch_size:
            chunks.append(chunk)
            chunk = []
        chunk.append(unit)
    chunks += [chunk] if chunk else []
    device, pad = model_device(model), pad_id(formatter.tokenizer)
    with evaluating(model):
        for chunk in tqdm(chunks, desc="answer losses", disable=not progress, leave=False):
            ids, mask = (t.to(device) for t in left_pad([prompts[i] for i, _ in chunk], pad))
            cache = DynamicCache(config=model.config)
            first = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                          cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            items = [k for _, unit_items in chunk for k in unit_items]
            owner = torch.tensor([u for u, (_, unit_items) in enumerate(chunk) for _ in unit_items], device=device)
            cache.reorder_cache(owner)
            answers = collate([{"input_ids": kept[k], "labels": kept[k]} for k in items], pad)
            answer_ids, answer_mask = answers["input_ids"].to(device), answers["attention_mask"].to(device)
            positions = mask.sum(-1)[owner][:, None] + torch.arange(answer_ids.shape[1], device=device)
            logits = model(input_ids=answer_ids, attention_mask=torch.cat([mask[owner], answer_mask], -1),
                           position_ids=positions, cache=cache, use_cache=True).logits
            predicting = torch.cat([first[owner][:, None], logits[:, :-1]], 1)  # position t predicts answer token t
            real = answer_mask.bool()
            rows = torch.arange(len(items), device=device)[:, None].expand_as(answer_ids)[real]
            yield items, LabelLogits(predicting[real].float(), answer_ids[real], rows)
