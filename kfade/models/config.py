"""Which model a run unlearns, and which model is its retrain baseline."""

from __future__ import annotations

from dataclasses import dataclass, field

from kfade.models.tiny import TinyLlamaSpec
from kfade.models.train import TrainRecipe


@dataclass
class ModelConfig:
    name: str = "tiny_llama"  # label for logs and tables
    path: str | None = None  # Hub id or local dir; None = train/reuse the benchmark's tiny reference model
    retrain_path: str | None = None  # retrain baseline: model (Hub id / dir) or TOFU eval-log dir; None = tiny
    dtype: str = "float32"  # float32 | bfloat16 | float16 | float64
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N | mps
    device_map: str | None = None  # null | auto | balanced | cpu …: from_pretrained's device_map (models > 1 device)
    gradient_checkpointing: bool = False  # recompute decoder layers in the backward (forget gradient, GGN products)
    vocab_size: int = 1024  # tiny model only: BPE vocabulary size
    spec: TinyLlamaSpec = field(default_factory=TinyLlamaSpec)  # tiny model only
    recipe: TrainRecipe = field(default_factory=TrainRecipe)  # tiny model only: reference and retrain share it
