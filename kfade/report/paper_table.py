"""The paper's tables from a paper sweep (``experiments/sweeps/paper_*.sh``): one column block per setting
(TOFU forget split / WMDP forget corpus: the sweep dir's subdirectories), one row per method variant, and in
each cell the variant's *selected* run of that setting:

- TOFU: the run with the highest forget quality (ties: higher model utility); columns forget quality, model
  utility. Rows ``retrain`` and ``reference`` come from the jobs' ``retrain/…`` / ``reference/…`` scores.
- WMDP: the run with the lowest accuracy on the setting's own task (``wmdp_bio/acc`` for ``bio``) among those
  whose MMLU accuracy is within ``MMLU_DROP`` of the reference's (none: the one with the highest MMLU);
  columns wmdp_bio, wmdp_cyber, mmlu accuracy (chance 0.25).
"""

from __future__ import annotations

import math
from pathlib import Path

from kfade.errors import ConfigError
from kfade.report.matched import variant
from kfade.report.numbers import number
from kfade.report.report import REFERENCE_METHODS, collect_results

TABLES = {"tofu": ("forget_quality", "model_utility"), "wmdp": ("wmdp_bio/acc", "wmdp_cyber/acc", "mmlu/acc")}
MMLU_DROP = 0.05  # WMDP: selected runs keep MMLU within this of the reference model's


def _value(row: dict, key: str, missing: float = -math.inf) -> float:
    """``row[key]`` as a float; ``missing`` when absent or not finite (ranks it last)."""
    value = number(row.get(key))
    return missing if value is None else value


def select_run(rows: list[dict], kind: str, setting: str) -> dict:
    """The run of one variant that represents it in ``setting`` (module docstring)."""
    if kind == "tofu":
        return max(rows, key=lambda r: (_value(r, "forget_quality"), _value(r, "model_utility")))
    task = f"wmdp_{setting}/acc"
    keep = [r for r in rows if _value(r, "mmlu/acc") >= _value(r, "reference/mmlu/acc", math.inf) - MMLU_DROP]
    if not keep:
        return max(rows, key=lambda r: _value(r, "mmlu/acc"))
    return min(keep, key=lambda r: _value(r, task, math.inf))


def paper_table(sweep_dir: str | Path, kind: str) -> str:
    """Markdown table of ``kind`` (tofu | wmdp) over the settings (subdirectories) of ``sweep_dir``."""
    if kind not in TABLES:
        raise ConfigError("report.paper", kind, f"must be one of {', '.join(TABLES)}")
    root = Path(sweep_dir)
    settings = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")) \
        if root.is_dir() else []
    if not settings:
        raise ConfigError("report.dir", str(root), "no setting subdirectories (forget01/…, bio/…) in it")
    metrics = TABLES[kind]
    cells: dict[str, dict[str, dict]] = {}
    for setting in settings:
        by_variant: dict[str, list[dict]] = {}
        for row in collect_results(root / setting).rows:
            name = row["method"] if row.get("method") in REFERENCE_METHODS else variant(row)
            by_variant.setdefault(name, []).append(row)
        for name, rows in by_variant.items():
            cells.setdefault(name, {})[setting] = select_run(rows, kind, setting)
    head = "| method | " + " | ".join(f"{s} {m.removesuffix('/acc')}" for s in settings for m in metrics) + " |"
    lines = [head, "|" + "---|" * (1 + len(settings) * len(metrics))]
    order = [m for m in REFERENCE_METHODS if m in cells] + sorted(n for n in cells if n not in REFERENCE_METHODS)
    for name in order:
        values = [cells[name].get(s, {}).get(m) for s in settings for m in metrics]
        lines.append(f"| {name} | " + " | ".join("—" if v is None else f"{v:.4g}" for v in values) + " |")
    return "\n".join(lines) + "\n"
