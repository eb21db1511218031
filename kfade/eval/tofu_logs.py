"""TOFU's per-item eval-log files: read, write, and aggregate into the published metrics.

A log is TOFU's JSON layout ``{field: {item index as str: value}}``. Fields: ``avg_gt_loss`` (mean token NLL
of the answer, nats), ``gt_loss`` (summed NLL), ``num_token_gt``; ``avg_paraphrased_loss``,
``paraphrased_loss``, ``num_token_paraphrased``; ``average_perturb_loss``, ``perturb_loss``,
``num_token_perturb`` (lists, one per perturbed answer); ``truth_ratio``; ``normalized_gt_loss`` (real authors
/ world facts); ``generated_text`` ([prompt, generation, answer]); ``rouge1_recall``, ``rougeL_recall``.
A set of logs is a dict keyed by set name (``LOG_FILES``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from kfade.cache import atomic_path
from kfade.errors import ConfigError
from kfade.eval.tofu_stats import (
    forget_quality,
    forget_truth_ratio_score,
    model_utility,
    normalized_probabilities,
    truth_ratio_score,
    truth_ratios,
)

LOG_FILES = {
    "forget": "eval_log_forget.json",
    "retain": "eval_log.json",
    "real_authors": "eval_real_author_wo_options.json",
    "world_facts": "eval_real_world_wo_options.json",
}
NORMALIZED_PROB_SETS = ("real_authors", "world_facts")
UTILITY_SETS = ("retain", "real_authors", "world_facts")
UTILITY_METRICS = ("prob", "rougeL_recall", "truth_ratio")


def item_values(log: dict, field: str) -> list:
    """The per-item values of ``field`` in item-index order."""
    column = log[field]
    return [column[k] for k in sorted(column, key=int)]


def item_subset(log: dict, indices: list[int]) -> dict:
    """The log of items ``indices`` (renumbered 0, 1, …)."""
    return {field: {str(j): column[str(i)] for j, i in enumerate(indices)} for field, column in log.items()}


def _check_sets(logs: dict, key: str) -> None:
    unknown = sorted(set(logs) - set(LOG_FILES))
    if unknown:
        raise ConfigError(key, unknown[0], f"unknown TOFU eval set; known: {', '.join(LOG_FILES)}")


def write_tofu_logs(logs: dict[str, dict], directory: str | os.PathLike) -> None:
    """Write each set's log to its TOFU file name in ``directory`` (one atomic write per file)."""
    _check_sets(logs, "logs")
    for set_name, log in logs.items():
        with atomic_path(Path(directory) / LOG_FILES[set_name]) as tmp:
            tmp.write_text(json.dumps(log, indent=4) + "\n")


def read_tofu_logs(directory: str | os.PathLike, key: str = "eval.retain_logs") -> dict[str, dict]:
    """Read the TOFU eval-log files present in ``directory`` (``key``: the config key named in errors)."""
    paths = {name: Path(directory) / file for name, file in LOG_FILES.items()}
    try:
        logs = {name: json.loads(path.read_text()) for name, path in paths.items() if path.is_file()}
    except (ValueError, UnicodeDecodeError) as e:  # a truncated or foreign file
        raise ConfigError(key, str(directory), f"unreadable TOFU eval log ({' '.join(str(e).split())})") from None
    if not logs:
        expected = ", ".join(LOG_FILES.values())
        raise ConfigError(key, str(directory), f"no TOFU eval logs there (expected {expected})")
    return logs


def _ratios(log: dict) -> np.ndarray:
    return truth_ratios(item_values(log, "avg_paraphrased_loss"), item_values(log, "average_perturb_loss"))


def _has(log: dict, *fields: str) -> bool:
    return all(field in log for field in fields)


def forget_set_ratios(logs: dict[str, dict], key: str) -> np.ndarray:
    """Per-item truth ratios R on the forget set (``key``: the config key named in errors)."""
    forget = logs.get("forget", {})
    if not _has(forget, "avg_paraphrased_loss", "average_perturb_loss"):
        raise ConfigError(key, sorted(logs), "no forget-set truth ratios (need eval_log_forget.json with "
                          "avg_paraphrased_loss and average_perturb_loss)")
    return _ratios(forget)


def aggregate_tofu_logs(logs: dict[str, dict],
                        retain_logs: dict[str, dict] | None = None) -> dict[str, float]:
    """Flat TOFU metrics from per-item logs.

    Per set present: ``<set>/prob`` (mean P̄(a); normalised against perturbed answers on real authors /
    world facts), ``<set>/rougeL_recall``, ``<set>/truth_ratio`` (forget: mean min(R, 1/R); others: mean
    max(0, 1−R)), each only when its fields are in the log. ``model_utility`` when all nine utility numbers
    are available; ``forget_quality`` when ``retain_logs`` (the retain model's logs on the same forget set)
    are given.
    """
    _check_sets(logs, "logs")
    metrics: dict[str, float] = {}
    for set_name, log in logs.items():
        if set_name in NORMALIZED_PROB_SETS and _has(log, "avg_gt_loss", "average_perturb_loss"):
            probs = normalized_probabilities(item_values(log, "avg_gt_loss"),
                                             item_values(log, "average_perturb_loss"))
            metrics[f"{set_name}/prob"] = float(np.mean(probs))
        elif set_name not in NORMALIZED_PROB_SETS and _has(log, "avg_gt_loss"):
            metrics[f"{set_name}/prob"] = float(np.mean(np.exp(-np.asarray(item_values(log, "avg_gt_loss")))))
        if _has(log, "rougeL_recall"):
            metrics[f"{set_name}/rougeL_recall"] = float(np.mean(item_values(log, "rougeL_recall")))
        if _has(log, "avg_paraphrased_loss", "average_perturb_loss"):
            score = forget_truth_ratio_score if set_name == "forget" else truth_ratio_score
            metrics[f"{set_name}/truth_ratio"] = score(_ratios(log))
    utility_keys = [f"{s}/{m}" for s in UTILITY_SETS for m in UTILITY_METRICS]
    if all(k in metrics for k in utility_keys):
        metrics["model_utility"] = model_utility([metrics[k] for k in utility_keys])
    if retain_logs is not None:
        model_ratios = forget_set_ratios(logs, "logs")
        retain_ratios = forget_set_ratios(retain_logs, "eval.retain_logs")
        if len(model_ratios) != len(retain_ratios):
            raise ConfigError("eval.retain_logs", len(retain_ratios),
                              f"forget items in the retain model's log, vs {len(model_ratios)} here: "
                              "not the same forget split")
        metrics["forget_quality"] = forget_quality(model_ratios, retain_ratios)
    return metrics
