#!/usr/bin/env bash
# Makes the Python base image the compose stack builds FROM, without a registry for images:
# Debian bookworm (minbase) by debootstrap, with bookworm's python3 (3.11) and python3-venv,
# imported into the Docker engine that DOCKER_HOST names. For a test, CI, or an air-gapped
# site; elsewhere the Dockerfiles' default (python:3.11-slim from Docker Hub) is used.
#
#   scripts/docker-base-image.sh            prints the image's tag, building it only if missing
#
# The host's CA bundle (/etc/ssl/certs/ca-certificates.crt, which on a network that intercepts
# TLS holds its CA) is copied into the image at build time, so pip and uv reach PyPI inside a
# build; it is never committed. The tag is keyed by this script and that bundle, so a second
# run on the same engine reuses the image, and a changed script or bundle makes a new one.
# Then build with: IMAGEWORKS_PYTHON_IMAGE=<tag> docker compose ... build
set -euo pipefail
cd "$(dirname "$0")/.."

SUITE=bookworm
MIRROR=${IMAGEWORKS_DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${IMAGEWORKS_HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
key=$( { cat "$0"; echo "$MIRROR"; [ -f "$CA_BUNDLE" ] && cat "$CA_BUNDLE"; } | sha256sum | cut -c1-12)
TAG="imageworks/bookworm-python:3.11-$key"

if docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "$TAG"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "error: debootstrap is not installed" >&2; exit 1; }

rootfs=$(mktemp -d "${TMPDIR:-/tmp}/imageworks-rootfs.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT
echo "building $TAG (debootstrap $SUITE)" >&2
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 || { cat "$rootfs.log" >&2; exit 1; }
rm -f "$rootfs.log"
if [ -f "$CA_BUNDLE" ]; then
    # update-ca-certificates would rebuild the bundle from Debian's list alone: the host's whole
    # bundle goes in as a local CA file, so a later run inside the image keeps it.
    cp "$CA_BUNDLE" "$rootfs/usr/local/share/ca-certificates/host-ca-bundle.crt"
    chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
fi
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
certs=/etc/ssl/certs/ca-certificates.crt
tar -C "$rootfs" --numeric-owner -c . | docker import \
    --change "ENV SSL_CERT_FILE=$certs PIP_CERT=$certs REQUESTS_CA_BUNDLE=$certs LANG=C.UTF-8" \
    --change 'CMD ["python3"]' - "$TAG" >/dev/null
echo "$TAG"
