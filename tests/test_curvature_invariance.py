"""The fit does not depend on how the data is batched, padded or ordered, leaves the model as it was, and works
in bf16 and with gradient checkpointing."""

import pytest
import torch
from conftest import make_tiny_llama
from test_curvature_reference import assert_blocks_close, batches_of, collate, dense_blocks, qa_sequences, tiny_llama

from kfade.curvature import CurvatureConfig, fit_curvature

SEQS = qa_sequences(8, seed=7)


def fit(model, batches, estimator="ekfac", fisher="empirical", **kw):
    return fit_curvature(model, batches, CurvatureConfig(estimator=estimator, fisher=fisher, **kw))


@pytest.fixture(scope="module", params=["kfac", "ekfac", "diagonal"])
def estimator_and_reference(request, model):
    return request.param, dense_blocks(fit(model, batches_of(SEQS, 8), request.param))


def test_batch_size_one_equals_eight(model, estimator_and_reference):
    estimator, reference = estimator_and_reference
    assert_blocks_close(dense_blocks(fit(model, batches_of(SEQS, 1), estimator)), reference, rtol=1e-9)


def test_extra_padding_changes_nothing(model, estimator_and_reference):
    estimator, reference = estimator_and_reference
    padded = [collate(SEQS[:4], width=12), collate(SEQS[4:], width=15)]
    assert_blocks_close(dense_blocks(fit(model, padded, estimator)), reference, rtol=1e-9)


def test_shuffled_order_changes_nothing(model, estimator_and_reference):
    estimator, reference = estimator_and_reference
    order = torch.randperm(len(SEQS), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = batches_of([SEQS[i] for i in order], 3)
    assert_blocks_close(dense_blocks(fit(model, shuffled, estimator)), reference, rtol=1e-9)


def test_counts_and_caps(model):
    batches = batches_of(SEQS, 2)
    tokens = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    assert fit(model, batches, "kfac").n_tokens == sum(tokens)
    assert fit(model, batches, "kfac", max_batches=2).n_tokens == sum(tokens[:2])
    assert fit(model, batches, "kfac", max_tokens=tokens[0] + 1).n_tokens == sum(tokens[:2])
    assert fit(model, iter(batches), "ekfac", max_batches=3).n_tokens == sum(tokens[:3])  # one-shot iterator


def test_shared_inputs_share_one_activation_factor(model):
    curv = fit(model, batches_of(SEQS, 4), "kfac")
    groups = curv.groups
    attn, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    assert groups[attn + "k_proj"] == groups[attn + "v_proj"] == groups[attn + "q_proj"] == attn + "q_proj"
    assert groups[mlp + "up_proj"] == groups[mlp + "gate_proj"] == mlp + "gate_proj"
    assert sorted(k for k in curv.tensors if k.startswith("A/") and k.endswith("eigvecs")) == sorted(
        f"A/{g}/eigvecs" for g in [attn + "q_proj", attn + "o_proj", mlp + "gate_proj", mlp + "down_proj"])


def test_model_state_is_untouched(model):
    params = dict(model.named_parameters())
    frozen = params["model.layers.0.mlp.up_proj.weight"]
    marker = torch.full_like(params["model.layers.0.self_attn.q_proj.weight"], 7.0)
    params["model.layers.0.self_attn.q_proj.weight"].grad = marker.clone()
    frozen.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in params.items()}
    try:
        fit(model, batches_of(SEQS, 4), "ekfac", fisher="mc")
        assert torch.equal(params["model.layers.0.self_attn.q_proj.weight"].grad, marker)
        assert all(p.grad is None for n, p in params.items() if not n.endswith("q_proj.weight"))
        assert not frozen.requires_grad
        assert all(torch.equal(before[n], p) for n, p in params.items())
    finally:
        frozen.requires_grad_(True)
        params["model.layers.0.self_attn.q_proj.weight"].grad = None


def test_gradient_checkpointing_gives_the_same_factors():
    reference = dense_blocks(fit(tiny_llama(layers=2), batches_of(SEQS, 4), "ekfac"))
    checkpointed = tiny_llama(layers=2)
    checkpointed.activation_checkpointing_enable()
    checkpointed.train()  # Hugging Face checkpoints in train mode only (dropout is 0 in this config)
    assert_blocks_close(dense_blocks(fit(checkpointed, batches_of(SEQS, 4), "ekfac")), reference, rtol=1e-9)


def test_bf16_model_fits_finite_fp32_factors(tokenizer):
    model = make_tiny_llama(tokenizer, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, len(tokenizer), (4, 12), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    curv = fit_curvature(model, [batch], CurvatureConfig(estimator="ekfac", fisher="mc"))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in curv.tensors.values())
    grads = {n: torch.randn(p.shape, generator=g).to(torch.bfloat16)
             for n, p in model.named_parameters() if n in curv.param_names}
    out = curv.precondition(grads)
    assert all(v.dtype == torch.bfloat16 and torch.isfinite(v).all() for v in out.values())
