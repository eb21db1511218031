"""The FSDP part of the prepared GPU check (run by ``gpu_check.py`` under torchrun, one process per GPU; with
``--tiny`` two gloo processes on the CPU): the same random Llama sharded by ``fully_shard``, an EK-FAC fit with
layer-sharded factors, one exact GGN product and one direct and one CG K-FADE step on the sharded model.

Prints (rank 0): fit and product time ÷ a sharded forward+backward, each rank's share of the factor bytes, and
the peak accelerator memory per rank (host RSS on the CPU).

    torchrun --standalone --nproc_per_node=8 benchmarks/gpu_check_fsdp.py
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist
from gpu_check import SIZES, peak_bytes, synthetic, timed
from transformers import LlamaConfig, LlamaForCausalLM

from kfade import distributed, fsdp
from kfade.curvature import CurvatureConfig, fit_curvature
from kfade.curvature.sharded_ggn import gauss_newton
from kfade.plan import GB
from kfade.unlearn import UnlearnData, build_method
from kfade.unlearn.losses import forget_gradient


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batches", type=int, default=None, help="fitting batches per rank (default 2)")
    args = parser.parse_args(argv)
    distributed.init_from_env()
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    world, rank = distributed.world_size(), distributed.rank()
    size, batch, length = ("tiny", 2, 32) if args.tiny else ("1b", 4, 512)
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=max(length, 64), **SIZES[size])
    model = fsdp.shard_model(LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval())
    n = (args.batches or 2) * world
    fit_batches = synthetic(n, batch, length, config.vocab_size, 1, device)
    forget = synthetic(world, batch, length, config.vocab_size, 2, device)
    names = [name for name, p in model.named_parameters() if p.ndim == 2 and ".layers." in name]
    fwd_bwd = timed(lambda: forget_gradient(model, fit_batches, names), device)
    cfg = CurvatureConfig(estimator="ekfac", fisher="mc")
    fit_s = timed(lambda: globals().__setitem__("_curv", fit_curvature(model, fit_batches[rank::world], cfg)),
                  device)
    curv = globals().pop("_curv")
    mine = sum(t.numel() * t.element_size() for t in curv.tensors.values())
    shares = [None] * world
    dist.all_gather_object(shares, mine)
    ggn = gauss_newton(model, fit_batches, curv.param_names)
    grads, _ = forget_gradient(model, forget, curv.param_names)
    product_s = timed(lambda: ggn(grads), device)
    data = UnlearnData(forget=forget, retain=fit_batches, fit=fit_batches)
    steps = {}
    for solver in ("direct", "cg"):
        method = build_method("kfade", {"solver": solver, "step_rule": "fixed", "step_size": 1e-3, "n_steps": 1,
                                        "cg_iters": 2}, curvature=cfg)
        start = time.perf_counter()
        direction, _ = method.solver.solve(model, curv, grads, data.fit, 1)
        steps[solver] = timed(lambda: None, device) + time.perf_counter() - start
    peaks = [None] * world
    dist.all_gather_object(peaks, peak_bytes(device))
    if rank == 0:
        print(f"FSDP, {world} ranks, {sum(p.numel() for p in model.parameters()) / 1e6:,.1f}M parameters, {n} "
              f"batches of {batch} × {length}: forward+backward {fwd_bwd:.2f} s; EK-FAC fit (sharded factors) "
              f"{fit_s / fwd_bwd:.2f}×; GGN product {product_s / fwd_bwd:.2f}×; direct solve {steps['direct']:.2f} s, "
              f"CG solve (2 iterations) {steps['cg']:.2f} s")
        print("FSDP factor bytes per rank: " + ", ".join(f"{b / max(shares) * 100:.0f} %" for b in shares)
              + f" of the largest ({max(shares) / GB:.3f} GB; total {sum(shares) / GB:.3f} GB)")
        print("FSDP peak memory per rank (GB): " + ", ".join(f"{p / GB:.3f}" for p in peaks))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
