#!/bin/bash
# The official image's dispatch: bash/python run as given, anything else is an airflow command.
set -euo pipefail
case "${1:-}" in
  bash | python | python3) exec "$@" ;;
  airflow) shift; exec airflow "$@" ;;
  *) exec airflow "$@" ;;
esac
