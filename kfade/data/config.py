"""Which benchmark data a run uses and how it is batched."""

from __future__ import annotations

from dataclasses import dataclass

from kfade.errors import ConfigError, require_range


@dataclass
class DatasetConfig:
    name: str = "tofu"  # tofu | wmdp
    source: str = "mini"  # "mini" (embedded), a Hub id, or a local directory in the benchmark's layout
    forget_split: str = "forget10"  # TOFU: forget01 | forget05 | forget10 (retain = its complement)
    fit_sets: list[str] | None = None  # curvature fitting sets; None: all the benchmark keeps (fit_set_names)
    fit_max_batches: int | None = None  # a budget: fitting batches kept, evenly spaced over the sets (None: all)
    general: str | None = None  # TOFU: a general-text corpus (python_docs) scored and fittable; None = none
    general_fit_rows: int = 256  # TOFU: training paragraphs of the general corpus in the "general" fitting set
    forget_corpora: list[str] | None = None  # WMDP: forget corpus file stems (None: the source's defaults)
    retain_corpora: list[str] | None = None  # WMDP: retain corpus file stems (None: the source's defaults)
    batch_size: int = 16  # sequences per batch for fitting, unlearning and scoring
    max_length: int = 256  # tokens per sequence (longer ones are truncated)

    def fit_set_names(self) -> list[str]:
        """The curvature fitting sets: ``fit_sets`` if given, else everything the benchmark says the model keeps —
        TOFU: the retain split, real authors and world facts, and the general corpus when there is one; WMDP: the
        retain corpus (general text: wikitext, the mini corpus)."""
        if self.fit_sets is not None:
            return list(self.fit_sets)
        if self.name == "tofu":
            return ["retain", "real_authors", "world_facts"] + (["general"] if self.general else [])
        return ["retain"]

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Types and ranges (names against what exists: ``kfade.preflight``); ConfigError names the field."""
        require_range("dataset.batch_size", self.batch_size, 1)
        require_range("dataset.max_length", self.max_length, 2)  # a prompt token and a predicted token at least
        for key in ("name", "source", "forget_split"):
            if not str(getattr(self, key)).strip():
                raise ConfigError(f"dataset.{key}", getattr(self, key), "must not be empty")
        if self.fit_sets is not None and not self.fit_sets:
            raise ConfigError("dataset.fit_sets", self.fit_sets, "needs at least one set, or null (the default)")
        require_range("dataset.general_fit_rows", self.general_fit_rows, 1)
        if self.fit_max_batches is not None:
            require_range("dataset.fit_max_batches", self.fit_max_batches, 1)
        for key in ("forget_corpora", "retain_corpora"):
            if getattr(self, key) is not None and not getattr(self, key):
                raise ConfigError(f"dataset.{key}", getattr(self, key), "needs at least one corpus name, or null")
