"""One error type for bad user input: a one-line message naming the offending key and value."""

from __future__ import annotations

import math
from collections.abc import Sequence


class ConfigError(ValueError):
    """Bad input, reported as ``key=value: reason`` on one line (entry points print it without a traceback)."""

    def __init__(self, key: str, value, reason: str):
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"{key}={value!r}: {reason}")


def require_range(key: str, value, low: float | None = None, high: float | None = None, *,
                  open_low: bool = False, open_high: bool = False, optional: bool = False) -> None:
    """ConfigError ``key=value`` unless ``value`` is a finite number in the range (None too, when ``optional``).

    ``low``/``high`` are inclusive bounds unless ``open_low``/``open_high``; None means unbounded.
    """
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value < high if open_high else value <= high
    if not ok:
        if low is not None and high is not None:
            allowed = f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        elif low is not None:
            allowed = f"{'>' if open_low else '>='} {low}"
        else:
            allowed = f"{'<' if open_high else '<='} {high}"
        raise ConfigError(key, value, f"must be a finite number {allowed}" + (" or null" if optional else ""))


def require_one_of(key: str, value, choices: Sequence) -> None:
    """ConfigError ``key=value`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(key, value, f"choose one of {list(choices)}")
