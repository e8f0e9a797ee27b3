"""Child and warm hooks for tests/deploy/test_zygote.py (run inside a test zygote)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

WARMED: list[Any] = []


def echo(argv: list[str]) -> int:
    """Print what the child got; ``crash`` aborts, ``sleep`` waits, a number is the code."""
    print(
        json.dumps(
            {
                "argv": argv[1:],
                "cwd": os.getcwd(),
                "x": os.environ.get("ZT_X"),
                "warmed": WARMED,
                "pid": os.getpid(),
                "ppid": os.getppid(),
            }
        ),
        flush=True,
    )
    sys.stderr.write("to stderr\n")
    if "crash" in argv:
        os.abort()
    if "sleep" in argv:
        time.sleep(120)
    return int(argv[-1]) if argv[-1].isdigit() else 0


def warm(request: dict[str, Any]) -> int:
    if request.get("fail"):
        raise RuntimeError("warm failed on purpose")
    WARMED.append(request)
    return len(WARMED)


def train(argv: list[str]) -> int:
    """Train a small MLP; print the final loss (hex), torch's thread count and OS threads."""
    import torch

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 256, generator=gen)
    y = torch.randn(512, 1, generator=gen)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(20):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    print(
        json.dumps(
            {
                "loss": float(loss).hex(),
                "threads": torch.get_num_threads(),
                "os_threads": len(os.listdir("/proc/self/task")),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(train(sys.argv))
