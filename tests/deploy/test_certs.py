"""generate_certs / add_supernodes: SANs, key formats, permissions, no silent overwrite."""

from __future__ import annotations

import ipaddress
import json
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedpeft.deploy.certs import MANIFEST, add_supernodes, generate_certs, load_manifest
from fedpeft.errors import FedPeftError


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return generate_certs(
        tmp_path_factory.mktemp("certs"),
        nodes=2,
        san_dns=("superlink", "localhost", "link.example"),
    )


def _cert(manifest, name):
    return x509.load_pem_x509_certificate(manifest.path(name).read_bytes())


def _verified_by_ca(manifest, cert):
    ca = _cert(manifest, manifest.ca_cert)
    cert.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    return True


def test_superlink_certificate_has_the_sans_and_is_signed_by_the_ca(certs):
    cert = _cert(certs, certs.server_cert)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"superlink", "localhost", "link.example"}
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert _verified_by_ca(certs, cert)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    ca = _cert(certs, certs.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_tls_keys_match_their_certificates(certs):
    for cert_name, key_name in [
        (certs.server_cert, certs.server_key),
        (certs.ca_cert, certs.ca_key),
    ] + [(n.runtime_cert, n.runtime_key) for n in certs.nodes]:
        key = serialization.load_pem_private_key(certs.path(key_name).read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert key.public_key() == _cert(certs, cert_name).public_key()


def test_runtime_certificates_name_their_compose_service(certs):
    for node in certs.nodes:
        cert = _cert(certs, node.runtime_cert)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert node.name in sans.get_values_for_type(x509.DNSName)
        assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
        assert _verified_by_ca(certs, cert)


def test_supernode_keys_are_openssh_p384_pairs(certs):
    publics = set()
    for i, node in enumerate(certs.nodes):
        assert node.name == f"supernode-{i + 1}" and node.partition_id == i
        pem = certs.path(node.private_key).read_bytes()
        assert pem.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        private = serialization.load_ssh_private_key(pem, None)
        text = certs.path(node.public_key).read_text()
        assert text.startswith("ecdsa-sha2-nistp384 ")
        public = serialization.load_ssh_public_key(text.encode())
        assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"
        assert public == private.public_key()
        # the pair really signs/verifies (what SuperNode authentication does)
        sig = private.sign(b"fedpeft", ec.ECDSA(hashes.SHA384()))
        public.verify(sig, b"fedpeft", ec.ECDSA(hashes.SHA384()))
        publics.add(text.split()[1])
    assert len(publics) == len(certs.nodes)


def test_private_files_are_0600_and_public_ones_0644(certs):
    private = [certs.ca_key, certs.server_key, certs.superexec_secret] + [
        f for n in certs.nodes for f in (n.private_key, n.runtime_key, n.superexec_secret)
    ]
    public = [certs.ca_cert, certs.server_cert, MANIFEST] + [
        f for n in certs.nodes for f in (n.public_key, n.runtime_cert)
    ]
    for name in private:
        assert stat.S_IMODE(certs.path(name).stat().st_mode) == 0o600, name
    for name in public:
        assert stat.S_IMODE(certs.path(name).stat().st_mode) == 0o644, name
    secrets = {
        certs.path(n).read_text()
        for n in [certs.superexec_secret] + [x.superexec_secret for x in certs.nodes]
    }
    assert len(secrets) == 3 and all(len(s) == 64 for s in secrets)


def test_manifest_round_trips_and_lists_existing_files(certs):
    loaded = load_manifest(certs.directory)
    assert loaded == certs
    data = json.loads(certs.path(MANIFEST).read_text())
    assert data["version"] == 1 and [n["name"] for n in data["nodes"]] == [
        "supernode-1",
        "supernode-2",
    ]


def test_refuses_to_overwrite_and_names_the_file(tmp_path):
    first = generate_certs(tmp_path, nodes=1)
    before = first.path(first.nodes[0].private_key).read_bytes()
    with pytest.raises(FedPeftError, match=r"ca\.crt already exists; refusing to overwrite"):
        generate_certs(tmp_path, nodes=1)
    assert first.path(first.nodes[0].private_key).read_bytes() == before
    # only one file present is enough to refuse
    other = tmp_path / "other"
    other.mkdir()
    (other / "supernode-2.pub").write_text("keep me")
    with pytest.raises(FedPeftError, match=r"supernode-2\.pub already exists"):
        generate_certs(other, nodes=2)
    assert (other / "supernode-2.pub").read_text() == "keep me"
    assert not (other / "ca.crt").exists()  # nothing was written before refusing


def test_overwrite_replaces_every_key(tmp_path):
    first = generate_certs(tmp_path, nodes=1)
    old = {n: first.path(n).read_bytes() for n in (first.ca_key, first.nodes[0].private_key)}
    second = generate_certs(tmp_path, nodes=1, overwrite=True)
    assert all(second.path(n).read_bytes() != v for n, v in old.items())
    assert stat.S_IMODE(second.path(second.ca_key).stat().st_mode) == 0o600


def test_add_supernodes_keeps_the_ca_and_appends(tmp_path):
    first = generate_certs(tmp_path, nodes=2)
    ca = first.path(first.ca_cert).read_bytes()
    grown = add_supernodes(tmp_path, 1)
    assert [n.name for n in grown.nodes] == ["supernode-1", "supernode-2", "supernode-3"]
    assert grown.nodes[2].partition_id == 2
    assert first.path(first.ca_cert).read_bytes() == ca
    assert load_manifest(tmp_path) == grown
    assert _verified_by_ca(grown, _cert(grown, grown.nodes[2].runtime_cert))


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(FedPeftError, match="nodes must be >= 1, got 0"):
        generate_certs(tmp_path, nodes=0)
    with pytest.raises(FedPeftError, match="'superlink' is not an IP address"):
        generate_certs(tmp_path, nodes=1, san_ips=("superlink",))
    with pytest.raises(FedPeftError, match="has no manifest.json"):
        load_manifest(tmp_path)
    made = generate_certs(tmp_path / "m", nodes=1)
    made.path(made.nodes[0].public_key).unlink()
    with pytest.raises(FedPeftError, match="supernode-1.pub"):
        load_manifest(made.directory)
