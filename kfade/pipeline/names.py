"""Readable, flat run names from a job's command-line overrides (run directories and W&B run names).

``key=value`` pairs, sorted by key, joined by ``,``. A value that is a path (it has ``/``) or longer than
``MAX_VALUE`` characters becomes a short readable stem plus 6 hex digits of its SHA-1 (``source=TOFU-3f2a9c``);
secrets (``logger.entity``) and Hydra's own keys are left out; the whole name is capped at ``MAX_NAME`` characters
(the rest replaced by a hash). The name never contains ``/``, so a run directory is one level under its date.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

MAX_VALUE, MAX_NAME = 24, 120
EXCLUDED_KEYS = ("logger.entity",)  # secrets: never in a folder or run name
EXCLUDED_PREFIXES = ("hydra.", "+hydra.", "~hydra.")


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:6]


def short_value(value: str) -> str:
    """``value`` itself when short and slash-free, else its last path component (≤ MAX_VALUE characters) + hash."""
    if "/" not in value and len(value) <= MAX_VALUE:
        return value
    stem = re.sub(r"[^A-Za-z0-9._-]+", "", value.rstrip("/").rsplit("/", 1)[-1])[:MAX_VALUE]
    return f"{stem}-{_digest(value)}" if stem else _digest(value)


def run_name(overrides: Iterable[str] | str | None) -> str:
    """``-key=value,…`` for the overrides (empty string when there are none), see the module docstring."""
    if overrides is None or isinstance(overrides, str):
        overrides = [o for o in (overrides or "").split(" ") if o]
    pairs = []
    for override in overrides:
        key, _, value = str(override).partition("=")
        if key.lstrip("+~") in EXCLUDED_KEYS or key.startswith(EXCLUDED_PREFIXES):
            continue
        pairs.append((key, short_value(value)))
    name = ",".join(f"{k}={v}" for k, v in sorted(pairs)).replace("/", "_")
    if len(name) > MAX_NAME:
        name = f"{name[: MAX_NAME - 7]}-{_digest(name)}"
    return f"-{name}" if name else ""
