# Shared by up.sh and down.sh (sourced, not run): pid-file checks against the state directory $dir.

# The daemons live in sbin, which a non-root PATH may lack.
PATH="$PATH:/usr/sbin:/sbin"

say() { echo "pcpo-slurm: $*" >&2; }

# The pid recorded for daemon $1, if its pid file names a live process of that program
# (a stale file, or a pid reused by another program, does not count).
daemon_pid() {
    local file="$dir/run/$1.pid" pid
    [ -s "$file" ] || return 1
    pid="$(cat "$file")"
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] || return 1
    echo "$pid"
}

alive() { daemon_pid "$1" >/dev/null; }
