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
#   MAX_RESTARTS   restart the training stage after a failure (a lost rank or node, a timed-out
#                collective) up to N times, from the latest checkpoint, on the hosts that still
#                answer (default 0); RESTART_WAIT  seconds before the first restart, doubling
#                (default 10); MIN_NODES  fewest hosts to restart on (default 1)
# See docs/multinode.md.
# Stopping: Ctrl-C or SIGTERM (to this script or its process group) stops training at the next
# step boundary; the run saves, this script exports that checkpoint and exits 0. A second
# Ctrl-C aborts at once (exit 130); `latest` keeps naming the last complete checkpoint.
# One run at a time holds the run directory (RUN_DIR/lock); when this script dies, whatever
# way, a watchdog ends its stages too (the ranks save at the next step boundary if they can).
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
# leave its exit code in $rc. A watchdog in a session of its own ends the stage's process
# group (SIGTERM, then SIGKILL after STAGE_GRACE seconds) if this script dies first.
run_stage() {
  stage="$1"; shift
  setsid "$@" &
  child=$!
  setsid bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 1; done
    kill -TERM -- "-$2" 2>/dev/null || exit 0; sleep "$3"; kill -KILL -- "-$2" 2>/dev/null' \
    watchdog "$$" "$child" "${STAGE_GRACE:-10}" </dev/null >/dev/null 2>&1 9>&- &
  local watchdog=$!
  while kill -0 "$child" 2>/dev/null; do
    wait "$child" || true  # returns early when a stop request arrives
  done
  rc=0; wait "$child" || rc=$?  # bash keeps the status of a finished child
  kill "$watchdog" 2>/dev/null || true
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

for var in MAX_RESTARTS MIN_NODES RESTART_WAIT; do
  value="${!var:-}"
  if [ -n "$value" ] && ! [[ "$value" =~ ^[0-9]+$ ]]; then
    fail "$var=$value: expected a whole number (e.g. $var=2)"
  fi
done
[ "${MIN_NODES:-1}" -ge 1 ] || fail "MIN_NODES=$MIN_NODES: expected 1 or more (the nodes a restart needs)"

run_dir="$(python -m run.config --config "$config" "$@" --get train.output_dir)" || exit 2
{ read -r stop_file; read -r outcome_file; read -r lock_file; } < <(python -m run.rundir "$run_dir" --get stop outcome lock)

source tools/launch.sh
made_run_dir=""
# A run that ends before writing anything leaves no run directory behind (only the lock was there).
forget_new_run_dir() {
  if [ -n "$made_run_dir" ] && [ "$(ls -A "$run_dir" 2>/dev/null)" = lock ]; then
    rm -f "$run_dir/lock" && rmdir "$run_dir" 2>/dev/null || true
  fi
}
trap 'cleanup_launch; rm -f "$outcome_file"; forget_new_run_dir' EXIT

# One run per run directory: the lock is held on fd 9 by this script and, inherited, by its
# stages, and released when the last of them ends (whatever way). With one launcher per node,
# the node with NODE_RANK 0 holds it.
if [ "${NODE_RANK:-0}" = "0" ]; then
  [ -e "$run_dir" ] || { mkdir -p "$run_dir" && made_run_dir=1; }
  exec 9>>"$lock_file"
  if ! flock -n 9; then
    fail "train.output_dir $run_dir: in use by the run of $(head -n 1 "$lock_file" 2>/dev/null || echo 'another process'); wait for it to end, stop it (touch $stop_file), or use another train.output_dir"
  fi
  echo "$(hostname) pid $$" > "$lock_file"
  export PRECOND_RUN_LOCKED=1
fi


plan_launch  # checks the nodes; sets train_cmd, the deepspeed launcher (or srun) command
stopped && { say "stopped before training"; exit 0; }

run_stage prepare python -m data.prepare --config "$config" "$@"
if stopped; then say "stopped during data preparation; run again to continue"; exit 0; fi
[ "$rc" -eq 0 ] || exit "$rc"

# restart_reason: why the attempt that just failed ended, in a few words, or empty when a
# restart would not help (rank 0 wrote "final: WHY" into the run's outcome file).
restart_reason() {
  local line
  line="$(head -n 1 "$outcome_file" 2>/dev/null || true)"
  case "$line" in
    final:*) echo "not restarting: ${line#final: }" >&2; return 1 ;;
    restart:*) echo "${line#restart: }" ;;
    *) echo "the training stage exited with code $rc" ;;
  esac
}

say "[train] ${train_cmd[*]} --config $config $*"
mkdir -p "$run_dir" && rm -f "$stop_file"
stage="train"  # from here a stop request becomes the stop file, even before the ranks start
stopped && { say "stopped before training"; exit 0; }
attempt=0 restart_args=()
while :; do
  rm -f "$outcome_file"
  run_stage train "${train_cmd[@]}" --config "$config" "$@" "${restart_args[@]}"
  [ "$rc" -ne 0 ] || break
  stopped && exit "$rc"  # asked to stop: no restart
  [ "$rc" -ne 2 ] || exit 2  # a config or input error: a restart would repeat it
  reason="$(restart_reason)" || exit "$rc"
  [ "${MAX_RESTARTS:-0}" -gt 0 ] || exit "$rc"
  if [ "$attempt" -ge "${MAX_RESTARTS:-0}" ]; then
    echo "error: training failed again ($reason) after $attempt restart(s) (MAX_RESTARTS=$MAX_RESTARTS); latest checkpoint: step $(python -m run.rundir "$run_dir" --get latest-step)" >&2
    exit "$rc"
  fi
  attempt=$((attempt + 1))
  wait_s=$(( ${RESTART_WAIT:-10} << (attempt - 1) ))
  say "training failed ($reason); restarting in ${wait_s}s"
  sleep "$wait_s" & wait $! || true
  stopped && { say "stopped while waiting to restart"; exit 0; }
  plan_launch --alive || exit $?  # the hosts that answer now (MIN_NODES at least)
  restart_args=()
  if [ "$launch_world" -ne "$first_world" ]; then  # keep the global batch where it divides
    grad_accum="${grad_accum:-$(python -m run.config --config "$config" "$@" --get train.grad_accum)}"
    total=$((grad_accum * first_world))
    if [ $((total % launch_world)) -eq 0 ]; then
      restart_args=("train.grad_accum=$((total / launch_world))")
    else
      say "the global batch changes: $first_world x $grad_accum does not divide over $launch_world ranks"
    fi
  fi
  say "restart $attempt of $MAX_RESTARTS: from step $(python -m run.rundir "$run_dir" --get latest-step) on ${launch_hosts:-this node}, world size $launch_world${restart_args[*]:+, ${restart_args[*]}}"
done
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
