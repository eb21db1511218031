"""What a run evaluates: TOFU's per-item metrics and (inherited) the lm-eval tasks."""

from __future__ import annotations

from dataclasses import dataclass, field

from kfade.errors import ConfigError, require_range
from kfade.eval.lm_eval_adapter import LmEvalConfig
from kfade.eval.tofu import METRICS


@dataclass
class EvalConfig(LmEvalConfig):
    metrics: list[str] = field(default_factory=lambda: ["prob", "truth_ratio", "rouge"])  # TOFU per-item metrics
    batch_size: int = 32  # sequences per scoring / generation batch
    max_new_tokens: int = 48  # greedy generation length for ROUGE-L (tokens)

    def validate(self) -> None:
        super().validate()
        require_range("eval.batch_size", self.batch_size, 1)
        require_range("eval.max_new_tokens", self.max_new_tokens, 1)
        for name in self.metrics:
            if name not in METRICS:
                raise ConfigError("eval.metrics", name, f"unknown metric; known: {', '.join(sorted(METRICS))}")
