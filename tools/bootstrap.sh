# Shared set-up for run_tests.sh and run_pretrain.sh; source it, then call it with a requirements file:
#   source tools/bootstrap.sh; bootstrap_venv requirements.txt
# Creates .venv when missing and installs the pinned requirements. A stamp holding the hash
# of the requirement files makes a second call skip the install when nothing changed.

bootstrap_venv() {
  local req="$1"
  local root venv py
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  venv="${VENV:-$root/.venv}"
  if [ ! -x "$venv/bin/python" ]; then
    py="${PYTHON:-}"
    if [ -z "$py" ]; then
      if command -v python3.11 >/dev/null 2>&1; then py=python3.11; else py=python3; fi
    fi
    echo "[setup] creating $venv with $($py --version 2>&1)"
    "$py" -m venv "$venv" || { echo "[setup] error: could not create a virtual environment with $py" >&2; return 1; }
  fi
  local want stamp
  want="$(cat "$root/requirements.txt" "$root/$req" | sha256sum | cut -d' ' -f1)"
  stamp="$venv/.installed-$(basename "$req" .txt)"
  # The dev requirements include the runtime ones, so their stamp satisfies a runtime request.
  local dev_want
  dev_want="$(cat "$root/requirements.txt" "$root/requirements-dev.txt" | sha256sum | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] && [ "$(cat "$venv/.installed-requirements-dev" 2>/dev/null)" != "$dev_want" ]; then
    echo "[setup] installing $req into $venv (first time: about 2 minutes)"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$root/$req" 2> >(grep -v "^WARNING: Location" >&2) \
      || { echo "[setup] error: pip install -r $req failed" >&2; return 1; }
    echo "$want" > "$stamp"
  fi
  # DeepSpeed's CPU communication op (about a minute to compile) is built here, once per
  # environment (a cache each, so two checkouts do not rebuild it over each other), not on first
  # use: no training run (nor a test with a time limit) pays for it, and none killed mid-build
  # leaves torch's build lock for every later run to wait on. Skipped on a CUDA machine.
  export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$venv/torch_extensions}"
  if [ ! -e "$TORCH_EXTENSIONS_DIR/deepspeed_shm_comm/deepspeed_shm_comm.so" ] \
    && { [ "${DS_ACCELERATOR:-}" = cpu ] || ! command -v nvidia-smi >/dev/null 2>&1; }; then
    echo "[setup] building DeepSpeed's CPU communication op (first time: about a minute)"
    DS_ACCELERATOR=cpu "$venv/bin/python" -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" \
      >"$venv/shm_comm_build.log" 2>&1 \
      || echo "[setup] warning: the op did not build ($venv/shm_comm_build.log); DeepSpeed tries again on first use"
  fi
  export PATH="$venv/bin:$PATH"
  export VIRTUAL_ENV="$venv"
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
  return 0
}
