#!/usr/bin/env bash
# A private SLURM cluster on this machine, of one or two nodes, for the launcher tests and for trying launch.sh.
#
#   scripts/slurm_cluster.sh start  DIR [--nodes 2]  # prints the slurm.conf path
#   scripts/slurm_cluster.sh exec   DIR COMMAND...   # runs a SLURM command there: sbatch, squeue, ...
#   scripts/slurm_cluster.sh status DIR
#   scripts/slurm_cluster.sh stop   DIR
#
# Everything lives in DIR: slurm.conf, the munge key and socket, controller state, slurmd spools,
# logs and pid files. It runs its own munged (own socket and key, nothing in /etc or /run), its own
# slurmctld and slurmd(s), so it neither needs nor disturbs a system SLURM/munge and several can run
# side by side. Nothing is exported: commands talk to it through SLURM_CONF (`exec` sets it).
#
# One node (the default): this machine under its own name, daemons on free ports of 127.0.0.1;
# `export SLURM_CONF=<printed path>` and use sbatch/squeue directly.
# Two nodes (root only; needs iproute2 and util-linux's unshare): node1 and node2 are two network
# namespaces joined by a veth pair, at 10.213.0.1 and 10.213.0.2; each node's daemons also get their
# own hostname (node1, node2) and an /etc/hosts naming both (bind-mounted in a private mount
# namespace), so a job on node2 sees a machine called node2. slurmctld runs on node1 and one munged
# serves both (its socket is a file in DIR). The host's interfaces, addresses and routes are not
# touched, so the cluster is reachable only from inside: `exec` runs a command on node1, as on a login
# node, e.g. scripts/slurm_cluster.sh exec DIR sbatch --nodes=2 launch.sh --recipe recipes/tiny_cpu.yaml
# DIR/netns names each node's namespace (`ip netns pids <it>` lists the node's processes).
#
# `start` is idempotent (a running cluster is left alone) and waits (bounded) until every node is
# idle; a start that fails removes what it made. `stop` cancels the cluster's jobs, stops exactly the
# daemons named in DIR's pid files and, for two nodes, ends what is left in the namespaces and deletes
# them. Needs Debian's packages: apt-get install -y slurmctld slurmd slurm-client munge (and iproute2).
# Exit status 3: this machine cannot host the cluster (not installed, not root, no namespaces).
#
# Settings made for tests (do not copy to a real cluster): requeued jobs may start again after
# cred_expire=10 s (SLURM's default is 120 s) and the schedulers run every 2 s.
set -euo pipefail

die() { echo "slurm_cluster: $*" >&2; exit 1; }
unavailable() { echo "slurm_cluster: $*" >&2; exit 3; }
say() { echo "slurm_cluster: $*" >&2; }
usage() { sed -n '4,7p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

[ $# -ge 2 ] || usage
cmd=$1
case "$cmd" in start|stop|status|exec) ;; *) die "unknown command '$cmd' (start|exec|status|stop)" ;; esac
[ "$cmd" = start ] && mkdir -p "$2"
if [ ! -d "$2" ]; then
  [ "$cmd" = stop ] && { say "nothing to stop in $2"; exit 0; }
  die "no cluster directory $2"
fi
dir=$(cd "$2" && pwd)
shift 2
PATH=$PATH:/usr/sbin:/sbin  # the daemons live in sbin, which a non-root PATH may lack
conf=$dir/slurm.conf
export SLURM_CONF=$conf  # for this script's own commands and those `exec` runs

nodes=1
if [ "$cmd" = start ]; then
  case "${1:-}" in
    "") ;;
    --nodes) [ $# -eq 2 ] || usage; nodes=$2 ;;
    *) usage ;;
  esac
  case "$nodes" in 1|2) ;; *) die "--nodes: 1 or 2, not '$nodes'" ;; esac
elif [ -s "$dir/nodes" ]; then
  nodes=$(tr -dc 0-9 <"$dir/nodes")
