"""Per-item answer losses against a direct float64 computation, one unpadded sequence at a time."""

import numpy as np
import pytest
import torch

from kfade.data.formatting import IGNORE_INDEX, QAFormatter
from kfade.errors import ConfigError
from kfade.eval.scoring import answer_losses, grouped_answer_losses

QUESTIONS = ["Where was Alia Verne born?", "What genre does Tomas Reed write?", "Capital of France?"]
ANSWERS = ["Alia Verne was born in Port Lumen.", "Mystery.", "Paris is the capital of France, they say."]


def direct_loss(model, formatter, question, answer):
    """Mean NLL over label tokens of one sequence without padding, log-softmax in float64."""
    encoded = formatter.encode(question, answer)
    with torch.no_grad():
        logits = model(torch.tensor([encoded["input_ids"]])).logits[0].double()
    log_probs = torch.log_softmax(logits[:-1], -1)
    labels = torch.tensor(encoded["labels"][1:])
    keep = labels != IGNORE_INDEX
    nll = -log_probs[keep].gather(1, labels[keep, None])[:, 0]
    return nll.mean().item(), int(keep.sum())


def test_answer_losses_match_direct_computation(tiny_model, tokenizer):
    formatter = QAFormatter(tokenizer)
    losses, counts = answer_losses(tiny_model, formatter, QUESTIONS, ANSWERS, batch_size=3)
    expected = [direct_loss(tiny_model, formatter, q, a) for q, a in zip(QUESTIONS, ANSWERS, strict=True)]
    np.testing.assert_allclose(losses, [e[0] for e in expected], rtol=1e-5)
    np.testing.assert_array_equal(counts, [e[1] for e in expected])
    assert len(set(counts)) == 3  # different lengths, so the batch of 3 was padded


def test_answer_losses_do_not_depend_on_batch_size(tiny_model, tokenizer):
    formatter = QAFormatter(tokenizer)
    one = answer_losses(tiny_model, formatter, QUESTIONS, ANSWERS, batch_size=1)
    two = answer_losses(tiny_model, formatter, QUESTIONS, ANSWERS, batch_size=2)
    np.testing.assert_allclose(one[0], two[0], atol=1e-5)
    np.testing.assert_array_equal(one[1], two[1])


def test_grouped_losses_regroup_ragged_lists(tiny_model, tokenizer):
    formatter = QAFormatter(tokenizer)
    groups = [ANSWERS, ANSWERS[:1], ANSWERS[1:]]
    losses, counts = grouped_answer_losses(tiny_model, formatter, QUESTIONS, groups, batch_size=4)
    assert [len(x) for x in losses] == [3, 1, 2] and [len(x) for x in counts] == [3, 1, 2]
    for question, group, got in zip(QUESTIONS, groups, losses, strict=True):
        expected = [direct_loss(tiny_model, formatter, question, a)[0] for a in group]
        np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_answer_losses_leave_training_mode_and_reject_bad_input(tiny_model, tokenizer):
    formatter = QAFormatter(tokenizer)
    tiny_model.train()
    answer_losses(tiny_model, formatter, QUESTIONS[:1], ANSWERS[:1])
    assert all(m.training for m in tiny_model.modules())
    with pytest.raises(ConfigError, match="one per question"):
        answer_losses(tiny_model, formatter, QUESTIONS, ANSWERS[:2])
    with pytest.raises(ConfigError, match="max_length"):
        answer_losses(tiny_model, QAFormatter(tokenizer, max_length=4), QUESTIONS[:1], ANSWERS[:1])


def test_grouped_losses_run_each_prompt_once(tiny_model, tokenizer):
    formatter = QAFormatter(tokenizer)
    groups = [ANSWERS, ANSWERS[:2], ANSWERS[1:]]
    counts = []  # tokens embedded by each forward pass
    hook = tiny_model.get_input_embeddings().register_forward_hook(
        lambda _module, args, _out: counts.append(int(args[0].numel())))
    try:
        losses, _ = grouped_answer_losses(tiny_model, formatter, QUESTIONS, groups, batch_size=1)
        one_by_one = list(counts)
        counts.clear()
        shared, _ = grouped_answer_losses(tiny_model, formatter, QUESTIONS, groups, batch_size=32)
    finally:
        hook.remove()
    prompts = [len(formatter.prompt_ids(q)) for q in QUESTIONS]
    answers = [len(formatter.answer_ids(a)) for group in groups for a in group]
    # batch_size 1: every answer is its own batch, so each prompt runs once per answer, unpadded
    assert sum(one_by_one) == sum(p * len(g) for p, g in zip(prompts, groups, strict=True)) + sum(answers)
    # one batch: each prompt once (left-padded to the longest), then every answer (right-padded)
    assert counts == [len(QUESTIONS) * max(prompts), len(answers) * max(answers)]
    for one, many in zip(losses, shared, strict=True):
        np.testing.assert_allclose(one, many, rtol=1e-5)


def test_grouped_losses_truncate_as_answer_losses(tiny_model, tokenizer):
    question = QUESTIONS[0]
    room = 3  # answer tokens left after the prompt
    formatter = QAFormatter(tokenizer, max_length=len(QAFormatter(tokenizer).prompt_ids(question)) + room)
    losses, counts = grouped_answer_losses(tiny_model, formatter, [question], [ANSWERS], batch_size=2)
    flat, flat_counts = answer_losses(tiny_model, formatter, [question] * 3, ANSWERS, batch_size=3)
    np.testing.assert_allclose(losses[0], flat, rtol=1e-5)
    np.testing.assert_array_equal(counts[0], flat_counts)
    assert (flat_counts <= room).all()
    short = QAFormatter(tokenizer, max_length=len(formatter.prompt_ids(question)))
    with pytest.raises(ConfigError, match="keeps no answer tokens"):
        grouped_answer_losses(tiny_model, short, [question], [ANSWERS])
