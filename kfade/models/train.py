"""Plain causal-LM training (AdamW, answer-token loss) that stops once the training answers are memorised."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from kfade.data.formatting import collate
from kfade.errors import require_range


@dataclass
class TrainRecipe:
    """How the tiny models are trained (the reference and the retrain baseline share it)."""

    max_epochs: int = 200  # upper bound on passes over the data
    lr: float = 3e-3  # AdamW peak learning rate (linear warm-up, then constant)
    warmup_steps: int = 30  # optimizer steps of linear warm-up
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    max_grad_norm: float = 1.0  # gradient clipping (global L2 norm); keeps a constant learning rate stable
    batch_size: int = 32  # sequences per step
    target_accuracy: float = 0.99  # stop when an epoch's label-token argmax accuracy reaches this (memorised)
    seed: int = 0  # init and shuffling seed
    replay: int = 0  # finetuning only: sequences of the base's own text mixed into each epoch (a fresh sample)

    def validate(self, prefix: str = "model.recipe") -> None:
        """Raise ``ConfigError`` naming ``<prefix>.<field>`` for the first field out of range."""
        for key in ("max_epochs", "batch_size"):
            require_range(f"{prefix}.{key}", getattr(self, key), 1)
        for key in ("warmup_steps", "weight_decay", "replay"):
            require_range(f"{prefix}.{key}", getattr(self, key), 0)
        for key in ("lr", "max_grad_norm"):
            require_range(f"{prefix}.{key}", getattr(self, key), 0, open_low=True)
        require_range(f"{prefix}.target_accuracy", self.target_accuracy, 0, 1, open_low=True)


@dataclass
class TrainStats:
    epochs: int  # epochs run
    loss: float  # mean label-token NLL over the last epoch (nats)
    accuracy: float  # label-token argmax accuracy over the last epoch
    seconds: float


def train_causal_lm(model, features: Sequence[dict], pad_token_id: int, recipe: TrainRecipe,
                    progress: bool = True, replay: Sequence[dict] = (), max_steps: int | None = None) -> TrainStats:
    """Train a Llama-style ``model`` (``.model`` body + ``.lm_head``) in place on encoded ``features`` with the mean
    label-token NLL (nats).

    Stops at the first epoch whose running accuracy reaches ``recipe.target_accuracy``: training on to zero loss
    saturates the softmax and the Fisher of the retain set vanishes, leaving curvature nothing to measure.
    Rehearsal: each epoch adds ``recipe.replay`` sequences drawn afresh (seeded) from ``replay`` (the text a base
    model was pretrained on) in batches of their own, so finetuning keeps what the base knew; loss, accuracy and
    the stopping rule count ``features`` only. ``max_steps``: stop after that many optimizer steps at the latest
    (a relearning attack's budget).
    """
    recipe.validate()
    start = time.perf_counter()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, recipe.warmup_steps)))
    model.train()
    bar = tqdm(range(recipe.max_epochs), desc="train", disable=not progress, leave=False)
    loss = acc = math.nan
    epoch = steps = 0
    for epoch in bar:
        tot_loss = tot_correct = tot_tokens = 0.0
        seed = recipe.seed * 100_003 + epoch
        for batch, rehearsed in epoch_batches(features, replay, recipe, pad_token_id, seed):
            hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            labels = batch["labels"][:, 1:]
            mask = labels != -100
            logits = model.lm_head(hidden[:, :-1][mask]).float()  # the vocabulary projection at label tokens only
            nll = torch.nn.functional.cross_entropy(logits, labels[mask])
            opt.zero_grad(set_to_none=True)
            nll.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
            opt.step()
            sched.step()
            steps += 1
            if rehearsed:
                continue
            n = int(mask.sum())
            tot_loss += float(nll.detach()) * n
            tot_tokens += n
            tot_correct += float((logits.argmax(-1) == labels[mask]).sum())
            if max_steps is not None and steps >= max_steps:
                break
        loss, acc = tot_loss / tot_tokens, tot_correct / tot_tokens
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}")
        if acc >= recipe.target_accuracy or (max_steps is not None and steps >= max_steps):
            break
    model.eval()
    return TrainStats(epochs=epoch + 1, loss=loss, accuracy=acc, seconds=time.perf_counter() - start)


def epoch_batches(features: Sequence[dict], replay: Sequence[dict], recipe: TrainRecipe, pad_token_id: int,
                  seed: int) -> list[tuple[dict, bool]]:
    """One epoch's ``(batch, is_replay)`` pairs: ``features`` and ``recipe.replay`` sequences sampled from ``replay``
    without replacement, each bucketed by length, the batches interleaved in a seeded random order."""
    batches = [(b, False) for b in length_buckets(features, recipe.batch_size, pad_token_id, seed)]
    if not (recipe.replay and replay):
        return batches
    gen = torch.Generator().manual_seed(seed)
    sample = [replay[i] for i in torch.randperm(len(replay), generator=gen)[: recipe.replay].tolist()]
    batches += [(b, True) for b in length_buckets(sample, recipe.batch_size, pad_token_id, seed + 1)]
    return [batches[k] for k in torch.randperm(len(batches), generator=gen).tolist()]


def length_buckets(features: Sequence[dict], batch_size: int, pad_token_id: int, seed: int) -> list[dict]:
    """Batches of similar-length sequences (little padding), in a seeded random order; a new grouping per seed."""
    gen = torch.Generator().manual_seed(seed)
    jitter = torch.rand(len(features), generator=gen)
    order = sorted(range(len(features)), key=lambda i: (len(features[i]["input_ids"]), float(jitter[i])))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [collate([features[j] for j in chunks[k]], pad_token_id)
            for k in torch.randperm(len(chunks), generator=gen).tolist()]
