#!/usr/bin/env bash
# Paper table, WMDP: bio and cyber × {K-FADE direct, K-FADE CG, RMU, GA} on MODEL (zephyr | llama3_8b), scored
# with lm-eval wmdp_bio, wmdp_cyber, mmlu, then the table (experiments/report.py --paper wmdp → paper.md).
#   experiments/sweeps/paper_wmdp.sh MODEL WMDP_DIR [SWEEP_DIR] [extra Hydra overrides…]
# WMDP_DIR: bio_remove_dataset.jsonl (gated), cyber-forget-corpus.jsonl, wikitext.jsonl (kfade/data/wmdp.py) and
# the question files wmdp_bio.jsonl, wmdp_cyber.jsonl, mmlu.jsonl (or eval.lm_eval_data_dir=DIR for another dir).
# Per corpus: K-FADE (EK-FAC fitted on wikitext, δ = 1e-8 absolute, one step) direct and CG at η ∈ {2.5e-3,
# 5e-3, 1.1e-2}; RMU at its Zephyr defaults; GA one epoch at lr 1e-5: 8 jobs per corpus, 16 in all.
source "$(dirname "$0")/_env.sh"
MODEL=${1:?usage: paper_wmdp.sh zephyr|llama3_8b WMDP_DIR [SWEEP_DIR] [overrides…]}
WMDP_DIR=${2:?give WMDP_DIR}
DIR=${3:-multirun/paper_wmdp_$MODEL/$(date +%Y-%m-%d_%H-%M-%S)}
EXTRA=("${@:4}")
SOLVERS=${SOLVERS:-direct,cg}  # K-FADE solvers; at 7–8B CG needs method.cg_offload=cpu (dry_run=true)
for pair in bio:bio_remove_dataset cyber:cyber-forget-corpus; do
  corpus=${pair%%:*}
  common=(experiment="paper_wmdp_$MODEL" dataset.source="$WMDP_DIR" "dataset.forget_corpora=[${pair#*:}]"
          progress=false)
  "$PY" experiments/run.py -m "${common[@]}" hydra.sweep.dir="$DIR/$corpus/kfade" method=kfade_paper \
    method.solver="$SOLVERS" method.step_size=2.5e-3,5e-3,1.1e-2 \
    "${EXTRA[@]}"
  "$PY" experiments/run.py -m "${common[@]}" hydra.sweep.dir="$DIR/$corpus/rmu" method=rmu "${EXTRA[@]}"
  "$PY" experiments/run.py -m "${common[@]}" hydra.sweep.dir="$DIR/$corpus/ga" method=grad_ascent method.epochs=1 \
    "${EXTRA[@]}"
done
"$PY" experiments/report.py --paper wmdp "$DIR"
