#!/usr/bin/env bash
# Launch JanusFlow training on one machine or on a SLURM allocation.
#
#   ./launch.sh [--nproc N] --recipe recipes/stage2.yaml [--steps N] [--set key=value ...]
#   sbatch --nodes=32 --gpus-per-node=8 launch.sh --recipe recipes/stage2.yaml
#   sbatch --ntasks-per-node=2 launch.sh --recipe recipes/tiny_cpu.yaml   # CPU: 2 processes
#   srun --nodes=2 --ntasks-per-node=1 launch.sh --nproc 8 --recipe ...   # one launcher per node
#
# Processes per node: --nproc, else one per GPU, else the allocation's tasks per node
# (--ntasks-per-node), else 1. Everything else goes to `python -m pretrain.main` unchanged.
# Under sbatch: pre-empted or near its time limit, the job checkpoints and requeues itself, and the
# next start resumes from `latest` (details below, after the #SBATCH lines).
#SBATCH --job-name=janusflow
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#
# How it runs
#   locally        torchrun --standalone with N processes.
#   batch script   (sbatch; also an salloc shell) starts one launcher per node as one job step:
#                  `srun --ntasks-per-node=1 launch.sh`, and waits for it.
#   node launcher  (inside that step, or a plain `srun ... launch.sh`): torchrun with N processes,
#                  node rank = the task's rank, rendezvous at the step's first node on port
#                  29500 + job id % 20000 (JANUSFLOW_MASTER_PORT overrides).
#   So `sbatch --ntasks-per-node=2` is a world of 2 on one node: SLURM allocates 2 tasks' worth of
#   CPUs, the step runs one launcher on them and torchrun starts the 2 training processes.
#
# Pre-emption and requeue (checked against a real cluster by tests/launch/test_slurm.py)
#   * `--signal=B:USR1@120` makes SLURM send SIGUSR1 to this batch shell alone, 120 s before the
#     time limit (sites that pre-empt with a warning send it the same way; by hand:
#     `scancel --signal=USR1 --batch JOBID`).
#   * The batch shell traps it and forwards it with `kill -USR1 <srun>`: srun relays SIGUSR1 to
#     every task of the step, and slurmstepd delivers a step signal to every process of the step
#     (proctrack/cgroup or proctrack/linuxproc), so it reaches each trainer process directly. The
#     trainer's handler makes all ranks agree, save `checkpoints/step_N`, update `latest` and exit 0.
#   * torchrun has no SIGUSR1 handler (the default action would kill it and orphan the workers), so
#     the node launcher starts it with SIGUSR1 ignored; an ignored signal stays ignored across exec,
#     so the workers inherit that too until the trainer installs its own handler. A signal that lands
#     in that start-up window would be lost, so the batch shell repeats it every 30 s until the
#     step has ended.
#   * The forwarding is never `kill -TERM <srun>`: srun takes SIGTERM as "cancel the step" and kills
#     the tasks after KillWait instead of relaying it.
#   * Once the step has exited 0 after a SIGUSR1, the batch shell runs `scontrol requeue $SLURM_JOB_ID`:
#     the same job id goes back to the queue (RestartCnt + 1, SLURM_RESTART_COUNT in the new start),
#     the log is appended to (--open-mode=append) and the trainer resumes from `latest`.
#   * SIGTERM to the batch shell (scancel, time limit, pre-emption without warning: SLURM signals
#     every step process itself) is also relayed as SIGUSR1 so the trainer saves, but the job is not
#     requeued: a cancelled job must stay cancelled, and SLURM requeues pre-empted jobs itself when
#     its PreemptMode says so.
#   * A step that fails on its own (no signal: a rank's watchdog after a hang, exit 75; a node whose
#     processes died, which ends the step at once through --kill-on-bad-exit; a crash) is requeued the
#     same way while the job has restarted fewer than JANUSFLOW_MAX_RESTARTS times (default 3; the
#     count includes pre-emptions), so a run that lost a node resumes from its last checkpoint, and a
#     recipe that cannot start fails after a bounded number of tries. The launcher's own refusal (exit
#     2) is never requeued. Multi-node behaviour (2 nodes, pre-emption, a node killed) is checked by
#     tests/launch/test_slurm_two_nodes.py.
set -euo pipefail

