"""Methods compared at matched forgetting: each variant's metrics interpolated to fixed forget-set P̄ levels.

A sweep varies each method's strength (K-FADE's target or η, a baseline's target P̄ or lr), so every variant
(method + curvature estimator + solver, K-FADE's step count when > 1, a forget objective other than the method's
default) of every sweep sub-directory traces a curve of metric against forget P̄ (``forget/prob``). The levels
are :data:`LEVELS` and ``retrain``: the retrain model's own forget P̄ (from the runs' ``retrain/forget/prob``),
where a perfect unlearner's forget quality sits at the noise floor. At a level L the metric is interpolated
linearly in log P̄ between the variant's two nearest runs on either side of L; a run within ``MATCH_TOLERANCE``
(relative) of L is taken as it is; a level outside the variant's swept range has no value (None; "—" in the
markdown table).
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict

from kfade.eval.audits import HEADLINE_KEYS as AUDIT_KEYS
from kfade.report.numbers import number as _number
from kfade.unlearn import METHODS

LEVELS = (0.62, 0.38, 0.10)
RETRAIN_LEVEL = "retrain"  # the level at the retrain model's own forget P̄
MATCHED_METRICS = ("kl_reference/retain", "kl_retrain/retain", "kl_retrain/forget", "model_utility",
                   "forget_quality", "time/unlearn_s")
GENERAL_METRICS = ("kl_reference/general", "general/ppl")  # with dataset.general only: columns shown when present
OPTIONAL_METRICS = GENERAL_METRICS + AUDIT_KEYS  # audits (eval.audits) too: columns shown when present
PROB_KEY = "forget/prob"
MATCH_TOLERANCE = 0.01  # |log(P̄ / L)| at which a run counts as being at the level itself
SEEDS_PREFIX = "seeds_"  # a sweep ``seeds_<name>`` repeats sweep ``<name>`` at one level with other seeds


def variant(row: dict) -> str:
    """``kfade/<estimator>/<solver>`` for K-FADE runs (solver ``direct`` when the run predates the solver
    option), with ``×<n>`` appended for n > 1 steps and ``+<set>`` for fitting sets besides retain; else the
    method name. Either way ``[<forget_loss>]`` follows when the run's forget objective is not its method's
    default (runs that predate the option have none), so a sweep over objectives is never pooled."""
    method = str(row.get("method"))
    loss = row.get("hp/forget_loss")
    config = METHODS.get(method, (None,))[0]
    if loss is not None and config is not None and loss != getattr(config(), "forget_loss", loss):
        method_loss = f"[{loss}]"
    else:
        method_loss = ""
    if method != "kfade":
        return method + method_loss
    steps = row.get("hp/n_steps", 1)
    suffix = f"×{steps}" if steps not in (None, 1) else ""
    suffix += "".join(f"+{name}" for name in str(row.get("hp/fit_sets", "retain")).split(",") if name != "retain")
    return f"kfade/{row.get('hp/curvature/estimator', '?')}/{row.get('hp/solver', 'direct')}{suffix}{method_loss}"


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


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


def sweep_of(row: dict) -> str:
    """The sweep sub-directory a job came from (the first part of its ``job`` path), "" for a flat sweep."""
    parts = str(row.get("job", "")).split("/")
    return parts[0] if len(parts) > 1 else ""


def matched_levels(rows: list[dict], levels=LEVELS) -> list[tuple[str, float]]:
    """``(label, P̄)`` per level: ``levels`` (label ``f"{P̄:g}"``), then ``retrain`` at the retrain model's forget P̄
    when the rows carry it (``retrain/forget/prob``, or a ``retrain`` reference row)."""
    out = [(f"{level:g}", level) for level in levels]
    retrain = next((_number(r.get(f"{RETRAIN_LEVEL}/{PROB_KEY}")) for r in rows
                    if _number(r.get(f"{RETRAIN_LEVEL}/{PROB_KEY}")) is not None), None)
    if retrain is None:
        retrain = next((_number(r.get(PROB_KEY)) for r in rows if r.get("method") == RETRAIN_LEVEL), None)
    return out + ([(RETRAIN_LEVEL, retrain)] if retrain is not None and retrain > 0 else [])


def matched_rows(rows: list[dict], exclude_methods=(), levels=LEVELS,
                 metrics=MATCHED_METRICS + OPTIONAL_METRICS) -> list[dict]:
    """One row per (sweep, variant, level): ``sweep``, ``variant``, ``name`` (how tables show it: the sweep when it
    holds one variant, else ``sweep:variant``, the variant when there is no sweep), ``level`` (its label),
    ``forget_prob`` (the level's P̄), then each metric (or None)."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("method") not in exclude_methods and _number(row.get(PROB_KEY)) is not None:
            groups[(sweep_of(row), variant(row))].append(row)
    per_sweep = defaultdict(int)
    for sweep, _ in groups:
        per_sweep[sweep] += 1
    out, at_levels = [], matched_levels(rows, levels)
    for sweep, name in sorted(groups):
        shown = name if not sweep else sweep if per_sweep[sweep] == 1 else f"{sweep}:{name}"
        for label, level in at_levels:
            record = {"sweep": sweep, "variant": name, "name": shown, "level": label, "forget_prob": level}
            for metric in metrics:
                points = [(float(r[PROB_KEY]), _number(r.get(metric))) for r in groups[(sweep, name)]]
                record[metric] = interpolate_at([(p, v) for p, v in points if v is not None], level)
            out.append(record)
    return out


def columns_of(records: list[dict]) -> list[str]:
    """:data:`MATCHED_METRICS`, then each of :data:`OPTIONAL_METRICS` (general text, audits) that some record has a
    value for."""
    return [*MATCHED_METRICS, *(m for m in OPTIONAL_METRICS if any(r.get(m) is not None for r in records))]


def markdown_cells(head: list[str], rows: list[list[str]]) -> str:
    """A GitHub-markdown table of ready-formatted cells (no trailing newline)."""
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *("| " + " | ".join(cells) + " |" for cells in rows)])


def matched_markdown(records: list[dict]) -> str:
    """The matched table; a level no variant reaches (a sweep at one target P̄, like ``make demo``'s) is left
    out (``matched_csv`` keeps every level)."""
    metrics = columns_of(records)
    reached = {r["level"] for r in records if any(r[m] is not None for m in metrics)}
    rows = [[r["name"], r["level"], f"{r['forget_prob']:.3g}", *("—" if r[m] is None else f"{r[m]:.4g}"
                                                                 for m in metrics)]
            for r in records if r["level"] in reached]
    return markdown_cells(["variant", "level", "forget_prob", *metrics], rows) + "\n"


def matched_csv(records: list[dict]) -> str:
    metrics = columns_of(records)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["level", "sweep", "variant", "forget_prob", *metrics])
    for r in records:
        writer.writerow([r["level"], r["sweep"], r["variant"], repr(r["forget_prob"]),
                         *("" if r[m] is None else repr(r[m]) for m in metrics)])
    return out.getvalue()
