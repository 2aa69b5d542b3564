#!/usr/bin/env bash
# .ci/local_slurm.sh - start a real one-node Slurm cluster (with accounting) for ptycore's CI.
#
#   bash .ci/local_slurm.sh [start]   install what is missing, configure, start the daemons, smoke-test
#   bash .ci/local_slurm.sh status    which daemons run; sinfo
#   bash .ci/local_slurm.sh stop      stop the daemons this script started (nothing else)
#
# For a Debian 12 machine where CI runs as root without systemd (containers). Packages: slurmctld,
# slurmd, slurm-client, slurmdbd, munge, mariadb-server. The cluster "ci" has one node, "localhost"
# (127.0.0.1: all CPUs, 90 % of RAM, one fake GPU "gpu:fake:1" on /dev/fakegpu0, a /dev/null twin),
# partitions "debug" (default) and "gpu", and accounting through slurmdbd and MariaDB with account
# "ci" for root, enforced as on a real cluster. tests/test_slurm.py runs the workflow through a CI
# copy of profiles/slurm against it (account ci, partitions debug/gpu, 2 s status checks).
#
# Running `start` again while the cluster is up only checks it (a few seconds); a changed
# configuration file restarts the daemons that read it. Logs: /var/log/slurm/, MariaDB's
# /var/log/mysql/error.log and munge's /var/log/munge/munged.log (their tails are printed on failure).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive LC_ALL=C
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

readonly CLUSTER=ci ACCOUNT=ci NODE=localhost
readonly ETC=/etc/slurm LOGS=/var/log/slurm
readonly STATE=/run/ptycore-ci-slurm        # our pid files and the list of daemons we started
readonly STARTED=$STATE/started
readonly DB=slurm_acct_db DB_USER=slurm DB_PASS=ci-only-password
readonly MARIADB_LOG=/var/log/mysql/error.log MARIADB_PID=/run/mysqld/mysqld.pid
readonly MUNGE_PID=/run/munge/munged.pid
readonly WAIT_S=${CI_SLURM_WAIT_S:-90}      # how long any one step may take

say() { echo "[ci-slurm] $*"; }

fail() {
    echo "[ci-slurm] FAILED: $*" >&2
    local log
    for log in "$LOGS"/slurmctld.log "$LOGS"/slurmd.log "$LOGS"/slurmdbd.log "$MARIADB_LOG" /var/log/munge/munged.log; do
        if [[ -s $log ]]; then
            echo "== last lines of $log" >&2
            tail -n 30 "$log" >&2 || true
        fi
    done
    if command -v sinfo >/dev/null; then
        timeout 10 sinfo -N -l >&2 || true
        timeout 10 sinfo -R >&2 || true
    fi
    exit 1
}

# running PID: the process exists and is neither a zombie nor dead (a killed daemon lingers as Z)
running() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z && ${stat:0:1} != X ]]
}

# alive PIDFILE COMM...: the pid file names a running process whose command starts with a COMM
alive() {
    local pidfile=$1 pid comm want
    shift
    pid=$(cat "$pidfile" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] && running "$pid" || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    for want in "$@"; do [[ $comm == "$want"* ]] && return 0; done
    return 1
}

# until_ok WHAT CMD...: retry CMD once a second for WAIT_S seconds; with WATCH_PID set, give up
# as soon as that process has exited (a daemon that died at start will not come up later)
WATCH_PID=
until_ok() {
    local what=$1 t
    shift
    for ((t = 0; t < WAIT_S; t++)); do
        if "$@" >/dev/null 2>&1; then
            WATCH_PID=
            return 0
        fi
        if [[ -n $WATCH_PID ]] && ! running "$WATCH_PID"; then fail "process $WATCH_PID exited before: $what"; fi
        sleep 1
    done
    fail "no $what after ${WAIT_S}s"
}

