"""Bad input → one-line ConfigError naming the key; config files and the OmegaConf schema."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_curvature_reference import batches_of, qa_sequences, tiny_llama

from kfade.curvature import CurvatureConfig, fit_curvature
from kfade.errors import ConfigError

CONF = Path(__file__).parents[1] / "conf"
BATCHES = batches_of(qa_sequences(2, seed=0), 2)


@pytest.mark.parametrize(("field", "value"), [("estimator", "kfc"), ("fisher", "true"), ("damping", -0.1),
                                              ("damping_mode", "percent"), ("mc_samples", 0),
                                              ("max_batches", 0), ("modules", "(")])
def test_bad_config_values(field, value):
    with pytest.raises(ConfigError) as err:
        CurvatureConfig(**{field: value})
    assert str(err.value).startswith(f"curvature.{field}=") and "\n" not in str(err.value)


def test_regex_matching_no_linear_is_an_error():
    with pytest.raises(ConfigError, match="curvature.modules='nothing_here'"):
        fit_curvature(tiny_llama(), BATCHES, CurvatureConfig(modules="nothing_here"))


def test_vocabulary_sized_layer_warns():
    with pytest.warns(UserWarning, match="vocabulary-sized layer 'lm_head'"):
        fit_curvature(tiny_llama(), BATCHES, CurvatureConfig(estimator="kfac", fisher="empirical",
                                                             modules=r"lm_head|down_proj"))


def test_default_modules_are_the_decoder_linears():
    curv = fit_curvature(tiny_llama(layers=2), BATCHES, CurvatureConfig(estimator="identity"))
    assert len(curv.layers) == 14 and all(".layers." in s.name for s in curv.layers)


def test_bad_batches():
    model = tiny_llama()
    no_labels = {k: v for k, v in BATCHES[0].items() if k != "labels"}
    with pytest.raises(ConfigError, match="no 'labels'"):
        fit_curvature(model, [no_labels], CurvatureConfig())
    unlabeled = {**BATCHES[0], "labels": torch.full_like(BATCHES[0]["labels"], -100)}
    with pytest.raises(ConfigError, match="no label tokens"):
        fit_curvature(model, [unlabeled], CurvatureConfig())
    with pytest.raises(ConfigError, match="no batches"):
        fit_curvature(model, [], CurvatureConfig())


@pytest.mark.parametrize("estimator", ["kfac", "diagonal"])
def test_non_finite_weights_name_the_layer(estimator):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ConfigError, match="non-finite") as err:
        fit_curvature(model, BATCHES, CurvatureConfig(estimator=estimator, fisher="empirical"))
    assert str(err.value).startswith("model='model.layers.0.") and "\n" not in str(err.value)


def test_identity_preconditioning_is_damped_scaling():
    curv = fit_curvature(tiny_llama(), BATCHES, CurvatureConfig(estimator="identity", damping=0.25,
                                                                damping_mode="absolute"))
    g = {curv.param_names[0]: torch.ones(8, 8, dtype=torch.float64)}
    torch.testing.assert_close(curv.precondition(g)[curv.param_names[0]], g[curv.param_names[0]] / 1.25)


def test_config_files_compose_into_the_schema():
    """Each curvature/ × damping/ choice merges into CurvatureConfig (damping files are ``@package curvature``)."""
    for name in ["kfac", "ekfac", "diagonal", "identity"]:
        for damping in ["absolute", "relative"]:
            root = OmegaConf.merge({"seed": 5, "curvature": OmegaConf.structured(CurvatureConfig)},
                                   {"curvature": OmegaConf.load(CONF / "curvature" / f"{name}.yaml")},
                                   {"curvature": OmegaConf.load(CONF / "damping" / f"{damping}.yaml")})
            cfg = OmegaConf.to_object(root.curvature)
            assert isinstance(cfg, CurvatureConfig) and cfg.estimator == name and cfg.damping_mode == damping
            assert cfg.seed == (5 if name != "identity" else 0)
