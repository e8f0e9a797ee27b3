"""Issue 22 item 5: checkpoints, adapters and client states from elsewhere.

A checkpoint of another run, task or model is refused naming what differs (its
identity, or the first tensor whose shape differs, with both shapes); a file that
would run code when unpickled is refused and its code never runs; a file crafted to
be huge (or whose header declares huge tensors) is refused before it is read. The
files are real: one short ``synthetic`` run (2 clients, 2 rounds, checkpoints and
client states) is copied and altered per test; the resumes are real
:class:`~fedpeft.server.run.ServerRun` set-ups (model built, checkpoint checked).
"""

from __future__ import annotations

import builtins
import json
import os
import pathlib
import pickle
import shutil
import struct
import zipfile

import pytest
import torch
from safetensors.torch import save_file

import fedpeft.checkpoint as checkpoint
from fedpeft.checkpoint import (
    FILE_SLACK_BYTES,
    MAX_FILE_BYTES,
    MAX_HEADER_BYTES,
    Expected,
    load_client_state,
    load_for_resume,
    safetensors_header,
)
from fedpeft.errors import FedPeftError
from tests.support.files import snapshot

BASE = {
    "task.name": "synthetic",
    "federation.clients": 2,
    "federation.rounds": 2,
    "output.save-adapter": True,
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-round synthetic run (checkpoints after rounds 1 and 2, client states)."""
    from fedpeft.flower.inprocess import run_in_process

    out = tmp_path_factory.mktemp("finished") / "run"
    run_in_process({**BASE, "output.dir": str(out)})
    return out


@pytest.fixture
def run_dir(finished, tmp_path):
    """A copy of the finished run this test may alter."""
    return pathlib.Path(shutil.copytree(finished, tmp_path / "run"))


def resume(run_dir: pathlib.Path, out: pathlib.Path | None = None, **changes):
    """Set up the server side of a resume of ``run_dir``'s checkpoint (3 rounds)."""
    from fedpeft.server.run import ServerRun

    flat = {
        **BASE,
        "federation.rounds": 3,
        "checkpoint.resume": True,
        "checkpoint.dir": str(run_dir / "checkpoint"),
        "output.dir": str(out or run_dir),
        **changes,
    }
    return ServerRun(flat)


def drop_identity(run_dir: pathlib.Path) -> None:
    """Make the checkpoint look like one written before checkpoints had an identity."""
    meta = run_dir / "checkpoint" / "ckpt-000002" / "meta.json"
    data = json.loads(meta.read_text())
    del data["identity"]
    meta.write_text(json.dumps(data))


# ------------------------------------------------------------------------- identity
def test_a_checkpoint_records_what_it_belongs_to(finished):
    meta = json.loads((finished / "checkpoint" / "ckpt-000002" / "meta.json").read_text())
    assert meta["identity"] == {
        "task": "synthetic",
        "model": {"name": "mlp", "class": "DenseNet"},
        "lora-rank": 8,
        "lora-targets": ["fc1", "fc2", "fc3"],
        "strategy": "fedit",
    }
    assert json.loads((finished / "checkpoint" / "ckpt-identity.json").read_text()) == meta["identity"]


def test_the_identity_fingerprints_a_transformers_architecture(tmp_path):
    from fedpeft.server.run import ServerRun

    run = ServerRun({"model.name": "tiny-bert", "checkpoint.every": 1, "output.dir": str(tmp_path / "r")})
    identity = json.loads((tmp_path / "r" / "checkpoint" / "ckpt-identity.json").read_text())
    assert identity["task"] == "classification"
    assert identity["model"] == {
        "name": "tiny-bert",
        "class": "BertForSequenceClassification",
        "hidden": 64,
        "layers": 2,
        "vocab": run.model.model.get_base_model().config.vocab_size,
    }


@pytest.mark.parametrize(
    "changes, theirs, ours",
    [
        ({"lora.r": 4}, "LoRA rank 8", "LoRA rank 4"),
        ({"lora.target-modules": "fc1,fc2"}, "LoRA targets fc1,fc2,fc3", "LoRA targets fc1,fc2"),
        ({"strategy.name": "ffa-lora"}, "strategy 'fedit'", "strategy 'ffa-lora'"),
        ({"model.name": "linear"}, "model 'mlp' (DenseNet)", "model 'linear' (DenseNet)"),
        (
            {"task.name": "classification", "model.name": "tiny-bert"},
            "task 'synthetic', model 'mlp' (DenseNet), LoRA targets fc1,fc2,fc3",
            "task 'classification', model 'tiny-bert' (BertForSequenceClassification, hidden 64, layers 2,",
        ),
    ],
    ids=["rank", "targets", "strategy", "model", "task-and-model"],
)
def test_a_checkpoint_of_another_run_is_refused_naming_what_differs(run_dir, tmp_path, changes, theirs, ours):
    before = snapshot(run_dir)
    with pytest.raises(FedPeftError) as err:
        resume(run_dir, tmp_path / "other", **changes)
    text = str(err.value)
    assert f"was written for {theirs}; this run uses {ours}" in text, text
    assert str(run_dir / "checkpoint" / "ckpt-000002") in text
    assert snapshot(run_dir) == before  # client states and details untouched


def test_a_checkpoint_without_identity_is_resumed_when_it_fits(run_dir):
    drop_identity(run_dir)
    run = resume(run_dir)
    assert run.resumed is not None and run.resumed.server_round == 2


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"lora.r": 4},
            "tensor 'base_model.model.fc1.lora_A.weight' has shape (8, 16), this run's model has (4, 16)",
        ),
        ({"lora.target-modules": "fc1,fc2"}, "holds 'base_model.model.fc3.lora_A.weight' (and 1 more)"),
        ({"task.name": "classification", "model.name": "tiny-bert"}, "which this run's model has no tensor for"),
    ],
    ids=["matching-names-wrong-shapes", "other-targets", "other-model"],
)
def test_a_checkpoint_without_identity_is_still_refused_by_its_tensors(run_dir, tmp_path, changes, message):
    drop_identity(run_dir)
    with pytest.raises(FedPeftError) as err:
        resume(run_dir, tmp_path / "other", **changes)
    text = str(err.value)
    assert message in text and "global.safetensors" in text, text


