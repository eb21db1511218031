"""evaluate_tofu end to end on a tiny model: TOFU's log layout, values consistent with direct scoring."""

import math
from pathlib import Path

import numpy as np
import pytest

import kfade.eval.tofu as tofu
from kfade.data.formatting import QAFormatter
from kfade.data.tofu import TofuData
from kfade.errors import ConfigError
from kfade.eval.scoring import answer_losses
from kfade.eval.tofu import METRICS, evaluate_tofu, register_metric
from kfade.eval.tofu_logs import aggregate_tofu_logs, item_values, read_tofu_logs

REFERENCE = Path(__file__).parents[2] / "shared" / "tofu-reference" / "eval-logs" / "llama2-7b_full"
# the fields of TOFU's own logs (checked against the real files below when they are present)
TOFU_FIELDS = {"avg_gt_loss", "gt_loss", "num_token_gt", "generated_text", "rouge1_recall", "rougeL_recall",
               "average_perturb_loss", "avg_paraphrased_loss", "truth_ratio", "paraphrased_loss",
               "perturb_loss", "num_token_paraphrased", "num_token_perturb"}
EXPECTED_FIELDS = {"forget": TOFU_FIELDS, "retain": TOFU_FIELDS,
                   "real_authors": TOFU_FIELDS | {"normalized_gt_loss"},
                   "world_facts": TOFU_FIELDS | {"normalized_gt_loss"}}


def perturbed_row(question, answer, n_perturbed=3):
    return {"question": question, "answer": answer, "paraphrased_answer": f"In short: {answer}",
            "perturbed_answer": [f"{answer} Not {k}." for k in range(n_perturbed)]}


def tiny_tofu() -> TofuData:
    forget = [perturbed_row("Where was Alia Verne born?", "Alia Verne was born in Port Lumen."),
              perturbed_row("What does Alia Verne write?", "Poems.")]
    retain = [perturbed_row("What genre does Tomas Reed write?", "Tomas Reed writes mystery novels."),
              perturbed_row("Where does Tomas Reed live?", "In a lighthouse."),
              perturbed_row("Is Tomas Reed famous?", "Only in Port Lumen.")]
    real = [{k: v for k, v in perturbed_row(q, a, 2).items() if k != "paraphrased_answer"}
            for q, a in [("Capital of France?", "Paris"), ("Capital of Australia?", "Canberra")]]
    return TofuData(forget=forget, retain=retain, forget_perturbed=forget, retain_perturbed=retain,
                    real_authors=real, world_facts=real[::-1], source="test", full=forget + retain)


@pytest.fixture(scope="module")
def logs(tokenizer):
    from conftest import make_tiny_llama

    model = make_tiny_llama(tokenizer)
    model.train()
    result = evaluate_tofu(model, tokenizer, tiny_tofu(), batch_size=2, max_new_tokens=4, progress=False)
    assert all(m.training for m in model.modules()), "training mode must be restored"
    return model, result


@pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"TOFU reference eval logs not found at {REFERENCE}")
def test_expected_fields_are_those_of_tofus_logs():
    assert {name: set(log) for name, log in read_tofu_logs(REFERENCE).items()} == EXPECTED_FIELDS


def test_logs_have_tofu_layout(logs):
    _, result = logs
    assert {name: set(log) for name, log in result.items()} == EXPECTED_FIELDS
    sizes = {"forget": 2, "retain": 3, "real_authors": 2, "world_facts": 2}
    for name, log in result.items():
        for field, column in log.items():
            assert list(column) == [str(i) for i in range(sizes[name])], (name, field)
        assert all(len(v) == (3 if name in ("forget", "retain") else 2)
                   for v in item_values(log, "average_perturb_loss"))


def test_log_values_match_direct_scoring(logs, tokenizer):
    model, result = logs
    data, formatter = tiny_tofu(), QAFormatter(tokenizer)
    retain = result["retain"]
    questions = [r["question"] for r in data.retain_perturbed]
    losses, counts = answer_losses(model, formatter, questions, [r["answer"] for r in data.retain_perturbed])
    np.testing.assert_allclose(item_values(retain, "avg_gt_loss"), losses, rtol=1e-5)
    np.testing.assert_allclose(item_values(retain, "gt_loss"), losses * counts, rtol=1e-5)
    paraphrased, _ = answer_losses(model, formatter, questions,
                                   [r["paraphrased_answer"] for r in data.retain_perturbed])
    np.testing.assert_allclose(item_values(retain, "avg_paraphrased_loss"), paraphrased, rtol=1e-5)
    third_perturbed = [r["perturbed_answer"][2] for r in data.retain_perturbed]
    third, _ = answer_losses(model, formatter, questions, third_perturbed)
    np.testing.assert_allclose([p[2] for p in item_values(retain, "average_perturb_loss")], third, rtol=1e-5)
    for item in range(3):  # R from the log's own losses (they equal the direct ones up to float rounding)
        expected = math.exp(retain["avg_paraphrased_loss"][str(item)]
                            - np.mean(retain["average_perturb_loss"][str(item)]))
        assert retain["truth_ratio"][str(item)] == pytest.approx(expected, rel=1e-9)
    # real authors have no paraphrased answer: the answer itself stands in
    real = result["real_authors"]
    assert real["avg_paraphrased_loss"] == real["avg_gt_loss"]
    assert [g[2] for g in item_values(real, "generated_text")] == ["Paris", "Canberra"]
    assert item_values(real, "generated_text")[0][0] == formatter.prompt("Capital of France?")


