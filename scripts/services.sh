#!/usr/bin/env bash
# The services the Prefect deployments run against, on 127.0.0.1: a Prefect server, an MLflow server
# and a Prefect worker on the process work pool. `make services` / `make stop-services` call this.
#
#   scripts/services.sh start | stop | status
#
# Settings (environment): PREFECT_PORT (4200), MLFLOW_PORT (5000), SERVICES_DIR (.shapeflow/services:
# pid files, logs, the Prefect home and both databases), WORK_POOL (shapeflow). Each service runs in its
# own process group (setsid), and `stop` ends the whole group, so no server leaves workers behind.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
BIN=${BIN:-$REPO/.venv/bin}
PREFECT_PORT=${PREFECT_PORT:-4200}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
SERVICES_DIR=$(mkdir -p "${SERVICES_DIR:-.shapeflow/services}" && cd "${SERVICES_DIR:-.shapeflow/services}" && pwd)
WORK_POOL=${WORK_POOL:-shapeflow}
export PREFECT_HOME=$SERVICES_DIR/prefect
export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export DO_NOT_TRACK=1
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
export SHAPEFLOW_MLFLOW_UI=$MLFLOW_TRACKING_URI
export SHAPEFLOW_REPO=$REPO
# Flow runs list their running stages' process groups here (shapeflow.dvc_pipeline.run_logged), so
# `stop` can end them: a flow run is in a session of its own, out of reach of the worker's group.
export SHAPEFLOW_STAGE_GROUPS=$SERVICES_DIR/stages
export PATH=$BIN:$PATH

start_one() {  # name, health URL, command...
    local name=$1 url=$2
    shift 2
    if running "$name"; then
        echo "$name: already running (pid $(cat "$SERVICES_DIR/$name.pid"))"
        return
    fi
    # Appended, not truncated: the log of the run before a restart is what explains the restart.
    echo "=== $name: started $(date -u +%Y-%m-%dT%H:%M:%SZ): $*" >>"$SERVICES_DIR/$name.log"
    setsid "$@" >>"$SERVICES_DIR/$name.log" 2>&1 < /dev/null &
    echo $! >"$SERVICES_DIR/$name.pid"
    [ -z "$url" ] && { echo "$name: started (pid $!, log $SERVICES_DIR/$name.log)"; return; }
    for _ in $(seq 1 120); do
        if curl -fsS "$url" >/dev/null 2>&1; then
            echo "$name: up at ${url%/*} (pid $(cat "$SERVICES_DIR/$name.pid"), log $SERVICES_DIR/$name.log)"
            return
        fi
        if ! running "$name"; then
            echo "$name: exited while starting; the end of $SERVICES_DIR/$name.log:" >&2
            tail -n 20 "$SERVICES_DIR/$name.log" >&2
            exit 1
        fi
        sleep 1
    done
    echo "$name: no answer at $url after 120 s; see $SERVICES_DIR/$name.log" >&2
    exit 1
}

# A killed process whose parent is gone may stay a zombie (not every init reaps orphans), and `kill -0`
# succeeds on a zombie: count a process, or a process group, as alive only when it is not one.
alive() {
    local stat
    stat=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $stat != Z* ]]
}

group_alive() {
    ps -eo pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { found = 1 } END { exit !found }'
}

running() {
    [ -f "$SERVICES_DIR/$1.pid" ] && alive "$(cat "$SERVICES_DIR/$1.pid")"
}

end_group() {  # SIGTERM to process group $1, SIGKILL to what is left after 10 s
    kill -TERM -- "-$1" 2>/dev/null || true
    for _ in $(seq 1 20); do group_alive "$1" || break; sleep 0.5; done
    kill -KILL -- "-$1" 2>/dev/null || true
}

stop_one() {
    local name=$1 pid
    [ -f "$SERVICES_DIR/$name.pid" ] || return 0
    pid=$(cat "$SERVICES_DIR/$name.pid")
    if group_alive "$pid"; then
        end_group "$pid"
        echo "$name: stopped"
    fi
    rm -f "$SERVICES_DIR/$name.pid"
}

stop_stages() {
    # A flow run whose worker is gone stops its stage within seconds (and is marked crashed); a group
    # still there after that (its flow run was killed outright) is ended here.
    local file pgid
    for file in "$SERVICES_DIR"/stages/*.pgid; do
        [ -e "$file" ] || continue
        pgid=$(basename "$file" .pgid)
        if group_alive "$pgid"; then
            for _ in $(seq 1 30); do group_alive "$pgid" || break; sleep 0.5; done
            group_alive "$pgid" && end_group "$pgid"
            echo "stage (process group $pgid): stopped"
        fi
        rm -f "$file"
    done
}

case ${1:-} in
start)
    start_one prefect-server "$PREFECT_API_URL/health" prefect server start --host 127.0.0.1 --port "$PREFECT_PORT"
    start_one mlflow "$MLFLOW_TRACKING_URI/health" env MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
        mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
        --backend-store-uri "sqlite:///$SERVICES_DIR/mlflow.db" --default-artifact-root "$SERVICES_DIR/mlartifacts"
    prefect work-pool inspect "$WORK_POOL" >/dev/null 2>&1 || prefect work-pool create "$WORK_POOL" --type process >/dev/null
    start_one worker "" prefect worker start --pool "$WORK_POOL" --type process
    echo "Prefect UI http://127.0.0.1:$PREFECT_PORT   MLflow UI $MLFLOW_TRACKING_URI"
    ;;
stop)
    stop_one worker
    stop_stages
    stop_one mlflow
    stop_one prefect-server
    ;;
status)
    for name in prefect-server mlflow worker; do
        if running "$name"; then echo "$name: running (pid $(cat "$SERVICES_DIR/$name.pid"))"; else echo "$name: stopped"; fi
    done
    ;;
env)  # for `eval "$(scripts/services.sh env)"`: talk to these services from a shell
    echo "export PREFECT_API_URL=$PREFECT_API_URL PREFECT_HOME=$PREFECT_HOME MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI"
    ;;
*)
    echo "usage: $0 start | stop | status | env" >&2
    exit 2
    ;;
esac
