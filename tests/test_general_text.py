"""The general-text corpus (Python's own documentation) and perplexity on it."""

import math

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama
from scipy.special import log_softmax
from test_divergence import BigramModel

from kfade.data.formatting import IGNORE_INDEX, QAFormatter, text_batches
from kfade.data.general_text import HELDOUT_EVERY, MIN_CHARS, load_general_text
from kfade.errors import ConfigError
from kfade.eval.perplexity import perplexity


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KFADE_CACHE", str(tmp_path_factory.mktemp("general-cache")))
        first = load_general_text("python_docs")
        yield first, load_general_text("python_docs")  # the second read comes from the cache


def test_python_docs_is_a_prose_corpus_split_by_hash(corpus):
    built, cached = corpus
    assert (built.train, built.heldout) == (cached.train, cached.heldout)
    assert not set(built.train) & set(built.heldout)
    n = len(built.train) + len(built.heldout)
    assert n > 1000 and sum(map(len, built.train)) > 300_000  # hundreds of thousands of characters of English
    assert abs(len(built.heldout) / n - 1 / HELDOUT_EVERY) < 0.02
    for paragraph in built.train[::50] + built.heldout:
        assert len(paragraph) >= MIN_CHARS and ">>>" not in paragraph and "\n" not in paragraph


def test_unknown_corpus_names_the_key():
    with pytest.raises(ConfigError, match=r"dataset.general='wiki'.*python_docs"):
        load_general_text("wiki")


def test_perplexity_matches_a_direct_float64_computation():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(5, 5))
    ids = [[0, 1, 2, 3, 4], [4, 2]]
    batches = [{"input_ids": torch.tensor([row]), "attention_mask": torch.ones(1, len(row), dtype=torch.long),
                "labels": torch.tensor([[IGNORE_INDEX, *row[1:]]])} for row in ids]
    logp = log_softmax(table, axis=-1)
    nll = [-logp[row[t], row[t + 1]] for row in ids for t in range(len(row) - 1)]
    assert perplexity(BigramModel(table), batches) == pytest.approx(math.exp(np.mean(nll)), rel=1e-6)


def test_perplexity_is_independent_of_batch_size_and_padding(tokenizer):
    model = make_tiny_llama(tokenizer)
    texts = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.", "A short one."]
    formatter = QAFormatter(tokenizer)
    one = perplexity(model, text_batches(texts, formatter, 1))
    assert perplexity(model, text_batches(texts, formatter, 3)) == pytest.approx(one, rel=1e-5)
    assert 1.0 < one < len(tokenizer) * 10
    model.train()
    perplexity(model, text_batches(texts, formatter, 2))
    assert model.training  # the caller's mode is restored
