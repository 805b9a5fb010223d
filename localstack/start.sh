#!/usr/bin/env bash
# Starts LocalStack on 127.0.0.1:4566 (idempotent): with Docker Compose when a Docker engine
# runs, otherwise on the host from a pinned Python venv. Waits for health, prints the endpoint.
#   SPILLWAY_LS_VENV   venv location (default ~/.cache/spillway/localstack-venv)
#   SPILLWAY_LS_DIR    state and log dir (default ~/.cache/spillway/localstack)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
endpoint="http://127.0.0.1:4566"
venv="${SPILLWAY_LS_VENV:-$HOME/.cache/spillway/localstack-venv}"
state="${SPILLWAY_LS_DIR:-$HOME/.cache/spillway/localstack}"

# curl (the health check) and python3-venv are not on every fresh Debian machine.
missing=()
command -v curl >/dev/null 2>&1 || missing+=(curl)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "start.sh: installing ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

healthy() {
  curl -fsS --max-time 2 "$endpoint/_localstack/health" 2>/dev/null | grep -q '"sqs": "\(available\|running\)"'
}

if healthy; then
  echo "LocalStack already running at $endpoint"
  exit 0
fi

if docker info >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
  echo "Starting LocalStack with Docker Compose"
  docker compose -f "$here/compose.yaml" up -d
else
  py="${SPILLWAY_PYTHON:-python3}"
  if ! "$py" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' 2>/dev/null; then
    echo "warning: the pinned LocalStack is verified on Python 3.11; $("$py" --version 2>&1) may not work" >&2
  fi
  stamp="$venv/.spillway-requirements"
  if [ ! -x "$venv/bin/python" ] || ! cmp -s "$here/requirements.txt" "$stamp"; then
    echo "Installing LocalStack into $venv (pinned in localstack/requirements.txt)"
    "$py" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
    cp "$here/requirements.txt" "$stamp"
  fi
  mkdir -p "$state"
  echo "Starting LocalStack on the host (no Docker engine); log: $state/localstack.log"
  (
    cd "$state"
    GATEWAY_LISTEN=127.0.0.1:4566 \
    LOCALSTACK_VOLUME_DIR="$state/volume" \
    SERVICES=sns,sqs,cloudformation,iam,sts,lambda,s3 \
    SKIP_SSL_CERT_DOWNLOAD=1 \
    SQS_ENDPOINT_STRATEGY=path \
    LOCALSTACK_HOST=127.0.0.1:4566 \
    DISABLE_EVENTS=1 \
      nohup "$venv/bin/python" -m localstack.runtime.main >"$state/localstack.log" 2>&1 &
    echo $! >"$state/localstack.pid"
  )
fi

for _ in $(seq 1 120); do
  if healthy; then
    echo "LocalStack ready at $endpoint"
    echo "export AWS_ENDPOINT_URL=$endpoint AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test"
    exit 0
  fi
  sleep 1
done
echo "LocalStack did not become healthy within 120 s; see $state/localstack.log" >&2
tail -n 30 "$state/localstack.log" >&2 || true
exit 1
