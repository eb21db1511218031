#!/usr/bin/env bash
# The README's matched-forget comparison on mini-TOFU forget10: every method over enough strengths to bracket forget
# P̄ 0.62, 0.38 and 0.10, then `report.py` (report.md, matched.md/.csv, pareto.png in the sweep dir).
#   K-FADE CG (EK-FAC preconditioner): the default (3 steps × 5 PCG iterations) at 4 targets and one step of 10
#   iterations at 7; K-FADE direct (identity, K-FAC, EK-FAC, one step) at 7 targets (step_rule=target_forget);
#   GA, GradDiff, NPO, RMU: learning-rate grids. One curvature fit per estimator (cache).
# Two job streams share the 2 cores (one thread each); about 20 minutes warm. W&B is off here (logger=none) for
# speed; pass logger=wandb to log every job.
#   experiments/sweeps/mini_tofu_matched.sh [SWEEP_DIR] [extra Hydra overrides…]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # the mini benchmark needs no hub; do not wait on one
export OMP_NUM_THREADS=1                     # two streams on two cores: more threads oversubscribe
DIR=${1:-multirun/mini_tofu_matched/$(date +%Y-%m-%d_%H-%M-%S)}
TARGETS=0.75,0.62,0.5,0.38,0.2,0.1,0.05
sweep() { "$PY" experiments/run.py -m logger=none progress=false hydra.sweep.dir="$DIR/$1" "${@:2}" \
  "${EXTRA[@]}"; }
EXTRA=("${@:2}")
sweep kfade_cg3 method=kfade method.solver=cg curvature=ekfac method.target_forget_prob=0.62,0.38,0.2,0.1 &
cg=$!
sweep kfade_cg method=kfade method.solver=cg method.n_steps=1 method.cg_iters=10 curvature=ekfac \
  method.target_forget_prob=$TARGETS
sweep kfade_direct method=kfade method.solver=direct method.n_steps=1 curvature=identity,kfac,ekfac \
  method.target_forget_prob=$TARGETS
sweep ga_graddiff method=mini/grad_ascent,mini/grad_diff method.lr=1e-4,2e-4,3e-4,4e-4,5.5e-4,7e-4,1e-3
sweep npo method=mini/npo method.lr=3e-5,6e-5,1e-4,1.5e-4,2e-4,3e-4
sweep rmu method=mini/rmu method.lr=1e-3,3e-3,1e-2,3e-2,0.1,0.3
wait "$cg"
"$PY" experiments/report.py "$DIR"
