"""Gradient checkpointing changes no result (forget gradient, GGN products, curvature fit: bit-equal on the tiny
model) and device_map loading gives the same model."""

import pytest
import torch
from conftest import make_tiny_llama
from test_curvature_reference import batches_of, qa_sequences, tiny_llama
from transformers import AutoModelForCausalLM

from kfade.curvature import CurvatureConfig, GaussNewton, fit_curvature
from kfade.errors import ConfigError
from kfade.models.checkpointing import checkpointing_active, enable_gradient_checkpointing
from kfade.models.load import load_model
from kfade.unlearn.losses import forget_gradient

BATCHES = batches_of(qa_sequences(4, seed=6), 2)


def pair():
    plain = tiny_llama(dtype=torch.float32, layers=2)
    checkpointed = enable_gradient_checkpointing(tiny_llama(dtype=torch.float32, layers=2))
    assert checkpointing_active(checkpointed) and not checkpointing_active(plain)
    return plain, checkpointed


def test_gradient_checkpointing_keeps_gradients_products_and_factors_bit_equal():
    plain, checkpointed = pair()
    names = [n for n, _ in plain.named_parameters() if ".layers." in n and n.endswith("proj.weight")]
    runs = []  # forwards of one layer: the checkpointed model recomputes it in the backward
    for m in (plain, checkpointed):
        m.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_, m=m: runs.append(m is checkpointed))
    grads = [forget_gradient(m, BATCHES, names, False)[0] for m in (plain, checkpointed)]
    assert runs.count(True) == 2 * runs.count(False) == 2 * len(BATCHES)
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in names)
    v = {n: torch.randn_like(grads[0][n]) for n in names}
    products = [GaussNewton(m, BATCHES, names)(v) for m in (plain, checkpointed)]
    assert all(torch.equal(products[0][n], products[1][n]) for n in names)
    cfg = CurvatureConfig(estimator="ekfac", fisher="mc")
    fits = [fit_curvature(m, BATCHES, cfg) for m in (plain, checkpointed)]
    assert all(torch.equal(fits[0].tensors[k], fits[1].tensors[k]) for k in fits[0].tensors)
    with pytest.raises(ConfigError, match="method.ggn_mode='forward'"):
        GaussNewton(checkpointed, BATCHES, names, mode="forward")


def test_device_map_and_checkpointing_options_of_load_model(tokenizer, tmp_path, monkeypatch):
    model = make_tiny_llama(tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    seen, from_pretrained = [], AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: seen.append(k.get("device_map")) or from_pretrained(*a, **k))
    mapped, _ = load_model(str(tmp_path), device_map="auto", gradient_checkpointing=True)
    assert seen == ["auto"] and checkpointing_active(mapped)
    assert next(mapped.parameters()).device.type == "cpu"  # where "auto" puts it on this CPU-only machine
    assert not mapped.training  # the model stays in eval mode (dropout off); only decoder layers checkpoint
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        assert torch.equal(mapped(ids).logits, model(ids).logits)
    with pytest.raises(ConfigError, match="model.device_map='nowhere'"):
        load_model(str(tmp_path), device_map="nowhere")
