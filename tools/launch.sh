# The training stage's launch, for run_pretrain.sh (sourced; bash). plan_launch checks the
# nodes (python -m launcher.hosts: every host resolves, answers ssh, NUM_NODES fits) before
# any rank starts, and sets train_cmd:
#   one node                      deepspeed --num_gpus G
#   HOSTFILE (pdsh, openmpi, ...)  deepspeed --hostfile H --launcher L, over ssh from this node
#   NODE_RANK (no ssh)             deepspeed --no_ssh --node_rank K: run on every node
#   LAUNCHER=slurm                 srun inside the allocation (see below)
# Remote ranks get the variables they need through a DeepSpeed env file (DS_ENV_FILE).
# `plan_launch --alive` (before a restart) leaves out the hosts that no longer answer. Either
# way it sets launch_world (ranks), launch_hosts (the hosts, comma-separated; empty on one
# node) and, the first time, first_world.

# Variables a remote rank needs; DeepSpeed itself passes PYTHON*, UCX*, MV2*, MLFLOW*.
FORWARD_VARS="DS_ACCELERATOR TOKENIZERS_PARALLELISM TORCH_EXTENSIONS_DIR VIRTUAL_ENV PATH MASTER_ADDR MASTER_PORT"
FORWARD_PREFIXES="OMP_ MKL_ HF_ NCCL_ GLOO_ PRECOND_ MALLOC_"

launch_tmp=""
cleanup_launch() { [ -z "$launch_tmp" ] || rm -rf "$launch_tmp"; }

# The variables above as KEY=VALUE lines, after the user's own .deepspeed_env files (home, then
# here), which DeepSpeed would read if DS_ENV_FILE did not point at this file.
write_env_file() {
  local out="$1" name prefix f
  for f in "${DS_ENV_FILE:-}" "$HOME/.deepspeed_env" ./.deepspeed_env; do
    [ -n "$f" ] && [ -f "$f" ] && cat "$f"
  done > "$out"
  for name in $FORWARD_VARS; do
    [ -n "${!name:-}" ] && echo "$name=${!name}" >> "$out"
  done
  for prefix in $FORWARD_PREFIXES; do
    while IFS='=' read -r name _; do
      echo "$name=${!name}" >> "$out"
    done < <(env | grep "^${prefix}[A-Za-z0-9_]*=" || true)
  done
}

# The network interface this node reaches HOST through (for mpirun's TCP transports).
iface_to() {
  local addr
  addr="$(getent ahostsv4 "$1" | awk 'NR == 1 {print $1}')"
  [ -n "$addr" ] && ip -o route get "$addr" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p'
}

user_master_addr="${MASTER_ADDR:-}"

# The hostfile's hosts and ranks, as launch_hosts and launch_world.
count_launch() {
  launch_hosts="$(cut -d' ' -f1 "$1" | paste -sd, -)"
  launch_world="$(awk '{sub("slots=", "", $2); n += $2} END {print n}' "$1")"
}

plan_launch() {
  [ -n "$launch_tmp" ] || launch_tmp="$(mktemp -d)"  # run_pretrain.sh's EXIT trap removes it
  local hostfile="$launch_tmp/hostfile" slots=() nodes=() launcher="${LAUNCHER:-pdsh}" extra=() alive=()
  [ -n "${NUM_GPUS:-}" ] && slots=(--slots "$NUM_GPUS")
  [ -n "${NUM_NODES:-}" ] && nodes=(--num-nodes "$NUM_NODES")
  [ "${1:-}" = --alive ] && alive=(--alive --min-nodes "${MIN_NODES:-1}")
  read -r -a extra <<< "${LAUNCHER_ARGS:-}"
  export MASTER_PORT="${MASTER_PORT:-29500}"

  if [ "$launcher" = slurm ] && [ -z "${NODE_RANK:-}" ]; then
    # DeepSpeed 0.19.8's slurm runner starts `python -u launcher.train` (it drops -m for a
    # module), so the ranks are started the way it would start them: one srun step, each task
    # a rank (launcher/distributed.py reads SLURM_PROCID). --kill-on-bad-exit ends every task
    # when one fails, so a lost node ends the step instead of leaving the others waiting.
    # On a restart, --nodelist names the nodes still up, --no-kill keeps the allocation when
    # one of its nodes fails, and --overlap lets the new step start while Slurm still counts
    # the failed step (it cannot end it until the lost node answers) on the nodes left.
    MASTER_ADDR="$(python -m launcher.hosts slurm --out "$hostfile" "${nodes[@]}" "${slots[@]}" "${alive[@]}")" || exit 2
    export MASTER_ADDR
    local n g
    n="$(wc -l < "$hostfile")"
    g="$(awk 'NR == 1 {sub("slots=", "", $2); print $2}' "$hostfile")"
    [ -n "${NUM_GPUS:-}" ] || g="${SLURM_NTASKS_PER_NODE:-1}"
    count_launch "$hostfile"
    launch_world=$((n * g))
    first_world="${first_world:-$launch_world}"
    train_cmd=(srun --nodes "$n" --ntasks-per-node "$g" --ntasks "$((n * g))" --nodelist "$launch_hosts"
      --kill-on-bad-exit=1 --no-kill ${alive:+--overlap} "${extra[@]}" "$(command -v python)" -u -m launcher.train)
    return 0
  fi

  train_cmd=(deepspeed --log_level warning)
  if [ -z "${HOSTFILE:-}" ]; then
    train_cmd+=(--num_gpus "${NUM_GPUS:-$gpus_here}" --master_port "$MASTER_PORT")
    [ -z "${MASTER_ADDR:-}" ] || train_cmd+=(--master_addr "$MASTER_ADDR")
    launch_hosts="" launch_world="${NUM_GPUS:-$gpus_here}"
  else
    local ssh=(--ssh)
    [ -n "${NODE_RANK:-}" ] && ssh=()
    local first
    first="$(python -m launcher.hosts check --hostfile "$HOSTFILE" --out "$hostfile" "${nodes[@]}" "${slots[@]}" \
      "${ssh[@]}" "${alive[@]}")" || exit 2
    export MASTER_ADDR="${user_master_addr:-$first}"
    count_launch "$hostfile"
    write_env_file "$launch_tmp/deepspeed_env"
    export DS_ENV_FILE="$launch_tmp/deepspeed_env"
    train_cmd+=(--hostfile "$hostfile" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
    if [ -n "${NODE_RANK:-}" ]; then
      train_cmd+=(--no_ssh --node_rank "$NODE_RANK")
    else
      train_cmd+=(--launcher "$launcher")
      case "$launcher" in
        pdsh)  # ssh gives up on a node that stops answering (a cut link) instead of waiting forever
          export PDSH_SSH_ARGS_APPEND="${PDSH_SSH_ARGS_APPEND:-} -o ServerAliveInterval=5 -o ServerAliveCountMax=3" ;;
        openmpi)
          local iface="${MPI_IFACE:-$(iface_to "$(tail -n 1 "$hostfile" | cut -d' ' -f1)")}"
          [ "$(id -u)" -ne 0 ] || extra+=(--allow-run-as-root)
          if [ -n "$iface" ] && [ "$iface" != lo ]; then
            extra+=(--mca btl_tcp_if_include "$iface" --mca oob_tcp_if_include "$iface")
          fi ;;
      esac
      [ ${#extra[@]} -eq 0 ] || train_cmd+=(--launcher_args "${extra[*]}")
    fi
  fi
  train_cmd+=(--module launcher.train)
  first_world="${first_world:-$launch_world}"
}
