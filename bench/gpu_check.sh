#!/usr/bin/env bash
# On a CUDA machine, in one go, within GPU_CHECK_BUDGET seconds (default 400: under 7 minutes even
# with cold Triton and inductor caches; one device call may run 10):
#   1. the CUDA tests of the attention kernels (compiled, one block shape per kernel),
#   2. the attention benchmark table (bench/attention.py) and its target summary,
#   3. the training table (bench/train_backends.py): configs/gpu-125m.yaml, about 30 steps per
#      attention backend, train.compile off and on: tokens/s, MFU, peak memory.
# Each stage has its own timeout inside the budget; a failing row or stage does not stop the rest.
# Everything printed also goes to $OUT/gpu_check.log, the tables to $OUT/attention.{md,json} and
# $OUT/train.{md,json} (OUT: set by the device tool; else runs/gpu_check).
#   bash bench/gpu_check.sh          (PYTHON=... picks the interpreter; GPU_TRAIN_CONFIGS adds configs;
#                                     GPU_CHECK_STAGES="tests attention train" picks stages for a rerun)
#   bash bench/gpu_check.sh --dry    (CPU: the same stages at tiny sizes; CUDA-only rows say skipped)
# Packages the machine lacks travel as wheels in .whl/ (tools/gpu_wheels.sh builds it; carry it):
# they are installed into a temporary folder first.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry" ] && DRY=1
OUT="${OUT:-runs/gpu_check}"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-$([ "$DRY" = 1 ] && echo 900 || echo 400)}"  # --dry: slow shared CPUs
WORK="${GPU_CHECK_WORK:-/tmp/gpu_check_work}"
STAGES=" ${GPU_CHECK_STAGES:-tests attention train} "
START=$SECONDS
mkdir -p "$OUT"

left() { echo $((BUDGET - (SECONDS - START))); }
# the smaller of $1 and what is left of the budget less $2 (a reserve for the stages after), at least 10
cap() {
    local l=$(($(left) - ${2:-0}))
    local c=$(($1 < l ? $1 : l))
    echo $((c > 10 ? c : 10))
}
stage() { echo; echo "== gpu_check: $1 (at $((SECONDS - START)) s of $BUDGET)"; }
want() { [[ "$STAGES" == *" $1 "* ]]; }

install_wheels() {
    compgen -G ".whl/*.whl" >/dev/null || return 0
    local site=/tmp/gpu_check_site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || echo "gpu_check: installing the wheels of .whl/ failed"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
}

main() {
    export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1  # compiled kernels, never the CPU interpreter
    # on the GPU: T 1k, 4k, 8k (2k left out for time) and 10 timed repeats per cell
    local attention=(--T 1024 4096 8192 --repeats 10) train=() workers=4
    if [ "$DRY" = 1 ]; then
        attention=(--quick --repeats 1)
        train=(--dry --compile off)
        workers=0
    fi
    stage "machine"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    [ "$DRY" = 1 ] || install_wheels
    "$PY" -c "import sys, torch, triton, deepspeed; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'triton', triton.__version__, 'deepspeed', deepspeed.__version__)"

    local tests=0 bench=0 trainrc=0 prep="" t
    if want train; then  # the corpus is written and tokenised on the CPUs meanwhile
        "$PY" -m bench.train_backends --prepare-only --work "$WORK" "${train[@]}" >"$WORK.prepare.log" 2>&1 &
        prep=$!
    fi

    if want tests; then
        stage "CUDA tests of the kernels"
        TRITON_ATTN_AUTOTUNE=0 timeout "$(cap 120 260)" "$PY" -m pytest -q -m cuda -p no:cacheprovider -n "$workers" \
            --deselect tests/test_triton_attention.py::test_cuda_timing_sanity \
            tests/test_triton_attention.py tests/test_flash_attention.py
        tests=$?
    fi

    if want attention; then
        stage "attention benchmark"
        t=$(cap 110 150)
        timeout "$t" "$PY" -m bench.attention --out "$OUT" --budget $((t - 25)) "${attention[@]}"
        bench=$?
    fi

    if want train; then
        stage "training benchmark"
        wait "$prep" || { echo "gpu_check: preparing the corpus failed:"; tail -n 20 "$WORK.prepare.log"; }
        t=$(cap 1000 5)
        # shellcheck disable=SC2086
        timeout "$t" "$PY" -m bench.train_backends --work "$WORK" --out "$OUT" --budget $((t - 10)) \
            --config configs/gpu-125m.yaml ${GPU_TRAIN_CONFIGS:-} "${train[@]}"
        trainrc=$?
    fi

    stage "summary"
    cat "$OUT/attention.md" "$OUT/train.md" 2>/dev/null
    echo "gpu_check: tests exit $tests, attention exit $bench, training exit $trainrc, $((SECONDS - START)) s"
    return $((tests != 0 || bench != 0 || trainrc != 0))
}

main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
