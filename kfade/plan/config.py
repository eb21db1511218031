"""The memory budget of a run (``memory.*``) and the factor placement a plan resolves from it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kfade.curvature.config import OFFLOADS, CurvatureConfig
from kfade.errors import ConfigError


@dataclass
class MemoryConfig:
    """Budgets and forced choices; ``None`` = decide (budgets: what the machine has; placement: the plan)."""

    gpu_gb: float | None = None  # accelerator budget, GB (1e9 bytes); None: the device's total memory
    cpu_gb: float | None = None  # host budget, GB; None: the machine's total memory
    offload: str = "auto"  # auto | none | cpu | disk: where the fitted factors live between uses
    layer_groups: int | None = None  # fit the layers in this many passes; None: the fewest that fit
    offload_dir: str | None = None  # offload=disk: directory for the factors (None: the curvature cache)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for key in ("gpu_gb", "cpu_gb"):
            value = getattr(self, key)
            if value is not None and not float(value) > 0:
                raise ConfigError(f"memory.{key}", value, "must be > 0 GB or null (what the machine has)")
        if self.offload not in ("auto", *OFFLOADS):
            raise ConfigError("memory.offload", self.offload, f"must be one of auto, {', '.join(OFFLOADS)}")
        if self.layer_groups is not None and int(self.layer_groups) < 1:
            raise ConfigError("memory.layer_groups", self.layer_groups, "must be ≥ 1 or null (the plan decides)")


@dataclass(frozen=True)
class Placement:
    """Where the curvature lives: the ``CurvatureConfig`` fields of the same names (``kfade.curvature``).

    ``offload``: none (factors on the model's device), cpu (pinned host memory, streamed to the device one
    layer at a time), disk (``offload_dir``, streamed through host memory one layer at a time).
    ``layer_groups``: the covered layers are fitted in that many passes over the data (contiguous, near-equal
    numbers of layers), so only one group's factor sums are in memory at once.
    ``factor_dtype``: storage dtype of the fitted factors (sums accumulate in fp32, eigh runs in fp64).
    ``checkpoint_every``: passed through unchanged (not used by the plan's arithmetic).
    """

    factor_dtype: str = "float32"
    offload: str = "none"
    offload_dir: str | None = None
    layer_groups: int = 1
    checkpoint_every: int | None = None

    def __post_init__(self):
        CurvatureConfig(**asdict(self))  # the same fields, checked by the config they are copied into
