"""Curvature fit cost as a ratio to a plain forward+backward over the same batches (one run, one machine).

    python benchmarks/bench_curvature.py [--quick]

Random-init Llama 128/512 × 4 layers, vocab 2048, 512 sequences × 32 tokens, batch 16 (``--quick``: 64
sequences). Prints K-FAC (incl. eigh), EK-FAC and diagonal fit times over forward+backward, eigh of all
factors in fp32 and fp64, the stored EK-FAC bytes, and the analytic fp32 memory of Llama-2-7B K-FAC factors
with and without shared activation factors. Goals: K-FAC ≤ 1.6×, EK-FAC ≤ 3.0×.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kfade.curvature import CurvatureConfig, fit_curvature

LLAMA2_7B = {"hidden": 4096, "intermediate": 11008, "layers": 32}


def make_model(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def make_batches(n_seq: int, length: int, batch: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (n_seq, length), generator=g)
    return [{"input_ids": ids[i : i + batch], "attention_mask": torch.ones_like(ids[i : i + batch]),
             "labels": ids[i : i + batch]} for i in range(0, n_seq, batch)]


def forward_backward(model, batches) -> float:
    start = time.perf_counter()
    for b in batches:
        model(**b).loss.backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def timed_fit(model, batches, estimator: str):
    start = time.perf_counter()
    curv = fit_curvature(model, batches, CurvatureConfig(estimator=estimator, fisher="mc"))
    return time.perf_counter() - start, curv


def eigh_seconds(curv, dtype: torch.dtype) -> float:
    """eigh of every stored factor (rebuilt as Q diag(λ) Qᵀ), in ``dtype``."""
    factors = [(q * curv.tensors[k.replace("eigvecs", "eigvals")]) @ q.T
               for k, q in curv.tensors.items() if k.endswith("eigvecs")]
    factors = [f.to(dtype) for f in factors]
    start = time.perf_counter()
    for f in factors:
        torch.linalg.eigh(f)
    return time.perf_counter() - start


def unshared_layout_bytes(curv) -> int:
    """fp32 bytes of a per-module layout (kronfluence's on-disk EK-FAC: A and S covariances, their eigenvectors
    and eigenvalues, and the corrected eigenvalues), for the same layers — an analytic estimate, not a run."""
    floats = sum(2 * (s.in_features**2 + s.out_features**2) + s.in_features + s.out_features
                 + s.in_features * s.out_features for s in curv.layers)
    return 4 * floats


def kfac_7b_gigabytes(shared: bool) -> float:
    """fp32 GB of the A and S factors of Llama-2-7B's decoder linears (q,k,v,o,gate,up,down per layer)."""
    h, m, n = LLAMA2_7B["hidden"], LLAMA2_7B["intermediate"], LLAMA2_7B["layers"]
    a_inputs = [h, h, h, h, h, h, m] if not shared else [h, h, h, m]  # q,k,v | o | gate,up | down
    s_outputs = [h, h, h, h, m, m, h]
    floats = n * (sum(d * d for d in a_inputs) + sum(d * d for d in s_outputs))
    return floats * 4 / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 sequences instead of 512")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    vocab, n_seq = 2048, 64 if args.quick else 512
    model, batches = make_model(vocab), make_batches(n_seq, 32, 16, vocab)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {n_seq} sequences × 32 tokens, batch 16")
    forward_backward(model, batches[:2])  # warm-up
    base = forward_backward(model, batches)
    results = {}
    for estimator in ["kfac", "ekfac", "diagonal"]:
        results[estimator] = timed_fit(model, batches, estimator)
    base = (base + forward_backward(model, batches)) / 2  # before/after average: the machine's drift
    print(f"forward+backward: {base:.2f} s")
    for estimator, (seconds, _) in results.items():
        print(f"{estimator:>8} fit: {seconds:.2f} s = {seconds / base:.2f}× forward+backward")
    kfac = results["kfac"][1]
    print(f"eigh of all K-FAC factors: {eigh_seconds(kfac, torch.float32):.3f} s fp32, "
          f"{eigh_seconds(kfac, torch.float64):.3f} s fp64")
    with tempfile.TemporaryDirectory() as tmp:
        results["ekfac"][1].save(Path(tmp) / "ekfac")
        stored = sum(f.stat().st_size for f in (Path(tmp) / "ekfac").iterdir())
    params = sum(p.numel() for n, p in model.named_parameters() if n in kfac.param_names)
    per_module = unshared_layout_bytes(kfac)
    print(f"stored EK-FAC: {stored / 1e6:.2f} MB ({stored / (4 * params):.2f}× the covered fp32 weights; "
          f"{stored / per_module:.2f}× a per-module covariances+eigenvectors+eigenvalues+correction layout, "
          f"{per_module / 1e6:.1f} MB analytic)")
    print(f"Llama-2-7B K-FAC factors (fp32): {kfac_7b_gigabytes(False):.1f} GB per-module A, "
          f"{kfac_7b_gigabytes(True):.1f} GB with shared activation factors")


if __name__ == "__main__":
    main()
