"""Local benchmark files: where a source points, which file holds a split, reading it with ``datasets``.

A source is ``"mini"`` (materialised once into the cache by a generator), an existing local directory, or a Hub
id ``owner/name``. In a directory a split ``<name>`` is the first of :data:`LAYOUTS` that matches: a JSON-lines or
JSON-array file, a parquet file, a text file (one row per line), a ``push_to_hub`` snapshot
(``<name>/train-*.parquet``, ``data/<name>-*.parquet``) or the Hub's parquet conversion (``<name>/train/*.parquet``).
Shared by :mod:`kfade.data.tofu` and :mod:`kfade.data.wmdp`.
"""

from __future__ import annotations

import glob
import hashlib
import re
from collections.abc import Callable
from pathlib import Path

import datasets

from kfade.cache import atomic_path, cache_dir, cached, fingerprint, seal
from kfade.errors import ConfigError

LAYOUTS = ("{name}.json", "{name}.jsonl", "{name}.parquet", "{name}.txt", "{name}/train-*.parquet",
           "{name}/train/*.parquet", "data/{name}-*.parquet")
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}  # suffix -> builder
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_source(source: str, make_mini: Callable[[], Path], key: str = "dataset.source") -> Path | str:
    """``"mini"`` → ``make_mini()``; an existing directory → its path; a Hub id → the id; else ConfigError."""
    if source == "mini":
        return make_mini()
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(key, source, "is a file; expected a directory with one file per split")
    if source.startswith(("/", ".", "~")) or source.count("/") > 1:
        raise ConfigError(key, source, "no such directory")
    if HUB_ID.match(source):
        return source
    raise ConfigError(key, source, "unknown source; expected 'mini', an existing directory or a Hub id")


def split_files(directory: Path, name: str) -> list[Path]:
    """The files holding config ``name`` in ``directory``: the first of :data:`LAYOUTS` that matches."""
    for layout in LAYOUTS:
        files = sorted(Path(p) for p in glob.glob(str(directory / layout.format(name=glob.escape(name)))))
        if files:
            return files
    return []


def read_split(directory: Path, name: str, key: str, value) -> list[dict]:
    """Rows of config ``name`` via a ``datasets`` builder (json, parquet, text); no file → ConfigError."""
    files = split_files(directory, name)
    if not files:
        raise ConfigError(key, value, f"no file for split {name!r} in {directory} "
                                      f"(layouts: {', '.join(LAYOUTS)})")
    if all(f.stat().st_size == 0 for f in files):
        return []  # datasets refuses empty files; an empty split is the caller's to judge
    return _rows(lambda: datasets.load_dataset(BUILDERS[files[0].suffix], data_files=[str(f) for f in files],
                                               split="train"), f"split {name!r} from {files[0]}", key, value)


def read_hub_split(hub_id: str, name: str, key: str, value) -> list[dict]:
    """Rows of config ``name`` of the Hub dataset ``hub_id`` (offline: from the local cache only)."""
    return _rows(lambda: datasets.load_dataset(hub_id, name, split="train"), f"config {name!r} of {hub_id}", key,
                 value)


def _rows(load: Callable[[], datasets.Dataset], what: str, key: str, value) -> list[dict]:
    """``load()``'s rows; any failure → ConfigError (datasets raises many types: unreadable file, no network)."""
    try:
        return load().to_list()
    except Exception as err:
        raise ConfigError(key, value, f"cannot read {what}: {type(err).__name__}: "
                                      f"{' '.join(str(err).split())[:300]}") from None


def require_fields(rows: list[dict], fields: tuple[str, ...], split: str, key: str, value) -> None:
    """ConfigError naming the split and field when any row lacks (or has null) one of ``fields``."""
    for field in fields:
        missing = [i for i, row in enumerate(rows) if row.get(field) is None]
        if missing:
            raise ConfigError(key, value, f"split {split!r}: {len(missing)} rows (first: row {missing[0]}) "
                                          f"lack field {field!r}")


def materialise(prefix: str, write: Callable[[Path, int], object], inputs: list[Path], seed: int) -> Path:
    """``cache_dir()/data/<prefix>-<fingerprint of the inputs' bytes and seed>``, written atomically once."""
    digests = [hashlib.sha256(path.read_bytes()).hexdigest() for path in inputs]
    path = cache_dir() / "data" / f"{prefix}-{fingerprint({'inputs': digests, 'seed': seed})}"
    if not cached(path, "data"):
        with atomic_path(path) as tmp:
            write(tmp, seed)
            seal(tmp)
    return path
