"""Gradient checkpointing for the backward passes of Hugging Face models (forget gradient, curvature fit, GGN
products): activations inside each decoder layer are recomputed during the backward instead of stored.

Hugging Face checkpoints a ``GradientCheckpointingLayer`` only while that layer is in training mode. Putting the
whole model in train mode would switch on dropout; instead only the decoder layers' own ``training`` flags are
set (their submodules, dropout included, stay in eval mode), so every result is unchanged (tests: bit-equal
gradients and GGN products). Non-reentrant checkpointing keeps hooks and double backward working.
"""

from __future__ import annotations

from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from kfade.errors import ConfigError


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Switch checkpointing on for every decoder layer of ``model`` (in place; returns it)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError("model.gradient_checkpointing", True, f"{type(model).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x; the old name is deprecated there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.training = True  # the layer only: its submodules (dropout) keep their mode
    return model


def checkpointing_enabled(model: nn.Module) -> bool:
    """True when checkpointing is switched on for some decoder layer of ``model`` (whatever its mode now)."""
    return any(isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing for m in model.modules())


def checkpointing_active(model: nn.Module) -> bool:
    """True when some decoder layer of ``model`` will checkpoint its forward under autograd."""
    return any(isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing and m.training
               for m in model.modules())
