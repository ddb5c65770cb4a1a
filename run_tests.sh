#!/usr/bin/env bash
# One command: set up .venv (first time only), then run the test suite.
#   ./run_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")"
source tools/bootstrap.sh
bootstrap_venv requirements-dev.txt
export DS_ACCELERATOR=cpu TRITON_INTERPRET="${TRITON_INTERPRET:-1}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest "$@"
