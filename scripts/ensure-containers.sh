#!/usr/bin/env bash
# What tests/tests/container.rs needs, from Debian's and PyPI's registries only:
# - podman and runc (no Docker engine runs here; podman needs no daemon), with the settings of
#   tests/podman/containers.conf;
# - a Debian 12 base image, localhost/spillway-test-base:bookworm, made by debootstrap (no
#   image registry is reachable here): it stands in for debian:bookworm-slim, the Dockerfile's
#   runtime base;
# - kubernetes-validate (pinned, in a venv under ~/.cache/spillway), which checks the
#   manifests of infra/k8s against the Kubernetes API schema.
# Idempotent; quiet when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

export CONTAINERS_CONF="$PWD/tests/podman/containers.conf"
BASE_IMAGE=localhost/spillway-test-base:bookworm
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/spillway"
VENV="$CACHE/k8s-validate-venv"
KUBERNETES_VALIDATE=1.37.0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
command -v podman >/dev/null 2>&1 || missing+=(podman)
command -v runc >/dev/null 2>&1 || missing+=(runc)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v objcopy >/dev/null 2>&1 || missing+=(binutils)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  echo "ensure-containers: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! podman image exists "$BASE_IMAGE"; then
  echo "ensure-containers: building $BASE_IMAGE with debootstrap (about a minute)"
  root=$(mktemp -d)
  trap '$SUDO rm -rf "$root"' EXIT
  $SUDO debootstrap --variant=minbase bookworm "$root/rootfs" http://deb.debian.org/debian >/dev/null
  $SUDO tar -C "$root/rootfs" -c . | podman import --quiet - "$BASE_IMAGE" >/dev/null
fi

if ! "$VENV/bin/python" -c "import kubernetes_validate" >/dev/null 2>&1; then
  echo "ensure-containers: installing kubernetes-validate $KUBERNETES_VALIDATE into $VENV"
  mkdir -p "$CACHE"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "kubernetes-validate==$KUBERNETES_VALIDATE"
fi
