#!/usr/bin/env bash
# `make compare`: every method at matched forgetting on mini-TOFU forget10, in both regimes — from scratch
# (experiment=mini_tofu) and TOFU's own, a pretrained base (experiment=mini_tofu_pretrained) — all scored on held-out
# Python documentation as general text. Levels: forget P̄ 0.62, 0.38, 0.10 and the retrain model's own P̄ (read from
# the reference-model run). K-FADE and the first-order baselines stop at each level themselves
# (method.target_forget_prob); RMU, which cannot stop early without collapsing, keeps a learning-rate grid
# (interpolated). Sweeps per regime (DIR/<regime>/<sweep>/…):
#   none            the reference models (reference, retrain, noise floor = a second retrain seed)
#   kfade_default   K-FADE with its defaults (3 steps × 2 warm-started PCG iterations on kl_no_answer, exact
#                   products on 8 fitting batches), one sub-sweep per level
#   kfade_cg        method=kfade_cg: 5 PCG iterations on every fitting batch, 3–6 steps, one sub-sweep per level
#   kfade_onestep   method=kfade_direct: one direct EK-FAC step on kl_no_answer, no exact products
#   kfade_direct    the paper's direct EK-FAC step: method=kfade_direct on the answers' NLL, Ĝ on the retain split,
#                   one global damping (0.1 × Ĝ's mean eigenvalue)
#   grad_diff, grad_ascent, npo   AdamW at the mini configs' learning rate, stopped at the level
#   rmu             learning-rate grid
#   seeds_kfade_default, seeds_grad_diff   P̄ 0.38 with model-training and method seeds 1 and 2 (seed 0: above)
# From scratch the general text is only scored (that model never learnt it), so it fits on the QA sets alone.
# Every run (and the reference models) is audited (eval.audits=$AUDITS: relearning, quantization, membership
# inference, extraction; docs/benchmarks.md); AUDITS="[]" skips them.
# The sweeps run from one queue on two slots (one thread each), longest first; then report.py per regime
# (matched.md/.csv, pareto.png) and report.py --regimes (regimes.md).
#   experiments/sweeps/compare.sh [DIR] [extra Hydra overrides for every job…]     (DIR: multirun/compare/<date>)
#   REGIMES="pretrained" experiments/sweeps/compare.sh …                           (one regime only)
#   SKIP='kfade_cg/0\.' experiments/sweeps/compare.sh …        (leave out the sweeps whose <regime> <sweep> matches)
source "$(dirname "$0")/_env.sh"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # the mini benchmark needs no hub; do not wait on one
export OMP_NUM_THREADS=1                     # two slots on two cores: more threads oversubscribe
DIR=${1:-multirun/compare/$(date +%Y-%m-%d_%H-%M-%S)}
EXTRA="${*:2}"  # passed on as words: overrides without spaces
REGIMES=${REGIMES:-pretrained scratch}
AUDITS=${AUDITS:-[relearn,relearn_retain,quantize,mia,extraction]}
LEVELS=(0.62 0.38 0.1)
CAP="method.epochs=60"  # first-order methods: a cap only, each run stops at its level

experiment() { case "$1" in scratch) echo mini_tofu ;; pretrained) echo mini_tofu_pretrained ;;
  *) echo "error: REGIMES='$1': choose scratch and/or pretrained" >&2; exit 2 ;; esac; }
regime_args() { [ "$1" = scratch ] && echo "dataset.fit_sets=[retain,real_authors,world_facts]" || true; }
sweep() {  # regime sweep-dir overrides…: one `run.py -m` of that regime
  set -f  # overrides such as dataset.fit_sets=[…] are not globs
  local regime=$1 dir=$2
  # shellcheck disable=SC2086,SC2046
  "$PY" experiments/run.py -m experiment="$(experiment "$regime")" dataset.general=python_docs logger=none \
    progress=false eval.audits="$AUDITS" $(regime_args "$regime") hydra.sweep.dir="$DIR/$regime/$dir" "${@:3}" $EXTRA \
    > "$DIR/logs/$regime-${dir//\//-}.log" 2>&1 || echo "failed: $regime $dir (log: $DIR/logs)" >&2
}
export -f sweep experiment regime_args
export PY DIR EXTRA AUDITS
mkdir -p "$DIR/logs"

for r in $REGIMES; do sweep "$r" none method=none noise_floor=true & done; wait  # the models, then their P̄
queue=()
for r in $REGIMES; do
  retrain=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["retrain/forget/prob"])' \
    "$DIR/$r/none/none-0/results.json")
  for level in "${LEVELS[@]}" "$retrain"; do
    name=$level; [ "$level" = "$retrain" ] && name=retrain
    queue+=("$r kfade_default/$name method=kfade method.target_forget_prob=$level")
    queue+=("$r kfade_cg/$name method=kfade_cg method.target_forget_prob=$level")
  done
  queue+=("$r seeds_kfade_default method=kfade method.target_forget_prob=0.38 seed=1,2 model.recipe.seed=\\\${seed}")
  targets=$(IFS=,; echo "${LEVELS[*]},$retrain")
  queue+=("$r seeds_grad_diff method=mini/grad_diff $CAP method.target_forget_prob=0.38 seed=1,2 model.recipe.seed=\\\${seed}")
  queue+=("$r kfade_onestep method=kfade_direct method.target_forget_prob=$targets")
  queue+=("$r kfade_direct method=kfade_direct method.forget_loss=nll dataset.fit_sets=[retain] method.damping=0.1 method.damping_mode=global method.target_forget_prob=$targets")
  for m in grad_diff grad_ascent npo; do
    queue+=("$r $m method=mini/$m $CAP method.target_forget_prob=$targets")
  done
  queue+=("$r rmu method=mini/rmu method.target_forget_prob=null method.epochs=6 method.lr=0.03,0.1,0.3")
done
printf '%s\n' "${queue[@]}" | { [ -n "${SKIP:-}" ] && grep -Ev "^[a-z]+ ($SKIP)" || cat; } | xargs -d '\n' -P 2 -I{} bash -c 'sweep {}'
for r in $REGIMES; do "$PY" experiments/report.py "$DIR/$r" > /dev/null; done
"$PY" experiments/report.py --regimes "$DIR"
