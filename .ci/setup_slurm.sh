#!/usr/bin/env bash
# A real single-node SLURM on this machine, for the `slurm` tests (docs/ENVIRONMENT.md §7). Idempotent: returns at
# once when a partition is already up with an idle node. Needs root and apt (Debian slurm-wlm + munge).
#   sudo bash .ci/setup_slurm.sh        # then: sinfo -> "debug* up infinite 1 idle <host>"
# The hostname differs between machines, so slurm.conf is written here, at run time. Exit codes: 0 ready,
# 1 cannot install / start (the tests skip and print the last line of this script's output as the reason).
set -uo pipefail

die() { echo "setup_slurm: $*" >&2; exit 1; }
ready() { sinfo -h -o '%a %t' 2>/dev/null | grep -Eq '^up (idle|mix|alloc)$'; }  # '*' = not responding

# the machine's CPUs: nproc honours OMP_NUM_THREADS, which a test run may set to 1 (that made a 1-CPU node on
# which the 2-task sbatch test pended forever with Reason=PartitionConfig)
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
# up, and with this machine's CPU count (a node written with another count is rewritten below)
if command -v sinfo >/dev/null && ready && [ "$(sinfo -h -o '%c' 2>/dev/null)" = "$CPUS" ]; then
  echo "setup_slurm: already up"; exit 0
fi
[ "$(id -u)" = 0 ] || die "needs root (apt-get, munged, slurmd run as root)"

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || die "no apt-get: install slurm-wlm + munge by hand"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null 2>&1 || die "apt-get update failed"
  apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1 || die "apt-get install slurm-wlm munge failed"
fi

H=$(hostname -s)
MEM=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)  # MB, leave room for the OS
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/run/slurm /etc/slurm

# munge: the key is created by the Debian package; one daemon per machine
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  [ -s /etc/munge/munge.key ] || { mungekey -c -f -k /etc/munge/munge.key 2>/dev/null \
    || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null; }
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null
  chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
  /usr/sbin/munged --force 2>/dev/null || runuser -u munge -- /usr/sbin/munged --force || die "munged failed"
  for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
  munge -n | unmunge >/dev/null 2>&1 || die "munge does not answer (munge -n | unmunge)"
fi

# KillWait=5: a requeued or cancelled job is SIGKILLed 5 s after SIGTERM (default 30 s), which keeps the tests short.
# No cgroup.conf: Debian's 22.05 has no "disabled" cgroup plugin, and none at all works (ENVIRONMENT.md §7).
CONF=/etc/slurm/slurm.conf
cat > "$CONF.new" <<EOF
ClusterName=local
SlurmctldHost=$H
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/var/run/slurm/slurmctld.pid
SlurmdPidFile=/var/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
KillWait=5
MinJobAge=600
NodeName=$H CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$H Default=YES MaxTime=INFINITE State=UP
EOF
if ! cmp -s "$CONF.new" "$CONF"; then
  mv "$CONF.new" "$CONF"
  # a changed config (new host name, CPU count) needs fresh daemons
  [ -f /var/run/slurm/slurmctld.pid ] && kill "$(cat /var/run/slurm/slurmctld.pid)" 2>/dev/null
  [ -f /var/run/slurm/slurmd.pid ] && kill "$(cat /var/run/slurm/slurmd.pid)" 2>/dev/null
  sleep 1
else
  rm -f "$CONF.new"
fi

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
alive /var/run/slurm/slurmctld.pid || /usr/sbin/slurmctld || die "slurmctld failed: $(tail -n 3 /var/log/slurm/slurmctld.log)"
alive /var/run/slurm/slurmd.pid || /usr/sbin/slurmd || die "slurmd failed: $(tail -n 3 /var/log/slurm/slurmd.log)"

for _ in $(seq 60); do
  ready && { echo "setup_slurm: up: $(sinfo -h -o '%P %a %t %N')"; exit 0; }
  # a node left down/drained by an earlier, killed daemon comes back with resume
  sinfo -h -o '%t' 2>/dev/null | grep -Eq 'down|drain' && scontrol update nodename="$H" state=resume 2>/dev/null
  sleep 1
done
die "no idle node after 60 s: $(sinfo 2>&1 | tail -n 2 | tr '\n' ' ') $(tail -n 2 /var/log/slurm/slurmd.log)"
