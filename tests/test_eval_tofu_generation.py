"""Batched left-padded greedy generation against a hand-written greedy loop over unpadded prompts."""

import pytest
import torch

from kfade.data.formatting import QAFormatter
from kfade.eval.generation import greedy_generate, stop_token_ids

QUESTIONS = ["Where was Alia Verne born?", "What genre does Tomas Reed write?", "Capital?",
             "Where is the lazy dog, and what does the quick brown fox do?"]


def greedy_by_hand(model, formatter, question, max_new_tokens):
    """Argmax of a full forward pass per step (no cache, no padding); returns (text, stopped at EOS)."""
    prompt, new = formatter.prompt_ids(question), []
    stops = stop_token_ids(model, formatter.tokenizer)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            token = int(model(torch.tensor([prompt + new])).logits[0, -1].argmax())
        if token in stops:
            return formatter.tokenizer.decode(new, skip_special_tokens=True).strip(), True
        new.append(token)
    return formatter.tokenizer.decode(new, skip_special_tokens=True).strip(), False


def test_batched_generation_equals_one_by_one_and_hand_loop(tiny_model, tokenizer):
    formatter = QAFormatter(tokenizer)
    batched = greedy_generate(tiny_model, formatter, QUESTIONS, max_new_tokens=6, batch_size=4)
    assert batched == greedy_generate(tiny_model, formatter, QUESTIONS, max_new_tokens=6, batch_size=1)
    assert batched == [greedy_by_hand(tiny_model, formatter, q, 6)[0] for q in QUESTIONS]


@pytest.fixture
def eos_leaning_model(tiny_model, tokenizer):
    """The tiny model with an lm_head bias toward EOS, so some answers stop early and some do not."""
    head = torch.nn.Linear(tiny_model.lm_head.in_features, tiny_model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(tiny_model.lm_head.weight)
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 0.2
    tiny_model.lm_head = head
    return tiny_model


def test_generation_stops_at_eos(eos_leaning_model, tokenizer):
    formatter = QAFormatter(tokenizer)
    expected = [greedy_by_hand(eos_leaning_model, formatter, q, 8) for q in QUESTIONS]
    stopped = [done for _, done in expected]
    assert any(stopped) and not all(stopped), "precondition: a mix of early-stopping and full-length answers"
    assert any(text and done for text, done in expected), "precondition: an answer stops mid-way"
    got = greedy_generate(eos_leaning_model, formatter, QUESTIONS, max_new_tokens=8, batch_size=4)
    assert got == [text for text, _ in expected]
