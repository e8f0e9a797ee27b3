"""A SuperNode crashes mid-run and comes back: it rejoins under TLS + node authentication.

Real loopback deployment (``LocalDeployment``): SuperLink + 2 SuperNodes, tiny-bert,
4 rounds, ``federation.min-replies=1``. After round 1 SuperNode 2 is SIGKILLed (its
process group, its SuperExec in ``process`` isolation and every ClientApp it started),
then started again with the same key, node config and Runtime-API port. Flower issue
#4844 reported that a restarted SuperNode could not rejoin under TLS (flwr 1.14).

On flwr 1.41 the SuperLink refuses to activate a node it still counts as online (up to
2 heartbeat intervals = 60 s after the crash: ``Exit Code: 305 … Failed to activate
SuperNode``, HTTP 412), so ``restart_supernode`` waits until ``flwr supernode list``
shows the node offline. From then on the SuperLink answers the node's pending message
with "Node Unavailable" and the ServerApp finishes the round with one update.

Flower writes that error with the SuperLink's node id (1) as sender; the ServerApp
re-addresses it to the node it was meant for (``on_behalf_of_node``, unit-tested here
without a deployment), so the round counts one failure, for node 2.

Each deployment test costs about 2.5–3 minutes, so it is marked ``integration``.
"""

from __future__ import annotations

import json
import pathlib
import re
import threading
import time

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedpeft.config import parse_run_config
from fedpeft.deploy.certs import generate_certs
from fedpeft.deploy.local import LocalDeployment
from fedpeft.flower.server_app import ForwardingGrid, ProgressGrid, reply_of
from fedpeft.server.listeners import Observer
from tests.support.procs import processes_with_env

ROOT = pathlib.Path(__file__).resolve().parents[2]
ROUNDS = 4
TINY = {
    "model.name": "tiny-bert",
    "data.max-examples": 32,
    "data.test-size": 100,
    "train.local-steps": 2,
    "train.lr": 5e-3,
    "seed": 3,
    "federation.clients": 2,
    "federation.rounds": ROUNDS,
    "federation.min-replies": 1,
    # a safety net only: the round without node 2 ends on the SuperLink's
    # "Node Unavailable" error, well before this
    "federation.timeout": 120.0,
}
NODE_UNAVAILABLE = (
    "Error: Node Unavailable — The destination node failed to report a heartbeat "
    "within 2 × its expected interval."
)
TIMELINE = r"ROUND|no reply|Unavailable|replied with an error|supernode-2|SuperNodes online"
AUTH_FAILURES = ("ApiError", "could not be activated", "Exit Code", '" 401', '" 403', '" 412')


def _details(results: pathlib.Path) -> list[dict]:
    """The complete lines of ``details.jsonl`` written so far."""
    path = results / "details.jsonl"
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


