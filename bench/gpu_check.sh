#!/usr/bin/env bash
# On a CUDA machine, in one go, within GPU_CHECK_BUDGET seconds (default 520, cold Triton and
# inductor caches; run it as a device call with timeout_s=600, which leaves time for the wheels):
#   1. the CUDA tests of the attention kernels (compiled, one block shape per kernel): at most 120 s,
#   2. the attention benchmark table (bench/attention.py) and its target summary: at most 110 s,
#      with TRITON_ATTN_AUTOTUNE=0 (each kernel compiles once per head dim and preconditioner
#      instead of tuning 3 block shapes for every T); the target cells (T 4096, then 8192, at
#      D=128: sdpa none, triton qkv, sdpa qkv) run first, so a budget that runs out costs the rest,
#   3. the training table (bench/train_backends.py): configs/gpu-125m.yaml, 30 steps per attention
#      backend, train.compile off and on (kernels autotuned, as in training): tokens/s, MFU, peak
#      memory; each run ends at its last metrics row (no final evaluation or save). It gets the
#      rest, at least about 260 s, in the order triton eager, triton compiled, sdpa eager, sdpa
#      compiled, flash (eager about 30 s, compiled 60-90 s; a compiled run starts only with 90 s
#      left), so a short budget costs flash's rows first, then sdpa's compiled one.
# Attention before training: stage 2 is bounded and decides the kernel targets, the question the
# device is lent for; put after the training runs' open-ended compile times it could lose its rows.
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
BUDGET="${GPU_CHECK_BUDGET:-$([ "$DRY" = 1 ] && echo 900 || echo 520)}"  # --dry: slow shared CPUs
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
        TRITON_ATTN_AUTOTUNE=0 timeout -k 10 "$(cap 120 260)" "$PY" -m pytest -q -m cuda -p no:cacheprovider \
            -n "$workers" \
            tests/test_triton_attention.py tests/test_flash_attention.py
        tests=$?
    fi

    if want attention; then
        stage "attention benchmark"
        t=$(cap 110 150)
        TRITON_ATTN_AUTOTUNE=0 timeout -k 10 "$t" "$PY" -m bench.attention --out "$OUT" --budget $((t - 25)) \
            "${attention[@]}"
        bench=$?
    fi

    if want train; then
        stage "training benchmark"
        local reprepare=()
        if ! wait "$prep"; then  # the training stage prepares it again, bounded, inside its own budget
            echo "gpu_check: preparing the corpus in the background failed; the training stage tries again," \
                "at most 60 s of its budget. The end of $WORK.prepare.log:"
            tail -n 20 "$WORK.prepare.log"
            reprepare=(--prepare-timeout 60)
        fi
        t=$(cap 1000 5)
        # shellcheck disable=SC2086
        timeout -k 10 "$t" "$PY" -m bench.train_backends --work "$WORK" --out "$OUT" --budget $((t - 10)) \
            --config configs/gpu-125m.yaml ${GPU_TRAIN_CONFIGS:-} "${train[@]}" "${reprepare[@]}"
        trainrc=$?
    fi

    stage "summary"
    cat "$OUT/attention.md" "$OUT/train.md" 2>/dev/null
    echo "gpu_check: tests exit $tests, attention exit $bench, training exit $trainrc, $((SECONDS - START)) s"
    return $((tests != 0 || bench != 0 || trainrc != 0))
}

main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
