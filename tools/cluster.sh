#!/usr/bin/env bash
# A small cluster on this machine: N nodes node0..node{N-1}, each a network namespace with its
# own hostname and address on a private bridge, sshd (root login by key only) and Slurm.
#
#   tools/cluster.sh check            can this machine host a cluster? (installs missing packages)
#   tools/cluster.sh up [N]           start N nodes (default 2); prints "NAME ADDRESS" per node
#   tools/cluster.sh exec NODE CMD... run CMD inside NODE, in this directory, with this environment
#   tools/cluster.sh kill NODE        SIGKILL every process inside NODE (the node crashes)
#   tools/cluster.sh start NODE       start NODE's daemons again (the node comes back)
#   tools/cluster.sh link NODE up|down   plug or cut NODE's network cable
#   tools/cluster.sh status           the nodes and their daemons
#   tools/cluster.sh down             stop everything it started and remove the namespaces
#
# The nodes share this machine's file system, as the nodes of a real cluster share NFS: a run
# directory, a corpus cache and .venv have the same paths everywhere. Each node sees its own
# /etc/hosts, /etc/ssh and /etc/slurm (ip-netns binds /etc/netns/NODE/* over /etc/*).
# Environment: CLUSTER_STATE (default /tmp/precond-lm-cluster), CLUSTER_SUBNET (default 10.213.7).
set -euo pipefail

STATE="${CLUSTER_STATE:-/tmp/precond-lm-cluster}"
SUBNET="${CLUSTER_SUBNET:-10.213.7}"
BRIDGE_NS=precond-bridge
PACKAGES=(openssh-server pdsh openmpi-bin slurm-wlm munge iproute2)
COMMANDS=(sshd pdsh mpirun slurmctld slurmd munged ip unshare)

fail() { echo "cluster: $*" >&2; exit 2; }
addr_of() { echo "$SUBNET.$((11 + ${1#node}))"; }
nodes() { cat "$STATE/nodes" 2>/dev/null || true; }

# ---- prerequisites ---------------------------------------------------------------------------
missing_commands() {
  local c out=()
  for c in "${COMMANDS[@]}"; do
    command -v "$c" >/dev/null 2>&1 || [ -x "/usr/sbin/$c" ] || out+=("$c")
  done
  echo "${out[*]}"
}

cmd_check() {
  [ "$(id -u)" -eq 0 ] || fail "cannot build a cluster: needs root (network namespaces, sshd, slurmd)"
  command -v ip >/dev/null 2>&1 || fail "cannot build a cluster: no 'ip' command (Debian package iproute2)"
  local missing
  missing="$(missing_commands)"
  if [ -n "$missing" ] && command -v apt-get >/dev/null 2>&1; then
    echo "cluster: installing ${PACKAGES[*]} (missing: $missing)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PACKAGES[@]}"; } >/dev/null 2>&1 || true
    missing="$(missing_commands)"
  fi
  [ -z "$missing" ] || fail "cannot build a cluster: missing $missing (Debian packages: ${PACKAGES[*]})"
  if ! ip netns add precond-probe 2>/dev/null; then
    fail "cannot build a cluster: 'ip netns add' is not permitted here"
  fi
  ip netns del precond-probe
}

# ---- inside a node ---------------------------------------------------------------------------
# in_node NODE CMD...: CMD in NODE's network namespace (with NODE's /etc files) and hostname.
in_node() {
  local node="$1"; shift
  local cores
  cores="$(cat "$STATE/$node.cores")"
  ip netns exec "$node" unshare --uts -- taskset -c "$cores" \
    sh -c 'hostname "$0" && exec "$@"' "$node" "$@"
}

write_node_etc() {
  local node="$1" etc="/etc/netns/$1"
  mkdir -p "$etc/ssh" "$etc/slurm"
  cp "$STATE/hosts" "$etc/hosts"
  cp "$STATE/ssh/"* "$etc/ssh/"
  chmod 600 "$etc/ssh/"*key
  sed "s/@ADDRESS@/$(addr_of "$node")/; s/@NODE@/$node/" "$STATE/ssh/sshd_config.in" > "$etc/ssh/sshd_config"
  rm -f "$etc/ssh/sshd_config.in"
  cp "$STATE/slurm/slurm.conf" "$STATE/slurm/cgroup.conf" "$etc/slurm/"
}

