#!/usr/bin/env bash
# An MLflow tracking server on loopback for sweeps whose jobs log at the same time: the server is the
# only process that writes the sqlite store, jobs send their runs over HTTP (logger=mlflow_server).
#
#   launchers/mlflow_server.sh start|stop|status
#
#   PCPO_MLFLOW_PORT     port on 127.0.0.1 (default 5000)
#   PCPO_MLFLOW_DIR      state: mlflow.db, artifacts/, server.pid, server.log (default outputs/mlflow_server)
#   PCPO_MLFLOW_WORKERS  server worker processes (default 1: one writer to sqlite is enough for tens of jobs)
#   PCPO_PYTHON          the python whose mlflow to run (default: `python` on the PATH, e.g. the active venv)
#   PCPO_MLFLOW_START_TIMEOUT_S  how long start waits for /health (default 120)
#
# start waits until the server answers /health and prints the export line for the jobs; it is
# idempotent. The server binds 127.0.0.1 only, which MLflow's default host and CORS checks allow,
# so no security flag is loosened.
set -euo pipefail

port="${PCPO_MLFLOW_PORT:-5000}"
state="$(realpath -m "${PCPO_MLFLOW_DIR:-outputs/mlflow_server}")"
workers="${PCPO_MLFLOW_WORKERS:-1}"
python="${PCPO_PYTHON:-$(command -v python || command -v python3 || true)}"
url="http://127.0.0.1:${port}"
pid_file="${state}/server.pid"
log_file="${state}/server.log"
start_timeout_s="${PCPO_MLFLOW_START_TIMEOUT_S:-120}"  # a cold start took 10-25 s on 2 busy cores
stop_timeout_s=30

die() { echo "mlflow_server.sh: $*" >&2; exit 1; }

running_pid() {  # the recorded server's pid, if that process is alive and still an mlflow server
    [[ -f $pid_file ]] || return 1
    local pid
    pid="$(cat "$pid_file")"
    ps -o args= -p "$pid" 2>/dev/null | grep -q "mlflow server" && echo "$pid"
}

healthy() {  # does the server answer its /health endpoint?
    "$python" -c "import sys, urllib.request
try:
    sys.exit(urllib.request.urlopen('${url}/health', timeout=2).status != 200)
except OSError:
    sys.exit(1)"
}

print_export() { echo "export MLFLOW_TRACKING_URI=${url}"; }

start() {
    local pid
    if pid="$(running_pid)"; then
        echo "MLflow server already running (pid ${pid}) at ${url}, state in ${state}"
        print_export
        return
    fi
    [[ -n $python ]] || die "no python on the PATH: activate the project's venv or set PCPO_PYTHON"
    local mlflow
    mlflow="$(dirname "$python")/mlflow"
    [[ -x $mlflow ]] || die "no mlflow executable next to ${python}: activate the project's venv or set PCPO_PYTHON"
    healthy && die "port ${port} already serves something else: set PCPO_MLFLOW_PORT"
    mkdir -p "$state"
    # setsid: the server (mlflow, its uvicorn and workers) gets a process group of its own, which
    # stop ends as a whole. Job execution is MLflow's GenAI job runner, not needed here.
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$mlflow" server \
        --host 127.0.0.1 --port "$port" --workers "$workers" \
        --backend-store-uri "sqlite:///${state}/mlflow.db" \
        --artifacts-destination "${state}/artifacts" \
        >>"$log_file" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$pid_file"
    local deadline=$(( SECONDS + start_timeout_s ))
    until healthy; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$pid_file"
            tail -n 20 "$log_file" >&2
            die "the server exited during start-up; log: ${log_file}"
        fi
        if (( SECONDS >= deadline )); then
            stop >/dev/null
            die "no answer from ${url}/health within ${start_timeout_s} s; log: ${log_file}"
        fi
        sleep 0.5
    done
    echo "MLflow server started (pid ${pid}) at ${url}, state in ${state}, log ${log_file}"
    print_export
}

stop() {
    local pid
    if ! pid="$(running_pid)"; then
        rm -f "$pid_file"
        echo "MLflow server not running (state ${state})"
        return
    fi
    kill -TERM -- "-${pid}" 2>/dev/null || kill -TERM "$pid"
    local deadline=$(( SECONDS + stop_timeout_s ))
    while kill -0 -- "-${pid}" 2>/dev/null; do
        if (( SECONDS >= deadline )); then
            kill -KILL -- "-${pid}" 2>/dev/null || true
            break
        fi
        sleep 0.5
    done
    rm -f "$pid_file"
    echo "MLflow server stopped (pid ${pid})"
}

status() {
    local pid
    if pid="$(running_pid)" && healthy; then
        echo "MLflow server running (pid ${pid}) at ${url}, state in ${state}"
        print_export
    elif [[ -n ${pid:-} ]]; then
        echo "MLflow server process ${pid} is alive but ${url}/health does not answer; log: ${log_file}"
        return 1
    else
        echo "MLflow server not running (state ${state})"
        return 3
    fi
}

case "${1:-}" in
    start | stop | status) "$1" ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
