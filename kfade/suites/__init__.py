"""Benchmarks end to end: the models to compare (reference, retrain baseline), their cached evaluations, and how
an unlearned model is scored against them. ``build_suite`` picks the benchmark by ``dataset.name``."""

from kfade.data.config import DatasetConfig
from kfade.errors import ConfigError
from kfade.eval.config import EvalConfig
from kfade.models.config import ModelConfig
from kfade.suites.base import Suite
from kfade.suites.tofu import build_tofu_suite
from kfade.suites.wmdp import build_wmdp_suite

BUILDERS = {"tofu": build_tofu_suite, "wmdp": build_wmdp_suite}


def build_suite(model: ModelConfig, dataset: DatasetConfig, eval: EvalConfig, noise_floor: bool = False,
                progress: bool = True, sharded: bool = False) -> tuple[Suite, dict[str, float]]:
    """The suite of ``dataset.name`` with its models loaded, and the reference/retrain baseline scores.

    Under torchrun rank 0 fills the data and model caches first; ``sharded`` (``distributed.strategy=fsdp``): the
    models are loaded FSDP-sharded and every rank scores them together, else rank 0 scores them alone and the
    others read its cached scores."""
    if dataset.name not in BUILDERS:
        raise ConfigError("dataset.name", dataset.name, f"unknown benchmark; choose one of {sorted(BUILDERS)}")
    return BUILDERS[dataset.name](model, dataset, eval, noise_floor, progress, sharded)


__all__ = ["BUILDERS", "Suite", "build_suite"]
