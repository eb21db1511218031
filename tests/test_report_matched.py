"""Matched-forget comparison: interpolation in log P̄ checked by hand, variants, and the files report.py writes."""

import csv
import json
import math
import runpy
from pathlib import Path

import pytest

from kfade.report.matched import (
    LEVELS,
    MATCHED_METRICS,
    interpolate_at,
    matched_csv,
    matched_markdown,
    matched_rows,
    variant,
)
from kfade.report.regimes import seed_spread, seeds_markdown

CLI = Path(__file__).resolve().parents[1] / "experiments" / "report.py"


def test_interpolation_is_linear_in_log_prob_between_the_nearest_runs():
    points = [(0.9, 1.0), (0.8, 2.0), (0.5, 5.0), (0.2, 9.0)]
    t = (math.log(0.62) - math.log(0.5)) / (math.log(0.8) - math.log(0.5))
    assert interpolate_at(points, 0.62) == pytest.approx(5.0 + t * (2.0 - 5.0))
    assert interpolate_at(points, 0.5) == 5.0  # a run at the level itself
    assert interpolate_at(points, 0.5 * 1.005) == 5.0  # within the 1 % match tolerance
    assert interpolate_at(points, 0.1) is None  # below the swept range
    assert interpolate_at(points, 0.95) is None  # above it
    assert interpolate_at([], 0.5) is None


def test_variants_separate_estimator_and_solver():
    assert variant({"method": "kfade", "hp/curvature/estimator": "ekfac", "hp/solver": "cg"}) == "kfade/ekfac/cg"
    assert variant({"method": "kfade", "hp/curvature/estimator": "kfac"}) == "kfade/kfac/direct"
    assert variant({"method": "kfade", "hp/curvature/estimator": "ekfac", "hp/solver": "cg", "hp/n_steps": 3}) == (
        "kfade/ekfac/cg×3")
    assert variant({"method": "kfade", "hp/curvature/estimator": "ekfac", "hp/solver": "cg", "hp/n_steps": 3,
                    "hp/fit_sets": "retain,general"}) == "kfade/ekfac/cg×3+general"
    assert variant({"method": "grad_diff", "hp/lr": 1e-4}) == "grad_diff"
    # a forget objective other than the method's default is part of the variant (a sweep over it is not pooled)
    kfade = {"method": "kfade", "hp/curvature/estimator": "ekfac", "hp/solver": "direct"}
    assert variant({**kfade, "hp/forget_loss": "kl_no_answer"}) == "kfade/ekfac/direct"
    assert variant({**kfade, "hp/forget_loss": "nll"}) == "kfade/ekfac/direct[nll]"
    assert variant({"method": "grad_diff", "hp/forget_loss": "nll"}) == "grad_diff"
    assert variant({"method": "grad_diff", "hp/forget_loss": "kl_no_answer"}) == "grad_diff[kl_no_answer]"


def test_matched_rows_per_variant_and_level():
    rows = [{"method": "grad_diff", "forget/prob": p, "kl_reference/retain": kl, "model_utility": 0.8}
            for p, kl in ((0.9, 0.01), (0.5, 0.05), (0.05, 1.0))]
    rows += [{"method": "kfade", "hp/curvature/estimator": "ekfac", "hp/solver": "cg", "forget/prob": 0.62,
              "kl_reference/retain": 0.002},
             {"method": "reference", "forget/prob": 0.98, "kl_reference/retain": 0.0}]
    out = matched_rows(rows, exclude_methods=("reference",))
    assert [(r["variant"], r["forget_prob"]) for r in out] == [(v, lv) for v in ("grad_diff", "kfade/ekfac/cg")
                                                              for lv in LEVELS]
    gd = {r["forget_prob"]: r for r in out if r["variant"] == "grad_diff"}
    t = (math.log(0.1) - math.log(0.05)) / (math.log(0.5) - math.log(0.05))
    assert gd[0.10]["kl_reference/retain"] == pytest.approx(1.0 + t * (0.05 - 1.0))
    assert gd[0.62]["model_utility"] == pytest.approx(0.8)
    assert gd[0.62]["forget_quality"] is None  # no run has it
    kf = {r["forget_prob"]: r for r in out if r["variant"] == "kfade/ekfac/cg"}
    assert kf[0.62]["kl_reference/retain"] == 0.002 and kf[0.38]["kl_reference/retain"] is None


