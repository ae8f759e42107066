#!/usr/bin/env bash
# A one-node SLURM cluster on this machine for tests/test_slurm.py: munge, slurmctld and slurmd on localhost,
# one CPU partition `cpu`, accounting through slurmdbd + MariaDB so that `sacct` answers (the executor plugin's
# status queries and the test's checks use it).
#
# .ci/run calls it before the tests. It needs root (or passwordless sudo) and Debian/Ubuntu's apt. Where it
# cannot install or start the cluster it prints why and exits 0: the SLURM test then skips, printing the
# reason that it finds in SLURM_SETUP_STATUS. It never touches a machine that already has its own
# /etc/slurm/slurm.conf (one not written by this script).
set -uo pipefail
cd "$(dirname "$0")/.."

STATUS_FILE=${SLURM_SETUP_STATUS:-/tmp/seg4diff_slurm_setup.txt}
MARKER="# written by seg4diff-repro scripts/setup_slurm.sh"
CLUSTER=seg4diff-ci

give_up() {
    echo "setup_slurm: no SLURM cluster: $*" | tee "$STATUS_FILE"
    exit 0
}

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi
}

if [ "$(id -u)" != 0 ] && ! sudo -n true 2>/dev/null; then
    give_up "not root and no passwordless sudo (needed to install slurm-wlm, munge and mariadb-server)"
fi
command -v apt-get >/dev/null || give_up "no apt-get (the setup installs Debian's slurm-wlm, slurmdbd, munge and mariadb-server)"

if [ -f /etc/slurm/slurm.conf ] && ! grep -qF "$MARKER" /etc/slurm/slurm.conf; then
    give_up "/etc/slurm/slurm.conf exists and was not written by this script: not touching this machine's SLURM"
fi

packages="slurm-wlm slurmdbd munge mariadb-server"
missing=$(for p in $packages; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"; done)
if [ -n "$missing" ]; then
    echo "setup_slurm: installing $missing"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -qq >/tmp/seg4diff_slurm_apt.log 2>&1 \
        && as_root apt-get install -y -qq $missing >>/tmp/seg4diff_slurm_apt.log 2>&1 \
        || give_up "apt-get install $missing failed: $(tail -3 /tmp/seg4diff_slurm_apt.log | tr '\n' ' ')"
fi

host=$(hostname -s)
cpus=$(nproc)
# Below the machine's memory, so that slurmd never marks the node invalid; jobs ask for little.
memory_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)

# --- munge: the authentication slurmctld, slurmd and slurmdbd share
as_root install -d -o munge -g munge -m 0755 /run/munge
as_root install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
if [ ! -s /etc/munge/munge.key ]; then
    as_root mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null \
        || as_root dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    as_root chown munge:munge /etc/munge/munge.key && as_root chmod 0400 /etc/munge/munge.key
fi
if ! munge -n </dev/null >/dev/null 2>&1; then
    as_root runuser -u munge -- /usr/sbin/munged || give_up "munged did not start"
    sleep 1
fi
munge -n </dev/null | unmunge >/dev/null 2>&1 || give_up "munge does not authenticate (munge -n | unmunge failed)"

# --- MariaDB and slurmdbd: the accounting that sacct reads
as_root install -d -o mysql -g mysql -m 0755 /run/mysqld
if ! as_root mysqladmin ping >/dev/null 2>&1; then
    as_root sh -c 'nohup mysqld_safe >/tmp/seg4diff_mysqld.log 2>&1 &'
    for _ in $(seq 60); do as_root mysqladmin ping >/dev/null 2>&1 && break; sleep 1; done
    as_root mysqladmin ping >/dev/null 2>&1 || give_up "MariaDB did not start: $(tail -3 /tmp/seg4diff_mysqld.log | tr '\n' ' ')"
fi
as_root mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'seg4diff-ci';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;" \
    || give_up "could not create the accounting database"

as_root install -d -m 0755 /etc/slurm /var/log/slurm /var/spool/slurmctld /var/spool/slurmd /run/slurm
as_root tee /etc/slurm/slurmdbd.conf >/dev/null <<EOF
$MARKER
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=seg4diff-ci
StorageLoc=slurm_acct_db
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurm/slurmdbd.pid
EOF
as_root chmod 0600 /etc/slurm/slurmdbd.conf

as_root tee /etc/slurm/slurm.conf >/dev/null <<EOF
$MARKER
ClusterName=$CLUSTER
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# No cgroups in a CI container: track processes by parent id, no task confinement.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
MinJobAge=600
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageEnforce=associations
# The executor plugin names each job's rule in its comment; keep it in the accounting (tests read it).
AccountingStoreFlags=job_comment
NodeName=$host CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

if ! pgrep -x slurmdbd >/dev/null; then
    as_root slurmdbd || give_up "slurmdbd did not start: $(tail -3 /var/log/slurm/slurmdbd.log | tr '\n' ' ')"
fi
for _ in $(seq 30); do as_root sacctmgr -i list cluster >/dev/null 2>&1 && break; sleep 1; done
as_root sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1
as_root sacctmgr -i add account ci Cluster="$CLUSTER" Description=ci Organization=ci >/dev/null 2>&1
as_root sacctmgr -i add user "$(id -un)" Account=ci Cluster="$CLUSTER" >/dev/null 2>&1
if [ -n "${SUDO_USER:-}" ]; then as_root sacctmgr -i add user "$SUDO_USER" Account=ci Cluster="$CLUSTER" >/dev/null 2>&1; fi

if ! pgrep -x slurmctld >/dev/null; then
    as_root slurmctld || give_up "slurmctld did not start: $(tail -3 /var/log/slurm/slurmctld.log | tr '\n' ' ')"
else
    as_root scontrol reconfigure
fi
if ! pgrep -x slurmd >/dev/null; then
    as_root slurmd || give_up "slurmd did not start: $(tail -3 /var/log/slurm/slurmd.log | tr '\n' ' ')"
fi
for _ in $(seq 30); do
    state=$(sinfo -h -n "$host" -o %t 2>/dev/null)
    case "$state" in idle|mix|alloc) break ;; down*|drain*) as_root scontrol update NodeName="$host" State=RESUME ;; esac
    sleep 1
done
case "$state" in idle|mix|alloc) ;; *) give_up "node $host is '$state' in sinfo: $(tail -3 /var/log/slurm/slurmd.log | tr '\n' ' ')" ;; esac

# A job through the whole chain: sbatch, the node, sacct.
job=$(sbatch --parsable -p cpu -t 1 -n 1 --mem=50 -o /dev/null --wrap "true" 2>&1) || give_up "sbatch failed: $job"
for _ in $(seq 30); do
    sacct -X -n -P -j "$job" -o State 2>/dev/null | grep -q COMPLETED && break
    sleep 1
done
sacct -X -n -P -j "$job" -o State 2>/dev/null | grep -q COMPLETED \
    || give_up "test job $job did not show COMPLETED in sacct: $(sacct -X -n -P -j "$job" -o State 2>&1 | tr '\n' ' ')"
echo "ok: cluster $CLUSTER, partition cpu, node $host ($cpus CPUs, $memory_mb MB), account ci, sacct answers" \
    | tee "$STATUS_FILE"
