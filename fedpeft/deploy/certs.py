"""Certificates and keys for a TLS + SuperNode-authenticated deployment.

:func:`generate_certs` writes, with the ``cryptography`` package (FLOWER.md §9.2–9.3):

==============================  ====  ==================================================
file                            mode  what
==============================  ====  ==================================================
``ca.crt`` / ``ca.key``         0644  self-signed CA (EC P-384); the key never leaves
                                0600  this directory (it is mounted nowhere)
``superlink.crt`` / ``.key``    0644  SuperLink TLS certificate signed by the CA, SANs
                                0600  ``superlink``, ``localhost``, ``127.0.0.1`` (+ yours)
``supernode-<i>.key`` / ``.pub``0600  SuperNode authentication key pair, EC P-384:
                                0644  private key OpenSSH PEM, public key OpenSSH
                                      ``ecdsa-sha2-nistp384 …`` (``flwr supernode register``)
``supernode-<i>-runtime.crt``   0644  TLS certificate of the SuperNode's Runtime API
``supernode-<i>-runtime.key``   0600  (SANs ``supernode-<i>``, ``localhost``, ``127.0.0.1``),
                                      dialled by its SuperExec in ``process`` isolation
``superexec-serverapp.secret``  0600  SuperExec shared secrets (32 random bytes, hex),
``superexec-clientapp-<i>…``    0600  one per Runtime API, used in ``process`` isolation
``manifest.json``               0644  every file above, the SANs, and the node list
==============================  ====  ==================================================

``<i>`` is 1-based (``supernode-1`` has ``partition-id=0``), matching the compose
service names. The SuperLink accepts exactly the registered public keys: with
``--enable-supernode-auth`` each ``.pub`` listed in the manifest must be registered
with ``flwr supernode register <pub> <connection>`` (``deploy-local`` does this; see
docs/deployment.md for compose). Existing files are never overwritten unless
``overwrite=True``.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import pathlib
import re
import secrets
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpeft.errors import FedPeftError

MANIFEST = "manifest.json"
CA_DAYS = 3650
LEAF_DAYS = 825
_PRIVATE = 0o600
_PUBLIC = 0o644


@dataclass(frozen=True)
class NodeFiles:
    """The files of one SuperNode (names relative to the certificate directory).

    Attributes:
        name: compose service name, ``supernode-<i>``.
        partition_id: ``i - 1``.
        private_key: authentication private key (OpenSSH PEM).
        public_key: authentication public key (OpenSSH ``ecdsa-sha2-nistp384``).
        runtime_cert: TLS certificate of the SuperNode's Runtime API.
        runtime_key: its private key.
        superexec_secret: shared secret between the SuperNode and its SuperExec.
    """

    name: str
    partition_id: int
    private_key: str
    public_key: str
    runtime_cert: str
    runtime_key: str
    superexec_secret: str


@dataclass(frozen=True)
class CertManifest:
    """What :func:`generate_certs` wrote (``manifest.json``).

    Attributes:
        directory: the certificate directory (absolute).
        ca_cert: CA certificate (every TLS client's root certificate).
        ca_key: CA private key (only for issuing more certificates).
        server_cert: SuperLink TLS certificate.
        server_key: its private key.
        superexec_secret: shared secret between the SuperLink and the ServerApp SuperExec.
        san_dns: DNS names in the SuperLink certificate.
        san_ips: IP addresses in the SuperLink certificate.
        nodes: one entry per SuperNode, in partition order.
    """

    directory: pathlib.Path
    ca_cert: str
    ca_key: str
    server_cert: str
    server_key: str
    superexec_secret: str
    san_dns: tuple[str, ...]
    san_ips: tuple[str, ...]
    nodes: tuple[NodeFiles, ...]

    def path(self, name: str) -> pathlib.Path:
        """Absolute path of a file named in the manifest."""
        return self.directory / name

    def to_json(self) -> str:
        """The manifest as JSON (paths relative to its directory)."""
        data = asdict(self)
        data.pop("directory")
        return json.dumps({"version": 1, **data}, indent=2) + "\n"


def node_files(index: int) -> NodeFiles:
    """File names of SuperNode ``index`` (1-based)."""
    name = f"supernode-{index}"
    return NodeFiles(
        name=name,
        partition_id=index - 1,
        private_key=f"{name}.key",
        public_key=f"{name}.pub",
        runtime_cert=f"{name}-runtime.crt",
        runtime_key=f"{name}-runtime.key",
        superexec_secret=f"superexec-clientapp-{index}.secret",
    )


def load_manifest(directory: str | os.PathLike[str]) -> CertManifest:
    """Read ``manifest.json`` of a certificate directory.

    Raises:
        FedPeftError: no manifest, or a file it names is missing.
    """
    root = pathlib.Path(directory).expanduser().resolve()
    path = root / MANIFEST
    if not path.exists():
        raise FedPeftError(
            f"certificate directory {str(root)!r} has no {MANIFEST}; create it with "
            f"`fedpeft certs --out {directory} --nodes N`"
        )
    data = json.loads(path.read_text())
    nodes = tuple(NodeFiles(**n) for n in data["nodes"])
    manifest = CertManifest(
        directory=root,
        ca_cert=data["ca_cert"],
        ca_key=data["ca_key"],
        server_cert=data["server_cert"],
        server_key=data["server_key"],
        superexec_secret=data["superexec_secret"],
        san_dns=tuple(data["san_dns"]),
        san_ips=tuple(data["san_ips"]),
        nodes=nodes,
    )
    missing = [n for n in _all_files(manifest) if not manifest.path(n).exists()]
    if missing:
        raise FedPeftError(f"{path} names files that do not exist: {', '.join(missing)}")
    return manifest


def generate_certs(
    out_dir: str | os.PathLike[str],
    nodes: int,
    san_dns: Sequence[str] = ("superlink", "localhost"),
    san_ips: Sequence[str] = ("127.0.0.1",),
    overwrite: bool = False,
) -> CertManifest:
    """Write a CA, the SuperLink certificate, ``nodes`` SuperNode identities and the manifest.

    Args:
        out_dir: directory to write (created if needed).
        nodes: number of SuperNodes (>= 1).
        san_dns: DNS names clients dial the SuperLink by.
        san_ips: IP addresses clients dial the SuperLink by.
        overwrite: replace existing files (new keys: previously registered public
            keys stop working).

    Raises:
        FedPeftError: ``nodes < 1``, an invalid IP address or DNS name (see
            :func:`dns_name_problem`), or a file exists and ``overwrite`` is false
            (the message names the first such file).
    """
    if nodes < 1:
        raise FedPeftError(f"certs: nodes must be >= 1, got {nodes}")
    ips = _parse_ips(san_ips)
    for name in san_dns:
        problem = dns_name_problem(name)
        if problem:
            raise FedPeftError(f"certs: san_dns entry {name!r} is not a valid DNS name: {problem}")
    root = pathlib.Path(out_dir).expanduser().resolve()
    manifest = CertManifest(
        directory=root,
        ca_cert="ca.crt",
        ca_key="ca.key",
        server_cert="superlink.crt",
        server_key="superlink.key",
        superexec_secret="superexec-serverapp.secret",
        san_dns=tuple(san_dns),
        san_ips=tuple(str(ip) for ip in ips),
        nodes=tuple(node_files(i) for i in range(1, nodes + 1)),
    )
    if not overwrite:
        _refuse_existing(root, [*_all_files(manifest), MANIFEST])
    root.mkdir(parents=True, exist_ok=True)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _ca_certificate(ca_key)
    _write(root / manifest.ca_key, _private_pem(ca_key), _PRIVATE)
    _write(root / manifest.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), _PUBLIC)
    _write_leaf(
        root, manifest.server_cert, manifest.server_key, "superlink", san_dns, ips, ca_key, ca_cert
    )
    _write(root / manifest.superexec_secret, _secret(), _PRIVATE)
    for node in manifest.nodes:
        _write_node(root, node, ca_key, ca_cert)
    _write(root / MANIFEST, manifest.to_json().encode(), _PUBLIC)
    return manifest


def add_supernodes(out_dir: str | os.PathLike[str], count: int = 1) -> CertManifest:
    """Add ``count`` SuperNode identities to an existing certificate directory.

    The CA and SuperLink certificate stay as they are; new nodes get the next
    indices (``supernode-<n+1>`` …) and are appended to the manifest. Register each
    new ``.pub`` with the running SuperLink (``flwr supernode register``).

    Raises:
        FedPeftError: no manifest, ``count < 1``, or a new node's file already exists.
    """
    if count < 1:
        raise FedPeftError(f"certs: count must be >= 1, got {count}")
    manifest = load_manifest(out_dir)
    root = manifest.directory
    start = len(manifest.nodes) + 1
    new = tuple(node_files(i) for i in range(start, start + count))
    _refuse_existing(root, [f for n in new for f in _node_file_names(n)])
    ca_key = serialization.load_pem_private_key(manifest.path(manifest.ca_key).read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(manifest.path(manifest.ca_cert).read_bytes())
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise FedPeftError(f"{manifest.path(manifest.ca_key)} is not an EC private key")
    for node in new:
        _write_node(root, node, ca_key, ca_cert)
    updated = CertManifest(**{**_fields(manifest), "nodes": manifest.nodes + new})
    _write(root / MANIFEST, updated.to_json().encode(), _PUBLIC)
    return updated


# -- helpers ----------------------------------------------------------------------


def _fields(manifest: CertManifest) -> dict[str, object]:
    return {k: getattr(manifest, k) for k in manifest.__dataclass_fields__}


def _node_file_names(node: NodeFiles) -> list[str]:
    return [
        node.private_key,
        node.public_key,
        node.runtime_cert,
        node.runtime_key,
        node.superexec_secret,
    ]


def _all_files(manifest: CertManifest) -> list[str]:
    files = [
        manifest.ca_cert,
        manifest.ca_key,
        manifest.server_cert,
        manifest.server_key,
        manifest.superexec_secret,
    ]
    for node in manifest.nodes:
        files += _node_file_names(node)
    return files


def _refuse_existing(root: pathlib.Path, names: Iterable[str]) -> None:
    for name in names:
        if (root / name).exists():
            raise FedPeftError(
                f"certs: {root / name} already exists; refusing to overwrite keys and "
                "certificates (pass --force / overwrite=True to replace them all — "
                "registered public keys then stop working)"
            )


_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def dns_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a DNS name in a certificate, or ``None`` if it can.

    Accepted: host names of RFC 1123 (dot-separated labels of 1-63 letters, digits
    and inner hyphens, 253 characters at most, not all-numeric at the end, so a
    mistyped IP address is caught), optionally with a leading ``*.`` wildcard label.
    Internationalised names must be given in their ASCII (``xn--``) form.
    """
    if not isinstance(name, str) or not name.strip():
        return "it is empty"
    if name != name.strip():
        return "it has leading or trailing spaces"
    if not name.isascii():
        return "it is not ASCII (give an internationalised name in its xn-- form)"
    if name.endswith("."):
        return "it ends with a dot"
    if len(name) > 253:
        return f"it has {len(name)} characters, at most 253 are allowed"
    labels = name.split(".")
    if labels[0] == "*" and len(labels) > 1:
        labels = labels[1:]
    for label in labels:
        if not label:
            return "it has an empty label (two dots in a row, or a leading dot)"
        if len(label) > 63:
            return f"its label {label[:20]!r}… has {len(label)} characters, at most 63 are allowed"
        if not _LABEL.fullmatch(label):
            return (
                f"its label {label!r} may hold only letters, digits and inner hyphens "
                "(a '*' wildcard only as the whole first label)"
            )
    if labels[-1].isdigit():
        return "it ends in an all-numeric label (a mistyped IP address?)"
    return None


def _parse_ips(values: Iterable[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_address(value))
        except ValueError as err:
            raise FedPeftError(f"certs: san_ips entry {value!r} is not an IP address") from err
    return out


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _secret() -> bytes:
    return secrets.token_hex(32).encode()


def _write(path: pathlib.Path, data: bytes, mode: int) -> None:
    """Write atomically with ``mode`` set before any byte is visible."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _validity() -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    return now - datetime.timedelta(minutes=5), now


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpeft deployment CA")])
    start, now = _validity()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )


def _leaf_certificate(
    common_name: str,
    dns: Iterable[str],
    ips: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address],
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
) -> x509.Certificate:
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ip) for ip in ips]
    start, now = _validity()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )


def _write_leaf(
    root: pathlib.Path,
    cert_name: str,
    key_name: str,
    common_name: str,
    dns: Iterable[str],
    ips: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address],
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    cert = _leaf_certificate(common_name, dns, ips, key, ca_key, ca_cert)
    _write(root / key_name, _private_pem(key), _PRIVATE)
    _write(root / cert_name, cert.public_bytes(serialization.Encoding.PEM), _PUBLIC)


def _write_node(
    root: pathlib.Path,
    node: NodeFiles,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
) -> None:
    auth = ec.generate_private_key(ec.SECP384R1())
    _write(
        root / node.private_key,
        auth.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
        _PRIVATE,
    )
    public = auth.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(root / node.public_key, public + f" fedpeft-{node.name}\n".encode(), _PUBLIC)
    _write_leaf(
        root,
        node.runtime_cert,
        node.runtime_key,
        node.name,
        (node.name, "localhost"),
        _parse_ips(["127.0.0.1"]),
        ca_key,
        ca_cert,
    )
    _write(root / node.superexec_secret, _secret(), _PRIVATE)