def test_matching_identity_but_wrong_shapes_names_the_first_key_and_both_shapes(run_dir, tmp_path):
    """A global adapter swapped for one of another rank: names match, shapes do not."""
    from safetensors.torch import load_file

    path = run_dir / "checkpoint" / "ckpt-000002" / "global.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("fc2.lora_B.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], 3)
    save_file(tensors, str(path))
    with pytest.raises(FedPeftError) as err:
        resume(run_dir)
    expected = f"tensor {key!r} has shape ({tensors[key].shape[0]}, 3), this run's model has ({tensors[key].shape[0]}, 8)"
    assert expected in str(err.value), str(err.value)


# -------------------------------------------------------------------- code execution
class RunsCode:
    """Unpickling this creates ``marker``: the stand-in for any code a pickle can run."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def test_the_crafted_pickle_does_run_code_when_unpickled(tmp_path):
    """The payload of the tests below is live: a plain unpickle creates the marker."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(RunsCode(marker))).close()
    assert marker.exists()


def _plant(run_dir: pathlib.Path, where: str, marker: pathlib.Path) -> pathlib.Path:
    ckpt = run_dir / "checkpoint" / "ckpt-000002"
    payload = {"aggregator": RunsCode(marker), "selector": {}}
    if where == "state.pt-torch-archive":
        torch.save(payload, ckpt / "state.pt")
        return ckpt / "state.pt"
    if where == "state.pt-bare-pickle":
        (ckpt / "state.pt").write_bytes(pickle.dumps(payload, protocol=4))
        return ckpt / "state.pt"
    if where == "global.safetensors-is-a-pickle":
        (ckpt / "global.safetensors").write_bytes(pickle.dumps(payload, protocol=4))
        return ckpt / "global.safetensors"
    if where == "global.safetensors-is-a-torch-archive":
        torch.save(payload, ckpt / "global.safetensors")
        return ckpt / "global.safetensors"
    if where == "global.bin-instead":
        (ckpt / "global.safetensors").unlink()
        torch.save(payload, ckpt / "global.bin")
        return ckpt / "global.bin"
    raise AssertionError(where)


CODE_CASES = [
    ("state.pt-torch-archive", "not written by fedpeft"),
    ("state.pt-bare-pickle", "a bare pickle, not the torch archive fedpeft writes"),
    ("global.safetensors-is-a-pickle", "a pickle, not safetensors"),
    ("global.safetensors-is-a-torch-archive", "a torch/zip archive (pickle-based"),
    ("global.bin-instead", "has no global.safetensors but global.bin"),
]


