"""The library's job API and its small registries: typed configs from plain mappings, the Method protocol, the
step rules' and solvers' knobs, and the rule that library progress bars follow the project's."""

import dataclasses

import datasets
import pytest
import transformers
from conftest import composed
from omegaconf import OmegaConf

from kfade.errors import ConfigError
from kfade.pipeline import RunConfig, load_config
from kfade.pipeline.console import header, method_knobs
from kfade.progress import library_bars
from kfade.report.numbers import number
from kfade.unlearn import METHODS, Method, build_method
from kfade.unlearn.kfade import KFadeConfig
from kfade.unlearn.solvers import SOLVERS
from kfade.unlearn.step_rules import STEP_RULES


def test_load_config_takes_a_plain_mapping_as_well_as_hydras_config():
    cfg = composed("dry_run=true", "method=mini/grad_diff")
    plain = OmegaConf.to_container(cfg, resolve=True)
    from_hydra, from_dict = load_config(cfg), load_config(plain)
    assert isinstance(from_dict, RunConfig) and from_dict.method_name == "grad_diff"
    assert dataclasses.asdict(from_dict) == dataclasses.asdict(from_hydra)


def test_an_unknown_method_is_one_error_at_the_boundary():
    cfg = composed("dry_run=true")
    cfg.method.name = "sgd"
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert err.value.key == "method.name"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_provides_the_method_protocol(name):
    method = build_method(name)
    assert isinstance(method, Method) and method.cfg.name == name
    assert (method.curvature_cfg is not None) == type(method).uses_curvature
    assert method.timings == {}


def test_every_step_rule_and_solver_is_a_choice_of_the_config_and_reads_its_own_fields():
    fields = {f.name for f in dataclasses.fields(KFadeConfig)}
    for rule in STEP_RULES:
        assert set(STEP_RULES[rule].knobs) <= fields and KFadeConfig(step_rule=rule).step_rule == rule
    for solver in SOLVERS:
        assert set(SOLVERS[solver].knobs) <= fields and KFadeConfig(solver=solver).solver == solver
    knobs = method_knobs(KFadeConfig(solver="cg", step_rule="trust_region"))
    assert knobs == ("solver=cg, step_rule=trust_region, kl_budget=0.1, n_steps=3, cg_iters=2, cg_batches=8, "
                     "forget_loss=kl_no_answer, retain_weight=3.0")


@pytest.mark.parametrize(("method", "damping"), [("kfade", "global damping 0.001"),
                                                   ("kfade_cg", "relative damping 0.1")])
def test_header_names_the_damping_the_step_uses(method, damping, tmp_path):
    config = load_config(composed(f"method={method}"))
    assert f"curvature=ekfac ({damping})" in header(config, tmp_path, {"curvature": "ekfac", "method": method})


@pytest.mark.parametrize("enabled", [True, False])
def test_library_bars_follow_the_flag_and_are_restored(enabled):
    before = (transformers.utils.logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled())
    with library_bars(enabled):
        assert transformers.utils.logging.is_progress_bar_enabled() is enabled
        assert datasets.is_progress_bar_enabled() is enabled
    assert (transformers.utils.logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()) == before


def test_number_keeps_finite_numbers_only():
    assert [number(v) for v in (1, 2.5, float("nan"), float("inf"), True, "0.3", None)] == \
        [1.0, 2.5, None, None, None, None, None]
