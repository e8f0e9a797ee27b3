"""Framework overhead per client step vs a bare peft training loop.

Measures, side by side in one process, on the embedded task (MiniLM + LoRA r=8,
batch 16, max length 64, AdamW, client 0 of 4 IID partitions):

* bare: a plain peft loop — forward, backward, AdamW step — over the same batches;
* fedpeft: the ClientApp's train handler for the same number of steps, end to end
  (decode the downlink message, load the adapter, train, encode the upload, build
  the reply).

Both warm up once, then alternate ``--repeats`` times; medians are reported. Run:

    python simulations/bench_overhead.py [--steps 30] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = one simulated client per core)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="minilm")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from peft import LoraConfig, get_peft_model

    from fedpeft.config import parse_run_config
    from fedpeft.flower import records as rec
    from fedpeft.flower.client_app import make_client_app
    from fedpeft.seeding import derive_seed
    from fedpeft.tasks import get_task
    from fedpeft.tasks.data import collate
    from fedpeft.tasks.model import seeded
    from fedpeft.tasks.train import batch_schedule
    from fedpeft.types import ClientPlan

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    flat = {"model.name": args.model, "train.local-steps": args.steps, "federation.clients": 4}
    cfg = parse_run_config(flat)
    task = get_task(cfg)
    data, _ = task.client_data(0, 4)
    plan = ClientPlan(node_id=7, partition_id=0, rank=cfg.lora.r, seed=123)

    # --- bare peft loop on the same batches -------------------------------------
    with seeded(derive_seed(cfg.seed, "init")):
        base = task.base_model()
        bare = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS"))
    pad = task.tok().pad_token_id
    batches = [collate(data, idx.tolist(), pad) for idx in batch_schedule(len(data), 16, args.steps, plan.seed)]

    def bare_round() -> float:
        opt = torch.optim.AdamW([p for p in bare.parameters() if p.requires_grad], lr=cfg.train.lr)
        bare.train()
        start = time.perf_counter()
        for b in batches:
            out = bare(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    # --- the fedpeft ClientApp train handler -------------------------------------
    app = make_client_app(flat)
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 4},
                  state=RecordDict(), run_config={})
    initial = task.model(cfg.lora.r).initial

    def fedpeft_round() -> float:
        content = RecordDict({
            rec.ARRAYS: rec.tensors_to_record(initial),
            rec.CONFIG: ConfigRecord(rec.plan_to_config(plan, 1)),
        })
        msg = Message(content, dst_node_id=7, message_type=MessageType.TRAIN)
        start = time.perf_counter()
        reply = app(msg, ctx)
        elapsed = time.perf_counter() - start
        assert not reply.has_error(), reply.error
        return elapsed

    bare_round(), fedpeft_round()  # warm up (first-touch allocations, tokenised data)
    bare_t, fed_t = [], []
    for _ in range(args.repeats):
        bare_t.append(bare_round())
        fed_t.append(fedpeft_round())
    b, f = statistics.median(bare_t), statistics.median(fed_t)
    print(f"steps per round: {args.steps}, torch threads: {args.threads}, repeats: {args.repeats}")
    print("| loop | s/round (median) | s/step | ratio |")
    print("|---|---|---|---|")
    print(f"| bare peft | {b:.2f} | {b / args.steps:.3f} | 1.00 |")
    print(f"| fedpeft ClientApp train | {f:.2f} | {f / args.steps:.3f} | {f / b:.3f} |")


if __name__ == "__main__":
    main()
