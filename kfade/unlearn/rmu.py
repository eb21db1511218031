"""Representation Misdirection for Unlearning (Li et al. 2024, WMDP, arXiv 2403.03218).

At decoder layer ``layer`` (its output hidden state h, ``[B, T, H]``):
    loss = mean_tok ‖h_θ(x_f) − c·u‖² / H  +  α · mean_tok ‖h_θ(x_r) − h_start(x_r)‖² / H
with u a fixed random unit vector (uniform [0, 1) entries, normalised, as in the reference code), c the
steering coefficient, h_start the frozen starting model, means over real (attention-mask) tokens. Only the
parameters matching ``param_regex`` move (default: the MLP ``down_proj`` of layers layer−2 … layer).
Defaults: the paper's Zephyr-7B setting (layer 7, c = 6.5, α = 1200, AdamW lr 5e-5, no weight decay).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kfade import fsdp
from kfade.errors import ConfigError
from kfade.models.logits import model_device
from kfade.unlearn.base import Batch, UnlearnData, require_nonnegative, require_positive
from kfade.unlearn.first_order import FirstOrderConfig, FirstOrderMethod


@dataclass
class RMUConfig(FirstOrderConfig):
    """RMU settings; ``epochs`` counts passes over the forget batches (the reference code: 150 batches)."""

    name: str = "rmu"  # method name (registry key)
    epochs: int = 1  # passes over the forget set
    lr: float = 5e-5  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    layer: int = 7  # decoder layer (0-based) whose output activations are steered
    steering_coeff: float = 6.5  # c: norm of the target activation c·u for forget tokens
    alpha: float = 1200.0  # α: weight of the retain activation-matching term
    param_regex: str | None = None  # updated parameters (name regex); None → down_proj of layer−2 … layer
    seed: int = 0  # seed of the random direction u

    def validate(self) -> None:
        super().validate()
        require_positive(self, "steering_coeff")
        require_nonnegative(self, "alpha")
        if self.layer < 0:
            raise ConfigError("method.layer", self.layer, "must be >= 0")
        if self.param_regex is not None:
            try:
                re.compile(self.param_regex)
            except re.error as e:
                raise ConfigError("method.param_regex", self.param_regex, f"invalid regex: {e}") from None

    def keeps_frozen_copy(self) -> bool:
        """The retain term matches the frozen starting model's activations."""
        return self.alpha > 0

    def trained_pattern(self) -> str:
        """The updated parameters' name regex: ``param_regex``, or the MLP ``down_proj`` of layers layer−2 … layer."""
        if self.param_regex:
            return self.param_regex
        layers = "|".join(str(i) for i in range(max(self.layer - 2, 0), self.layer + 1))
        return rf"(^|\.)layers\.({layers})\.mlp\.down_proj\.weight$"


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM (``model.model.layers`` for Llama/Mistral)."""
    return model.get_decoder().layers


class _Captured(Exception):
    """Ends a forward pass at the captured module: what follows it is not needed."""


@contextlib.contextmanager
def capture_output(module: torch.nn.Module, stop: bool = False) -> Iterator[dict]:
    """Within the block, ``box["h"]`` holds ``module``'s latest output hidden state. ``stop``: the forward pass ends
    there (the rest of the model is not run; the block then exits at once)."""
    box = {}

    def hook(_module, _inputs, output):
        box["h"] = output[0] if isinstance(output, tuple) else output
        if stop:
            raise _Captured

    handle = module.register_forward_hook(hook)
    try:
        yield box
    except _Captured:
        pass
    finally:
        handle.remove()


class RMU(FirstOrderMethod):
    """Steer forget activations at ``layer`` to c·u; keep retain activations at the starting model's."""

    retain_weight_field = "alpha"

    def trainable(self, model: torch.nn.Module) -> list[str]:
        regex = self.cfg.trained_pattern()
        names = [n for n, _ in model.named_parameters() if re.search(regex, n)]
        if not names:
            raise ConfigError("method.param_regex", regex, "matches no parameter of the model")
        return names

    def prepare(self, model: torch.nn.Module, data: UnlearnData) -> None:
        n_layers = len(decoder_layers(model))
        if self.cfg.layer >= n_layers:
            raise ConfigError("method.layer", self.cfg.layer, f"the model has {n_layers} decoder layers")
        hidden = model.config.hidden_size
        u = torch.rand(hidden, generator=torch.Generator().manual_seed(self.cfg.seed))
        self.target = (self.cfg.steering_coeff * u / u.norm()).to(model_device(model))
        self.frozen = fsdp.copy_model(model).eval().requires_grad_(False) if self.cfg.keeps_frozen_copy() else None

    def activations(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """fp32 hidden states at ``layer`` for the batch's real tokens, ``[N, H]``; the layers above it are not run
        (FSDP: they are, as every rank's hooks expect the whole pass)."""
        device = model_device(model)
        mask = batch["attention_mask"].to(device).bool()
        with capture_output(decoder_layers(model)[self.cfg.layer], stop=not fsdp.is_sharded(model)) as box:
            model(input_ids=batch["input_ids"].to(device), attention_mask=mask.long())
        return box["h"][mask].float()

    def loss(self, model: torch.nn.Module, index: int, forget: Batch, retain: Batch | None) -> torch.Tensor:
        h_forget = self.activations(model, forget)
        loss = (h_forget - self.target).pow(2).mean()
        if self.frozen is not None:
            h_retain = self.activations(model, retain)
            with torch.no_grad():
                h_start = self.activations(self.frozen, retain)
            loss = loss + self.cfg.alpha * (h_retain - h_start).pow(2).mean()
        return loss
