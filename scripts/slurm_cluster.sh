#!/usr/bin/env bash
# A private one-node SLURM cluster on this machine, for the launcher tests and for trying launch.sh.
#
#   scripts/slurm_cluster.sh start  DIR   # prints the slurm.conf path: export SLURM_CONF=<it>
#   scripts/slurm_cluster.sh status DIR
#   scripts/slurm_cluster.sh stop   DIR
#
# Everything lives in DIR: slurm.conf, the munge key and socket, controller state, slurmd spool,
# logs and pid files. It runs its own munged (own socket and key, nothing in /etc or /run), its own
# slurmctld and slurmd on free ports, so it neither needs nor disturbs a system SLURM/munge and
# several can run side by side. Nothing is exported: commands talk to it through SLURM_CONF.
# `start` is idempotent (a running cluster is left alone) and waits (bounded) until `sinfo` shows
# the node idle. `stop` cancels the cluster's jobs, then stops exactly the daemons named in DIR's
# pid files. Needs Debian's packages: apt-get install -y slurmctld slurmd slurm-client munge
#
# Settings made for tests (do not copy to a real cluster): requeued jobs may start again after
# cred_expire=10 s (SLURM's default is 120 s) and the schedulers run every 2 s.
set -euo pipefail

die() { echo "slurm_cluster: $*" >&2; exit 1; }
say() { echo "slurm_cluster: $*" >&2; }

[ $# -eq 2 ] || { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
cmd=$1
case "$cmd" in start|stop|status) ;; *) die "unknown command '$cmd' (start|stop|status)" ;; esac
[ "$cmd" = start ] && mkdir -p "$2"
if [ ! -d "$2" ]; then
  [ "$cmd" = stop ] && { say "nothing to stop in $2"; exit 0; }
  die "no cluster directory $2"
fi
dir=$(cd "$2" && pwd)
PATH=$PATH:/usr/sbin:/sbin  # the daemons live in sbin, which a non-root PATH may lack
conf=$dir/slurm.conf
export SLURM_CONF=$conf  # for this script's own sinfo/squeue/scancel only
DAEMONS=(slurmd slurmctld munged)  # stop order

pid_of() {  # pid from DIR's pid file if that process is alive and is the named daemon
  local f=$dir/run/$1.pid pid
  [ -s "$f" ] || return 1
  pid=$(tr -dc 0-9 <"$f")
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "$1" || return 1  # a recycled pid is not ours
  echo "$pid"
}

running() { local d; for d in "${DAEMONS[@]}"; do pid_of "$d" >/dev/null || return 1; done; }

node_state() { sinfo -h -N -o '%t' 2>/dev/null | head -n 1; }

stop_daemons() {
  local d pid i
  for d in "${DAEMONS[@]}"; do
    pid=$(pid_of "$d") || { rm -f "$dir/run/$d.pid"; continue; }
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    if [ -d "/proc/$pid" ]; then say "$d ($pid) ignored SIGTERM; killing"; kill -KILL "$pid" 2>/dev/null || true; fi
    rm -f "$dir/run/$d.pid"
  done
}

free_port() {  # a port in 20000-39999 on which nothing listens (bash's /dev/tcp: no extra tools)
  local p i
  for i in $(seq 50); do
    p=$((20000 + RANDOM % 20000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
  done
  die "no free port found"
}

check_installed() {
  local missing=() b
  for b in munged slurmctld slurmd sinfo sbatch squeue scontrol scancel srun; do
    command -v "$b" >/dev/null 2>&1 || missing+=("$b")
  done
  [ ${#missing[@]} -eq 0 ] || die "SLURM is not installed (missing: ${missing[*]}); install it with:
  apt-get install -y slurmctld slurmd slurm-client munge"
}

write_conf() {
  local host cpus mem_mb user
  host=$(hostname -s)
  cpus=$(nproc)
  mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)  # below the machine's
  user=$(id -un)
  cat >"$conf" <<EOF
# Written by scripts/slurm_cluster.sh: a private one-node test cluster. Regenerated on each start.
ClusterName=janusflow-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
KillWait=10
InactiveLimit=0
# Job ids (and so launch.sh's rendezvous ports) differ between clusters started side by side.
FirstJobId=$((1000 + RANDOM % 18000))
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  check_installed
  if running; then
    say "already running in $dir"
    echo "$conf"
    return
  fi
  stop_daemons  # whatever half of a previous start is still alive
  mkdir -p "$dir"/{state,spool,log,run,munge}
  chmod 700 "$dir/munge"
  write_conf

  if [ ! -s "$dir/munge/munge.key" ]; then
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1k count=1 status=none
  fi
  chmod 400 "$dir/munge/munge.key"
  munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" \
    --seed-file="$dir/munge/munged.seed" \
    || die "munged failed to start; see $dir/log/munged.log"
  local i
  for i in $(seq 50); do [ -S "$dir/munge/munge.socket" ] && break; sleep 0.1; done

  slurmctld -f "$conf" || die "slurmctld failed to start; see $dir/log/slurmctld.log"
  slurmd -f "$conf" || die "slurmd failed to start; see $dir/log/slurmd.log"

  local state=""
  for i in $(seq 60); do  # at most ~30 s
    state=$(node_state)
    case "$state" in
      idle) break ;;
      down*|drain*) scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  if [ "$state" != idle ]; then
    say "the node did not become idle (state '${state:-none}'); last slurmctld/slurmd log lines:"
    tail -n 5 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 2>/dev/null || true
    stop_daemons
    exit 1
  fi
  say "running in $dir (node $(hostname -s), $(nproc) CPUs)"
  echo "$conf"
}

stop() {
  if pid_of slurmctld >/dev/null; then
    # Jobs first, so no slurmstepd outlives its slurmd.
    local ids i
    ids=$(squeue -h -o '%i' 2>/dev/null || true)
    if [ -n "$ids" ]; then
      # shellcheck disable=SC2086
      scancel $ids 2>/dev/null || true
      for i in $(seq 30); do [ -z "$(squeue -h -t running,completing -o '%i' 2>/dev/null)" ] && break; sleep 0.5; done
    fi
  fi
  stop_daemons
  say "stopped ($dir)"
}

status() {
  local d pid rc=0
  for d in munged slurmctld slurmd; do
    if pid=$(pid_of "$d"); then echo "$d: running (pid $pid)"; else echo "$d: not running"; rc=1; fi
  done
  if [ $rc -eq 0 ]; then echo "SLURM_CONF=$conf"; sinfo || rc=1; fi
  return $rc
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) status ;;
esac
