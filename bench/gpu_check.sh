#!/usr/bin/env bash
# On a CUDA machine, in one go, within GPU_CHECK_BUDGET seconds (cold Triton and inductor caches).
# The budget defaults to the device call's limit less a margin for the last stage's kill and the
# summary: GPU_CHECK_LIMIT (the call's timeout_s, default 600) less a tenth, at least 40 s (540).
# Each stage gets its weight's share (tests 22, attention 30, training 48) of what is left when it
# starts, shared only with the stages after it that were asked for, so a stage that ends early
# leaves its time to the next ones and a shorter limit shrinks every stage alike:
#   1. the CUDA tests of the attention kernels (compiled, TRITON_ATTN_AUTOTUNE=0: one block shape
#      per kernel; 4 xdist workers, nothing else running): about 115 s of 540. At its cap pytest
#      is interrupted (SIGINT), which prints its summary of what finished; the per-test lines
#      (-v) are in the log as they go and $OUT/tests.xml holds the results, even when cut short;
#   2. the attention benchmark table (bench/attention.py) and its target summary, with the kernels
#      autotuned (TRITON_ATTN_AUTOTUNE=1: the triton cells time the tuned block shapes; tuning
#      compiles up to 9 kernels per head dim and preconditioner, once). The target cells (T 4096,
#      then 8192, at D=128: sdpa none, triton qkv, sdpa qkv) run first, so a budget that runs out
#      costs the rest: about 160 s of 540. The training corpus is prepared meanwhile (niced),
#      never beside the compile-heavy tests;
#   3. the training table (bench/train_backends.py): configs/gpu-125m.yaml, 30 steps per attention
#      backend, train.compile off and on: tokens/s, MFU, peak memory; each run ends at its last
#      metrics row. TRITON_ATTN_AUTOTUNE=0 here: the default block shapes, since tuning inside a
#      run's 120 s timeout would compile 9 kernels there. It gets the rest, about 250 s of 540,
#      in the order triton eager, triton compiled, sdpa eager, sdpa compiled, flash (eager about
#      30 s, compiled 60-90 s; a compiled run starts only with 90 s left), so a short budget costs
#      flash's rows first, then sdpa's compiled one.
# Attention before training: stage 2 is bounded and decides the kernel targets, the question the
# device is lent for; put after the training runs' open-ended compile times it could lose its rows.
# A failing row or stage does not stop the rest.
# Everything printed also goes to $OUT/gpu_check.log, the tables to $OUT/attention.{md,json} and
# $OUT/train.{md,json}, the tests' results to $OUT/tests.xml (OUT: set by the device tool; else
# runs/gpu_check). HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 for everything (no network there).
#   bash bench/gpu_check.sh          (PYTHON=... picks the interpreter; GPU_TRAIN_CONFIGS adds configs;
#                                     GPU_CHECK_STAGES="tests attention train" picks stages for a rerun)
#   bash bench/gpu_check.sh --dry    (CPU: the same stages at tiny sizes; CUDA-only rows say skipped)
# Packages the image lacks (deepspeed, omegaconf, pydantic, datasets) travel as wheels in .whl/
# (GPU_CHECK_WHEELS names another folder; tools/gpu_wheels.sh builds it; carry it), installed
# into a temporary folder first. The training stage needs them: asked for without them, the
# script stops at once with one line, before any stage (a rerun with .whl carried costs less than
# half a call run without it); the kernel stages alone (GPU_CHECK_STAGES="tests attention") need
# only torch and triton. If they do not import, the training stage is skipped and the kernel
# stages still run. --dry skips the wheels unless GPU_CHECK_WHEELS is set.
set -uo pipefail
DRY=0
[ "${1:-}" = "--dry" ] && DRY=1
OUT="${OUT:-runs/gpu_check}"
PY="${PYTHON:-python3}"
WHEELS="${GPU_CHECK_WHEELS:-.whl}"
LIMIT="${GPU_CHECK_LIMIT:-600}"
BUDGET="${GPU_CHECK_BUDGET:-}"  # set, when empty, by default_budget once LIMIT is checked
WORK="${GPU_CHECK_WORK:-/tmp/gpu_check_work}"
STAGES=" ${GPU_CHECK_STAGES:-tests attention train} "
START=$SECONDS
TRAIN_NEEDS=(deepspeed omegaconf pydantic datasets)

