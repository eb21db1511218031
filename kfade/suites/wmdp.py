"""WMDP end to end: forget/retain corpora, multiple-choice scoring with lm-eval, and KL to the retrain model.

Scores: ``<task>/acc`` (and ``acc_norm``) for every lm-eval task of the eval config (mini: ``mini_wmdp``, the
forget-side knowledge, and ``mini_mmlu``, the utility side), ``wmdp/acc`` (the mean accuracy of the forget-side
tasks: those named ``*wmdp*``), and ``kl_retrain/retain``, ``kl_retrain/forget``,
``kl_reference/retain`` (``Suite.divergences``) over held documents of each corpus.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kfade import distributed
from kfade.data.config import DatasetConfig
from kfade.data.formatting import evenly_spaced, text_batches
from kfade.data.wmdp import WmdpData, load_wmdp
from kfade.errors import ConfigError
from kfade.eval.config import EvalConfig
from kfade.eval.relearn import attack_split
from kfade.models.config import ModelConfig
from kfade.suites.base import Suite
from kfade.suites.models import TrainingSets, base_loader, load_models, model_paths
from kfade.unlearn import UnlearnData

KL_DOCS = 64  # documents of each corpus on which the KL to the retrain model is measured


def training_sets(data: WmdpData) -> TrainingSets:
    """The reference model reads both corpora, the retrain model the retain corpus only."""
    texts = data.forget_corpus + data.retain_corpus
    for rows in data.mcq.values():
        texts += [r["question"] + " " + c for r in rows for c in r["choices"]]
    return TrainingSets(tag="mini_wmdp", tokenizer_texts=texts, reference_qa=[], retrain_qa=[],
                        reference_texts=data.forget_corpus + data.retain_corpus, retrain_texts=data.retain_corpus)


@dataclass(kw_only=True)
class WmdpSuite(Suite):
    data: WmdpData

    name = "wmdp"

    def batches(self, texts: list[str]) -> list[dict]:
        return text_batches(texts, self.formatter, self.dataset.batch_size)

    def retain_features(self) -> list[dict]:
        return [self.formatter.encode_text(t) for t in self.data.retain_corpus]

    def unlearn_data(self) -> UnlearnData:
        if self.dataset.fit_set_names() != ["retain"]:
            raise ConfigError("dataset.fit_sets", self.dataset.fit_sets, "WMDP fits on the retain corpus: [retain]")
        retain = self.batches(self.data.retain_corpus)
        return UnlearnData(forget=self.batches(self.data.forget_corpus), retain=retain,
                           fit=evenly_spaced(retain, self.dataset.fit_max_batches),
                           forget_split="forget_corpora")

    def score(self, model: torch.nn.Module) -> tuple[dict[str, float], None]:
        e, metrics = self.eval, {}
        if e.lm_eval_tasks:
            from kfade.eval.lm_eval_adapter import evaluate_lm_tasks  # lm-eval is imported by runs that use it

            metrics = evaluate_lm_tasks(model, self.tokenizer, e.lm_eval_tasks, e.lm_eval_data_dir or self.data.mcq_dir,
                                        e.lm_eval_batch_size, e.lm_eval_limit)
        forget_side = [metrics[f"{task}/acc"] for task in e.lm_eval_tasks if "wmdp" in task]
        if forget_side:  # the hazardous-knowledge accuracy in one number (audits: relearn/wmdp/acc, quant4/…)
            metrics["wmdp/acc"] = sum(forget_side) / len(forget_side)
        metrics |= self.divergences(model, self.batches(self.data.retain_corpus[:KL_DOCS]),
                                    self.batches(self.data.forget_corpus[:KL_DOCS]))
        return metrics, None

    def forget_key(self) -> str | None:
        """The first lm-eval task's accuracy (``wmdp_bio``, ``mini_wmdp``: the forget side)."""
        return f"{self.eval.lm_eval_tasks[0]}/acc" if self.eval.lm_eval_tasks else None

    def relearn_split(self, seed: int) -> tuple[list[dict], None]:
        """Half the forget corpus's documents (split by ``seed``); every lm-eval task is the held-out target."""
        attack, _ = attack_split(len(self.data.forget_corpus), seed)
        return [self.formatter.encode_text(self.data.forget_corpus[i]) for i in attack], None

    def heldout_score(self, model: torch.nn.Module, target: None) -> dict[str, float]:
        return self.score(model)[0]

    def headline_keys(self) -> list[str]:
        return [f"{task}/acc" for task in self.eval.lm_eval_tasks] + super().headline_keys()

    def cache_key(self) -> dict:
        return {**super().cache_key(), "source": self.data.source}


def build_wmdp_suite(model_cfg: ModelConfig, dataset_cfg: DatasetConfig, eval_cfg: EvalConfig,
                     noise_floor: bool = False, progress: bool = True,
                     sharded: bool = False) -> tuple[WmdpSuite, dict[str, float]]:
    """Load the corpora and both models (training the tiny pair if needed; ``sharded``: FSDP); return the suite
    and baseline scores."""
    with distributed.main_first():  # under torchrun rank 0 fills the data and model caches first
        data = load_wmdp(dataset_cfg.source, dataset_cfg.forget_corpora, dataset_cfg.retain_corpora)
        paths = model_paths(model_cfg, training_sets(data), noise_floor, progress)
    reference, tokenizer, retrains = load_models(model_cfg, paths, sharded)
    suite = WmdpSuite(tokenizer=tokenizer, reference=reference, retrains=retrains,
                      load_base=base_loader(model_cfg, paths, sharded), dataset=dataset_cfg, eval=eval_cfg,
                      progress=progress, data=data)
    return suite, suite.baseline_scores(paths.reference, paths.retrains)
