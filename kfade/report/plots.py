"""The sweep's Pareto plot: forget quality vs model utility, forget quality vs KL to the retrain model, and the
KL from the reference on retain data vs forget P̄ (the matched-forgetting view).

Forget quality (a KS-test p-value, higher = closer to the retrain model) spans decades, so its axis is log
scaled; so is the KL axis when its values do (symlog, linear below the smallest positive value, when one of
them is 0, e.g. the retrain model itself). Each variant (``group`` of a row) is one colour, its runs joined by a
line in x order (its front as the strength varies); reference models are black markers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from matplotlib.figure import Figure

from kfade.cache import atomic_path
from kfade.report.numbers import number as _number

PANELS = (("model_utility", "forget_quality", "forget quality vs model utility"),
          ("kl_retrain/retain", "forget_quality", "forget quality vs output-space KL to retrain (retain set)"),
          ("forget/prob", "kl_reference/retain", "retain outputs changed vs forget P̄ (lower-left is better)"))
REFERENCE_MARKERS = {"retrain": "*", "reference": "X", "noise_floor": "P"}
LOG_SPAN = 10.0  # a log axis when the positive values span more than this factor


def _points(rows: list[dict], x: str, y: str) -> list[tuple[float, float, dict]]:
    points = [(_number(row.get(x)), _number(row.get(y)), row) for row in rows]
    return [(px, py, row) for px, py, row in points if px is not None and py is not None]


def _set_scale(axis_setter, values: list[float]) -> None:
    """log when all values are positive and span > LOG_SPAN; symlog when some are 0; else linear."""
    positive = [v for v in values if v > 0]
    if not positive or max(positive) / min(positive) <= LOG_SPAN or any(v < 0 for v in values):
        return
    if len(positive) == len(values):
        axis_setter("log")
    else:
        axis_setter("symlog", linthresh=min(positive))


def write_pareto_plot(rows: list[dict], path: str | os.PathLike, reference_methods: Sequence[str],
                      group: Callable[[dict], str] = lambda row: str(row.get("method"))) -> None:
    """The ``PANELS`` of the jobs in ``rows``, one line per ``group(row)``; reference models drawn once, as black
    markers. Written atomically as PNG."""
    fig = Figure(figsize=(5.5 * len(PANELS), 4.5), layout="constrained")  # Agg canvas; no pyplot global state
    axes = fig.subplots(1, len(PANELS))
    for ax, (x, y, title) in zip(axes, PANELS, strict=True):
        points = _points(rows, x, y)
        jobs = [p for p in points if p[2].get("method") not in reference_methods]
        for name in sorted({group(p[2]) for p in jobs}):
            mine = sorted((p for p in jobs if group(p[2]) == name), key=lambda p: p[0])
            ax.plot([p[0] for p in mine], [p[1] for p in mine], marker="o", label=name, alpha=0.8)
        for method in reference_methods:
            mine = [p for p in points if p[2].get("method") == method]
            if mine:
                ax.scatter([p[0] for p in mine], [p[1] for p in mine], s=150,
                           marker=REFERENCE_MARKERS.get(method, "s"), color="black", label=method, zorder=3)
        if not points:
            ax.text(0.5, 0.5, f"no job has {x} and {y}", ha="center", va="center", transform=ax.transAxes)
        _set_scale(ax.set_xscale, [p[0] for p in points])
        _set_scale(ax.set_yscale, [p[1] for p in points])
        for scale, limit, values in ((ax.get_xscale, ax.set_xlim, [p[0] for p in points]),
                                     (ax.get_yscale, ax.set_ylim, [p[1] for p in points])):
            if scale() == "symlog" and min(values) >= 0:
                limit(0, None)  # no empty negative half below the 0 of a reference model
        ax.set_title(title)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(True, which="major", alpha=0.3)
        if points:
            ax.legend(fontsize="small")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
