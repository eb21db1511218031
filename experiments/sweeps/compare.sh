#!/usr/bin/env bash
# `make compare`: every method at matched forgetting on mini-TOFU forget10, in both regimes — from scratch
# (experiment=mini_tofu) and TOFU's own, a pretrained base (experiment=mini_tofu_pretrained) — all scored on held-out
# Python documentation as general text. Levels: forget P̄ 0.62, 0.38, 0.10 and the retrain model's own P̄ (read from
# the reference-model run). K-FADE and the first-order baselines stop at each level themselves
# (method.target_forget_prob); RMU, which cannot stop early, keeps a learning-rate grid (interpolated). Per regime:
#   none            the reference models (reference, retrain, noise floor = a second retrain seed)
#   kfade_default   K-FADE with its defaults
#   kfade_direct    the paper's direct EK-FAC step: one step, one global damping (0.1 × Ĝ's mean eigenvalue)
#   grad_diff, grad_ascent, npo   AdamW at the mini configs' learning rate, stopped at the level
#   rmu             learning-rate grid
#   seeds_kfade_default, seeds_grad_diff   P̄ 0.38 with model-training and method seeds 1 and 2 (seed 0: above)
# From scratch the general text is only scored (the model never learnt it), so the fitting set is the QA sets.
# Then report.py per regime (matched.md/.csv, pareto.png) and report.py --regimes (regimes.md). Two job streams share
# the 2 cores (one thread each).
#   experiments/sweeps/compare.sh [DIR] [extra Hydra overrides for every job…]     (DIR: multirun/compare/<date>)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # the mini benchmark needs no hub; do not wait on one
export OMP_NUM_THREADS=1                     # two streams on two cores: more threads oversubscribe
DIR=${1:-multirun/compare/$(date +%Y-%m-%d_%H-%M-%S)}
EXTRA=("${@:2}")
REGIMES=${REGIMES:-scratch pretrained}
LEVELS=0.62,0.38,0.1
FIRST_ORDER_CAP=60  # epochs: a cap only, each run stops at its level

regime() {  # name experiment [overrides of every job of the regime…]
  local out="$DIR/$1"
  local fixed=("${@:3}")
  sweep() { "$PY" experiments/run.py -m experiment="$2" dataset.general=python_docs logger=none progress=false \
    hydra.sweep.dir="$out/$1" "${fixed[@]}" "${@:3}" "${EXTRA[@]}"; }
  sweep none "$2" method=none noise_floor=true
  local retrain
  retrain=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["retrain/forget/prob"])' \
    "$out/none/none-0/results.json")
  local targets="$LEVELS,$retrain"
  sweep kfade_default "$2" method=kfade method.target_forget_prob="$targets" &
  local kfade=$!
  sweep kfade_direct "$2" method=kfade method.solver=direct method.n_steps=1 method.max_steps=1 \
    method.damping=0.1 method.damping_mode=global method.target_forget_prob="$targets"
  for m in grad_diff grad_ascent npo; do
    sweep "$m" "$2" method=mini/$m method.epochs=$FIRST_ORDER_CAP method.target_forget_prob="$targets"
  done
  sweep rmu "$2" method=mini/rmu method.target_forget_prob=null method.epochs=6 method.lr=0.03,0.1,0.3
  wait "$kfade"
  sweep seeds_kfade_default "$2" method=kfade method.target_forget_prob=0.38 seed=1,2 "model.recipe.seed=\${seed}" &
  local seeds=$!
  sweep seeds_grad_diff "$2" method=mini/grad_diff method.epochs=$FIRST_ORDER_CAP method.target_forget_prob=0.38 \
    seed=1,2 "model.recipe.seed=\${seed}"
  wait "$seeds"
  "$PY" experiments/report.py "$out"
}

for r in $REGIMES; do
  case "$r" in
    # the scratch model never learnt the general text (perplexity ~10⁵): it is scored there, not kept
    scratch) regime scratch mini_tofu "dataset.fit_sets=[retain,real_authors,world_facts]" ;;
    pretrained) regime pretrained mini_tofu_pretrained ;;
    *) echo "error: REGIMES='$r': choose scratch and/or pretrained" >&2; exit 2 ;;
  esac
done
"$PY" experiments/report.py --regimes "$DIR"