# the call's limit less a margin for the last stage's kill and the summary; --dry: slow shared CPUs
default_budget() { [ "$DRY" = 1 ] && echo 900 || echo $((LIMIT - (LIMIT / 10 > 40 ? LIMIT / 10 : 40))); }
left() { echo $((BUDGET - (SECONDS - START))); }
stage() { echo; echo "== gpu_check: $1 (at $((SECONDS - START)) s of $BUDGET)"; }
want() { [[ "$STAGES" == *" $1 "* ]]; }
weight() { case $1 in tests) echo 22 ;; attention) echo 30 ;; train) echo 48 ;; esac; }

# seconds for stage $1: its weight's share of what is left, shared with those of the stages after
# it ($2...) that were asked for; at least 10
share() {
    local w rest=0 s t
    w=$(weight "$1")
    shift
    for s in "$@"; do want "$s" && rest=$((rest + $(weight "$s"))); done
    t=$(($(left) * w / (w + rest)))
    echo $((t > 10 ? t : 10))
}

# "N passed, N failed, ..." from pytest -v lines (with or without xdist), the summary's left out
tally() {
    awk '/::/ && !/^[A-Z]+ / && match($0, / (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)( |$)/) {
            w = substr($0, RSTART + 1, RLENGTH - 1); sub(/ $/, "", w); n[tolower(w)]++ }
         END { s = ""; split("passed failed error skipped xfail xpass", order, " ")
               for (i = 1; i <= 6; i++) if (order[i] in n) s = s (s ? ", " : "") n[order[i]] " " order[i]
               print(s ? s : "no test finished") }' "$1"
}

wheels_needed() { want train && { [ "$DRY" = 0 ] || [ -n "${GPU_CHECK_WHEELS:-}" ]; }; }

install_wheels() {
    local site=/tmp/gpu_check_site
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$WHEELS"/*.whl; then
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu_check: installing the wheels of $WHEELS/ failed"
    fi
}

# one line: the versions of the modules named (and of datasets' own needs in the image), after
# streaming a local jsonl through datasets; or one line naming the module that failed
check_imports() {
    "$PY" - "$@" <<'EOF'
import importlib, importlib.metadata as md, json, os, sys, tempfile

def first_line(e):
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"

names = sys.argv[1:]
for name in names:
    try:
        importlib.import_module(name)
    except Exception as e:
        sys.exit(f"gpu_check: {name} does not import: {first_line(e)}")
if "datasets" in names:  # installed without its needs, over the image's huggingface_hub, fsspec, pyarrow
    names += ["huggingface_hub", "fsspec", "pyarrow"]
    try:
        from datasets import load_dataset
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "a.jsonl")
            with open(path, "w") as f:
                f.write(json.dumps({"text": "a"}) + "\n")
            next(iter(load_dataset("json", data_files=[path], split="train", streaming=True)))
    except Exception as e:
        sys.exit(f"gpu_check: datasets cannot stream a local jsonl: {first_line(e)}")
import torch
line = f"python {sys.version.split()[0]} " + " ".join(f"{n} {md.version(n)}" for n in names)
print(line + f" (cuda {torch.version.cuda})")
EOF
}

