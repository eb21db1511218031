"""Score an in-memory causal LM on lm-eval multiple-choice tasks (WMDP, MMLU and kfade's embedded mini tasks).

The model is wrapped as it is (``HFLM(pretrained=model)``: no save/reload) and every call re-scores every
question (no request or response cache), so changed weights always give fresh numbers. lm-eval treats a model
passed in as one process's: under torchrun each rank scores every question itself, so an FSDP-sharded model runs
the same forward passes on every rank in lockstep (each all-gathering the weights block by block).

Accuracy (``acc``) is the fraction of questions whose correct choice has the largest summed log-likelihood
log p(target_delimiter + choice | prompt); ``acc_norm`` divides each sum by the choice's length in characters;
``acc_stderr`` is the standard error of the mean, sqrt(acc (1 - acc) / (n - 1)). All are fractions in [0, 1].

Task sources, later ones winning on a name clash (as in lm-eval): lm-eval's built-in tasks, kfade's own task
YAMLs in ``kfade/eval/tasks/``, then ``include_path``. With ``data_dir`` every task reads its questions from
``<data_dir>/<task>.jsonl`` (rows ``{question, choices: list[str], answer: int}``): a YAML is generated that
``include``s the task's own template (so the prompt format is lm-eval's, e.g. WMDP's lettered choices) and
points ``dataset_kwargs.data_files`` at that file. A built-in *group* (``mmlu``) scored from one local file
uses the template shared by its member tasks, without their per-subject description.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.tasks._index import Entry, Kind, TaskIndex
from lm_eval.tasks._yaml_loader import load_yaml

from kfade.cache import atomic_path
from kfade.errors import ConfigError
from kfade.eval.config import DATA_DIR_KEY, TASKS_KEY
from kfade.eval.modes import evaluating

KFADE_TASKS_DIR = Path(__file__).with_name("tasks")
REPORTED_METRICS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")


def evaluate_lm_tasks(model, tokenizer, tasks: list[str], data_dir: str | None = None, batch_size: int = 16,
                      limit: int | None = None, include_path: str | None = None) -> dict[str, float]:
    """Score ``model`` on ``tasks``: ``{"<task>/acc": ..., "<task>/acc_stderr": ..., "<task>/acc_norm": ...}``
    (``acc_norm`` where the task defines it). Unknown tasks and missing question files raise ``ConfigError``
    before anything runs. The model's train/eval mode is restored afterwards."""
    with tempfile.TemporaryDirectory(prefix="kfade-lm-eval-") as generated:
        task_manager = _task_manager(list(tasks), data_dir, include_path, Path(generated))
        with evaluating(model), _local_rank_0():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            output = simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager, limit=limit,
                                     use_cache=None, cache_requests=False, log_samples=False)
    return _flat_metrics(output["results"], tasks)


@contextlib.contextmanager
def _local_rank_0() -> Iterator[None]:
    """``LOCAL_RANK=0`` for the block. Under torchrun lm-eval returns results only where ``LOCAL_RANK`` is 0 (its
    tensor-parallel convention), but a model passed in is scored whole by every process that calls it (each rank
    alone, or under FSDP all ranks in lockstep, the same batches and forward passes), so each keeps its results."""
    saved = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["LOCAL_RANK"]
        else:
            os.environ["LOCAL_RANK"] = saved


def _flat_metrics(results: dict, tasks: list[str]) -> dict[str, float]:
    """lm-eval's ``{task: {"acc,none": x, ...}}`` → ``{"task/acc": x, ...}`` for the requested tasks."""
    flat = {}
    for name in tasks:
        scores = results[name]
        if "acc,none" not in scores:
            raise ConfigError(TASKS_KEY, name, "reports no 'acc': only multiple-choice tasks are supported")
        for metric in REPORTED_METRICS:
            value = scores.get(f"{metric},none")
            if isinstance(value, (int, float)):
                flat[f"{name}/{metric}"] = float(value)
    return flat


