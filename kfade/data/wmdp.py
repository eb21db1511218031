"""WMDP loader: forget / retain corpora and multiple-choice sets, from a local directory or mini-WMDP.

Real layout (one directory; the forget corpora are gated, so the Hub is not read here — download them first):

- forget corpora: ``bio_remove_dataset.jsonl``, ``cyber-forget-corpus.jsonl`` (JSON lines, ``text`` field);
- retain corpus: ``wikitext.jsonl`` (``text`` field) or ``wikitext.txt`` (one document per non-empty line);
- multiple choice: ``wmdp_bio.jsonl``, ``wmdp_cyber.jsonl``, ``mmlu*.jsonl`` with ``question`` (str),
  ``choices`` (4 str) and ``answer`` (int index) — the ``cais/wmdp`` schema lm-eval reads.

Corpora may also be ``.json``/``.parquet`` or Hub-style snapshots (see :data:`kfade.data.files.LAYOUTS`); MCQ
files must be ``<task>.jsonl`` so that lm-eval task YAMLs can point at :attr:`WmdpData.mcq_dir`.

``"mini"`` writes :mod:`kfade.data.mini_wmdp` (``forget_corpus.jsonl``, ``retain_corpus.jsonl``,
``mini_wmdp.jsonl``, ``mini_mmlu.jsonl``) into ``cache_dir()/data/mini_wmdp-<fingerprint>`` once and loads it
with the same code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kfade.data import mini_wmdp
from kfade.data.files import materialise, read_split, require_fields, resolve_source
from kfade.errors import ConfigError

MINI_CORPORA = (["forget_corpus"], ["retain_corpus"])  # (forget, retain) file stems of "mini"
WMDP_CORPORA = (["bio_remove_dataset", "cyber-forget-corpus"], ["wikitext"])  # of a real local copy
MCQ_PATTERNS = ("wmdp_*.jsonl", "mmlu*.jsonl", "mini_wmdp.jsonl", "mini_mmlu.jsonl")
N_CHOICES = 4


@dataclass
class WmdpData:
    """Corpora to erase and to keep, and the multiple-choice sets that score the result."""

    forget_corpus: list[str]  # documents to erase
    retain_corpus: list[str]  # general documents to keep
    mcq: dict[str, list[dict]]  # task -> rows {question: str, choices: list[str] (4), answer: int}
    mcq_dir: str  # directory holding <task>.jsonl for every mcq task (for lm-eval task YAMLs)
    source: str  # the resolved directory that was loaded


def mini_wmdp_dir(seed: int = 0) -> Path:
    """The materialised mini-WMDP directory (keyed by the generator's source and the seed)."""
    return materialise("mini_wmdp", mini_wmdp.write_mini_wmdp, [Path(mini_wmdp.__file__)], seed)


def _corpus(directory: Path, names: list[str], key: str) -> list[str]:
    """Non-blank ``text`` of every document of the named corpora, in order."""
    if not names:
        raise ConfigError(key, names, "needs at least one corpus name")
    texts = []
    for name in names:
        rows = read_split(directory, name, key, names)
        require_fields(rows, ("text",), name, key, names)
        texts += [row["text"] for row in rows if row["text"].strip()]
    if not texts:
        raise ConfigError(key, names, f"no non-blank documents in {directory}")
    return texts


def _check_mcq(rows: list[dict], task: str, source: str) -> None:
    """ConfigError unless every row has a str question, 4 str choices and an int answer indexing them."""
    require_fields(rows, ("question", "choices", "answer"), task, "dataset.source", source)
    for i, row in enumerate(rows):
        choices, answer = row["choices"], row["answer"]
        if not (isinstance(choices, list) and len(choices) == N_CHOICES
                and all(isinstance(c, str) for c in choices)):
            raise ConfigError("dataset.source", source,
                              f"task {task!r} row {i}: choices must be {N_CHOICES} strings, got {choices!r}")
        if not (isinstance(answer, int) and 0 <= answer < N_CHOICES):
            raise ConfigError("dataset.source", source,
                              f"task {task!r} row {i}: answer {answer!r} is not in 0..{N_CHOICES - 1}")


def _mcq(directory: Path, source: str) -> dict[str, list[dict]]:
    tasks = sorted({path.stem for pattern in MCQ_PATTERNS for path in directory.glob(pattern)})
    if not tasks:
        raise ConfigError("dataset.source", source, f"no multiple-choice files ({', '.join(MCQ_PATTERNS)})")
    mcq = {}
    for task in tasks:
        mcq[task] = read_split(directory, task, "dataset.source", source)
        _check_mcq(mcq[task], task, source)
    return mcq


def load_wmdp(source: str = "mini", forget_corpora: list[str] | None = None,
              retain_corpora: list[str] | None = None) -> WmdpData:
    """Corpora and MCQ sets; corpus names default to the mini ones for ``"mini"``, the WMDP ones otherwise."""
    resolved = resolve_source(source, mini_wmdp_dir)
    if not isinstance(resolved, Path):
        raise ConfigError("dataset.source", source, "WMDP loads from 'mini' or a local directory "
                                                    "(the forget corpora are gated: download them first)")
    default_forget, default_retain = MINI_CORPORA if source == "mini" else WMDP_CORPORA
    forget_corpora = default_forget if forget_corpora is None else list(forget_corpora)
    retain_corpora = default_retain if retain_corpora is None else list(retain_corpora)
    return WmdpData(forget_corpus=_corpus(resolved, forget_corpora, "dataset.forget_corpora"),
                    retain_corpus=_corpus(resolved, retain_corpora, "dataset.retain_corpora"),
                    mcq=_mcq(resolved, source), mcq_dir=str(resolved), source=str(resolved))
