#!/usr/bin/env bash
# The project's one test command (`make test`): sets up everything the tests need from the
# project's own files — a C toolchain for librdkafka, PostgreSQL (installed/started if missing),
# LocalStack (pinned venv, started if not running), podman and a Debian base image for the
# container image's test — builds the binaries the end-to-end tests
# spawn, runs every test. Kafka tests need no service: they run on librdkafka's mock cluster.
# Under CI=true a service that cannot be set up fails the run (the tests also refuse to skip).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/ensure-build-tools.sh
bash scripts/ensure-postgres.sh
bash localstack/start.sh
# podman, a Debian base image and kubernetes-validate (tests/tests/container.rs).
bash scripts/ensure-containers.sh
export AWS_ENDPOINT_URL="${AWS_ENDPOINT_URL:-http://127.0.0.1:4566}"
export AWS_REGION="${AWS_REGION:-us-east-1}"
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"

# Binaries spawned by the end-to-end tests (crash tests kill and restart them).
cargo build --workspace --bins
# The Lambda packages (tests/tests/lambda_package.rs checks their glibc and measures them);
# installs cargo-zigbuild and zig into ~/.cache/spillway on first use.
bash scripts/lambda-build.sh

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
