#!/usr/bin/env bash
# Build .whl/ (ignored by git): wheels of the packages bench/gpu_check.sh needs that the device
# image lacks (its python3 3.12 has torch, triton, transformers, tokenizers, but no deepspeed,
# omegaconf, pydantic or datasets, and no network), at the versions this venv runs. No
# dependencies are followed: each missing one is named below. pydantic-core is the only compiled
# one (the cp312 manylinux wheel); deepspeed is a source distribution, built here into a
# pure-python wheel without its C++ ops (we pass torch's AdamW, so none is ever built).
#   bash tools/gpu_wheels.sh        then carry .whl with the device call: bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
DEST=.whl
rm -rf "$DEST"
mkdir -p "$DEST"
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
specs=()
for name in pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson omegaconf \
    datasets dill multiprocess; do
    specs+=("$name==$(version "$name")")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "${specs[@]}"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed==$(version deepspeed)"
ls "$DEST"
du -sh "$DEST"
