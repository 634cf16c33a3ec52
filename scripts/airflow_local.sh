#!/usr/bin/env bash
# Airflow's parts on this machine, in the foreground until Ctrl-C (make airflow-ui, make up): what
# `airflow standalone` starts, with every listener on 127.0.0.1. Standalone's scheduler and triggerer
# each serve their task logs on all interfaces (ports 8793/8794, no host setting); here they serve
# none: the API server reads the task logs from this machine's log folder. The caller sets
# AIRFLOW_HOME and the rest of Airflow's configuration; AIRFLOW_PORT (default 8080) is the UI's port.
# Every user being admin, the API refuses any Host but a loopback name (DNS rebinding):
# plugins/local_host_guard.py, hence the plugins folder by default.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/.venv/bin
export PATH=$BIN:$PATH AIRFLOW__API__HOST=127.0.0.1 AIRFLOW__API__PORT=${AIRFLOW_PORT:-8080}
export AIRFLOW__CORE__PLUGINS_FOLDER=${AIRFLOW__CORE__PLUGINS_FOLDER:-$ROOT/plugins}
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL=http://127.0.0.1:${AIRFLOW_PORT:-8080}/execution/
# Sized for a laptop (issue 30): the LocalExecutor forks all of [core] parallelism's workers at start
# (default 32: about 40 processes in all), while one retrain_lora run (max_active_runs=1) has at most
# two tasks ready at once; one API worker and one parsing process serve one user and one DAG file.
# The caller's values win (AIRFLOW__CORE__PARALLELISM=8 make airflow-ui).
export AIRFLOW__CORE__PARALLELISM=${AIRFLOW__CORE__PARALLELISM:-2}
export AIRFLOW__API__WORKERS=${AIRFLOW__API__WORKERS:-1}
export AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES=${AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES:-1}
airflow db migrate >/dev/null
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
airflow api-server --host 127.0.0.1 --port "${AIRFLOW_PORT:-8080}" & pids+=($!)
airflow scheduler --skip-serve-logs & pids+=($!)
airflow dag-processor & pids+=($!)
airflow triggerer --skip-serve-logs & pids+=($!)
echo "Airflow at http://127.0.0.1:${AIRFLOW_PORT:-8080} (every user is admin, this machine only); Ctrl-C stops it"
wait -n "${pids[@]}"  # one part ended: stop the others
