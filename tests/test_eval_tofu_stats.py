"""TOFU statistics against hand-computed values, exact KS p-values and rouge-score on known pairs."""

import math

import numpy as np
import pytest

from kfade.eval.tofu_stats import (
    forget_quality,
    forget_truth_ratio_score,
    model_utility,
    normalized_probabilities,
    rouge_recalls,
    truth_ratio_score,
    truth_ratios,
)

# item 0: paraphrased loss 1, perturbed losses 2 and 3 -> R = exp(1 - 2.5) = e^-1.5 (true answer preferred)
# item 1: paraphrased loss 2, perturbed loss 1         -> R = exp(2 - 1)   = e       (false answer preferred)
PARAPHRASED = [1.0, 2.0]
PERTURBED = [[2.0, 3.0], [1.0]]
E_MINUS_1_5, E_MINUS_1 = 0.22313016014842982, 0.36787944117144233


def test_truth_ratio_is_perturbed_over_paraphrased_probability():
    np.testing.assert_allclose(truth_ratios(PARAPHRASED, PERTURBED), [E_MINUS_1_5, math.e], rtol=1e-12)


def test_forget_score_is_mean_min_r_inverse_r():
    expected = (E_MINUS_1_5 + E_MINUS_1) / 2
    assert forget_truth_ratio_score([E_MINUS_1_5, math.e]) == pytest.approx(expected, rel=1e-12)
    assert forget_truth_ratio_score([1.0, 1.0]) == 1.0


def test_other_sets_score_is_mean_one_minus_r_clipped_at_zero():
    assert truth_ratio_score([E_MINUS_1_5, math.e]) == pytest.approx((1 - E_MINUS_1_5 + 0.0) / 2, rel=1e-12)


def test_normalized_probability_hand_cases_and_no_underflow():
    # P(a) = 1/2, P(perturbed) = 1/4 + 1/4 -> 1/2;  P(a) = 1, P(perturbed) = 1/3 -> 3/4
    got = normalized_probabilities([math.log(2), 0.0], [[math.log(4), math.log(4)], [math.log(3)]])
    np.testing.assert_allclose(got, [0.5, 0.75], rtol=1e-12)
    # exp(-1000) underflows; the ratio 1 / (1 + e^-1) does not
    assert normalized_probabilities([1000.0], [[1001.0]])[0] == pytest.approx(1 / (1 + E_MINUS_1), rel=1e-12)


def test_forget_quality_exact_ks_p_values():
    # fully separated samples of 3 and 3: exact two-sided p = 2 / C(6, 3) = 0.1
    assert forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1, rel=1e-12)
    assert forget_quality([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(1.0)


def test_model_utility_is_harmonic_mean_and_zero_when_any_is_zero():
    values = [1.0, 0.5, 0.25] * 3
    assert model_utility(values) == pytest.approx(9 / (3 * (1 + 2 + 4)), rel=1e-12)
    assert model_utility([*values[:-1], 0.0]) == 0.0


def test_rouge_recall_known_pairs():
    # LCS(the cat sat on the mat, the cat lay on a mat) = "the cat on mat": 4 of the 6 reference words
    got = rouge_recalls(["the cat lay on a mat"], ["The cat sat on the mat"])
    assert got["rougeL"] == [pytest.approx(4 / 6)] and got["rouge1"] == [pytest.approx(4 / 6)]
    # recall is over the reference (answer), not the generation
    assert rouge_recalls(["Paris"], ["Paris is the capital of France"])["rougeL"] == [pytest.approx(1 / 6)]
    # Porter stemming: running -> run, dogs -> dog; both unigrams match, the LCS has length 1
    got = rouge_recalls(["dogs run"], ["running dogs"])
    assert got["rouge1"] == [pytest.approx(1.0)] and got["rougeL"] == [pytest.approx(0.5)]
