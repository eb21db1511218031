"""Which nn.Linear layers the curvature covers (regex on module names) and their parameter layout."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from torch import nn

from kfade.errors import ConfigError


@dataclass(frozen=True)
class LayerSpec:
    """One covered ``nn.Linear``: y = W a (+ b), W of shape (out, in). The curvature block is over the augmented
    weight W̄ = [W, b] of shape ``(out_features, in_features)`` with ``in_features = in + 1`` when there is a bias,
    flattened row-major, so vec(g āᵀ) = g ⊗ ā and G_W̄ ≈ S ⊗ A (``torch.kron(S, A)``)."""

    name: str  # module name, e.g. "model.layers.0.self_attn.q_proj"
    weight: str  # parameter name of W in model.named_parameters()
    bias: str | None  # parameter name of b, or None
    out_features: int
    in_features: int  # columns of W̄: in (+1 with a bias)

    @property
    def param_names(self) -> list[str]:
        return [self.weight] + ([self.bias] if self.bias else [])


def select_layers(model: nn.Module, pattern: str) -> list[LayerSpec]:
    """The ``nn.Linear`` modules whose name matches ``pattern`` (``re.search``), in ``named_modules`` order.

    Warns when a selected layer is vocabulary-sized (lm_head, a tied embedding): its factor is vocab × vocab
    (32k vocab → 4 GB fp32 per factor), which rarely fits and is excluded by the default pattern.
    """
    regex = re.compile(pattern)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers = []
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) and regex.search(name)):
            continue
        if module is output_embeddings or (vocab and vocab in (module.in_features, module.out_features)):
            warnings.warn(f"curvature.modules={pattern!r} selects the vocabulary-sized layer {name!r}: its "
                          f"Kronecker factor is vocab² ({vocab}² floats); exclude it unless the vocabulary is tiny",
                          stacklevel=3)
        has_bias = module.bias is not None
        layers.append(LayerSpec(name, f"{name}.weight", f"{name}.bias" if has_bias else None,
                                module.out_features, module.in_features + int(has_bias)))
    if not layers:
        raise ConfigError("curvature.modules", pattern, "matches no nn.Linear module of the model")
    return layers
