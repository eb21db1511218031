"""What a run evaluates: TOFU's per-item metrics, (inherited) the lm-eval tasks, and the audits."""

from __future__ import annotations

from dataclasses import dataclass, field

from kfade.errors import ConfigError, require_range
from kfade.eval.audits import AUDITS
from kfade.eval.quantize import QuantizeConfig
from kfade.eval.relearn import RelearnConfig
from kfade.eval.tofu import METRICS

TASKS_KEY, DATA_DIR_KEY = "eval.lm_eval_tasks", "eval.lm_eval_data_dir"


@dataclass
class LmEvalConfig:
    """The lm-eval part of an ``eval`` config group (scored by ``kfade.eval.lm_eval_adapter``, which imports
    lm-eval: only runs that score its tasks load it)."""

    lm_eval_tasks: list[str] = field(default_factory=list)  # lm-eval task/group names, e.g. wmdp_bio, mmlu
    lm_eval_data_dir: str | None = None  # dir of <task>.jsonl question files; None: the tasks' own datasets
    lm_eval_limit: int | None = None  # questions scored per task; None: all
    lm_eval_batch_size: int = 16  # sequences per forward pass

    def validate(self) -> None:
        """Ranges and duplicate names (task names are checked against lm-eval by ``check_tasks``)."""
        require_range("eval.lm_eval_limit", self.lm_eval_limit, 1, optional=True)
        require_range("eval.lm_eval_batch_size", self.lm_eval_batch_size, 1)
        for name in self.lm_eval_tasks:
            if not name.strip() or self.lm_eval_tasks.count(name) > 1:
                raise ConfigError(TASKS_KEY, name, "empty or repeated task name")


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
