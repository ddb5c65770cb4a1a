#!/usr/bin/env bash
# One command: set-up, default corpus + tokenizer, training under the deepspeed launcher, export.
#   ./run_pretrain.sh [CONFIG] [section.key=value ...]        (CONFIG defaults to configs/tiny.yaml)
# Environment:
#   NUM_GPUS     processes per node (default: the GPUs on this node, or 1 process on a CPU)
#   NUM_NODES    nodes (with HOSTFILE)            HOSTFILE   a DeepSpeed hostfile ("host slots=N" lines)
#   LAUNCHER     multi-node launcher: pdsh (default), openmpi, mvapich, slurm, ...
#   NODE_RANK, MASTER_ADDR, MASTER_PORT   one launcher per node without ssh (run this on every node)
set -euo pipefail
cd "$(dirname "$0")"
source tools/bootstrap.sh
bootstrap_venv requirements.txt

config=configs/tiny.yaml
if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then config="$1"; shift; fi
if [ ! -f "$config" ]; then
  echo "error: config $config: no such file; pass a YAML from configs/ (e.g. configs/tiny.yaml)" >&2
  exit 2
fi
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  gpus_here="$(python -c 'import torch; print(torch.cuda.device_count())')"
else
  export DS_ACCELERATOR=cpu
  gpus_here=1
fi
export TOKENIZERS_PARALLELISM=false

run_dir="$(python -m launcher.config --config "$config" "$@" --get train.output_dir)" || exit 2
python -m data.prepare --config "$config" "$@"

ds_args=(--num_gpus "${NUM_GPUS:-$gpus_here}")
[ -n "${HOSTFILE:-}" ] && ds_args+=(--hostfile "$HOSTFILE")
[ -n "${NUM_NODES:-}" ] && ds_args+=(--num_nodes "$NUM_NODES")
[ -n "${LAUNCHER:-}" ] && ds_args+=(--launcher "$LAUNCHER")
if [ -n "${NODE_RANK:-}" ]; then
  if [ -z "${HOSTFILE:-}" ] || [ -z "${MASTER_ADDR:-}" ]; then
    echo "error: NODE_RANK=$NODE_RANK needs HOSTFILE and MASTER_ADDR (and MASTER_PORT) to launch without ssh" >&2
    exit 2
  fi
  ds_args+=(--no_ssh --node_rank "$NODE_RANK")
fi
[ -n "${MASTER_ADDR:-}" ] && ds_args+=(--master_addr "$MASTER_ADDR")
[ -n "${MASTER_PORT:-}" ] && ds_args+=(--master_port "$MASTER_PORT")

echo "[train] deepspeed ${ds_args[*]} --module launcher.train --config $config $*"
deepspeed "${ds_args[@]}" --module launcher.train --config "$config" "$@"

if [ "${NODE_RANK:-0}" = "0" ]; then
  python -m launcher.export_hf --run "$run_dir"
  echo
  echo "Hugging Face export: $run_dir/hf"
  echo "TensorBoard:         .venv/bin/tensorboard --logdir $run_dir/tensorboard"
  echo "Run directory:       $run_dir"
fi
