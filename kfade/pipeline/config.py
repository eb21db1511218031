"""A run's configs, typed and validated once, at the boundary: ``load_config`` turns the composed groups (a Hydra
``DictConfig`` or a plain mapping) into a :class:`RunConfig` before any data is built or model loaded.

Each group is merged into its dataclass, so a misspelt key or a wrong type becomes one line
(``dataset.batch_size='x': Value 'x' of type 'str' could not be converted to Integer``), not a deep traceback;
each dataclass checks its own ranges when it is constructed (``__post_init__``), then every float must be finite;
what needs the machine or the disk is checked by ``kfade.preflight``. The first problem raises ConfigError.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kfade.curvature import CurvatureConfig
from kfade.data.config import DatasetConfig
from kfade.distributed import DistributedConfig
from kfade.errors import ConfigError, require_range
from kfade.eval.config import EvalConfig
from kfade.models.config import NO_BASE_MODEL, ModelConfig
from kfade.plan import MemoryConfig
from kfade.preflight import check_run
from kfade.progress import shown
from kfade.report.objective import ObjectiveConfig
from kfade.tracking import LoggerConfig
from kfade.unlearn import method_classes

NO_METHOD = "none"  # method=none: only the reference and retrain models are built and scored


@dataclass
class ReapplyConfig:
    """``reapply``: after unlearning, finetune the reference further on retain data, then re-add the delta."""

    epochs: int = 0  # 0 = skip; > 0 = finetuning epochs
    lr: float = 1e-3  # AdamW learning rate of that finetuning
    seed: int = 1  # its data order

    def __post_init__(self):
        require_range("reapply.epochs", self.epochs, 0)
        require_range("reapply.lr", self.lr, 0, open_low=True)


@dataclass
class RunOptions:
    """The top-level keys of ``conf/config.yaml`` besides the config groups."""

    seed: int = 0
    noise_floor: bool = False
    progress: bool = True  # resolved by load_config: bars only where a person watches them (stderr a terminal)
    dry_run: bool = False
    reapply: ReapplyConfig = field(default_factory=ReapplyConfig)


@dataclass
class RunConfig:
    """Everything a run needs, typed and checked (:func:`load_config`)."""

    model: ModelConfig  # device and dtype resolved for this machine (as given for a dry run)
    model_given: ModelConfig  # as configured (``device=auto`` …): what the memory plan is made for
    dataset: DatasetConfig
    eval: EvalConfig
    logger: LoggerConfig
    options: RunOptions
    method_name: str  # a ``kfade.unlearn.METHODS`` key, or ``none``
    method: object | None  # the method's config dataclass; None for method=none
    curvature: CurvatureConfig  # ``curvature/`` + ``damping/`` (used by the methods that fit a curvature)
    memory: MemoryConfig
    objective: ObjectiveConfig
    distributed: DistributedConfig  # torchrun: replicate or fsdp (checked against the launch before any work)
    notices: list[str] = field(default_factory=list)  # what was resolved differently from what was asked

    @property
    def uses_curvature(self) -> bool:
        """Whether the method fits a curvature (and so reads ``curvature``)."""
        return self.method is not None and method_classes(self.method_name)[1].uses_curvature


def load_config(cfg: Mapping) -> RunConfig:
    """Every group of ``cfg`` typed and validated, then checked against the machine and the disk
    (``kfade.preflight``; skipped for a dry run, whose plan reads the model's config only)."""
    top = [f.name for f in dataclasses.fields(RunOptions)]
    options = typed(OmegaConf.masked_copy(cfg, top) if isinstance(cfg, DictConfig) else
                    {k: cfg[k] for k in top if k in cfg}, RunOptions, "")
    options.progress = shown(options.progress)  # bars only where a person watches them
    model = typed(cfg["model"], ModelConfig, "model")
    dataset = typed(cfg["dataset"], DatasetConfig, "dataset")
    eval_cfg = typed(cfg["eval"], EvalConfig, "eval")
    logger = typed(cfg["logger"], LoggerConfig, "logger")
    name = cfg["method"]["name"]
    method = None if name == NO_METHOD else typed(cfg["method"], method_classes(name)[0], "method")
    curvature = typed(cfg["curvature"], CurvatureConfig, "curvature")  # damping/ lands in curvature too
    memory = typed(cfg.get("memory", {}), MemoryConfig, "memory")
    objective = typed(cfg.get("objective", {}), ObjectiveConfig, "objective")
    sharing = typed(cfg.get("distributed", {}), DistributedConfig, "distributed")
    config = RunConfig(model, model, dataset, eval_cfg, logger, options, name, method, curvature, memory, objective,
                       sharing)
    if method is not None and method.uses_forget_targets() and not model.knows_base:
        raise ConfigError("model.base_path", None, NO_BASE_MODEL)
    if method is not None:  # what the memory plan could not count fails here, before any work
        method.plan_fields(dataset.fit_max_batches)
    if sharing.strategy == "fsdp":
        check_sharded(config)
    if not options.dry_run:
        sharing.check_launch()  # torchrun as configured
        config.model, config.notices = check_run(model, dataset, eval_cfg)  # devices, paths, names, lm-eval tasks
    return config


def check_sharded(config: RunConfig) -> None:
    """ConfigError for what ``distributed.strategy=fsdp`` cannot run: the models are FSDP-sharded and scored on
    every rank together, so nothing may finetune a whole copy (the relearning attacks, ``reapply``) or place the
    weights itself (``model.device_map``)."""
    relearn = [a for a in config.eval.audits if a.startswith("relearn")]
    if relearn:
        raise ConfigError("eval.audits", relearn, "the relearning attacks finetune a whole copy: not under "
                          "distributed.strategy=fsdp (quantize, mia and extraction run sharded)")
    if config.options.reapply.epochs > 0:
        raise ConfigError("reapply.epochs", config.options.reapply.epochs, "finetunes a whole copy of the "
                          "reference: not under distributed.strategy=fsdp")
    if config.model.device_map is not None:
        raise ConfigError("model.device_map", config.model.device_map, "FSDP places the shards: leave it null "
                          "under distributed.strategy=fsdp")


def typed(node, schema: type, key: str):
    """``node`` (a DictConfig or a mapping) merged onto ``schema``'s defaults and converted to a dataclass instance,
    which validates itself; errors → one line (``key`` "" for top-level keys)."""
    try:
        values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except OmegaConfBaseException as e:
        where = ".".join(k for k in (key, getattr(e, "full_key", None)) if k) or key
        raise ConfigError(where, getattr(e, "value", None), str(e).splitlines()[0]) from None
    require_finite(obj, key)
    return obj


def require_finite(obj, key: str) -> None:
    """ConfigError for the first NaN or ±inf float in a dataclass instance (nested dataclasses too)."""
    for f in dataclasses.fields(obj):
        value, where = getattr(obj, f.name), f"{key}.{f.name}" if key else f.name
        if dataclasses.is_dataclass(value):
            require_finite(value, where)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(where, value, "must be a finite number")
