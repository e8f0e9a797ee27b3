#!/bin/sh
# Entrypoint of a ClientApp SuperExec with warm ClientApps (docs/deployment.md "Warm
# ClientApps"): start this container's zygote (fedpeft/deploy/zygote.py), then
# flower-superexec, both with the same environment and the flwr-clientapp shim first on
# PATH. Without an answering zygote the shim runs Flower's own flwr-clientapp (cold).
set -eu
export FEDPEFT_ZYGOTE_SOCKET="${FEDPEFT_ZYGOTE_SOCKET:-/tmp/fedpeft-zygote.sock}"
export PATH="/opt/fedpeft-warm/bin:$PATH"
python -c 'import os, sys; env = dict(os.environ); from fedpeft.deploy.zygote import main; sys.exit(main(env=env))' &
exec flower-superexec "$@"
