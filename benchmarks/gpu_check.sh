#!/usr/bin/env bash
# The prepared GPU check (≤ 8 minutes on one GPU): random-weight ~1B Llama in bf16, EK-FAC fit on synthetic
# tokens, one direct and one CG K-FADE step; prints tokens/s, fit ÷ forward+backward, GGN product ÷
# forward+backward, peak GPU memory against the dry-run plan, and the bf16-vs-fp32 error of the factors.
#   benchmarks/gpu_check.sh            # on the GPU box
#   benchmarks/gpu_check.sh --tiny     # the same code paths on a CPU, in seconds
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 "$PY" benchmarks/gpu_check.py "$@"
