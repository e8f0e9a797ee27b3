#!/bin/sh
# `pip install "$@"` in the image's venv, honouring the build args of the Dockerfile:
#   WHEELS    set: install only from the copied wheel folder (/opt/wheels), no index
#   EXTRA_CA  set: trust that CA file (copied to /opt/extra-ca/) for the index's TLS
set -eu
if [ -n "${WHEELS:-}" ]; then
    export PIP_NO_INDEX=1 PIP_FIND_LINKS=/opt/wheels
fi
if [ -n "${EXTRA_CA:-}" ]; then
    export PIP_CERT="/opt/extra-ca/$(basename "$EXTRA_CA")"
fi
exec pip install "$@"