def test_retrain_level_sweeps_and_time_in_matched_rows():
    """The ``retrain`` level sits at the retrain model's own forget P̄; each sweep sub-directory is its own curve,
    shown by its name when it holds one variant; time/unlearn_s is matched like the other metrics."""
    rows = [{"job": f"{sweep}/{i}", "method": "grad_diff", "forget/prob": p, "kl_reference/retain": kl,
             "time/unlearn_s": t, "retrain/forget/prob": 0.08}
            for sweep, scale in (("grad_diff", 1.0), ("grad_diff_slow", 2.0))
            for i, (p, kl, t) in enumerate(((0.62, 0.01, 1.0), (0.05, 1.0, 3.0)))
            for kl, t in [(kl * scale, t * scale)]]
    out = matched_rows(rows)
    assert [(r["name"], r["level"]) for r in out] == [(s, lv) for s in ("grad_diff", "grad_diff_slow")
                                                      for lv in ("0.62", "0.38", "0.1", "retrain")]
    at = {(r["sweep"], r["level"]): r for r in out}
    t = (math.log(0.08) - math.log(0.05)) / (math.log(0.62) - math.log(0.05))
    assert at[("grad_diff", "retrain")]["forget_prob"] == 0.08
    assert at[("grad_diff", "retrain")]["kl_reference/retain"] == pytest.approx(1.0 + t * (0.01 - 1.0))
    assert at[("grad_diff_slow", "0.62")]["time/unlearn_s"] == 2.0
    csv_rows = list(csv.DictReader(matched_csv(out).splitlines()))
    assert [(r["level"], r["sweep"], r["variant"]) for r in csv_rows][3] == ("retrain", "grad_diff", "grad_diff")