@pytest.mark.parametrize("where, reason", CODE_CASES, ids=[where for where, _ in CODE_CASES])
@pytest.mark.parametrize("knows_model", [True, False], ids=["resume", "before-the-run"])
def test_a_checkpoint_file_that_runs_code_is_refused_and_the_code_never_runs(
    run_dir, tmp_path, where, reason, knows_model
):
    marker = tmp_path / "pwned"
    path = _plant(run_dir, where, marker)
    with pytest.raises(FedPeftError) as err:
        if knows_model:
            resume(run_dir)
        else:  # the checks fedpeft simulate runs before any model is loaded
            load_for_resume(run_dir / "checkpoint", 3)
    text = str(err.value)
    assert reason in text and path.name in text, text
    assert "weights_only" not in text
    assert not marker.exists()


@pytest.mark.parametrize("side", ["server-check", "client-load"])
def test_a_client_state_that_runs_code_is_refused_and_the_code_never_runs(run_dir, tmp_path, side):
    marker = tmp_path / "pwned"
    state = run_dir / "checkpoint" / "clients" / "partition-0" / "round-000002.safetensors"
    state.write_bytes(pickle.dumps({"client/x": RunsCode(marker)}, protocol=4))
    with pytest.raises(FedPeftError) as err:
        if side == "server-check":
            resume(run_dir)
        else:
            load_client_state(run_dir / "checkpoint", 0, 3)
    assert f"client state file {state} cannot be read (a pickle, not safetensors" in str(err.value)
    assert not marker.exists()


def test_compare_never_loads_adapter_files(finished, tmp_path):
    """``fedpeft compare`` reads summary.json and config.json only: hostile adapter
    files beside them are never opened."""
    from fedpeft.report import compare

    run = pathlib.Path(shutil.copytree(finished, tmp_path / "run"))
    marker = tmp_path / "pwned"
    adapter = run / "adapter"
    assert (adapter / "adapter_model.safetensors").exists()
    (adapter / "adapter_model.safetensors").write_bytes(pickle.dumps(RunsCode(marker)))
    torch.save(RunsCode(marker), adapter / "adapter_model.bin")
    report = compare([run], tmp_path / "report")
    assert len(report.rows) == 1 and not marker.exists()


