#!/usr/bin/env bash
# The README's two-regime comparison on mini-TOFU forget10: the from-scratch tiny pair (experiment=mini_tofu) and the
# pretrained-base pair (experiment=mini_tofu_pretrained), both scored on Python's documentation as general text
# (kl_reference/general, general/ppl). Per regime, every method over enough strengths to bracket forget P̄ 0.62,
# 0.38 and 0.10, the noise floor (a second retrain seed), then `report.py` (matched.md/.csv, pareto.png), and at the
# end `report.py --regimes` (regimes.md: the regimes' matched tables side by side):
#   K-FADE CG (default: 3 steps × 5 PCG iterations, EK-FAC preconditioner) fitted on retain, and (pretrained regime,
#   whose base learnt the general text) on retain+general; K-FADE CG with 6 steps (re-linearised twice as often);
#   K-FADE direct EK-FAC (one step); GA, GradDiff, NPO, RMU: learning-rate grids (per regime: the pretrained
#   models forget at other rates).
#   experiments/sweeps/mini_tofu_regimes.sh [SWEEP_DIR] [REGIME…]     (REGIME: scratch | pretrained; default both)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # the mini benchmark needs no hub; do not wait on one
export OMP_NUM_THREADS=1                     # two streams on two cores: more threads oversubscribe
DIR=${1:-multirun/mini_tofu_regimes/$(date +%Y-%m-%d_%H-%M-%S)}
REGIMES=("${@:2}")
[ ${#REGIMES[@]} -eq 0 ] && REGIMES=(scratch pretrained)
TARGETS=0.62,0.38,0.1

regime() {  # name experiment GA GradDiff NPO RMU (learning-rate grids)
  local out="$DIR/$1"
  sweep() { "$PY" experiments/run.py -m experiment="$2" dataset.general=python_docs logger=none progress=false \
    hydra.sweep.dir="$out/$1" "${@:3}"; }
  sweep none "$2" method=none noise_floor=true
  sweep kfade_cg3 "$2" method=kfade method.target_forget_prob=$TARGETS &
  local cg=$!
  if [ "$1" = pretrained ]; then
    sweep kfade_cg3_general "$2" method=kfade method.target_forget_prob=$TARGETS "dataset.fit_sets=[retain,general]"
  fi
  sweep kfade_direct "$2" method=kfade method.solver=direct method.n_steps=1 method.target_forget_prob=$TARGETS
  wait "$cg"
  sweep kfade_cg6 "$2" method=kfade method.n_steps=6 method.target_forget_prob=$TARGETS
  sweep grad_ascent "$2" method=mini/grad_ascent method.lr="$3" &
  local ga=$!
  sweep grad_diff "$2" method=mini/grad_diff method.lr="$4"
  sweep npo "$2" method=mini/npo method.lr="$5"
  wait "$ga"
  sweep rmu "$2" method=mini/rmu method.lr="$6"
  "$PY" experiments/report.py "$out"
}

for r in "${REGIMES[@]}"; do
  case "$r" in
    scratch) regime scratch mini_tofu 2e-4,3e-4,4e-4,5.5e-4,7e-4 2e-4,3e-4,4e-4,5.5e-4,7e-4,1e-3 \
               6e-5,1e-4,1.5e-4,2e-4,3e-4 0.03,0.1,0.3 ;;
    pretrained) regime pretrained mini_tofu_pretrained 1e-4,2e-4,2.5e-4,2.75e-4,3e-4,3.5e-4,4e-4,5e-4,7e-4,1e-3 \
                  1e-4,2e-4,3e-4,3.5e-4,4e-4,4.5e-4,5e-4,7e-4,1e-3 \
                  3e-5,6e-5,1e-4,1.2e-4,1.4e-4,1.6e-4,1.8e-4,2e-4,3e-4,5e-4 0.03,0.1,0.3 ;;
    *) echo "error: REGIME='$r': choose scratch or pretrained" >&2; exit 2 ;;
  esac
done
"$PY" experiments/report.py --regimes "$DIR"
