#!/usr/bin/env bash
# `make lambda`: builds one `bootstrap` zip per function for the `provided.al2023` runtime.
#
#   ARCH=x86_64 (default) or ARCH=arm64   target architecture
#   LAMBDA_OUT=dist/lambda                where the zips go
#   PG_CA_FILE=path                       PEM certificates the worker trusts for PostgreSQL
#                                         over TLS (the RDS bundle), put in the worker zip as
#                                         pg-ca.pem; deploy with DatabaseCaBundled=true
#
# Binaries are built with the size-optimised `lambda` profile and linked by zig against
# glibc 2.34 (Amazon Linux 2023's) through cargo-zigbuild, both installed on first use into
# ~/.cache/spillway by scripts/lambda-toolchain.sh. Only the x86_64 Rust target is installed
# on the project's machines: ARCH=arm64 needs `rustup target add aarch64-unknown-linux-gnu`
# and is untested here.
set -euo pipefail
cd "$(dirname "$0")/.."

ARCH="${ARCH:-x86_64}"
case "$ARCH" in
  x86_64 | amd64) ARCH=x86_64; TRIPLE=x86_64-unknown-linux-gnu ;;
  arm64 | aarch64) ARCH=arm64; TRIPLE=aarch64-unknown-linux-gnu ;;
  *) echo "lambda-build: ARCH must be x86_64 or arm64, not '$ARCH'" >&2; exit 2 ;;
esac
GLIBC=2.34
PG_CA="${PG_CA_FILE:-}"
if [ -n "$PG_CA" ] && ! grep -q 'BEGIN CERTIFICATE' "$PG_CA" 2>/dev/null; then
  echo "lambda-build: PG_CA_FILE=$PG_CA is not a readable PEM file of certificates" >&2
  exit 2
fi
OUT="${LAMBDA_OUT:-dist/lambda}/$ARCH"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"

if ! rustup target list --installed 2>/dev/null | grep -qx "$TRIPLE"; then
  echo "lambda-build: the Rust target $TRIPLE is not installed (rustup target add $TRIPLE)" >&2
  exit 1
fi
TOOLCHAIN_PATH="$(bash scripts/lambda-toolchain.sh)"
export PATH="$TOOLCHAIN_PATH:$PATH"

start=$(date +%s)
# --no-default-features: no Kafka (librdkafka) in the functions; they use SNS/SQS.
# ingest-api/no-thp: mimalloc without transparent huge pages (cold-start time, Cargo.toml).
cargo zigbuild --locked --profile lambda --target "$TRIPLE.$GLIBC" --no-default-features \
  --features ingest-api/no-thp \
  -p ingest-api --bin spillway-ingest \
  -p workers --bin spillway-worker --example lambda_hello
echo "lambda-build: compiled in $(( $(date +%s) - start )) s" >&2

BIN_DIR="$TARGET_DIR/$TRIPLE/lambda"
mkdir -p "$OUT"
package() { # function-name binary-path [PostgreSQL CA file]
  local dir="$OUT/$1"
  local files=(bootstrap)
  rm -rf "$dir" && mkdir -p "$dir"
  cp "$2" "$dir/bootstrap"
  chmod 755 "$dir/bootstrap"
  if [ -n "${3:-}" ]; then
    cp "$3" "$dir/pg-ca.pem"
    chmod 644 "$dir/pg-ca.pem"
    files+=(pg-ca.pem)
  fi
  rm -f "$OUT/$1.zip"
  (cd "$dir" && zip -q -X -9 "../$1.zip" "${files[@]}")
}
package ingest "$BIN_DIR/spillway-ingest"
package worker "$BIN_DIR/spillway-worker" "$PG_CA"
package hello "$BIN_DIR/examples/lambda_hello"

printf '%-8s %12s %12s  %s\n' function bootstrap zip path
for f in ingest worker hello; do
  printf '%-8s %12s %12s  %s\n' "$f" \
    "$(stat -c %s "$OUT/$f/bootstrap")" "$(stat -c %s "$OUT/$f.zip")" "$OUT/$f.zip"
done
