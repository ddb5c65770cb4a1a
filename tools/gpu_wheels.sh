#!/usr/bin/env bash
# Build .whl/ (ignored by git; GPU_CHECK_WHEELS names another folder): wheels of the packages
# bench/gpu_check.sh needs that the device image lacks (its python3 3.12 has torch, triton,
# transformers, tokenizers, huggingface_hub, fsspec, pyarrow, but no deepspeed, omegaconf,
# pydantic or datasets, and no network), at the versions of the python given. No dependencies
# are followed: each missing one is named below. pydantic-core is the only compiled one (the
# cp312 manylinux wheel); deepspeed is a source distribution, built here into a pure-python
# wheel without its C++ ops (we pass torch's AdamW, so none is ever built).
# datasets goes in without its needs, over the image's own huggingface_hub (1.33.0), fsspec
# and pyarrow: our datasets 5.2.0 streams local json, text and parquet files (split by node,
# batched map, resumed from its state_dict) with huggingface_hub 1.33.0, fsspec 2026.6.0 to
# 2026.9.0 and pyarrow 24.0.0 and 25.0.1 (checked on the CPU); gpu_check.sh prints the image's
# versions and streams a local file through datasets before the training stage.
#   bash tools/gpu_wheels.sh [PYTHON]    then carry .whl with the device call: bash bench/gpu_check.sh
# PYTHON (the argument, else $PYTHON, else python or python3 on the PATH) is the project's
# interpreter, its venv's: the wheels take its versions, and deepspeed's build imports its torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-${PYTHON:-$(command -v python || command -v python3 || true)}}"
DEST="${GPU_CHECK_WHEELS:-.whl}"
NAMES=(pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson omegaconf datasets dill
    multiprocess)
if [ -z "$PY" ] || ! command -v "$PY" >/dev/null; then
    echo "gpu_wheels: error: no python '${PY:-}': pass the project's: bash tools/gpu_wheels.sh .venv/bin/python" >&2
    exit 2
fi
# NAME==VERSION of each, as the python given has it; or one line naming those it lacks
specs=$("$PY" - "${NAMES[@]}" deepspeed torch <<'EOF'
import importlib.metadata as md, sys
have, lacks = [], []
for name in sys.argv[1:]:
    try:
        have.append(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        lacks.append(name)
if lacks:
    sys.exit(f"gpu_wheels: error: {sys.executable} lacks {', '.join(lacks)}: pass the python of the project's "
             "venv (bash tools/gpu_wheels.sh .venv/bin/python, or PYTHON=...)")
print(" ".join(have))
EOF
) || exit 2
read -ra specs <<<"$specs"
new=$(mktemp -d)  # the old folder stays until the new one is complete
trap 'rm -rf "$new"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$new" "${specs[@]:0:${#NAMES[@]}}"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$new" "${specs[${#NAMES[@]}]}"
rm -rf "$DEST"
mv "$new" "$DEST"
ls "$DEST"
du -sh "$DEST"
