"""Progress bars follow one rule: shown only where a person watches them (``progress`` on, stderr a terminal, the
main rank). The project's own tqdm bars take ``progress`` resolved by :func:`shown`; the libraries' bars
(transformers' "Writing model shards", datasets' map and filter) are switched to match with :func:`library_bars`,
so neither ends up in a log file.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import datasets
import transformers

from kfade import distributed


def shown(progress: bool = True) -> bool:
    """Whether bars asked for with ``progress`` are drawn: only on a terminal, and only on the main rank."""
    return progress and sys.stderr.isatty() and distributed.is_main()


def _set(transformers_on: bool, datasets_on: bool) -> None:
    if transformers_on:
        transformers.utils.logging.enable_progress_bar()
    else:
        transformers.utils.logging.disable_progress_bar()
    if datasets_on:
        datasets.enable_progress_bars()
    else:
        datasets.disable_progress_bars()


@contextlib.contextmanager
def library_bars(enabled: bool) -> Iterator[None]:
    """Within the block the libraries' bars are on iff ``enabled`` (pass the resolved ``progress``); restored after."""
    before = (transformers.utils.logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled())
    _set(enabled, enabled)
    try:
        yield
    finally:
        _set(*before)
