"""lm-eval adapter: accuracies equal a hand computation of each choice's log-likelihood under the model."""

import numpy as np
import pytest
import torch
from conftest import CORPUS, make_tiny_llama, write_jsonl
from scipy import stats

import kfade.eval.lm_eval_adapter as adapter
from kfade.errors import ConfigError
from kfade.models.tiny import train_tokenizer

MINI_ROWS = [
    {"question": "Where was Alia Verne born?", "choices": ["Port Lumen", "Paris", "the lazy dog", "Canberra"],
     "answer": 0},
    {"question": "What genre does Tomas Reed write?",
     "choices": ["mystery", "novels of France", "fox", "quick"], "answer": 1},
    {"question": "What is the capital of France?", "choices": ["Canberra", "Port", "Paris", "Lumen city"],
     "answer": 2},
    {"question": "Who jumps over the dog?", "choices": ["Alia", "Tomas Reed", "a cat", "the quick brown fox"],
     "answer": 3},
    {"question": "What is the capital of Australia?", "choices": ["Canberra", "Paris", "Verne", "Reed"],
     "answer": 0},
    {"question": "Where was Tomas born?", "choices": ["born in Port", "Lumen", "France", "the capital"],
     "answer": 1},
    {"question": "What does the fox do?", "choices": ["writes", "was born", "jumps over the dog", "novels"],
     "answer": 2},
    {"question": "Which dog is lazy?", "choices": ["brown", "quick", "Alia's", "the lazy dog"], "answer": 3},
]
BIO_DESCRIPTION = "The following are multiple choice questions (with answers) about biology.\n\n"


def sharp_llama(tokenizer, seed: int, **overrides):
    """A tiny random Llama whose output layer has unit-scale weights, so that its answers depend on content
    (at the default 0.02 init every choice scores about -len·log V and the shortest choice always wins)."""
    model = make_tiny_llama(tokenizer, seed=seed, **overrides)
    torch.manual_seed(seed)
    torch.nn.init.normal_(model.lm_head.weight, std=1.0)
    return model


