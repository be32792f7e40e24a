#!/usr/bin/env bash
# A one-node Slurm on this machine (munged, slurmctld, slurmd from Debian packages), to run the
# slurm/*.sbatch templates as shipped and the `slurm`-marked tests (tests/test_slurm.py).
#
#   scripts/slurm-localhost.sh start     # install if needed (root, apt), write the config, start
#   scripts/slurm-localhost.sh status    # which daemons run, sinfo; exit 0 only when the node is up
#   scripts/slurm-localhost.sh stop      # stop exactly the daemons `start` started (pid files)
#   scripts/slurm-localhost.sh install   # only the packages: slurm-wlm munge libpmix-dev
#
# Idempotent: `start` with everything running does nothing (with a changed setting, it rewrites
# the config and restarts the slurmctld and slurmd it started); a munged that already answers
# (started by the system, say) is used and left alone by `stop`.
#
# The node: this host's short name on 127.0.0.1, CPUs = max(4, cores) declared with
# SlurmdParameters=config_overrides (so a 4-rank job fits on a 2-core machine: the ranks share
# the cores), no GPUs (submit the templates in CPU mode: docs/cluster.md), MpiDefault=none
# as on a stock install (the templates pass --mpi themselves), no accounting, no cgroups.
#
# Environment:
#   HPCATTN_SLURM_DIR   state, logs and pid files (default /var/tmp/hpcattn-slurm)
#   HPCATTN_SLURM_CPUS  CPUs of the node (default max(4, nproc))
#   SLURM_CONF          the config file to write and use (default /etc/slurm/slurm.conf); an
#                       existing file not written by this script is never overwritten
# Exit status: 0 ok; 1 a daemon did not come up (its log is printed); 2 cannot install
# (not root, no apt-get) or a foreign config is in the way.
set -euo pipefail

export PATH=/usr/sbin:/sbin:$PATH             # the daemons live in sbin
DIR=${HPCATTN_SLURM_DIR:-/var/tmp/hpcattn-slurm}
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
export SLURM_CONF=$CONF
MARK="# written by hpcattn scripts/slurm-localhost.sh"
PKGS=(slurm-wlm munge libpmix-dev)
NODE=$(hostname -s)
CORES=$(nproc)
CPUS=${HPCATTN_SLURM_CPUS:-$(( CORES < 4 ? 4 : CORES ))}
MUNGE_SOCKET=/run/munge/munge.socket.2
CHANGED=0

say() { echo "slurm-localhost: $*"; }
die() { echo "slurm-localhost: error: $2" >&2; exit "$1"; }

have_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null &&
    command -v sbatch >/dev/null && compgen -G "/usr/lib/*/libpmix.so" >/dev/null
}

install() {
  if have_packages; then return 0; fi
  [[ $(id -u) == 0 ]] || die 2 "not root: cannot install ${PKGS[*]} (install them, or run as root)"
  command -v apt-get >/dev/null || die 2 "no apt-get: install Slurm (slurmctld, slurmd, sbatch), munge and libpmix by hand"
  say "installing ${PKGS[*]} (apt-get)"
  local t0=$SECONDS
  DEBIAN_FRONTEND=noninteractive apt-get update -qq || die 2 "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null ||
    die 2 "apt-get install ${PKGS[*]} failed"
  have_packages || die 2 "apt-get install ${PKGS[*]} did not provide slurmctld, slurmd, munged and libpmix.so"
  say "installed in $(( SECONDS - t0 )) s"
}

# pid of a daemon we started, if it still runs ("" otherwise)
ours() {
  local f=$DIR/$1.pid pid
  [[ -s $f ]] || return 0
  pid=$(<"$f")
  if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && grep -qa "$1" "/proc/$pid/cmdline" 2>/dev/null; then
    echo "$pid"
  fi
}

munge_works() { munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; }

