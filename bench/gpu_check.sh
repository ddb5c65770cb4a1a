#!/usr/bin/env bash
# On a CUDA machine, in one go (about 5 minutes on an H100, most of it compiling with a cold Triton cache; at most 10): the CUDA tests
# of the attention kernels, then the attention benchmark table for docs/benchmarks.md.
#   bash bench/gpu_check.sh [bench/attention.py args]     (PYTHON=... to pick the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
unset TRITON_INTERPRET  # compiled kernels, not the CPU interpreter
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

# one block shape per kernel: the tests check numerics, the benchmark autotunes
TRITON_ATTN_AUTOTUNE=0 timeout 200 "$PY" -m pytest -q -m cuda -p no:cacheprovider \
    tests/test_triton_attention.py tests/test_flash_attention.py
tests=$?

timeout 380 "$PY" -m bench.attention "$@"
bench=$?
echo "gpu_check: tests exit $tests, bench exit $bench"
exit $(( tests != 0 || bench != 0 ))
