"""What a run evaluates: TOFU's per-item metrics, (inherited) the lm-eval tasks, and the audits."""

from __future__ import annotations

from dataclasses import dataclass, field

from kfade.errors import ConfigError, require_range
from kfade.eval.audits import AUDITS
from kfade.eval.lm_eval_adapter import LmEvalConfig
from kfade.eval.quantize import QuantizeConfig
from kfade.eval.relearn import RelearnConfig
from kfade.eval.tofu import METRICS


@dataclass
class MiaConfig:
    """``eval.mia``: membership-inference attack settings."""

    k: float = 0.4  # Min-K% / Min-K%++: fraction of the lowest-scoring answer tokens averaged (OpenUnlearning's)

    def validate(self) -> None:
        require_range("eval.mia.k", self.k, 0, 1, open_low=True)


@dataclass
class EvalConfig(LmEvalConfig):
    metrics: list[str] = field(default_factory=lambda: ["prob", "truth_ratio", "rouge"])  # TOFU per-item metrics
    batch_size: int = 32  # sequences per scoring / generation batch
    max_new_tokens: int = 48  # greedy generation length for ROUGE-L (tokens)
    audits: list[str] = field(default_factory=list)  # kfade.eval.audits.AUDITS, run for every scored model
    relearn: RelearnConfig = field(default_factory=RelearnConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    mia: MiaConfig = field(default_factory=MiaConfig)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        super().validate()
        require_range("eval.batch_size", self.batch_size, 1)
        require_range("eval.max_new_tokens", self.max_new_tokens, 1)
        for name in self.metrics:
            if name not in METRICS:
                raise ConfigError("eval.metrics", name, f"unknown metric; known: {', '.join(sorted(METRICS))}")
        for name in self.audits:
            if name not in AUDITS or self.audits.count(name) > 1:
                raise ConfigError("eval.audits", name, f"unknown or repeated audit; choose from {list(AUDITS)}")
        for sub in (self.relearn, self.quantize, self.mia):
            sub.validate()