note_started() { grep -qx "$1" "$STARTED" 2>/dev/null || echo "$1" >>"$STARTED"; }
we_started() { grep -qx "$1" "$STARTED" 2>/dev/null; }

# halt NAME PIDFILE COMM...: TERM, up to 30 s, then KILL
halt() {
    local name=$1 pidfile=$2 pid t
    shift 2
    if ! alive "$pidfile" "$@"; then
        say "$name is not running"
        return 0
    fi
    pid=$(cat "$pidfile")
    say "stopping $name ($pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((t = 0; t < 30; t++)); do running "$pid" || break; sleep 1; done
    if running "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    rm -f "$pidfile"
}

# ------------------------------------------------------------------ packages
install_missing() {
    local want=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server) missing=() p
    for p in "${want[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        say "packages present"
        return
    fi
    say "installing ${missing[*]}"
    apt-get update -qq
    # no systemd here: the packages' daemons are not started by apt (policy-rc.d), this script starts them
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# ------------------------------------------------------------------ configuration
# put FILE MODE < content: replace FILE when the content differs; true (0) when it was replaced
put() {
    local file=$1 mode=$2 new
    new=$(mktemp)
    cat >"$new"
    if [[ -f $file ]] && cmp -s "$new" "$file"; then
        rm -f "$new"
        return 1
    fi
    install -m "$mode" -o root -g root "$new" "$file"
    rm -f "$new"
    say "wrote $file"
}

SLURM_CONF_CHANGED=0
DBD_CONF_CHANGED=0
configure() {
    local cpus mem_mb
    cpus=$(nproc)
    mem_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) * 9 / 10 / 1024))
    mkdir -p "$ETC" "$LOGS" /var/spool/slurmctld /var/spool/slurmd
    [[ -e /dev/fakegpu0 ]] || mknod /dev/fakegpu0 c 1 3   # what the gres "gpu" points at

    put "$ETC/slurm.conf" 644 <<EOF && SLURM_CONF_CHANGED=1
# ptycore CI: a one-node cluster written by .ci/local_slurm.sh (rewritten on every start)
ClusterName=$CLUSTER
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
ReturnToService=2
MinJobAge=600
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$NODE
AccountingStorageEnforce=associations
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb Gres=gpu:fake:1 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE Default=NO MaxTime=INFINITE State=UP
EOF

    put "$ETC/gres.conf" 644 <<EOF && SLURM_CONF_CHANGED=1
NodeName=$NODE Name=gpu Type=fake File=/dev/fakegpu0
EOF

    # slurmdbd refuses a configuration others can read
    put "$ETC/slurmdbd.conf" 600 <<EOF && DBD_CONF_CHANGED=1
AuthType=auth/munge
DbdHost=$NODE
DbdPort=6819
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB
EOF
    return 0
}