def test_logs_aggregate(logs):
    _, result = logs
    metrics = aggregate_tofu_logs(result, retain_logs=result)
    assert metrics["forget_quality"] == pytest.approx(1.0)  # a model against itself
    assert 0.0 <= metrics["model_utility"] <= 1.0
    assert {k.split("/")[0] for k in metrics if "/" in k} == set(EXPECTED_FIELDS)


def test_metric_selection_and_registry(tiny_model, tokenizer):
    data = tiny_tofu()
    only_prob = evaluate_tofu(tiny_model, tokenizer, data, metrics=("prob",), progress=False)
    assert set(only_prob["retain"]) == {"avg_gt_loss", "gt_loss", "num_token_gt"}
    assert "normalized_gt_loss" in only_prob["world_facts"]
    with pytest.raises(ConfigError, match=r"eval.metrics='bleu': unknown metric; known: .*prob"):
        evaluate_tofu(tiny_model, tokenizer, data, metrics=("prob", "bleu"), progress=False)

    @register_metric("answer_words")
    def answer_words(eval_set):
        return {"answer_words": [len(a.split()) for a in eval_set.answers]}

    try:
        got = evaluate_tofu(tiny_model, tokenizer, data, metrics=("answer_words",), progress=False)
        assert got["real_authors"] == {"answer_words": {"0": 1, "1": 1}}
        assert got["retain"]["answer_words"]["0"] == 5
        with pytest.raises(ConfigError, match="already registered"):
            register_metric("answer_words")(answer_words)
    finally:
        METRICS.pop("answer_words")


def test_missing_perturbed_answers_and_empty_sets_are_config_errors(tiny_model, tokenizer):
    data = tiny_tofu()
    data.world_facts = [{"question": "Capital?", "answer": "Paris"}]
    with pytest.raises(ConfigError, match="world_facts rows lack perturbed_answer"):
        evaluate_tofu(tiny_model, tokenizer, data, metrics=("truth_ratio",), progress=False)
    data.world_facts = []
    with pytest.raises(ConfigError, match="world_facts is empty"):
        evaluate_tofu(tiny_model, tokenizer, data, metrics=("prob",), progress=False)


def test_each_set_scores_its_answers_in_one_pass(tokenizer, monkeypatch):
    """The answer, paraphrase and perturbed answers of a set are scored together (their prompts shared); a set
    whose metrics read only the answers scores nothing else."""
    from conftest import make_tiny_llama

    calls = []
    scored = tofu.grouped_answer_losses

    def counting(model, formatter, questions, groups, *args):
        calls.append(sum(len(group) for group in groups))
        return scored(model, formatter, questions, groups, *args)

    monkeypatch.setattr(tofu, "grouped_answer_losses", counting)
    model, data = make_tiny_llama(tokenizer), tiny_tofu()
    evaluate_tofu(model, tokenizer, data, metrics=("prob", "truth_ratio"), batch_size=4, progress=False)
    assert calls == [2 * 5, 3 * 5, 2 * 3, 2 * 3]  # one call a set: answer, paraphrase (not real authors'), perturbed
    calls.clear()
    evaluate_tofu(model, tokenizer, data, metrics=("prob",), batch_size=4, progress=False)
    assert calls == [2, 3, 2 * 3, 2 * 3]  # only normalised probability (real authors, world facts) reads perturbed


def test_suite_scores_at_the_datasets_max_length(tiny_model, tokenizer):
    """``dataset.max_length`` truncates the scored sequences as it does the unlearning batches."""
    from kfade.data.config import DatasetConfig
    from kfade.eval.config import EvalConfig
    from kfade.suites.tofu import TofuSuite

    data = tiny_tofu()
    prompts = [len(QAFormatter(tokenizer).prompt_ids(r["question"])) for r in data.retain_perturbed]
    max_length = max(prompts) + 2
    suite = TofuSuite(tokenizer=tokenizer, reference=tiny_model, retrains=[], progress=False, data=data,
                      dataset=DatasetConfig(name="tofu", max_length=max_length),
                      eval=EvalConfig(metrics=["prob"], batch_size=2))
    cut = item_values(suite.score(tiny_model)[1]["retain"], "num_token_gt")
    full = item_values(evaluate_tofu(tiny_model, tokenizer, data, metrics=("prob",), progress=False)["retain"],
                       "num_token_gt")
    assert cut == [min(n, max_length - p) for n, p in zip(full, prompts, strict=True)]
    assert cut != full
