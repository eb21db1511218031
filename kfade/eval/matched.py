"""Methods compared at matched forgetting: each variant's metrics interpolated to fixed forget-set P̄ levels.

A sweep varies each method's strength (K-FADE's η or target, a baseline's lr or epochs), so every variant
(method + curvature estimator + solver, and K-FADE's step count when > 1) traces a curve of metric against forget
P̄ (``forget/prob``). At a level L
the metric is interpolated linearly in log P̄ between the variant's two nearest runs on either side of L; a run
within ``MATCH_TOLERANCE`` (relative) of L is taken as it is; a level outside the variant's swept range has no
value (None; "—" in the markdown table).
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict

LEVELS = (0.62, 0.38, 0.10)
MATCHED_METRICS = ("kl_reference/retain", "kl_retrain/retain", "kl_retrain/forget", "model_utility",
                   "forget_quality")
GENERAL_METRICS = ("kl_reference/general", "general/ppl")  # with dataset.general only: columns shown when present
REGIME_METRICS = ("kl_reference/retain", "kl_reference/general", "model_utility", "forget_quality")
PROB_KEY = "forget/prob"
MATCH_TOLERANCE = 0.01  # |log(P̄ / L)| at which a run counts as being at the level itself


def variant(row: dict) -> str:
    """``kfade/<estimator>/<solver>`` for K-FADE runs (solver ``direct`` when the run predates the solver
    option), with ``×<n>`` appended for n > 1 steps and ``+<set>`` for fitting sets besides retain; else the
    method name."""
    method = str(row.get("method"))
    if method != "kfade":
        return method
    steps = row.get("hp/n_steps", 1)
    suffix = f"×{steps}" if steps not in (None, 1) else ""
    suffix += "".join(f"+{name}" for name in str(row.get("hp/fit_sets", "retain")).split(",") if name != "retain")
    return f"kfade/{row.get('hp/curvature/estimator', '?')}/{row.get('hp/solver', 'direct')}{suffix}"


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def interpolate_at(points: list[tuple[float, float]], level: float) -> float | None:
    """The value at P̄ = ``level`` from ``(P̄, value)`` points (see the module docstring), or None."""
    points = [(p, v) for p, v in points if p > 0]
    if not points:
        return None
    x = math.log(level)
    nearest = min(points, key=lambda pv: abs(math.log(pv[0]) - x))
    if abs(math.log(nearest[0]) - x) <= MATCH_TOLERANCE:
        return nearest[1]
    below = [pv for pv in points if pv[0] < level]
    above = [pv for pv in points if pv[0] > level]
    if not below or not above:
        return None
    (p0, v0), (p1, v1) = max(below, key=lambda pv: pv[0]), min(above, key=lambda pv: pv[0])
    t = (x - math.log(p0)) / (math.log(p1) - math.log(p0))
    return v0 + t * (v1 - v0)


def matched_rows(rows: list[dict], exclude_methods=(), levels=LEVELS,
                 metrics=MATCHED_METRICS + GENERAL_METRICS) -> list[dict]:
    """One row per (variant, level): ``variant``, ``forget_prob`` (the level), then each metric (or None)."""
    by_variant: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("method") not in exclude_methods and _number(row.get(PROB_KEY)) is not None:
            by_variant[variant(row)].append(row)
    out = []
    for name in sorted(by_variant):
        for level in levels:
            record = {"variant": name, "forget_prob": level}
            for metric in metrics:
                points = [(float(r[PROB_KEY]), _number(r.get(metric))) for r in by_variant[name]]
                record[metric] = interpolate_at([(p, v) for p, v in points if v is not None], level)
            out.append(record)
    return out


def columns_of(records: list[dict]) -> list[str]:
    """:data:`MATCHED_METRICS`, then each of :data:`GENERAL_METRICS` that some record has a value for."""
    return [*MATCHED_METRICS, *(m for m in GENERAL_METRICS if any(r.get(m) is not None for r in records))]


def markdown_cells(head: list[str], rows: list[list[str]]) -> str:
    """A GitHub-markdown table of ready-formatted cells (no trailing newline)."""
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *("| " + " | ".join(cells) + " |" for cells in rows)])


def matched_markdown(records: list[dict]) -> str:
    metrics = columns_of(records)
    rows = [[r["variant"], f"{r['forget_prob']:g}", *("—" if r[m] is None else f"{r[m]:.4g}" for m in metrics)]
            for r in records]
    return markdown_cells(["variant", "forget_prob", *metrics], rows) + "\n"


def matched_csv(records: list[dict]) -> str:
    metrics = columns_of(records)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["variant", "forget_prob", *metrics])
    for r in records:
        writer.writerow([r["variant"], r["forget_prob"], *("" if r[m] is None else repr(r[m]) for m in metrics)])
    return out.getvalue()


def regimes_markdown(matched: dict[str, list[dict]], models: dict[str, list[dict]],
                     metrics=REGIME_METRICS) -> str:
    """Regimes side by side: the reference models of each regime (``models``: rows with ``method`` and their own
    ``forget/prob``) at their own P̄, then per level a table with a row per variant and, for each regime
    (``matched``: its :func:`matched_rows`), a column per metric. "—": no value."""
    names = list(matched)
    by_method = {n: {r["method"]: r for r in models.get(n, [])} for n in names}
    keys = (PROB_KEY, *metrics)
    rows = [[method, *(_cell(_number(by_method[n].get(method, {}).get(k))) for n in names for k in keys)]
            for method in sorted({m for n in names for m in by_method[n]})]
    out = ["**Reference models (at their own P̄)**\n\n"
           + markdown_cells(["model", *(f"{n}: {k}" for n in names for k in keys)], rows)]
    head = ["method", *(f"{n}: {m}" for n in names for m in metrics)]
    for level in sorted({r["forget_prob"] for rs in matched.values() for r in rs}, reverse=True):
        at = {n: {r["variant"]: r for r in matched[n] if r["forget_prob"] == level} for n in names}
        rows = [[v, *(_cell(at[n].get(v, {}).get(m)) for n in names for m in metrics)]
                for v in sorted({v for n in names for v in at[n]})]
        out.append(f"**Forget P̄ = {level:g}**\n\n" + markdown_cells(head, rows))
    return "\n\n".join(out) + "\n"
