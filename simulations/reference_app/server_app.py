"""The reference ServerApp: Flower's FedAvg on the adapter, central evaluation."""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from reference_app import task
from reference_app.task import RefConfig


def make_server_app(cfg: RefConfig) -> ServerApp:
    """A ServerApp bound to ``cfg``; writes ``cfg.out/summary.json``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        started = time.perf_counter()
        model = task.build_model(cfg)
        test = task.test_data(cfg)
        initial = ArrayRecord(task.adapter_state(model))
        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=cfg.clients,
            min_available_nodes=cfg.clients,
        )
        rounds: list[dict[str, Any]] = []
        last = [time.perf_counter()]

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            task.load_adapter(model, arrays.to_torch_state_dict())
            metrics = task.evaluate(model, test, cfg)
            now = time.perf_counter()
            rounds.append(
                {
                    "round": server_round,
                    **metrics,
                    "seconds": now - last[0] if server_round else 0.0,
                }
            )
            last[0] = now
            return MetricRecord(metrics)

        result = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=cfg.rounds,
            train_config=ConfigRecord({}),
            evaluate_fn=evaluate_fn,
        )
        for record in rounds[1:]:
            train = result.train_metrics_clientapp.get(record["round"])
            if train is not None:
                record.update({k: float(v) for k, v in train.items()})  # weighted by num-examples
        summary = {
            "implementation": "reference (flwr FedAvg + peft, plain torch loop)",
            "config": json.loads(cfg.to_json()),
            "rounds": rounds,
            "exchanged_parameters": sum(int(v.numel()) for v in task.adapter_state(model).values()),
            "bytes_per_client_per_direction": initial.count_bytes(),
            "server_seconds": time.perf_counter() - started,
        }
        out = pathlib.Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))

    return app
