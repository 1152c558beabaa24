#!/usr/bin/env bash
# Launch JanusFlow training on one machine or on a SLURM allocation.
#
#   ./launch.sh [--nproc N] --recipe recipes/stage2.yaml [--set key=value ...]
#   sbatch --nodes=32 --gpus-per-node=8 launch.sh --recipe recipes/stage2.yaml
#
# Locally it starts N processes (default: one per GPU, or 1 on a CPU-only host). Under sbatch it
# re-enters itself through srun with one launcher per node; each launcher starts the node's
# processes with torchrun, all meeting at the first node of the allocation. Everything after the
# launcher's own options goes to `python -m pretrain.main` unchanged.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ -n "${SLURM_JOB_ID:-}" ] && [ -n "${SLURM_SUBMIT_DIR:-}" ] && [ -f "$SLURM_SUBMIT_DIR/launch.sh" ]; then
  here=$SLURM_SUBMIT_DIR  # sbatch runs a copy of this script from its spool directory
fi
PY=${JANUSFLOW_PYTHON:-$here/.venv/bin/python}
[ -x "$PY" ] || PY=python3

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }

nproc=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc) nproc=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ ${#args[@]} -eq 0 ]; then usage >&2; exit 2; fi

if [ -z "$nproc" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    nproc=$(nvidia-smi -L | wc -l)
  else
    nproc=${SLURM_NTASKS_PER_NODE:-1}
  fi
fi
if ! command -v nvidia-smi >/dev/null 2>&1; then export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}; fi
cd "$here"

if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${JANUSFLOW_NODE_LAUNCHER:-}" ]; then
  # Batch script: one launcher task per node, each running this script again.
  export JANUSFLOW_NODE_LAUNCHER=1
  exec srun --ntasks-per-node=1 --nodes="${SLURM_NNODES:-1}" --kill-on-bad-exit=1 \
    bash "$here/launch.sh" --nproc "$nproc" "${args[@]}"
fi

if [ -n "${SLURM_JOB_ID:-}" ]; then
  master=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  port=$((29500 + SLURM_JOB_ID % 20000))
  echo "[launch] node ${SLURM_NODEID}/${SLURM_NNODES} ($(hostname -s)), $nproc processes, master $master:$port"
  exec "$PY" -m torch.distributed.run --nnodes="$SLURM_NNODES" --node_rank="$SLURM_NODEID" \
    --nproc_per_node="$nproc" --master_addr="$master" --master_port="$port" \
    -m pretrain.main "${args[@]}"
fi

echo "[launch] local, $nproc processes"
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$nproc" -m pretrain.main "${args[@]}"
