"""TOFU loader: every published file layout, the real reference rows, the Hub call, each bad-input error."""

import json

import datasets
import pytest
from conftest import reference_rows, small_tofu_splits, write_jsonl

from kfade.data import tofu
from kfade.data.files import resolve_source
from kfade.data.mini_tofu import REFERENCE_DIR, mini_tofu_splits
from kfade.data.tofu import load_tofu, load_tofu_split
from kfade.errors import ConfigError

CONFIGS = ("forget10", "retain90", "forget10_perturbed", "retain_perturbed", "real_authors_perturbed",
           "world_facts_perturbed", "full")


@pytest.fixture(scope="module")
def small_splits():
    """A few rows of every config (forget10 and retain90 disjoint), as the loader should return them."""
    return small_tofu_splits()


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(path))


# layout -> writer of one config into a directory (TOFU's own, plain parquet, push_to_hub, parquet conversion)
LAYOUT_WRITERS = {
    "json_lines": lambda d, name, rows: write_jsonl(d / f"{name}.json", rows),
    "jsonl": lambda d, name, rows: write_jsonl(d / f"{name}.jsonl", rows),
    "json_array": lambda d, name, rows: (d / f"{name}.json").write_text(json.dumps(rows)),
    "parquet": lambda d, name, rows: write_parquet(d / f"{name}.parquet", rows),
    "hub_config_dirs": lambda d, name, rows: write_parquet(d / name / "train-00000-of-00001.parquet", rows),
    "hub_data_dir": lambda d, name, rows: write_parquet(d / "data" / f"{name}-00000-of-00001.parquet", rows),
    "hub_parquet_conversion": lambda d, name, rows: write_parquet(d / name / "train" / "0000.parquet", rows),
}


def write_layout(directory, splits, layout):
    for name, rows in splits.items():
        LAYOUT_WRITERS[layout](directory, name, rows)
    return directory


@pytest.mark.parametrize("layout", sorted(LAYOUT_WRITERS))
def test_load_tofu_reads_every_layout(tmp_path, small_splits, layout):
    data = load_tofu(str(write_layout(tmp_path, small_splits, layout)), "forget10")
    assert data.source == str(tmp_path)
    assert data.forget == small_splits["forget10"]
    assert data.retain == small_splits["retain90"]
    assert data.forget_perturbed == small_splits["forget10_perturbed"]
    assert data.retain_perturbed == small_splits["retain_perturbed"]
    assert data.real_authors == small_splits["real_authors_perturbed"]
    assert data.world_facts == small_splits["world_facts_perturbed"]
    assert data.full == small_splits["full"]


def test_hub_layout_with_several_shards_keeps_all_rows(tmp_path, small_splits):
    rows = small_splits["full"]
    write_parquet(tmp_path / "full" / "train-00000-of-00002.parquet", rows[:3])
    write_parquet(tmp_path / "full" / "train-00001-of-00002.parquet", rows[3:])
    write_parquet(tmp_path / "full_perturbed" / "train-00000-of-00001.parquet", rows[:1])  # not "full"
    assert load_tofu_split(str(tmp_path), "full") == rows


@pytest.mark.parametrize("name, n_rows", [("real_authors_perturbed", 100), ("world_facts_perturbed", 117)])
def test_real_reference_rows_load_with_their_fields(name, n_rows):
    rows = load_tofu_split(str(REFERENCE_DIR), name)
    assert rows == reference_rows(name)
    assert len(rows) == n_rows
    assert all(set(row) == {"question", "answer", "perturbed_answer"} for row in rows)
    assert all(len(row["perturbed_answer"]) == 3 for row in rows)
    assert all(row["answer"] not in row["perturbed_answer"] for row in rows)


def test_mini_is_materialised_once_and_read_like_a_local_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("KFADE_CACHE", str(tmp_path))
    data = load_tofu("mini", "forget05")
    expected = mini_tofu_splits(0)
    assert data.source.startswith(str(tmp_path / "data" / "mini_tofu-"))
    assert (data.forget, data.retain) == (expected["forget05"], expected["retain95"])
    assert data.full == expected["full"]
    assert data.forget_perturbed == expected["forget05_perturbed"]
    assert data.real_authors == reference_rows("real_authors_perturbed")
    def stamp():
        return (tmp_path / "data").stat().st_mtime_ns, sorted(p.name for p in (tmp_path / "data").iterdir())

    before = stamp()
    assert load_tofu("mini", "forget01").source == data.source
    assert stamp() == before  # not written again


