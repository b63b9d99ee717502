#!/usr/bin/env bash
# Set up the virtual environment (CPU PyTorch) and run the test-suite.
# Usage: bash runs/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
source runs/setup_env.sh test
exec python -m pytest "$@"
