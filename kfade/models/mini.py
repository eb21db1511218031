"""The embedded benchmarks' models: a tokenizer and tiny Llamas trained from scratch, cached by fingerprint.

One recipe trains both models of a pair: the *reference* model (on everything, the model to unlearn) and the
*retrain* baseline (on the retain part only, the gold standard). Each is saved with ``save_pretrained`` under
``cache_dir()/models/<tag>-<fingerprint of data + tokenizer + spec + recipe>`` so later runs reuse it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from kfade.cache import atomic_path, cache_dir, cached, fingerprint, seal, write_json
from kfade.data.formatting import QAFormatter, pad_id
from kfade.models.tiny import TinyLlamaSpec, tiny_llama_config, train_tokenizer
from kfade.models.train import TrainRecipe, train_causal_lm
from kfade.progress import library_bars, shown


def mini_tokenizer(texts: Sequence[str], vocab_size: int) -> Path:
    """Directory of a BPE tokenizer trained on ``texts`` (cached; the same texts give the same tokenizer)."""
    path = cache_dir() / "tokenizers" / f"bpe{vocab_size}-{fingerprint(list(texts))}"
    if not cached(path, "tokenizer"):
        with atomic_path(path) as tmp:
            train_tokenizer(texts, vocab_size).save_pretrained(tmp)
            seal(tmp)
    return path


def trained_tiny_model(tag: str, tokenizer_dir: Path, qa_rows: Sequence[dict], texts: Sequence[str],
                       spec: TinyLlamaSpec, recipe: TrainRecipe, progress: bool = True,
                       init_from: Path | None = None, replay: Sequence[str] = ()) -> Path:
    """Directory of a tiny Llama trained on ``qa_rows`` (answer-token loss) and ``texts`` (all tokens); cached
    with checksums (a damaged copy is retrained, with a warning).

    Training starts from random weights, or from the cached model ``init_from`` (finetuning a pretrained base;
    ``recipe.replay`` of the base's texts ``replay`` then join each epoch, see ``train_causal_lm``).
    ``train_stats.json`` beside the weights records epochs, final loss and label-token accuracy.
    """
    key = {"qa": [(r["question"], r["answer"]) for r in qa_rows], "texts": list(texts),
           "tokenizer": tokenizer_dir.name, "spec": dataclasses.asdict(spec), "recipe": dataclasses.asdict(recipe)}
    if init_from is not None:
        key["init_from"] = init_from.name  # cache names end in the base model's own fingerprint
    if recipe.replay and replay:
        key["replay"] = list(replay)
    path = cache_dir() / "models" / f"{tag}-{fingerprint(key)}"
    if cached(path, "model"):
        return path
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    formatter = QAFormatter(tokenizer)
    features = [formatter.encode(r["question"], r["answer"]) for r in qa_rows]
    features += [formatter.encode_text(t) for t in texts]
    torch.manual_seed(recipe.seed)
    if init_from is None:
        model = LlamaForCausalLM(tiny_llama_config(tokenizer, spec))
    else:
        model = LlamaForCausalLM.from_pretrained(init_from, dtype=torch.float32)
    rehearsal = [formatter.encode_text(t) for t in replay] if recipe.replay else []
    stats = train_causal_lm(model, features, pad_id(tokenizer), recipe, progress=progress, replay=rehearsal)
    with atomic_path(path) as tmp, library_bars(shown(progress)):  # "Writing model shards" only on a terminal
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "train_stats.json", {"tag": tag, **dataclasses.asdict(stats)})
        seal(tmp)
    return path


def train_stats(model_dir: str | Path) -> dict:
    """The ``train_stats.json`` of a tiny model directory (empty dict for other models)."""
    f = Path(model_dir) / "train_stats.json"
    return json.loads(f.read_text()) if f.is_file() else {}