fi
[ "$cmd" = exec ] && [ $# -eq 0 ] && usage

# Two nodes: node I is network namespace $(netns_of I) at 10.213.0.I. The name is unique per DIR.
NS_PREFIX=jf$(printf '%s' "$dir" | cksum | cut -d' ' -f1)
netns_of() { echo "$NS_PREFIX-node$1"; }
node_addr() { echo "10.213.0.$1"; }

in_node() {  # in_node I COMMAND...: COMMAND inside node I (its network namespace, hostname, /etc/hosts)
  local i=$1
  shift
  # nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup filesystem slurmd needs.
  nsenter --net="/run/netns/$(netns_of "$i")" unshare --uts --mount --propagation private \
    sh -c 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"' sh "$dir/hosts" "node$i" "$@"
}

on_cluster() {  # a client command where it reaches slurmctld: here, or on node1
  if [ "$nodes" = 2 ]; then in_node 1 "$@"; else "$@"; fi
}

# Daemons as pid-file:binary, in stop order. slurmd's pid file is per node (SlurmdPidFile ...-%n).
daemons() {
  if [ "$nodes" = 2 ]; then echo slurmd-node2:slurmd slurmd-node1:slurmd slurmctld:slurmctld munged:munged
  else echo slurmd:slurmd slurmctld:slurmctld munged:munged; fi
}

pid_of() {  # pid_of FILE BINARY: pid from DIR/run/FILE.pid if that process is alive and is BINARY
  local f=$dir/run/$1.pid pid
  [ -s "$f" ] || return 1
  pid=$(tr -dc 0-9 <"$f")
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "$2" || return 1  # a recycled pid is not ours
  echo "$pid"
}

running() {
  local d
  for d in $(daemons); do pid_of "${d%%:*}" "${d##*:}" >/dev/null || return 1; done
}

stop_daemons() {
  local d pid i
  for d in $(daemons); do
    pid=$(pid_of "${d%%:*}" "${d##*:}") || { rm -f "$dir/run/${d%%:*}.pid"; continue; }
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    if [ -d "/proc/$pid" ]; then say "${d##*:} ($pid) ignored SIGTERM; killing"; kill -KILL "$pid" 2>/dev/null || true; fi
    rm -f "$dir/run/${d%%:*}.pid"
  done
}

remove_namespaces() {  # whatever still runs in them (job steps of a dead slurmd) ends with them
  local i ns pids
  for i in 1 2; do
    ns=$(netns_of "$i")
    [ -e "/run/netns/$ns" ] || continue
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    # shellcheck disable=SC2086
    [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
    ip netns delete "$ns" 2>/dev/null || say "could not delete network namespace $ns"
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
  [ ${#missing[@]} -eq 0 ] || unavailable "SLURM is not installed (missing: ${missing[*]}); install it with:
  apt-get install -y slurmctld slurmd slurm-client munge"
  [ "$nodes" = 2 ] || return 0
  [ "$(id -u)" = 0 ] || unavailable "two nodes need root (network namespaces); this is $(id -un)"
  for b in ip nsenter unshare mount hostname; do
    command -v "$b" >/dev/null 2>&1 || unavailable "two nodes need '$b' (apt-get install -y iproute2 util-linux)"
  done
  local probe=$NS_PREFIX-probe
  ip netns add "$probe" 2>/dev/null && nsenter --net="/run/netns/$probe" unshare --uts --mount true 2>/dev/null \
    || { ip netns delete "$probe" 2>/dev/null || true
         unavailable "cannot create network, UTS and mount namespaces here (a container without CAP_SYS_ADMIN?)"; }
  ip netns delete "$probe"
}

write_conf() {
  local host cpus mem_mb user i
  cpus=$(nproc)
  mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)  # below the machine's
  user=$(id -un)
  if [ "$nodes" = 2 ]; then
    # Ports inside the namespaces are private to this cluster: the defaults are free.
    {
      echo "# Written by scripts/slurm_cluster.sh: a private two-node test cluster. Regenerated on each start."
      echo "SlurmctldHost=node1($(node_addr 1))"
      echo "SlurmctldPort=6817"
      echo "SlurmdPort=6818"
      echo "SlurmdPidFile=$dir/run/slurmd-%n.pid"
      echo "SlurmdSpoolDir=$dir/spool/%n"
      echo "SlurmdLogFile=$dir/log/slurmd-%n.log"
    } >"$conf"
  else
    host=$(hostname -s)
    {
      echo "# Written by scripts/slurm_cluster.sh: a private one-node test cluster. Regenerated on each start."
      echo "SlurmctldHost=$host(127.0.0.1)"
      echo "SlurmctldPort=$(free_port)"
      echo "SlurmdPort=$(free_port)"
      echo "SlurmdPidFile=$dir/run/slurmd.pid"
      echo "SlurmdSpoolDir=$dir/spool"
      echo "SlurmdLogFile=$dir/log/slurmd.log"
    } >"$conf"
  fi
  cat >>"$conf" <<EOF
ClusterName=janusflow-test
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmctldLogFile=$dir/log/slurmctld.log
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
# A loaded test machine (2 cores shared with other jobs) can keep a slurmd from answering within the
# default 10 s. A request that timed out is retried a minute later, and a retried kill of step N.0
# then cancels step N.0 of the job's next start (a requeued job keeps its id): seen here at load 13.
MessageTimeout=30
InactiveLimit=0
# Job ids (and so launch.sh's rendezvous ports) differ between clusters started side by side.
FirstJobId=$((1000 + RANDOM % 18000))
EOF
  if [ "$nodes" = 2 ]; then
    for i in 1 2; do
      echo "NodeName=node$i NodeAddr=$(node_addr "$i") CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN" >>"$conf"
    done
    echo "PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP" >>"$conf"
  else
    echo "NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN" >>"$conf"
    echo "PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP" >>"$conf"
  fi
}

make_network() {  # two namespaces, one veth pair (named jf0 on both sides), a hosts file naming the nodes
  local i
  for i in 1 2; do
    ip netns add "$(netns_of "$i")"
    ip -n "$(netns_of "$i")" link set lo up
  done
  ip -n "$(netns_of 1)" link add jf0 type veth peer name jf0 netns "$(netns_of 2)"
  for i in 1 2; do
    ip -n "$(netns_of "$i")" addr add "$(node_addr "$i")/24" dev jf0
    ip -n "$(netns_of "$i")" link set jf0 up
  done
  printf '127.0.0.1 localhost\n%s node1\n%s node2\n' "$(node_addr 1)" "$(node_addr 2)" >"$dir/hosts"
  printf 'node1 %s\nnode2 %s\n' "$(netns_of 1)" "$(netns_of 2)" >"$dir/netns"
}

node_states() { on_cluster sinfo -h -N -o '%N %t' 2>/dev/null || true; }

wait_idle() {  # every node idle within ~30 s, else show the logs and fail
  local i states
  for i in $(seq 60); do
    states=$(node_states)
    if [ -n "$states" ] && ! grep -qv ' idle$' <<<"$states"; then return 0; fi
    # A node that was down (a previous cluster's state) is put back.
    grep -E ' (down|drain)' <<<"$states" | while read -r name _; do
      on_cluster scontrol update nodename="$name" state=resume >/dev/null 2>&1 || true
    done
    sleep 0.5
  done
  say "the nodes did not become idle (states: $(tr '\n' ' ' <<<"${states:-none}")); last log lines:"
  tail -n 5 "$dir"/log/slurm*.log >&2 2>/dev/null || true
  return 1
}

start() {
  check_installed
  local wanted=$nodes
  [ ! -s "$dir/nodes" ] || nodes=$(tr -dc 0-9 <"$dir/nodes")
  if [ "$nodes" = "$wanted" ] && running; then
    say "already running in $dir"
    echo "$conf"
    return
  fi
  stop_daemons  # whatever is left of a previous cluster here, in its own shape
  [ "$nodes" != 2 ] || remove_namespaces
  nodes=$wanted
  echo "$nodes" >"$dir/nodes"
  trap 'say "start failed; removing what it made"; stop_daemons; [ "$nodes" != 2 ] || remove_namespaces' EXIT
  mkdir -p "$dir"/{state,spool,log,run,munge}
  [ "$nodes" != 2 ] || mkdir -p "$dir"/spool/node{1,2}
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

  if [ "$nodes" = 2 ]; then
    make_network
    in_node 1 slurmctld -f "$conf" || die "slurmctld failed to start; see $dir/log/slurmctld.log"
    for i in 1 2; do
      in_node "$i" slurmd -f "$conf" || die "slurmd on node$i failed to start; see $dir/log/slurmd-node$i.log"
    done
  else
    slurmctld -f "$conf" || die "slurmctld failed to start; see $dir/log/slurmctld.log"
    slurmd -f "$conf" || die "slurmd failed to start; see $dir/log/slurmd.log"
  fi
  wait_idle || exit 1
  trap - EXIT
  if [ "$nodes" = 2 ]; then
    say "running in $dir: node1 $(node_addr 1) (slurmctld), node2 $(node_addr 2); $(nproc) CPUs each"
  else
    say "running in $dir (node $(hostname -s), $(nproc) CPUs)"
  fi
  echo "$conf"
}

stop() {
  if pid_of slurmctld slurmctld >/dev/null; then
    # Jobs first, so no slurmstepd outlives its slurmd.
    local ids i
    ids=$(on_cluster squeue -h -o '%i' 2>/dev/null || true)
    if [ -n "$ids" ]; then
      # shellcheck disable=SC2086
      on_cluster scancel $ids 2>/dev/null || true
      for i in $(seq 30); do
        [ -z "$(on_cluster squeue -h -t running,completing -o '%i' 2>/dev/null)" ] && break
        sleep 0.5
      done
    fi
  fi
  stop_daemons
  [ "$nodes" != 2 ] || remove_namespaces
  say "stopped ($dir)"
}

status() {
  local d pid rc=0
  for d in $(daemons); do
    if pid=$(pid_of "${d%%:*}" "${d##*:}"); then echo "${d%%:*}: running (pid $pid)"; else echo "${d%%:*}: not running"; rc=1; fi
  done
  if [ $rc -eq 0 ]; then echo "SLURM_CONF=$conf"; on_cluster sinfo || rc=1; fi
  return $rc
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  exec) on_cluster "$@" ;;
esac
