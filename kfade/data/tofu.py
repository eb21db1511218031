"""TOFU loader: the Hub dataset, a local copy in any of its published file layouts, or the embedded mini-TOFU.

``source`` is one of

- ``"mini"``: the embedded benchmark (:mod:`kfade.data.mini_tofu`), written once into
  ``cache_dir()/data/mini_tofu-<fingerprint>`` (fingerprint of the generator and the reference files), then
  read by the same local-directory code path as any other copy;
- a local directory holding one file per config name (``forget10``, ``retain90``, ``forget10_perturbed``,
  ``retain_perturbed``, ``real_authors_perturbed``, ``world_facts_perturbed``, ``full``; ``holdout10`` … for
  membership inference only) in one of the layouts
  of :data:`kfade.data.files.LAYOUTS` — TOFU's own JSON-lines files, plain parquet, a ``push_to_hub`` snapshot
  (``<name>/train-00000-of-00001.parquet`` or ``data/<name>-00000-of-00001.parquet``) or the Hub's parquet
  conversion (``<name>/train/0000.parquet``);
- a Hub id ``owner/name`` (e.g. :data:`TOFU_HUB_ID`): ``datasets.load_dataset(hub_id, name, split="train")``.

Local files are found and read by :mod:`kfade.data.files` (shared with :mod:`kfade.data.wmdp`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kfade.data import mini_tofu
from kfade.data.files import materialise, read_hub_split, read_split, require_fields, resolve_source
from kfade.errors import ConfigError

TOFU_HUB_ID = "locuslab/TOFU"
QA_FIELDS = ("question", "answer")
REFERENCE_FIELDS = ("question", "answer", "perturbed_answer")
PERTURBED_FIELDS = ("question", "answer", "paraphrased_answer", "perturbed_answer")
REFERENCE_SPLITS = mini_tofu.REFERENCE_SPLITS
RETAIN_OF = mini_tofu.RETAIN_OF  # forget split -> its complement
HOLDOUT_OF = mini_tofu.HOLDOUT_OF  # forget split -> the same number of authors no model saw (TOFU's holdoutXX)


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
        rows = read_hub_split(resolved, name, key, value)
    require_fields(rows, _fields(name), name, key, value)
    return rows


def load_tofu_split(source: str, name: str) -> list[dict]:
    """One TOFU config (e.g. ``"forget10_perturbed"``) from ``source``, its required fields checked."""
    return _load(resolve_source(source, mini_tofu_dir), name, "dataset.source", source)


def load_tofu_holdout(source: str, forget_split: str) -> list[dict]:
    """The never-seen authors matching ``forget_split`` (``holdout10`` for ``forget10`` …): question, answer."""
    if forget_split not in HOLDOUT_OF:
        raise ConfigError("dataset.forget_split", forget_split, f"unknown split; expected one of {sorted(HOLDOUT_OF)}")
    return _load(resolve_source(source, mini_tofu_dir), HOLDOUT_OF[forget_split], "dataset.source", source)


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
