"""Which model a run unlearns, and which model is its retrain baseline."""

from __future__ import annotations

from dataclasses import dataclass, field

from kfade.errors import ConfigError, require_one_of, require_range
from kfade.models.load import DTYPES
from kfade.models.tiny import SPECIAL_TOKENS, TinyLlamaSpec
from kfade.models.train import TrainRecipe

NO_BASE_MODEL = ("method.forget_loss=kl_base needs a model that never learnt the forget set (the pretrained base, "
                 "e.g. TOFU's chat model); none is known for this model")  # model.base_path's ConfigError


@dataclass
class ModelConfig:
    name: str = "tiny_llama"  # label for logs and tables
    path: str | None = None  # Hub id or local dir; None = train/reuse the benchmark's tiny reference model
    retrain_path: str | None = None  # retrain baseline: model (Hub id / dir) or TOFU eval-log dir; None = tiny
    base_path: str | None = None  # a model that never learnt the forget set (TOFU: the chat model before the
    #                               authors), for method.forget_loss=kl_base; None = the tiny pretrained base, if any
    dtype: str = "float32"  # float32 | bfloat16 | float16 | float64
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N | mps
    device_map: str | None = None  # null | auto | balanced | cpu …: from_pretrained's device_map (models > 1 device)
    gradient_checkpointing: bool = False  # recompute decoder layers in the backward (forget gradient, GGN products)
    vocab_size: int = 1024  # tiny model only: BPE vocabulary size
    spec: TinyLlamaSpec = field(default_factory=TinyLlamaSpec)  # tiny model only
    recipe: TrainRecipe = field(default_factory=TrainRecipe)  # tiny model only: reference and retrain share it
    pretrain: TrainRecipe | None = None  # tiny model only: first pretrain a base on dataset.general, which
    #                                      `recipe` then finetunes into the reference and retrain models

    @property
    def knows_base(self) -> bool:
        """Whether a model that never learnt the forget set is known: ``base_path``, or the tiny pair's pretrained
        base (``kfade.suites.models.model_paths``)."""
        return self.base_path is not None or (self.path is None and self.pretrain is not None)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Types and ranges of every field (the device against the machine: ``kfade.preflight``)."""
        require_one_of("model.dtype", self.dtype, sorted(DTYPES))
        for key in ("path", "retrain_path", "base_path"):
            if getattr(self, key) is not None and not getattr(self, key).strip():
                raise ConfigError(f"model.{key}", getattr(self, key), "must be a path, a Hub id or null")
        require_range("model.vocab_size", self.vocab_size, 256 + len(SPECIAL_TOKENS))  # byte alphabet + specials
        spec = self.spec
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings"):
            require_range(f"model.spec.{key}", getattr(spec, key), 1)
        if spec.hidden_size % spec.num_attention_heads:
            raise ConfigError("model.spec.num_attention_heads", spec.num_attention_heads,
                              f"must divide model.spec.hidden_size ({spec.hidden_size})")
        if spec.num_attention_heads % spec.num_key_value_heads:
            raise ConfigError("model.spec.num_key_value_heads", spec.num_key_value_heads,
                              f"must divide model.spec.num_attention_heads ({spec.num_attention_heads})")
        self.recipe.validate()
        if self.recipe.replay and self.pretrain is None:
            raise ConfigError("model.recipe.replay", self.recipe.replay,
                              "rehearses a pretrained base's text: set model.pretrain, or replay: 0")
        if self.pretrain is not None:
            self.pretrain.validate("model.pretrain")
            if self.pretrain.replay:
                raise ConfigError("model.pretrain.replay", self.pretrain.replay,
                                  "pretraining has nothing to rehearse; replay is for finetuning (model.recipe.replay)")
