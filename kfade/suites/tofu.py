"""TOFU end to end: the reference and retrain models, their cached evaluations, and scoring any model.

Scores are flat keys (``forget_quality``, ``model_utility``, ``<set>/prob`` …, see ``kfade.eval.tofu_logs``) plus
the output-space distances ``kl_retrain/retain`` and ``kl_retrain/forget`` (mean per-token KL(p_retrain ‖ p_model)
in nats over the answer tokens of the retain eval set and of the forget set) and ``kl_reference/retain``
(KL(p_reference ‖ p_model) on the retain eval set: how much unlearning changed the retain outputs). With a general
corpus (``dataset.general``) its held-out paragraphs add ``kl_reference/general`` (the same KL over all their
tokens) and ``general/ppl`` (perplexity).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kfade import distributed
from kfade.data.config import DatasetConfig
from kfade.data.formatting import evenly_spaced, qa_batches, text_batches
from kfade.data.general_text import GeneralText, load_general_text
from kfade.data.tofu import TofuData, load_tofu, load_tofu_holdout
from kfade.errors import ConfigError
from kfade.eval import aggregate_tofu_logs, evaluate_tofu, mean_token_kl, perplexity, read_tofu_logs, write_tofu_logs
from kfade.eval.config import EvalConfig
from kfade.eval.relearn import attack_split
from kfade.eval.tofu import EvalSet, evaluate_set
from kfade.eval.tofu_logs import item_subset
from kfade.models.config import ModelConfig
from kfade.suites.base import Suite
from kfade.suites.models import TrainingSets, base_loader, is_log_dir, load_models, model_paths
from kfade.unlearn import UnlearnData

FIT_SETS = ("retain", "real_authors", "world_facts", "general")  # what a curvature may be fitted on (never forget)


def training_sets(data: TofuData, general: GeneralText | None = None) -> TrainingSets:
    """Both models learn real authors and world facts; the reference all authors, the retrain model the retain
    split only (as TOFU's retain models are finetuned on ``retainYY``). A general corpus is what a pretrained base
    model learns first (when the model config asks for one)."""
    facts = data.real_authors + data.world_facts
    texts = []
    for row in data.full + data.forget_perturbed + data.retain_perturbed + facts:
        texts += [row["question"], row["answer"], row.get("paraphrased_answer") or "", *row.get("perturbed_answer", [])]
    return TrainingSets(tag="mini_tofu", tokenizer_texts=texts, reference_qa=data.full + facts,
                        retrain_qa=data.retain + facts, pretrain_texts=general.train if general else [])


@dataclass(kw_only=True)
class TofuSuite(Suite):
    data: TofuData
    retrain_logs: dict | None = None  # the baseline's TOFU eval logs (forget quality needs its truth ratios)
    general: GeneralText | None = None  # dataset.general: held-out paragraphs are scored, training ones fittable
    holdout: list[dict] | None = None  # never-seen authors (membership inference), loaded on first use

    name = "tofu"

    def batches(self, rows: list[dict]) -> list[dict]:
        return qa_batches(rows, self.formatter, self.dataset.batch_size)

    def retain_features(self) -> list[dict]:
        return [self.formatter.encode(r["question"], r["answer"]) for r in self.data.retain]

    def text_batches(self, texts: list[str]) -> list[dict]:
        return text_batches(texts, self.formatter, self.dataset.batch_size)

    def unlearn_data(self) -> UnlearnData:
        """Forget/retain batches and the curvature fitting set ``dataset.fit_set_names()``: QA rows concatenated,
        then the first ``dataset.general_fit_rows`` training paragraphs of the general corpus for ``general``; at most
        ``dataset.fit_max_batches`` of those batches, evenly spaced (so every set keeps its share)."""
        fit_rows, fit_texts = [], []
        for name in self.dataset.fit_set_names():
            if name not in FIT_SETS:
                raise ConfigError("dataset.fit_sets", name, f"unknown set; choose from {list(FIT_SETS)}")
            if name != "general":
                fit_rows += getattr(self.data, name)
            elif self.general is None:
                raise ConfigError("dataset.fit_sets", name, "needs a general corpus: set dataset.general")
            else:
                fit_texts = self.general.train[:self.dataset.general_fit_rows]
        fit = evenly_spaced(self.batches(fit_rows) + self.text_batches(fit_texts), self.dataset.fit_max_batches)
        return UnlearnData(forget=self.batches(self.data.forget), retain=self.batches(self.data.retain), fit=fit,
                           kl_probe=self.batches(self.data.retain_perturbed), forget_split=self.dataset.forget_split)

    def score(self, model: torch.nn.Module) -> tuple[dict[str, float], dict[str, dict]]:
        """Flat TOFU metrics of ``model`` (against the retrain baseline) and its four TOFU eval logs."""
        e = self.eval
        logs = evaluate_tofu(model, self.tokenizer, self.data, e.metrics, e.batch_size, e.max_new_tokens, self.progress,
                             self.formatter)
        metrics = aggregate_tofu_logs(logs, self.retrain_logs)
        metrics |= self.divergences(model, self.batches(self.data.retain_perturbed), self.batches(self.data.forget))
        if self.general is not None:
            heldout = self.text_batches(self.general.heldout)
            metrics |= {"kl_reference/general": mean_token_kl(self.reference, model, heldout),
                        "general/ppl": perplexity(model, heldout)}
        return metrics, logs

    def forget_key(self) -> str:
        return "forget/prob"

    def relearn_split(self, seed: int) -> tuple[list[dict], list[int]]:
        """Features of the forget QA outside the held-out half, and the held-out half's indices into the forget
        eval rows (``forgetXX_perturbed``)."""
        attack, heldout = attack_split(len(self.data.forget_perturbed), seed)
        held_questions = {self.data.forget_perturbed[i]["question"] for i in heldout}
        rows = [r for r in self.data.forget if r["question"] not in held_questions]
        return [self.formatter.encode(r["question"], r["answer"]) for r in rows], heldout

    def heldout_score(self, model: torch.nn.Module, target: list[int]) -> dict[str, float]:
        """``forget/prob``, ``forget/truth_ratio`` and ``forget_quality`` (KS test against the retrain model's truth
        ratios on the same items) of the forget eval rows ``target``."""
        e = self.eval
        rows = [self.data.forget_perturbed[i] for i in target]
        log = evaluate_set(EvalSet("forget", self.data.source, rows, model, self.formatter, e.batch_size,
                                   e.max_new_tokens, self.progress), ["prob", "truth_ratio"])
        retrain = None if self.retrain_logs is None else {"forget": item_subset(self.retrain_logs["forget"], target)}
        return aggregate_tofu_logs({"forget": log}, retrain)

    def forget_rows(self) -> list[dict]:
        return self.data.forget

    def holdout_rows(self) -> list[dict]:
        if self.holdout is None:
            self.holdout = load_tofu_holdout(self.dataset.source, self.dataset.forget_split)
        return self.holdout

    def headline_keys(self) -> list[str]:
        general = ["kl_reference/general", "general/ppl"] if self.general is not None else []
        return ["forget_quality", "model_utility", "forget/prob", "retain/prob", "world_facts/prob",
                *super().headline_keys(), *general]

    def save_record(self, logs: dict[str, dict], directory: Path) -> None:
        write_tofu_logs(logs, directory / "tofu_logs")

    def adopt_retrain(self, logs: dict[str, dict]) -> dict[str, float]:
        if self.retrain_logs is not None:  # given as published logs: they stay the reference
            return {}
        self.retrain_logs = logs
        return aggregate_tofu_logs(logs, logs)  # the baseline against itself: forget quality 1

    def save_state(self, directory: Path) -> None:
        if self.retrain_logs is not None:
            write_tofu_logs(self.retrain_logs, directory / "retrain_logs")

    def load_state(self, directory: Path) -> None:
        if self.retrain_logs is None and (directory / "retrain_logs").is_dir():
            self.retrain_logs = read_tofu_logs(directory / "retrain_logs")

    def cache_key(self) -> dict:
        key = {**super().cache_key(), "source": self.data.source, "given_logs": self.retrain_logs is not None}
        return key | ({"general_heldout": self.general.heldout} if self.general is not None else {})


def build_tofu_suite(model_cfg: ModelConfig, dataset_cfg: DatasetConfig, eval_cfg: EvalConfig,
                     noise_floor: bool = False, progress: bool = True,
                     sharded: bool = False) -> tuple[TofuSuite, dict[str, float]]:
    """Load the data and both models (training the tiny pair if needed; ``sharded``: FSDP); return the suite and
    baseline scores."""
    with distributed.main_first():  # under torchrun rank 0 fills the data and model caches first
        data = load_tofu(dataset_cfg.source, dataset_cfg.forget_split)
        general = load_general_text(dataset_cfg.general) if dataset_cfg.general else None
        paths = model_paths(model_cfg, training_sets(data, general), noise_floor, progress)
    reference, tokenizer, retrains = load_models(model_cfg, paths, sharded)
    retrain_logs = None
    if model_cfg.retrain_path and is_log_dir(model_cfg.retrain_path):
        retrain_logs = read_tofu_logs(model_cfg.retrain_path, key="model.retrain_path")
    suite = TofuSuite(tokenizer=tokenizer, reference=reference, retrains=retrains,
                      load_base=base_loader(model_cfg, paths, sharded), dataset=dataset_cfg, eval=eval_cfg,
                      progress=progress, data=data, retrain_logs=retrain_logs, general=general)
    return suite, suite.baseline_scores(paths.reference, paths.retrains)
