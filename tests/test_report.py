"""Sweep report: a fabricated multirun dir gives the expected table rows, lists its broken jobs, and a PNG."""

import csv
import json
import runpy
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy import stats

from kfade.eval.tofu_logs import write_tofu_logs
from kfade.report.plots import _set_scale

CLI = Path(__file__).resolve().parents[1] / "experiments" / "report.py"
REFERENCES = {"reference/forget_quality": 1e-5, "reference/model_utility": 0.62, "reference/kl_retrain/retain": 0.4,
              "retrain/forget_quality": 1.0, "retrain/model_utility": 0.6, "retrain/kl_retrain/retain": 0.0}
JOBS = {
    "0": {"method": "kfade", "hp/eta": 0.01, "hp/n_steps": 1, "forget_quality": 0.02, "model_utility": 0.58,
          "kl_retrain/retain": 0.05, "kl_retrain/forget": 0.9, "forget/prob": 0.41, "time/fit_s": 3.5,
          "time/unlearn_s": 0.25, **REFERENCES},
    "1": {"method": "kfade", "hp/eta": 0.1, "hp/n_steps": 2, "forget_quality": 0.3, "model_utility": 0.55,
          "kl_retrain/retain": 0.002, "kl_retrain/forget": 0.7, "forget/prob": 0.2, "wmdp_bio/acc": 0.27,
          "mmlu/acc": 0.45, "reference/wmdp_bio/acc": 0.6, "time/fit_s": 3.25, "time/unlearn_s": 0.5,
          **REFERENCES},
    "2": {"method": "grad_ascent", "hp/lr": 1e-5, "forget_quality": 0.001, "model_utility": 0.3,
          "kl_retrain/retain": 1.5, "kl_retrain/forget": 2.0, "forget/prob": 0.05, "time/unlearn_s": 9.0,
          **REFERENCES},
}
COLUMNS = ["job", "method", "hp/eta", "hp/lr", "hp/n_steps", "forget_quality", "model_utility",
           "kl_retrain/retain", "kl_retrain/forget", "forget/prob", "mmlu/acc", "wmdp_bio/acc", "time/fit_s",
           "time/unlearn_s"]
REFERENCE_ROWS = [  # once each, merging the jobs' retrain/… and reference/… keys
    {"job": "(retrain)", "method": "retrain", "forget_quality": 1.0, "model_utility": 0.6, "kl_retrain/retain": 0.0},
    {"job": "(reference)", "method": "reference", "forget_quality": 1e-5, "model_utility": 0.62,
     "kl_retrain/retain": 0.4, "wmdp_bio/acc": 0.6},
]


def report_main(argv) -> int:
    return runpy.run_path(str(CLI))["main"](argv)


@pytest.fixture
def sweep_dir(tmp_path):
    root = tmp_path / "multirun" / "2026-01-01" / "12-00-00"
    (root / "multirun.yaml").parent.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    for job, results in JOBS.items():
        (root / job / ".hydra").mkdir(parents=True)
        (root / job / "results.json").write_text(json.dumps(results))
    (root / "3" / ".hydra").mkdir(parents=True)
    (root / "3" / "results.json").write_text('{"method": "kfade", "forget_quality": 0.')  # truncated write
    (root / "10" / ".hydra").mkdir(parents=True)  # interrupted before writing results
    return root


def test_report_table_rows_skipped_jobs_and_plot(sweep_dir, capsys):
    assert report_main([str(sweep_dir)]) == 0
    printed = capsys.readouterr().out

    with open(sweep_dir / "report.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        table = list(reader)
    expected = [{"job": job, **results} for job, results in JOBS.items()] + REFERENCE_ROWS
    assert [row["job"] for row in table] == [row["job"] for row in expected]
    for row, want in zip(table, expected, strict=True):
        for column in COLUMNS:
            value = want.get(column)
            if isinstance(value, float | int):
                assert float(row[column]) == value, (row["job"], column)
            else:
                assert row[column] == (value or ""), (row["job"], column)

    markdown = (sweep_dir / "report.md").read_text()
    assert markdown in printed
    # the markdown keeps the hyperparameters the sweep varies (hp/lr has one value: CSV only)
    assert markdown.splitlines()[0] == "| " + " | ".join(c for c in COLUMNS if c != "hp/lr") + " |"
    assert sum(line.startswith("| ") for line in markdown.splitlines()) == 1 + len(expected)
    skipped = [line for line in markdown.splitlines() if line.startswith("- ")]
    assert len(skipped) == 2
    assert skipped[0].startswith("- 3: broken results.json")
    assert skipped[1].startswith("- 10: incomplete: no results.json")

    image = matplotlib.image.imread(sweep_dir / "pareto.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 2 * image.shape[0] * 0.9
    assert image[..., :3].std() > 0  # something was drawn


def test_empty_dir_is_one_line_error_with_exit_code_2(tmp_path, capsys):
    (tmp_path / "0" / ".hydra").mkdir(parents=True)  # an interrupted job only
    assert report_main([str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: report.dir=")
    assert "no readable results.json" in err


def test_hydra_callback_writes_the_sweeps_report_and_never_raises(sweep_dir, tmp_path, capsys):
    """``hydra/callbacks=report``: the sweeping process writes what the CLI writes; a sweep with no results is one
    line on stderr, not an exception at the end of the jobs."""
    callback = runpy.run_path(str(CLI))["SweepReport"]()
    callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}}))
    written = {name: (sweep_dir / name).read_bytes() for name in ("report.md", "report.csv")}
    assert written["report.md"].decode() in capsys.readouterr().out
    assert report_main([str(sweep_dir)]) == 0
    assert {name: (sweep_dir / name).read_bytes() for name in written} == written
    capsys.readouterr()

    empty = tmp_path / "empty"
    (empty / "0" / ".hydra").mkdir(parents=True)
    callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(empty)}}}))
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("report: report.dir=")


def test_log_axes_where_values_span_decades():
    calls = []

    def record(*args, **kwargs):
        calls.append((args, kwargs))

    _set_scale(record, [0.2, 0.5, 0.9])
    _set_scale(record, [1e-4, 0.3, 1.0])
    _set_scale(record, [0.0, 1e-3, 0.5])
    assert calls == [(("log",), {}), (("symlog",), {"linthresh": 1e-3})]


def test_tofu_log_mode_prints_forget_quality_of_the_log_pair(tmp_path, capsys):
    """Forget quality = KS p-value between the two models' per-item truth ratios; R = exp(paraphrased NLL −
    mean perturbed NLL) is monotone in their difference, which the KS test sees as well."""
    rng = np.random.default_rng(0)

    def forget_log(shift, n=12):
        paraphrased = rng.uniform(1.0, 2.0, n)
        perturbed = rng.uniform(1.0, 2.0, (n, 3)) + shift
        log = {"avg_paraphrased_loss": {str(i): float(v) for i, v in enumerate(paraphrased)},
               "average_perturb_loss": {str(i): [float(x) for x in row] for i, row in enumerate(perturbed)}}
        return log, paraphrased - perturbed.mean(axis=1)

    (model_log, model_diff), (retain_log, retain_diff) = forget_log(0.8), forget_log(0.0)
    write_tofu_logs({"forget": model_log}, tmp_path / "model")
    write_tofu_logs({"forget": retain_log}, tmp_path / "retain")
    code = report_main(["--tofu-logs", str(tmp_path / "model"), "--retain-logs", str(tmp_path / "retain")])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["forget_quality"] == pytest.approx(stats.ks_2samp(model_diff, retain_diff).pvalue, rel=1e-12)
