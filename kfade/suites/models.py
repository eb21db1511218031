"""Reference and retrain models of a benchmark: the embedded tiny pair (trained and cached) or given checkpoints."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from kfade.errors import ConfigError
from kfade.fsdp import load_sharded
from kfade.models.config import ModelConfig
from kfade.models.load import load_model
from kfade.models.mini import mini_tokenizer, trained_tiny_model


@dataclasses.dataclass
class TrainingSets:
    """What the tiny pair learns: the reference model everything, the retrain baseline the retain part only."""

    tag: str  # cache name prefix, e.g. "mini_tofu-forget10"
    tokenizer_texts: list[str]  # every text of the benchmark (the tokenizer sees the forget set too)
    reference_qa: list[dict]
    retrain_qa: list[dict]
    reference_texts: list[str] = dataclasses.field(default_factory=list)
    retrain_texts: list[str] = dataclasses.field(default_factory=list)
    pretrain_texts: list[str] = dataclasses.field(default_factory=list)  # the base model's general text


def tiny_model_dirs(sets: TrainingSets, cfg: ModelConfig, retrain_seeds: Sequence[int],
                    progress: bool = True) -> tuple[Path, list[Path], Path | None]:
    """Train (or reuse from the cache) the tiny reference model and one retrain model per seed; also returns the
    pretrained base they were finetuned from (None from scratch).

    With ``cfg.pretrain`` both are finetuned (``cfg.recipe``) from one base model pretrained on
    ``sets.pretrain_texts`` (TOFU's regime: a pretrained LM finetuned on the authors, rehearsing ``cfg.recipe.replay``
    of those texts per epoch); else trained from scratch.
    """
    pretrain_texts = sets.pretrain_texts if cfg.pretrain is not None else []
    tokenizer_dir = mini_tokenizer(sets.tokenizer_texts + pretrain_texts, cfg.vocab_size)
    base = None
    if cfg.pretrain is not None:
        if not pretrain_texts:
            raise ConfigError("model.pretrain", "set", "pretraining needs a general corpus: set dataset.general")
        base = trained_tiny_model(f"{sets.tag}-base", tokenizer_dir, [], pretrain_texts, cfg.spec, cfg.pretrain,
                                  progress)
    reference = trained_tiny_model(f"{sets.tag}-reference", tokenizer_dir, sets.reference_qa, sets.reference_texts,
                                   cfg.spec, cfg.recipe, progress, init_from=base, replay=pretrain_texts)
    retrains = [trained_tiny_model(f"{sets.tag}-retrain", tokenizer_dir, sets.retrain_qa, sets.retrain_texts,
                                   cfg.spec, dataclasses.replace(cfg.recipe, seed=seed), progress, init_from=base,
                                   replay=pretrain_texts)
                for seed in retrain_seeds]
    return reference, retrains, base


class ModelPaths(NamedTuple):
    reference: str
    retrains: list[str]  # retrain models loaded as models (not a TOFU eval-log directory)
    base: str | None  # a model that never learnt the forget set (``model.base_path``, the tiny pretrained base)


def model_paths(cfg: ModelConfig, sets: TrainingSets, noise_floor: bool, progress: bool = True) -> ModelPaths:
    """With ``cfg.path`` unset the tiny pair's cached directories (trained first if needed); else the given
    checkpoints (a TOFU eval-log ``retrain_path`` is handled by the suite)."""
    if cfg.path is None:
        seeds = [cfg.recipe.seed, cfg.recipe.seed + 1] if noise_floor else [cfg.recipe.seed]
        reference_dir, retrain_dirs, base = tiny_model_dirs(sets, cfg, seeds, progress)
        return ModelPaths(str(reference_dir), [str(d) for d in retrain_dirs],
                          cfg.base_path or (str(base) if base is not None else None))
    retrains = [cfg.retrain_path] if cfg.retrain_path and not is_log_dir(cfg.retrain_path) else []
    return ModelPaths(cfg.path, retrains, cfg.base_path)


def model_loader(cfg: ModelConfig, sharded: bool = False) -> Callable:
    """``load(path, key) -> (model, tokenizer)`` at the configured dtype and device; ``sharded``: FSDP-sharded
    (``kfade.fsdp.load_sharded``, every rank together)."""
    load = load_sharded if sharded else functools.partial(load_model, device_map=cfg.device_map)
    return lambda path, key: load(path, cfg.dtype, cfg.device, key=key,
                                  gradient_checkpointing=cfg.gradient_checkpointing)


def base_loader(cfg: ModelConfig, paths: ModelPaths, sharded: bool = False) -> Callable | None:
    """``() -> base model``, loading ``paths.base`` when called (None: no base known)."""
    if paths.base is None:
        return None
    return lambda: model_loader(cfg, sharded)(paths.base, "model.base_path")[0]


def load_models(cfg: ModelConfig, paths: ModelPaths, sharded: bool = False):
    """``(reference, tokenizer, retrain models)`` read from their paths (``model_loader``)."""
    load = model_loader(cfg, sharded)
    reference, tokenizer = load(paths.reference, "model.path")
    return reference, tokenizer, [load(p, "model.retrain_path")[0] for p in paths.retrains]


def is_log_dir(path: str) -> bool:
    """True for a directory of TOFU eval logs (it has ``eval_log_forget.json``) rather than a model."""
    return (Path(path).expanduser() / "eval_log_forget.json").is_file()
