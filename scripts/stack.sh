#!/usr/bin/env bash
# `make up` / `make down`: the stack without Docker on one machine, for its UIs.
# MLflow server (SQLite + local artifacts) on 127.0.0.1:5000 and Airflow's parts
# (scripts/airflow_local.sh: api-server, scheduler, dag-processor, triggerer; SQLite, LocalExecutor)
# on 127.0.0.1:8080, every listener on 127.0.0.1; state under state/stack. The profile of
# scheduled runs: $RETRAIN_PROFILE (default demo). STACK_STATE, MLFLOW_PORT, AIRFLOW_PORT move them.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
STATE=${STACK_STATE:-$ROOT/state/stack}
BIN=$ROOT/.venv/bin
MLFLOW_PORT=${MLFLOW_PORT:-5000}
export AIRFLOW_PORT=${AIRFLOW_PORT:-8080}
mkdir -p "$STATE/logs"

export AIRFLOW_HOME=$STATE/airflow AIRFLOW__CORE__DAGS_FOLDER=$ROOT/dags \
  AIRFLOW__CORE__PLUGINS_FOLDER=$ROOT/plugins AIRFLOW__CORE__LOAD_EXAMPLES=False \
  AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=True \
  MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT MLFLOW_UI_URL=http://127.0.0.1:$MLFLOW_PORT \
  RETRAIN_PROFILE=${RETRAIN_PROFILE:-demo} HF_HUB_OFFLINE=1

start() {  # name, command...: in its own session, so `down` stops it with all its children
  local name=$1; shift
  # the pid written is the new session's leader (setsid may fork), so `kill -- -pid` reaches all
  setsid bash -c 'echo $$ >"$0"; exec "${@}"' "$STATE/$name.pid" "$@" >"$STATE/logs/$name.log" 2>&1 </dev/null &
}

wait_for() {  # name, url
  for _ in $(seq 1 120); do
    curl -sf "$2" >/dev/null && return 0
    sleep 2
  done
  echo "$1 did not come up; see $STATE/logs/$1.log" >&2
  return 1
}

case "${1:-}" in
  up)
    "$BIN/python" -m ml tiny-model --profile demo >/dev/null
    start mlflow "$BIN/mlflow" server --backend-store-uri "sqlite:///$STATE/mlflow.db" \
      --artifacts-destination "$STATE/mlartifacts" --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1
    "$BIN/airflow" db migrate >/dev/null
    # the registry tasks' pool (one slot): the scheduler does not run tasks of a missing pool
    "$BIN/airflow" pools set mlflow_registry 1 "MLflow registry writes, one at a time" >/dev/null
    start airflow "$ROOT/scripts/airflow_local.sh"
    wait_for mlflow "http://127.0.0.1:$MLFLOW_PORT/health"
    wait_for airflow "http://127.0.0.1:$AIRFLOW_PORT/api/v2/monitor/health"
    echo "MLflow:  http://127.0.0.1:$MLFLOW_PORT"
    echo "Airflow: http://127.0.0.1:$AIRFLOW_PORT (local: every user is admin); trigger retrain_lora with the form"
    echo "Logs in $STATE/logs; stop with: make down"
    ;;
  down)
    for name in airflow mlflow; do
      pidfile=$STATE/$name.pid
      [ -f "$pidfile" ] || continue
      group=$(cat "$pidfile")
      kill -TERM -- "-$group" 2>/dev/null || true
      for _ in $(seq 1 30); do kill -0 -- "-$group" 2>/dev/null || break; sleep 1; done
      kill -KILL -- "-$group" 2>/dev/null || true  # what did not stop within 30 s
      rm -f "$pidfile"
    done
    echo "stopped (state kept in $STATE)"
    ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
