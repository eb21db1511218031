"""Reading a results value as a number: the one rule every report table and plot applies."""

from __future__ import annotations

import math


def number(value) -> float | None:
    """``value`` as a float when it is a finite int or float (not a bool), else None (missing, text, NaN, ±inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)
