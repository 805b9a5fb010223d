#!/usr/bin/env bash
# Makes sure PostgreSQL answers on 127.0.0.1:5432 with trust auth for user postgres, as the
# PostgreSQL tests expect, and that pgbouncer is installed (the tests start their own).
# Idempotent: installs them (Debian packages) only when missing,
# starts the cluster only when it is down, edits pg_hba.conf only when trust is not there.
# Prints what it did.
set -euo pipefail

HOST=127.0.0.1
PORT=5432
say() { echo "ensure-postgres: $*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
  say "PostgreSQL is not installed; installing the postgresql package"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq postgresql >/dev/null
  say "installed $(ls /etc/postgresql | sort -V | tail -n1)"
fi

# The tests that put PgBouncer between the sink and the server start one of their own.
if ! [ -x /usr/sbin/pgbouncer ] && ! command -v pgbouncer >/dev/null 2>&1; then
  say "PgBouncer is not installed; installing the pgbouncer package"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq pgbouncer >/dev/null
fi

VERSION=$(ls /etc/postgresql | sort -V | tail -n1)
CONF_DIR=/etc/postgresql/$VERSION/main
HBA=$CONF_DIR/pg_hba.conf

ready() { pg_isready -q -h "$HOST" -p "$PORT"; }

wait_ready() {
  for _ in $(seq 1 60); do
    ready && return 0
    sleep 0.5
  done
  say "PostgreSQL $VERSION did not become ready on $HOST:$PORT" >&2
  return 1
}

if ready; then
  say "PostgreSQL is already accepting connections on $HOST:$PORT"
else
  # Listen on the loopback address the tests use.
  if ! grep -Eq "^\s*listen_addresses\s*=" "$CONF_DIR/postgresql.conf"; then
    echo "listen_addresses = 'localhost'" | as_root tee -a "$CONF_DIR/postgresql.conf" >/dev/null
    say "set listen_addresses = 'localhost'"
  fi
  say "starting cluster $VERSION/main"
  as_root pg_ctlcluster --skip-systemctl-redirect "$VERSION" main start || true
  wait_ready
  say "PostgreSQL $VERSION is accepting connections on $HOST:$PORT"
fi

# Trust auth for postgres over TCP on 127.0.0.1 (a local test database, never a server).
if psql -h "$HOST" -p "$PORT" -U postgres -d postgres -w -Atc 'SELECT 1' >/dev/null 2>&1; then
  say "user postgres connects to $HOST:$PORT without a password"
else
  say "adding trust rules for 127.0.0.1/32 and ::1/128 at the top of $HBA"
  as_root cp "$HBA" "$HBA.spillway.bak"
  {
    echo "# added by spillway scripts/ensure-postgres.sh for local tests"
    echo "host all all 127.0.0.1/32 trust"
    echo "host all all ::1/128 trust"
    as_root cat "$HBA.spillway.bak"
  } | as_root tee "$HBA" >/dev/null
  as_root pg_ctlcluster --skip-systemctl-redirect "$VERSION" main reload
  sleep 1
  if psql -h "$HOST" -p "$PORT" -U postgres -d postgres -w -Atc 'SELECT 1' >/dev/null 2>&1; then
    say "user postgres now connects to $HOST:$PORT without a password"
  else
    say "user postgres still cannot connect to $HOST:$PORT; see $HBA" >&2
    exit 1
  fi
fi
