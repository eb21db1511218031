"""Tiny random models of the paper's architectures, built from their shipped ``config.json`` fixtures (same model
classes, shrunk widths and depths), with tokenizers shaped like the real ones (their special tokens, no pad token,
Llama-3-Instruct's chat template); and small local TOFU / WMDP directories in the real layouts."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from conftest import small_tofu_splits, write_jsonl
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from kfade.data.formatting import QAFormatter, pad_id
from kfade.data.mini_wmdp import mini_wmdp_files
from kfade.data.tofu import load_tofu
from kfade.eval import evaluate_tofu, write_tofu_logs
from kfade.models.load import load_model
from kfade.models.tiny import train_tokenizer
from kfade.models.train import TrainRecipe, train_causal_lm

FIXTURES = Path(__file__).resolve().parents[1] / "conf" / "fixtures" / "models"
WIDTH = {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 64}
# The brief finetuning: 30 epochs put the paper's direct step (δ = 1e-8, η = 5e-3) in its quadratic regime on these
# models (one step, no split); a random or 15-epoch model still has near-uniform outputs and the step is split.
FINETUNE = TrainRecipe(max_epochs=30, lr=1e-2, warmup_steps=2, batch_size=128, target_accuracy=0.99)

# Meta-Llama-3-8B-Instruct's chat template (tokenizer_config.json)
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 "
    "%}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


@dataclass(frozen=True)
class TokenizerStyle:
    """What a real tokenizer of the family has: its named special tokens, other special tokens, a chat template."""

    special: dict
    extra: tuple[str, ...] = ()
    chat_template: str | None = None


SENTENCEPIECE = TokenizerStyle({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})  # Llama-2, Mistral
CODEGEN = TokenizerStyle({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"})
LLAMA3 = TokenizerStyle({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
                        ("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"), LLAMA3_CHAT_TEMPLATE)
STYLES = {"locuslab--tofu_ft_llama2-7b": SENTENCEPIECE, "locuslab--tofu_ft_phi-1.5": CODEGEN,
          "HuggingFaceH4--zephyr-7b-beta": SENTENCEPIECE, "meta-llama--Meta-Llama-3-8B-Instruct": LLAMA3}


def tiny_tokenizer(texts: list[str], style: TokenizerStyle, vocab_size: int = 400):
    """A BPE trained on ``texts`` with the special tokens of ``style`` and, like the real ones, no pad token."""
    tokenizer = train_tokenizer(texts, vocab_size)
    tokenizer.add_special_tokens(style.special)
    tokenizer.add_tokens(list(style.extra), special_tokens=True)
    tokenizer.pad_token = None
    tokenizer.chat_template = style.chat_template
    return tokenizer


def shrunk_config(fixture: str, tokenizer) -> PretrainedConfig:
    """The fixture's config with ``WIDTH`` (the key/value heads in the fixture's ratio: GQA stays GQA), the
    tokenizer's vocabulary and special ids; everything else (activation, rotary, biases, window) as shipped."""
    config = AutoConfig.from_pretrained(FIXTURES / fixture)
    small = copy.deepcopy(config)
    for key, value in WIDTH.items():
        setattr(small, key, value)
    small.num_key_value_heads = WIDTH["num_attention_heads"] * config.num_key_value_heads // config.num_attention_heads
    if getattr(small, "head_dim", None):
        small.head_dim = WIDTH["hidden_size"] // WIDTH["num_attention_heads"]
    small.vocab_size = len(tokenizer)
    small.bos_token_id, small.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    if getattr(config, "pad_token_id", None) is not None:  # Zephyr pads with EOS
        small.pad_token_id = tokenizer.eos_token_id
    return small


def save_tiny_model(fixture: str, tokenizer, directory: Path, qa: list[dict], texts: list[str], seed: int) -> Path:
    """A model of ``fixture``'s architecture (``shrunk_config``) from random weights (``seed``), briefly finetuned
    on ``qa`` (answer tokens) and ``texts`` (every token) as the paper's checkpoints know their benchmark, saved
    with ``tokenizer`` in the fixture's dtype into ``directory`` (what ``model.path`` / ``model.retrain_path``
    point at)."""
    config = shrunk_config(fixture, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # trained in fp32, saved as shipped
    assert type(model).__name__ == config.architectures[0]
    formatter = QAFormatter(tokenizer)
    features = [formatter.encode(r["question"], r["answer"]) for r in qa] + [formatter.encode_text(t) for t in texts]
    train_causal_lm(model, features, pad_id(tokenizer), FINETUNE, progress=False)
    model.to(config.dtype).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tofu_dir(directory: Path, retain: int = 128) -> Path:
    """A few rows of every TOFU config the forget10 split needs, as TOFU's own JSON-lines files; ``retain`` rows of
    retain90, the fitting set: Ĝ of the tiny layers needs more label tokens than their widths (with 4 rows it is
    rank-deficient and the paper's direct step at δ = 1e-8 leaves the quadratic regime)."""
    for name, rows in small_tofu_splits(retain).items():
        write_jsonl(directory / f"{name}.json", rows)
    return directory


def tofu_eval_logs(model_dir: Path, data_dir: Path, directory: Path) -> Path:
    """TOFU eval logs of the saved model at ``model_dir`` on forget10 of ``data_dir`` (a retrain model's logs)."""
    model, tokenizer = load_model(str(model_dir))
    write_tofu_logs(evaluate_tofu(model, tokenizer, load_tofu(str(data_dir), "forget10"), max_new_tokens=4,
                                  progress=False), directory)
    return directory


WMDP_FILES = {"bio_remove_dataset": "forget_corpus", "cyber-forget-corpus": "forget_corpus",
              "wikitext": "retain_corpus", "wmdp_bio": "mini_wmdp", "wmdp_cyber": "mini_wmdp", "mmlu": "mini_mmlu"}


def wmdp_dir(directory: Path, documents: int = 32, questions: int = 8) -> Path:
    """WMDP's local layout (two forget corpora, wikitext, and wmdp_bio / wmdp_cyber / mmlu question files) taken
    from mini-WMDP: ``documents`` per corpus (wikitext: the fitting set), ``questions`` per task (disjoint slices
    where two files share a source)."""
    files = mini_wmdp_files(0)
    taken: dict[str, int] = {}
    for name, source in WMDP_FILES.items():
        start, count = taken.get(source, 0), documents if source.endswith("corpus") else questions
        write_jsonl(directory / f"{name}.jsonl", files[source][start:start + count])
        taken[source] = start + count
    return directory
