"""Deployment: certificates and keys, and a real loopback deployment.

* :mod:`fedpeft.deploy.certs` — a CA, the SuperLink's TLS certificate, one
  authentication key pair (and one Runtime-API TLS certificate) per SuperNode, the
  SuperExec shared secret, and a ``manifest.json`` that names every file
  (FLOWER.md §9.2–9.3);
* :mod:`fedpeft.deploy.local` — the compose topology as real processes on
  127.0.0.1 with TLS and SuperNode authentication, driven through Flower's command
  line tools (``flower-superlink``, ``flower-supernode``, ``flower-superexec``,
  ``flwr``) — this package never imports ``flwr``;
* :mod:`fedpeft.deploy.zygote` — a per-node fork server and a ``flwr-clientapp``
  shim that start Flower's per-message ClientApp processes warm (its Flower-facing
  hooks are in :mod:`fedpeft.flower.warm_clientapp`).
"""

from fedpeft.deploy.certs import CertManifest, add_supernodes, generate_certs, load_manifest
from fedpeft.deploy.local import LocalDeployment, deploy_local

__all__ = [
    "CertManifest",
    "LocalDeployment",
    "add_supernodes",
    "deploy_local",
    "generate_certs",
    "load_manifest",
]
