"""Evaluation: TOFU metrics and eval logs, divergence to a retrained model."""

from kfade.eval.divergence import mean_token_kl, mean_token_kls
from kfade.eval.generation import greedy_generate
from kfade.eval.modes import evaluating
from kfade.eval.perplexity import perplexity
from kfade.eval.scoring import answer_losses, grouped_answer_losses
from kfade.eval.tofu import EVAL_SETS, METRICS, EvalSet, evaluate_tofu, register_metric
from kfade.eval.tofu_logs import LOG_FILES, aggregate_tofu_logs, read_tofu_logs, write_tofu_logs
from kfade.eval.tofu_stats import (
    forget_quality,
    forget_truth_ratio_score,
    model_utility,
    normalized_probabilities,
    rouge_recalls,
    truth_ratio_score,
    truth_ratios,
)

__all__ = [
    "EVAL_SETS", "LOG_FILES", "METRICS", "EvalSet", "aggregate_tofu_logs", "answer_losses", "evaluate_tofu",
    "evaluating", "forget_quality", "forget_truth_ratio_score", "greedy_generate", "grouped_answer_losses",
    "mean_token_kl", "mean_token_kls", "model_utility", "normalized_probabilities", "perplexity", "read_tofu_logs",
    "register_metric", "rouge_recalls", "truth_ratio_score", "truth_ratios", "write_tofu_logs",
]
