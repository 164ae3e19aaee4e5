#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, from Debian's packages, for trying
# scripts/slurm/ and for tests/slurm.rs. Needs root (the daemons run as root)
# and apt-get; Debian 12's Slurm is 22.05.
#
#   scripts/slurm/local-cluster.sh start    install slurm-wlm and munge (once), write
#                                           /etc/slurm/slurm.conf, create the munge key,
#                                           start munged, slurmctld and slurmd, and wait
#                                           until sinfo shows the node idle
#   scripts/slurm/local-cluster.sh install  only install slurm-wlm and munge (scripts/setup.sh calls it as root)
#   scripts/slurm/local-cluster.sh stop     cancel every job, stop the daemons it started
#   scripts/slurm/local-cluster.sh status   sinfo and squeue
#
# Idempotent: start on a running cluster only checks it. The configuration:
# ClusterName=orchestrate-local, one node (this host, CPUs from nproc,
# RealMemory 90% of MemTotal), one default partition `local`, SlurmUser=root,
# munge authentication, ProctrackType=proctrack/linuxproc, TaskPlugin=task/none,
# select/cons_tres (array tasks share the node), no cgroup.conf, no accounting
# (jobs are followed with squeue/scontrol). State, logs and pid files live under
# /var/lib/orchestrate-slurm, /var/log/orchestrate-slurm, /run/orchestrate-slurm;
# slurmctld starts with -c (no job state from an earlier start).
#
# It refuses to replace a slurm.conf it did not write (a real cluster's), and
# stop only stops daemons whose pid files are its own. Concurrent calls on one
# machine are serialised by flock on /run/lock/orchestrate-slurm.lock.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARK="# written by orchestrate scripts/slurm/local-cluster.sh"
STATE=/var/lib/orchestrate-slurm
LOGS=/var/log/orchestrate-slurm
RUN=/run/orchestrate-slurm
WAIT_S="${ORCHESTRATE_SLURM_WAIT_S:-120}"

die() { echo "local-cluster: $*" >&2; exit 1; }
say() { echo "local-cluster: $*" >&2; }

[[ "$(id -u)" -eq 0 ]] || die "needs root: the Slurm daemons of a local cluster run as root (SlurmUser=root)"

mkdir -p /run/lock
exec 9>/run/lock/orchestrate-slurm.lock
flock -w 600 9 || die "another local-cluster.sh has held /run/lock/orchestrate-slurm.lock for 10 minutes"

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
       command -v munged >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || die "slurmctld/slurmd/munged are missing and there is no apt-get to install Debian's slurm-wlm and munge"
    say "installing Debian's slurm-wlm and munge"
    # Keep the packages' maintainer scripts from starting daemons without a
    # configuration (containers have no init to ask); removed afterwards.
    local policy=""
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
    fi
    local ok=0
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm munge >/dev/null || ok=$?
    [[ -n "$policy" ]] && rm -f "$policy"
    [[ $ok -eq 0 ]] || die "apt-get install slurm-wlm munge failed ($ok)"
}

write_conf() {
    local host cpus mem
    host="$(hostname -s)"
    cpus="$(nproc)"
    mem=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) * 9 / 10 / 1024 ))
    if [[ -e "$CONF" ]] && ! grep -qxF "$MARK" "$CONF"; then
        die "$CONF exists and is not ours (a real cluster's configuration?); not touching it"
    fi
    mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" "$LOGS" "$RUN"
    local tmp="$CONF.partial"
    cat >"$tmp" <<CONF
$MARK
# A one-node cluster for tests and trials; see that script.
ClusterName=orchestrate-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=600
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
DefMemPerCPU=$(( mem / cpus ))
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
    mv "$tmp" "$CONF"
}

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return # a munged is running already (ours or the machine's)
    fi
    local key=/etc/munge/munge.key
    if [[ ! -s "$key" ]]; then
        say "creating the munge key $key"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$key" --force
        else
            dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
        fi
    fi
    local user=munge
    id munge >/dev/null 2>&1 || user=root
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown "$user": "$key" /run/munge /var/lib/munge /var/log/munge /etc/munge
    chmod 0400 "$key"
    chmod 0755 /run/munge
    # The daemons must not inherit the lock (fd 9), or it stays held.
    if [[ "$user" == root ]]; then
        munged --force 9>&-
    else
        runuser -u munge -- munged --force 9>&-
    fi
    touch "$RUN/munged.ours"
    for _ in $(seq 1 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.2
    done
    die "munged did not come up (see /var/log/munge/munged.log)"
}

node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -n1; }

start() {
    install_packages
    write_conf
    start_munge
    alive "$RUN/slurmctld.pid" || { rm -f "$RUN/slurmctld.pid"; slurmctld -c 9>&-; }
    alive "$RUN/slurmd.pid" || { rm -f "$RUN/slurmd.pid"; slurmd 9>&-; }
    local state="" deadline=$(( SECONDS + WAIT_S ))
    while (( SECONDS < deadline )); do
        state="$(node_state)"
        case "$state" in
            idle|mixed|allocated) say "node $(hostname -s) is $state (partition local, $(nproc) CPUs)"; return ;;
            down*|drain*|fail*|inval*)
                # Still registering, or refused: say why if Slurm says.
                scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    echo "--- sinfo" >&2; sinfo -N -l >&2 || true
    echo "--- scontrol show node" >&2; scontrol show node >&2 || true
    echo "--- $LOGS/slurmctld.log" >&2; tail -n 20 "$LOGS/slurmctld.log" >&2 || true
    echo "--- $LOGS/slurmd.log" >&2; tail -n 20 "$LOGS/slurmd.log" >&2 || true
    die "the node did not become idle in ${WAIT_S} s (state: ${state:-none})"
}

stop_pid() {
    local file="$1" pid
    alive "$file" || { rm -f "$file"; return; }
    pid="$(cat "$file")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    rm -f "$file"
}

stop() {
    if [[ -f "$CONF" ]] && grep -qxF "$MARK" "$CONF" && alive "$RUN/slurmctld.pid"; then
        scancel --full --user=root >/dev/null 2>&1 || true
        squeue -h -o %A 2>/dev/null | xargs -r scancel >/dev/null 2>&1 || true
    fi
    stop_pid "$RUN/slurmd.pid"
    stop_pid "$RUN/slurmctld.pid"
    if [[ -f "$RUN/munged.ours" ]]; then
        stop_pid /run/munge/munged.pid
        rm -f "$RUN/munged.ours"
    fi
    say "stopped"
}

case "${1:-}" in
    start) start ;;
    install) install_packages ;;
    stop) stop ;;
    status) sinfo; squeue ;;
    *) die "usage: $0 start|install|stop|status" ;;
esac