# ----------------------------------------------------------------------- size limits
def _header_file(path: pathlib.Path, shapes: dict[str, tuple[int, ...]], data_bytes: int | None = None) -> None:
    """A safetensors file declaring ``shapes`` (F32) with ``data_bytes`` of (sparse) data."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        n = 4 * int(torch.tensor(shape).prod()) if shape else 4
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + (offset if data_bytes is None else data_bytes))  # sparse


def forbid_reads(monkeypatch, name: str) -> None:
    """Fail the test if the checkpoint module reads a tensor file named ``name`` (or
    in a folder of that name): a refusal must come before."""
    load_file, torch_load = checkpoint.load_file, torch.load

    def guard(real):
        def load(path, *args, **kwargs):
            if name in pathlib.Path(path).parts or pathlib.Path(path).name == name:
                raise AssertionError(f"{path} was read")
            return real(path, *args, **kwargs)

        return load

    monkeypatch.setattr(checkpoint, "load_file", guard(load_file))
    monkeypatch.setattr(checkpoint.torch, "load", guard(torch_load))


@pytest.mark.parametrize("knows_model", [True, False], ids=["resume", "before-the-run"])
def test_a_huge_global_adapter_is_refused_before_it_is_read(run_dir, monkeypatch, knows_model):
    forbid_reads(monkeypatch, "global.safetensors")
    path = run_dir / "checkpoint" / "ckpt-000002" / "global.safetensors"
    key = "base_model.model.fc1.lora_A.weight"
    _header_file(path, {key: (8, 2**28 + 2**20)})  # 8.03 GiB, sparse on disk
    with pytest.raises(FedPeftError) as err:
        resume(run_dir) if knows_model else load_for_resume(run_dir / "checkpoint", 3)
    text = str(err.value)
    assert f"checkpoint file {path} is refused: {path.stat().st_size} bytes, more than the" in text, text
    if not knows_model:  # before the run: the fixed limit; on resume: relative to the adapter
        assert f"the {MAX_FILE_BYTES} bytes this file may have" in text, text


def test_a_header_declaring_huge_tensors_in_a_small_file_is_refused(run_dir, monkeypatch):
    forbid_reads(monkeypatch, "global.safetensors")
    path = run_dir / "checkpoint" / "ckpt-000002" / "global.safetensors"
    _header_file(path, {"base_model.model.fc1.lora_A.weight": (2**20, 2**20)}, data_bytes=64)
    with pytest.raises(FedPeftError, match=r"its header declares 4398046511104 bytes of tensors, the file holds 64"):
        load_for_resume(run_dir / "checkpoint", 3)


def test_a_header_length_beyond_the_limit_is_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(ValueError, match=f"header claims {2**40} bytes; the file has 10, the limit is {MAX_HEADER_BYTES}"):
        safetensors_header(path)


def test_matching_names_wrong_shapes_are_refused_from_the_header(run_dir, monkeypatch):
    """The header alone decides: no tensor of a misfit checkpoint is loaded."""
    forbid_reads(monkeypatch, "global.safetensors")
    path = run_dir / "checkpoint" / "ckpt-000002" / "global.safetensors"
    shapes = safetensors_header(path)
    key = next(iter(shapes))
    _header_file(path, {**shapes, key: (shapes[key][0], shapes[key][1] * 1000)})
    with pytest.raises(FedPeftError, match=rf"tensor '{key}' has shape \(8, 16000\), this run's model has \(8, 16\)"):
        resume(run_dir)


def test_a_huge_state_pt_is_refused_before_it_is_read(run_dir, monkeypatch):
    forbid_reads(monkeypatch, "state.pt")
    path = run_dir / "checkpoint" / "ckpt-000002" / "state.pt"
    with open(path, "r+b") as handle:
        handle.truncate(FILE_SLACK_BYTES + 2**30)  # sparse; the limit here is ~FILE_SLACK_BYTES
    with pytest.raises(FedPeftError, match=r"state.pt is refused: \d+ bytes, more than the \d+ bytes this state.pt may have"):
        resume(run_dir)


def test_a_compressed_state_pt_is_refused(run_dir, monkeypatch):
    """torch.save never compresses; a deflated entry could expand beyond any limit."""
    forbid_reads(monkeypatch, "state.pt")
    path = run_dir / "checkpoint" / "ckpt-000002" / "state.pt"
    with zipfile.ZipFile(path) as src:
        entries = [(info.filename, src.read(info)) for info in src.infolist()]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for name, data in entries:
            dst.writestr(name, data)
    with pytest.raises(FedPeftError, match="is compressed; torch.save never compresses"):
        resume(run_dir)


def test_a_huge_client_state_is_refused_before_it_is_read(run_dir, monkeypatch):
    forbid_reads(monkeypatch, "partition-1")
    state = run_dir / "checkpoint" / "clients" / "partition-1" / "round-000002.safetensors"
    _header_file(state, {"client/x": (2**20, 2**8)})  # 1 GiB, sparse
    with pytest.raises(FedPeftError, match=f"client state file {state} cannot be read \\(1073741[0-9]+ bytes, more than"):
        resume(run_dir)
    with pytest.raises(FedPeftError, match="more than the 1000 bytes this file may have"):
        load_client_state(run_dir / "checkpoint", 1, 3, limit=1000)


def test_limits_are_relative_to_the_adapter():
    expected = Expected(identity={}, shapes={"a": (8, 16), "b": (16, 8)}, optional={"d": (16, 16)}, clients=9)
    adapter = 4 * (128 + 128 + 256)
    assert expected.adapter_bytes == adapter
    assert expected.state_limit == FILE_SLACK_BYTES + checkpoint.STATE_ADAPTERS_PER_CLIENT * 10 * adapter
    assert expected.client_state_limit == FILE_SLACK_BYTES + checkpoint.CLIENT_STATE_ADAPTERS * adapter
    assert expected.global_limit == FILE_SLACK_BYTES + 2 * adapter


def test_safetensors_header_reads_shapes_and_refuses_other_suffixes(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"x": torch.zeros(3, 4), "y": torch.zeros(2, dtype=torch.int64)}, str(path))
    assert safetensors_header(path) == {"x": (3, 4), "y": (2,)}
    other = tmp_path / "adapter_model.bin"
    os.rename(path, other)
    with pytest.raises(checkpoint.HostileFileError, match="not a .safetensors file"):
        safetensors_header(other)
