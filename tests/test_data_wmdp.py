"""WMDP loader on the real local layout and mini-WMDP (determinism, cloze-scorable MCQ); bad inputs."""

import hashlib
import re
from pathlib import Path

import pytest
from conftest import write_jsonl

from kfade.data.mini_wmdp import DOMAINS, mini_wmdp_files, write_mini_wmdp
from kfade.data.wmdp import load_wmdp
from kfade.errors import ConfigError

MCQ_ROW = {"question": "Which is a vowel?", "choices": ["b", "a", "c", "d"], "answer": 1}


@pytest.fixture
def real_layout(tmp_path):
    """A tiny copy of the real WMDP layout: two forget corpora, wikitext as text, wmdp_* and mmlu* MCQ."""
    write_jsonl(tmp_path / "bio_remove_dataset.jsonl", [{"text": "bio doc 1", "title": "t"},
                                                        {"text": "bio 2"}])
    write_jsonl(tmp_path / "cyber-forget-corpus.jsonl", [{"text": "cyber doc"}])
    (tmp_path / "wikitext.txt").write_text("first paragraph\n\n   \nsecond paragraph\n")
    for task in ("wmdp_bio", "wmdp_cyber", "mmlu_astronomy"):
        write_jsonl(tmp_path / f"{task}.jsonl", [MCQ_ROW, MCQ_ROW | {"answer": 3}])
    return tmp_path


def test_real_layout_loads_with_default_corpus_names(real_layout):
    data = load_wmdp(str(real_layout))
    assert data.forget_corpus == ["bio doc 1", "bio 2", "cyber doc"]
    assert data.retain_corpus == ["first paragraph", "second paragraph"]
    assert sorted(data.mcq) == ["mmlu_astronomy", "wmdp_bio", "wmdp_cyber"]
    assert data.mcq["wmdp_bio"] == [MCQ_ROW, MCQ_ROW | {"answer": 3}]
    assert data.mcq_dir == data.source == str(real_layout)


def test_mini_is_materialised_and_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("KFADE_CACHE", str(tmp_path))
    data, expected = load_wmdp("mini"), mini_wmdp_files(0)
    assert data.source.startswith(str(tmp_path / "data" / "mini_wmdp-"))
    assert data.forget_corpus == [row["text"] for row in expected["forget_corpus"]]
    assert data.retain_corpus == [row["text"] for row in expected["retain_corpus"]]
    assert data.mcq == {"mini_mmlu": expected["mini_mmlu"], "mini_wmdp": expected["mini_wmdp"]}
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [data.source.rsplit("/", 1)[1]]
    assert (Path(data.mcq_dir) / "mini_wmdp.jsonl").is_file()


def test_mini_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    def digest(directory):
        return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sorted(directory.iterdir())))

    first, second, other = (write_mini_wmdp(tmp_path / name, seed) for name, seed in [("a", 0), ("b", 0),
                                                                                       ("c", 1)])
    assert digest(first).hexdigest() == digest(second).hexdigest() != digest(other).hexdigest()


@pytest.mark.parametrize("task, corpus, domain", [("mini_wmdp", "forget_corpus", "forget"),
                                                  ("mini_mmlu", "retain_corpus", "retain")])
def test_mini_mcq_is_cloze_scorable_from_its_corpus(task, corpus, domain):
    files = mini_wmdp_files(0)
    docs = [row["text"] for row in files[corpus]]
    text = "\n".join(docs)
    assert len(docs) == 300 and len(files[task]) == 100
    assert len({row["question"] for row in files[task]}) == 100
    answers = [row["answer"] for row in files[task]]
    assert len(set(answers)) == 4  # the true choice is not always in the same place
    _, properties = DOMAINS[domain]
    for row in files[task]:
        choices, answer = row["choices"], row["answer"]
        assert len(choices) == 4 == len(set(choices)) and isinstance(answer, int)
        true = choices[answer]
        assert f"{row['question']} {true}." in text  # the corpus states the fact right after the prefix
        assert not any(f"{row['question']} {wrong}." in text for wrong in choices if wrong != true)
        values, wordings = next((v, w) for v, w in properties.values() if true in v)
        assert set(choices) <= set(values)  # distractors are values of the same property
        prefix = wordings[0].removesuffix(" {value}")
        pattern = re.escape(prefix).replace(re.escape("{entity}"), "(.+)")
        entity = re.fullmatch(pattern, row["question"]).group(1)
        for wording in wordings:  # every wording of the fact occurs in the corpus
            assert wording.format(entity=entity, value=true) + "." in text


@pytest.mark.parametrize("source", ["cais/wmdp", "nonsense", "/no/such/wmdp"])
def test_bad_source_raises(source):
    with pytest.raises(ConfigError, match=f"^dataset.source='{source}': "):
        load_wmdp(source)


@pytest.mark.parametrize("kwargs, key", [({"forget_corpora": ["missing-corpus"]}, "dataset.forget_corpora"),
                                         ({"forget_corpora": []}, "dataset.forget_corpora"),
                                         ({"retain_corpora": ["missing"]}, "dataset.retain_corpora")])
def test_bad_corpus_names_raise(real_layout, kwargs, key):
    with pytest.raises(ConfigError, match=f"^{key}="):
        load_wmdp(str(real_layout), **kwargs)


def test_corpus_without_text_field_raises(real_layout):
    write_jsonl(real_layout / "cyber-forget-corpus.jsonl", [{"body": "x"}])
    with pytest.raises(ConfigError, match="^dataset.forget_corpora=.*'cyber-forget-corpus'.* field 'text'"):
        load_wmdp(str(real_layout))


def test_blank_corpus_raises(real_layout):
    (real_layout / "wikitext.txt").write_text("\n  \n")
    with pytest.raises(ConfigError, match="^dataset.retain_corpora=.*no non-blank documents"):
        load_wmdp(str(real_layout))


@pytest.mark.parametrize("bad, reason", [({"choices": ["a", "b", "c"]}, "choices must be 4 strings"),
                                         ({"answer": 4}, "answer 4 is not in 0..3"),
                                         ({"answer": None}, "lack field 'answer'")])
def test_bad_mcq_rows_raise(real_layout, bad, reason):
    write_jsonl(real_layout / "wmdp_cyber.jsonl", [MCQ_ROW, MCQ_ROW | bad])
    with pytest.raises(ConfigError, match=f"^dataset.source=.*'wmdp_cyber'.*{re.escape(reason)}"):
        load_wmdp(str(real_layout))


def test_no_mcq_files_raises(real_layout):
    for path in [*real_layout.glob("mmlu*.jsonl"), *real_layout.glob("wmdp_*.jsonl")]:
        path.unlink()
    with pytest.raises(ConfigError, match="^dataset.source=.*no multiple-choice files"):
        load_wmdp(str(real_layout))
