#!/usr/bin/env bash
# One command: set-up, default corpus + tokenizer, training under the deepspeed launcher, export.
#   ./run_pretrain.sh [CONFIG] [section.key=value ...]        (CONFIG defaults to configs/tiny.yaml)
# Environment:
#   NUM_GPUS     processes per node (default: the GPUs on this node, or 1 process on a CPU;
#                with a HOSTFILE, its slots)
#   NUM_NODES    nodes (the first N of HOSTFILE or of the Slurm allocation; default all)
#   HOSTFILE     a DeepSpeed hostfile ("hostname slots=N" lines)
#   LAUNCHER     multi-node launcher: pdsh (default, over ssh), openmpi, slurm (inside an
#                allocation: configs/slurm/pretrain.sbatch), mvapich, ...
#   LAUNCHER_ARGS   extra arguments for pdsh, mpirun or srun; MPI_IFACE  the interface mpirun
#                uses between nodes (default: the one that reaches the other hosts)
#   NODE_RANK, MASTER_ADDR, MASTER_PORT   one launcher per node without ssh (run this on every node)
# See docs/multinode.md.
# Stopping: Ctrl-C or SIGTERM (to this script or its process group) stops training at the next
# step boundary; the run saves, this script exports that checkpoint and exits 0. A second
# Ctrl-C aborts at once (exit 130); `latest` keeps naming the last complete checkpoint.
set -euo pipefail
cd "$(dirname "$0")"

# A reader that goes away (`./run_pretrain.sh | head`) must not end the run before it saves:
# every stage writes through a relay that drains what nobody reads any more, and ignores Ctrl-C.
exec > >(trap '' INT TERM; cat || cat >/dev/null)
trap '' PIPE
say() { echo "$@" 2>/dev/null || true; }
fail() { echo "error: $*" >&2; exit 2; }

# ---- stops: each stage runs in its own session, so a terminal's Ctrl-C reaches only this
# script, which turns it into a stop the stage can finish cleanly.
stage="setup" child="" stops=0 stop_file=""
on_stop() {
  stops=$((stops + 1))
  if [ "$stops" -ge 2 ]; then
    echo "aborted: second stop request; the last complete checkpoint is kept" >&2
    [ -n "$child" ] && kill -KILL -- "-$child" 2>/dev/null || true
    [ -n "$stop_file" ] && rm -f "$stop_file" || true
    exit 130
  fi
  echo "stop requested during $stage: finishing cleanly (stop again to abort)" >&2
  case "$stage" in
    prepare) kill -INT -- "-$child" 2>/dev/null || true ;;
    train) : > "$stop_file" ;;  # launcher.train saves at the next step boundary
  esac
}
trap on_stop INT TERM

# run_stage NAME CMD...: run CMD in a new session, wait for it through stop requests, and
# leave its exit code in $rc.
run_stage() {
  stage="$1"; shift
  if command -v setsid >/dev/null; then setsid "$@" & else "$@" & fi
  child=$!
  while kill -0 "$child" 2>/dev/null; do
    wait "$child" || true  # returns early when a stop request arrives
  done
  rc=0; wait "$child" || rc=$?  # bash keeps the status of a finished child
  child=""
}

stopped() { [ "$stops" -gt 0 ]; }

source tools/bootstrap.sh
bootstrap_venv requirements.txt

config=configs/tiny.yaml
if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then config="$1"; shift; fi
[ -f "$config" ] || fail "config $config: no such file; pass a YAML from configs/ (e.g. configs/tiny.yaml)"
for var in NUM_GPUS NUM_NODES NODE_RANK MASTER_PORT; do
  value="${!var:-}"
  if [ -n "$value" ] && ! [[ "$value" =~ ^[0-9]+$ ]]; then
    fail "$var=$value: expected a whole number (e.g. $var=2)"
  fi
done
for var in NUM_GPUS NUM_NODES; do
  [ "${!var:-1}" -ge 1 ] || fail "${var}=${!var}: expected 1 or more"
done
if [ -n "${NODE_RANK:-}" ] && { [ -z "${HOSTFILE:-}" ] || [ -z "${MASTER_ADDR:-}" ]; }; then
  fail "NODE_RANK=$NODE_RANK needs HOSTFILE and MASTER_ADDR (and MASTER_PORT) to launch without ssh"
fi
[ -z "${HOSTFILE:-}" ] || [ -f "$HOSTFILE" ] || fail "HOSTFILE=$HOSTFILE: no such file; one 'hostname slots=N' line per node"
if [ -n "${NUM_NODES:-}" ] && [ "$NUM_NODES" -gt 1 ] && [ -z "${HOSTFILE:-}" ] && [ "${LAUNCHER:-}" != slurm ]; then
  fail "NUM_NODES=$NUM_NODES needs HOSTFILE (one 'hostname slots=N' line per node) or LAUNCHER=slurm"
fi
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  gpus_here="$(python -c 'import torch; print(torch.cuda.device_count())')"
else
  export DS_ACCELERATOR=cpu
  gpus_here=1
fi
export TOKENIZERS_PARALLELISM=false

run_dir="$(python -m run.config --config "$config" "$@" --get train.output_dir)" || exit 2
stop_file="$(python -m run.rundir "$run_dir" --get stop)"
source tools/launch.sh
plan_launch  # checks the nodes; sets train_cmd, the deepspeed launcher (or srun) command
stopped && { say "stopped before training"; exit 0; }

run_stage prepare python -m data.prepare --config "$config" "$@"
if stopped; then say "stopped during data preparation; run again to continue"; exit 0; fi
[ "$rc" -eq 0 ] || exit "$rc"

say "[train] ${train_cmd[*]} --config $config $*"
mkdir -p "$run_dir" && rm -f "$stop_file"
run_stage train "${train_cmd[@]}" --config "$config" "$@"
[ "$rc" -eq 0 ] || exit "$rc"
stopped && say "training stopped at a step boundary and saved"

if [ "${NODE_RANK:-0}" = "0" ]; then
  if ! python -m run.rundir "$run_dir" --get latest >/dev/null 2>&1; then
    say "no checkpoint yet in $run_dir: nothing to export"
    exit 0
  fi
  run_stage export python -m launcher.export_hf --run "$run_dir"
  [ "$rc" -eq 0 ] || exit "$rc"
  say
  say "Hugging Face export: $(python -m run.rundir "$run_dir" --get export)"
  say "TensorBoard:         .venv/bin/tensorboard --logdir $(python -m run.rundir "$run_dir" --get tensorboard)"
  say "Run directory:       $run_dir"
fi
