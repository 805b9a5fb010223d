#!/usr/bin/env bash
# The Kafka transport links librdkafka built from the sources vendored in rdkafka-sys, with
# its own ./configure && make: that needs a C compiler and GNU make (zstd comes from zstd-sys,
# lz4/snappy are built in; no system librdkafka, zlib, OpenSSL or cmake). Installs them from
# Debian when missing. Idempotent and quiet when everything is there.
set -euo pipefail

missing=()
command -v cc >/dev/null 2>&1 || missing+=(gcc)
command -v make >/dev/null 2>&1 || missing+=(make)
# `make lambda` zips the bootstraps; its test reads their symbols with objdump.
command -v zip >/dev/null 2>&1 || missing+=(zip)
command -v objdump >/dev/null 2>&1 || missing+=(binutils)
# The TLS test of the worker zip lists it; the private PostgreSQL's certificates.
command -v unzip >/dev/null 2>&1 || missing+=(unzip)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "ensure-build-tools: installing ${missing[*]} (librdkafka build, Lambda packaging)"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" libc6-dev
