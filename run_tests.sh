#!/usr/bin/env bash
# One command: set up .venv (first time only), then run the test suite.
#   ./run_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")"
source tools/bootstrap.sh
bootstrap_venv requirements-dev.txt
export DS_ACCELERATOR=cpu TRITON_INTERPRET="${TRITON_INTERPRET:-1}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Two workers, each taking whole test files (their fixtures are per file); -n 0 runs serially.
exec python -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
