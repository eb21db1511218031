#!/usr/bin/env bash
# `make demo`: K-FADE (default: 3 PCG-solved Gauss-Newton steps on kl_no_answer, Ĝ on what the model keeps) against
# gradient ascent, GradDiff, NPO and RMU on mini-TOFU forget10, every method stopped at the same forget P̄ (0.38),
# then the table and Pareto plot, written by the sweep's own process (hydra/callbacks=report). The first run trains
# the tiny reference and retrain models (~3 min on 2 cores).
#   experiments/sweeps/demo.sh [SWEEP_DIR] [extra Hydra overrides…]
source "$(dirname "$0")/_env.sh"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # the mini benchmark needs no hub; do not wait on one
DIR=${1:-multirun/demo/$(date +%Y-%m-%d_%H-%M-%S)}
TARGET=0.38
"$PY" experiments/run.py -m method=kfade,mini/grad_ascent,mini/grad_diff,mini/npo,mini/rmu \
  method.target_forget_prob=$TARGET hydra.sweep.dir="$DIR" hydra/callbacks=report "${@:2}"
