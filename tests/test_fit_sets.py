"""The curvature fitting set: by default everything the benchmark says the model keeps, subsampled to a budget."""

import pytest

from kfade.data.config import DatasetConfig
from kfade.data.formatting import evenly_spaced
from kfade.data.tofu import load_tofu
from kfade.errors import ConfigError
from kfade.suites.tofu import TofuSuite
from kfade.unlearn.base import batches_fingerprint


@pytest.mark.parametrize("config, expected", [
    (DatasetConfig(name="tofu"), ["retain", "real_authors", "world_facts"]),
    (DatasetConfig(name="tofu", general="python_docs"), ["retain", "real_authors", "world_facts", "general"]),
    (DatasetConfig(name="tofu", fit_sets=["retain"], general="python_docs"), ["retain"]),  # an override wins
    (DatasetConfig(name="wmdp", forget_split="forget_corpora"), ["retain"]),  # its retain corpus is general text
])
def test_default_fitting_set_resolves_per_benchmark(config, expected):
    assert config.fit_set_names() == expected


def test_evenly_spaced_keeps_each_sets_share():
    items = [f"retain{i}" for i in range(36)] + [f"facts{i}" for i in range(12)]
    picked = evenly_spaced(items, 12)
    assert len(picked) == 12 and len(set(picked)) == 12
    assert sum(p.startswith("facts") for p in picked) == 3  # 12/48 of the budget, as of the items
    assert evenly_spaced(items, None) == items and evenly_spaced(items, 100) == items


@pytest.mark.parametrize("bad", [0, -3])
def test_fit_max_batches_must_be_positive(bad):
    with pytest.raises(ConfigError, match=rf"^dataset\.fit_max_batches={bad}"):
        DatasetConfig(fit_max_batches=bad).validate()


def test_tofu_suite_fits_on_retain_real_authors_and_world_facts_within_the_budget(tokenizer):
    """mini-TOFU forget10: the default fitting set holds batches of all three kept sets, never the forget split,
    and no more than ``fit_max_batches`` of them."""
    data = load_tofu("mini", "forget10")
    suite = TofuSuite(tokenizer=tokenizer, reference=None, retrains=[], eval=None, progress=False, data=data,
                      dataset=DatasetConfig(name="tofu", fit_max_batches=None, batch_size=8))
    everything = suite.unlearn_data().fit
    rows = data.retain + data.real_authors + data.world_facts
    assert batches_fingerprint(everything) == batches_fingerprint(suite.batches(rows))
    suite.dataset.fit_max_batches = 10
    budgeted = suite.unlearn_data().fit
    assert len(budgeted) == 10
    assert batches_fingerprint(budgeted) == batches_fingerprint(evenly_spaced(everything, 10))
    suite.dataset.fit_sets = ["retain"]
    suite.dataset.fit_max_batches = None
    assert batches_fingerprint(suite.unlearn_data().fit) == batches_fingerprint(suite.batches(data.retain))
