"""Regimes side by side (``experiments/sweeps/compare.sh``: one sweep per regime, e.g. ``scratch`` and ``pretrained``):
each regime's reference models, its variants at matched forget P̄ (``kfade.report.matched``), and the spread over
seeds of the sweeps that have a ``seeds_<sweep>`` twin.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import defaultdict
from pathlib import Path

from kfade.cache import atomic_path
from kfade.errors import ConfigError
from kfade.report.matched import (
    MATCH_TOLERANCE,
    PROB_KEY,
    RETRAIN_LEVEL,
    SEEDS_PREFIX,
    _cell,
    markdown_cells,
    matched_rows,
    sweep_of,
)
from kfade.report.numbers import number as _number
from kfade.report.report import REFERENCE_METHODS, collect_results
from kfade.tracking import RESULTS_FILE

REGIME_METRICS = ("kl_reference/retain", "kl_reference/general", "model_utility", "forget_quality", "time/unlearn_s")
SEEDS_LEVEL = 0.38  # the level at which regime reports summarise seeds_<sweep> repeats (make compare)


def write_regimes_report(root: str | os.PathLike) -> str:
    """``regimes.md`` of the regime sweeps under ``root`` (each subdirectory with results is one regime, e.g.
    ``scratch`` and ``pretrained`` of ``experiments/sweeps/compare.sh``): each regime's reference
    models, then the matched tables side by side (:func:`regimes_markdown`; ``seeds_…`` sweeps left
    out), then — where a sweep has a
    ``seeds_<sweep>`` twin — mean ± sd over its runs at P̄ ``SEEDS_LEVEL`` (``seeds_markdown``). Returns the text."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError("report.regimes", str(root), "not a directory")
    dirs = sorted(d for d in root.iterdir() if d.is_dir() and next(d.rglob(RESULTS_FILE), None))
    if not dirs:
        raise ConfigError("report.regimes", str(root), f"no subdirectory with a {RESULTS_FILE} (one per regime)")
    rows = {d.name: collect_results(d).rows for d in dirs}
    levels = {name: [x for x in r if not sweep_of(x).startswith(SEEDS_PREFIX)] for name, r in rows.items()}
    text = regimes_markdown({name: matched_rows(r, exclude_methods=REFERENCE_METHODS) for name, r in levels.items()},
                            {name: [x for x in r if x.get("method") in REFERENCE_METHODS] for name, r in rows.items()})
    spreads = {name: seed_spread(r, SEEDS_LEVEL) for name, r in rows.items()}
    if any(spreads.values()):
        text += "\n" + seeds_markdown(spreads, SEEDS_LEVEL)
    with atomic_path(root / "regimes.md") as tmp:
        tmp.write_text(text)
    return text


def regimes_markdown(matched: dict[str, list[dict]], models: dict[str, list[dict]],
                     metrics=REGIME_METRICS) -> str:
    """Regimes side by side: the reference models of each regime (``models``: rows with ``method`` and their own
    ``forget/prob``) at their own P̄, then per level a table with a row per variant and, for each regime
    (``matched``: its :func:`matched_rows`), a column per metric. "—": no value."""
    names = list(matched)
    by_method = {n: {} for n in names}
    for n in names:  # a method's first row: the models of the first jobs (later ones may be other seeds' models)
        for r in models.get(n, []):
            by_method[n].setdefault(r["method"], r)
    keys = (PROB_KEY, *(m for m in metrics if not m.startswith("time/")))  # reference models: not unlearned
    rows = [[method, *(_cell(_number(by_method[n].get(method, {}).get(k))) for n in names for k in keys)]
            for method in sorted({m for n in names for m in by_method[n]})]
    out = ["**Reference models (at their own P̄)**\n\n"
           + markdown_cells(["model", *(f"{n}: {k}" for n in names for k in keys)], rows)]
    head = ["method", *(f"{n}: {m}" for n in names for m in metrics)]
    labels = list(dict.fromkeys(r["level"] for rs in matched.values() for r in rs))
    for label in labels:
        at = {n: {r["name"]: r for r in matched[n] if r["level"] == label} for n in names}
        rows = [[v, *(_cell(at[n].get(v, {}).get(m)) for n in names for m in metrics)]
                for v in sorted({v for n in names for v in at[n]})]
        title = f"Forget P̄ = {label}" if label != RETRAIN_LEVEL else "Forget P̄ = the retrain model's own (" + \
            ", ".join(f"{n} {next(r['forget_prob'] for r in matched[n] if r['level'] == label):.3g}"
                      for n in names if any(r["level"] == label for r in matched[n])) + ")"
        out.append(f"**{title}**\n\n" + markdown_cells(head, rows))
    return "\n\n".join(out) + "\n"


def seed_spread(rows: list[dict], level: float, metrics=REGIME_METRICS) -> list[dict]:
    """Mean and sample sd over the runs at P̄ ``level`` (within :data:`MATCH_TOLERANCE`) of each sweep together with
    its ``seeds_<sweep>`` twin: one record per sweep that has such a twin, ``{"name", "runs", metric: (mean, sd)}``
    (sd None for one run; a metric no run has is left out)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        p = _number(row.get(PROB_KEY))
        if p is not None and p > 0 and abs(math.log(p / level)) <= MATCH_TOLERANCE:
            groups[sweep_of(row).removeprefix(SEEDS_PREFIX)].append(row)
    twins = {sweep_of(r).removeprefix(SEEDS_PREFIX) for r in rows if sweep_of(r).startswith(SEEDS_PREFIX)}
    out = []
    for name in sorted(twins & set(groups)):
        record = {"name": name, "runs": len(groups[name])}
        for metric in metrics:
            values = [v for v in (_number(r.get(metric)) for r in groups[name]) if v is not None]
            if values:
                record[metric] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None)
        out.append(record)
    return out


def seeds_markdown(spreads: dict[str, list[dict]], level: float, metrics=REGIME_METRICS) -> str:
    """Per regime (``spreads``: its :func:`seed_spread`), ``mean ± sd (n)`` of each metric at P̄ ``level``."""
    names = list(spreads)
    head = ["sweep", *(f"{n}: {m}" for n in names for m in metrics)]

    def cell(record: dict | None, metric: str) -> str:
        if record is None or metric not in record:
            return "—"
        mean, sd = record[metric]
        return f"{mean:.3g}" + ("" if sd is None else f" ± {sd:.2g}") + f" ({record['runs']})"

    rows = [[s, *(cell(next((r for r in spreads[n] if r["name"] == s), None), m) for n in names for m in metrics)]
            for s in sorted({r["name"] for rs in spreads.values() for r in rs})]
    return f"**Seeds at forget P̄ = {level:g}** (mean ± sd over runs (n))\n\n" + markdown_cells(head, rows) + "\n"

