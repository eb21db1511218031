"""General English text that ships with Python itself, for pretraining the mini benchmarks' base model.

``python_docs``: the paragraphs of the Python reference manual's topics (``pydoc_data.topics``, the text behind
``help("if")``) and of the standard library's docstrings (parsed with ``ast`` from the stdlib sources, nothing
imported), kept when they read as prose (≥ 120 characters, ≥ 85 % letters and spaces, no ``>>>`` examples).
Licence: the Python Software Foundation License (the text is the interpreter's own documentation). About 1 M
characters on CPython 3.11; the exact text depends on the Python version, so the base model is cached per corpus
fingerprint. Paragraphs are split into train and held-out by a hash of their text (stable across runs).
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from kfade.cache import cache_dir, write_json
from kfade.errors import ConfigError

CORPORA = ("python_docs",)
HELDOUT_EVERY = 20  # one paragraph in 20 (by text hash) is held out for scoring
MIN_CHARS = 120
MIN_PROSE = 0.85  # share of letters and spaces
SKIPPED_PACKAGES = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "pydoc_data",
                    "site-packages", "dist-packages"}


@dataclass
class GeneralText:
    """A general-text corpus split into training paragraphs and held-out paragraphs (never trained on)."""

    name: str
    train: list[str]
    heldout: list[str]


def load_general_text(name: str) -> GeneralText:
    """The corpus ``name`` (see :data:`CORPORA`), split by text hash; cached per Python version."""
    if name not in CORPORA:
        raise ConfigError("dataset.general", name, f"unknown general corpus; choose one of {list(CORPORA)} or null")
    path = cache_dir() / "data" / f"{name}-py{sys.version_info.major}.{sys.version_info.minor}.json"
    if path.is_file():
        paragraphs = json.loads(path.read_text())
    else:
        paragraphs = python_docs_paragraphs()
        write_json(path, paragraphs)
    heldout = [p for p in paragraphs if _bucket(p) == 0]
    return GeneralText(name, [p for p in paragraphs if _bucket(p) != 0], heldout)


def python_docs_paragraphs() -> list[str]:
    """Sorted, de-duplicated prose paragraphs of the reference manual's topics and the stdlib docstrings."""
    from pydoc_data.topics import topics  # the reference manual's text, shipped with every CPython

    texts = list(topics.values())
    root = Path(sysconfig.get_paths()["stdlib"])
    for source in sorted(root.rglob("*.py")):
        parts = source.relative_to(root).parts
        if SKIPPED_PACKAGES.intersection(parts[:-1]) or "test" in parts[-1]:
            continue
        try:
            tree = ast.parse(source.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        texts += [doc for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                  and (doc := ast.get_docstring(node))]
    paragraphs = {" ".join(p.split()) for text in texts for p in re.split(r"\n\s*\n", text)}
    return sorted(p for p in paragraphs if _is_prose(p))


def _is_prose(paragraph: str) -> bool:
    if len(paragraph) < MIN_CHARS or ">>>" in paragraph:
        return False
    return sum(c.isalpha() or c == " " for c in paragraph) / len(paragraph) >= MIN_PROSE


def _bucket(paragraph: str) -> int:
    return int(hashlib.sha256(paragraph.encode()).hexdigest()[:8], 16) % HELDOUT_EVERY
