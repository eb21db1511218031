"""Relearning attack (arXiv 2409.18025, 2410.08827): finetune a copy of a model briefly, then re-score it.

The forget set is split once, by seed, into an attack half and a held-out half; the attack finetunes a deep copy
(the model itself is never touched) for ``steps`` AdamW steps at a constant learning rate on the attack half (or,
for ``relearn_retain``, on retain data only) and the held-out half is scored. With S a forget-side score (TOFU:
mean P̄ of the held-out answers):

    recovery = (S_after − S_model) / (S_reference − S_model)

0: the attack brings nothing back; 1: back to the reference model's level; undefined (left out) for the
reference model itself.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from kfade.errors import require_range
from kfade.models.train import TrainRecipe, train_causal_lm


@dataclass
class RelearnConfig:
    """``eval.relearn``: the relearning attack's budget."""

    steps: int = 10  # AdamW steps (stops earlier only if the attack set is memorised exactly)
    lr: float = 1e-3  # constant learning rate (no warm-up)
    batch_size: int = 8  # sequences per step
    seed: int = 0  # the attack/held-out split and the data order

    def validate(self) -> None:
        require_range("eval.relearn.steps", self.steps, 1)
        require_range("eval.relearn.lr", self.lr, 0, open_low=True)
        require_range("eval.relearn.batch_size", self.batch_size, 1)


def attack_split(n: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices ``0..n-1`` split once by ``seed``: (attack half ⌊n/2⌋, held-out half), each sorted."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[: n // 2]), sorted(order[n // 2:])


def relearned(model: torch.nn.Module, features: list[dict], pad_token_id: int, cfg: RelearnConfig,
              progress: bool = False) -> torch.nn.Module:
    """A deep copy of ``model`` finetuned on the encoded ``features`` for ``cfg.steps`` AdamW steps."""
    attacked = copy.deepcopy(model)
    recipe = TrainRecipe(max_epochs=cfg.steps, lr=cfg.lr, warmup_steps=0, batch_size=cfg.batch_size,
                         target_accuracy=1.0, seed=cfg.seed)
    train_causal_lm(attacked, features, pad_token_id, recipe, progress, max_steps=cfg.steps)
    return attacked


def recovery(after: float, model: float, reference: float) -> float | None:
    """(after − model) / (reference − model); None when the model scores as the reference does."""
    return None if reference == model else (after - model) / (reference - model)
