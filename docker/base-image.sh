#!/usr/bin/env bash
# Build a Python 3.11 base image without Docker Hub (air-gapped sites, this project's CI):
# debootstrap a minimal Debian bookworm with Python 3.11 and venv from a Debian mirror
# (or a local mirror: DEBIAN_MIRROR), then `docker import` it.
#
#   docker/base-image.sh [IMAGE]          # default fedpeft-base:bookworm
#
# Environment:
#   DEBIAN_MIRROR   Debian mirror (default http://deb.debian.org/debian)
#   FEDPEFT_DOCKER_CACHE
#                   folder that keeps the root filesystem tarball between runs
#                   (default ~/.cache/fedpeft/docker); a cached tarball is reused, a
#                   missing or corrupt one is rebuilt.
# Needs root (debootstrap) and a running Docker engine. An image that already exists is kept.
set -euo pipefail

image="${1:-fedpeft-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
cache="${FEDPEFT_DOCKER_CACHE:-$HOME/.cache/fedpeft/docker}"
tarball="$cache/rootfs-bookworm-python3.11.tar"

if docker image inspect "$image" >/dev/null 2>&1; then
    echo "base image $image: present"
    exit 0
fi
mkdir -p "$cache"
if [ -f "$tarball" ] && tar -tf "$tarball" ./usr/bin/python3.11 >/dev/null 2>&1; then
    echo "base image $image: from the cached root filesystem $tarball"
else
    command -v debootstrap >/dev/null || {
        echo "debootstrap not found: apt-get install -y debootstrap" >&2
        exit 1
    }
    rootfs="$(mktemp -d)"
    trap 'rm -rf "$rootfs"' EXIT
    echo "base image $image: debootstrap bookworm from $mirror"
    debootstrap --variant=minbase \
        --include=python3.11,python3.11-venv,python3-pip,ca-certificates \
        bookworm "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 || {
        tail -20 "$cache/debootstrap.log" >&2
        exit 1
    }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
fi
docker import --change 'ENV LANG=C.UTF-8' "$tarball" "$image" >/dev/null
echo "base image $image: imported"
