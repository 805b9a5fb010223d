#!/usr/bin/env bash
# Installs the Lambda cross-link toolchain into project-owned locations (idempotent):
#   zig          from the `ziglang` PyPI package, in a venv at ~/.cache/spillway/zig-venv
#   cargo-zigbuild from crates.io, under ~/.cache/spillway/cargo-zigbuild/bin
# and prints the PATH to use. Versions are pinned so every machine links the same way.
set -euo pipefail

ZIGLANG_VERSION="${ZIGLANG_VERSION:-0.15.2}"
ZIGBUILD_VERSION="${ZIGBUILD_VERSION:-0.24.1}"
CACHE="${SPILLWAY_CACHE:-$HOME/.cache/spillway}"
VENV="$CACHE/zig-venv"
ZB_ROOT="$CACHE/cargo-zigbuild"

if ! "$VENV/bin/python" -m ziglang version 2>/dev/null | grep -qx "$ZIGLANG_VERSION"; then
  echo "lambda-toolchain: installing ziglang==$ZIGLANG_VERSION into $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "ziglang==$ZIGLANG_VERSION"
fi
if ! "$ZB_ROOT/bin/cargo-zigbuild" --version 2>/dev/null | grep -q " $ZIGBUILD_VERSION\$"; then
  echo "lambda-toolchain: installing cargo-zigbuild $ZIGBUILD_VERSION into $ZB_ROOT" >&2
  # Its own build dir under /tmp, so the workspace's target dir is not touched.
  CARGO_TARGET_DIR="${TMPDIR:-/tmp}/spillway-zigbuild-install" \
    cargo install --locked --quiet --no-default-features cargo-zigbuild --version "$ZIGBUILD_VERSION" --root "$ZB_ROOT"
  rm -rf "${TMPDIR:-/tmp}/spillway-zigbuild-install"
fi
# cargo-zigbuild looks for `zig` on PATH, or runs `python3 -m ziglang` when it is absent:
# put the venv first so its python (with ziglang) is the one found.
echo "$ZB_ROOT/bin:$VENV/bin"
