"""What a run evaluates."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalConfig:
    metrics: list[str] = field(default_factory=lambda: ["prob", "truth_ratio", "rouge"])  # TOFU per-item metrics
    batch_size: int = 32  # sequences per scoring / generation batch
    max_new_tokens: int = 48  # greedy generation length for ROUGE-L (tokens)
    lm_eval_tasks: list[str] = field(default_factory=list)  # lm-eval tasks (e.g. mini_wmdp, wmdp_bio, mmlu)
    lm_eval_data_dir: str | None = None  # local question files for lm-eval tasks (machines without Hub access)
    lm_eval_limit: int | None = None  # questions per lm-eval task (None = all)
    lm_eval_batch_size: int = 16
