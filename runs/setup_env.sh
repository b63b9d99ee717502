#!/usr/bin/env bash
# Create (or reuse) the virtual environment and install nanochat into it.
# Usage: source runs/setup_env.sh [extras]      e.g. source runs/setup_env.sh test
# TORCH_SPEC picks the PyTorch build (default: torch==2.13.0, the CPU build this project
# is tested with; on a GPU machine use e.g. TORCH_SPEC='torch>=2.9').
VENV=${NANOCHAT_VENV:-.venv}
EXTRAS=${1:-}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# torch first and pinned: a bare "torch" requirement would pull a multi-GB CUDA build.
"$VENV/bin/pip" install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
"$VENV/bin/pip" install -q --disable-pip-version-check -e ".${EXTRAS:+[$EXTRAS]}"
VENV_BIN=$(cd "$VENV/bin" && pwd)
export PATH="$VENV_BIN:$PATH"