def test_hub_id_is_a_thin_load_dataset_call(monkeypatch, small_splits):
    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(small_splits[name])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_tofu(tofu.TOFU_HUB_ID, "forget10")
    assert data.source == "locuslab/TOFU" and data.forget == small_splits["forget10"]
    assert calls[0] == ("locuslab/TOFU", "forget10", "train")
    assert sorted(name for _, name, _ in calls) == sorted(CONFIGS)


@pytest.mark.parametrize("source, reason", [
    ("nonsense", "unknown source"),
    ("/no/such/tofu/dir", "no such directory"),
    ("./relative/missing", "no such directory"),
    ("a/b/c", "no such directory"),
])
def test_bad_source_raises(source, reason):
    with pytest.raises(ConfigError, match=f"^dataset.source='{source}': {reason}"):
        load_tofu(source)


def test_source_that_is_a_file_raises(tmp_path):
    (tmp_path / "forget10.json").write_text("")
    with pytest.raises(ConfigError, match="^dataset.source=.*is a file"):
        load_tofu(str(tmp_path / "forget10.json"))


def test_hub_shaped_source_resolves_to_the_id():
    assert resolve_source("locuslab/TOFU", make_mini=lambda: pytest.fail("not mini")) == "locuslab/TOFU"


def test_unknown_forget_split_raises(tmp_path, small_splits):
    with pytest.raises(ConfigError, match="^dataset.forget_split='forget20': unknown split"):
        load_tofu(str(write_layout(tmp_path, small_splits, "jsonl")), "forget20")


def test_missing_split_file_raises(tmp_path, small_splits):
    with pytest.raises(ConfigError, match="^dataset.forget_split='forget05': no file for split 'forget05'"):
        load_tofu(str(write_layout(tmp_path, small_splits, "jsonl")), "forget05")


def test_missing_eval_split_file_names_the_source(tmp_path, small_splits):
    splits = {name: rows for name, rows in small_splits.items() if name != "world_facts_perturbed"}
    with pytest.raises(ConfigError, match="^dataset.source=.*no file for split 'world_facts_perturbed'"):
        load_tofu(str(write_layout(tmp_path, splits, "jsonl")), "forget10")


def test_empty_forget_split_raises(tmp_path, small_splits):
    write_layout(tmp_path, small_splits | {"forget10": []}, "json_lines")
    with pytest.raises(ConfigError, match="^dataset.forget_split='forget10': split is empty"):
        load_tofu(str(tmp_path), "forget10")


def test_forget_overlapping_retain_raises(tmp_path, small_splits):
    retain = small_splits["retain90"] + small_splits["forget10"][1:2]
    write_layout(tmp_path, small_splits | {"retain90": retain}, "jsonl")
    with pytest.raises(ConfigError, match="^dataset.forget_split='forget10': 1 questions are in both"):
        load_tofu(str(tmp_path), "forget10")


@pytest.mark.parametrize("split, field", [
    ("forget10", "answer"), ("forget10_perturbed", "perturbed_answer"),
    ("retain_perturbed", "paraphrased_answer"), ("real_authors_perturbed", "perturbed_answer"),
    ("full", "question"),
])
def test_rows_missing_a_field_raise_naming_split_and_field(tmp_path, small_splits, split, field):
    rows = [dict(row) for row in small_splits[split]]
    del rows[1][field]
    write_layout(tmp_path, small_splits | {split: rows}, "jsonl")
    with pytest.raises(ConfigError, match=f"split '{split}': 1 rows \\(first: row 1\\) lack field '{field}'"):
        load_tofu(str(tmp_path), "forget10")


def test_unreadable_file_raises(tmp_path, small_splits):
    write_layout(tmp_path, small_splits, "jsonl")
    (tmp_path / "forget10.jsonl").write_text("{not json\n")
    with pytest.raises(ConfigError, match="^dataset.forget_split='forget10': cannot read split 'forget10'"):
        load_tofu(str(tmp_path), "forget10")
