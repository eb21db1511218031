"""K-FADE step time (cached curvature) vs one gradient-ascent epoch over the same forget set, measured side by side.

Model: a random-init tiny Llama (TinyLlamaSpec defaults: hidden 128, MLP 512, 4 layers) with a 1024-token
vocabulary. Forget set: 64 QA-like rows of random tokens (16 prompt tokens, 24 answer tokens); the curvature is
fit on 256 such retain rows. Both timings are whole ``run`` calls (each includes its retain-KL probe and the
final forget-loss evaluation); K-FADE's curvature comes from the cache, as in a sweep, and its step is a normalized one
(a trust-region backtrack would add one retain-probe pass each). Goal: ratio ≤ 1.2.

    python benchmarks/bench_unlearn.py [--repeats 5] [--steps 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from dataclasses import asdict

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kfade.curvature import CurvatureConfig
from kfade.data.formatting import IGNORE_INDEX, batched
from kfade.models.tiny import TinyLlamaSpec
from kfade.unlearn import UnlearnData, build_method

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
        kfade = build_method("kfade", {"step_rule": "normalized", "step_size": 1.0, "n_steps": args.steps},
                             curvature=curvature, cache_root=cache)
        kfade.run(copy.deepcopy(model), data)  # fits and caches the curvature
        print(f"curvature fit (EK-FAC, MC Fisher, {len(data.fit)} batches): {kfade.timings['fit_s']:.2f} s")
        kfade_s, load_s, ascent_s = [], [], []
        for _ in range(args.repeats):
            kfade.run(copy.deepcopy(model), data)
            kfade_s.append(kfade.timings["unlearn_s"] / args.steps)
            load_s.append(kfade.timings["fit_s"])
            ascent = build_method("grad_ascent", {"epochs": 1, "lr": 1e-5})
            ascent.run(copy.deepcopy(model), data)
            ascent_s.append(ascent.timings["unlearn_s"])
    step, epoch = statistics.median(kfade_s), statistics.median(ascent_s)
    print(f"cached curvature load:                 {statistics.median(load_s):.3f} s")
    print(f"K-FADE step (cached curvature):        {step:.3f} s  (median of {args.repeats})")
    print(f"gradient-ascent epoch ({len(data.forget)} batches):     {epoch:.3f} s  (median of {args.repeats})")
    print(f"ratio K-FADE step / GA epoch:          {step / epoch:.2f}x  (goal <= 1.2x)")


if __name__ == "__main__":
    main()
