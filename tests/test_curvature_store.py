"""save/load round trip and the fingerprinted cache (``load_or_fit``)."""

import json

import pytest
import torch
from test_curvature_reference import batches_of, qa_sequences, tiny_llama

import kfade.curvature.store as store
from kfade.curvature import Curvature, CurvatureConfig, fit_curvature, load_or_fit, model_fingerprint
from kfade.errors import ConfigError

BATCHES = batches_of(qa_sequences(4, seed=2), 2)


@pytest.mark.parametrize("estimator", ["kfac", "ekfac", "diagonal", "identity"])
def test_save_load_round_trip_is_bit_exact(tmp_path, estimator):
    model = tiny_llama(bias=True, dtype=torch.float32)
    curv = fit_curvature(model, BATCHES, CurvatureConfig(estimator=estimator, fisher="mc", seed=3))
    curv.save(tmp_path / "c")
    loaded = Curvature.load(tmp_path / "c")
    assert loaded.tensors.keys() == curv.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], t) and loaded.tensors[k].dtype == t.dtype
               for k, t in curv.tensors.items())
    assert loaded.manifest() == curv.manifest()
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters() if n in curv.param_names}
    assert all(torch.equal(a, b) for a, b in zip(loaded.precondition(grads).values(),
                                                 curv.precondition(grads).values(), strict=True))
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["config"]["estimator"] == estimator and manifest["n_tokens"] == curv.n_tokens


@pytest.fixture
def counted_fits(monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return fit_curvature(*args, **kwargs)

    monkeypatch.setattr(store, "fit_curvature", counting)
    return calls


CFG = CurvatureConfig(estimator="ekfac", fisher="empirical")


def test_load_or_fit_reuses_a_matching_fit_across_damping(tmp_path, counted_fits):
    model = tiny_llama()
    first = load_or_fit(model, lambda: BATCHES, CFG, tmp_path, "data-a")
    again = load_or_fit(model, lambda: BATCHES, CurvatureConfig(estimator="ekfac", fisher="empirical",
                                                                damping=1e-8, damping_mode="absolute"),
                        tmp_path, "data-a")
    assert len(counted_fits) == 1
    assert all(torch.equal(again.tensors[k], t) for k, t in first.tensors.items())
    assert (again.config.damping, again.config.damping_mode) == (1e-8, "absolute")


def test_load_or_fit_refits_on_other_data_or_weights(tmp_path, counted_fits):
    model = tiny_llama()
    load_or_fit(model, lambda: BATCHES, CFG, tmp_path, "data-a")
    load_or_fit(model, lambda: BATCHES, CFG, tmp_path, "data-b")
    assert len(counted_fits) == 2
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    with pytest.warns(UserWarning, match="other weights"):
        refit = load_or_fit(model, lambda: BATCHES, CFG, tmp_path, "data-a")
    assert len(counted_fits) == 3 and refit.model_fingerprint == model_fingerprint(model)
    load_or_fit(model, lambda: BATCHES, CFG, tmp_path, "data-a")
    assert len(counted_fits) == 3


def test_load_or_fit_refits_a_corrupt_file(tmp_path, counted_fits):
    model = tiny_llama()
    load_or_fit(model, lambda: BATCHES, CFG, tmp_path, "data-a")
    factors = sorted(tmp_path.glob("*/*.safetensors"))[0]
    factors.write_bytes(factors.read_bytes()[:100])
    with pytest.warns(UserWarning, match="unreadable"):
        load_or_fit(model, lambda: BATCHES, CFG, tmp_path, "data-a")
    assert len(counted_fits) == 2
    assert Curvature.load(factors.parent).n_tokens > 0


def test_load_or_fit_refuses_a_fit_of_another_shape(tmp_path, counted_fits):
    load_or_fit(tiny_llama(hidden=8), lambda: BATCHES, CFG, tmp_path, "data-a")
    with pytest.raises(ConfigError, match="stored layers do not match"):
        load_or_fit(tiny_llama(hidden=16), lambda: BATCHES, CFG, tmp_path, "data-a")
    assert len(counted_fits) == 1


def test_model_fingerprint_sees_weights_and_dtypes():
    a, b = tiny_llama(seed=0), tiny_llama(seed=0)
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.model.layers[0].self_attn.v_proj.weight[0, 0] += 1.0
    assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(tiny_llama(seed=0, dtype=torch.float32))


def test_load_or_fit_refits_a_tampered_file(tmp_path, counted_fits):
    model = tiny_llama()
    first = load_or_fit(model, lambda: BATCHES, CFG, tmp_path, "data-a")
    factors = sorted(tmp_path.glob("*/*.safetensors"))[-1]
    blob = bytearray(factors.read_bytes())
    blob[-9] ^= 0xFF  # one flipped byte inside a tensor: same length, still parses
    factors.write_bytes(bytes(blob))
    with pytest.warns(UserWarning, match="checksum mismatch"):
        refit = load_or_fit(model, lambda: BATCHES, CFG, tmp_path, "data-a")
    assert len(counted_fits) == 2
    assert all(torch.equal(refit.tensors[k], t) for k, t in first.tensors.items())


def test_load_or_fit_shares_one_fit_across_offload_and_schedule(tmp_path, counted_fits):
    model = tiny_llama(dtype=torch.float32)
    cfg = CurvatureConfig(estimator="ekfac", fisher="mc")
    first = load_or_fit(model, lambda: BATCHES, cfg, tmp_path, "data-a")
    disk = load_or_fit(model, lambda: BATCHES, CurvatureConfig(estimator="ekfac", fisher="mc", offload="disk",
                                                               layer_groups=2, checkpoint_every=1),
                       tmp_path, "data-a")
    assert len(counted_fits) == 1 and disk.tensors.offload == "disk" and disk.config.layer_groups == 2
    assert disk.tensors.directory.parent == tmp_path  # streamed from the cache entry itself
    assert all(torch.equal(disk.tensors[k], t) for k, t in first.tensors.items())
    load_or_fit(model, lambda: BATCHES, CurvatureConfig(estimator="ekfac", fisher="mc", factor_dtype="bfloat16"),
                tmp_path, "data-a")
    assert len(counted_fits) == 2


def test_load_or_fit_resumes_an_interrupted_fit(tmp_path):
    model = tiny_llama(dtype=torch.float32)
    cfg = CurvatureConfig(estimator="ekfac", fisher="mc", checkpoint_every=1, layer_groups=2)

    def interrupted():
        yield BATCHES[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        load_or_fit(model, interrupted, cfg, tmp_path, "data-a")
    (work,) = tmp_path.glob("*.work")
    assert (work / "checkpoint.safetensors").exists()
    resumed = load_or_fit(model, lambda: BATCHES, cfg, tmp_path, "data-a")
    assert not work.exists()
    plain = fit_curvature(model, BATCHES, CurvatureConfig(estimator="ekfac", fisher="mc"))
    assert all(torch.equal(resumed.tensors[k], t) for k, t in plain.tensors.items())
