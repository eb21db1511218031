"""Unlearning costs measured side by side in one run, as ratios:

1. a direct K-FADE step (cached curvature) ÷ one gradient-ascent epoch over the same forget set (goal ≤ 1.2×);
2. one exact Gauss-Newton product G·v over the fitting batches ÷ one forward+backward over the same batches, per
   product mode (goal ≤ 2.5× without retained graphs, ≤ 1.3× with them);
3. a default CG K-FADE run (n_steps × cg_iters products + preconditioning, cached curvature) ÷ one default mini
   GradDiff run (AdamW, 5 epochs over the forget set with retain companions), also per step.

Model: a random-init tiny Llama (TinyLlamaSpec defaults: hidden 128, MLP 512, 4 layers) with a 1024-token
vocabulary. Forget set: 64 QA-like rows of random tokens (16 prompt tokens, 24 answer tokens); the curvature is
fit on 256 such retain rows. Method timings are whole ``run`` calls (each includes its retain-KL probe and the
final forget-loss evaluation); K-FADE steps are normalized ones (a random model's forget P̄ is ~1/vocab, so the
default target_forget search is not timed here: it adds one forward over the forget set per evaluation, 6–10 per
step on mini-TOFU).

    python benchmarks/bench_unlearn.py [--repeats 5] [--steps 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from dataclasses import asdict

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kfade.curvature import CurvatureConfig
from kfade.curvature.ggn import GaussNewton
from kfade.data.formatting import IGNORE_INDEX, batched
from kfade.models.tiny import TinyLlamaSpec
from kfade.unlearn import UnlearnData, build_method
from kfade.unlearn.losses import forget_gradient

VOCAB, PROMPT, ANSWER, BATCH = 1024, 16, 24, 16


def random_qa(rows: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    features = []
    for _ in range(rows):
        ids = torch.randint(4, VOCAB, (PROMPT + ANSWER,), generator=generator).tolist()
        features.append({"input_ids": ids, "labels": [IGNORE_INDEX] * PROMPT + ids[PROMPT:]})
    return batched(features, BATCH, pad_token_id=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method (median reported)")
    parser.add_argument("--steps", type=int, default=1, help="K-FADE steps per run (time reported per step)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, pad_token_id=0, **asdict(TinyLlamaSpec()))).eval()
    data = UnlearnData(forget=random_qa(64, seed=1), retain=random_qa(256, seed=2))
    curvature = CurvatureConfig(estimator="ekfac", fisher="mc", damping=0.1, damping_mode="relative")
    with tempfile.TemporaryDirectory() as cache:
        direct = {"solver": "direct", "step_rule": "normalized", "step_size": 1.0, "n_steps": args.steps}
        kfade = build_method("kfade", direct, curvature=curvature, cache_root=cache)
        kfade.run(copy.deepcopy(model), data)  # fits and caches the curvature
        print(f"curvature fit (EK-FAC, MC Fisher, {len(data.fit)} batches): {kfade.timings['fit_s']:.2f} s")
        ascent = build_method("grad_ascent", {"epochs": 1, "lr": 1e-5})
        step, epoch = median_run_times([kfade, ascent], model, data, args.repeats)
        step /= args.steps
        print(f"cached curvature load:                 {kfade.timings['fit_s']:.3f} s")
        print(f"K-FADE direct step (cached curvature): {step:.3f} s  (median of {args.repeats})")
        print(f"gradient-ascent epoch ({len(data.forget)} batches):     {epoch:.3f} s  (median of {args.repeats})")
        print(f"ratio K-FADE direct step / GA epoch:   {step / epoch:.2f}x  (goal <= 1.2x)\n")
        ggn_products(model, data, args.repeats)
        cg = build_method("kfade", {"step_rule": "normalized", "step_size": 1.0}, curvature=curvature,
                          cache_root=cache)
        cg_step, diff_run = median_run_times([cg, build_method("grad_diff", {"lr": 3e-4})], model, data, args.repeats)
    steps = f"{cg.cfg.n_steps} steps x {cg.cfg.cg_iters} PCG iterations"
    print(f"\nK-FADE CG run, default ({steps}): {cg_step:.3f} s  (median of {args.repeats})")
    print(f"GradDiff run (5 epochs, lr 3e-4):      {diff_run:.3f} s  (median of {args.repeats})")
    print(f"ratio K-FADE CG run / GradDiff run:    {cg_step / diff_run:.2f}x  "
          f"(per CG step: {cg_step / cg.cfg.n_steps / diff_run:.2f}x)")


def median_run_times(methods: list, model: torch.nn.Module, data: UnlearnData, repeats: int) -> list[float]:
    """Median ``timings["unlearn_s"]`` of each method's ``run`` on fresh copies of ``model`` (interleaved)."""
    times: list[list[float]] = [[] for _ in methods]
    for _ in range(repeats):
        for method, measured in zip(methods, times, strict=True):
            method.run(copy.deepcopy(model), data)
            measured.append(method.timings["unlearn_s"])
    return [statistics.median(t) for t in times]


def ggn_products(model: torch.nn.Module, data: UnlearnData, repeats: int) -> None:
    """One G·v over the fitting batches per mode ÷ one forward+backward (forget_gradient) over the same batches."""
    names = [n for n, _ in model.named_parameters() if ".layers." in n and n.endswith("proj.weight")]
    params = dict(model.named_parameters())
    v = {n: torch.randn_like(params[n]) for n in names}

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    base = statistics.median(timed(lambda: forget_gradient(model, data.fit, names)) for _ in range(repeats))
    tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in data.fit)
    print(f"forward+backward over {len(data.fit)} fitting batches ({tokens} label tokens): {base:.3f} s")
    modes = (("forward", False, 2.5), ("double_backward", False, 2.5), ("double_backward", True, 1.3))
    for mode, retain, goal in modes:
        op = GaussNewton(model, data.fit, names, mode=mode, retain_graphs=retain)
        first = timed(lambda op=op: op(v))  # builds the graphs when they are retained
        product = statistics.median(timed(lambda op=op: op(v)) for _ in range(repeats))
        label = f"{mode}{', graphs retained' if retain else ''}"
        print(f"GGN product, {label:32s} {product:.3f} s = {product / base:.2f}x forward+backward "
              f"(goal <= {goal}x; first product {first / base:.2f}x)")

if __name__ == "__main__":
    main()