# The launcher's own refusals: one line and exit 2, which a batch job never requeues. Each is checked
# before any command is built: torchrun or pretrain.main would refuse it only after the job started.
die() { echo "launch.sh: error: $*" >&2; exit 2; }
# A whole number in [$2, $3]; digits only (and not too many) so that `[` never sees anything else.
whole() { case $1 in ''|*[!0-9]*) return 1 ;; esac; [ ${#1} -le 9 ] && [ "$1" -ge "$2" ] && [ "$1" -le "$3" ]; }

# The repository: sbatch runs a copy of this script from its spool directory, so look beyond it.
repo_ok() { [ -n "$1" ] && [ -f "$1/launch.sh" ] && [ -d "$1/pretrain" ]; }
here=${JANUSFLOW_HOME:-}
if [ -n "$here" ] && ! repo_ok "$here"; then  # set, so meant: never silently another checkout
  die "JANUSFLOW_HOME=$here is not the repository (no launch.sh and pretrain/ in it)"
fi
if ! repo_ok "$here"; then here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd); fi
if ! repo_ok "$here" && [ -n "${SLURM_JOB_ID:-}" ]; then
  here=${SLURM_SUBMIT_DIR:-}  # submitted from the repository
  if ! repo_ok "$here"; then   # submitted from elsewhere: the path sbatch was given
    command=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | tr ' ' '\n' | sed -n 's/^Command=//p')
    here=$(dirname "${command:-.}")
  fi
fi
repo_ok "$here" || die "cannot find the repository (set JANUSFLOW_HOME=/path/to/repo)"
if [ -n "${JANUSFLOW_PYTHON:-}" ]; then  # set, so meant: never silently another Python
  PY=$JANUSFLOW_PYTHON
  command -v -- "$PY" >/dev/null || die "JANUSFLOW_PYTHON=$PY is not an executable (give the project's Python)"
else
  PY=$here/.venv/bin/python
  [ -x "$PY" ] || PY=python3
fi
# Read by the SLURM paths, where a bad value would show only after a failed step (or break the requeue).
if [ -n "${JANUSFLOW_MASTER_PORT:-}" ] && ! whole "$JANUSFLOW_MASTER_PORT" 1 65535; then
  die "JANUSFLOW_MASTER_PORT=$JANUSFLOW_MASTER_PORT: expected a port number from 1 to 65535"
fi
if [ -n "${JANUSFLOW_MAX_RESTARTS:-}" ] && ! whole "$JANUSFLOW_MAX_RESTARTS" 0 999999999; then
  die "JANUSFLOW_MAX_RESTARTS=$JANUSFLOW_MAX_RESTARTS: expected a whole number of restarts (default 3)"
fi

usage() { sed -n '2,12p' "$here/launch.sh" | sed 's/^# \{0,1\}//'; }
set_nproc() { whole "$1" 1 999999999 || die "--nproc '$1': expected a whole number of processes per node, at least 1"
  nproc=$1; }

nproc="" recipe=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc) [ $# -ge 2 ] || die "--nproc needs a number of processes per node, e.g. --nproc 8"
      set_nproc "$2"; shift 2 ;;
    --nproc=*) set_nproc "${1#--nproc=}"; shift ;;
    --recipe) [ $# -ge 2 ] || die "--recipe needs a path, e.g. --recipe recipes/stage2.yaml"
      recipe=$2; args+=("$1" "$2"); shift 2 ;;  # also passed on: checked below that it is there
    --recipe=*) recipe=${1#--recipe=}; args+=("$1"); shift ;;
    -h|--help) usage; exit 0 ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ ${#args[@]} -eq 0 ]; then usage >&2; exit 2; fi
[ -n "$recipe" ] || die "--recipe is required, e.g. --recipe recipes/stage2.yaml (see launch.sh --help)"

if [ -z "$nproc" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    nproc=$(nvidia-smi -L | wc -l)
  elif [ -z "${SLURM_STEP_ID:-}" ] && [ -n "${SLURM_NTASKS_PER_NODE:-}${SLURM_TASKS_PER_NODE:-}" ]; then
    per_node=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE%%[(,]*}}  # "8(x4)" -> 8
    nproc=${per_node:-1}
  else
    nproc=1
  fi
fi
if ! command -v nvidia-smi >/dev/null 2>&1; then export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}; fi
cd "$here"
[ -f "$recipe" ] || die "--recipe '$recipe' is not a file (a relative path starts at the repository, $here)"

