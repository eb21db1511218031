"""TOFU eval-log files: round trip, aggregation of hand-made logs, TOFU's published numbers from real logs."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from kfade.errors import ConfigError
from kfade.eval.tofu_logs import LOG_FILES, aggregate_tofu_logs, item_values, read_tofu_logs, write_tofu_logs
from kfade.eval.tofu_stats import normalized_probabilities, rouge_recalls, truth_ratios

REFERENCE = Path(__file__).parents[2] / "shared" / "tofu-reference" / "eval-logs"
E_MINUS_1_5 = 0.22313016014842982


def column(values):
    return {str(i): v for i, v in enumerate(values)}


def hand_log(gt_losses, paraphrased, perturbed, rouge):
    return {"avg_gt_loss": column(gt_losses), "avg_paraphrased_loss": column(paraphrased),
            "average_perturb_loss": column(perturbed), "rougeL_recall": column(rouge)}


# every set: item 0 has R = e^-1.5, item 1 has R = e; answer probabilities 1/2 and 1 (losses ln 2, 0)
HAND = hand_log([math.log(2), 0.0], [1.0, 2.0], [[2.0, 3.0], [1.0]], [0.5, 1.0])
HAND_LOGS = {name: HAND for name in LOG_FILES}


def test_aggregate_hand_case():
    got = aggregate_tofu_logs(HAND_LOGS)
    # real authors / world facts: P(a) / (P(a) + Σ exp(-perturbed loss)) per item
    normalized = [0.5 / (0.5 + math.exp(-2) + math.exp(-3)), 1.0 / (1.0 + math.exp(-1))]
    expected = {"prob": 0.75, "rougeL_recall": 0.75, "truth_ratio": (1 - E_MINUS_1_5) / 2}
    for name in LOG_FILES:
        for metric, value in expected.items():
            if metric == "prob" and name in ("real_authors", "world_facts"):
                value = float(np.mean(normalized))
            if metric == "truth_ratio" and name == "forget":
                value = (E_MINUS_1_5 + math.exp(-1)) / 2
            assert got[f"{name}/{metric}"] == pytest.approx(value, rel=1e-12), f"{name}/{metric}"
    nine = [got[f"{s}/{m}"] for s in ("retain", "real_authors", "world_facts")
            for m in ("prob", "rougeL_recall", "truth_ratio")]
    assert got["model_utility"] == pytest.approx(len(nine) / sum(1 / v for v in nine), rel=1e-12)
    assert "forget_quality" not in got


def test_aggregate_reports_only_what_the_logs_hold():
    got = aggregate_tofu_logs({"retain": {"avg_gt_loss": column([math.log(2)])}})
    assert got == {"retain/prob": pytest.approx(0.5)}


def test_forget_quality_needs_matching_forget_sets():
    retain_logs = {"forget": hand_log([0.1], [0.5], [[0.7]], [1.0])}
    with pytest.raises(ConfigError, match="not the same forget split"):
        aggregate_tofu_logs(HAND_LOGS, retain_logs=retain_logs)
    with pytest.raises(ConfigError, match="eval.retain_logs"):
        aggregate_tofu_logs(HAND_LOGS, retain_logs={"retain": HAND})
    with pytest.raises(ConfigError, match="unknown TOFU eval set"):
        aggregate_tofu_logs({"forgetting": HAND})


def test_write_read_round_trip(tmp_path):
    logs = {name: dict(HAND, generated_text=column([["q", "gen", "answer"]] * 2)) for name in LOG_FILES}
    write_tofu_logs(logs, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(LOG_FILES.values())
    assert read_tofu_logs(tmp_path) == logs
    assert json.loads((tmp_path / "eval_log_forget.json").read_text()) == logs["forget"]
    with pytest.raises(ConfigError, match="no TOFU eval logs"):
        read_tofu_logs(tmp_path / "missing")


needs_reference = pytest.mark.skipif(not REFERENCE.is_dir(),
                                     reason=f"TOFU reference eval logs not found at {REFERENCE}")


@needs_reference
def test_reproduces_published_tofu_numbers():
    full = read_tofu_logs(REFERENCE / "llama2-7b_full")
    retain90 = read_tofu_logs(REFERENCE / "llama2-7b_retain90")
    full_metrics = aggregate_tofu_logs(full, retain_logs=retain90)
    assert full_metrics["forget_quality"] == pytest.approx(1.834e-21, rel=1e-3)
    assert full_metrics["model_utility"] == pytest.approx(0.6227, abs=5e-5)
    assert aggregate_tofu_logs(retain90)["model_utility"] == pytest.approx(0.6137, abs=5e-5)


@needs_reference
@pytest.mark.parametrize("set_name", list(LOG_FILES))
def test_per_item_statistics_match_tofu_logs(set_name):
    """Our per-item R, normalised probability and ROUGE reproduce the values TOFU stored in its own logs."""
    log = read_tofu_logs(REFERENCE / "llama2-7b_full")[set_name]
    ratios = truth_ratios(item_values(log, "avg_paraphrased_loss"), item_values(log, "average_perturb_loss"))
    np.testing.assert_allclose(ratios, item_values(log, "truth_ratio"), rtol=1e-5)
    generated = item_values(log, "generated_text")
    recalls = rouge_recalls([g[1] for g in generated], [g[2] for g in generated])
    np.testing.assert_allclose(recalls["rougeL"], item_values(log, "rougeL_recall"), atol=1e-12)
    np.testing.assert_allclose(recalls["rouge1"], item_values(log, "rouge1_recall"), atol=1e-12)
    if "normalized_gt_loss" in log:
        normalized = normalized_probabilities(item_values(log, "avg_gt_loss"),
                                              item_values(log, "average_perturb_loss"))
        np.testing.assert_allclose(-np.log(normalized), item_values(log, "normalized_gt_loss"), rtol=1e-5)
