#!/usr/bin/env bash
# Stops the LocalStack that start.sh started (Docker Compose or host process).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
state="${SPILLWAY_LS_DIR:-$HOME/.cache/spillway/localstack}"
if docker info >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
  docker compose -f "$here/compose.yaml" down
fi
if [ -f "$state/localstack.pid" ]; then
  pid="$(cat "$state/localstack.pid")"
  # A pid file left by a crash or a reboot may name another process by now: only one running
  # LocalStack's runtime is stopped.
  if ps -p "$pid" -o args= 2>/dev/null | grep -q "localstack" && kill "$pid" 2>/dev/null; then
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -9 "$pid" 2>/dev/null || true
    echo "Stopped LocalStack (pid $pid)"
  fi
  rm -f "$state/localstack.pid"
fi
