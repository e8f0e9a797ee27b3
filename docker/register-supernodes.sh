#!/bin/sh
# Register SuperNode public keys with a SuperLink started with --enable-supernode-auth.
#
#   register-supernodes KEY.pub [KEY.pub ...]
#
# Environment:
#   SUPERLINK_ADDRESS   host:port of the SuperLink (default superlink:8000)
#   ROOT_CERTIFICATES   CA certificate that signed the SuperLink's (default /run/secrets/ca.crt)
#   REGISTER_RETRIES    attempts per key while the SuperLink starts (default 30, 2 s apart)
#
# A key that is already registered counts as success, so the job can run on every
# `docker compose up`. Any other failure exits non-zero with flwr's message.
set -eu

: "${SUPERLINK_ADDRESS:=superlink:8000}"
: "${ROOT_CERTIFICATES:=/run/secrets/ca.crt}"
: "${REGISTER_RETRIES:=30}"
: "${FLWR_HOME:=${HOME}/.flwr}"

if [ "$#" -eq 0 ]; then
    echo "usage: register-supernodes KEY.pub [KEY.pub ...]" >&2
    exit 2
fi

mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "fedpeft"

[superlink.fedpeft]
address = "$SUPERLINK_ADDRESS"
root-certificates = "$ROOT_CERTIFICATES"
EOF

for key in "$@"; do
    attempt=1
    while :; do
        if out=$(flwr supernode register "$key" fedpeft 2>&1); then
            echo "registered $key"
            break
        fi
        case "$out" in
            *"already in use"*)
                echo "already registered: $key"
                break
                ;;
        esac
        if [ "$attempt" -ge "$REGISTER_RETRIES" ]; then
            echo "$out" >&2
            echo "could not register $key with $SUPERLINK_ADDRESS after $attempt attempts" >&2
            exit 1
        fi
        attempt=$((attempt + 1))
        sleep 2
    done
done
