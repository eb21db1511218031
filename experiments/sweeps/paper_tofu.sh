#!/usr/bin/env bash
# Paper table, TOFU: forget01 / forget05 / forget10 × {K-FADE direct, K-FADE CG, GA, GradDiff, NPO} on TOFU's
# finetuned MODEL (llama2_7b | phi15), then the table (experiments/report.py --paper tofu → paper.md).
#   experiments/sweeps/paper_tofu.sh MODEL RETAIN_ROOT [SWEEP_DIR] [extra Hydra overrides…]
# RETAIN_ROOT/retain99, retain95, retain90: each split's retain model (save_pretrained dir) or TOFU eval-log dir.
# Per split: K-FADE (EK-FAC, δ = 1e-8 absolute, one step) with the direct and the CG solver at the paper's fixed
# η ∈ {2.5e-3, 5e-3, 1.1e-2}; GA, GradDiff, NPO at TOFU's recipe (AdamW 1e-5; 5 / 5 / 10 epochs): 9 jobs per
# split, 27 in all, one curvature fit per split (cached). On a SLURM cluster add hydra/launcher=slurm_gpu
# hydra.launcher.partition=… (conf/hydra/launcher/slurm_gpu.yaml). Plan memory first: … dry_run=true.
source "$(dirname "$0")/_env.sh"
MODEL=${1:?usage: paper_tofu.sh llama2_7b|phi15 RETAIN_ROOT [SWEEP_DIR] [overrides…]}
RETAIN_ROOT=${2:?give RETAIN_ROOT (its retain99 / retain95 / retain90 subdirectories)}
DIR=${3:-multirun/paper_tofu_$MODEL/$(date +%Y-%m-%d_%H-%M-%S)}
EXTRA=("${@:4}")
SOLVERS=${SOLVERS:-direct,cg}  # K-FADE solvers; at 7–8B CG needs method.cg_offload=cpu (dry_run=true)
for pair in forget01:retain99 forget05:retain95 forget10:retain90; do
  split=${pair%%:*}
  common=(experiment="paper_tofu_$MODEL" dataset.forget_split="$split" model.retrain_path="$RETAIN_ROOT/${pair#*:}"
          progress=false)
  "$PY" experiments/run.py -m "${common[@]}" hydra.sweep.dir="$DIR/$split/kfade" method=kfade_paper \
    method.solver="$SOLVERS" method.step_size=2.5e-3,5e-3,1.1e-2 \
    "${EXTRA[@]}"
  "$PY" experiments/run.py -m "${common[@]}" hydra.sweep.dir="$DIR/$split/baselines" \
    method=grad_ascent,grad_diff,npo "${EXTRA[@]}"
done
"$PY" experiments/report.py --paper tofu "$DIR"
