"""Turn QA pairs and plain text into model batches.

A batch is a dict of equal-shaped ``[B, T]`` tensors: ``input_ids``, ``attention_mask`` (1 = real token) and
``labels`` aligned with ``input_ids`` (Hugging Face convention: the model shifts them), where ``-100`` marks a
position that does not count. For QA only the answer tokens (and the closing EOS) count; for corpora every real
token does. Sequences are right-padded with the tokenizer's pad token.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100
PLAIN_TEMPLATE = "Question: {question}\nAnswer:"


@dataclass
class QAFormatter:
    """Formats ``question`` → prompt with the tokenizer's chat template when it has one, else ``PLAIN_TEMPLATE``.

    The prompt and the answer are tokenized separately (answer with a leading space, no special tokens, then
    EOS), so the answer tokens are the same in every context and the label mask is exact.
    """

    tokenizer: object
    max_length: int = 256
    _prompt_ids: dict[str, list[int]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def prompt(self, question: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
        return PLAIN_TEMPLATE.format(question=question)

    def prompt_ids(self, question: str) -> list[int]:
        """The prompt's token ids (a fresh list; tokenized once per question: TOFU scores up to 7 answers each)."""
        if question not in self._prompt_ids:
            templated = bool(getattr(self.tokenizer, "chat_template", None))
            ids = self.tokenizer(self.prompt(question), add_special_tokens=False)["input_ids"]
            bos = self.tokenizer.bos_token_id
            if not templated and bos is not None and (not ids or ids[0] != bos):
                ids = [bos, *ids]
            self._prompt_ids[question] = ids
        return list(self._prompt_ids[question])

    def answer_ids(self, answer: str) -> list[int]:
        ids = self.tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        return ids + ([eos] if eos is not None else [])

    def encode(self, question: str, answer: str) -> dict[str, list[int]]:
        """Token ids and labels (``-100`` on the prompt) for one QA pair, truncated to ``max_length``."""
        prompt, answer_ids = self.prompt_ids(question), self.answer_ids(answer)
        input_ids = (prompt + answer_ids)[: self.max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + answer_ids)[: self.max_length]
        return {"input_ids": input_ids, "labels": labels}

    def encode_text(self, text: str) -> dict[str, list[int]]:
        """Token ids of a corpus document (BOS … EOS); every token is a label."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        ids = ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])
        ids = ids[: self.max_length]
        return {"input_ids": ids, "labels": list(ids)}


def collate(features: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded features into a batch; padded positions get ``attention_mask=0`` and label ``-100``."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[B, T]`` with each prompt aligned to the right edge."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    return input_ids, attention_mask


def batched(features: Sequence[dict[str, list[int]]], batch_size: int, pad_token_id: int,
            shuffle_seed: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Collate features into batches (in order, or shuffled deterministically by ``shuffle_seed``)."""
    order = list(range(len(features)))
    if shuffle_seed is not None:
        order = torch.randperm(len(features), generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
    return [collate([features[j] for j in order[i : i + batch_size]], pad_token_id)
            for i in range(0, len(order), batch_size)]


def qa_batches(rows: Iterable[dict], formatter: QAFormatter, batch_size: int, answer_key: str = "answer",
               shuffle_seed: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Batches of ``(row["question"], row[answer_key])`` pairs with answer-only labels."""
    feats = [formatter.encode(r["question"], r[answer_key]) for r in rows]
    return batched(feats, batch_size, pad_id(formatter.tokenizer), shuffle_seed)


def text_batches(texts: Iterable[str], formatter: QAFormatter, batch_size: int,
                 shuffle_seed: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Batches of corpus documents where every real token is a label."""
    feats = [formatter.encode_text(t) for t in texts]
    return batched(feats, batch_size, pad_id(formatter.tokenizer), shuffle_seed)


def evenly_spaced(items: Sequence, count: int | None) -> list:
    """``count`` items spread evenly over ``items`` (all of them when ``count`` is None or not smaller)."""
    if count is None or count >= len(items):
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


def pad_id(tokenizer) -> int:
    """The pad token id, falling back to EOS (common for causal LMs that ship without a pad token)."""
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise ValueError("tokenizer has neither a pad nor an EOS token")
    return pid