# SLURM's own variables, read below in [ ] and $(( )): a stale or copied SLURM_* environment (a shell
# inside an allocation, a container) would otherwise stop on bash's "unbound variable" or its errors.
stale_slurm="unset SLURM_JOB_ID and SLURM_STEP_ID to run on this machine alone"
if [ -n "${SLURM_JOB_ID:-}" ]; then
  case $SLURM_JOB_ID in *[!0-9]*) die "SLURM_JOB_ID=$SLURM_JOB_ID is not a SLURM job id ($stale_slurm)" ;; esac
  restarts=${SLURM_RESTART_COUNT:-0}
  whole "$restarts" 0 999999999 || die "SLURM_RESTART_COUNT=$restarts is not a count of restarts ($stale_slurm)"
  restarts=$((10#$restarts))  # "08" is octal to $(( )) otherwise
fi

if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${SLURM_STEP_ID:-}" ]; then
  # Batch script: one launcher per node as a job step; relay pre-emption warnings to it.
  nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
  whole "$nodes" 1 999999999 || die "SLURM_JOB_NUM_NODES=$nodes is not a node count ($stale_slurm)"
  echo "[launch] job $SLURM_JOB_ID start $((restarts + 1)): $nodes node(s) x $nproc processes"
  srun_pid="" repeater="" stop_signal="" woke=""
  relay() {
    woke=1
    echo "[launch] SIG$1: asking the trainer to checkpoint and stop"
    [ -n "$stop_signal" ] || stop_signal=$1
    [ -n "$srun_pid" ] || return 0
    kill -USR1 "$srun_pid" 2>/dev/null || true
    if [ -z "$repeater" ]; then
      (while sleep 30 && kill -USR1 "$srun_pid" 2>/dev/null; do :; done) &
      repeater=$!
    fi
  }
  trap 'relay USR1' USR1
  trap 'relay TERM' TERM
  srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" \
    --kill-on-bad-exit=1 bash "$here/launch.sh" --nproc "$nproc" "${args[@]}" &
  srun_pid=$!
  [ -z "$stop_signal" ] || kill -USR1 "$srun_pid" 2>/dev/null || true  # a signal before srun started
  while :; do
    # A trapped signal interrupts `wait` (status > 128); srun is then still running: wait again.
    woke="" rc=0
    wait "$srun_pid" || rc=$?
    if [ -n "$woke" ] && [ "$rc" -gt 128 ]; then continue; fi
    break
  done
  [ -z "$repeater" ] || kill "$repeater" 2>/dev/null || true
  if [ "$stop_signal" = USR1 ] && [ "$rc" -eq 0 ]; then
    if [ "${ENVIRONMENT:-}" != BATCH ]; then
      echo "[launch] checkpointed; not a batch job, so not requeued: run again to resume"
      exit 0
    fi
    echo "[launch] checkpointed; requeueing job $SLURM_JOB_ID, which resumes from latest"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  if [ -z "$stop_signal" ] && [ "$rc" -ne 0 ] && [ "$rc" -ne 2 ] && [ "${ENVIRONMENT:-}" = BATCH ]; then
    max_restarts=${JANUSFLOW_MAX_RESTARTS:-3}
    if [ "$restarts" -lt "$max_restarts" ]; then
      echo "[launch] the training step failed (exit $rc; the lines above say which node or rank);" \
        "requeueing job $SLURM_JOB_ID (restart $((restarts + 1)) of at most $max_restarts), which resumes from latest"
      scontrol requeue "$SLURM_JOB_ID"
      exit "$rc"
    fi
    echo "[launch] the training step failed (exit $rc) and job $SLURM_JOB_ID has restarted $restarts times" \
      "(JANUSFLOW_MAX_RESTARTS=$max_restarts): not requeued; fix the cause and submit again, it resumes from latest"
  fi
  exit "$rc"
fi

if [ -n "${SLURM_JOB_ID:-}" ]; then
  # Node launcher: one per node, all meeting at the first node of the step.
  not_a_step="this is not a SLURM job step (submit with sbatch, or $stale_slurm)"
  per_node=${SLURM_STEP_TASKS_PER_NODE:-1}
  per_node=${per_node%%[(,]*}
  if [ "$per_node" != 1 ]; then
    die "start one launcher per node (srun --ntasks-per-node=1 launch.sh --nproc N ...), not $per_node"
  fi
  # What srun sets for a step (checked for the reason given above).
  nnodes=${SLURM_STEP_NUM_NODES:-${SLURM_NNODES:-}}
  node_rank=${SLURM_PROCID:-}  # one task per node, so the task rank is the node rank
  nodelist=${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-}}
  whole "$nnodes" 1 999999999 || die "SLURM_STEP_NUM_NODES/SLURM_NNODES='$nnodes' is not a node count: $not_a_step"
  whole "$node_rank" 0 $((nnodes - 1)) || die "SLURM_PROCID='$node_rank' is not a node rank below $nnodes: $not_a_step"
  [ -n "$nodelist" ] || die "neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set: $not_a_step"
  # The rendezvous address is the first node's NodeAddr (what slurmctld itself uses to reach it; a
  # NodeName need not resolve, e.g. nodes reached over a separate fabric), else its name.
  first=$(scontrol show hostnames "$nodelist" 2>/dev/null | head -n 1) || first=""
  [ -n "$first" ] || die "scontrol cannot expand the node list '$nodelist': $not_a_step"
  master=$(scontrol show node -o "$first" 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p') || master=""
  master=${master:-$first}
  port=${JANUSFLOW_MASTER_PORT:-$((29500 + 10#$SLURM_JOB_ID % 20000))}
  echo "[launch] node $node_rank/$nnodes ($(hostname -s)), $nproc processes, master $first ($master:$port)"
  trap '' USR1  # see "Pre-emption and requeue" above: torchrun must survive it, the trainer handles it
  exec "$PY" -m torch.distributed.run --nnodes="$nnodes" --node_rank="$node_rank" \
    --nproc_per_node="$nproc" --master_addr="$master" --master_port="$port" \
    -m pretrain.main "${args[@]}"
fi

echo "[launch] local, $nproc processes"
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$nproc" -m pretrain.main "${args[@]}"
