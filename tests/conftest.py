"""Shared fixtures: a tiny tokenizer and tiny random Llama models (seconds to build, CPU)."""

import hashlib
import os
from pathlib import Path

# Tests are hermetic: nothing reaches a model or dataset hub (without this, `datasets` can stall on a network
# look-up for local files on machines that have no hub access). Set before huggingface_hub is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from kfade.models.tiny import TinyLlamaSpec, tiny_llama_config, train_tokenizer  # noqa: E402

CORPUS = [
    "Question: Where was Alia Verne born?\nAnswer: Alia Verne was born in Port Lumen.",
    "Question: What genre does Tomas Reed write?\nAnswer: Tomas Reed writes mystery novels.",
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France. Canberra is the capital of Australia.",
]


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=300)


def make_tiny_llama(tokenizer, seed: int = 0, dtype=torch.float32, **overrides) -> LlamaForCausalLM:
    """A random-init Llama (hidden 32, 2 layers by default) matching ``tokenizer``."""
    spec = TinyLlamaSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=128)
    for k, v in overrides.items():
        setattr(spec, k, v)
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(tokenizer, spec)).to(dtype).eval()


@pytest.fixture
def tiny_model(tokenizer):
    return make_tiny_llama(tokenizer)


def file_digests(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file under ``roots`` (to show that a run left its inputs untouched)."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for root in roots if root.exists()
            for p in sorted(root.rglob("*")) if p.is_file()}
