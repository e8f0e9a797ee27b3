"""A real deployment on loopback: SuperLink + 2 SuperNodes with TLS and node authentication.

Costs minutes (every message spawns a ClientApp process that imports torch and builds
the task), so it is marked ``integration``.
"""

from __future__ import annotations

import json
import pathlib
import subprocess

import pytest

from fedpeft.deploy.certs import generate_certs
from fedpeft.deploy.local import LocalDeployment, deploy_local
from tests.support.procs import TINY_DEPLOY, processes_with_env

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parents[2]
REL_TOL = 1e-4
"""Deployment and simulation must agree to this relative tolerance (observed: exactly)."""


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    base = tmp_path_factory.mktemp("deploy")
    lines: list[str] = []
    results = deploy_local(
        TINY_DEPLOY,
        nodes=2,
        rounds=2,
        out_dir=base / "run",
        work_dir=base / "work",
        echo=lines.append,
        node_configs=[{"device.tier": "fast"}, {"device.tier": "slow"}],
        run_timeout=1500,
    )
    return results, lines, base / "work"


def _rounds(results: pathlib.Path) -> list[dict]:
    return json.loads((results / "summary.json").read_text())["rounds"]


def test_the_run_completes_and_the_model_improves(deployed):
    results, lines, _ = deployed
    rounds = _rounds(results)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[2]["loss"] < rounds[0]["loss"]
    assert rounds[2]["accuracy"] >= rounds[0]["accuracy"]
    assert all(r["uplink_bytes"] > 0 and r["downlink_bytes"] > 0 for r in rounds[1:])
    assert sorted(c["partition_id"] for c in rounds[1]["clients"]) == [0, 1]
    assert (results / "adapter" / "adapter_config.json").exists()
    assert any("TLS, node authentication on" in line for line in lines)
    assert any("[ROUND 2/2]" in line for line in lines)  # Flower's log was streamed


def test_same_seeds_give_the_same_results_as_the_simulation(deployed, tmp_path):
    from flwr.supercore.task_identity import TaskIdentity  # noqa: F401 (conftest sets it)

    from fedpeft.flower.client_app import make_client_app
    from fedpeft.flower.server_app import run_server
    from tests.support.fake_grid import InProcessGrid

    results, _, _ = deployed
    flat = {
        **TINY_DEPLOY,
        "federation.rounds": 2,
        "federation.clients": 2,
        "output.dir": str(tmp_path / "sim"),
    }
    grid = InProcessGrid(
        make_client_app(),
        2,
        run_config=flat,
        node_config={0: {"device.tier": "fast"}, 1: {"device.tier": "slow"}},
    )
    run_server(grid, flat)
    simulated, deployed_rounds = _rounds(tmp_path / "sim"), _rounds(results)
    assert len(simulated) == len(deployed_rounds) == 3
    for sim, dep in zip(simulated, deployed_rounds, strict=True):
        assert dep["loss"] == pytest.approx(sim["loss"], rel=REL_TOL), sim["round"]
        assert dep["accuracy"] == pytest.approx(sim["accuracy"], rel=REL_TOL), sim["round"]
        if sim["round"] > 0:
            assert dep["train_loss"] == pytest.approx(sim["train_loss"], rel=REL_TOL)
            assert dep["uplink_bytes"] == sim["uplink_bytes"]


def test_every_started_process_was_stopped(deployed):
    _, _, work = deployed
    assert (work / "logs" / "superlink.log").exists()
    assert processes_with_env(f"FLWR_HOME={work}") == []


def test_registration_script_and_an_unregistered_node_is_refused(tmp_path):
    certs = generate_certs(tmp_path / "certs", 2)
    with LocalDeployment(certs, tmp_path / "w", ROOT, echo=None) as dep:
        dep.start_superlink()
        script_env = {
            **dep.base_env,
            "FLWR_HOME": str(tmp_path / "register-home"),
            "SUPERLINK_ADDRESS": dep.address,
            "ROOT_CERTIFICATES": str(certs.path(certs.ca_cert)),
        }
        script = [
            str(ROOT / "docker" / "register-supernodes.sh"),
            str(certs.path(certs.nodes[0].public_key)),
        ]
        first = subprocess.run(
            ["sh", *script], env=script_env, capture_output=True, text=True, timeout=180
        )
        assert first.returncode == 0 and "registered" in first.stdout, first.stdout + first.stderr
        again = subprocess.run(
            ["sh", *script], env=script_env, capture_output=True, text=True, timeout=180
        )
        assert again.returncode == 0 and "already registered" in again.stdout, (
            again.stdout + again.stderr
        )

        refused = dep.start_supernode(certs.nodes[1], 2)  # its key was never registered
        accepted = dep.start_supernode(certs.nodes[0], 2)
        code = refused.popen.wait(timeout=120)
        assert code != 0
        assert "Exit Code: 305" in refused.log_path.read_text()
        refused.daemon = False
        listing = dep._cli("supernode", "list", "fedpeft-local", "--format", "json")
        nodes = json.loads(listing.stdout)["nodes"]
        assert len(nodes) == 1  # only the registered key is known to the SuperLink
        assert accepted.popen.poll() is None
