"""The ``fedpeft`` command line (the application entry point, not library code).

Commands:

* ``fedpeft simulate`` — run a federated fine-tune on the Flower simulation engine
  (Ray backend) with a progress display; with no options, the embedded default
  (4 clients, 3 rounds, MiniLM + LoRA on tweet sentiment).
* ``fedpeft strategies`` — list registered strategies.
* ``fedpeft config`` — print the resolved configuration (or the problems in it).
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
    """Config file, then the named options, then ``--set`` overrides."""
    flat: FlatConfig = {}
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

    from flwr.simulation import run_simulation

    from fedpeft.flower.client_app import make_client_app
    from fedpeft.flower.server_app import Observer, make_server_app

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    console = Console(stderr=False, quiet=quiet)
    observer: Any = Observer() if quiet else RichObserver(console)
    num_cpus = cfg.simulation.num_cpus or os.cpu_count() or 1
    started = time.perf_counter()
    try:
        run_simulation(
            server_app=make_server_app(flat, observer),
            client_app=make_client_app(flat),
            num_supernodes=cfg.federation.clients,
            backend_config={
                "client_resources": {"num_cpus": cfg.simulation.cpus_per_client, "num_gpus": 0.0},
                "init_args": {"num_cpus": num_cpus, "include_dashboard": False},
            },
            verbose_logging=verbose,
        )
    finally:
        if isinstance(observer, RichObserver):
            observer.stop()
    summary = out_dir / "summary.json"
    if not summary.exists():
        raise FedPeftError(f"the simulation ended without results in {out_dir}; see the log above")
    rounds = json.loads(summary.read_text())["rounds"]
    if len(rounds) < cfg.federation.rounds + 1:
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
    sim.add_argument("--quiet", action="store_true", help="no progress display")
    sim.add_argument("--verbose", action="store_true", help="Flower's INFO/DEBUG logs")
    sub.add_parser("strategies", help="list registered strategies")
    cfg_p = sub.add_parser("config", help="print the resolved config as JSON")
    _add_run_options(cfg_p)
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
        elif command == "config":
            print(json.dumps(parse_run_config(build_flat_config(args)).to_flat(), indent=2))
    except FedPeftError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
