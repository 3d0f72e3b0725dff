#!/usr/bin/env bash
# The base images the Dockerfile and dashboards/compose/scaleout.yml name, for a machine
# whose Docker engine reaches no registry (as in CI here: Debian's mirror and PyPI answer,
# Docker Hub does not). An image already present or pullable is left as it is; each other
# is built as a stand-in from a Debian bookworm root (debootstrap) and Debian's packages:
#   python:3.11-slim        Debian's Python 3.11 in a venv at /usr/local
#   redis:7.2               Debian's redis-server 7.0, protected mode off as in the official image
#   postgres:16             Debian's PostgreSQL 15, initialised from POSTGRES_USER/PASSWORD/DB
#   prom/prometheus:v2.53.0 Debian's prometheus 2.42
# Grafana has no Debian package and gets no stand-in.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
need=()
for image in python:3.11-slim redis:7.2 postgres:16 prom/prometheus:v2.53.0; do
  docker image inspect "$image" >/dev/null 2>&1 || docker pull -q "$image" >/dev/null 2>&1 || need+=("$image")
done
[ ${#need[@]} -eq 0 ] && exit 0
if ! docker image inspect local/debian:bookworm >/dev/null 2>&1; then
  root=$(mktemp -d)
  debootstrap --variant=minbase --include=ca-certificates bookworm "$root" http://deb.debian.org/debian >/dev/null
  rm -rf "$root"/var/cache/apt/archives/*.deb
  tar -C "$root" -c . | docker import - local/debian:bookworm >/dev/null
  rm -rf "$root"
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp -r "$here"/. "$ctx"
# The host's CA bundle: where PyPI is reached through a TLS-inspecting proxy, pip in the
# image needs the proxy's CA as the host's pip does.
cp /etc/ssl/certs/ca-certificates.crt "$ctx/python/host-ca.crt"
for image in "${need[@]}"; do
  case $image in
    python:*) dir=python ;; redis:*) dir=redis ;; postgres:*) dir=postgres ;; prom/*) dir=prometheus ;;
  esac
  echo "building a stand-in for $image from Debian's packages" >&2
  docker build -q -t "$image" "$ctx/$dir" >/dev/null
done
