"""The curvature fit's configuration (OmegaConf-compatible dataclass, validated on construction)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from kfade.curvature.estimators import ESTIMATORS
from kfade.errors import ConfigError, require_range

FISHER_TYPES = ("mc", "empirical", "exact")
DAMPING_MODES = ("absolute", "relative", "global")
FACTOR_DTYPES = ("float32", "bfloat16")
OFFLOADS = ("none", "cpu", "disk")
# Fields that do not change the fitted factors, hence not part of the curvature cache key: used when
# preconditioning (damping), where finished factors are kept (offload), and how the fit is scheduled.
APPLY_TIME_FIELDS = ("damping", "damping_mode", "offload", "offload_dir")
SCHEDULE_FIELDS = ("layer_groups", "checkpoint_every")
# Every nn.Linear inside a numbered decoder block (``model.layers.3.mlp.up_proj``, ``transformer.h.0...``):
# embeddings and lm_head live outside the blocks and are therefore excluded.
DEFAULT_MODULES = r"(^|\.)(layers|h|blocks|block)\.\d+\."


@dataclass
class CurvatureConfig:
    """How to fit the Gauss-Newton approximation of the mean per-token loss (see ``kfade.curvature``)."""

    estimator: str = "ekfac"  # kfac | ekfac | diagonal | identity (kfade.curvature.estimators)
    fisher: str = "mc"  # mc (labels sampled from the model) | empirical (data labels) | exact (all classes)
    mc_samples: int = 1  # label draws per token for fisher=mc
    damping: float = 1e-3  # δ (absolute) or α in δ = α·mean eigenvalue of each layer (relative) or of Ĝ (global)
    damping_mode: str = "global"  # absolute | relative (per layer) | global (one δ for every layer; the default)
    modules: str = DEFAULT_MODULES  # regex searched in nn.Linear module names (re.search)
    max_batches: int | None = None  # stop after this many batches (None: all)
    max_tokens: int | None = None  # stop once this many label tokens were used (None: all)
    seed: int = 0  # seed of the MC label draws (rank r of a process group uses seed + r)
    factor_dtype: str = "float32"  # factor/eigenbasis/eigenvalue storage: float32 (fp64 for fp64 models) | bfloat16
    offload: str = "none"  # where finished factors live: none (model's device) | cpu (pinned with CUDA) | disk
    offload_dir: str | None = None  # offload=disk: directory of the per-layer files (None: a temp dir / the cache)
    layer_groups: int = 1  # fit the covered layers in this many groups, one pass (EK-FAC: two) over the data each
    checkpoint_every: int | None = None  # save the running sums every N batches and resume from them (None: off)

    def __post_init__(self):
        self.validate()

    def damping_of(self, damping: float | None = None, damping_mode: str | None = None) -> tuple[float, str]:
        """(δ or α, mode) a step uses: the overrides given (a method's ``damping``/``damping_mode``), else these."""
        return (self.damping if damping is None else damping,
                self.damping_mode if damping_mode is None else damping_mode)

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first invalid field."""
        if self.estimator not in ESTIMATORS:
            raise ConfigError("curvature.estimator", self.estimator, f"must be one of {', '.join(ESTIMATORS)}")
        if self.fisher not in FISHER_TYPES:
            raise ConfigError("curvature.fisher", self.fisher, f"must be one of {', '.join(FISHER_TYPES)}")
        if int(self.mc_samples) < 1:
            raise ConfigError("curvature.mc_samples", self.mc_samples, "must be ≥ 1")
        require_range("curvature.damping", self.damping, 0)
        if self.damping_mode not in DAMPING_MODES:
            raise ConfigError("curvature.damping_mode", self.damping_mode,
                              f"must be one of {', '.join(DAMPING_MODES)}")
        for key, choices in (("factor_dtype", FACTOR_DTYPES), ("offload", OFFLOADS)):
            if getattr(self, key) not in choices:
                raise ConfigError(f"curvature.{key}", getattr(self, key), f"must be one of {', '.join(choices)}")
        if int(self.layer_groups) < 1:
            raise ConfigError("curvature.layer_groups", self.layer_groups, "must be ≥ 1")
        for key in ("max_batches", "max_tokens", "checkpoint_every"):
            value = getattr(self, key)
            if value is not None and int(value) < 1:
                raise ConfigError(f"curvature.{key}", value, "must be ≥ 1 or null")
        try:
            re.compile(self.modules)
        except re.error as e:
            raise ConfigError("curvature.modules", self.modules, f"not a regular expression ({e})") from None


def fit_key(cfg: CurvatureConfig) -> dict:
    """The config fields that change the fitted factors (``factor_dtype`` does; offload and scheduling do not)."""
    return {k: v for k, v in asdict(cfg).items() if k not in APPLY_TIME_FIELDS + SCHEDULE_FIELDS}
