"""The curvature fit's configuration (OmegaConf-compatible dataclass, validated on construction)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from kfade.errors import ConfigError, require_range

ESTIMATORS = ("kfac", "ekfac", "diagonal", "identity")
FISHER_TYPES = ("mc", "empirical", "exact")
DAMPING_MODES = ("absolute", "relative")
# Every nn.Linear inside a numbered decoder block (``model.layers.3.mlp.up_proj``, ``transformer.h.0...``):
# embeddings and lm_head live outside the blocks and are therefore excluded.
DEFAULT_MODULES = r"(^|\.)(layers|h|blocks|block)\.\d+\."


@dataclass
class CurvatureConfig:
    """How to fit the Gauss-Newton approximation of the mean per-token loss (see ``kfade.curvature``)."""

    estimator: str = "ekfac"  # kfac | ekfac | diagonal | identity
    fisher: str = "mc"  # mc (labels sampled from the model) | empirical (data labels) | exact (all classes)
    mc_samples: int = 1  # label draws per token for fisher=mc
    damping: float = 0.1  # δ (absolute) or α in δ = α·mean eigenvalue of the layer (relative); ≥ 0
    damping_mode: str = "relative"  # absolute | relative
    modules: str = DEFAULT_MODULES  # regex searched in nn.Linear module names (re.search)
    max_batches: int | None = None  # stop after this many batches (None: all)
    max_tokens: int | None = None  # stop once this many label tokens were used (None: all)
    seed: int = 0  # seed of the MC label draws (rank r of a process group uses seed + r)

    def __post_init__(self):
        self.validate()

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
        for key in ("max_batches", "max_tokens"):
            value = getattr(self, key)
            if value is not None and int(value) < 1:
                raise ConfigError(f"curvature.{key}", value, "must be ≥ 1 or null")
        try:
            re.compile(self.modules)
        except re.error as e:
            raise ConfigError("curvature.modules", self.modules, f"not a regular expression ({e})") from None
