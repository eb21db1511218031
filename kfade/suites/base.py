"""What every benchmark suite shares: the model pair, scoring, and the cached scores of the pair."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import torch

from kfade import distributed, fsdp
from kfade.cache import atomic_path, cache_dir, cached, fingerprint, seal, write_json
from kfade.curvature import model_fingerprint
from kfade.data.config import DatasetConfig
from kfade.data.formatting import QAFormatter
from kfade.errors import ConfigError
from kfade.eval import mean_token_kl, mean_token_kls
from kfade.eval.audits import PRIVLEAK_KEY, run_audits, with_privleak
from kfade.eval.config import EvalConfig
from kfade.models.config import NO_BASE_MODEL
from kfade.models.mini import train_stats
from kfade.unlearn import UnlearnData
from kfade.unlearn.losses import with_answer_logprobs

SCORES_VERSION = 4  # bumped when ``score`` gains metrics or computes them otherwise: cached baseline scores are redone


@dataclass(kw_only=True)
class Suite:
    """A benchmark with its models: ``reference`` (to unlearn; methods get a copy) and ``retrains`` (the retrain
    baseline, and with ``noise_floor`` a second seed of it)."""

    tokenizer: object
    reference: torch.nn.Module
    retrains: list[torch.nn.Module]
    dataset: DatasetConfig
    eval: EvalConfig
    progress: bool
    load_base: Callable[[], torch.nn.Module] | None = None  # loads a model that never learnt the forget set

    name = "suite"

    @cached_property
    def formatter(self) -> QAFormatter:
        return QAFormatter(self.tokenizer, self.dataset.max_length)

    def unlearn_data(self) -> UnlearnData:
        raise NotImplementedError

    def with_forget_targets(self, data: UnlearnData) -> UnlearnData:
        """``data`` whose forget batches carry the base model's log-probabilities at their label positions
        (``with_answer_logprobs``; the base never learnt the forget set: ``model.base_path``, or the tiny models'
        pretrained base), for ``method.forget_loss=kl_base``. The base is loaded, used and released here."""
        if self.load_base is None:
            raise ConfigError("model.base_path", None, NO_BASE_MODEL)
        return dataclasses.replace(data, forget=with_answer_logprobs(self.load_base(), data.forget))

    def retain_features(self) -> list[dict]:
        """The retain data encoded for training (``input_ids``/``labels`` lists): further finetuning."""
        raise NotImplementedError

    def score(self, model: torch.nn.Module) -> tuple[dict[str, float], object]:
        """Flat metrics of ``model`` and the suite's per-item record of them (e.g. TOFU eval logs)."""
        raise NotImplementedError

    def forget_key(self) -> str | None:
        """The score of forget-set knowledge whose recovery the audits report (None: no recovery)."""
        return None

    def relearn_split(self, seed: int) -> tuple[list[dict], object]:
        """The relearning attack's encoded training features from the forget data, and the held-out target that
        :meth:`heldout_score` scores (split once by ``seed``)."""
        raise NotImplementedError

    def heldout_score(self, model: torch.nn.Module, target) -> dict[str, float]:
        """Flat scores of ``model`` on the held-out target of :meth:`relearn_split`."""
        raise NotImplementedError

    def forget_rows(self) -> list[dict]:
        """Forget-set QA rows (membership inference, extraction)."""
        raise ConfigError("eval.audits", list(self.eval.audits), f"mia and extraction need QA rows: not on {self.name}")

    def holdout_rows(self) -> list[dict]:
        """QA rows of the same kind that no model saw (membership inference)."""
        raise ConfigError("eval.audits", list(self.eval.audits), f"mia needs holdout rows: not on {self.name}")

    def headline_keys(self) -> list[str]:
        """The metrics a results table shows first."""
        return ["kl_retrain/retain", "kl_retrain/forget", "kl_reference/retain"]

    def save_record(self, record, directory: Path) -> None:
        """Write a scored model's per-item record into its run directory."""

    def adopt_retrain(self, record) -> dict[str, float]:
        """Keep what later scores compare against from the retrain model's record; extra retrain metrics."""
        return {}

    def save_state(self, directory: Path) -> None:
        """Write what ``adopt_retrain`` kept (to restore it with ``load_state`` from the cache)."""

    def load_state(self, directory: Path) -> None:
        """Restore what ``save_state`` wrote."""

    def divergences(self, model: torch.nn.Module, retain: list[dict], forget: list[dict]) -> dict[str, float]:
        """Output-space distances, mean per-token KL in nats over the label tokens of the batches:
        ``kl_retrain/retain`` and ``kl_retrain/forget`` = KL(p_retrain ‖ p_model) (when a retrain model is
        loaded), ``kl_reference/retain`` = KL(p_reference ‖ p_model): how much the retain outputs changed."""
        references = {"kl_reference/retain": self.reference}
        if self.retrains:
            references["kl_retrain/retain"] = self.retrains[0]
        metrics = mean_token_kls(references, model, retain)  # the model's retain logits once for both
        if self.retrains:
            metrics["kl_retrain/forget"] = mean_token_kl(self.retrains[0], model, forget)
        return metrics

    def cache_key(self) -> dict:
        return {"dataset": asdict(self.dataset), "eval": asdict(self.eval), "scores": SCORES_VERSION}

    def baseline_scores(self, reference_path: str, retrain_paths: list[str]) -> dict[str, float]:
        """``retrain/…``, ``reference/…`` (and ``noise_floor/…``) scores and audits (``eval.audits``), cached by
        model and data fingerprints. Under torchrun rank 0 scores the models and writes the cache while the others
        wait, then read it; FSDP-sharded models are scored by every rank together (the same forward passes), rank 0
        deciding whether the cache holds them and writing it.

        The retrain model is scored first: it is what every later model is compared against.
        """
        key = fingerprint({"models": [model_fingerprint(m) for m in (self.reference, *self.retrains)],
                           **self.cache_key()})
        path = cache_dir() / "evals" / f"{self.name}-{key}"
        sharded = fsdp.is_sharded(self.reference)
        with contextlib.nullcontext() if sharded else distributed.main_first():
            hit = (distributed.from_main(distributed.is_main() and cached(path, "baseline scores")) if sharded
                   else cached(path, "baseline scores"))
            if hit:
                self.load_state(path)
                return json.loads((path / "scores.json").read_text())
            scores = self._scores(reference_path, retrain_paths)
            if distributed.is_main():
                with atomic_path(path) as tmp:
                    tmp.mkdir()
                    write_json(tmp / "scores.json", scores)
                    self.save_state(tmp)
                    seal(tmp)
            return scores

    def _scores(self, reference_path: str, retrain_paths: list[str]) -> dict[str, float]:
        """The scores and audits of :meth:`baseline_scores`, computed."""
        jobs = list(zip(("retrain", "noise_floor"), self.retrains, retrain_paths, strict=False))
        jobs.insert(min(1, len(jobs)), ("reference", self.reference, reference_path))
        scores: dict[str, float] = {}
        for prefix, model, model_path in jobs:
            metrics, record = self.score(model)
            if prefix == "retrain":
                metrics |= self.adopt_retrain(record)
            scores |= {f"{prefix}/{k}": v for k, v in metrics.items()}
            scores |= {f"{prefix}/train_{k}": v for k, v in train_stats(model_path).items() if k != "tag"}
        for prefix, model, _ in jobs:  # after every plain score: the audits' recoveries need the reference's
            own = {k.removeprefix(f"{prefix}/"): v for k, v in scores.items() if k.startswith(f"{prefix}/")}
            scores |= {f"{prefix}/{k}": v for k, v in run_audits(self, model, own, scores).items()}
        return scores | with_privleak(scores, [prefix for prefix, _, _ in jobs], scores.get(f"retrain/{PRIVLEAK_KEY}"))
