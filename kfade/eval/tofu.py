"""TOFU evaluation: per-item metrics, registered by name, fill TOFU's per-set eval logs (see ``tofu_logs``).

A metric is a function ``EvalSet -> {log field: per-item values}``. ``prob`` writes the answer losses
(``avg_gt_loss`` …; on real authors / world facts also the perturbed losses and ``normalized_gt_loss``),
``truth_ratio`` the paraphrased and perturbed losses and R, ``rouge`` the greedy generations and their ROUGE
recalls. Losses are computed once per set and shared between metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from tqdm.auto import tqdm

from kfade.data.formatting import QAFormatter
from kfade.errors import ConfigError
from kfade.eval.generation import greedy_generate
from kfade.eval.modes import evaluating
from kfade.eval.scoring import grouped_answer_losses
from kfade.eval.tofu_logs import NORMALIZED_PROB_SETS
from kfade.eval.tofu_stats import normalized_probabilities, rouge_recalls, truth_ratios

EVAL_SETS = {  # eval set name -> TofuData attribute holding its rows
    "forget": "forget_perturbed",
    "retain": "retain_perturbed",
    "real_authors": "real_authors",
    "world_facts": "world_facts",
}


LOSS_KINDS = ("answer", "paraphrased", "perturbed")  # the answers of a row whose losses the metrics read


@dataclass
class EvalSet:
    """One TOFU eval set being scored by ``model``; each kind of answer loss is computed at most once, the kinds
    passed to ``score_together`` in one pass that runs each question's prompt once (``grouped_answer_losses``)."""

    name: str  # eval set name (a key of EVAL_SETS)
    source: str  # where the rows came from (TofuData.source), named in errors
    rows: list[dict]  # question, answer[, paraphrased_answer][, perturbed_answer (list)]
    model: torch.nn.Module
    formatter: QAFormatter
    batch_size: int  # sequences per forward pass
    max_new_tokens: int  # generation length cap, tokens
    progress: bool  # show tqdm bars
    _scored: dict = field(default_factory=dict, init=False, repr=False)  # kind -> per-row (losses, counts)

    @cached_property
    def questions(self) -> list[str]:
        return [row["question"] for row in self.rows]

    @cached_property
    def answers(self) -> list[str]:
        return [row["answer"] for row in self.rows]

    def _answers(self, kind: str) -> list[list[str]]:
        """Each row's answers of ``kind``."""
        if kind == "answer":
            return [[answer] for answer in self.answers]
        if kind == "paraphrased":
            return [[row["paraphrased_answer"]] for row in self.rows]
        if not all(row.get("perturbed_answer") for row in self.rows):
            raise ConfigError("dataset.source", self.source, f"{EVAL_SETS[self.name]} rows lack "
                              "perturbed_answer lists (needed by truth ratio and normalised probability)")
        return [list(row["perturbed_answer"]) for row in self.rows]

    def _score(self, kinds: Sequence[str]) -> dict[str, tuple[list[np.ndarray], list[np.ndarray]]]:
        """Per kind: each row's answer losses and token counts, every kind in one ``grouped_answer_losses``."""
        answers = {kind: self._answers(kind) for kind in kinds}
        groups = [[a for kind in kinds for a in answers[kind][i]] for i in range(len(self.rows))]
        losses, counts = grouped_answer_losses(self.model, self.formatter, self.questions, groups, self.batch_size,
                                               self.progress)
        scored = {kind: ([], []) for kind in kinds}
        for i, (row_losses, row_counts) in enumerate(zip(losses, counts, strict=True)):
            start = 0
            for kind in kinds:
                end = start + len(answers[kind][i])
                scored[kind][0].append(row_losses[start:end])
                scored[kind][1].append(row_counts[start:end])
                start = end
        return scored

    def score_together(self, kinds: Iterable[str]) -> None:
        """Score the answers of those ``kinds`` not scored yet (and present in the rows) in one pass."""
        kinds = set(kinds)
        todo = [kind for kind in LOSS_KINDS if kind in kinds and kind not in self._scored and self._has(kind)]
        if todo:
            self._scored |= self._score(todo)

    def _has(self, kind: str) -> bool:
        return kind != "paraphrased" or all("paraphrased_answer" in row for row in self.rows)

    def _losses(self, kind: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
        self.score_together([kind])
        return self._scored[kind]

    @cached_property
    def answer_losses(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean token NLL of each answer and its token count."""
        return tuple(np.concatenate(per_row) for per_row in self._losses("answer"))

    @cached_property
    def paraphrased_losses(self) -> tuple[np.ndarray, np.ndarray]:
        """As ``answer_losses`` for the paraphrased answers (the answers themselves where there are none)."""
        if not self._has("paraphrased"):
            return self.answer_losses
        return tuple(np.concatenate(per_row) for per_row in self._losses("paraphrased"))

    @cached_property
    def perturbed_losses(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per item: mean token NLL of each perturbed answer and their token counts."""
        return self._losses("perturbed")

    @cached_property
    def generations(self) -> list[str]:
        return greedy_generate(self.model, self.formatter, self.questions, self.max_new_tokens,
                               self.batch_size, self.progress)


def loss_kinds(set_name: str, metrics: Sequence[str]) -> frozenset[str]:
    """The answer kinds whose losses the built-in ``metrics`` read on eval set ``set_name`` (``evaluate_set`` scores
    them together)."""
    kinds = set()
    if "prob" in metrics:
        kinds |= {"answer", "perturbed"} if set_name in NORMALIZED_PROB_SETS else {"answer"}
    if "truth_ratio" in metrics:
        kinds |= {"paraphrased", "perturbed"}
    return frozenset(kinds)


Metric = Callable[[EvalSet], dict[str, list]]
METRICS: dict[str, Metric] = {}


def register_metric(name: str) -> Callable[[Metric], Metric]:
    """Decorator: register a per-item metric under ``name`` (selectable in ``eval.metrics``)."""
    def register(fn: Metric) -> Metric:
        if name in METRICS:
            raise ConfigError("eval.metrics", name, "a metric with this name is already registered")
        METRICS[name] = fn
        return fn
    return register


def _perturbed_fields(eval_set: EvalSet) -> dict[str, list]:
    losses, counts = eval_set.perturbed_losses
    return {
        "average_perturb_loss": [item.tolist() for item in losses],
        "perturb_loss": [(item * n).tolist() for item, n in zip(losses, counts, strict=True)],
        "num_token_perturb": [n.tolist() for n in counts],
    }


@register_metric("prob")
def probability_fields(eval_set: EvalSet) -> dict[str, list]:
    """Answer losses (P̄(a) = exp(−avg_gt_loss)); normalised against perturbed answers where TOFU does."""
    losses, counts = eval_set.answer_losses
    fields = {"avg_gt_loss": losses.tolist(), "gt_loss": (losses * counts).tolist(),
              "num_token_gt": counts.tolist()}
    if eval_set.name in NORMALIZED_PROB_SETS:
        fields.update(_perturbed_fields(eval_set))
        normalized = normalized_probabilities(losses, eval_set.perturbed_losses[0])
        fields["normalized_gt_loss"] = (-np.log(normalized)).tolist()
    return fields


@register_metric("truth_ratio")
def truth_ratio_fields(eval_set: EvalSet) -> dict[str, list]:
    """Paraphrased and perturbed answer losses and the per-item truth ratio R."""
    losses, counts = eval_set.paraphrased_losses
    perturbed = _perturbed_fields(eval_set)
    return {
        "avg_paraphrased_loss": losses.tolist(),
        "paraphrased_loss": (losses * counts).tolist(),
        "num_token_paraphrased": counts.tolist(),
        **perturbed,
        "truth_ratio": truth_ratios(losses, perturbed["average_perturb_loss"]).tolist(),
    }


@register_metric("rouge")
def rouge_fields(eval_set: EvalSet) -> dict[str, list]:
    """Greedy generations ([prompt, generation, answer]) and their ROUGE-1 / ROUGE-L recall."""
    generations = eval_set.generations
    recalls = rouge_recalls(generations, eval_set.answers)
    prompts = [eval_set.formatter.prompt(q) for q in eval_set.questions]
    return {
        "generated_text": [list(t) for t in zip(prompts, generations, eval_set.answers, strict=True)],
        "rouge1_recall": recalls["rouge1"],
        "rougeL_recall": recalls["rougeL"],
    }


def evaluate_tofu(model: torch.nn.Module, tokenizer, data,
                  metrics: Sequence[str] = ("prob", "truth_ratio", "rouge"), batch_size: int = 32,
                  max_new_tokens: int = 48, progress: bool = True,
                  formatter: QAFormatter | None = None) -> dict[str, dict]:
    """TOFU's four eval logs ``{set name: {field: {item index: value}}}`` of ``model`` on ``data`` (TofuData).

    Sets: forget and retain (their ``*_perturbed`` rows), real authors, world facts. ``formatter`` (default
    ``QAFormatter(tokenizer)``) prompts and truncates the scored sequences: a suite passes its own, at
    ``dataset.max_length``. The model runs in eval mode without gradients; its training flags are restored
    afterwards.
    """
    for name in metrics:
        if name not in METRICS:
            raise ConfigError("eval.metrics", name, f"unknown metric; known: {', '.join(sorted(METRICS))}")
    logs: dict[str, dict] = {}
    formatter = formatter or QAFormatter(tokenizer)
    with evaluating(model):
        for set_name, attribute in tqdm(EVAL_SETS.items(), desc="TOFU eval", disable=not progress):
            rows = list(getattr(data, attribute))
            if not rows:
                raise ConfigError("dataset.source", data.source,
                                  f"{attribute} is empty: TOFU evaluation needs all four eval sets")
            eval_set = EvalSet(set_name, data.source, rows, model, formatter, batch_size,
                               max_new_tokens, progress)
            logs[set_name] = evaluate_set(eval_set, metrics)
    return logs


def evaluate_set(eval_set: EvalSet, metrics: Sequence[str]) -> dict[str, dict]:
    """One eval set's log ``{field: {item index: value}}`` with the registered ``metrics``."""
    log: dict[str, dict] = {}
    with evaluating(eval_set.model):
        eval_set.score_together(loss_kinds(eval_set.name, metrics))
        for name in metrics:
            for field, values in METRICS[name](eval_set).items():
                log[field] = {str(i): value for i, value in enumerate(values)}
    return log