def test_report_writes_matched_files(tmp_path, capsys):
    for i, (lr, p, kl) in enumerate(((1e-4, 0.9, 0.01), (3e-4, 0.5, 0.05), (1e-3, 0.05, 1.0))):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "results.json").write_text(json.dumps(
            {"method": "grad_diff", "hp/lr": lr, "forget/prob": p, "kl_reference/retain": kl}))
    assert runpy.run_path(str(CLI))["main"]([str(tmp_path)]) == 0
    with open(tmp_path / "matched.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["level", "sweep", "variant", "forget_prob", *MATCHED_METRICS]
    assert [float(r["forget_prob"]) for r in table] == list(LEVELS)
    assert [r["level"] for r in table] == ["0.62", "0.38", "0.1"] and {r["sweep"] for r in table} == {""}
    assert float(table[1]["kl_reference/retain"]) == pytest.approx(
        0.05 + (math.log(0.38) - math.log(0.5)) / (math.log(0.05) - math.log(0.5)) * (1.0 - 0.05))
    assert table[0]["model_utility"] == ""
    markdown = (tmp_path / "matched.md").read_text()
    assert "| grad_diff | 0.62 | 0.62 |" in markdown and "—" in markdown
    assert markdown in capsys.readouterr().out


def test_matched_markdown_leaves_out_levels_no_variant_reaches():
    rows = [{"method": m, "forget/prob": p, "kl_reference/retain": 0.1} for m in ("npo", "grad_diff")
            for p in (0.38, 0.381)]
    records = matched_rows(rows)
    assert {r["level"] for r in records} == {"0.62", "0.38", "0.1"}  # the CSV keeps every level
    lines = matched_markdown(records).splitlines()[2:]
    assert [line.split(" | ")[1] for line in lines] == ["0.38", "0.38"]


def test_general_text_columns_appear_when_the_runs_have_them(tmp_path):
    for i, (p, kl) in enumerate(((0.9, 0.01), (0.05, 1.0))):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "results.json").write_text(json.dumps(
            {"method": "npo", "forget/prob": p, "kl_reference/retain": kl, "kl_reference/general": kl / 2}))
    assert runpy.run_path(str(CLI))["main"]([str(tmp_path)]) == 0
    with open(tmp_path / "matched.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["level", "sweep", "variant", "forget_prob", *MATCHED_METRICS, "kl_reference/general"]
    assert float(table[0]["kl_reference/general"]) == pytest.approx(float(table[0]["kl_reference/retain"]) / 2)


def test_regimes_report_puts_each_regimes_matched_values_side_by_side(tmp_path, capsys):
    """Two regime sweeps (one interpolated, one with a run at the level), each with its reference models."""
    runs = {"scratch": ((0.9, 0.01), (0.5, 0.05)), "pretrained": ((0.62, 0.002),)}
    for regime, points in runs.items():
        for i, (p, kl) in enumerate(points):
            job = tmp_path / regime / "grad_diff" / str(i)
            job.mkdir(parents=True)
            job.joinpath("results.json").write_text(json.dumps(
                {"method": "grad_diff", "forget/prob": p, "kl_reference/retain": kl, "kl_reference/general": 2 * kl,
                 "retrain/forget/prob": 0.03 if regime == "scratch" else 0.08, "noise_floor/forget_quality": 0.5}))
    (tmp_path / "notes").mkdir()  # a directory without results is not a regime
    assert runpy.run_path(str(CLI))["main"](["--regimes", str(tmp_path)]) == 0
    text = (tmp_path / "regimes.md").read_text()
    assert text in capsys.readouterr().out
    at_062 = text.split("**Forget P̄ = 0.62**")[1].split("**")[0]
    assert "| method | pretrained: kl_reference/retain | pretrained: kl_reference/general |" in at_062
    kl = 0.05 + (math.log(0.62) - math.log(0.5)) / (math.log(0.9) - math.log(0.5)) * (0.01 - 0.05)
    assert f"| grad_diff | 0.002 | 0.004 | — | — | — | {kl:.3g} | {2 * kl:.3g} | — | — | — |" in at_062
    assert "**Forget P̄ = the retrain model's own (pretrained 0.08, scratch 0.03)**" in text
    models = text.split("**Reference models (at their own P̄)**")[1]
    assert "| retrain | 0.08 | — | — | — | — | 0.03 |" in models
    assert "| noise_floor | — | — | — | — | 0.5 | — |" in models
    assert "notes" not in text


def test_regimes_report_without_regimes_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert runpy.run_path(str(CLI))["main"](["--regimes", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: report.regimes=") and err.count("\n") == 1


def test_seed_spread_pools_a_sweep_with_its_seeds_twin_at_the_level():
    rows = [{"job": "grad_diff/0", "method": "grad_diff", "forget/prob": 0.38, "kl_reference/retain": 0.2},
            {"job": "grad_diff/1", "method": "grad_diff", "forget/prob": 0.1, "kl_reference/retain": 9.0},  # elsewhere
            {"job": "seeds_grad_diff/0", "method": "grad_diff", "forget/prob": 0.3801, "kl_reference/retain": 0.3},
            {"job": "seeds_grad_diff/1", "method": "grad_diff", "forget/prob": 0.379, "kl_reference/retain": 0.4},
            {"job": "npo/0", "method": "npo", "forget/prob": 0.38, "kl_reference/retain": 1.0}]  # no twin
    (spread,) = seed_spread(rows, 0.38)
    assert spread["name"] == "grad_diff" and spread["runs"] == 3
    mean, sd = spread["kl_reference/retain"]
    assert mean == pytest.approx(0.3) and sd == pytest.approx(0.1)  # sample sd of 0.2, 0.3, 0.4
    text = seeds_markdown({"scratch": [spread]}, 0.38, metrics=("kl_reference/retain",))
    assert "| grad_diff | 0.3 ± 0.1 (3) |" in text