run_tests() {
    local t=$1 workers=$2 log="$WORK.tests.log" rc
    TRITON_ATTN_AUTOTUNE=0 timeout -s INT -k 15 "$t" "$PY" -m pytest -v -rA -m cuda -p no:cacheprovider \
        -n "$workers" --junitxml="$OUT/tests.xml" tests/test_triton_attention.py tests/test_flash_attention.py \
        2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        echo "gpu_check: the tests reached their cap of $t s; finished before it: $(tally "$log")"
    fi
    return "$rc"
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
    if wheels_needed && ! compgen -G "$WHEELS/*.whl" >/dev/null; then
        echo "gpu_check: error: no wheels in $WHEELS/ for ${TRAIN_NEEDS[*]} (the image lacks them; the training" \
            "stage needs them): make them with 'bash tools/gpu_wheels.sh' and carry $WHEELS, or set" \
            "GPU_CHECK_STAGES='tests attention'; nothing was run"
        return 2
    fi
    stage "machine"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    wheels_needed && install_wheels
    local imports=0 tests=0 bench=0 trainrc=0 prep="" t needs=(torch triton)
    want train && needs+=("${TRAIN_NEEDS[@]}")
    check_imports "${needs[@]}" || imports=1

    if want tests; then
        stage "CUDA tests of the kernels"
        run_tests "$(share tests attention train)" "$workers"
        tests=$?
    fi

    if want train && [ "$imports" = 0 ]; then  # the corpus is written and tokenised meanwhile
        nice -n 10 "$PY" -m bench.train_backends --prepare-only --work "$WORK" "${train[@]}" \
            --prepare-timeout "$(share attention train)" >"$WORK.prepare.log" 2>&1 &
        prep=$!
    fi

    if want attention; then
        stage "attention benchmark (kernels autotuned)"
        t=$(share attention train)
        # a cell whose kernels are being tuned can take 30 s: no cell starts in the last 30 s
        TRITON_ATTN_AUTOTUNE=1 timeout -k 10 "$t" "$PY" -m bench.attention --out "$OUT" \
            --budget $((t > 120 ? t - 30 : t * 3 / 4)) "${attention[@]}"
        bench=$?
    fi

    if want train; then
        stage "training benchmark (TRITON_ATTN_AUTOTUNE=0: default block shapes)"
        if [ "$imports" != 0 ]; then
            echo "gpu_check: the training stage is skipped: what it needs does not import (above)"
            trainrc=1
        else
            local reprepare=()
            if ! wait "$prep"; then  # the training stage prepares it again, bounded, inside its own budget
                echo "gpu_check: preparing the corpus in the background failed; the training stage tries again," \
                    "at most 60 s of its budget. The end of $WORK.prepare.log:"
                tail -n 20 "$WORK.prepare.log"
                reprepare=(--prepare-timeout 60)
            fi
            t=$(($(left) - 5))
            t=$((t > 10 ? t : 10))
            # shellcheck disable=SC2086
            TRITON_ATTN_AUTOTUNE=0 timeout -k 10 "$t" "$PY" -m bench.train_backends --work "$WORK" --out "$OUT" \
                --budget $((t - 10)) --config configs/gpu-125m.yaml ${GPU_TRAIN_CONFIGS:-} "${train[@]}" \
                "${reprepare[@]}"
            trainrc=$?
        fi
    fi

    stage "summary"
    cat "$OUT/attention.md" "$OUT/train.md" 2>/dev/null
    echo "gpu_check: tests exit $tests, attention exit $bench, training exit $trainrc, $((SECONDS - START)) s"
    return $((tests != 0 || bench != 0 || trainrc != 0 || imports != 0))
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then  # run, not sourced (tests source it for its functions)
    cd "$(dirname "$0")/.." || exit 2
    for name in LIMIT BUDGET; do
        [ "$name" = BUDGET ] && BUDGET="${BUDGET:-$(default_budget)}"
        [[ "${!name}" =~ ^[0-9]+$ ]] \
            || { echo "gpu_check: error: GPU_CHECK_$name must be whole seconds, got '${!name}'"; exit 2; }
    done
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # no network there: a hub lookup could hang
    mkdir -p "$OUT"
    main 2>&1 | tee "$OUT/gpu_check.log"
    exit "${PIPESTATUS[0]}"
fi
