"""The prepared GPU check (``benchmarks/gpu_check.sh``): a random-weight ~1B Llama in bf16 on synthetic tokens.

Prints, measured in one run:
- forward+backward throughput (tokens/s) over the fitting batches;
- EK-FAC fit (MC Fisher, two passes + fp64 eigh) ÷ one forward+backward over the same batches;
- one exact Gauss-Newton product G·v over the same batches ÷ that forward+backward;
- one direct and one CG K-FADE step (fixed η, 1 step; CG: ``--cg-iters`` PCG iterations, products on
  ``--cg-batches`` batches), wall time each, with the cached curvature;
- the peak accelerator memory (host RSS on the CPU) against the dry-run plan of the same workload (``kfade.plan``);
- the bf16-vs-fp32 relative error of the factors: the fp32 eigenvectors vs the same cast to bf16 after the fp64
  eigh (what ``curvature.factor_dtype=bfloat16`` stores), and of the direct step's direction computed from them;
- one CG solve with the PCG vectors in fp32, bf16 (``method.cg_dtype``) and host memory (``method.cg_offload``):
  time, peak accelerator memory of the solve, and the direction's error against fp32;
- with more than one GPU, the FSDP check (``gpu_check_fsdp.py`` on every GPU: sharded fit, product and steps);
  on one GPU a line says it is skipped.

    python benchmarks/gpu_check.py            # the ~1B model (22 layers, hidden 2048, MLP 5632, 32k vocab) on CUDA
    python benchmarks/gpu_check.py --tiny     # seconds on a CPU: the same code paths on a 2-layer model
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kfade.curvature import Curvature, CurvatureConfig, fit_curvature
from kfade.curvature.config import DEFAULT_MODULES
from kfade.curvature.ggn import GaussNewton
from kfade.plan import GB, Placement, Workload, architecture, plan_memory
from kfade.unlearn import UnlearnData, apply_delta, build_method
from kfade.unlearn.losses import forget_gradient

SIZES = {  # TinyLlama-1.1B's shape (1.10B parameters) and a CPU-sized one with the same structure (GQA)
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}


def synthetic(n: int, batch: int, length: int, vocab: int, seed: int, device: str) -> list[dict]:
    """``n`` batches of random tokens; every position after the first is a label (a corpus, as in WMDP)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, length), generator=g)
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                    "labels": ids.to(device)})
    return out


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_bytes(device: str) -> float:
    if device.startswith("cuda"):
        return float(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # Linux: KiB


def bf16_errors(curv: Curvature, bf16: Curvature, grads: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(max relative Frobenius error of the eigenvectors, relative error of the direct direction) of ``bf16``, the
    same fit (same batches and MC draws) stored with ``curvature.factor_dtype=bfloat16``, against fp32 ``curv``."""
    vec_err = max(float((bf16.tensors[k].float() - t.float()).norm() / t.float().norm())
                  for k, t in curv.tensors.items() if k.endswith("eigvecs"))
    ref, low = curv.precondition(grads), bf16.precondition(grads)
    num = sum(float((low[n].float() - ref[n].float()).square().sum()) for n in ref)
    den = sum(float(ref[n].float().square().sum()) for n in ref)
    return vec_err, (num / den) ** 0.5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the CPU-sized model (seconds), for testing the script")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--batches", type=int, default=None, help="fitting batches (default 8; tiny 4)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per batch (default 4; tiny 2)")
    parser.add_argument("--length", type=int, default=None, help="tokens per sequence (default 512; tiny 32)")
    parser.add_argument("--cg-iters", type=int, default=3)
    parser.add_argument("--cg-batches", type=int, default=2)
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    size = "tiny" if args.tiny else "1b"
    n_batches = args.batches or (4 if args.tiny else 8)
    batch, length = args.batch_size or (2 if args.tiny else 4), args.length or (32 if args.tiny else 512)
    if size == "1b" and device == "cpu":
        print("error: the ~1B check needs a GPU (use --tiny on a CPU)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=max(length, 64), **SIZES[size])
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: random Llama, {n_params / 1e6:,.1f}M parameters, bf16 on {device}; {n_batches} batches of "
          f"{batch} × {length} synthetic tokens")
    fit_batches = synthetic(n_batches, batch, length, config.vocab_size, 1, device)
    forget = synthetic(2, batch, length, config.vocab_size, 2, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    names = [n for n, p in model.named_parameters() if p.ndim == 2 and ".layers." in n]
    fwd_bwd = min(timed(lambda: forget_gradient(model, fit_batches, names), device) for _ in range(2))
    tokens = n_batches * batch * (length - 1)
    print(f"forward+backward: {fwd_bwd:.3f} s for {tokens} label tokens = {tokens / fwd_bwd:,.0f} tokens/s")

    cfg = CurvatureConfig(estimator="ekfac", fisher="mc", damping=0.1, damping_mode="relative")
    fit_s = timed(lambda: globals().__setitem__("_curv", fit_curvature(model, fit_batches, cfg)), device)
    curv: Curvature = globals().pop("_curv")
    print(f"EK-FAC fit (MC Fisher, 2 passes + fp64 eigh): {fit_s:.2f} s = {fit_s / fwd_bwd:.2f}× forward+backward")
    curv_bf16 = fit_curvature(model, fit_batches, dataclasses.replace(cfg, factor_dtype="bfloat16"))

    ggn = GaussNewton(model, fit_batches, curv.param_names)
    params = dict(model.named_parameters())
    v = {n: torch.randn_like(params[n], dtype=torch.float32) for n in curv.param_names}
    product_s = timed(lambda: ggn(v), device)
    print(f"GGN product G·v ({ggn.mode}): {product_s:.3f} s = "
          f"{product_s / fwd_bwd:.2f}× forward+backward")

    data = UnlearnData(forget=forget, retain=fit_batches, fit=fit_batches)
    for solver in ("direct", "cg"):  # one step each with the fitted curvature: forget gradient, solve, apply
        step = {"solver": solver, "step_rule": "fixed", "step_size": 1e-3, "n_steps": 1,
                "cg_iters": args.cg_iters, "cg_batches": args.cg_batches}
        method = build_method("kfade", step, curvature=cfg)
        start = time.perf_counter()
        grads, _ = forget_gradient(model, forget, curv.param_names)
        direction, record = method.solver.solve(model, curv, grads, data.fit, 1)
        apply_delta(model, {n: method.cfg.step_size * d for n, d in direction.items()})
        step_s = timed(lambda: None, device) + time.perf_counter() - start
        extra = f", {record['cg_iters']} PCG iterations, residual {record['cg_residual']:.2g}" if record else ""
        print(f"K-FADE {solver} step (forget gradient + solve + update{extra}): {step_s:.2f} s")
    peak = peak_bytes(device)

    arch = architecture(config, DEFAULT_MODULES)
    work = Workload(method="kfade", estimator="ekfac", solver="cg", model_dtype="bfloat16", device=device,
                    batch_size=batch, max_length=length, weight_copies=("model",), host_weight_copies=())
    plan = plan_memory(arch, work, Placement())
    planned = plan.peak("device")
    what = "GPU memory (max allocated)" if device.startswith("cuda") else "host RSS (incl. the Python process)"
    print(f"peak {what}: {peak / GB:.3f} GB; dry-run plan of this workload: {planned / GB:.3f} GB "
          f"(measured / planned = {peak / planned:.2f})")

    grads, _ = forget_gradient(model, forget, curv.param_names)
    vec_err, dir_err = bf16_errors(curv, curv_bf16, grads)
    print(f"bf16 factors vs fp32: eigenvectors max relative error {vec_err:.2e}; direct direction relative "
          f"error {dir_err:.2e}")
    cg_vector_variants(model, curv, cfg, grads, data, args, device)
    return fsdp_check(args.tiny, device)


def fsdp_check(tiny: bool, device: str) -> int:
    """``gpu_check_fsdp.py`` under torchrun on every GPU (``--tiny``: two gloo processes on the CPU); skipped, with
    a line saying so, on a single GPU."""
    gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    if device.startswith("cuda") and gpus < 2:
        print(f"FSDP: skipped ({gpus} GPU here; it needs ≥ 2: distributed.strategy=fsdp shards over the GPUs)")
        return 0
    procs = gpus if gpus >= 2 else 2
    script = Path(__file__).with_name("gpu_check_fsdp.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               str(script)] + (["--tiny"] if tiny else [])
    return subprocess.run(command, check=False).returncode


def cg_vector_variants(model, curv: Curvature, cfg: CurvatureConfig, grads, data: UnlearnData, args,
                       device: str) -> None:
    """One CG solve with the PCG vectors in fp32, in bf16 (``cg_dtype``) and in host memory (``cg_offload``): its
    time, the peak accelerator memory of the solve, and the direction's relative error against fp32."""
    variants = {"fp32": {}, "bf16": {"cg_dtype": "bfloat16"}, "fp32 on the host": {"cg_offload": "cpu"},
                "bf16 on the host": {"cg_dtype": "bfloat16", "cg_offload": "cpu"}}
    reference = None
    for label, extra in variants.items():
        method = build_method("kfade", {"solver": "cg", "cg_iters": args.cg_iters, "cg_batches": args.cg_batches,
                                        "cg_checkpoint": False, **extra}, curvature=cfg)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        direction, _ = method.solver.solve(model, curv, grads, data.fit, 1)
        solve_s = timed(lambda: None, device) + time.perf_counter() - start
        reference = direction if reference is None else reference
        error = (sum(float((direction[n].float() - reference[n].float()).square().sum()) for n in reference)
                 / sum(float(reference[n].float().square().sum()) for n in reference)) ** 0.5
        print(f"CG solve, vectors {label}: {solve_s:.2f} s, peak memory {peak_bytes(device) / GB:.3f} GB, "
              f"direction relative error vs fp32 {error:.2e}")


if __name__ == "__main__":
    sys.exit(main())
