"""Issue 16 through the real command line: resumes that refuse to mix runs, no silent
overwrites, corrupt files and user mistakes as one ``error:`` line (exit 2, before any
engine starts), ``fedpeft config`` / ``compare`` / ``certs`` checks.

Every test runs ``python -m fedpeft.cli …`` in a subprocess with its own
``FLWR_HOME`` and ``FEDPEFT_CACHE``. Tests that need a run to go on use the same
``main()`` with the in-process grid in place of the Ray engine (:data:`IN_PROCESS`:
only ``run_simulation_engine`` is swapped; argument parsing, the checks before the
engine and the result handling of ``fedpeft simulate`` are the real ones), so they
take seconds; the one behaviour that depends on Ray (an unreadable client state in a
worker process) runs the real engine. Run directories to resume, overwrite or
compare are made once with the in-process grid, which writes the same files.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import TINY
from tests.support.cli_env import cli_env
from tests.support.files import snapshot

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = {**TINY, "federation.clients": 2}  # 2 rounds, 2 clients, tiny random BERT
SETS = [  # the run's config as options, but for the rounds (--rounds)
    a
    for k, v in RUN.items()
    if k not in ("output.save-adapter", "federation.rounds")
    for a in ("--set", f"{k}={v}")
]

IN_PROCESS = textwrap.dedent(
    """
    import sys

    import fedpeft.flower.simulation as simulation


    def run_in_process_engine(flat, cfg, observer, num_cpus, verbose):
        from fedpeft.flower.client_app import make_client_app
        from fedpeft.flower.inprocess import InProcessGrid, set_task_identity
        from fedpeft.flower.server_app import run_server

        set_task_identity()
        grid = InProcessGrid(make_client_app(flat), cfg.federation.clients, run_config=dict(flat))
        run_server(grid, flat, observer)


    simulation.run_simulation_engine = run_in_process_engine
    if "--no-client-state-check" in sys.argv:  # a server that cannot see client disks
        sys.argv.remove("--no-client-state-check")
        import fedpeft.checkpoint
        import fedpeft.server.run

        fedpeft.checkpoint.check_client_states = lambda *a, **k: 0
        fedpeft.server.run.check_client_states = lambda *a, **k: 0
    from fedpeft.cli import main

    sys.exit(main(sys.argv[1:]))
    """
)
NO_CLIENT_CHECK = IN_PROCESS.replace(
    "simulation.run_simulation_engine = run_in_process_engine\n", ""
)


def fedpeft(tmp_path, *args, engine="none", cache=None, timeout=300):
    """Run the CLI; ``engine``: ``none`` (must fail before any engine), ``in-process``
    or ``ray-no-client-state-check``. ``cache``: a FEDPEFT_CACHE whose files (the
    tokenised corpus) seed this run's own fresh cache, so a run does not tokenise
    38k tweets again."""
    fresh_cache = tmp_path / "fedpeft-cache"
    if cache is not None and not fresh_cache.exists():
        shutil.copytree(cache, fresh_cache)
    env = cli_env(tmp_path / "flwr-home", fresh_cache)
    if engine == "in-process":
        cmd = [sys.executable, "-c", IN_PROCESS, *args]
    elif engine == "ray-no-client-state-check":
        cmd = [sys.executable, "-c", NO_CLIENT_CHECK, *args, "--no-client-state-check"]
    else:
        cmd = [sys.executable, "-m", "fedpeft.cli", *args]
    return subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )


def one_error_line(proc) -> str:
    """The single ``error:`` line of a failed command (exit 2, no traceback)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-round run directory (checkpoints after rounds 1 and 2, client states)."""
    from fedpeft.flower.inprocess import run_in_process

    base = tmp_path_factory.mktemp("finished")
    old = os.environ.get("FEDPEFT_CACHE")
    os.environ["FEDPEFT_CACHE"] = str(base / "cache")
    try:
        run_in_process({**RUN, "output.dir": str(base / "run")})
    finally:
        if old is None:
            os.environ.pop("FEDPEFT_CACHE")
        else:
            os.environ["FEDPEFT_CACHE"] = old
    return base / "run"


@pytest.fixture(scope="module")
def cache(finished_run):
    """The FEDPEFT_CACHE the finished run filled (tokenised corpus, partitions)."""
    return finished_run.parent / "cache"


@pytest.fixture
def run_dir(finished_run, tmp_path):
    """A copy of the finished run this test may change."""
    return pathlib.Path(shutil.copytree(finished_run, tmp_path / "run"))


def _rounds(directory: pathlib.Path) -> list[int]:
    return [r["round"] for r in json.loads((directory / "summary.json").read_text())["rounds"]]


# ----------------------------------------------------------------------- resume


def test_resume_refuses_options_that_change_results_naming_both_values(run_dir, tmp_path):
    before = snapshot(run_dir)
    proc = fedpeft(
        tmp_path,
        "simulate",
        "--resume",
        str(run_dir),
        "--rounds",
        "3",
        "--set",
        "train.lr=0.01",
        "--strategy",
        "fedsa-lora",
    )
    line = one_error_line(proc)
    assert "train.lr 0.005 → 0.01" in line
    assert "strategy.name 'fedit' → 'fedsa-lora'" in line
    assert "federation.rounds" not in line.split("(recorded → given):")[1].split(". Only")[0]
    assert snapshot(run_dir) == before  # nothing written


def test_resume_continues_with_more_rounds_without_mixing(run_dir, tmp_path, cache):
    proc = fedpeft(
        tmp_path,
        "simulate",
        "--resume",
        str(run_dir),
        "--rounds",
        "3",
        "--quiet",
        "--set",
        "federation.timeout=600",
        engine="in-process",
        cache=cache,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _rounds(run_dir) == [0, 1, 2, 3]
    details = [
        json.loads(line)["round"] for line in (run_dir / "details.jsonl").read_text().splitlines()
    ]
    assert details == [0, 1, 2, 3]  # kept, appended once, never truncated
    config = json.loads((run_dir / "config.json").read_text())["config"]
    assert config["federation.rounds"] == 3 and config["train.lr"] == RUN["train.lr"]
    assert (run_dir / "checkpoint" / "LATEST").read_text() == "ckpt-000003"


def test_resume_with_out_is_an_error(run_dir, tmp_path):
    proc = fedpeft(
        tmp_path, "simulate", "--resume", str(run_dir), "--out", str(tmp_path / "elsewhere")
    )
    assert "--out cannot be combined with --resume" in one_error_line(proc)
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("damage", ["deleted", "garbage"])
def test_resume_without_a_readable_checkpoint_index_is_an_error_not_a_fresh_start(
    run_dir, tmp_path, damage
):
    latest = run_dir / "checkpoint" / "LATEST"
    if damage == "deleted":
        latest.unlink()
    else:
        latest.write_text("ckpt-000099")
    before = snapshot(run_dir)
    proc = fedpeft(tmp_path, "simulate", "--resume", str(run_dir), "--rounds", "3")
    line = one_error_line(proc)
    assert str(latest) in line
    assert ("does not exist" in line) if damage == "deleted" else ("'ckpt-000099'" in line)
    assert snapshot(run_dir) == before  # details.jsonl and summary.json untouched


class _Foreign:
    """Stands for any pickled object that is not a plain container."""


@pytest.mark.parametrize(
    "target, damage, expected",
    [
        ("checkpoint/ckpt-000002/global.safetensors", "truncate", "not a valid safetensors file"),
        ("checkpoint/ckpt-000002/state.pt", "truncate", "truncated or corrupt"),
        ("checkpoint/ckpt-000002/state.pt", "foreign", "not written by fedpeft"),
        ("checkpoint/ckpt-000002/meta.json", "truncate", "cannot be read"),
        ("config.json", "truncate", "cannot be read"),
        ("checkpoint/clients/partition-0/round-000002.safetensors", "truncate", "cannot be read"),
    ],
    ids=[
        "global.safetensors",
        "state.pt",
        "state.pt-pickled-object",
        "meta.json",
        "config.json",
        "client-state",
    ],
)
def test_corrupt_resume_files_are_refused_naming_the_file(
    run_dir, tmp_path, target, damage, expected
):
    path = run_dir / target
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])
    else:  # a file someone else wrote: loading it would run its pickled code
        import torch

        torch.save({"aggregator": _Foreign()}, path)
    proc = fedpeft(tmp_path, "simulate", "--resume", str(run_dir), "--rounds", "3")
    line = one_error_line(proc)
    assert str(path) in line and expected in line
    assert "weights_only" not in proc.stderr and "weights only" not in proc.stderr.lower()


def test_unreadable_client_state_met_by_a_client_fails_the_run_naming_it(run_dir, tmp_path, cache):
    """Where the server cannot see the clients' disks, the client's error stops the run."""
    state = run_dir / "checkpoint" / "clients" / "partition-1" / "round-000002.safetensors"
    state.write_bytes(state.read_bytes()[:40])
    script_args = ["simulate", "--resume", str(run_dir), "--rounds", "3", "--quiet"]
    proc = fedpeft(
        tmp_path, *script_args, "--no-client-state-check", engine="in-process", cache=cache
    )
    line = one_error_line(proc)
    assert f"client state file {state} cannot be read" in line
    summary = json.loads((run_dir / "summary.json").read_text())
    assert str(state) in summary["stopped"]
    assert _rounds(run_dir) == [0, 1, 2]  # the client was not silently dropped


@pytest.mark.integration
def test_unreadable_client_state_in_a_ray_worker_fails_the_run_naming_it(run_dir, tmp_path, cache):
    state = run_dir / "checkpoint" / "clients" / "partition-0" / "round-000002.safetensors"
    state.write_bytes(state.read_bytes()[:40])
    proc = fedpeft(
        tmp_path,
        "simulate",
        "--resume",
        str(run_dir),
        "--rounds",
        "3",
        "--quiet",
        engine="ray-no-client-state-check",
        cache=cache,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"client state file {state} cannot be read" in errors[0], (
        proc.stderr[-3000:]
    )
    assert str(state) in json.loads((run_dir / "summary.json").read_text())["stopped"]


# -------------------------------------------------------------------- overwrite


def test_results_directory_holding_a_run_is_refused_without_overwrite(run_dir, tmp_path):
    before = snapshot(run_dir)
    proc = fedpeft(tmp_path, "simulate", "--out", str(run_dir), "--rounds", "1", *SETS)
    line = one_error_line(proc)
    assert f"{run_dir} already holds a run" in line and "--overwrite" in line
    assert snapshot(run_dir) == before


def test_overwrite_leaves_nothing_of_the_old_run(run_dir, tmp_path, cache):
    (run_dir / "checkpoint" / "clients" / "partition-7").mkdir()  # an old client the new run lacks
    (run_dir / "notes.txt").write_text("mine")  # not a run file: kept
    proc = fedpeft(
        tmp_path,
        "simulate",
        "--out",
        str(run_dir),
        "--overwrite",
        "--quiet",
        *SETS,
        "--rounds",
        "1",
        "--set",
        "output.save-adapter=false",
        engine="in-process",
        cache=cache,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _rounds(run_dir) == [0, 1]
    assert sorted(p.name for p in (run_dir / "checkpoint").iterdir()) == [
        "LATEST",
        "ckpt-000001",
        "ckpt-identity.json",  # what the checkpoints belong to (fedpeft.checkpoint)
        "clients",
    ]
    clients = sorted(
        str(p.relative_to(run_dir / "checkpoint" / "clients"))
        for p in (run_dir / "checkpoint" / "clients").rglob("*.safetensors")
    )
    assert clients == [
        "partition-0/round-000001.safetensors",
        "partition-1/round-000001.safetensors",
    ]
    assert not (run_dir / "adapter").exists()  # the old adapter is gone, the new run saves none
    assert (run_dir / "notes.txt").read_text() == "mine"


def test_a_failed_run_never_sits_beside_another_runs_files(run_dir, tmp_path, cache):
    proc = fedpeft(
        tmp_path,
        "simulate",
        "--out",
        str(run_dir),
        "--overwrite",
        "--quiet",
        *SETS,
        "--rounds",
        "2",
        "--set",
        "faults.crash-rate=1",
        "--set",
        "federation.max-retries=0",
        engine="in-process",
        cache=cache,
    )
    assert "round 1 got 0 valid updates" in one_error_line(proc)
    assert json.loads((run_dir / "config.json").read_text())["config"]["faults.crash-rate"] == 1.0
    assert _rounds(run_dir) == [0]  # the new run's summary, not the old one's
    assert not (run_dir / "adapter").exists()
    assert not (run_dir / "checkpoint").exists() or not any((run_dir / "checkpoint").glob("ckpt-[0-9]*"))


# ----------------------------------------------------------- mistakes → error:


def _causal_folder(root: pathlib.Path) -> str:
    """A folder that looks like a causal LM (config.json of a Llama, a weights file)."""
    folder = root / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "architectures": ["LlamaForCausalLM"],
                "hidden_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "intermediate_size": 128,
                "vocab_size": 100,
            }
        )
    )
    (folder / "model.safetensors").write_bytes(b"")
    return str(folder)


MISTAKES = {
    "toml-syntax": (
        lambda d: ["--config", _write(d / "bad.toml", "[lora\nr = 8\n")],
        "is not valid TOML",
    ),
    "config-is-a-directory": (
        lambda d: ["--config", str(d)],
        "is a directory; expected a TOML file",
    ),
    "model-missing": (
        lambda d: ["--set", f"model.name={d / 'nope'}"],
        "neither a built-in model nor an existing folder",
    ),
    "model-not-a-model-folder": (
        lambda d: ["--set", f"model.name={d}"],
        "a folder without config.json",
    ),
    "causal-model-for-classification": (
        lambda d: ["--set", f"model.name={_causal_folder(d)}"],
        "not a sequence classification model",
    ),
    "classification-model-for-causal-lm": (
        lambda d: ["--task", "causal-lm", "--set", "model.name=tiny-bert"],
        "model.name='tiny-bert' is a classification model",
    ),
    "bert-folder-for-causal-lm": (
        lambda d: ["--task", "causal-lm", "--set", f"model.name={_minilm()}"],
        "not a causal language model",
    ),
    "unknown-target-modules": (
        lambda d: ["--set", "model.name=tiny-bert", "--set", "lora.target-modules=query,q_proj"],
        "'q_proj' matches no module of tiny-bert",
    ),
    "out-is-a-file": (
        lambda d: ["--set", "model.name=tiny-bert", "--out", _write(d / "file", "x")],
        "is a file, not a directory",
    ),
    "out-under-a-file": (
        lambda d: ["--set", "model.name=tiny-bert", "--out", _write(d / "file", "x") + "/run"],
        "cannot write in",
    ),
}


def _write(path: pathlib.Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _minilm() -> str:
    from fedpeft.tasks.packages import minilm_dir

    return str(minilm_dir())


@pytest.mark.parametrize("mistake", MISTAKES.values(), ids=MISTAKES.keys())
def test_user_mistake_is_one_error_line_before_the_engine_starts(tmp_path, mistake):
    make_args, expected = mistake
    work = tmp_path / "work"
    work.mkdir()
    proc = fedpeft(tmp_path, "simulate", "--rounds", "1", "--quiet", *make_args(work))
    assert expected in one_error_line(proc)
    assert "Ray" not in proc.stderr and "ClientAppActor" not in proc.stderr  # no engine started
    assert not (tmp_path / "runs").exists()


def test_config_command_runs_the_same_checks_as_simulate(tmp_path):
    secagg = ["--set", "privacy.secagg=true"]
    shown = one_error_line(fedpeft(tmp_path, "config", *secagg))
    assert shown == one_error_line(fedpeft(tmp_path, "simulate", *secagg))
    assert shown.startswith("error: privacy.secagg: ") and "not available" in shown
    targets = one_error_line(
        fedpeft(
            tmp_path, "config", "--set", "model.name=tiny-bert", "--set", "lora.target-modules=nope"
        )
    )
    assert targets.startswith(
        "error: lora.target-modules='nope': 'nope' matches no module of tiny-bert"
    )


# ---------------------------------------------------------------- compare, certs


def test_compare_flags_incomplete_runs_and_never_ranks_them(finished_run, tmp_path):
    interrupted = pathlib.Path(shutil.copytree(finished_run, tmp_path / "interrupted"))
    summary = json.loads((interrupted / "summary.json").read_text())
    summary["rounds"] = summary["rounds"][:2]  # killed after round 1 of 2
    for r in summary["rounds"]:
        r["accuracy"] = 0.99  # better than anything, and cheaper: would be on the front
    summary.pop("totals")
    summary.pop("outcome")  # a killed run never writes its outcome
    (interrupted / "summary.json").write_text(json.dumps(summary))
    stopped = pathlib.Path(shutil.copytree(interrupted, tmp_path / "stopped"))
    summary["stopped"] = "round 2 got 0 valid updates, federation.min-replies is 1"
    summary["outcome"] = "failed"
    (stopped / "summary.json").write_text(json.dumps(summary))

    proc = fedpeft(
        tmp_path, "compare", str(finished_run), str(interrupted), str(stopped), "--out", "report"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    starred = [line for line in proc.stdout.splitlines() if "★" in line]
    assert len(starred) == 1 and "fedit (run)" in starred[0], proc.stdout
    assert "1 of 2, interrupted" in proc.stdout and "1 of 2, stopped" in proc.stdout
    lines = proc.stdout.splitlines()
    for name, status in (("interrupted", "1 of 2, interrupted"), ("stopped", "1 of 2, stopped")):
        row = next(
            line for line in lines if line.strip().startswith(f"fedit ({name})") and "│" not in line
        )
        assert status in row and row.rstrip().endswith("not ranked"), proc.stdout
    final = json.loads((finished_run / "summary.json").read_text())["rounds"][-1]["accuracy"]
    assert f"rounds to ≥ {0.9 * final:.4g}" in proc.stdout  # the incomplete runs' 0.99 do not count
    report = (tmp_path / "report" / "report.md").read_text()
    assert "1 of 2, interrupted" in report and "round 2 got 0 valid updates" in report
    assert report.count("★") == 2  # the legend sentence and the finished run's row


@pytest.mark.parametrize("san", ["", "bad name", "a..example", "1.2.3", "-x.example"])
def test_certs_refuses_empty_or_invalid_san(tmp_path, san):
    proc = fedpeft(tmp_path, "certs", "--out", "certs", "--nodes", "1", f"--san={san}")
    assert f"--san {san!r} is neither an IP address nor a valid DNS name" in one_error_line(proc)
    assert not (tmp_path / "certs").exists()


def test_certs_accepts_valid_names(tmp_path):
    proc = fedpeft(
        tmp_path,
        "certs",
        "--out",
        "certs",
        "--nodes",
        "1",
        "--san",
        "link.example",
        "--san",
        "*.fl.example",
        "--san",
        "10.0.0.7",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sans = json.loads((tmp_path / "certs" / "manifest.json").read_text())
    assert "link.example" in sans["san_dns"] and "10.0.0.7" in sans["san_ips"]
