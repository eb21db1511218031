"""The estimator registry: what each estimator plans to store is what a fit stores, and an estimator registered
from outside the package works through the config, the fit, preconditioning and the memory plan."""

import pytest
import torch
from test_curvature_reference import batches_of, qa_sequences

from kfade.curvature import CurvatureConfig, fit_curvature
from kfade.curvature.estimators import ESTIMATORS, Estimator, estimator, register
from kfade.errors import ConfigError
from kfade.plan import Placement, Workload, plan_memory
from kfade.plan.architecture import Architecture


@pytest.fixture(scope="module")
def batches():
    return batches_of(qa_sequences(4, seed=5), 2)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_planned_elements_are_what_a_fit_stores(model, batches, name):
    curv = fit_curvature(model, batches, CurvatureConfig(estimator=name, fisher="empirical"))
    planned = sum(sum(estimator(name).stored_elements(spec, curv.groups.get(spec.name, spec.name) == spec.name)
                      .values()) for spec in curv.layers)
    assert planned == sum(t.numel() for t in curv.tensors.values())
    assert estimator(name).kronecker == (curv.basis(curv.layers[0].name) is not None)


class ScaledIdentity(Estimator):
    """Ĝ = 2I: reads no data, stores nothing."""

    name = "scaled_identity_for_test"

    def eigenvalues(self, tensors, groups, spec, dtype):
        return torch.full((spec.out_features, spec.in_features), 2.0, dtype=dtype)


@pytest.fixture
def registered():
    register(ScaledIdentity)
    yield ScaledIdentity.name
    del ESTIMATORS[ScaledIdentity.name]


def test_a_new_estimator_is_one_class(model, batches, registered):
    curv = fit_curvature(model, batches, CurvatureConfig(estimator=registered, damping=0.5,
                                                         damping_mode="absolute"))
    grads = {name: torch.ones_like(p) for name, p in model.named_parameters() if name in curv.param_names}
    out = curv.precondition(grads)
    assert all(torch.allclose(out[n], grads[n] / 2.5) for n in grads)  # (2I + 0.5 I)⁻¹ g
    assert curv.mean_eigenvalue() is None and not curv.tensors
    arch = Architecture(model_type="llama", n_params=1000, layers=curv.layers,
                        groups={s.name: s.name for s in curv.layers}, hidden_size=8, num_heads=2, num_layers=1,
                        vocab_size=24, shared_inputs_found=True)
    items = plan_memory(arch, Workload(estimator=registered, solver="direct", model_dtype="float64"), Placement())
    assert not any(item.name.startswith(("factor sums", "curvature")) for item in items.items)


def test_an_unknown_estimator_is_one_line():
    with pytest.raises(ConfigError, match="curvature.estimator.*must be one of diagonal, ekfac, identity, kfac"):
        CurvatureConfig(estimator="kfca")