write_conf() {
  if [[ -e $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
    die 2 "$CONF exists and was not written by this script; set SLURM_CONF=/another/slurm.conf to use this one-node Slurm"
  fi
  mkdir -p "$(dirname "$CONF")" "$DIR/state" "$DIR/spool"
  local tmp=$CONF.new.$$
  cat >"$tmp" <<EOF
$MARK (do not edit: \`start\` rewrites it)
ClusterName=hpcattn-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldPort=${HPCATTN_SLURMCTLD_PORT:-6817}
SlurmdPort=${HPCATTN_SLURMD_PORT:-6818}
# a stock install's default: srun starts plain processes unless told --mpi=...
MpiDefault=none
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# the node as declared here, not as probed: $CPUS CPUs on $CORES cores
SlurmdParameters=config_overrides
ReturnToService=2
# a job that a restart of the daemons found running is failed, not run again from the start
JobRequeue=0
# finished jobs stay visible to scontrol for 10 minutes; scancel's SIGKILL follows SIGTERM after 5 s
MinJobAge=600
KillWait=5
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  if [[ -e $CONF ]] && cmp -s "$tmp" "$CONF"; then rm -f "$tmp"; else mv "$tmp" "$CONF"; CHANGED=1; fi
}

wait_for() {   # wait_for SECONDS DESCRIPTION COMMAND...
  local n=$(( $1 * 5 )) what=$2; shift 2
  while (( n-- > 0 )); do "$@" && return 0; sleep 0.2; done
  return 1
}

node_up() { [[ $(sinfo -h -n "$NODE" -o %t 2>/dev/null) =~ ^(idle|mix|alloc)$ ]]; }

start() {
  [[ $(id -u) == 0 ]] || die 2 "not root: this one-node Slurm runs its daemons as root (SlurmUser=root)"
  install
  write_conf
  if ! munge_works; then
    [[ -z $(ours munged) ]] || die 1 "munged (pid $(ours munged)) runs but does not answer on $MUNGE_SOCKET"
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    [[ -s /etc/munge/munge.key ]] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 2>/dev/null; chmod 400 /etc/munge/munge.key; }
    chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge/munge.key 2>/dev/null || true
    say "starting munged"
    /usr/sbin/munged --force -S "$MUNGE_SOCKET" --pid-file="$DIR/munged.pid" --log-file="$DIR/munged.log"
    wait_for 10 munged munge_works || { tail -n 20 "$DIR/munged.log" >&2; die 1 "munged did not come up"; }
  fi
  if (( CHANGED )); then   # a new node or port setting needs fresh daemons, not a reconfigure
    stop_daemon slurmd
    stop_daemon slurmctld
  fi
  if [[ -z $(ours slurmctld) ]]; then
    say "starting slurmctld ($CPUS CPUs on $NODE)"
    /usr/sbin/slurmctld -f "$CONF"
  fi
  wait_for 20 slurmctld scontrol ping >/dev/null 2>&1 ||
    { tail -n 20 "$DIR/slurmctld.log" >&2; die 1 "slurmctld did not answer (log above: $DIR/slurmctld.log)"; }
  if [[ -z $(ours slurmd) ]]; then
    say "starting slurmd"
    /usr/sbin/slurmd -f "$CONF" -N "$NODE"
  fi
  if ! wait_for 30 node node_up; then
    scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
    wait_for 10 node node_up || { tail -n 20 "$DIR/slurmd.log" >&2; sinfo >&2 || true
                                  die 1 "node $NODE is not up (log above: $DIR/slurmd.log)"; }
  fi
  say "up: partition local, node $NODE, $CPUS CPUs (SLURM_CONF=$CONF, logs in $DIR)"
}

stop_daemon() {   # stop_daemon NAME: the one this script started, by its pid file
  local pid
  pid=$(ours "$1")
  if [[ -n $pid ]]; then
    say "stopping $1 (pid $pid)"
    kill "$pid" 2>/dev/null || true          # it may have exited since ours() looked
    wait_for 15 "$1" bash -c "! kill -0 $pid 2>/dev/null" || { say "$1 did not stop: SIGKILL"; kill -9 "$pid" 2>/dev/null || true; }
  fi
  rm -f "$DIR/$1.pid"
}

stop() {
  local d
  for d in slurmd slurmctld munged; do stop_daemon "$d"; done
}

status() {
  local d pid rc=0
  for d in munged slurmctld slurmd; do
    pid=$(ours "$d")
    if [[ -n $pid ]]; then say "$d: running (pid $pid, started by this script)"
    elif [[ $d == munged ]] && munge_works; then say "munged: running (not started by this script)"
    else say "$d: not running"; rc=1; fi
  done
  if (( rc == 0 )); then sinfo -N -o "%N %t %c" || rc=1; node_up || rc=1; fi
  return $rc
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  install) install ;;
  *) echo "usage: $0 start|stop|status|install" >&2; exit 2 ;;
esac