# ------------------------------------------------------------------ daemons, in the order they need each other
start_munge() {
    [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge
    install -d -o munge -g munge -m 0711 /var/lib/munge
    if alive "$MUNGE_PID" munged; then
        say "munged is up"
    else
        say "starting munged"
        rm -f "$MUNGE_PID"
        runuser -u munge -- /usr/sbin/munged --force   # --force: a stale socket from an unclean stop
        note_started munged
    fi
    until_ok "munge credential round trip" bash -c 'munge -n | unmunge'
}

mariadb_answers() { mariadb-admin --protocol=socket -uroot --silent ping; }

start_mariadb() {
    install -d -o mysql -g root -m 0755 /run/mysqld
    install -d -o mysql -g adm -m 2750 "$(dirname "$MARIADB_LOG")"   # mariadbd runs as mysql and logs there
    [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    if alive "$MARIADB_PID" mariadbd mysqld; then
        say "mariadb is up"
    elif mariadb_answers 2>/dev/null; then
        say "mariadb is up (not ours: stop leaves it alone)"
    else
        say "starting mariadb"
        rm -f "$MARIADB_PID"
        # Debian's mysqld_safe logs to syslog by default, and there is no syslog here
        setsid nohup mysqld_safe --skip-syslog --log-error="$MARIADB_LOG" --pid-file="$MARIADB_PID" \
            >"$LOGS/mysqld_safe.out" 2>&1 </dev/null &
        echo $! >"$STATE/mysqld_safe.pid"
        WATCH_PID=$!
        note_started mariadb
    fi
    until_ok "answer from mariadb" mariadb_answers
    mariadb --protocol=socket -uroot <<EOF
CREATE DATABASE IF NOT EXISTS $DB;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON $DB.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
EOF
}

start_slurmdbd() {
    ((DBD_CONF_CHANGED)) && halt slurmdbd "$STATE/slurmdbd.pid" slurmdbd
    if alive "$STATE/slurmdbd.pid" slurmdbd; then
        say "slurmdbd is up"
    else
        say "starting slurmdbd"
        /usr/sbin/slurmdbd
        note_started slurmdbd
    fi
    # the first start creates the tables: sacctmgr answers once that is done
    until_ok "answer from slurmdbd (sacctmgr)" timeout 10 sacctmgr -n list cluster
}

add_accounts() {
    [[ -n $(sacctmgr -n -P list cluster "$CLUSTER" format=cluster) ]] || sacctmgr -i add cluster "$CLUSTER" >/dev/null
    [[ -n $(sacctmgr -n -P list account "$ACCOUNT" format=account) ]] ||
        sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description="ptycore CI" organization=ci >/dev/null
    local assoc=(list assoc cluster="$CLUSTER" account="$ACCOUNT" user=root format=user)
    [[ -n $(sacctmgr -n -P "${assoc[@]}") ]] ||
        sacctmgr -i add user root account="$ACCOUNT" cluster="$CLUSTER" defaultaccount="$ACCOUNT" >/dev/null
    [[ -n $(sacctmgr -n -P "${assoc[@]}") ]] || fail "no association root/$ACCOUNT on cluster $CLUSTER"
}

start_slurmctld_and_slurmd() {
    if ((SLURM_CONF_CHANGED)); then   # both read slurm.conf and gres.conf
        halt slurmd "$STATE/slurmd.pid" slurmd
        halt slurmctld "$STATE/slurmctld.pid" slurmctld
    fi
    if alive "$STATE/slurmctld.pid" slurmctld; then
        say "slurmctld is up"
    else
        say "starting slurmctld"
        /usr/sbin/slurmctld
        note_started slurmctld
    fi
    until_ok "answer from slurmctld (scontrol ping)" bash -c 'timeout 10 scontrol ping | grep -q UP'
    if alive "$STATE/slurmd.pid" slurmd; then
        say "slurmd is up"
    else
        say "starting slurmd"
        /usr/sbin/slurmd -N "$NODE"   # the node is "localhost", whatever this machine's name is
        note_started slurmd
    fi
}

wait_for_idle_node() {
    local t state resumed=0
    for ((t = 0; t < WAIT_S; t++)); do
        state=$(sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n 1)
        case $state in
            idle | mixed | allocated | completing)
                say "node $NODE is $state"
                return 0
                ;;
            *drain* | down*)   # left over from an earlier run: resume it once
                if ((t > 5 && !resumed)); then
                    scontrol update NodeName="$NODE" State=RESUME || true
                    resumed=1
                fi
                ;;
        esac
        sleep 1
    done
    fail "node $NODE is ${state:-in no state} after ${WAIT_S}s"
}

# ------------------------------------------------------------------ smoke test: interactive, batch, GPU partition
accounted() {   # accounted JOBID: sacct reports it COMPLETED
    local t state
    for ((t = 0; t < 60; t++)); do
        state=$(sacct -j "$1" -X -n -P -o State 2>/dev/null | head -n 1)
        [[ $state == COMPLETED ]] && return 0
        sleep 1
    done
    fail "sacct says job $1 is '${state}', not COMPLETED"
}