def _cmdline(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return f"{pid} (gone)"


def _reconnect(tmp_path: pathlib.Path, isolation: str, superexec: bool) -> dict:
    """Run the scenario; return what the assertions need."""
    certs = generate_certs(tmp_path / "certs", 2)
    results = tmp_path / "run"
    flat = {**TINY, "output.dir": str(results)}
    typed = parse_run_config(flat).to_flat()
    run_config = {k: typed.get(k, v) for k, v in flat.items()}
    t0 = time.monotonic()
    lines: list[str] = []
    events: dict[str, float] = {}

    def echo(line: str) -> None:
        lines.append(f"{time.monotonic() - t0:7.1f}  {line}")

    work = tmp_path / "work"
    outcome: dict = {}
    with LocalDeployment(certs, work, ROOT, isolation, echo=echo, stop_timeout=5.0) as dep:
        dep.start_superlink()
        for node in certs.nodes:
            dep.register(node)
        for node in certs.nodes:
            dep.start_supernode(node, 2, threads=1)
        dep.wait_online([n.name for n in certs.nodes])
        name = certs.nodes[1].name

        def run() -> None:
            try:
                outcome["code"] = dep.run(run_config, timeout=600)
            except Exception as err:  # reported by the assertions below
                outcome["error"] = err

        runner = threading.Thread(target=run, daemon=True)
        runner.start()
        deadline = time.monotonic() + 300
        while not any(d["round"] == 1 for d in _details(results)):
            assert runner.is_alive(), f"the run ended before round 1: {outcome}\n" + "\n".join(
                lines[-40:]
            )
            assert time.monotonic() < deadline, "round 1 did not finish\n" + "\n".join(lines[-40:])
            time.sleep(0.5)
        events["round 1 done"] = time.monotonic() - t0
        dep.kill_supernode(name, superexec=superexec)
        events["killed"] = time.monotonic() - t0
        link_log = dep.logs / "superlink.log"
        node_log = dep.logs / f"{name}.log"
        link_offset, node_offset = link_log.stat().st_size, node_log.stat().st_size
        dep.restart_supernode(name)
        events["restarted"] = time.monotonic() - t0
        dep.wait_online([name])
        events["online again"] = time.monotonic() - t0
        runner.join(600)
        events["run ended"] = time.monotonic() - t0
        link_after = link_log.read_text(errors="replace")[link_offset:]
        node_after = node_log.read_text(errors="replace")[node_offset:]
        node_alive = all(c.popen.poll() is None for c in dep.supernodes[name].children)
        node_id = dep.node_ids[name]
        port = dep.supernodes[name].port
        node_text = node_log.read_text(errors="replace")
    print(f"\n[{isolation}, superexec killed: {superexec}] timeline (s): {events}")
    print("\n".join(line for line in lines if re.search(TIMELINE, line)))
    return {
        "outcome": outcome,
        "results": results,
        "lines": lines,
        "events": events,
        "link_after": link_after,
        "node_after": node_after,
        "node_text": node_text,
        "node_alive": node_alive,
        "node_id": node_id,
        "port": port,
        "work": work,
    }


class _CrashedNodeGrid(ForwardingGrid):
    """Node 11 answers; node 12 crashed, so the SuperLink answers for it as Flower
    1.41 does (its own error message, sender = the SuperLink)."""

    def __init__(self) -> None:
        super().__init__(inner=None)
        self.sent: list[Message] = []

    def push_messages(self, messages):
        self.sent = list(messages)
        for m in self.sent:  # Flower's grid sets the id in place when pushing
            m.metadata.__dict__["_message_id"] = m.object_id
        return [m.metadata.message_id for m in self.sent]

    def pull_messages(self, message_ids):
        from flwr.server.superlink.linkstate.utils import (
            create_message_error_unavailable_res_message,
        )

        out = []
        for m in self.sent:
            if m.metadata.message_id not in message_ids:
                continue
            if m.metadata.dst_node_id == 11:
                content = RecordDict({"metrics": MetricRecord({"num-examples": 4})})
                out.append(Message(content, reply_to=m))
            else:
                out.append(create_message_error_unavailable_res_message(m.metadata, "node"))
        return out


class _Replies(Observer):
    def __init__(self) -> None:
        self.seen: list[tuple[int, bool]] = []

    def reply(self, server_round: int, node_id: int, ok: bool) -> None:
        self.seen.append((node_id, ok))


def test_a_superlink_error_counts_for_the_node_it_was_sent_to():
    observer = _Replies()
    grid = ProgressGrid(_CrashedNodeGrid(), observer, pull_interval=0.01)
    messages = [
        Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=nid, message_type="train")
        for nid in (11, 12)
    ]
    replies = list(grid.send_and_receive(messages, timeout=5))
    by_node = {reply_of(r).node_id: r for r in replies}
    assert sorted(by_node) == [11, 12]  # not 1, the SuperLink's id
    assert not by_node[11].has_error()
    assert "Node Unavailable" in by_node[12].error.reason
    assert by_node[12].metadata.reply_to_message_id == messages[1].metadata.message_id
    assert sorted(observer.seen) == [(11, True), (12, False)]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("isolation", "superexec"),
    # the compose case (the SuperNode's container dies, its SuperExec stays up) and the
    # whole node (SuperNode and every ClientApp) in deploy-local's default isolation;
    # ("process", True) passed as well (2026-12-07) and is left out to keep CI short
    [("subprocess", True), ("process", False)],
    ids=["subprocess", "process-superexec-survives"],
)
def test_a_killed_supernode_rejoins_and_the_run_completes(tmp_path, isolation, superexec):
    r = _reconnect(tmp_path, isolation, superexec)
    tail = "\n".join(r["lines"][-60:])
    assert "error" not in r["outcome"], f"{r['outcome']['error']}\n{tail}"
    assert r["outcome"].get("code") == 0, tail

    summary = json.loads((r["results"] / "summary.json").read_text())
    assert summary["outcome"] == "complete"
    rounds = summary["rounds"]
    assert [x["round"] for x in rounds] == list(range(ROUNDS + 1))
    replied = {x["round"]: sorted(c["partition_id"] for c in x["clients"]) for x in rounds[1:]}
    assert replied[1] == [0, 1], replied  # both before the crash

    # the crash cost node 2 (partition 1) at least one round; the round still aggregated
    degraded = [t for t in range(2, ROUNDS + 1) if replied[t] == [0]]
    assert degraded, replied
    first = degraded[0]
    assert rounds[first]["failed"] == 1 and rounds[first]["uplink_bytes"] > 0
    reasons = {d["round"]: d["reasons"] for d in _details(r["results"])}
    # the SuperLink's "Node Unavailable" ended it, for node 2 (not the round timeout)
    assert reasons[first] == [f"node {r['node_id']} replied with an error: {NODE_UNAVAILABLE}"]

    # ... and it was used again after the restart
    rejoined = [t for t in range(first + 1, ROUNDS + 1) if replied[t] == [0, 1]]
    assert rejoined, replied
    assert all(replied[t] == [0, 1] for t in range(rejoined[0], ROUNDS + 1)), replied

    # same key, accepted again: activated once more, no authentication failure
    assert f"Activated node_id={r['node_id']}" in r["link_after"]
    for failure in AUTH_FAILURES:
        assert failure not in r["link_after"], failure
        assert failure not in r["node_after"], failure
    assert r["node_alive"]
    # same Runtime-API port (and SuperExec dialling it, in process isolation)
    running_on = re.findall(r"Uvicorn running on https://127\.0\.0\.1:(\d+)", r["node_text"])
    assert running_on == [str(r["port"])] * 2, running_on

    # everything started was stopped, restarted processes included (descendants in
    # their own session, e.g. the SuperLink's SuperExec, get SIGKILL last: let them exit)
    deadline = time.monotonic() + 15
    while (left := processes_with_env(f"FLWR_HOME={r['work']}")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == [], [_cmdline(pid) for pid in left]
