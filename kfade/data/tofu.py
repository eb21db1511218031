"""TOFU loader: the Hub dataset, a local copy in any of its published file layouts, or the embedded mini-TOFU.

``source`` is one of

- ``"mini"``: the embedded benchmark (:mod:`kfade.data.mini_tofu`), written once into
  ``cache_dir()/data/mini_tofu-<fingerprint>`` (fingerprint of the generator and the reference files), then
  read by the same local-directory code path as any other copy;
- a local directory holding one file per config name (``forget10``, ``retain90``, ``forget10_perturbed``,
  ``retain_perturbed``, ``real_authors_perturbed``, ``world_facts_perturbed``, ``full``) in one of the layouts
  of :data:`LAYOUTS` — TOFU's own JSON-lines files, plain parquet, a ``push_to_hub`` snapshot
  (``<name>/train-00000-of-00001.parquet`` or ``data/<name>-00000-of-00001.parquet``) or the Hub's parquet
  conversion (``<name>/train/0000.parquet``);
- a Hub id ``owner/name`` (e.g. :data:`TOFU_HUB_ID`): ``datasets.load_dataset(hub_id, name, split="train")``.

The local helpers here (:func:`resolve_source`, :func:`read_split`, :func:`require_fields`,
:func:`materialise`) are shared with :mod:`kfade.data.wmdp`.
"""

from __future__ import annotations

import glob
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets

from kfade.cache import atomic_path, cache_dir, fingerprint
from kfade.data import mini_tofu
from kfade.errors import ConfigError

TOFU_HUB_ID = "locuslab/TOFU"
LAYOUTS = ("{name}.json", "{name}.jsonl", "{name}.parquet", "{name}.txt", "{name}/train-*.parquet",
           "{name}/train/*.parquet", "data/{name}-*.parquet")
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}  # suffix -> builder
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
QA_FIELDS = ("question", "answer")
REFERENCE_FIELDS = ("question", "answer", "perturbed_answer")
PERTURBED_FIELDS = ("question", "answer", "paraphrased_answer", "perturbed_answer")
REFERENCE_SPLITS = mini_tofu.REFERENCE_SPLITS
RETAIN_OF = mini_tofu.RETAIN_OF  # forget split -> its complement


@dataclass
class TofuData:
    """The TOFU splits one unlearning run needs (rows are dicts with the fields listed)."""

    forget: list[dict]  # forgetXX: question, answer
    retain: list[dict]  # retainYY, the complement of forgetXX: question, answer
    forget_perturbed: list[dict]  # forgetXX_perturbed: + paraphrased_answer, perturbed_answer (list[str])
    retain_perturbed: list[dict]  # evaluation subset of retain, same fields as forget_perturbed
    real_authors: list[dict]  # real_authors_perturbed: question, answer, perturbed_answer (list[str])
    world_facts: list[dict]  # world_facts_perturbed: same fields
    source: str  # what was loaded: resolved directory or Hub id (for fingerprints and logs)
    full: list[dict]  # "full": every author's QA, what the reference model is trained on


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
    try:
        dataset = datasets.load_dataset(BUILDERS[files[0].suffix], data_files=[str(f) for f in files],
                                        split="train")
    except Exception as err:  # datasets raises many types for unreadable files: report them all alike
        raise ConfigError(key, value, f"cannot read split {name!r} from {files[0]}: "
                                    f"{type(err).__name__}: {' '.join(str(err).split())}") from err
    return dataset.to_list()


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
    if not path.is_dir():
        with atomic_path(path) as tmp:
            write(tmp, seed)
    return path


def mini_tofu_dir(seed: int = 0) -> Path:
    """The materialised mini-TOFU directory (keyed by generator source, reference rows and seed)."""
    inputs = [Path(mini_tofu.__file__)] + [mini_tofu.REFERENCE_DIR / f"{n}.json" for n in REFERENCE_SPLITS]
    return materialise("mini_tofu", mini_tofu.write_mini_tofu, inputs, seed)


def _fields(name: str) -> tuple[str, ...]:
    if name in REFERENCE_SPLITS:
        return REFERENCE_FIELDS
    return PERTURBED_FIELDS if name.endswith("_perturbed") else QA_FIELDS


def _load(resolved: Path | str, name: str, key: str, value) -> list[dict]:
    if isinstance(resolved, Path):
        rows = read_split(resolved, name, key, value)
    else:
        rows = datasets.load_dataset(resolved, name, split="train").to_list()
    require_fields(rows, _fields(name), name, key, value)
    return rows


def load_tofu_split(source: str, name: str) -> list[dict]:
    """One TOFU config (e.g. ``"forget10_perturbed"``) from ``source``, its required fields checked."""
    return _load(resolve_source(source, mini_tofu_dir), name, "dataset.source", source)


def load_tofu(source: str = "mini", forget_split: str = "forget10") -> TofuData:
    """Forget split, its retain complement, their perturbed eval sets, real authors, world facts and full."""
    if forget_split not in RETAIN_OF:
        raise ConfigError("dataset.forget_split", forget_split,
                          f"unknown split; expected one of {sorted(RETAIN_OF)}")
    resolved = resolve_source(source, mini_tofu_dir)
    retain_split = RETAIN_OF[forget_split]
    forget, retain, forget_perturbed = (_load(resolved, name, "dataset.forget_split", forget_split)
                                        for name in (forget_split, retain_split, f"{forget_split}_perturbed"))
    if not forget:
        raise ConfigError("dataset.forget_split", forget_split, f"split is empty in {resolved}")
    retain_questions = {row["question"] for row in retain}
    shared = [row["question"] for row in forget if row["question"] in retain_questions]
    if shared:
        raise ConfigError("dataset.forget_split", forget_split,
                          f"{len(shared)} questions are in both {forget_split} and {retain_split}, "
                          f"e.g. {shared[0]!r}")
    retain_perturbed, real_authors, world_facts, full = (
        _load(resolved, name, "dataset.source", source)
        for name in ("retain_perturbed", *REFERENCE_SPLITS, "full"))
    return TofuData(forget=forget, retain=retain, forget_perturbed=forget_perturbed,
                    retain_perturbed=retain_perturbed, real_authors=real_authors, world_facts=world_facts,
                    source=str(resolved), full=full)
