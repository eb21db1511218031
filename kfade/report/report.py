"""Sweep report: every job's ``results.json`` under a (multirun) directory as one table, plus the Pareto plot.

A job is a directory holding ``results.json`` (flat keys, written by ``kfade.tracking.write_results``). Jobs
that broke are skipped and listed: a ``results.json`` that is not a JSON object, or a Hydra job directory
(one with ``.hydra/``) without ``results.json`` (incomplete: a run writes it last, atomically). The retrain and
reference models appear once each as rows of their own, taken from the ``retrain/…`` and ``reference/…`` keys
the jobs carry.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from kfade.cache import atomic_path
from kfade.errors import ConfigError
from kfade.eval.audits import HEADLINE_KEYS as AUDIT_COLUMNS
from kfade.eval.tofu_logs import aggregate_tofu_logs, read_tofu_logs
from kfade.report.matched import (
    matched_csv,
    matched_markdown,
    matched_rows,
    variant,
)
from kfade.report.plots import write_pareto_plot
from kfade.tracking import RESULTS_FILE, read_results

REFERENCE_METHODS = ("retrain", "reference", "noise_floor")  # models every job is compared against, shown once
#                                                            each (noise_floor: the second retrain seed, if run)
METRIC_COLUMNS = ("forget_quality", "model_utility", "kl_retrain/retain", "kl_retrain/forget", "kl_reference/retain",
                  "forget/prob")
TIME_COLUMNS = ("time/fit_s", "time/unlearn_s")


@dataclass
class SweepResults:
    """The jobs of a sweep: ``rows`` (one dict per good job, ``job`` = its dir relative to the sweep, plus the
    reference models' rows) and ``skipped`` (``(job dir, reason)`` for each broken job)."""

    rows: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def collect_results(sweep_dir: str | os.PathLike) -> SweepResults:
    """Read every job's results under ``sweep_dir`` (recursively); ``ConfigError`` if none is readable."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise ConfigError("report.dir", str(root), "not a directory")
    sweep = SweepResults()
    for path in sorted(root.rglob(RESULTS_FILE), key=_natural_key):
        job = str(path.parent.relative_to(root))
        try:
            sweep.rows.append({"job": job, **read_results(path)})
        except (ValueError, UnicodeDecodeError) as err:
            sweep.skipped.append((job, f"broken {RESULTS_FILE}: {str(err).splitlines()[0]}"))
    for hydra_dir in sorted(root.rglob(".hydra"), key=_natural_key):
        if not (hydra_dir.parent / RESULTS_FILE).exists():
            sweep.skipped.append((str(hydra_dir.parent.relative_to(root)),
                                  f"incomplete: no {RESULTS_FILE} (killed, failed or still running)"))
    if not sweep.rows:
        raise ConfigError("report.dir", str(root), f"no readable {RESULTS_FILE} under it "
                                                   f"({len(sweep.skipped)} broken jobs)")
    sweep.rows += _reference_rows(sweep.rows)
    return sweep


def _natural_key(path: Path) -> list:
    """Sort key that puts job 2 before job 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def _reference_rows(rows: list[dict]) -> list[dict]:
    """A row per reference method from the jobs' ``<method>/…`` keys, merged across jobs (jobs may carry
    different subsets); a further row only where jobs disagree on a value (e.g. a sweep over forget splits)."""
    found = []
    for method in REFERENCE_METHODS:
        merged: list[dict] = []
        for row in rows:
            values = {k[len(method) + 1:]: v for k, v in row.items() if k.startswith(f"{method}/")}
            if not values:
                continue
            target = next((m for m in merged if all(m.get(k, v) == v for k, v in values.items())), None)
            if target is None:
                merged.append(values)
            else:
                target.update(values)
        found += [{"job": f"({method})", "method": method, **values} for values in merged]
    return found


def table_columns(rows: list[dict]) -> list[str]:
    """job, method, the ``hp/…`` keys, the TOFU metrics, every ``…/acc`` (WMDP, MMLU; their relearned and quantized
    scores too), the audits' headline keys, timings: the ones any row has."""
    keys = {k for row in rows for k in row}
    hyper = sorted(k for k in keys if k.startswith("hp/"))
    accuracies = sorted(k for k in keys if k.endswith("/acc") and not k.startswith(REFERENCE_METHODS))
    wanted = ["job", "method", *hyper, *METRIC_COLUMNS, *accuracies, *AUDIT_COLUMNS, *TIME_COLUMNS]
    return [c for c in wanted if c in keys]


def varying_columns(rows: list[dict], columns: list[str]) -> list[str]:
    """``columns`` less the ``hp/…`` ones that take fewer than two values over the jobs: the sweep's knobs stay."""
    jobs = [row for row in rows if row.get("method") not in REFERENCE_METHODS]
    def values(column: str) -> set[str]:
        return {repr(row[column]) for row in jobs if row.get(column) is not None}

    return [c for c in columns if not c.startswith("hp/") or len(values(c)) > 1]


def _cell(value, precision: int | None) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and precision is not None:
        return f"{value:.{precision}g}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub-markdown table; floats to 4 significant digits, missing values blank, ``|`` escaped."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c), 4).replace("|", "\\|") for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_table(rows: list[dict], columns: list[str]) -> str:
    """The same table as CSV, full precision."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([[_cell(row.get(c), None) for c in columns] for row in rows])
    return out.getvalue()


def write_report(sweep_dir: str | os.PathLike) -> tuple[SweepResults, str]:
    """Write ``report.md`` (hyperparameters that vary only), ``report.csv`` (all), ``matched.md`` and
    ``matched.csv`` (every variant at matched forget P̄, ``kfade.report.matched``) and ``pareto.png`` into
    ``sweep_dir``; returns the collected results and the markdown text (table, skipped jobs, matched table)."""
    root = Path(sweep_dir)
    sweep = collect_results(root)
    columns = table_columns(sweep.rows)
    markdown = markdown_table(sweep.rows, varying_columns(sweep.rows, columns))  # the CSV keeps every column
    if sweep.skipped:
        markdown += f"\nSkipped {len(sweep.skipped)} broken or incomplete job(s):\n"
        markdown += "".join(f"- {job}: {reason}\n" for job, reason in sweep.skipped)
    matched = matched_rows(sweep.rows, exclude_methods=REFERENCE_METHODS)
    outputs = {"report.md": markdown, "report.csv": csv_table(sweep.rows, columns),
               "matched.md": matched_markdown(matched), "matched.csv": matched_csv(matched)}
    for name, text in outputs.items():
        with atomic_path(root / name) as tmp:
            tmp.write_text(text)
    write_pareto_plot(sweep.rows, root / "pareto.png", REFERENCE_METHODS, group=variant)
    heading = "\nAt matched forget P̄ (interpolated; — = outside the swept range):\n\n"
    return sweep, markdown + heading + outputs["matched.md"]


def aggregate_log_dirs(tofu_logs: str | os.PathLike, retain_logs: str | os.PathLike) -> dict[str, float]:
    """Flat TOFU metrics of the eval logs in ``tofu_logs``, forget quality against those in ``retain_logs``."""
    return aggregate_tofu_logs(read_tofu_logs(tofu_logs, key="report.tofu_logs"),
                               read_tofu_logs(retain_logs, key="report.retain_logs"))
