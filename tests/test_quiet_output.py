"""Issue 17 item 7, quiet and honest output: the third-party noise listed in
:mod:`fedpeft.quiet` is hidden (in this process, in the processes it starts and in the
Ray actors), ``--verbose`` shows it again, and fedpeft's own warnings and log records
always get through.

The unit tests run a few lines of Python in a subprocess (so the filters they install
do not stay in the test process); the integration test runs ``fedpeft simulate`` on
the real engine, twice.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest

from fedpeft import quiet
from tests.conftest import TINY
from tests.support.cli_env import cli_env

BANNER = "DEPRECATED FEATURE: The `run_simulation` function is deprecated"
FUTURE = "FutureWarning: `is_gradient_checkpointing` is deprecated"
TERMINATING = "Manually terminating ClientAppActor"
NOISE = (BANNER, FUTURE, TERMINATING)

EMIT = textwrap.dedent(
    """
    import logging, subprocess, sys

    from flwr.supercore.logger import log, warn_deprecated_feature

    from fedpeft.quiet import install

    if sys.argv[1] == "parent":  # the child inherits (PYTHONWARNINGS) what it gets
        install(verbose="--verbose" in sys.argv)

    def warn_from(module, text, category=FutureWarning):
        code = compile("import warnings\\nwarnings.warn(TEXT, CATEGORY)", module + ".py", "exec")
        exec(code, {"__name__": module, "TEXT": text, "CATEGORY": category})

    def emit(where):
        warn_from("transformers.modeling_utils",
                  "`is_gradient_checkpointing` is deprecated and will be removed in v6.")
        warn_from("fedpeft.tasks.model",
                  f"`is_gradient_checkpointing` is deprecated: FEDPEFT-SAME-TEXT {where}")
        warn_from("fedpeft.checkpoint", f"FEDPEFT-OWN-WARNING {where}", UserWarning)
        warn_from("transformers.modeling_utils", f"OTHER-TRANSFORMERS-WARNING {where}")
        if where == "parent":
            warn_deprecated_feature("The `run_simulation` function is deprecated and will go")
            log(logging.WARNING, "Manually terminating %s", "ClientAppActor")
            log(logging.WARNING, "OTHER-FLWR-WARNING")
            fedpeft_log = logging.getLogger("fedpeft")
            fedpeft_log.warning("FEDPEFT-OWN-LOG Manually terminating ClientAppActor")
            logging.getLogger("fedpeft").error("FEDPEFT-OWN-ERROR")

    emit(sys.argv[1])
    if sys.argv[1] == "parent":  # a child process, as Ray's workers are
        sys.stderr.flush()
        subprocess.run([sys.executable, __file__, "child"], check=True)
    """
)


def _emit(tmp_path, *args: str, env_extra: dict[str, str] | None = None) -> str:
    """stderr of :data:`EMIT` run as ``parent`` (which starts itself again as ``child``)."""
    script = tmp_path / "emit.py"
    script.write_text(EMIT)
    env = cli_env(tmp_path / "flwr-home", tmp_path / "cache")
    env.pop("PYTHONWARNINGS", None)
    env.update(env_extra or {})
    proc = subprocess.run(
        [sys.executable, str(script), "parent", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def _lines_with(text: str, stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if text in line]


def test_known_noise_is_hidden_here_and_in_child_processes_and_fedpeft_gets_through(tmp_path):
    err = _emit(tmp_path)
    for noise in (BANNER, TERMINATING, "deprecated and will be removed in v6"):
        assert [line for line in _lines_with(noise, err) if "FEDPEFT" not in line] == [], err
    # fedpeft's own warnings (even with the very text of a hidden one) and log records
    for where in ("parent", "child"):
        assert len(_lines_with(f"FEDPEFT-SAME-TEXT {where}", err)) == 1, err
        assert len(_lines_with(f"FEDPEFT-OWN-WARNING {where}", err)) == 1, err
        # other warnings of the same library are not hidden either
        assert len(_lines_with(f"OTHER-TRANSFORMERS-WARNING {where}", err)) == 1, err
    assert _lines_with("FEDPEFT-OWN-LOG Manually terminating ClientAppActor", err), err
    assert _lines_with("FEDPEFT-OWN-ERROR", err), err
    assert _lines_with("OTHER-FLWR-WARNING", err), err


def test_verbose_shows_everything(tmp_path):
    err = _emit(tmp_path, "--verbose")
    assert _lines_with(BANNER, err), err
    assert _lines_with(TERMINATING, err), err
    assert len(_lines_with("deprecated and will be removed in v6", err)) == 2, err  # both
    assert _lines_with("FEDPEFT-OWN-WARNING child", err), err


def test_the_users_own_pythonwarnings_wins(tmp_path):
    err = _emit(tmp_path, env_extra={"PYTHONWARNINGS": "always"})
    assert len(_lines_with("deprecated and will be removed in v6", err)) == 2, err
    assert not _lines_with(BANNER, err), err  # the log filter still applies


ACTOR = textwrap.dedent(
    """
    import logging, sys, warnings

    from flwr.app import RecordDict
    from flwr.supercore.logger import log

    from fedpeft.flower.inprocess import InProcessGrid, set_task_identity
    from fedpeft.flower.simulation import quiet_client_app

    set_task_identity()
    app = quiet_client_app({}, verbose="--verbose" in sys.argv)
    grid = InProcessGrid(app, 1)
    (reply,) = grid.send_and_receive([grid.create_message(RecordDict(), "query.hello", 1000, "")])
    assert not reply.has_error(), reply.error
    # what a ClientApp actor logs and raises after its first message
    log(logging.WARNING, "Manually terminating %s", "ClientAppActor")
    code = compile("import warnings\\nwarnings.warn(TEXT, FutureWarning)", "mu.py", "exec")
    text = "`is_gradient_checkpointing` is deprecated and will be removed in v6."
    exec(code, {"__name__": "transformers.modeling_utils", "TEXT": text})
    logging.getLogger("fedpeft").warning("FEDPEFT-OWN-LOG")
    """
)


@pytest.mark.parametrize("verbose", [False, True])
def test_the_client_app_installs_the_filters_in_the_process_running_it(tmp_path, verbose):
    """A Ray actor gets the filters from the ClientApp's lifespan (no ``fedpeft`` command
    ran there): nothing but the app is quieted here."""
    env = cli_env(tmp_path / "flwr-home", tmp_path / "cache")
    env.pop("PYTHONWARNINGS", None)
    cmd = [sys.executable, "-c", ACTOR, *(["--verbose"] if verbose else [])]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FEDPEFT-OWN-LOG" in proc.stderr
    assert (TERMINATING in proc.stderr) is verbose, proc.stderr
    assert ("deprecated and will be removed in v6" in proc.stderr) is verbose, proc.stderr


def test_log_filter_drops_only_the_listed_records_of_their_logger():
    def record(name: str, msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, None)

    noise = quiet.KnownNoise()
    assert not noise.filter(record("flwr", "Manually terminating %s", "ClientAppActor"))
    assert not noise.filter(
        record(
            "flwr",
            "DEPRECATED FEATURE: %s\n\n  more",
            "The `run_simulation` function is deprecated and will be removed",
        )
    )
    assert noise.filter(record("flwr", "Manually terminating %s", "SomethingElse"))
    assert noise.filter(record("flwr", "DEPRECATED FEATURE: %s", "start_simulation()"))
    assert noise.filter(record("fedpeft", "Manually terminating ClientAppActor"))
    assert noise.filter(record("flwr.child", "Manually terminating ClientAppActor"))
    assert noise.filter(record("fedpeft", "DEPRECATED FEATURE: The `run_simulation` function"))


def test_every_listed_message_is_in_the_module_docstring():
    doc = " ".join((quiet.__doc__ or "").split())
    for entry in quiet.NOISY_LOGS + quiet.NOISY_WARNINGS:
        assert entry.text[:40] in doc, entry


# ------------------------------------------------------------------ real engine

RUN_SETS = [
    a
    for k, v in {**TINY, "train.local-steps": 2, "simulation.num-cpus": 1}.items()
    if k not in ("federation.rounds", "federation.clients", "output.save-adapter")
    for a in ("--set", f"{k}={v}")
]


def _simulate(tmp_path, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = cli_env(tmp_path / "flwr-home", tmp_path / "cache")  # one cache for both runs
    env.pop("PYTHONWARNINGS", None)
    cmd = [sys.executable, "-m", "fedpeft.cli", "simulate", "--rounds", "1", "--clients", "2"]
    cmd += ["--out", str(tmp_path / name), *RUN_SETS, *extra]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


@pytest.mark.integration
def test_simulate_output_is_free_of_known_noise_and_verbose_shows_it(tmp_path):
    plain = _simulate(tmp_path, "plain")
    out = plain.stdout + plain.stderr
    for noise in NOISE:
        assert noise not in out, out[-3000:]
    assert "round 1" in plain.stdout and "done in" in plain.stdout, out[-3000:]

    loud = _simulate(tmp_path, "loud", "--verbose")
    out = loud.stdout + loud.stderr
    assert BANNER in out, out[-3000:]
    # the transformers warning of the driver and of the ClientApp actor (Ray prefixes
    # an actor's lines with "(ClientAppActor pid=…)"): the actor's filter is what hid it
    futures = _lines_with(FUTURE, out)
    assert any("ClientAppActor" in line for line in futures), out[-3000:]
    assert any("ClientAppActor" not in line for line in futures), out[-3000:]
