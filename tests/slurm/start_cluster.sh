#!/usr/bin/env bash
# A single-node Slurm cluster on this host for tests/test_slurm.py: munged, slurmctld and slurmd, one CPU
# partition whose node is this machine with its real CPUs and memory (as `slurmd -C` reports them).
#
# Usage (as root): bash tests/slurm/start_cluster.sh        # idempotent: returns at once when already up
#                  bash tests/slurm/start_cluster.sh stop   # ends the daemons this script started
# The suite starts it (tests/conftest.py, fixture slurm_cluster) and stops it when the session ends.
# When Slurm or munge is missing, Debian's packages (and the libraries they need that are missing) are downloaded
# with apt and unpacked into $MQSAM2_SLURM_DIR/prefix, not installed: the system's packages stay as they were.
# Everything the cluster writes (config, state, logs, its own munge key and socket: the system's munged is
# neither used nor touched) lives in $MQSAM2_SLURM_DIR (default /tmp/mqsam2-slurm). Clients need the variables
# of $MQSAM2_SLURM_DIR/env (SLURM_CONF, and PATH and LD_LIBRARY_PATH for an unpacked prefix).
# No cgroups: proctrack/linuxproc and task/none run in containers.
# Exit status 0 once `sinfo` shows the node idle ("started" or "already up" on stdout); otherwise non-zero
# with the reason on stderr.
set -euo pipefail

DIR=${MQSAM2_SLURM_DIR:-/tmp/mqsam2-slurm}
export SLURM_CONF=$DIR/slurm.conf
PARTITION=cpu
PREFIX=$DIR/prefix
LIBS=$PREFIX/usr/lib/x86_64-linux-gnu

use_prefix() {
    export PATH=$PREFIX/usr/sbin:$PREFIX/usr/bin:$PATH
    export LD_LIBRARY_PATH=$LIBS:$LIBS/slurm-wlm${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
}

unpack() {
    # the packages apt would install here, unpacked instead (no maintainer scripts, nothing under /usr)
    local packages
    export DEBIAN_FRONTEND=noninteractive
    packages=$(apt-get install -s -q --no-install-recommends slurmctld slurmd slurm-client munge 2>/dev/null |
        awk '/^Inst /{print $2}') || true
    if [[ -z $packages ]]; then
        apt-get update -q >"$DIR/apt.log" 2>&1 || fail "apt-get update failed (log: $DIR/apt.log)"
        packages=$(apt-get install -s -q --no-install-recommends slurmctld slurmd slurm-client munge |
            awk '/^Inst /{print $2}')
    fi
    mkdir -p "$DIR/debs" "$PREFIX"
    # shellcheck disable=SC2086
    (cd "$DIR/debs" && apt-get download -q $packages) >>"$DIR/apt.log" 2>&1 ||
        fail "apt-get download of $packages failed (log: $DIR/apt.log)"
    for deb in "$DIR"/debs/*.deb; do
        dpkg-deb -x "$deb" "$PREFIX"
    done
    # Debian puts the daemons behind update-alternatives (slurmd -> slurmd-wlm), which unpacking does not run
    for daemon in slurmctld slurmd slurmstepd; do
        if [[ -e $PREFIX/usr/sbin/$daemon-wlm ]]; then
            ln -sf "$daemon-wlm" "$PREFIX/usr/sbin/$daemon"
        fi
    done
}

fail() {
    echo "start_cluster: $*" >&2
    exit 1
}

stop() {
    # slurmd first (it ends its job steps), munged last (the others authenticate through it); each is waited for
    for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munge/munged.pid"; do
        if [[ -s $pidfile ]]; then
            pid=$(cat "$pidfile")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.2
            done
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$pidfile"
    done
}

if [[ ${1:-} == stop ]]; then
    stop
    exit 0
fi

if [[ -d $PREFIX ]]; then
    use_prefix
fi
if [[ -s $SLURM_CONF ]] && sinfo -h -p "$PARTITION" -o %T 2>/dev/null | grep -qx idle; then
    echo "start_cluster: already up (SLURM_CONF=$SLURM_CONF)"
    exit 0
fi

[[ $(id -u) == 0 ]] || fail "must run as root to start slurmctld/slurmd (running as $(id -un))"
mkdir -p "$DIR/state" "$DIR/spool"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    echo "start_cluster: unpacking slurm-wlm and munge into $PREFIX (nothing is installed on the system)"
    unpack
    use_prefix
fi
plugins=""
echo "SLURM_CONF=$SLURM_CONF" >"$DIR/env"
if [[ -d $PREFIX ]]; then
    plugins="PluginDir=$LIBS/slurm-wlm"
    printf 'PATH=%s\nLD_LIBRARY_PATH=%s\n' "$PATH" "$LD_LIBRARY_PATH" >>"$DIR/env"
fi

MUNGE=$DIR/munge
mkdir -p "$MUNGE"
chmod 700 "$MUNGE"
[[ -s $MUNGE/munge.key ]] || { head -c 1024 /dev/urandom >"$MUNGE/munge.key" && chmod 400 "$MUNGE/munge.key"; }
stop
munged --force --key-file="$MUNGE/munge.key" --socket="$MUNGE/munge.socket" --pid-file="$MUNGE/munged.pid" \
    --log-file="$MUNGE/munged.log" --seed-file="$MUNGE/munged.seed" || fail "munged did not start"
munge -S "$MUNGE/munge.socket" -n | unmunge -S "$MUNGE/munge.socket" >/dev/null ||
    fail "munge credentials do not round-trip"

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
AuthInfo=socket=$MUNGE/munge.socket
$plugins
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
slurmd -d "$(command -v slurmstepd)" || fail "slurmd did not start: $(tail -n 5 "$DIR/slurmd.log" 2>/dev/null)"
for _ in $(seq 60); do
    state=$(sinfo -h -p "$PARTITION" -o %T 2>/dev/null || true)
    if [[ $state == idle ]]; then
        echo "start_cluster: started; node $host idle in partition $PARTITION (SLURM_CONF=$SLURM_CONF)"
        exit 0
    fi
    sleep 1
done
fail "node never became idle (sinfo: ${state:-no answer}); logs: $(tail -n 3 "$DIR/slurmctld.log" "$DIR/slurmd.log" 2>/dev/null)"
