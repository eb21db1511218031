"""Curvature fit cost as a ratio to a plain forward+backward over the same batches (one run, one machine).

    python benchmarks/bench_curvature.py [--quick] [--threads N]

Random-init Llama 128/512 × 4 layers, vocab 2048, 512 sequences × 32 tokens, batch 16 (``--quick``: 64
sequences). Prints K-FAC (incl. eigh), EK-FAC and diagonal fit times over forward+backward, eigh of all
factors in fp32 and fp64, the stored EK-FAC bytes, and the analytic fp32 memory of Llama-2-7B K-FAC factors
with and without shared activation factors. Goals: K-FAC ≤ 1.6×, EK-FAC ≤ 3.0×.

Side by side, when importable (the ``bench`` extra of pyproject.toml, installed with ``pip install --no-deps``
because they require a CUDA-linked torchvision), on the same model, decoder-block linears, batches, MC Fisher:
curvlinops' ``KFACLinearOperator`` (expand, factors only) and ``EKFACLinearOperator`` (factors, eigenvectors,
eigenvalue correction), and kronfluence's ``fit_all_factors`` with strategy ``kfac`` / ``ekfac`` (its default
dtypes: fp32 covariances, fp64 eigendecomposition), plus kronfluence's on-disk EK-FAC bytes against ours.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from kfade.curvature import CurvatureConfig, fit_curvature

LLAMA2_7B = {"hidden": 4096, "intermediate": 11008, "layers": 32}
BENCH_INSTALL = ("pip install --no-deps kronfluence curvlinops-for-pytorch backpack-for-pytorch einops einconv "
                 "linear_operator opt-einsum unfoldNd")


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


class LogitsOnly(nn.Module):
    """curvlinops' view of the causal LM: ``input_ids`` → token logits flattened to (N·T, V)."""

    def __init__(self, model: LlamaForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=input_ids).logits
        return logits.reshape(-1, logits.shape[-1])


def next_token_targets(input_ids: torch.Tensor) -> torch.Tensor:
    """(N·T) next-token targets, the last position of each sequence masked with -100."""
    targets = torch.full_like(input_ids, -100)
    targets[:, :-1] = input_ids[:, 1:]
    return targets.reshape(-1)


def curvlinops_seconds(model, batches, layer_names: list[str]) -> dict[str, float]:
    """Fit time of curvlinops' K-FAC (Kronecker factors) and EK-FAC (+ eigenvectors and eigenvalue correction)."""
    from curvlinops import EKFACLinearOperator, KFACLinearOperator

    params = [model.get_submodule(name).weight for name in layer_names]
    data = [(b["input_ids"], next_token_targets(b["input_ids"])) for b in batches]
    num_data, length = sum(len(x) for x, _ in data), data[0][0].shape[1]
    seconds = {}
    for label, operator in [("K-FAC", KFACLinearOperator), ("EK-FAC", EKFACLinearOperator)]:
        start = time.perf_counter()
        op = operator(LogitsOnly(model), nn.CrossEntropyLoss(), params, data, check_deterministic=False,
                      fisher_type="mc", kfac_approx="expand", num_per_example_loss_terms=length,
                      num_data=num_data)
        op.compute_kronecker_factors()
        if isinstance(op, EKFACLinearOperator):
            op.compute_eigenvalue_correction()
        seconds[label] = time.perf_counter() - start
    return seconds


def kronfluence_fits(model, batches, layer_names: list[str]) -> tuple[dict[str, float], int]:
    """Fit time of kronfluence's K-FAC and EK-FAC factors (on a copy: it wraps the model's modules) and the
    bytes of the files its EK-FAC fit writes."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task

    class SummedTokenLoss(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch).logits[:, :-1].flatten(0, 1).float()
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(logits.softmax(-1), 1).flatten()
            else:
                labels = batch[:, 1:].flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return layer_names

    task = SummedTokenLoss()
    dataset = torch.cat([b["input_ids"] for b in batches])
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # its torch.cuda.amp.GradScaler, unused on CPU
        analyzer = Analyzer("bench", prepare_model(copy.deepcopy(model), task), task, cpu=True,
                            disable_tqdm=True, output_dir=tmp)
        for label, strategy in [("K-FAC", "kfac"), ("EK-FAC", "ekfac")]:
            start = time.perf_counter()
            analyzer.fit_all_factors(strategy, dataset, per_device_batch_size=len(batches[0]["input_ids"]),
                                     factor_args=FactorArguments(strategy=strategy))
            seconds[label] = time.perf_counter() - start
        stored = sum(f.stat().st_size for f in analyzer.factors_output_dir("ekfac").rglob("*")
                     if f.is_file())
    return seconds, stored


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
    kfac = results["kfac"][1]
    layer_names = [spec.name for spec in kfac.layers]
    others, kronfluence_stored = {}, None
    if importlib.util.find_spec("curvlinops"):
        others.update({f"curvlinops {k}": v for k, v in curvlinops_seconds(model, batches, layer_names).items()})
    if importlib.util.find_spec("kronfluence"):
        seconds, kronfluence_stored = kronfluence_fits(model, batches, layer_names)
        others.update({f"kronfluence {k}": v for k, v in seconds.items()})
    base = (base + forward_backward(model, batches)) / 2  # before/after average: the machine's drift
    print(f"forward+backward: {base:.2f} s")
    for estimator, (seconds, _) in results.items():
        print(f"{estimator:>8} fit: {seconds:.2f} s = {seconds / base:.2f}× forward+backward")
    for label, seconds in others.items():
        print(f"{label} fit: {seconds:.2f} s = {seconds / base:.2f}× forward+backward")
    for library in ["curvlinops", "kronfluence"]:
        if not importlib.util.find_spec(library):
            print(f"{library}: skipped (not installed; {BENCH_INSTALL})")
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
    if kronfluence_stored is not None:
        print(f"stored EK-FAC bytes: ours {stored / 1e6:.2f} MB vs kronfluence {kronfluence_stored / 1e6:.2f} MB "
              f"= {kronfluence_stored / stored:.2f}×")
    print(f"Llama-2-7B K-FAC factors (fp32): {kfac_7b_gigabytes(False):.1f} GB per-module A, "
          f"{kfac_7b_gigabytes(True):.1f} GB with shared activation factors")


if __name__ == "__main__":
    main()