write_ssh() {
  mkdir -p "$STATE/ssh"
  ssh-keygen -q -t ed25519 -N '' -C "precond-lm cluster host" -f "$STATE/ssh/ssh_host_ed25519_key"
  ssh-keygen -q -t ed25519 -N '' -C "precond-lm cluster root" -f "$STATE/ssh/cluster_key"
  cp "$STATE/ssh/cluster_key.pub" "$STATE/ssh/authorized_keys"
  cat > "$STATE/ssh/ssh_config" <<EOF
# Every node trusts every other: the cluster's own root key, no host-key prompts.
Host *
    IdentityFile /etc/ssh/cluster_key
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
    BatchMode yes
    ConnectTimeout 5
    ServerAliveInterval 5
    ServerAliveCountMax 3
EOF
  cat > "$STATE/ssh/sshd_config.in" <<EOF
ListenAddress @ADDRESS@
Port 22
HostKey /etc/ssh/ssh_host_ed25519_key
PidFile $STATE/run/sshd-@NODE@.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile /etc/ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
PrintLastLog no
ClientAliveInterval 5
ClientAliveCountMax 3
MaxStartups 100:30:200
Subsystem sftp /usr/lib/openssh/sftp-server
EOF
}

write_slurm() {
  local n="$1" cores="$2" k
  mkdir -p "$STATE/slurm/ctld" "$STATE/munge"
  {
    echo "ClusterName=precond"
    echo "SlurmctldHost=node0($(addr_of node0))"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "AuthInfo=socket=$STATE/munge/munge.socket"
    echo "CredType=cred/munge"
    echo "StateSaveLocation=$STATE/slurm/ctld"
    echo "SlurmdSpoolDir=$STATE/slurm/spool-%n"
    echo "SlurmctldPidFile=$STATE/run/slurmctld.pid"
    echo "SlurmdPidFile=$STATE/run/slurmd-%n.pid"
    echo "SlurmctldLogFile=$STATE/log/slurmctld.log"
    echo "SlurmdLogFile=$STATE/log/slurmd-%n.log"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "JobCompType=jobcomp/filetxt"
    echo "JobCompLoc=$STATE/log/jobcomp.txt"
    echo "MpiDefault=none"
    echo "SchedulerType=sched/backfill"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core"
    echo "ReturnToService=2"
    echo "SlurmdTimeout=20"
    echo "MinJobAge=600"
    echo "KillWait=10"
    for ((k = 0; k < n; k++)); do
      echo "NodeName=node$k NodeAddr=$(addr_of "node$k") CPUs=$cores State=UNKNOWN"
    done
    echo "PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  } > "$STATE/slurm/slurm.conf"
  # slurmd refuses cgroup autodetection under a tmpfs /sys/fs/cgroup; no cgroup plugin is used.
  echo "CgroupPlugin=cgroup/v1" > "$STATE/slurm/cgroup.conf"
}

# ---- daemons ---------------------------------------------------------------------------------
start_munge() {
  dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
  chmod 700 "$STATE/munge"
  chmod 400 "$STATE/munge/munge.key"
  in_node node0 munged --force --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
    --pid-file="$STATE/run/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/seed"
}

start_node_daemons() {
  local node="$1"
  mkdir -p /run/sshd
  in_node "$node" /usr/sbin/sshd -f /etc/ssh/sshd_config -E "$STATE/log/sshd-$node.log"
  [ "$node" = node0 ] && in_node node0 slurmctld -f /etc/slurm/slurm.conf
  in_node "$node" slurmd -N "$node" -f /etc/slurm/slurm.conf
}

wait_for() {  # wait_for SECONDS WHAT CMD...: poll CMD until it succeeds
  local limit="$1" what="$2" t=0; shift 2
  until "$@" >/dev/null 2>&1; do
    t=$((t + 1))
    [ "$t" -le $((limit * 4)) ] || { echo "cluster: $what did not come up in ${limit}s" >&2; return 1; }
    sleep 0.25
  done
}

nodes_idle() {  # every node known to slurmctld and idle
  local out
  out="$(in_node node0 sinfo -h -N -o '%N %t')"
  ! echo "$out" | grep -vq ' idle$' && [ "$(echo "$out" | wc -l)" -eq "$(nodes | wc -w)" ]
}

# ---- commands --------------------------------------------------------------------------------
cmd_up() {
  local n="${1:-2}"
  [[ "$n" =~ ^[1-9][0-9]?$ ]] || fail "up $n: expected a number of nodes from 1 to 99"
  if [ -e "$STATE/nodes" ] || ip netns list | grep -q "^$BRIDGE_NS"; then
    fail "a cluster is already up ($(nodes | wc -w) nodes); 'tools/cluster.sh down' first"
  fi
  cmd_check
  trap 'echo "cluster: up failed; cleaning up" >&2; cmd_down >/dev/null 2>&1 || true' ERR
  mkdir -p "$STATE/run" "$STATE/log"
  local ncpu cores k node
  ncpu="$(nproc)"
  cores=$((ncpu / n)); [ "$cores" -ge 1 ] || cores=1
  : > "$STATE/nodes.tmp"
  { echo "127.0.0.1 localhost"; echo "::1 localhost"; } > "$STATE/hosts"
  for ((k = 0; k < n; k++)); do
    echo "node$k" >> "$STATE/nodes.tmp"
    echo "$(addr_of "node$k") node$k" >> "$STATE/hosts"
    # node k owns `cores` cores of its own (wrapping round when there are more nodes than cores)
    seq "$((k * cores))" "$((k * cores + cores - 1))" | while read -r c; do echo $((c % ncpu)); done \
      | paste -sd, > "$STATE/node$k.cores"
  done
  mv "$STATE/nodes.tmp" "$STATE/nodes"
  write_ssh
  write_slurm "$n" "$cores"

  ip netns add "$BRIDGE_NS"
  ip -n "$BRIDGE_NS" link add br0 type bridge
  ip -n "$BRIDGE_NS" link set br0 up
  for node in $(nodes); do
    ip netns add "$node"
    ip -n "$node" link set lo up
    ip -n "$node" link add eth0 type veth peer name "$node" netns "$BRIDGE_NS"
    ip -n "$node" addr add "$(addr_of "$node")/24" dev eth0
    ip -n "$node" link set eth0 up
    ip -n "$BRIDGE_NS" link set "$node" master br0 up
    write_node_etc "$node"
  done
  start_munge
  for node in $(nodes); do start_node_daemons "$node"; done
  for node in $(nodes); do
    wait_for 10 "ssh to $node" in_node node0 ssh "$node" true
  done
  wait_for 30 "slurm (every node idle)" nodes_idle
  trap - ERR
  for node in $(nodes); do echo "$node $(addr_of "$node")"; done
  echo "cluster up"
}

cmd_exec() {
  [ $# -ge 2 ] || fail "usage: tools/cluster.sh exec NODE CMD..."
  local node="$1"; shift
  nodes | grep -qx "$node" || fail "exec: no node '$node' (nodes: $(nodes | paste -sd' '))"
  in_node "$node" "$@"
}

kill_node_processes() {
  local pids
  pids="$(ip netns pids "$1" 2>/dev/null || true)"
  [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
}

cmd_kill() {
  nodes | grep -qx "${1:-}" || fail "kill: no node '${1:-}'"
  kill_node_processes "$1"
}

cmd_start() {
  nodes | grep -qx "${1:-}" || fail "start: no node '${1:-}'"
  [ "$1" != node0 ] || [ -z "$(ip netns pids node0)" ] || fail "start: node0 is running"
  rm -f "$STATE/run/sshd-$1.pid" "$STATE/run/slurmd-$1.pid"
  [ "$1" != node0 ] || start_munge
  start_node_daemons "$1"
  wait_for 10 "ssh to $1" in_node "$1" ssh "$1" true
}

cmd_link() {
  nodes | grep -qx "${1:-}" || fail "link: no node '${1:-}'"
  case "${2:-}" in
    up | down) ip -n "$BRIDGE_NS" link set "$1" "$2" ;;
    *) fail "link $1 ${2:-}: expected up or down" ;;
  esac
}

cmd_status() {
  [ -e "$STATE/nodes" ] || { echo "cluster down"; return 0; }
  local node
  for node in $(nodes); do
    echo "$node $(addr_of "$node") processes: $(ip netns pids "$node" 2>/dev/null | wc -l)"
  done
  in_node node0 sinfo -N 2>/dev/null || true
}

stop_pidfile() {
  local pid
  pid="$(cat "$1" 2>/dev/null || true)"
  [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true
}

cmd_down() {
  local f node
  for f in "$STATE"/run/*.pid; do [ -e "$f" ] && stop_pidfile "$f"; done
  sleep 0.5
  local all
  all="$( (nodes; ip netns list 2>/dev/null | awk '/^node[0-9]+( |$)/ {print $1}') | sort -u)"
  for node in $all; do kill_node_processes "$node"; done
  for f in "$STATE"/run/*.pid; do [ -e "$f" ] && kill -KILL "$(cat "$f")" 2>/dev/null || true; done
  for node in $all; do
    ip netns del "$node" 2>/dev/null || true
    rm -rf "/etc/netns/$node"
  done
  ip netns del "$BRIDGE_NS" 2>/dev/null || true
  rm -rf "$STATE"
  echo "cluster down"
}

case "${1:-}" in
  check) cmd_check && echo "cluster: this machine can host a cluster" ;;
  up) shift; cmd_up "$@" ;;
  exec) shift; cmd_exec "$@" ;;
  kill) shift; cmd_kill "$@" ;;
  start) shift; cmd_start "$@" ;;
  link) shift; cmd_link "$@" ;;
  status) cmd_status ;;
  down) cmd_down ;;
  *) fail "usage: tools/cluster.sh check | up [N] | exec NODE CMD... | kill NODE | start NODE | link NODE up|down | status | down" ;;
esac
