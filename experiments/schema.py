"""Typed schemas for the Hydra config groups: the library's dataclasses, plus the logger's.

Each composed group is merged into its dataclass, so a misspelt key or a wrong type becomes one line
(``dataset.batch_size='x': Value 'x' of type 'str' could not be converted to Integer``), not a deep traceback.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kfade.data.config import DatasetConfig
from kfade.errors import ConfigError
from kfade.eval.config import EvalConfig
from kfade.models.config import ModelConfig
from kfade.tracking import LoggerConfig

__all__ = ["DatasetConfig", "EvalConfig", "LoggerConfig", "ModelConfig", "typed"]


def typed(node: DictConfig, schema: type, key: str):
    """``node`` merged onto ``schema``'s defaults and converted to a dataclass instance; errors → one line."""
    try:
        values = OmegaConf.to_container(node, resolve=True)  # interpolations (e.g. ${seed}) need the whole config
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except OmegaConfBaseException as e:
        where = f"{key}.{e.full_key}" if getattr(e, "full_key", None) else key
        raise ConfigError(where, getattr(e, "value", None), str(e).splitlines()[0]) from None
