"""What a run prints on stdout: its two-line header (the resolved choices) and its tables of headline metrics."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from kfade.pipeline.config import RunConfig


def method_knobs(method) -> str:
    """The method settings a reader checks first (those of its step rule and solver only)."""
    values = vars(method)
    rule = values.get("step_rule")
    shown = {"solver": True, "step_rule": True, "target_forget_prob": rule == "target_forget",
             "kl_budget": rule == "trust_region", "step_size": rule in ("fixed", "normalized"), "n_steps": True,
             "cg_iters": values.get("solver") == "cg", "lr": True, "epochs": True}
    return ", ".join(f"{k}={values[k]}" for k, show in shown.items() if show and k in values)


def header(config: RunConfig, run_dir: Path, choices: Mapping[str, str | None]) -> str:
    """The run's resolved choices in two lines: what a user checks first when a sweep looks wrong. ``choices``: the
    config group options the run was composed from (Hydra's ``runtime.choices``)."""
    model, dataset, curvature = config.model, config.dataset, config.curvature
    parts = [f"model={choices.get('model')} ({model.path or 'tiny, trained here'}, {model.device}, {model.dtype})",
             f"dataset={choices.get('dataset')} ({dataset.source}, {dataset.forget_split})"]
    if config.method_name == "kfade":
        parts.append(f"curvature={choices.get('curvature')} ({curvature.damping_mode} damping {curvature.damping})")
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
