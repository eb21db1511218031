"""Independent float64 references for the curvature tests (exact GGN via torch.func, measured KL), tiny models
and batches, and a test that the reference GGN is the second-order term of the mean per-token KL."""

from __future__ import annotations

import warnings

import torch
from torch.func import functional_call, jacrev
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

VOCAB = 24


def tiny_llama(seed: int = 0, vocab: int = VOCAB, hidden: int = 8, layers: int = 1, bias: bool = False,
               dtype=torch.float64) -> LlamaForCausalLM:
    """A random Llama small enough for dense GGN blocks (hidden 8, MLP 16, vocab 24)."""
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                      attention_bias=bias, mlp_bias=bias)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    for module in model.modules():  # HF's RMSNorm computes in fp32: keep fp64 end to end for tight tolerances
        if isinstance(module, LlamaRMSNorm):
            module.forward = _rms_norm_in_input_dtype.__get__(module)
    with torch.no_grad():  # random init has near-uniform softmax; sharpen it so H is far from degenerate
        model.lm_head.weight.mul_(20)
    return model


def _rms_norm_in_input_dtype(self, x: torch.Tensor) -> torch.Tensor:
    return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def qa_sequences(n: int, seed: int, vocab: int = VOCAB, min_len: int = 3, max_len: int = 7) -> list[dict]:
    """``n`` unpadded sequences: random ids, a random-length prompt with label −100, the rest labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (), generator=g))
        ids = torch.randint(1, vocab, (length,), generator=g)
        prompt = int(torch.randint(1, length, (), generator=g))
        labels = ids.clone()
        labels[:prompt] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def collate(seqs: list[dict], width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad with id 0 (label −100, attention 0)."""
    width = width or max(len(s["input_ids"]) for s in seqs)
    batch = {"input_ids": torch.zeros(len(seqs), width, dtype=torch.long),
             "attention_mask": torch.zeros(len(seqs), width, dtype=torch.long),
             "labels": torch.full((len(seqs), width), -100, dtype=torch.long)}
    for i, s in enumerate(seqs):
        n = len(s["input_ids"])
        batch["input_ids"][i, :n], batch["labels"][i, :n], batch["attention_mask"][i, :n] = (
            s["input_ids"], s["labels"], 1)
    return batch


def batches_of(seqs: list[dict], size: int) -> list[dict[str, torch.Tensor]]:
    return [collate(seqs[i : i + size]) for i in range(0, len(seqs), size)]


def label_logits(model, batch, params=None) -> torch.Tensor:
    """Logits (N, V) at the positions that predict a label token (HF shift)."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    out = model(**kwargs) if params is None else functional_call(model, params, (), kwargs)
    return out.logits[:, :-1][batch["labels"][:, 1:] != -100]


def augmented_names(model, layer: str) -> list[str]:
    names = dict(model.named_parameters())
    return [n for n in (f"{layer}.weight", f"{layer}.bias") if n in names]


def exact_ggn_blocks(model, batches, layers: list[str]) -> dict[str, torch.Tensor]:
    """Dense (1/N_tok) Σ_t J_tᵀ (diag p − ppᵀ) J_t per layer over vec([W | b]) (row-major), by torch.func."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    blocks = {layer: 0 for layer in layers}
    n_tok = 0
    for batch in batches:
        covered = {n: params[n] for layer in layers for n in augmented_names(model, layer)}
        with warnings.catch_warnings():  # vmap's "performance drop" fallback for the attention backward
            warnings.simplefilter("ignore", UserWarning)
            jac = jacrev(lambda sub, b=batch: label_logits(model, b, {**params, **sub}))(covered)
        p = torch.softmax(label_logits(model, batch), -1).detach()
        h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        n_tok += len(p)
        for layer in layers:
            parts = [jac[n] if n.endswith("weight") else jac[n][..., None] for n in augmented_names(model, layer)]
            j = torch.cat(parts, dim=-1).flatten(2)  # (N, V, out·in')
            blocks[layer] = blocks[layer] + torch.einsum("nvd,nvw,nwe->de", j, h, j)
    return {layer: b / n_tok for layer, b in blocks.items()}


def mean_token_kl(model, batches, delta: dict[str, torch.Tensor]) -> float:
    """Measured mean per-token KL(p_θ ‖ p_θ+Δ) over the label tokens of ``batches``."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    moved = {n: p + delta[n] if n in delta else p for n, p in params.items()}
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logp = torch.log_softmax(label_logits(model, batch, params), -1)
            logq = torch.log_softmax(label_logits(model, batch, moved), -1)
            total += float((logp.exp() * (logp - logq)).sum())
            count += len(logp)
    return total / count


def linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


def test_reference_ggn_block_is_the_second_order_term_of_the_kl():
    """For Δ on one layer, ½ΔᵀGΔ = KL(p_θ ‖ p_θ+Δ) + O(Δ³); the ±Δ average cancels the cubic term."""
    model = tiny_llama(bias=True)
    batches = batches_of(qa_sequences(4, seed=1), 2)
    params = dict(model.named_parameters())
    layers = linear_names(model)
    blocks = exact_ggn_blocks(model, batches, layers)
    g = torch.Generator().manual_seed(0)
    for layer in layers:
        weight, bias = augmented_names(model, layer)
        vec = torch.randn(blocks[layer].shape[0], generator=g, dtype=torch.float64) * 1e-4
        mat = vec.view(params[weight].shape[0], -1)
        delta = {weight: mat[:, :-1], bias: mat[:, -1]}
        kl = (mean_token_kl(model, batches, delta) + mean_token_kl(model, batches, {k: -v for k, v in delta.items()}))
        quad = 0.5 * float(vec @ blocks[layer] @ vec)
        assert quad > 0
        assert abs(kl / 2 - quad) / quad < 1e-2, layer


def dense_block(curv, spec) -> torch.Tensor:
    """The curvature's block as a dense (out·in')² matrix, rebuilt from its basis and eigenvalues."""
    eigvals = curv.eigenvalues(spec).flatten().to(torch.float64)
    basis = curv.basis(spec.name)
    if basis is None:
        return torch.diag(eigvals)
    q = torch.kron(basis[0], basis[1]).to(torch.float64)
    return q @ torch.diag(eigvals) @ q.T


def dense_blocks(curv) -> dict[str, torch.Tensor]:
    return {spec.name: dense_block(curv, spec) for spec in curv.layers}


def assert_blocks_close(got: dict, want: dict, rtol: float) -> None:
    """Per layer ‖got − want‖ ≤ rtol·max(‖want‖, largest block norm·1e-6) (zero blocks allowed)."""
    scale = max(float(w.norm()) for w in want.values())
    for name, w in want.items():
        err = float((got[name] - w).norm())
        assert err <= rtol * max(float(w.norm()), 1e-6 * scale), (name, err, float(w.norm()))
