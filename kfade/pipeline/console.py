"""What a run prints on stdout: its two-line header (the resolved choices) and its tables of headline metrics."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from kfade.pipeline.config import RunConfig
from kfade.unlearn.solvers import SOLVERS
from kfade.unlearn.step_rules import STEP_RULES


def method_knobs(method) -> str:
    """The method settings a reader checks first (of K-FADE's, those its step rule and solver read)."""
    values = vars(method)
    rule, solver = STEP_RULES.get(values.get("step_rule")), SOLVERS.get(values.get("solver"))
    shown = ["solver", "step_rule", *(rule.knobs if rule else ()), "n_steps", *(solver.knobs if solver else ()),
             "forget_loss", "retain_weight", "lr", "epochs"]
    return ", ".join(f"{k}={values[k]}" for k in shown if k in values)


def header(config: RunConfig, run_dir: Path, choices: Mapping[str, str | None]) -> str:
    """The run's resolved choices in two lines: what a user checks first when a sweep looks wrong. ``choices``: the
    config group options the run was composed from (Hydra's ``runtime.choices``)."""
    model, dataset, curvature = config.model, config.dataset, config.curvature
    parts = [f"model={choices.get('model')} ({model.path or 'tiny, trained here'}, {model.device}, {model.dtype})",
             f"dataset={choices.get('dataset')} ({dataset.source}, {dataset.forget_split})"]
    if config.uses_curvature:  # the damping the step uses: the method's override (kfade_cg's), else the group's
        method = vars(config.method)
        damping, mode = curvature.damping_of(method.get("damping"), method.get("damping_mode"))
        parts.append(f"curvature={choices.get('curvature')} ({mode} damping {damping})")
    knobs = method_knobs(config.method) if config.method is not None else ""
    parts += [f"method={choices.get('method')}" + (f" ({knobs})" if knobs else ""),
              f"eval={choices.get('eval')}", f"logger={choices.get('logger')}"]
    return "run: " + " · ".join(parts) + f"\ndir: {run_dir}"


def table(results: Mapping, rows: list[str], keys: list[str]) -> str:
    """The headline metrics as markdown, one row per model (``reference``, ``retrain``, …, and ``unlearned``)."""
    lines = ["\n| model | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 1)]
    for row in rows:
        prefix = "" if row == "unlearned" else f"{row}/"
        cells = [results.get(prefix + k) for k in keys]
        lines.append(f"| {row} | " + " | ".join("—" if c is None else f"{c:.4g}" for c in cells) + " |")
    return "\n".join(lines)
