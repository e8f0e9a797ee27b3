"""GPU check (issue 19; run through ``simulations/gpu_check.sh``).

The same short federated causal-LM run (the in-process grid: the ServerApp and the
ClientApps of ``fedpeft simulate`` in one process) in up to three settings:

* ``cpu-fp32``: ``train.device=cpu``;
* ``cuda-bf16``: ``train.device=cuda``, ``model.dtype=bf16``, ``train.precision=bf16``;
* ``cuda-4bit``: QLoRA, ``model.quantization=4bit`` (NF4 base, bf16 compute), LoRA in fp32.

Per setting it prints the training tokens per second (non-padding tokens of every
client step / the clients' training seconds), the peak GPU memory
(``torch.cuda.max_memory_allocated``) and the final evaluation loss, and checks that
the model really sat on the device asked for. Exit status: 0 when every setting ran
where it was asked to; 3 when CUDA is missing (the GPU part did not run; ``--cpu-only``
skips it and exits 0); 4 when a CUDA setting ended on the CPU or failed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Any

SETTINGS: dict[str, dict[str, Any]] = {
    "cpu-fp32": {"train.device": "cpu"},
    "cuda-bf16": {"train.device": "cuda", "model.dtype": "bf16", "train.precision": "bf16"},
    "cuda-4bit": {"train.device": "cuda", "model.quantization": "4bit", "train.precision": "bf16"},
}


def base_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "task.name": "causal-lm",
        "model.name": args.model,
        "model.max-length": 128,
        "lora.target-modules": "all-linear",
        "federation.clients": 2,
        "federation.rounds": args.rounds,
        "train.local-steps": args.steps,
        "train.batch-size": 8,
        "train.lr": 2e-4,
        "data.test-size": 64,
        "eval.batch-size": 16,
        "output.save-adapter": False,
        "seed": 0,
    }


def run_setting(name: str, flat: dict[str, Any]) -> dict[str, Any]:
    """One federated run; tokens/s, peak GPU memory, final loss and the model's device."""
    import torch

    from fedpeft.config import parse_run_config
    from fedpeft.flower.inprocess import run_in_process
    from fedpeft.tasks import get_task

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        results = run_in_process({**flat, "output.dir": out})
    clients = [c for r in results.rounds[1:] for c in r.get("clients", [])]
    tokens = sum(float(c["train-tokens"]) for c in clients)
    seconds = sum(float(c["train-seconds"]) for c in clients)
    cfg = parse_run_config(flat)
    device = get_task(cfg).model(cfg.lora.max_rank).device
    return {
        "setting": name,
        "device": str(device),
        "tokens_per_s": tokens / seconds if seconds else float("nan"),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "final_loss": results.rounds[-1].get("loss"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="model.name (tiny-llama: a tiny random Llama)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cpu-only", action="store_true", help="run the CPU setting only and exit 0")
    args = parser.parse_args()

    import torch

    names = ["cpu-fp32"] if args.cpu_only else list(SETTINGS)
    rows, failed = [], []
    for name in names:
        flat = {**base_config(args), **SETTINGS[name]}
        if name.startswith("cuda") and not torch.cuda.is_available():
            continue
        try:
            row = run_setting(name, flat)
        except Exception as err:  # noqa: BLE001 — report every setting, then fail
            failed.append(f"{name}: {type(err).__name__}: {err}")
            continue
        rows.append(row)
        if name.startswith("cuda") and not row["device"].startswith("cuda"):
            failed.append(f"{name}: the model sat on {row['device']}, not on the GPU")
    print("| setting | device | tokens/s | peak GPU MB | final eval loss |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        peak = f"{r['peak_gpu_mb']:.0f}" if r["peak_gpu_mb"] is not None else "—"
        loss = f"{r['final_loss']:.4f}" if r["final_loss"] is not None else "—"
        print(f"| {r['setting']} | {r['device']} | {r['tokens_per_s']:.0f} | {peak} | {loss} |")
    if failed:
        print("FAILED:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 4
    if not args.cpu_only and not torch.cuda.is_available():
        print(
            f"no CUDA device (torch {torch.__version__}): only the CPU setting ran; the GPU was not used",
            file=sys.stderr,
        )
        return 3
    print("ok: every setting ran on the device it asked for")
    return 0


if __name__ == "__main__":
    sys.exit(main())
