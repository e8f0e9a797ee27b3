"""Benchmark the wire codecs on LoRA-shaped tensors (ALGORITHMS.md §12).

Run: ``python simulations/bench_codec_micro.py [--repeats 7] [--json reports/codec-micro.json]``
(the accuracy-vs-bytes benchmark on the real task is ``simulations/bench_codecs.py``)

For each codec spec and tensor set it prints, all measured in this one run:
compression ratio vs raw fp32 bytes (array bytes alone, and an estimate of the wire
bytes with npy headers, keys and meta from ``fedpeft.codecs.analysis``), relative L2
error ``‖x̂ − x‖ / ‖x‖`` over the whole set, encode+decode throughput in MB/s of fp32
input, and that time relative to a plain ``numpy`` copy of the same arrays (median of
``--repeats`` runs each). Every stage starts from an empty state (a first round).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fedpeft.codecs import CodecContext, Payload, build_codec, to_payload
from fedpeft.codecs.analysis import encoded_nbytes

SPECS = [
    "identity",
    "fp16",
    "bf16",
    "int8",
    "int4",
    "topk:0.05",
    "topk:0.05+int8+zstd",
    "fp16+zstd",
    "int8+zstd",
    "int4+zstd",
    "lowrank:2",
    "int2+zstd",
    "ternary+zstd",
    "sign+zstd",
    "topk:0.05+sign+zstd",
]


def minilm_lora(g: torch.Generator) -> dict[str, torch.Tensor]:
    """MiniLM-L12 (d=384) LoRA r=8 on query/value, plus a 3-class head."""
    tensors = {}
    prefix = "base_model.model.bert.encoder.layer"
    for layer in range(12):
        for target in ("query", "value"):
            key = f"{prefix}.{layer}.attention.self.{target}"
            tensors[f"{key}.lora_A.weight"] = (torch.rand(8, 384, generator=g) * 2 - 1) / 384**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(384, 8, generator=g) * 0.01
    tensors["base_model.model.classifier.weight"] = torch.randn(3, 384, generator=g) * 0.02
    tensors["base_model.model.classifier.bias"] = torch.randn(3, generator=g) * 0.02
    return tensors


def large_lora(g: torch.Generator) -> dict[str, torch.Tensor]:
    """64 matrices 4096×16 (LLaMA-7B-like q/v factors): half uniform A-like, half B-like."""
    tensors = {}
    for i in range(64):
        if i % 2 == 0:
            tensors[f"m{i}"] = (torch.rand(4096, 16, generator=g) * 2 - 1) / 4096**0.5
        else:
            tensors[f"m{i}"] = torch.randn(4096, 16, generator=g) * 0.01
    return tensors


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_set(payload: Payload, repeats: int) -> tuple[float, list[dict[str, float | str]]]:
    """Measure every spec on ``payload``; returns the memcpy time and one row per spec."""
    arrays = payload.arrays
    raw = sum(a.nbytes for a in arrays.values())
    identity_wire = encoded_nbytes(payload)
    copy_s = median_seconds(lambda: {k: np.copy(v) for k, v in arrays.items()}, repeats)
    ctx = CodecContext(seed=0)
    rows = []
    for spec in SPECS:
        codec = build_codec(spec)

        def roundtrip(codec=codec) -> tuple[Payload, Payload]:
            encoded, _ = codec.encode(payload, {}, ctx)
            return encoded, codec.decode(encoded, ctx)

        seconds = median_seconds(roundtrip, repeats)
        encoded, decoded = roundtrip()
        err_sq = sum(
            float(np.sum((decoded.arrays[k].astype(np.float64) - a) ** 2))
            for k, a in arrays.items()
        )
        norm_sq = sum(float(np.sum(a.astype(np.float64) ** 2)) for a in arrays.values())
        rows.append(
            {
                "codec": spec,
                "bytes": encoded.nbytes(),
                "ratio": raw / encoded.nbytes(),
                "wire_ratio": identity_wire / encoded_nbytes(encoded),
                "rel_l2": (err_sq / norm_sq) ** 0.5,
                "mb_per_s": raw / 1e6 / seconds,
                "vs_memcpy": seconds / copy_s,
            }
        )
    return copy_s, rows


def markdown(title: str, raw: int, copy_s: float, rows: list[dict[str, float | str]]) -> str:
    """One table per tensor set."""
    lines = [
        f"### {title}: {raw / 1e6:.3f} MB fp32; memcpy {raw / 1e6 / copy_s:,.0f} MB/s",
        "",
        "| codec | bytes | ratio | wire ratio | rel. L2 error | enc+dec MB/s | time / memcpy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| `{r['codec']}` | {r['bytes']:,} | {r['ratio']:.2f}× | {r['wire_ratio']:.2f}× "
            f"| {r['rel_l2']:.2e} | {r['mb_per_s']:,.0f} | {r['vs_memcpy']:,.1f}× |"
        )
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, run both tensor sets, print tables, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per codec")
    parser.add_argument("--json", type=Path, default=None, help="also write numbers here")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    results = {}
    for title, build in (
        ("MiniLM LoRA r=8 (q,v) + head", minilm_lora),
        ("64 × (4096, 16)", large_lora),
    ):
        payload = to_payload(build(g))
        raw = payload.nbytes()
        copy_s, rows = bench_set(payload, args.repeats)
        print(markdown(title, raw, copy_s, rows), end="\n\n", flush=True)
        results[title] = {"fp32_bytes": raw, "memcpy_seconds": copy_s, "rows": rows}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
