"""What a run evaluates: TOFU's per-item metrics and (inherited) the lm-eval tasks."""

from __future__ import annotations

from dataclasses import dataclass, field

from kfade.eval.lm_eval_adapter import LmEvalConfig


@dataclass
class EvalConfig(LmEvalConfig):
    metrics: list[str] = field(default_factory=lambda: ["prob", "truth_ratio", "rouge"])  # TOFU per-item metrics
    batch_size: int = 32  # sequences per scoring / generation batch
    max_new_tokens: int = 48  # greedy generation length for ROUGE-L (tokens)
