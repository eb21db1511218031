#!/usr/bin/env bash
# The README's mini-TOFU comparison: K-FADE with EK-FAC, K-FAC and identity curvature (trust region, 5 steps,
# three per-step retain-KL budgets) against gradient ascent, GradDiff and NPO at three learning rates.
# One curvature fit per estimator serves all its jobs (cache). About 6 minutes warm on 2 cores.
#   experiments/sweeps/mini_tofu_compare.sh [SWEEP_DIR] [extra Hydra overrides…]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # the mini benchmark needs no hub; do not wait on one
DIR=${1:-multirun/mini_tofu_compare/$(date +%Y-%m-%d_%H-%M-%S)}
"$PY" experiments/run.py -m method=kfade curvature=ekfac,kfac,identity method.kl_budget=0.03,0.1,0.3 \
  hydra.sweep.dir="$DIR" "${@:2}"
"$PY" experiments/run.py -m method=mini/grad_ascent,mini/grad_diff,mini/npo method.lr=1e-4,3e-4,1e-3 \
  hydra.sweep.dir="$DIR" "${@:2}"
"$PY" experiments/report.py "$DIR"
