"""The ``fedpeft`` command line (the application entry point, not library code).

Commands:

* ``fedpeft simulate`` — run a federated fine-tune on the Flower simulation engine
  (Ray backend) with a progress display; with no options, the embedded default
  (4 clients, 3 rounds, MiniLM + LoRA on tweet sentiment). Everything that can be
  checked is checked before Ray starts (:mod:`fedpeft.preflight`); a results directory
  that holds a run is refused unless ``--overwrite``; ``--resume DIR`` continues a run
  and refuses options that would change its results (:data:`RESUME_MAY_CHANGE`).
* ``fedpeft deploy-local`` — the same run on a real loopback deployment (SuperLink and
  SuperNodes with TLS and node authentication); ``--resume DIR`` continues a run there
  under the same rules.
* ``fedpeft strategies`` — list registered strategies.
* ``fedpeft config`` — print the resolved configuration (or the problems in it).
* ``fedpeft compare RUN_DIR... --out REPORT_DIR`` — compare finished runs: a table,
  curves and a Pareto plot in ``REPORT_DIR/report.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

from fedpeft.config import FlatConfig, flatten_toml, parse_overrides, parse_run_config
from fedpeft.errors import FedPeftError
from fedpeft.quiet import install as hide_known_noise
from fedpeft.results import outcome_of


def _env_defaults() -> None:
    """Process environment for an offline, quiet run (FLOWER.md §2.4)."""
    for key, value in {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": "1",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_DEDUP_LOGS": "0",
    }.items():
        os.environ.setdefault(key, value)


def load_config_file(path: str) -> FlatConfig:
    """A TOML run-config file (nested tables or dotted keys) as a flat dict.

    Raises:
        FedPeftError: the file is missing, a directory, unreadable or not TOML.
    """
    file = pathlib.Path(path)
    if not file.exists():
        raise FedPeftError(f"--config: no such file {path!r}")
    if file.is_dir():
        raise FedPeftError(f"--config: {path!r} is a directory; expected a TOML file")
    try:
        with file.open("rb") as handle:
            return flatten_toml(tomllib.load(handle))
    except tomllib.TOMLDecodeError as err:
        raise FedPeftError(f"--config: {path} is not valid TOML: {err}") from err
    except UnicodeDecodeError as err:
        raise FedPeftError(
            f"--config: {path} is not valid TOML: not UTF-8 text ({err.reason})"
        ) from err
    except OSError as err:
        raise FedPeftError(f"--config: cannot read {path} ({err.strerror or err})") from err


RESUME_MAY_CHANGE = (
    "federation.rounds",  # extend a run (never below the rounds its checkpoint holds)
    "budget.bytes",  # likewise: where the run stops, not what a round computes
    "federation.timeout",
    "federation.wait-for-nodes",
    "checkpoint.every",
    "checkpoint.resume",
    "output.save-adapter",
    "model.cache-dir",
    "simulation.cpus-per-client",
    "simulation.num-cpus",
)
"""Keys a resumed run may give other values than the run recorded: how long it runs,
how long it waits, how often it checkpoints, where caches are and how many CPUs the
engine uses. Every other key (seed, strategy and its options, model, LoRA, data,
training, codecs, validation, faults, …) decides the numbers of the rounds still to
run, so a different value would make one run of two configurations: it is refused.
``output.dir`` is the run directory itself (``--out`` cannot be combined with
``--resume``)."""


def _recorded_config(resume: str) -> tuple[pathlib.Path, FlatConfig]:
    """The run directory of ``--resume`` and the flat config it recorded."""
    run_dir = pathlib.Path(resume).expanduser().resolve()
    if not run_dir.is_dir():
        raise FedPeftError(f"--resume: {resume!r} is not a directory; expected a run directory")
    recorded = run_dir / "config.json"
    if not recorded.exists():
        raise FedPeftError(f"--resume: {recorded} does not exist; is {resume!r} a run directory?")
    try:
        data = json.loads(recorded.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise FedPeftError(
            f"--resume: {recorded} cannot be read ({err}); it is not the config a run wrote"
        ) from err
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise FedPeftError(
            f"--resume: {recorded} is not the config a run wrote (expected an object with a "
            "'config' object)"
        )
    return run_dir, dict(data["config"])


def _continuation(run_dir: pathlib.Path, recorded: FlatConfig, given: FlatConfig) -> FlatConfig:
    """The config of a resumed run: the recorded one with the allowed changes of ``given``.

    Raises:
        FedPeftError: ``given`` moves the run elsewhere or changes a key outside
            :data:`RESUME_MAY_CHANGE` (each such key is named with both values).
    """
    moved = "output.dir" in given and pathlib.Path(str(given["output.dir"])).expanduser()
    if moved and moved.resolve() != run_dir:
        raise FedPeftError(
            f"output.dir={given['output.dir']!r} cannot be combined with --resume: a resumed run "
            f"continues in its own directory ({run_dir}); copy that directory to continue elsewhere"
        )
    base = {**recorded, "output.dir": str(run_dir)}
    flat = {**base, **given, "output.dir": str(run_dir), "checkpoint.resume": True}
    try:
        before = parse_run_config(base).to_flat()
    except FedPeftError as err:
        raise FedPeftError(
            f"--resume: the config recorded in {run_dir / 'config.json'} is not valid: {err}"
        ) from err
    after = parse_run_config(flat).to_flat()
    changed = [
        f"{key} {before[key]!r} → {after[key]!r}"
        for key in sorted(set(before) & set(after))
        if before[key] != after[key] and key not in RESUME_MAY_CHANGE and key != "output.dir"
    ]
    if changed:
        raise FedPeftError(
            f"--resume {run_dir}: a resumed run continues the recorded one, so what changes its "
            f"results cannot change (recorded → given): {'; '.join(changed)}. Only "
            f"{', '.join(RESUME_MAY_CHANGE)} may; start a new run (--out) to change the others"
        )
    return flat


def _deploy_nodes(args: argparse.Namespace, flat: FlatConfig) -> int:
    """The SuperNode count of ``deploy-local``: ``--nodes`` (default 2), which
    ``--clients`` must equal; with ``--resume``, the resumed run's client count, which
    ``--nodes`` may repeat but not change (each node holds one partition)."""
    if args.resume:
        recorded = int(flat["federation.clients"])
        if args.nodes is not None and args.nodes != recorded:
            raise FedPeftError(
                f"--resume: the run has {recorded} clients, one per SuperNode; --nodes "
                f"{args.nodes} would change it (pass --nodes {recorded} or leave it out)"
            )
        return recorded
    nodes = 2 if args.nodes is None else args.nodes
    if nodes < 1:
        raise FedPeftError(f"deploy-local: --nodes must be at least 1, got {nodes}")
    if args.clients is not None and args.clients != nodes:
        raise FedPeftError(f"deploy-local: --clients ({args.clients}) must equal --nodes ({nodes})")
    return nodes


def build_flat_config(args: argparse.Namespace) -> FlatConfig:
    """Config file, then the named options, then ``--set`` overrides.

    With ``--resume DIR`` the base is the config the interrupted run recorded in
    ``DIR/config.json``; the options may change only :data:`RESUME_MAY_CHANGE` (e.g.
    more rounds), and ``--out`` is refused.

    Raises:
        FedPeftError: an unreadable config file or recorded config, or a resume that
            would change the run.
    """
    resume = getattr(args, "resume", None)
    if resume and getattr(args, "out", None):
        raise FedPeftError(
            f"--out cannot be combined with --resume: a resumed run continues in its own "
            f"directory ({resume}); copy that directory to continue elsewhere"
        )
    given: FlatConfig = {}
    if getattr(args, "config", None):
        given.update(load_config_file(args.config))
    named = {
        "strategy.name": getattr(args, "strategy", None),
        "federation.rounds": getattr(args, "rounds", None),
        "federation.clients": getattr(args, "clients", None),
        "output.dir": getattr(args, "out", None),
        "task.name": getattr(args, "task", None),
        "seed": getattr(args, "seed", None),
    }
    given.update({k: v for k, v in named.items() if v is not None})
    given.update(parse_overrides(getattr(args, "set", None) or []))
    if resume:
        run_dir, recorded = _recorded_config(resume)
        return _continuation(run_dir, recorded, given)
    return given


class RichObserver:
    """Progress display: one bar for rounds, one for this round's client replies."""

    def __init__(self, console: Any) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.rounds_task: Any = None
        self.clients_task: Any = None

    def run_start(self, num_rounds: int, out_dir: pathlib.Path) -> None:
        """Start the bars."""
        self.progress.start()
        self.rounds_task = self.progress.add_task("rounds", total=num_rounds)
        self.clients_task = self.progress.add_task("clients", total=1, visible=False)
        self.console.print(f"results → {out_dir}")

    def round_start(self, server_round: int, num_clients: int) -> None:
        """Reset the clients bar."""
        self.progress.update(
            self.clients_task,
            description=f"round {server_round} clients",
            total=num_clients,
            completed=0,
            visible=True,
        )

    def reply(self, server_round: int, node_id: int, ok: bool) -> None:
        """Advance the clients bar."""
        if self.clients_task is not None:
            self.progress.advance(self.clients_task)

    def round_end(self, record: Mapping[str, Any]) -> None:
        """Print the round's line and advance the rounds bar."""
        acc = record.get("accuracy")
        loss = record.get("loss")
        parts = [f"round {record['round']}"]
        if acc is not None:
            parts.append(f"accuracy {acc:.4f}")
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        parts.append(f"up {record.get('uplink_bytes', 0):,} B")
        parts.append(f"down {record.get('downlink_bytes', 0):,} B")
        if record.get("rejected"):
            parts.append(f"rejected {record['rejected']}")
        parts.append(f"{record.get('seconds', 0.0):.1f} s")
        self.console.print("  ".join(parts))
        if record["round"] > 0 and self.rounds_task is not None:
            self.progress.advance(self.rounds_task)

    def stop(self) -> None:
        """Stop the bars."""
        self.progress.stop()


