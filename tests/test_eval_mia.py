"""Membership-inference attacks, AUC and privleak, extraction strength and exact memorisation: hand-computed cases,
scikit-learn's AUC, and token statistics against a direct float64 computation."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from test_eval_tofu_scoring import ANSWERS, QUESTIONS

from kfade.data.formatting import IGNORE_INDEX, QAFormatter
from kfade.eval.extraction import exact_memorization, extraction_metrics, extraction_strength
from kfade.eval.mia import ATTACKS, attack_scores, auc, mia_aucs, min_k_score, privleak, zlib_score
from kfade.eval.scoring import TokenStats, answer_losses, answer_token_stats


def stats(logprob, mean=None, std=None, hit=None):
    n = len(logprob)
    return TokenStats(np.asarray(logprob, float), np.zeros(n) if mean is None else np.asarray(mean, float),
                      np.ones(n) if std is None else np.asarray(std, float),
                      np.ones(n, bool) if hit is None else np.asarray(hit, bool))


def test_min_k_is_minus_the_mean_of_the_lowest_k_fraction():
    values = np.array([-1.0, -5.0, -2.0, -3.0, -0.5])
    assert min_k_score(values, 0.4) == pytest.approx(4.0)  # int(5 · 0.4) = 2 lowest: −5, −3
    assert min_k_score(values, 0.1) == pytest.approx(5.0)  # at least one token
    assert min_k_score(values, 1.0) == pytest.approx(2.3)


def test_min_k_plus_plus_normalises_by_the_predictive_mean_and_std():
    item = stats([-1.0, -4.0, -2.0], mean=[-1.0, -2.0, -3.0], std=[0.5, 1.0, 2.0])  # z = 0, −2, 0.5
    scores = attack_scores([item], np.array([1.5]), ["The cat sat."], k=0.4)
    assert scores["min_k_pp"][0] == pytest.approx(2.0)  # int(3 · 0.4) = 1 lowest z: −2
    assert scores["min_k"][0] == pytest.approx(4.0)
    assert scores["loss"][0] == 1.5
    assert scores["zlib"][0] == pytest.approx(1.5 / 20)  # zlib.compress(b"The cat sat.") is 20 bytes
    assert set(scores) == set(ATTACKS)


def test_zlib_divides_by_the_compressed_length():
    assert zlib_score(2.4, "aaaa") == pytest.approx(0.2)  # 12 bytes compressed


def test_auc_hand_case_and_against_sklearn():
    assert auc([1.0, 2.0], [3.0, 2.0]) == pytest.approx(3.5 / 4)  # 3 wins and one tie of 4 pairs
    rng = np.random.default_rng(0)
    forget, holdout = rng.integers(0, 6, 40).astype(float), rng.integers(2, 9, 30).astype(float)  # with ties
    labels = np.r_[np.zeros(40), np.ones(30)]
    assert auc(forget, holdout) == pytest.approx(roc_auc_score(labels, np.r_[forget, holdout]))
    assert auc(forget, forget) == pytest.approx(0.5)


def test_mia_aucs_keys_and_privleak():
    forget = {name: np.array([0.1, 0.2]) for name in ATTACKS}
    holdout = {name: np.array([0.3, 0.4]) for name in ATTACKS}
    assert mia_aucs(forget, holdout) == {f"mia/{name}/auc": 1.0 for name in ATTACKS}
    assert privleak(0.9, 0.5) == pytest.approx(80.0)
    assert privleak(0.25, 0.5) == pytest.approx(-50.0)
    assert privleak(0.6, 0.6) == 0.0


def test_extraction_strength_counts_the_trailing_hits():
    assert extraction_strength(np.array([1, 0, 1, 1], bool)) == 0.5  # greedy works from y_<2
    assert extraction_strength(np.array([1, 1, 1], bool)) == 1.0
    assert extraction_strength(np.array([1, 1, 0], bool)) == 0.0  # k* = n
    assert exact_memorization(np.array([1, 0, 1, 1], bool)) == 0.75
    metrics = extraction_metrics([stats([0.0] * 4, hit=[1, 0, 1, 1]), stats([0.0] * 2, hit=[0, 0])])
    assert metrics == {"forget/extraction_strength": 0.25, "forget/exact_memorization": 0.375}


def test_token_stats_match_a_direct_computation_and_drop_the_eos(tiny_model, tokenizer):
    formatter = QAFormatter(tokenizer)
    got = answer_token_stats(tiny_model, formatter, QUESTIONS, ANSWERS, batch_size=3)
    for item, question, answer in zip(got, QUESTIONS, ANSWERS, strict=True):
        encoded = formatter.encode(question, answer)
        with torch.no_grad():
            logp = torch.log_softmax(tiny_model(torch.tensor([encoded["input_ids"]])).logits[0, :-1].double(), -1)
        labels = torch.tensor(encoded["labels"][1:])
        keep = torch.nonzero(labels != IGNORE_INDEX)[:-1, 0]  # the answer tokens, not the closing EOS
        assert labels[torch.nonzero(labels != IGNORE_INDEX)[-1, 0]] == tokenizer.eos_token_id
        target = labels[keep]
        p = logp[keep].exp()
        mean = (p * logp[keep]).sum(-1)
        std = ((p * logp[keep] ** 2).sum(-1) - mean**2).sqrt()
        np.testing.assert_allclose(item.logprob, logp[keep].gather(1, target[:, None])[:, 0], rtol=1e-5)
        np.testing.assert_allclose(item.mean, mean, rtol=1e-5)
        np.testing.assert_allclose(item.std, std, rtol=1e-4)
        np.testing.assert_array_equal(item.hit, (logp[keep].argmax(-1) == target).numpy())
    one = answer_token_stats(tiny_model, formatter, QUESTIONS, ANSWERS, batch_size=1)
    for a, b in zip(one, got, strict=True):  # batching and padding change nothing
        np.testing.assert_allclose(a.logprob, b.logprob, atol=1e-5)
    losses, counts = answer_losses(tiny_model, formatter, QUESTIONS, ANSWERS)
    assert [len(s.logprob) for s in got] == list(counts - 1)  # the mean NLL (loss attack) keeps the EOS
