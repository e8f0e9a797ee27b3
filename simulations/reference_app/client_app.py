"""The reference ClientApp: load the received adapter, train, reply with it."""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from reference_app import task
from reference_app.task import RefConfig


def make_client_app(cfg: RefConfig) -> ClientApp:
    """A ClientApp bound to ``cfg`` (``run_simulation`` passes no run config)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        started = time.perf_counter()
        pid = int(context.node_config["partition-id"])
        model = task.cached_model(cfg)
        task.load_adapter(model, msg.content["arrays"].to_torch_state_dict())
        data = task.train_data(cfg, pid)
        train_started = time.perf_counter()
        loss = task.train(model, data, cfg, int(msg.content["config"]["server-round"]), pid)
        metrics = MetricRecord(
            {
                "train_loss": loss,
                "num-examples": len(data),
                "train_seconds": time.perf_counter() - train_started,
                "client_seconds": time.perf_counter() - started,
            }
        )
        content = RecordDict({"arrays": ArrayRecord(task.adapter_state(model)), "metrics": metrics})
        return Message(content, reply_to=msg)

    return app
