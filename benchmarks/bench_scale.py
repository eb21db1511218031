"""CPU-scale check of the paper-scale code paths: a random-weight ~100M-parameter Llama (from a config, no
download) fitted with forced offload and layer groups, and the same fit data-parallel under torchrun (gloo).

    python benchmarks/bench_scale.py [--estimator kfac] [--offload cpu] [--layer-groups 4] [--batches 4]
    torchrun --nproc_per_node=2 benchmarks/bench_scale.py --offload cpu --layer-groups 4

Prints the peak resident memory measured (``resource.getrusage`` ru_maxrss, the process high-water mark) above the
interpreter + torch baseline measured before the model is built, next to the dry-run plan of the same fit
(``kfade.plan.plan_memory``: its largest fit-phase total in host memory, item by item), and the fit time.
Under torchrun each rank fits its shard of the batches; rank 0 prints, and with ``--compare``
(single process) the script also runs the plain in-memory fit and checks bit-equality.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kfade import distributed
from kfade.curvature import CurvatureConfig, fit_curvature
from kfade.plan import GB, Item, Placement, Workload, architecture, plan_memory

# ~106M parameters: 2 × 24.6M embeddings (untied), 8 blocks × 7.1M.
CONFIG = {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8,
          "num_attention_heads": 12, "num_key_value_heads": 12, "max_position_embeddings": 512,
          "tie_word_embeddings": False}
FIT_PHASES = ("fit", "correction")  # the plan's phases of a curvature fit (factor pass + eigh; EK-FAC correction)


def rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()


def synthetic_batches(n: int, batch_size: int, length: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (batch_size, length), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def planned_fit(cfg: CurvatureConfig, batch_size: int, length: int) -> tuple[int, list[Item]]:
    """The dry-run plan (``kfade.plan``) of this fit on the CPU: ``(peak host bytes over the fit's phases, the
    items held then)``. One fp32 model, no step, the bench's placement (offload, layer groups, fp32 factors);
    one output-gradient signal per token (empirical Fisher)."""
    arch = architecture(LlamaConfig(**CONFIG), cfg.modules)
    work = Workload(method="kfade", estimator=cfg.estimator, model_dtype="float32", device="cpu",
                    batch_size=batch_size, max_length=length, weight_copies=("model",), host_weight_copies=())
    plan = plan_memory(arch, work, Placement(cfg.factor_dtype, cfg.offload, cfg.offload_dir, cfg.layer_groups))
    phase = max(FIT_PHASES, key=lambda ph: plan.total("cpu", ph))
    return plan.total("cpu", phase), [i for i in plan.items if phase in i.phases and i.where != "disk"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--estimator", default="kfac", choices=["kfac", "ekfac"])
    parser.add_argument("--offload", default="cpu", choices=["none", "cpu", "disk"])
    parser.add_argument("--layer-groups", type=int, default=4)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compare", action="store_true", help="also fit in memory, one group, and compare")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    distributed.init_from_env()
    baseline = rss_bytes()
    model = make_model()
    cfg = CurvatureConfig(estimator=args.estimator, fisher="empirical", offload=args.offload,
                          layer_groups=args.layer_groups)
    batches = synthetic_batches(args.batches, args.batch_size, args.length, CONFIG["vocab_size"])
    after_model = rss_bytes()
    start = time.perf_counter()
    curvature = fit_curvature(model, distributed.shard(batches), cfg)
    fit_s = time.perf_counter() - start
    peak = rss_bytes()
    if distributed.is_main():
        params = sum(p.numel() for p in model.parameters())
        print(f"model: random Llama {params / 1e6:.1f}M parameters, {len(curvature.layers)} covered layers; "
              f"{args.batches} batches × {args.batch_size} × {args.length} tokens; world size "
              f"{distributed.world_size()}")
        print(f"fit: {args.estimator}, offload={args.offload}, layer_groups={args.layer_groups}: {fit_s:.1f} s "
              f"({curvature.n_tokens} label tokens over all ranks)")
        planned, items = planned_fit(cfg, args.batch_size, args.length)
        print("dry-run plan of this fit (kfade.plan, host memory above the interpreter):")
        for item in items:
            print(f"  {item.nbytes / GB:8.3f} GB  {item.name}")
        above = peak - baseline
        print(f"measured peak RSS: {peak / GB:.3f} GB (interpreter+torch baseline {baseline / GB:.3f} GB, after the "
              f"model {after_model / GB:.3f} GB); above baseline {above / GB:.3f} GB vs planned "
              f"{planned / GB:.3f} GB (measured/planned {above / planned:.2f})")
    if args.compare and distributed.world_size() == 1:
        plain = fit_curvature(model, batches, CurvatureConfig(estimator=args.estimator, fisher="empirical"))
        equal = all(torch.equal(plain.tensors[k], curvature.tensors[k]) for k in plain.tensors)
        print(f"in-memory single-group fit bit-equal to the offloaded grouped fit: {equal}")
    if distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
