"""Up-front checks of a run's configs against the machine and the file system, before any data or model is built.

Each config dataclass checks its own types and ranges (``validate``); what needs more than one config, the
hardware or the disk is checked here: the device, the model and retrain paths and their layout, the benchmark,
split, fitting-set and corpus names, the split files of a local data directory, and the lm-eval task names and
question files. Every failure is one ``ConfigError`` naming the key, the value and what is allowed. Nothing is
read beyond file names and sizes (and, for an lm-eval task name kfade does not define, lm-eval's task index).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kfade.data import mini_tofu
from kfade.data.config import DatasetConfig
from kfade.data.files import LAYOUTS, resolve_source, split_files
from kfade.data.general_text import CORPORA
from kfade.data.wmdp import MCQ_PATTERNS, WMDP_CORPORA, mini_wmdp_dir
from kfade.errors import ConfigError, require_one_of
from kfade.eval.audits import TOFU_ONLY
from kfade.eval.config import EvalConfig
from kfade.eval.tofu_logs import LOG_FILES, read_tofu_logs
from kfade.models.config import ModelConfig
from kfade.models.load import check_source, resolve_device
from kfade.suites import BUILDERS
from kfade.suites.models import is_log_dir
from kfade.suites.tofu import FIT_SETS


def check_run(model: ModelConfig, dataset: DatasetConfig, eval: EvalConfig) -> tuple[ModelConfig, list[str]]:
    """The model config with its device and dtype resolved for this machine, and the notices about that."""
    device, dtype, notices = resolve_device(model.device, model.dtype)
    check_model_paths(model)
    require_one_of("dataset.name", dataset.name, sorted(BUILDERS))
    if model.path is None and model.pretrain is not None and dataset.general is None:
        raise ConfigError("model.pretrain", "set", "pretraining the tiny base needs a general corpus: set "
                                                   f"dataset.general (one of {list(CORPORA)})")
    directory = local_source(dataset.source)
    if dataset.name in DATA_CHECKS:
        DATA_CHECKS[dataset.name](dataset, directory)
    check_audits(dataset, eval, directory)
    if eval.lm_eval_tasks or eval.lm_eval_data_dir:  # only then is lm-eval imported (0.5 s)
        from kfade.eval.lm_eval_adapter import check_tasks

        task_dir = eval.lm_eval_data_dir
        if task_dir is None and dataset.name == "wmdp":  # the suite scores the source's own question files
            task_dir = str(directory or mini_wmdp_dir())
        check_tasks(eval.lm_eval_tasks, task_dir)
    return dataclasses.replace(model, device=device, dtype=dtype), notices


def check_model_paths(model: ModelConfig) -> None:
    """``model.path`` and ``model.base_path``: a saved model (config.json + tokenizer) or a Hub id;
    ``model.retrain_path``: that, or a directory of readable TOFU eval logs."""
    for key in ("path", "base_path"):
        if getattr(model, key) is not None:
            check_source(getattr(model, key), f"model.{key}")
    retrain = model.retrain_path
    if retrain is None:
        return
    if is_log_dir(retrain):
        read_tofu_logs(retrain, key="model.retrain_path")  # small JSON files: a truncated one fails here
        return
    local = Path(retrain).expanduser()
    if local.is_dir() and not (local / "config.json").is_file():
        raise ConfigError("model.retrain_path", retrain, "neither a saved model (config.json) nor a TOFU eval-log "
                                                         f"directory ({LOG_FILES['forget']})")
    check_source(retrain, "model.retrain_path")


def local_source(source: str) -> Path | None:
    """The directory of a local ``dataset.source``; None for ``mini`` or a Hub id (ConfigError for anything else)."""
    if source == "mini":
        return None
    resolved = resolve_source(source, lambda: None)
    return resolved if isinstance(resolved, Path) else None


def require_split_file(directory: Path, name: str, key: str, value) -> None:
    """ConfigError unless ``directory`` holds a non-empty file for split ``name`` in one of the known layouts."""
    files = split_files(directory, name)
    if not files:
        raise ConfigError(key, value, f"no file for split {name!r} in {directory} (layouts: {', '.join(LAYOUTS)})")
    if all(f.stat().st_size == 0 for f in files):
        raise ConfigError(key, value, f"split {name!r} is an empty file: {files[0]}")


def check_tofu(dataset: DatasetConfig, directory: Path | None) -> None:
    """Forget split and fitting sets by name; every split file of a local directory present and non-empty."""
    require_one_of("dataset.forget_split", dataset.forget_split, sorted(mini_tofu.RETAIN_OF))
    for name in dataset.fit_set_names():
        require_one_of("dataset.fit_sets", name, FIT_SETS)
    if dataset.general is not None:
        require_one_of("dataset.general", dataset.general, CORPORA)
    elif "general" in dataset.fit_set_names():
        raise ConfigError("dataset.fit_sets", "general", "needs a general corpus: set dataset.general")
    if directory is None:
        return
    forget = dataset.forget_split
    for name in (forget, mini_tofu.RETAIN_OF[forget], f"{forget}_perturbed", "retain_perturbed",
                 *mini_tofu.REFERENCE_SPLITS, "full"):
        require_split_file(directory, name, "dataset.source", dataset.source)


def check_wmdp(dataset: DatasetConfig, directory: Path | None) -> None:
    """WMDP fits on the retain corpus, loads from ``mini`` or a directory holding the corpora and MCQ files."""
    if dataset.fit_set_names() != ["retain"]:
        raise ConfigError("dataset.fit_sets", dataset.fit_sets, "WMDP fits on the retain corpus: [retain]")
    if dataset.general is not None:
        raise ConfigError("dataset.general", dataset.general, "only TOFU scores a general corpus; WMDP: null")
    if directory is None:
        if dataset.source != "mini":
            raise ConfigError("dataset.source", dataset.source, "WMDP loads from 'mini' or a local directory "
                                                                "(the forget corpora are gated: download them first)")
        return
    for key, default in zip(("forget_corpora", "retain_corpora"), WMDP_CORPORA, strict=True):
        names = getattr(dataset, key)
        for name in default if names is None else names:
            require_split_file(directory, name, f"dataset.{key}", names if names is not None else default)
    if not any(directory.glob(pattern) for pattern in MCQ_PATTERNS):
        raise ConfigError("dataset.source", dataset.source, f"no multiple-choice files ({', '.join(MCQ_PATTERNS)})")


def check_audits(dataset: DatasetConfig, eval: EvalConfig, directory: Path | None) -> None:
    """Membership inference and extraction are TOFU's (QA rows; mia: the holdout split file of a local copy)."""
    for name in TOFU_ONLY:
        if name in eval.audits and dataset.name != "tofu":
            raise ConfigError("eval.audits", name, f"needs a QA benchmark with holdout authors (tofu), not "
                                                   f"{dataset.name}")
    if "mia" in eval.audits and directory is not None and dataset.forget_split in mini_tofu.HOLDOUT_OF:
        require_split_file(directory, mini_tofu.HOLDOUT_OF[dataset.forget_split], "eval.audits", "mia")


DATA_CHECKS = {"tofu": check_tofu, "wmdp": check_wmdp}  # per benchmark (dataset.name)
