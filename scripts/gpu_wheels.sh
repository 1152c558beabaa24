#!/usr/bin/env bash
# Download (here, with network) the wheels the GPU machine lacks into .gpu_wheels/, for
# scripts/gpu_check.sh to install there offline. Run it from any directory:
#
#   bash scripts/gpu_wheels.sh            # download + build, then print what is there and its size
#   bash scripts/gpu_wheels.sh --dry-run  # only list what would be fetched
#
# The GPU machine (/work/.library/device/KINDS.md, nvidia-h200) runs Python 3.12 on x86-64 with torch
# 2.11 (CUDA 13), Triton, transformers, pyarrow, tensorboard, safetensors, pyyaml, pillow, tqdm,
# tokenizers, msgpack, ninja, psutil, py-cpuinfo, einops, pytest and pytest-timeout already installed,
# and no network. Only what is missing travels: this project's pinned libraries and the few
# dependencies of theirs that the image does not hold, each with --no-deps (the versions are those
# this repository is tested with on the CPU machine). Everything is pure Python except
# pydantic-core (a cp312 manylinux wheel) and megatron-core.
#
# DeepSpeed is published as a source distribution only: its wheel is built here with
# DS_BUILD_OPS=0 (no compiled ops; the trainer uses torch's AdamW and DeepSpeed JIT-builds any op it
# needs), which gives a py3-none-any wheel. The accelerator it records at build time ('cpu' here)
# is informational only: DeepSpeed picks CUDA at run time when torch sees a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=${GPU_WHEELS_DIR:-.gpu_wheels}
PY=${PYTHON:-.venv/bin/python}
PY_VERSION=3.12
LIMIT_MIB=60  # the working tree travels in 64 MiB, wheels included

# name==version for `pip download` (binary wheels for the GPU machine's Python and platform)
DOWNLOAD=(
  "megatron-core==0.16.1"
  "diffusers==0.42.1"
  "hjson==3.1.0"              # deepspeed
  "pydantic==2.14.4"          # deepspeed's config classes
  "pydantic-core==2.50.5"
  "annotated-types==0.8.0"
  "typing-inspection==0.4.5"
  "typing-extensions==4.16.0" # pydantic-core needs a recent one; the image's may be older
  "importlib-metadata==10.2.0" # diffusers
  "lazy-importer==0.1.0"      # importlib-metadata
)
BUILD=("deepspeed==0.19.8")

usage() {
  echo "usage: bash scripts/gpu_wheels.sh [--dry-run] [-h|--help]"
  echo "  --dry-run         only list what would be fetched (default: download and build)"
  echo "environment (default):"
  echo "  GPU_WHEELS_DIR    where the wheels go, relative to the repository (default .gpu_wheels)"
  echo "  PYTHON            the Python whose pip downloads and builds (default .venv/bin/python)"
}
# --help was refused as an unknown argument (exit 2), and a second argument was ignored.
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
esac
if [ $# -gt 1 ]; then
  usage >&2
  echo "gpu_wheels.sh: error: one argument at most, got: $*" >&2
  exit 2
fi
if [ "${1:-}" = "--dry-run" ]; then
  echo "would download into $DEST (Python $PY_VERSION, manylinux x86_64, --no-deps):"
  printf '  %s\n' "${DOWNLOAD[@]}"
  echo "would build into $DEST (DS_BUILD_OPS=0, pip wheel --no-deps --no-build-isolation):"
  printf '  %s\n' "${BUILD[@]}"
  exit 0
elif [ -n "${1:-}" ]; then
  usage >&2
  echo "gpu_wheels.sh: error: unknown argument '$1'" >&2
  exit 2
fi

if [ ! -x "$PY" ]; then
  echo "error: $PY not found: run scripts/bootstrap.sh first (the DeepSpeed build needs torch), or set PYTHON" >&2
  exit 2
fi
mkdir -p "$DEST"
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  "${platforms[@]}" -d "$DEST" "${DOWNLOAD[@]}"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "${BUILD[@]}"

# One version of each package: two make the offline install fail.
dupes=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "error: $DEST holds several versions of: $dupes; delete the old wheels and run again" >&2
  exit 1
fi
ls -1 "$DEST"/*.whl | xargs -n1 basename
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
mib=$(awk -v b="$total" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "total: $mib MiB in $(ls "$DEST"/*.whl | wc -l) wheels under $DEST (limit $LIMIT_MIB MiB)"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "error: the wheels exceed $LIMIT_MIB MiB: they would not travel with the working tree" >&2
  exit 1
fi
