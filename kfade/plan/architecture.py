"""A model's covered layers and parameter count from its config alone: a meta-device model (no weights), plus
the shared-input groups (q/k/v, gate/up) found by running the framework's own capture on a tiny replica."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from kfade.curvature.capture import LayerCapture
from kfade.curvature.config import CurvatureConfig
from kfade.curvature.layers import LayerSpec, select_layers
from kfade.errors import ConfigError

REPLICA_WIDTH = 8  # head dimension of the replica used to find shared inputs
REPLICA_VOCAB = 64


@dataclass(frozen=True)
class Architecture:
    """What a memory plan needs from a model: its covered layers, their activation groups, its size."""

    model_type: str
    n_params: int  # parameters (tied ones once)
    layers: list[LayerSpec]  # covered nn.Linear layers (``curvature.modules``)
    groups: dict[str, str]  # layer → its activation group (the first layer reading the same input)
    hidden_size: int
    num_heads: int
    num_layers: int
    vocab_size: int
    shared_inputs_found: bool  # False: groups could not be traced, every layer is its own group


def load_model_config(path: str, fallbacks: dict[str, str | Path] | None = None,
                      key: str = "model.path") -> tuple[PretrainedConfig, str]:
    """``(config, where it came from)`` for a local dir / config.json, or a Hub id already in the local Hugging
    Face cache, else ``fallbacks[path]`` (a local config dir). Never touches the network."""
    local = Path(path).expanduser()
    try:
        if local.exists():
            source = local.parent if local.is_file() else local
            return AutoConfig.from_pretrained(source), str(source)
        return AutoConfig.from_pretrained(path, local_files_only=True), f"{path} (Hugging Face cache)"
    except (OSError, ValueError) as e:
        fallback = (fallbacks or {}).get(path)
        if fallback is not None and not local.exists():
            return AutoConfig.from_pretrained(fallback), str(fallback)
        reason = str(e).splitlines()[0] if local.exists() else (
            "config not available offline (not a local directory, not in the Hugging Face cache, no shipped "
            "fixture); point it at a directory holding config.json")
        raise ConfigError(key, path, reason) from None


def architecture(config: PretrainedConfig, modules: str) -> Architecture:
    """Covered layers of ``AutoModelForCausalLM.from_config(config)`` built on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = select_layers(model, modules)
    groups = _shared_input_groups(config, modules, [spec.name for spec in layers])
    found = groups is not None
    return Architecture(
        model_type=config.model_type, n_params=sum(p.numel() for p in model.parameters()), layers=layers,
        groups=groups if found else {spec.name: spec.name for spec in layers},
        hidden_size=int(config.hidden_size), num_heads=int(config.num_attention_heads),
        num_layers=int(config.num_hidden_layers), vocab_size=int(config.vocab_size), shared_inputs_found=found)


def _shared_input_groups(config: PretrainedConfig, modules: str, names: list[str]) -> dict[str, str] | None:
    """The activation groups ``LayerCapture`` forms (inputs shared by tensor identity), traced on a replica of
    the architecture with tiny widths and the same layer names; None if the replica cannot be built or run."""
    small = copy.deepcopy(config)
    small.vocab_size = REPLICA_VOCAB
    heads = getattr(small, "num_attention_heads", None) or 1
    small.hidden_size = heads * REPLICA_WIDTH
    if getattr(small, "head_dim", None):
        small.head_dim = REPLICA_WIDTH
    if getattr(small, "intermediate_size", None):
        small.intermediate_size = 2 * REPLICA_WIDTH
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            replica = AutoModelForCausalLM.from_config(small).float().eval()
            layers = select_layers(replica, modules)
            if [spec.name for spec in layers] != names:
                return None
            ids = torch.arange(8).remainder(REPLICA_VOCAB).unsqueeze(0)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            cfg = CurvatureConfig(estimator="kfac", fisher="empirical", modules=modules)
            with torch.enable_grad(), LayerCapture(replica, layers, torch.float32) as capture:
                captured = capture.capture(batch, cfg, torch.Generator().manual_seed(0))
                for _ in captured.output_grads:  # release the graph
                    pass
            return dict(captured.groups)
    except Exception:  # noqa: BLE001 - any failure means "unknown": the plan then counts every A factor
        return None