def simulate(flat: FlatConfig, quiet: bool = False, verbose: bool = False) -> pathlib.Path:
    """Run a simulation with ``flat`` as the run config; return the results directory.

    Ctrl-C (SIGINT) or SIGTERM stops the run within seconds (Ray and its processes
    included), prints one ``stopped:`` line with the last checkpoint and the resume
    command, and exits with status 130 (SIGINT) or 143 (SIGTERM) — ``SystemExit``, since
    this is the command, not a library call. An engine failure (no ClientApp can start,
    an actor dies) is a ``FedPeftError`` (an ``error:`` line, status 2).

    Raises:
        ConfigError: before anything starts, if the config is invalid (including
            ``simulation.cpus-per-client`` above the CPUs the simulation may use).
        FedPeftError: if the run did not produce results, or the engine failed.
        SystemExit: the run was interrupted by SIGINT (130) or SIGTERM (143).
    """
    from rich.console import Console

    _env_defaults()
    cfg = parse_run_config(flat)  # fail fast, before Ray starts
    from fedpeft.server.setup import build_strategy, resolve_output_dir

    build_strategy(cfg)  # codec/strategy compatibility, also before Ray starts
    flat = dict(flat)
    out_dir = resolve_output_dir(cfg)
    flat["output.dir"] = str(out_dir)

    from fedpeft.flower.engine_guard import SimulationStopped
    from fedpeft.flower.simulation import check_resources, resume_hint, run_simulation_engine
    from fedpeft.server.listeners import Observer

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    console = Console(stderr=False, quiet=quiet)
    observer: Any = Observer() if quiet else RichObserver(console)
    num_cpus = cfg.simulation.num_cpus or os.cpu_count() or 1
    check_resources(cfg, num_cpus)  # before Ray starts
    started = time.perf_counter()
    try:
        try:
            run_simulation_engine(flat, cfg, observer, num_cpus, verbose)
        finally:
            if isinstance(observer, RichObserver):
                observer.stop()
    except SimulationStopped as err:
        if not err.interrupted:
            raise
        print(f"stopped: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    except KeyboardInterrupt:  # outside the engine's own signal handling
        print(f"stopped: interrupted; {resume_hint(cfg, out_dir)}", file=sys.stderr)
        raise SystemExit(130) from None
    summary = out_dir / "summary.json"
    if not summary.exists():
        raise FedPeftError(f"the simulation ended without results in {out_dir}; see the log above")
    data = json.loads(summary.read_text())
    rounds = data["rounds"]
    outcome = outcome_of(data)
    if outcome in ("budget", "failed"):
        console.print(f"stopped: {data['stopped']}")
        if outcome == "failed":
            raise FedPeftError(f"{data['stopped']}; resume with: fedpeft simulate --resume {out_dir}")
    elif len(rounds) < cfg.federation.rounds + 1:
        raise FedPeftError(
            f"the simulation stopped after round {rounds[-1]['round'] if rounds else 0} of "
            f"{cfg.federation.rounds}; partial results are in {out_dir}"
        )
    console.print(
        f"done in {time.perf_counter() - started:.0f} s — results in {out_dir} "
        "(summary.json, metrics.csv, curves.png, adapter/, config.json)"
    )
    return out_dir


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML run config to start from (e.g. simulations/configs/…)")
    p.add_argument("--strategy", help="registered strategy name (default fedit)")
    p.add_argument("--task", help="classification (default), causal-lm or synthetic")
    p.add_argument("--rounds", type=int, help="federated rounds")
    p.add_argument("--clients", type=int, help="number of clients (simulated SuperNodes)")
    p.add_argument("--seed", type=int, help="run seed")
    p.add_argument("--out", help="results directory (default runs/<strategy>-<time>)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any config key, repeatable (e.g. --set lora.r=16 --set data.partition=dirichlet)",
    )


_VERBOSE_HELP = "show the third-party warnings fedpeft hides (listed in fedpeft/quiet.py)"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedpeft`` console script."""
    parser = argparse.ArgumentParser(prog="fedpeft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    sim = sub.add_parser("simulate", help="run a federated fine-tune in the simulation engine")
    _add_run_options(sim)
    sim.add_argument("--resume", metavar="DIR", help="continue an interrupted run from its checkpoint")
    sim.add_argument(
        "--overwrite",
        action="store_true",
        help="reuse a results directory that holds a run (its files are deleted first)",
    )
    sim.add_argument("--quiet", action="store_true", help="no progress display")
    sim.add_argument(
        "--verbose", action="store_true", help=_VERBOSE_HELP + "; Flower's INFO/DEBUG logs"
    )
    sub.add_parser("strategies", help="list registered strategies")
    certs_p = sub.add_parser("certs", help="write a CA, TLS certificates and SuperNode keys")
    certs_p.add_argument("--out", required=True, help="directory to write (e.g. certs)")
    certs_p.add_argument("--nodes", type=int, required=True, help="number of SuperNodes")
    certs_p.add_argument(
        "--san",
        action="append",
        metavar="NAME_OR_IP",
        help="extra name or IP address of the SuperLink, repeatable (superlink, localhost and "
        "127.0.0.1 are always included)",
    )
    certs_p.add_argument("--force", action="store_true", help="replace existing keys")
    dep_p = sub.add_parser(
        "deploy-local", help="run on a real loopback deployment (TLS + SuperNode authentication)"
    )
    _add_run_options(dep_p)
    dep_p.add_argument(
        "--nodes", type=int, help="number of SuperNodes (default 2; with --resume, the run's)"
    )
    dep_p.add_argument(
        "--resume",
        metavar="DIR",
        help="continue an interrupted or finished run from its checkpoint, on a fresh "
        "deployment (a new Flower run; the options may only extend it, as for simulate)",
    )
    dep_p.add_argument("--certs", help="a `fedpeft certs` directory (default: fresh keys)")
    dep_p.add_argument("--isolation", default="subprocess", choices=["subprocess", "process"])
    dep_p.add_argument(
        "--node-config",
        action="append",
        metavar="KEY=VALUE,...",
        help="extra node config of the next node, repeatable (e.g. device.tier=slow)",
    )
    dep_p.add_argument("--work-dir", help="keep logs and state here (default: a temporary dir)")
    dep_p.add_argument(
        "--warm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fork each node's ClientApps from a warm zygote (default); --no-warm: Flower's "
        "own cold flwr-clientapp process per message",
    )
    dep_p.add_argument("--verbose", action="store_true", help=_VERBOSE_HELP)
    dep_p.add_argument(
        "--overwrite",
        action="store_true",
        help="reuse a results directory that holds a run (its files are deleted first)",
    )
    cfg_p = sub.add_parser("config", help="print the resolved config as JSON")
    _add_run_options(cfg_p)
    cmp_p = sub.add_parser("compare", help="compare finished runs: table, curves, report.md")
    cmp_p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (summary.json)")
    cmp_p.add_argument("--out", required=True, metavar="REPORT_DIR", help="where report.md goes")
    cmp_p.add_argument(
        "--target",
        type=float,
        help="rounds-to-target threshold (accuracy, or loss for causal-lm); "
        "default 0.9 x the best final accuracy (1.1 x the best final loss)",
    )
    cmp_p.add_argument(
        "--label-keys",
        help="comma-separated config keys allowed in run labels (default: every key that differs)",
    )
    args = parser.parse_args(argv)
    command = args.command or "simulate"
    if args.command is None:
        args = parser.parse_args(["simulate", *(argv or [])])
    hide_known_noise(verbose=getattr(args, "verbose", False))  # before anything warns
    try:
        if command == "simulate":
            from fedpeft.preflight import prepare_run

            if args.overwrite and args.resume:
                raise FedPeftError(
                    "--overwrite cannot be combined with --resume, which continues the run"
                )
            _env_defaults()
            flat = prepare_run(build_flat_config(args), overwrite=args.overwrite)  # before Ray
            simulate(flat, quiet=args.quiet, verbose=args.verbose)
        elif command == "strategies":
            from fedpeft.registry import available_strategies, get_strategy

            for name in available_strategies():
                print(f"{name:12s} {get_strategy(name).summary}")
        elif command == "certs":
            import ipaddress

            from fedpeft.deploy.certs import dns_name_problem, generate_certs

            dns, ips = ["superlink", "localhost"], ["127.0.0.1"]
            for name in args.san or []:
                try:
                    ips.append(str(ipaddress.ip_address(name)))
                except ValueError:
                    problem = dns_name_problem(name)
                    if problem:
                        raise FedPeftError(
                            f"--san {name!r} is neither an IP address nor a valid DNS name: "
                            f"{problem}"
                        ) from None
                    dns.append(name)
            manifest = generate_certs(args.out, args.nodes, dns, ips, overwrite=args.force)
            print(f"wrote {manifest.directory} ({len(manifest.nodes)} SuperNodes; manifest.json)")
        elif command == "deploy-local":
            from fedpeft.deploy.local import deploy_local
            from fedpeft.preflight import prepare_run

            if args.overwrite and args.resume:
                raise FedPeftError(
                    "--overwrite cannot be combined with --resume, which continues the run"
                )
            _env_defaults()
            flat = build_flat_config(args)
            nodes = _deploy_nodes(args, flat)
            flat["federation.clients"] = nodes
            flat = prepare_run(flat, overwrite=args.overwrite)  # fail before any process starts
            node_configs = [parse_overrides(n.split(",")) for n in args.node_config or []]
            node_configs += [{}] * (nodes - len(node_configs))
            deploy_local(
                flat,
                nodes,
                certs_dir=args.certs,
                work_dir=args.work_dir,
                isolation=args.isolation,
                node_configs=node_configs[:nodes],
                warm=args.warm,
            )
        elif command == "config":
            from fedpeft.preflight import check_config

            _env_defaults()
            print(json.dumps(check_config(build_flat_config(args)).to_flat(), indent=2))
        elif command == "compare":
            import shutil

            from fedpeft.report import compare, render_terminal_table

            keys = None
            if args.label_keys:
                keys = [k.strip() for k in args.label_keys.split(",") if k.strip()]
            report = compare(args.runs, args.out, target=args.target, label_keys=keys)
            width = shutil.get_terminal_size((200, 24)).columns
            print(render_terminal_table(report, width=width), end="")
            print(f"report → {report.markdown_path}")
    except FedPeftError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the engine started (imports, checks)
        print("stopped: interrupted before the run started; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
