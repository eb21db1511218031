"""Which benchmark data a run uses and how it is batched."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DatasetConfig:
    name: str = "tofu"  # tofu | wmdp
    source: str = "mini"  # "mini" (embedded), a Hub id, or a local directory in the benchmark's layout
    forget_split: str = "forget10"  # TOFU: forget01 | forget05 | forget10 (retain = its complement)
    fit_sets: list[str] = field(default_factory=lambda: ["retain"])  # curvature fitting rows (see suites)
    general: str | None = None  # TOFU: a general-text corpus (python_docs) scored and fittable; None = none
    forget_corpora: list[str] | None = None  # WMDP: forget corpus file stems (None: the source's defaults)
    retain_corpora: list[str] | None = None  # WMDP: retain corpus file stems (None: the source's defaults)
    batch_size: int = 16  # sequences per batch for fitting, unlearning and scoring
    max_length: int = 256  # tokens per sequence (longer ones are truncated)
