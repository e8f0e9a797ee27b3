"""The ``fedpeft`` command line (the application entry point, not library code).

Commands:

* ``fedpeft simulate`` — run a federated fine-tune on the Flower simulation engine
  (Ray backend) with a progress display; with no options, the embedded default
  (4 clients, 3 rounds, MiniLM + LoRA on tweet sentiment).
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
    """A TOML run-config file (nested tables or dotted keys) as a flat dict."""
    file = pathlib.Path(path)
    if not file.exists():
        raise FedPeftError(f"--config: no such file {path!r}")
    with file.open("rb") as handle:
        return flatten_toml(tomllib.load(handle))


def build_flat_config(args: argparse.Namespace) -> FlatConfig:
    """Config file, then the named options, then ``--set`` overrides.

    With ``--resume DIR`` the base is the config the interrupted run recorded in
    ``DIR/config.json``; other options may still override it (e.g. more rounds).
    """
    flat: FlatConfig = {}
    resume = getattr(args, "resume", None)
    if resume:
        recorded = pathlib.Path(resume) / "config.json"
        if not recorded.exists():
            raise FedPeftError(f"--resume: {recorded} does not exist; is {resume!r} a run directory?")
        flat.update(json.loads(recorded.read_text())["config"])
        flat["checkpoint.resume"] = True
        flat["output.dir"] = str(pathlib.Path(resume).resolve())
    if getattr(args, "config", None):
        flat.update(load_config_file(args.config))
    named = {
        "strategy.name": getattr(args, "strategy", None),
        "federation.rounds": getattr(args, "rounds", None),
        "federation.clients": getattr(args, "clients", None),
        "output.dir": getattr(args, "out", None),
        "task.name": getattr(args, "task", None),
        "seed": getattr(args, "seed", None),
    }
    flat.update({k: v for k, v in named.items() if v is not None})
    flat.update(parse_overrides(getattr(args, "set", None) or []))
    return flat


class RichObserver:
    """Progress display: one bar for rounds, one for this round's client replies."""

    def __init__(self, console: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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

    Raises:
        ConfigError: before anything starts, if the config is invalid.
        FedPeftError: if the run did not produce results.
    """
    from rich.console import Console

    _env_defaults()
    cfg = parse_run_config(flat)  # fail fast, before Ray starts
    from fedpeft.flower.server_app import build_strategy, resolve_output_dir

    build_strategy(cfg)  # codec/strategy compatibility, also before Ray starts
    flat = dict(flat)
    out_dir = resolve_output_dir(cfg)
    flat["output.dir"] = str(out_dir)

    from fedpeft.flower.server_app import Observer
    from fedpeft.flower.simulation import run_simulation_engine

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    console = Console(stderr=False, quiet=quiet)
    observer: Any = Observer() if quiet else RichObserver(console)
    num_cpus = cfg.simulation.num_cpus or os.cpu_count() or 1
    started = time.perf_counter()
    try:
        run_simulation_engine(flat, cfg, observer, num_cpus, verbose)
    finally:
        if isinstance(observer, RichObserver):
            observer.stop()
    summary = out_dir / "summary.json"
    if not summary.exists():
        raise FedPeftError(f"the simulation ended without results in {out_dir}; see the log above")
    data = json.loads(summary.read_text())
    rounds = data["rounds"]
    if "stopped" in data:
        console.print(f"stopped: {data['stopped']}")
        if str(data["stopped"]).find("budget.bytes") < 0:
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
    p.add_argument("--task", help="classification (default) or causal-lm")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedpeft`` console script."""
    parser = argparse.ArgumentParser(prog="fedpeft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    sim = sub.add_parser("simulate", help="run a federated fine-tune in the simulation engine")
    _add_run_options(sim)
    sim.add_argument("--resume", metavar="DIR", help="continue an interrupted run from its checkpoint")
    sim.add_argument("--quiet", action="store_true", help="no progress display")
    sim.add_argument("--verbose", action="store_true", help="Flower's INFO/DEBUG logs")
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
    dep_p.add_argument("--nodes", type=int, default=2, help="number of SuperNodes (default 2)")
    dep_p.add_argument("--certs", help="a `fedpeft certs` directory (default: fresh keys)")
    dep_p.add_argument("--isolation", default="subprocess", choices=["subprocess", "process"])
    dep_p.add_argument(
        "--node-config",
        action="append",
        metavar="KEY=VALUE,...",
        help="extra node config of the next node, repeatable (e.g. device.tier=slow)",
    )
    dep_p.add_argument("--work-dir", help="keep logs and state here (default: a temporary dir)")
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
    try:
        if command == "simulate":
            simulate(build_flat_config(args), quiet=args.quiet, verbose=args.verbose)
        elif command == "strategies":
            from fedpeft.registry import available_strategies, get_strategy

            for name in available_strategies():
                print(f"{name:12s} {get_strategy(name).summary}")
        elif command == "certs":
            import ipaddress

            from fedpeft.deploy.certs import generate_certs

            dns, ips = ["superlink", "localhost"], ["127.0.0.1"]
            for name in args.san or []:
                try:
                    ips.append(str(ipaddress.ip_address(name)))
                except ValueError:
                    dns.append(name)
            manifest = generate_certs(args.out, args.nodes, dns, ips, overwrite=args.force)
            print(f"wrote {manifest.directory} ({len(manifest.nodes)} SuperNodes; manifest.json)")
        elif command == "deploy-local":
            from fedpeft.deploy.local import deploy_local
            from fedpeft.flower.server_app import build_strategy

            _env_defaults()
            if args.clients is not None and args.clients != args.nodes:
                raise FedPeftError(
                    f"deploy-local: --clients ({args.clients}) must equal --nodes ({args.nodes})"
                )
            flat = build_flat_config(args)
            flat["federation.clients"] = args.nodes
            build_strategy(parse_run_config(flat))  # fail before any process starts
            node_configs = [parse_overrides(n.split(",")) for n in args.node_config or []]
            node_configs += [{}] * (args.nodes - len(node_configs))
            deploy_local(
                flat,
                args.nodes,
                certs_dir=args.certs,
                work_dir=args.work_dir,
                isolation=args.isolation,
                node_configs=node_configs[: args.nodes],
            )
        elif command == "config":
            print(json.dumps(parse_run_config(build_flat_config(args)).to_flat(), indent=2))
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
