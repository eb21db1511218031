# Sourced by every sweep script here: strict mode, the repository root as the working directory, and the Python
# that runs the jobs ($PY; default: the Makefile's .venv).
#   source "$(dirname "$0")/_env.sh"
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
