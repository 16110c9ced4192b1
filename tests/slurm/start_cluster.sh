#!/usr/bin/env bash
# A single-node Slurm cluster on this host for tests/test_slurm.py: munged, slurmctld and slurmd, one CPU
# partition whose node is this machine with its real CPUs and memory (as `slurmd -C` reports them).
#
# Usage (as root): bash tests/slurm/start_cluster.sh        # idempotent: returns at once when already up
#                  bash tests/slurm/start_cluster.sh stop
# Installs Debian's slurm-wlm and munge with apt when missing. Everything the cluster writes (config, state,
# logs) lives in $MQSAM2_SLURM_DIR (default /tmp/mqsam2-slurm); clients find it through
# SLURM_CONF=$MQSAM2_SLURM_DIR/slurm.conf. No cgroups: proctrack/linuxproc and task/none run in containers.
# Exit status 0 once `sinfo` shows the node idle; otherwise non-zero with the reason on stderr.
set -euo pipefail

DIR=${MQSAM2_SLURM_DIR:-/tmp/mqsam2-slurm}
export SLURM_CONF=$DIR/slurm.conf
PARTITION=cpu

fail() {
    echo "start_cluster: $*" >&2
    exit 1
}

stop() {
    for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; do
        [[ -s $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
        rm -f "$pidfile"
    done
}

if [[ ${1:-} == stop ]]; then
    stop
    exit 0
fi

if [[ -s $SLURM_CONF ]] && sinfo -h -p "$PARTITION" -o %T 2>/dev/null | grep -qx idle; then
    echo "start_cluster: already up (SLURM_CONF=$SLURM_CONF)"
    exit 0
fi

[[ $(id -u) == 0 ]] || fail "must run as root to install and start slurmctld/slurmd (running as $(id -un))"
mkdir -p "$DIR/state" "$DIR/spool"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    echo "start_cluster: installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -q && apt-get install -y -q --no-install-recommends slurm-wlm munge; } >"$DIR/apt.log" 2>&1 ||
        fail "apt-get install slurm-wlm munge failed (log: $DIR/apt.log)"
fi

if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    install -d -o munge -g munge -m 755 /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged || fail "munged did not start"
    munge -n | unmunge >/dev/null || fail "munge credentials do not round-trip"
fi

stop
host=$(hostname -s)
node_line=$(slurmd -C | head -n 1)
[[ $node_line == NodeName=* ]] || fail "slurmd -C could not describe this node: $node_line"
cat >"$SLURM_CONF" <<EOF
# Written by tests/slurm/start_cluster.sh: a one-node test cluster, no cgroups, no accounting.
ClusterName=mqsam2-ci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=3600
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

slurmctld -c || fail "slurmctld did not start: $(tail -n 5 "$DIR/slurmctld.log" 2>/dev/null)"
slurmd || fail "slurmd did not start: $(tail -n 5 "$DIR/slurmd.log" 2>/dev/null)"
for _ in $(seq 60); do
    state=$(sinfo -h -p "$PARTITION" -o %T 2>/dev/null || true)
    if [[ $state == idle ]]; then
        echo "start_cluster: node $host idle in partition $PARTITION (SLURM_CONF=$SLURM_CONF)"
        exit 0
    fi
    sleep 1
done
fail "node never became idle (sinfo: ${state:-no answer}); logs: $(tail -n 3 "$DIR/slurmctld.log" "$DIR/slurmd.log" 2>/dev/null)"
