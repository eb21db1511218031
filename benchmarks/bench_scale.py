"""CPU-scale check of the paper-scale code paths: a random-weight ~100M-parameter Llama (from a config, no
download) fitted with forced offload and layer groups, and the same fit data-parallel under torchrun (gloo).

    python benchmarks/bench_scale.py [--estimator kfac] [--offload cpu] [--layer-groups 4] [--batches 4]
    torchrun --nproc_per_node=2 benchmarks/bench_scale.py --offload cpu --layer-groups 4

Prints the peak resident memory measured (``resource.getrusage`` ru_maxrss, the process high-water mark, with the
interpreter + torch baseline measured before the model exists) next to the bytes expected from the layer shapes
(``expected_bytes``: weights, factor sums of one layer group, finished factors, eigendecomposition workspace),
and the fit time. Under torchrun each rank fits its shard of the batches; rank 0 prints, and with ``--compare``
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
from kfade.curvature.fit import layer_groups
from kfade.curvature.layers import LayerSpec, select_layers

# ~106M parameters: 2 × 24.6M embeddings (untied), 8 blocks × 7.1M.
CONFIG = {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8,
          "num_attention_heads": 12, "num_key_value_heads": 12, "max_position_embeddings": 512,
          "tie_word_embeddings": False}
GB = 1e9


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


def expected_bytes(model: torch.nn.Module, cfg: CurvatureConfig, groups: dict[str, str], batch_size: int,
                   length: int, dtype_bytes: int = 4) -> dict[str, int]:
    """Bytes implied by the layer shapes (fp32), with ``groups`` (layer → its activation group: q/k/v and
    gate/up read one input, whose factor A is stored once):

    - ``weights``: every parameter; ``gradients``: the covered weights' gradient (the forget gradient's size);
    - ``factors``: finished K-FAC factors A (in'², once per group) + S (out²) + their eigenvalues; EK-FAC adds
      Λ* (out·in');
    - ``group_sums``: the running factor sums of the largest layer group (what ``layer_groups`` bounds);
    - ``eigh_workspace``: the largest factor n² five times in fp64 (the fp64 copy, its symmetrised copy, the
      eigenvectors, LAPACK's workspace ≈ n², the stored copy);
    - ``activations``: one batch's forward/backward: 5 vocabulary-wide fp32 tensors per token (logits, label
      logits, softmax, the backward signal, the logits' gradient) and per decoder layer the tensors autograd
      keeps (≈ 12 hidden-wide and 5 MLP-wide per token, attention probabilities and their gradient per head).
    """
    layers = select_layers(model, cfg.modules)
    width = {spec.name: spec.in_features for spec in layers}
    weights = sum(p.numel() for p in model.parameters()) * dtype_bytes
    gradients = sum(s.out_features * s.in_features for s in layers) * dtype_bytes

    def factor_elems(specs: list[LayerSpec]) -> tuple[int, int]:
        heads = {groups[s.name] for s in specs}
        squares = sum(width[h] ** 2 for h in heads) + sum(s.out_features ** 2 for s in specs)
        return squares, sum(width[h] for h in heads) + sum(s.out_features for s in specs)

    squares, diagonals = factor_elems(layers)
    factors = squares + diagonals + (sum(s.out_features * s.in_features for s in layers)
                                     if cfg.estimator == "ekfac" else 0)
    group_sums = max(factor_elems(g)[0] for g in layer_groups(layers, cfg.layer_groups))
    largest = max(max(s.out_features, s.in_features) for s in layers)
    c = model.config
    tokens = batch_size * length
    attention = 2 * batch_size * c.num_attention_heads * length**2
    per_layer = tokens * (12 * c.hidden_size + 5 * c.intermediate_size) + attention
    activations = (5 * tokens * c.vocab_size + c.num_hidden_layers * per_layer) * dtype_bytes
    return {"weights": weights, "gradients": gradients, "factors": factors * dtype_bytes,
            "group_sums": group_sums * dtype_bytes, "eigh_workspace": 5 * largest * largest * 8,
            "activations": activations}


def peak_plan(expected: dict[str, int], offload: str) -> int:
    """Planned peak host memory of a CPU fit above the interpreter: the weights, plus the larger of the two
    phases — a pass over the data (one batch's activations + what is resident: every finished factor and the
    group's sums, i.e. about the factors in total, unless ``disk`` keeps only the group's sums) and an
    eigendecomposition (resident + ``eigh_workspace``)."""
    resident = expected["group_sums"] if offload == "disk" else expected["factors"]
    return expected["weights"] + resident + max(expected["activations"], expected["eigh_workspace"])


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
    expected = expected_bytes(model, cfg, curvature.groups, args.batch_size, args.length)
    if distributed.is_main():
        params = sum(p.numel() for p in model.parameters())
        print(f"model: random Llama {params / 1e6:.1f}M parameters, {len(curvature.layers)} covered layers; "
              f"{args.batches} batches × {args.batch_size} × {args.length} tokens; world size "
              f"{distributed.world_size()}")
        print(f"fit: {args.estimator}, offload={args.offload}, layer_groups={args.layer_groups}: {fit_s:.1f} s "
              f"({curvature.n_tokens} label tokens over all ranks)")
        print("expected bytes (from the layer shapes, fp32):")
        for name, value in expected.items():
            print(f"  {name:15s} {value / GB:8.3f} GB")
        planned = peak_plan(expected, args.offload)
        print(f"measured peak RSS: {peak / GB:.3f} GB (interpreter+torch baseline {baseline / GB:.3f} GB, after the "
              f"model {after_model / GB:.3f} GB); above baseline {(peak - baseline) / GB:.3f} GB vs planned "
              f"{planned / GB:.3f} GB (measured/planned {(peak - baseline) / planned:.2f})")
    if args.compare and distributed.world_size() == 1:
        plain = fit_curvature(model, batches, CurvatureConfig(estimator=args.estimator, fisher="empirical"))
        equal = all(torch.equal(plain.tensors[k], curvature.tensors[k]) for k in plain.tensors)
        print(f"in-memory single-group fit bit-equal to the offloaded grouped fit: {equal}")
    if distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
