"""Unlearning deltas: exact save → re-apply round trip, changed tensors only, checked names and shapes."""

import pytest
import torch
from conftest import CORPUS, make_tiny_llama
from safetensors.torch import save_file

from kfade.data.formatting import QAFormatter, text_batches
from kfade.errors import ConfigError
from kfade.unlearn import UnlearnData, apply_delta, build_method, compute_delta, load_delta, save_delta

META = {"method": "grad_ascent", "base_fingerprint": "abc123", "step_size": 0.5}


def unlearned(tokenizer, dtype):
    """(θ_before as a dict, the model after 3 AdamW gradient-ascent epochs with weight decay)."""
    model = make_tiny_llama(tokenizer, dtype=dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = UnlearnData(forget=text_batches(CORPUS, QAFormatter(tokenizer), 2))
    build_method("grad_ascent", {"epochs": 3, "lr": 1e-2, "weight_decay": 0.1}).run(model, data)
    return before, model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_then_apply_reproduces_the_unlearned_weights_exactly(dtype, tokenizer, tmp_path):
    before, model = unlearned(tokenizer, dtype)
    delta = compute_delta(before, model)
    path = tmp_path / "delta.safetensors"
    save_delta(path, delta, META)
    loaded, metadata = load_delta(path)
    assert metadata == {"method": "grad_ascent", "base_fingerprint": "abc123", "step_size": "0.5"}
    assert loaded.keys() == delta.keys() and all(torch.equal(loaded[n], delta[n]) for n in delta)
    fresh = make_tiny_llama(tokenizer, dtype=dtype)
    apply_delta(fresh, loaded)
    for (name, got), (_, want) in zip(fresh.named_parameters(), model.named_parameters(), strict=True):
        assert got.dtype == dtype and torch.equal(got, want), name


def test_only_changed_tensors_are_stored(tiny_model):
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    weight = tiny_model.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        weight[0, 0] += 0.25
    delta = compute_delta(before, tiny_model)
    assert list(delta) == ["model.layers.0.self_attn.q_proj.weight"]
    expected = torch.zeros(weight.shape, dtype=torch.float64)
    expected[0, 0] = weight[0, 0].double() - before["model.layers.0.self_attn.q_proj.weight"][0, 0].double()
    assert torch.equal(delta["model.layers.0.self_attn.q_proj.weight"], expected)


def test_scaled_apply_matches_float64_reference(tokenizer):
    before, model = unlearned(tokenizer, torch.float32)
    delta = compute_delta(before, model)
    fresh = make_tiny_llama(tokenizer)
    apply_delta(fresh, delta, scale=-0.5)
    for name, param in fresh.named_parameters():
        expected = (before[name].double() - 0.5 * (model.get_parameter(name).double() - before[name].double()))
        assert torch.equal(param, expected.float()), name


def test_apply_rejects_mismatched_shapes_and_names(tokenizer):
    delta = {"model.layers.0.mlp.down_proj.weight": torch.ones(32, 64, dtype=torch.float64)}
    other = make_tiny_llama(tokenizer, intermediate_size=48)
    untouched = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(ConfigError, match=r"^delta\.model\.layers\.0\.mlp\.down_proj\.weight=\(32, 64\): shape "
                                          r"does not match the model's \(32, 48\)"):
        apply_delta(other, {"model.norm.weight": torch.ones(32)} | delta)
    assert all(torch.equal(p, untouched[n]) for n, p in other.named_parameters())
    with pytest.raises(ConfigError, match=r"^delta\.model\.extra\.weight=\(2,\): the model has no parameter"):
        apply_delta(other, {"model.extra.weight": torch.ones(2)})


def test_load_and_save_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^delta\.path='.*missing\.safetensors': no such file"):
        load_delta(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="not a safetensors file"):
        load_delta(garbage)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, str(plain))
    with pytest.raises(ConfigError, match=r"not an unlearning delta \(metadata lacks \['method', 'base_fingerprint'\]"):
        load_delta(plain)
    with pytest.raises(ValueError, match="lacks"):
        save_delta(tmp_path / "d.safetensors", {"w": torch.ones(2)}, {"method": "npo"})
    assert not (tmp_path / "d.safetensors").exists()
