#!/usr/bin/env bash
# A single-node Slurm on localhost for the executor tests: munge + slurmctld + slurmd, no cgroups.
# Usage: scripts/slurm-local.sh start|stop|status   (as root; installs slurm-wlm and munge with apt if missing)
# STATE (default /tmp/normlab-slurm) holds the config, spool, logs and pid files.
set -euo pipefail
STATE=${NORMLAB_SLURM_STATE:-/tmp/normlab-slurm}
CPUS=${NORMLAB_SLURM_CPUS:-$(nproc)}
CONF=$STATE/slurm.conf
export SLURM_CONF=$CONF

install() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return
    [ "$(id -u)" = 0 ] || { echo "slurm-local: slurm-wlm/munge missing and not root" >&2; exit 1; }
    for i in 1 2 3; do  # apt's lock may be held by another apt run: retry
        timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq \
            slurm-wlm munge && return
        sleep 10
    done
    exit 1
}

start() {
    install
    mkdir -p "$STATE"/{spool/ctld,spool/d,log} /etc/munge /var/log/munge /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    chown -R munge:munge /etc/munge /var/log/munge /run/munge 2>/dev/null || true
    chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
    pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged || /usr/sbin/munged --force
    local host; host=$(hostname -s)
    local mem; mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
    cat > "$CONF" <<CONF
ClusterName=normlab
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job waits cred_expire seconds before it may start again (default 120): short for tests
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=5,bf_interval=5
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=30
KillWait=10
NodeName=$host CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
    pgrep -f "slurmctld -f $CONF" >/dev/null || /usr/sbin/slurmctld -f "$CONF"
    pgrep -f "slurmd -f $CONF" >/dev/null || /usr/sbin/slurmd -f "$CONF"
    for _ in $(seq 60); do
        if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            echo "slurm-local: up ($CONF)"; return
        fi
        sleep 1
    done
    echo "slurm-local: the node did not become idle; see $STATE/log" >&2
    sinfo >&2 || true
    exit 1
}

stop() {
    for f in "$STATE/slurmd.pid" "$STATE/slurmctld.pid"; do
        [ -s "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
    done
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) sinfo ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
