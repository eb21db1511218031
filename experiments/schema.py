"""Typed schemas for the Hydra config groups: the library's dataclasses, plus the logger's and the top level's.

Each composed group is merged into its dataclass, so a misspelt key or a wrong type becomes one line
(``dataset.batch_size='x': Value 'x' of type 'str' could not be converted to Integer``), not a deep traceback;
then every float must be finite and the dataclass's own ``validate`` checks the ranges.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kfade.data.config import DatasetConfig
from kfade.errors import ConfigError, require_range
from kfade.eval.config import EvalConfig
from kfade.models.config import ModelConfig
from kfade.tracking import LoggerConfig

__all__ = ["DatasetConfig", "EvalConfig", "LoggerConfig", "ModelConfig", "RunOptions", "typed"]


@dataclass
class ReapplyConfig:
    """``reapply``: after unlearning, finetune the reference further on retain data, then re-add the delta."""

    epochs: int = 0  # 0 = skip; > 0 = finetuning epochs
    lr: float = 1e-3  # AdamW learning rate of that finetuning
    seed: int = 1  # its data order

    def validate(self) -> None:
        require_range("reapply.epochs", self.epochs, 0)
        require_range("reapply.lr", self.lr, 0, open_low=True)


@dataclass
class RunOptions:
    """The top-level keys of ``conf/config.yaml`` besides the config groups."""

    seed: int = 0
    noise_floor: bool = False
    progress: bool = True
    dry_run: bool = False
    reapply: ReapplyConfig = field(default_factory=ReapplyConfig)

    def validate(self) -> None:
        self.reapply.validate()


def typed(node: DictConfig, schema: type, key: str):
    """``node`` merged onto ``schema``'s defaults, converted to a dataclass instance and validated; errors → one
    line (``key`` "" for top-level keys)."""
    try:
        values = OmegaConf.to_container(node, resolve=True)  # interpolations (e.g. ${seed}) need the whole config
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except OmegaConfBaseException as e:
        where = ".".join(k for k in (key, getattr(e, "full_key", None)) if k) or key
        raise ConfigError(where, getattr(e, "value", None), str(e).splitlines()[0]) from None
    require_finite(obj, key)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def require_finite(obj, key: str) -> None:
    """ConfigError for the first NaN or ±inf float in a dataclass instance (nested dataclasses too)."""
    for f in dataclasses.fields(obj):
        value, where = getattr(obj, f.name), f"{key}.{f.name}" if key else f.name
        if dataclasses.is_dataclass(value):
            require_finite(value, where)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(where, value, "must be a finite number")
