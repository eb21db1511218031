"""Batched greedy generation of answers (TOFU's ``generated_text``).

Prompts are LEFT-padded so every row continues from its own last prompt token. On an FSDP-sharded model every rank
generates the same answers (the same prompts, greedy), each forward pass all-gathering the weights together.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from kfade import fsdp
from kfade.data.formatting import QAFormatter, left_pad, pad_id
from kfade.eval.modes import evaluating
from kfade.models.logits import model_device


def stop_token_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """Stop ids: the tokenizer's EOS plus any the model's generation config declares (e.g. end-of-turn)."""
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    declared = declared if isinstance(declared, list) else [declared]
    return sorted({i for i in [tokenizer.eos_token_id, *declared] if i is not None})


def greedy_generate(model: torch.nn.Module, formatter: QAFormatter, questions: Sequence[str],
                    max_new_tokens: int = 48, batch_size: int = 32, progress: bool = False) -> list[str]:
    """Greedy (argmax) answer to each question, in input order.

    At most ``max_new_tokens`` tokens, cut at the first stop token, decoded without special tokens and
    stripped. Prompts are batched by length to limit padding.
    """
    tokenizer = formatter.tokenizer
    prompts = [formatter.prompt_ids(q) for q in questions]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    stops, pad = stop_token_ids(model, tokenizer), pad_id(tokenizer)
    device = model_device(model)
    synced = fsdp.is_sharded(model)  # every rank runs each forward until all ranks' rows stopped (FSDP's lockstep)
    answers: list[str] = [""] * len(prompts)
    starts = range(0, len(order), batch_size)
    with evaluating(model):
        for start in tqdm(starts, desc="generate", disable=not progress, leave=False):
            rows = order[start:start + batch_size]
            input_ids, attention_mask = left_pad([prompts[i] for i in rows], pad)
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                    pad_token_id=pad, eos_token_id=stops, synced_gpus=synced)
            for row, new_tokens in zip(rows, output[:, input_ids.shape[1]:].tolist(), strict=True):
                ends = [k for k, token in enumerate(new_tokens) if token in stops]
                kept = new_tokens[:ends[0]] if ends else new_tokens
                answers[row] = tokenizer.decode(kept, skip_special_tokens=True).strip()
    return answers
