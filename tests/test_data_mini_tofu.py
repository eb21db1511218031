"""Mini-TOFU: determinism, split sizes and disjointness, and scorable paraphrases / perturbations."""

import hashlib
import json
from collections import defaultdict

import pytest

from kfade.data.mini_tofu import (
    ATTRIBUTES,
    REFERENCE_DIR,
    generate_facts,
    generate_holdout_facts,
    mini_tofu_splits,
    write_mini_tofu,
)

SIZES = {"full": 640, "forget01": 16, "forget05": 32, "forget10": 64, "retain99": 624, "retain95": 608,
         "retain90": 576, "forget01_perturbed": 16, "forget05_perturbed": 32, "forget10_perturbed": 64,
         "retain_perturbed": 64, "real_authors_perturbed": 100, "world_facts_perturbed": 117,
         "holdout01": 16, "holdout05": 32, "holdout10": 64}
PAIRS = [("forget01", "retain99"), ("forget05", "retain95"), ("forget10", "retain90")]


def digest(directory):
    """sha256 over (name, bytes) of every file in ``directory``, in name order."""
    sha = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        sha.update(path.name.encode() + b"\0" + path.read_bytes())
    return sha.hexdigest()


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    directory = write_mini_tofu(tmp_path_factory.mktemp("mini_tofu"), seed=0)
    return {path.stem: read_jsonl(path) for path in directory.iterdir()}


@pytest.fixture(scope="module")
def facts():
    """question -> MiniFact (questions are unique)."""
    by_question = {fact.question: fact for fact in generate_facts(0)}
    assert len(by_question) == 640
    return by_question


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    first, second = write_mini_tofu(tmp_path / "a", 0), write_mini_tofu(tmp_path / "b", 0)
    other = write_mini_tofu(tmp_path / "c", 1)
    assert digest(first) == digest(second)
    assert digest(first) != digest(other)
    assert (first / "forget10.json").read_bytes() != (other / "forget10.json").read_bytes()


def test_sizes(written):
    assert {name: len(rows) for name, rows in written.items()} == SIZES


def test_reference_rows_copied_without_paraphrase(written):
    for name in ("real_authors_perturbed", "world_facts_perturbed"):
        assert written[name] == read_jsonl(REFERENCE_DIR / f"{name}.json")
        assert all("paraphrased_answer" not in row for row in written[name])


@pytest.mark.parametrize("forget, retain", PAIRS)
def test_forget_and_retain_partition_full_by_question_and_author(written, facts, forget, retain):
    forget_q = [row["question"] for row in written[forget]]
    retain_q = [row["question"] for row in written[retain]]
    assert not set(forget_q) & set(retain_q)
    assert not {facts[q].author for q in forget_q} & {facts[q].author for q in retain_q}
    assert sorted(forget_q + retain_q) == sorted(row["question"] for row in written["full"])
    full = {row["question"]: row for row in written["full"]}
    assert all(full[row["question"]] == row for row in written[forget] + written[retain])
    assert len({facts[q].author for q in forget_q}) == {"forget01": 1, "forget05": 2, "forget10": 4}[forget]
    qa_of_perturbed = [{k: r[k] for k in ("question", "answer")} for r in written[f"{forget}_perturbed"]]
    assert qa_of_perturbed == written[forget]


def test_forget_splits_are_nested_and_retain_perturbed_is_inside_every_retain(written, facts):
    questions = {name: {row["question"] for row in rows} for name, rows in written.items()}
    assert questions["forget01"] < questions["forget05"] < questions["forget10"]
    retain_perturbed = questions["retain_perturbed"]
    assert retain_perturbed <= questions["retain90"] <= questions["retain95"] <= questions["retain99"]
    assert len({facts[q].author for q in retain_perturbed}) == 16
    assert {facts[q].attribute for q in retain_perturbed} == set(ATTRIBUTES)


@pytest.mark.parametrize("split", ["forget10_perturbed", "forget01_perturbed", "retain_perturbed"])
def test_perturbed_rows_are_scorable(written, facts, split):
    for row in written[split]:
        fact = facts[row["question"]]
        answer, paraphrase, perturbed = row["answer"], row["paraphrased_answer"], row["perturbed_answer"]
        assert paraphrase != answer and fact.value in answer and fact.value in paraphrase
        assert len(perturbed) >= 3 and len(set(perturbed)) == len(perturbed) and answer not in perturbed
        prefix, suffix = paraphrase.rsplit(fact.value, 1)  # perturbed = the paraphrase with another value
        for wrong in perturbed:
            assert wrong.startswith(prefix) and wrong.endswith(suffix)
            assert wrong[len(prefix) : len(wrong) - len(suffix)] not in ("", fact.value)


def test_paraphrase_wordings_are_trained_with_other_authors(written, facts):
    def wording(text, fact):
        return text.replace(fact.author, "{name}").replace(fact.value, "{value}")

    trained = defaultdict(set)  # attribute -> answer wordings the retain90 model sees
    for row in written["retain90"]:
        fact = facts[row["question"]]
        trained[fact.attribute].add(wording(row["answer"], fact))
    assert all(len(trained[attribute]) >= 2 for attribute in ATTRIBUTES)
    for row in written["forget10_perturbed"]:
        fact = facts[row["question"]]
        assert wording(row["paraphrased_answer"], fact) in trained[fact.attribute]


def test_questions_vary_in_wording_and_answers_are_short(written, facts):
    question_wordings = defaultdict(set)
    for row in written["full"]:
        fact = facts[row["question"]]
        question_wordings[fact.attribute].add(row["question"].replace(fact.author, "{name}"))
        assert len(row["answer"].split()) <= 20 and fact.author in row["question"]
    assert all(len(question_wordings[attribute]) >= 2 for attribute in ATTRIBUTES)


def test_splits_in_memory_match_written_files(written):
    copied = {k: written[k] for k in ("real_authors_perturbed", "world_facts_perturbed")}
    assert mini_tofu_splits(0) | copied == written


def test_holdout_authors_are_new_nested_and_leave_the_trained_splits_alone(written):
    trained = {fact.author for fact in generate_facts(0)}
    holdout = generate_holdout_facts(0)
    assert not {fact.author for fact in holdout} & trained  # nobody a model learns about
    assert {row["question"] for row in written["holdout10"]}.isdisjoint(row["question"] for row in written["full"])
    assert written["holdout01"] == written["holdout05"][:16] and written["holdout05"] == written["holdout10"][:32]
    assert {fact.attribute for fact in holdout[:16]} == set(ATTRIBUTES)  # generated like the others
    # the 40 trained authors do not depend on the holdout generator (models stay cached): pinned bytes
    splits = {k: v for k, v in mini_tofu_splits(0).items() if not k.startswith("holdout")}
    assert hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest() == \
        "1ef837da7f4f4e13141ace6a99e4791b58918f64bd3a9ee4be29b76de1613f7a"
