"""Extraction strength and exact memorisation (OpenUnlearning's ``extraction_strength``, ``exact_memorization``).

Over an item's answer tokens y_1..y_n (closing EOS excluded), with hit_t = 1[argmax p(·|question, y_<t) = y_t]:

- exact memorisation EM = (1/n) Σ_t hit_t;
- extraction strength ES = 1 − k*/n, k* the shortest prefix y_<k* after which greedy decoding reproduces the rest
  of the answer exactly (k* = n if none). Greedy decoding from y_<k reproduces y_k..y_n iff every teacher-forced
  argmax from k on is a hit, so k* = n − (number of trailing hits) and ES = trailing hits / n. (OpenUnlearning's
  loop stops at k = n − 1, so it reports 1/n rather than 0 when even the last token is missed.)

Both are fractions in [0, 1], averaged over items.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kfade.eval.scoring import TokenStats


def exact_memorization(hit: np.ndarray) -> float:
    """Fraction of answer tokens that are the argmax prediction."""
    return float(np.mean(hit))


def extraction_strength(hit: np.ndarray) -> float:
    """1 − k*/n: the fraction of the answer greedy decoding completes from the shortest possible prefix."""
    misses = np.flatnonzero(~np.asarray(hit, dtype=bool))
    trailing = len(hit) - (misses[-1] + 1) if len(misses) else len(hit)
    return trailing / len(hit)


def extraction_metrics(stats: Sequence[TokenStats], prefix: str = "forget") -> dict[str, float]:
    """``<prefix>/extraction_strength`` and ``<prefix>/exact_memorization``, means over items."""
    return {f"{prefix}/extraction_strength": float(np.mean([extraction_strength(s.hit) for s in stats])),
            f"{prefix}/exact_memorization": float(np.mean([exact_memorization(s.hit) for s in stats]))}
