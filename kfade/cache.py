"""Cache location, content fingerprints, atomic writes (temp file/dir + rename: a crash never leaves half a file) and
checksummed cache directories (a truncated or tampered entry is rebuilt with a warning, never used)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

CHECKSUMS_FILE = "checksums.json"


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


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def seal(directory: str | os.PathLike) -> None:
    """Write ``checksums.json`` into ``directory``: the SHA-256 of every file under it (call on the temp dir of
    :func:`atomic_path`, after everything else is written)."""
    directory = Path(directory)
    sums = {str(p.relative_to(directory)): file_sha256(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != CHECKSUMS_FILE}
    write_json(directory / CHECKSUMS_FILE, sums)


def damage(directory: str | os.PathLike) -> str | None:
    """None when every file listed in ``directory``'s ``checksums.json`` is there with its checksum; else what
    is wrong (a directory without the file is not trusted)."""
    directory = Path(directory)
    try:
        sums = json.loads((directory / CHECKSUMS_FILE).read_text())
    except (OSError, ValueError) as e:
        return f"no readable {CHECKSUMS_FILE} ({type(e).__name__})"
    for name, expected in sums.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != expected:
            return f"{name} does not match its checksum (truncated or modified)"
    return None


def cached(directory: str | os.PathLike, what: str) -> bool:
    """True when the sealed cache entry ``directory`` exists and is intact; False (with a warning if it exists but
    is damaged) when it must be rebuilt — the rebuild replaces it atomically."""
    if not Path(directory).exists():
        return False
    problem = damage(directory)
    if problem is not None:
        warnings.warn(f"cached {what} {directory}: {problem}; rebuilding it", stacklevel=3)
    return problem is None