def check_tasks(tasks: list[str], data_dir: str | None = None, include_path: str | None = None) -> dict[str, Entry]:
    """Each task's index entry; ``ConfigError`` for an unknown name, a kfade task without ``data_dir``, or a
    missing ``data_dir`` / ``<data_dir>/<task>.jsonl``. Reads no data: runs before any model is built. lm-eval's
    built-in index (~10 s, once per process) is consulted only for names ``include_path`` and kfade's tasks lack."""
    user_index = TaskIndex.build([Path(include_path)]) if include_path else {}
    directory = None if data_dir is None else Path(data_dir).expanduser().resolve()
    if directory is not None and not directory.is_dir():
        raise ConfigError(DATA_DIR_KEY, str(directory), "not a directory")
    entries = {}
    for name in tasks:
        if directory is None and name in _kfade_index():
            raise ConfigError(DATA_DIR_KEY, None, f"task {name!r} reads <data_dir>/{name}.jsonl: set it")
        entry = user_index.get(name) or _kfade_index().get(name) or _builtin_index().get(name)
        if entry is None:
            raise _unknown(name)
        if directory is not None and not (directory / f"{name}.jsonl").is_file():
            raise ConfigError(DATA_DIR_KEY, str(directory), f"no file {name}.jsonl (task {name!r})")
        entries[name] = entry
    return entries


def _task_manager(tasks: list[str], data_dir: str | None, include_path: str | None,
                  generated: Path) -> TaskManager:
    """A TaskManager knowing every task in ``tasks`` (checked by :func:`check_tasks`), reading local files if
    ``data_dir`` is given."""
    entries = check_tasks(tasks, data_dir, include_path)
    user_paths = [Path(include_path)] if include_path else []
    if data_dir is None:
        return TaskManager(include_path=user_paths) if user_paths else _builtin_task_manager()
    user_index = TaskIndex.build(user_paths)  # wins over kfade's tasks, which win over built-in ones
    directory = Path(data_dir).expanduser().resolve()
    for name, entry in entries.items():
        _write_local_task(generated / f"{name}.yaml", name, _template(name, entry, user_index),
                          directory / f"{name}.jsonl")
    return TaskManager(include_path=[*user_paths, generated], include_defaults=False)


def _write_local_task(path: Path, name: str, template: Path, data_file: Path) -> None:
    """Write a task YAML that takes every field of ``template`` but reads its questions from ``data_file``
    (its Arrow cache next to the YAML, deleted with it: nothing stale is ever read back)."""
    dataset_kwargs = {"data_files": {"test": str(data_file)}, "cache_dir": str(path.parent / "datasets")}
    config = {"include": str(template), "task": name, "tag": [], "dataset_path": "json", "dataset_name": None,
              "dataset_kwargs": dataset_kwargs, "test_split": "test", "training_split": None,
              "validation_split": None, "fewshot_split": None}
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))


def _template(name: str, entry: Entry, user_index: dict[str, Entry]) -> Path:
    """The YAML whose fields a local copy of task ``name`` keeps: the task's own YAML, or for a group/tag the
    template its first member task includes."""
    if entry.kind is Kind.TASK:
        return entry.yaml_path
    leaf = _first_member_task(entry, {**_builtin_index(), **_kfade_index(), **user_index})
    if leaf is None:
        raise ConfigError(TASKS_KEY, name, "cannot read a local file (a Python-defined task or group)")
    included = load_yaml(leaf.yaml_path, resolve_func=False, recursive=False).get("include")
    return (leaf.yaml_path.parent / included).resolve() if isinstance(included, str) else leaf.yaml_path


def _first_member_task(entry: Entry, index: dict[str, Entry]) -> Entry | None:
    """Depth-first, the first YAML task inside a group or tag (members in listed / sorted order)."""
    if entry.kind is Kind.TASK:
        return entry
    if entry.kind is Kind.GROUP:
        members = [m for m in entry.cfg.get("task", []) if isinstance(m, str)]
    elif entry.kind is Kind.TAG:
        members = sorted(entry.tags)
    else:
        return None
    for member in members:
        leaf = _first_member_task(index[member], index) if member in index else None
        if leaf is not None:
            return leaf
    return None


def _unknown(name: str) -> ConfigError:
    return ConfigError(TASKS_KEY, name, "unknown lm-eval task (not built in, not in kfade/eval/tasks, "
                                        "not under include_path)")


@functools.cache
def _kfade_index() -> dict[str, Entry]:
    """kfade's own task YAMLs (``kfade/eval/tasks/``)."""
    return TaskIndex.build([KFADE_TASKS_DIR])


def _builtin_index() -> dict[str, Entry]:
    return _builtin_task_manager().task_index


@functools.cache
def _builtin_task_manager() -> TaskManager:
    """lm-eval's built-in tasks (indexing ~15k YAMLs takes ~10 s: done once per process; holds no results)."""
    return TaskManager()
