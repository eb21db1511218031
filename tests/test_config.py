"""Every config group composes and validates against its schema; typos and wrong types are one-line errors."""

from pathlib import Path

import pytest
from conftest import composed
from omegaconf import OmegaConf

from kfade.curvature import CurvatureConfig
from kfade.data.config import DatasetConfig
from kfade.errors import ConfigError
from kfade.eval.config import EvalConfig
from kfade.models.config import ModelConfig
from kfade.pipeline import typed
from kfade.tracking import LoggerConfig
from kfade.unlearn import METHODS

ROOT = Path(__file__).resolve().parents[1]

GROUP_SCHEMAS = {"model": ModelConfig, "dataset": DatasetConfig, "eval": EvalConfig, "logger": LoggerConfig}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["model", "dataset", "eval", "logger"])
def test_every_option_of_every_group_validates(group):
    assert options(group), f"conf/{group} is empty"
    for option in options(group):
        cfg = composed(f"{group}={option}")
        node = cfg[group]
        if group == "model" and node.path == "???":  # a generic HF model needs model.path
            node = OmegaConf.merge(node, {"path": "org/model"})
        assert isinstance(typed(node, GROUP_SCHEMAS[group], group), GROUP_SCHEMAS[group])


def test_curvature_and_damping_options_compose_into_one_config():
    for estimator in options("curvature"):
        for damping in options("damping"):
            cfg = composed(f"curvature={estimator}", f"damping={damping}")
            curv = typed(cfg.curvature, CurvatureConfig, "curvature")  # damping/ is packaged into curvature
            assert curv.estimator == estimator and curv.damping_mode == damping


def test_every_method_option_validates_against_its_registered_config():
    assert set(METHODS) | {"none"} <= set(options("method"))
    for option in set(options("method")) - {"none"}:  # a method by its name, or a preset of one (kfade_cg)
        cfg = composed(f"method={option}")
        config_cls = METHODS[cfg.method.name][0]
        assert isinstance(typed(cfg.method, config_cls, "method"), config_cls)
        assert cfg.method.name == option or option.startswith(f"{cfg.method.name}_")


def test_experiments_compose():
    for experiment in options("experiment"):
        assert composed(f"experiment={experiment}").dataset.name in ("tofu", "wmdp")


def test_default_is_mini_tofu_kfade_on_the_tiny_model():
    cfg = composed()
    assert (cfg.dataset.source, cfg.method.name, cfg.model.name) == ("mini", "kfade", "tiny_llama")


@pytest.mark.parametrize(("node", "message"), [
    ({"batch_size": "many"}, "dataset.batch_size"),
    ({"forget_splt": "forget05"}, "dataset.forget_splt"),
])
def test_bad_values_are_one_line_errors_naming_the_key(node, message):
    with pytest.raises(ConfigError) as err:
        typed(OmegaConf.create(node), DatasetConfig, "dataset")
    assert message in str(err.value) and "\n" not in str(err.value)