def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), summed over the continuation's tokens, in float64."""
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    continuation_ids = tokenizer(continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = model(ids).logits[0].double().log_softmax(-1)
    positions = torch.arange(len(context_ids) - 1, ids.shape[1] - 1)
    return logprobs[positions, ids[0, positions + 1]].sum().item()


def cloze_predictions(model, tokenizer, rows):
    """Per question, the argmax of log p(" " + choice | question): raw, and divided by the choice's length."""
    raw, per_char = [], []
    for row in rows:
        scores = np.array([continuation_logprob(model, tokenizer, row["question"], " " + choice)
                           for choice in row["choices"]])
        raw.append(scores.argmax())
        per_char.append((scores / np.array([len(c) for c in row["choices"]])).argmax())
    return np.array(raw), np.array(per_char)


def letter_predictions(model, tokenizer, rows, description: str):
    """Per question, the argmax under WMDP's format: lettered choices, " A".." D" scored after "Answer:"."""
    predictions = []
    for row in rows:
        lettered = "".join(f"\n{x}. {choice}" for x, choice in zip("ABCD", row["choices"], strict=True))
        prompt = description + row["question"].strip() + lettered + "\nAnswer:"
        scores = [continuation_logprob(model, tokenizer, prompt, " " + letter) for letter in "ABCD"]
        predictions.append(np.argmax(scores))
    return np.array(predictions)


def answers(rows):
    return np.array([row["answer"] for row in rows])


@pytest.fixture(scope="module")
def letter_tokenizer():
    """Like the shared tokenizer, but " A" … " D" are one token each (as in real LLM vocabularies): otherwise
    the single-token letter always wins and the lettered prompt cannot be told apart from another."""
    return train_tokenizer(CORPUS + ["Answer: A B C D"] * 20, vocab_size=300)


@pytest.fixture
def mini_dir(tmp_path):
    write_jsonl(tmp_path / "mini_wmdp.jsonl", MINI_ROWS)
    return tmp_path


def with_answers(rows, answers):
    return [{**row, "answer": int(a)} for row, a in zip(rows, answers, strict=True)]


def test_mini_task_matches_hand_computed_loglikelihoods_and_restores_train_mode(tokenizer, mini_dir):
    model = sharp_llama(tokenizer, seed=0).train()
    result = adapter.evaluate_lm_tasks(model, tokenizer, ["mini_wmdp"], data_dir=str(mini_dir), batch_size=3)
    assert model.training
    raw, per_char = cloze_predictions(model.eval(), tokenizer, MINI_ROWS)
    correct = (raw == answers(MINI_ROWS)).astype(float)
    assert 0 < correct.mean() < 1
    assert result["mini_wmdp/acc"] == pytest.approx(correct.mean(), abs=1e-12)
    assert result["mini_wmdp/acc_norm"] == pytest.approx((per_char == answers(MINI_ROWS)).mean(), abs=1e-12)
    assert result["mini_wmdp/acc_stderr"] == pytest.approx(stats.sem(correct), rel=1e-9)


def test_changing_the_weights_in_place_changes_the_result(tokenizer, tmp_path):
    """Answers are set to the model's own choices (acc 1); after loading other weights into the same model
    object, the score is the new weights' agreement with them (< 1), not a reused result."""
    model = sharp_llama(tokenizer, seed=0)
    predicted = cloze_predictions(model, tokenizer, MINI_ROWS)[0]
    write_jsonl(tmp_path / "mini_wmdp.jsonl", with_answers(MINI_ROWS, predicted))

    def accuracy():
        result = adapter.evaluate_lm_tasks(model, tokenizer, ["mini_wmdp"], data_dir=str(tmp_path))
        return result["mini_wmdp/acc"]

    assert accuracy() == 1
    others = (sharp_llama(tokenizer, seed=s) for s in range(1, 10))
    other = next(m for m in others if (cloze_predictions(m, tokenizer, MINI_ROWS)[0] != predicted).any())
    model.load_state_dict(other.state_dict())
    agreement = (cloze_predictions(model, tokenizer, MINI_ROWS)[0] == predicted).mean()
    assert agreement < 1
    assert accuracy() == pytest.approx(agreement, abs=1e-12)


def test_local_wmdp_file_is_scored_with_lm_evals_lettered_prompt(letter_tokenizer, tmp_path):
    """Answers are set to the model's choices under WMDP's prompt (description + lettered choices): acc is 1
    with that prompt and below 1 with the prompt lacking the description or with cloze scoring."""
    rows = MINI_ROWS[:5]

    def discriminating(model):
        expected = letter_predictions(model, letter_tokenizer, rows, BIO_DESCRIPTION)
        return ((expected != letter_predictions(model, letter_tokenizer, rows, "")).any()
                and (expected != cloze_predictions(model, letter_tokenizer, rows)[0]).any())

    candidates = (sharp_llama(letter_tokenizer, seed=s, max_position_embeddings=512) for s in range(20))
    model = next(m for m in candidates if discriminating(m))
    predicted = letter_predictions(model, letter_tokenizer, rows, BIO_DESCRIPTION)
    write_jsonl(tmp_path / "wmdp_bio.jsonl", with_answers(rows, predicted))
    result = adapter.evaluate_lm_tasks(model, letter_tokenizer, ["wmdp_bio"], data_dir=str(tmp_path))
    assert result["wmdp_bio/acc"] == 1
    assert "wmdp_bio/acc_norm" not in result  # lm-eval's WMDP tasks define acc only


def test_bad_tasks_raise_config_error_before_anything_runs(tokenizer, mini_dir, monkeypatch):
    monkeypatch.setattr(adapter, "HFLM", lambda **_: pytest.fail("the model was run"))
    model = make_tiny_llama(tokenizer)
    with pytest.raises(ConfigError, match="unknown lm-eval task") as err:
        adapter.evaluate_lm_tasks(model, tokenizer, ["wmdp_bio", "no_such_task"])
    assert (err.value.key, err.value.value) == ("eval.lm_eval_tasks", "no_such_task")
    write_jsonl(mini_dir / "no_such_task.jsonl", MINI_ROWS)
    with pytest.raises(ConfigError, match="unknown lm-eval task"):
        adapter.evaluate_lm_tasks(model, tokenizer, ["no_such_task"], data_dir=str(mini_dir))
    with pytest.raises(ConfigError, match="no file mini_mmlu.jsonl") as err:
        adapter.evaluate_lm_tasks(model, tokenizer, ["mini_mmlu"], data_dir=str(mini_dir))
    assert err.value.key == "eval.lm_eval_data_dir"
    with pytest.raises(ConfigError, match="reads <data_dir>/mini_wmdp.jsonl"):
        adapter.evaluate_lm_tasks(model, tokenizer, ["mini_wmdp"])
