"""Unlearning costs measured side by side in one run, as ratios:

1. a direct K-FADE step (cached curvature) ÷ one gradient-ascent epoch over the same forget set (goal ≤ 1.2×);
2. one exact Gauss-Newton product G·v over the fitting batches ÷ one forward+backward over the same batches, per
   product mode (goal ≤ 2.5× without retained graphs, ≤ 1.3× with them);
3. (``--matched``) the default K-FADE run ÷ a default mini GradDiff run stopped at the same forget P̄
   (``target_forget_prob``, 0.38 by default), on the trained mini-TOFU models of each regime (``scratch``:
   experiment=mini_tofu; ``pretrained``: experiment=mini_tofu_pretrained; built or taken from the cache). The
   cached-fit cost — the curvature fit on the default fitting set, paid once per model and fitting set — is
   reported separately; the run times use the cached fit. One thread.

Model of 1–2: a random-init tiny Llama (TinyLlamaSpec defaults: hidden 128, MLP 512, 4 layers) with a 1024-token
vocabulary. Forget set: 64 QA-like rows of random tokens (16 prompt tokens, 24 answer tokens); the curvature is
fit on 256 such retain rows. Method timings are whole ``run`` calls (each includes its retain-KL probe and the
final forget-loss evaluation).

    python benchmarks/bench_unlearn.py [--repeats 5] [--steps 1] [--matched scratch pretrained] [--target 0.38]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from transformers import LlamaConfig, LlamaForCausalLM

from kfade.curvature import CurvatureConfig
from kfade.curvature.ggn import GaussNewton
from kfade.data.formatting import IGNORE_INDEX, batched
from kfade.models.tiny import TinyLlamaSpec
from kfade.pipeline import load_config
from kfade.pipeline.console import method_knobs
from kfade.pipeline.plan import planned_curvature, planned_method
from kfade.suites import build_suite
from kfade.unlearn import UnlearnData, build_method
from kfade.unlearn.losses import forget_gradient, mean_answer_prob

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = {"scratch": "mini_tofu", "pretrained": "mini_tofu_pretrained"}

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
    parser.add_argument("--matched", nargs="*", choices=sorted(EXPERIMENTS), default=None,
                        help="only the matched-P̄ comparison, in these regimes (none given: both)")
    parser.add_argument("--target", type=float, default=0.38, help="forget P̄ both methods stop at (--matched)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.matched is not None:
        for regime in args.matched or sorted(EXPERIMENTS, reverse=True):
            matched_cost(regime, args.target, args.repeats)
        return

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


def configured(regime: str, target: float) -> tuple[dict, object, object]:
    """The regime's configs as a default run builds them (``kfade.pipeline.job.build``): the typed model/dataset/eval
    configs, and the default K-FADE (memory-planned: curvature placement, retained graphs) and mini GradDiff, both
    stopping at ``target``."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        overrides = [f"experiment={EXPERIMENTS[regime]}", f"method.target_forget_prob={target}", "logger=none"]
        config = load_config(compose("config", overrides))
        grad_diff = load_config(compose("config", [*overrides, "method=mini/grad_diff"])).method
    configs = {"model": config.model, "dataset": config.dataset, "eval": config.eval}
    return configs, (planned_method(config), planned_curvature(config)), grad_diff


def matched_cost(regime: str, target: float, repeats: int) -> None:
    """Default K-FADE ÷ GradDiff, both stopped at forget P̄ ``target`` on the regime's trained reference model."""
    configs, (kfade_cfg, curvature), grad_diff_cfg = configured(regime, target)
    suite, _ = build_suite(configs["model"], configs["dataset"], configs["eval"], progress=False)
    data = suite.unlearn_data()
    times: dict[str, list[float]] = {"kfade": [], "grad_diff": []}
    probs, fit = {}, None
    with tempfile.TemporaryDirectory() as cache:
        methods = {"kfade": build_method("kfade", kfade_cfg, curvature=curvature, cache_root=cache),
                   "grad_diff": build_method("grad_diff", grad_diff_cfg)}
        for _ in range(repeats):  # interleaved; the first K-FADE run fits the curvature (timed apart: fit_s)
            for name, method in methods.items():
                model = copy.deepcopy(suite.reference)
                method.run(model, data)
                times[name].append(method.timings["unlearn_s"])
                probs[name] = mean_answer_prob(model, data.forget)
                fit = fit if fit is not None or name != "kfade" else method.timings["fit_s"]
    kfade_s, grad_diff_s = (statistics.median(times[n]) for n in ("kfade", "grad_diff"))
    print(f"\n[{regime}] forget P̄ {mean_answer_prob(suite.reference, data.forget):.3f} → target {target} "
          f"(reached: K-FADE {probs['kfade']:.3f}, GradDiff {probs['grad_diff']:.3f}); fitting set "
          f"{len(data.fit)} batches ({configs['dataset'].fit_set_names()})")
    print(f"[{regime}] curvature fit (EK-FAC, once per model and fitting set, then cached): {fit:.2f} s")
    damping, mode = curvature.damping_of(kfade_cfg.damping, kfade_cfg.damping_mode)
    graphs = ", graphs retained" if kfade_cfg.cg_retain_graphs else ""
    print(f"[{regime}] K-FADE default run ({method_knobs(kfade_cfg)}, {mode} damping {damping:g}{graphs}): "
          f"{kfade_s:.2f} s; "
          f"GradDiff run (lr {grad_diff_cfg.lr:g}): {grad_diff_s:.2f} s (medians of {repeats})")
    print(f"[{regime}] ratio K-FADE / GradDiff at the same P̄: {kfade_s / grad_diff_s:.2f}x (goal <= 5x, 3x); "
          f"with the fit: {(kfade_s + fit) / grad_diff_s:.2f}x")


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
