#!/usr/bin/env bash
# Set up a virtual environment (CPU PyTorch) and run the test-suite.
# Usage: bash runs/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${NANOCHAT_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# torch first and pinned: a bare "torch" would pull a multi-GB CUDA build.
"$VENV/bin/pip" install -q --disable-pip-version-check "torch==2.13.0"
"$VENV/bin/pip" install -q --disable-pip-version-check -e ".[test]"
exec "$VENV/bin/python" -m pytest "$@"
