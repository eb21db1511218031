"""Cache location, content fingerprints and atomic writes (temp file/dir + rename: a crash never leaves half a file)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
    """``$KFADE_CACHE`` if set, else ``~/.cache/kfade`` (created on demand)."""
    path = Path(os.environ.get("KFADE_CACHE") or Path.home() / ".cache" / "kfade").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def fingerprint(obj, length: int = 16) -> str:
    """Stable hex digest of a JSON-serialisable object (dict keys sorted; non-JSON values via ``str``)."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path to write a file *or* a directory into; renamed onto ``path`` on success.

    An existing ``path`` is replaced only after the new content is complete; on error the temp is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / "tmp"
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_json(path: str | os.PathLike, obj) -> None:
    """Atomically write ``obj`` as indented JSON."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