smoke_test() {
    local dir id out
    dir=$(mktemp -d /tmp/ci-slurm-smoke.XXXXXX)
    out=$(cd "$dir" && timeout 120 srun -A "$ACCOUNT" -N1 -n1 -t 1 hostname) || fail "srun hostname"
    say "srun: $out"
    id=$(cd "$dir" && timeout 120 sbatch --wait --parsable -A "$ACCOUNT" -p debug -t 1 -o "$dir/%j.out" \
        --wrap 'echo batch-ok') || fail "sbatch --wait on debug"
    id=${id%%;*}
    grep -q batch-ok "$dir/$id.out" || fail "batch job $id wrote no output"
    accounted "$id"
    id=$(cd "$dir" && timeout 120 sbatch --wait --parsable -A "$ACCOUNT" -p gpu --gres=gpu:1 -t 1 \
        -o "$dir/%j.out" --wrap 'echo "gpu-ok ${CUDA_VISIBLE_DEVICES:-unset}"') || fail "sbatch on gpu with a gres"
    id=${id%%;*}
    grep -q gpu-ok "$dir/$id.out" || fail "gpu job $id wrote no output"
    accounted "$id"
    say "sbatch: jobs on debug and gpu COMPLETED ($(cat "$dir/$id.out"))"
    rm -rf "$dir"
}

# ------------------------------------------------------------------ actions
start() {
    [[ $(id -u) == 0 ]] || { echo "[ci-slurm] must run as root" >&2; exit 1; }
    local t0=$SECONDS
    mkdir -p "$STATE"
    install_missing
    configure
    start_munge
    start_mariadb
    start_slurmdbd
    add_accounts
    start_slurmctld_and_slurmd
    wait_for_idle_node
    smoke_test
    sinfo -o '%10P %6a %10l %5D %8T %G'
    say "cluster $CLUSTER up in $((SECONDS - t0)) s: account $ACCOUNT, partitions debug (default) and gpu (gres gpu:1)"
}

stop() {
    local pid
    we_started slurmd && halt slurmd "$STATE/slurmd.pid" slurmd
    we_started slurmctld && halt slurmctld "$STATE/slurmctld.pid" slurmctld
    we_started slurmdbd && halt slurmdbd "$STATE/slurmdbd.pid" slurmdbd
    if we_started mariadb; then
        halt mariadb "$MARIADB_PID" mariadbd mysqld   # its mysqld_safe parent then exits by itself
        pid=$(cat "$STATE/mysqld_safe.pid" 2>/dev/null || true)
        if [[ -n $pid ]] && running "$pid" && grep -q mysqld_safe "/proc/$pid/cmdline" 2>/dev/null; then
            sleep 2
            if running "$pid"; then kill -TERM "$pid" 2>/dev/null || true; fi
        fi
        rm -f "$STATE/mysqld_safe.pid"
    fi
    we_started munged && halt munged "$MUNGE_PID" munged
    rm -f "$STARTED"
    say "stopped"
}

status() {
    local entry name pidfile comms
    for entry in "munged:$MUNGE_PID:munged" "mariadb:$MARIADB_PID:mariadbd mysqld" \
        "slurmdbd:$STATE/slurmdbd.pid:slurmdbd" "slurmctld:$STATE/slurmctld.pid:slurmctld" \
        "slurmd:$STATE/slurmd.pid:slurmd"; do
        IFS=: read -r name pidfile comms <<<"$entry"
        # shellcheck disable=SC2086  # comms is a list
        if alive "$pidfile" $comms; then echo "$name: running ($(cat "$pidfile"))"; else echo "$name: stopped"; fi
    done
    if command -v sinfo >/dev/null; then timeout 10 sinfo || true; fi
}

case ${1:-start} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *)
        echo "usage: $0 [start|stop|status]" >&2
        exit 2
        ;;
esac
