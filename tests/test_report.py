"""fedpeft compare: table values, Pareto front, seed groups, files, errors."""

from __future__ import annotations

import json
import math
import pathlib
import statistics

import pytest

from fedpeft.errors import FedPeftError
from fedpeft.report import (
    ROUND_PLOT,
    UPLINK_PLOT,
    build_report,
    compare,
    group_table,
    load_run,
    pareto_front,
    render_markdown,
    render_terminal_table,
    run_table,
)
from fedpeft.results import RunResults, write_config

BASE_CONFIG = {
    "seed": 0,
    "task.name": "classification",
    "model.name": "tiny-bert",
    "lora.r": 8,
    "data.partition": "iid",
    "codec.uplink": "identity",
    "codec.downlink": "identity",
    "strategy.name": "fedit",
    "output.dir": "ignored",
}


def _round(n, acc, loss, up, down, sec, err=None, rejected=0, **extra):
    record = {
        "round": n,
        "accuracy": acc,
        "loss": loss,
        "uplink_bytes": up,
        "downlink_bytes": down,
        "seconds": sec,
        "sampled": 2 if n else 0,
        "rejected": rejected,
        "failed": 0,
    }
    if n > 0:
        record.update(
            {
                "train_loss": loss,
                "aggregation_error": err,
                "aggregation_cosine": 0.99,
                "clients": [{"node_id": 1, "partition_id": 0, "rank": 8, "num_examples": 10}],
            }
        )
    record.update(extra)
    return record


def write_run(
    root: pathlib.Path,
    name: str,
    rounds,
    *,
    strategy="fedit",
    seed=0,
    config=None,
    totals=True,
    task="classification",
    with_config=True,
):
    """A run directory with summary.json/config.json in the README "Results" schema."""
    directory = root / name
    directory.mkdir(parents=True)
    flat = {
        **BASE_CONFIG,
        "strategy.name": strategy,
        "seed": seed,
        "task.name": task,
        **(config or {}),
    }
    codec = {"uplink": flat["codec.uplink"], "downlink": flat["codec.downlink"]}
    summary = {"strategy": strategy, "task": task, "seed": seed, "clients": 2, "codec": codec}
    if isinstance(totals, dict):
        summary["totals"] = totals
    elif totals:
        summary["totals"] = {
            "uplink_bytes": sum(r["uplink_bytes"] for r in rounds),
            "downlink_bytes": sum(r["downlink_bytes"] for r in rounds),
        }
    summary["rounds"] = rounds
    (directory / "summary.json").write_text(json.dumps(summary))
    if with_config:
        (directory / "config.json").write_text(
            json.dumps({"config": flat, "seed": seed, "versions": {"python": "3.11"}})
        )
    return directory


def _acc_run(root, name, accs, up=100, down=50, **kw):
    rounds = [_round(0, accs[0], 1.1, 0, 0, 0.0)]
    rounds += [
        _round(i, a, 1.0 - 0.1 * i, up, down, 1.5, err=0.1 * i)
        for i, a in enumerate(accs[1:], start=1)
    ]
    return write_run(root, name, rounds, **kw)


def test_table_values(tmp_path):
    rounds_a = [
        _round(0, 0.30, 1.10, 0, 0, 0.0),
        _round(1, 0.50, 0.90, 1000, 400, 2.0, err=0.2, rejected=1),
        _round(2, 0.70, 0.80, 1000, 400, 3.0, err=None),
        _round(3, 0.65, 0.75, 1000, 400, 4.5, err=0.4, rejected=2),
    ]
    rounds_b = [
        _round(0, 0.30, 1.10, 0, 0, 0.0),
        _round(1, 0.40, 1.00, 300, 200, 1.0, err=0.05),
        _round(2, 0.45, 0.95, 300, 200, 1.0, err=0.15),
        _round(3, 0.50, 0.92, 300, 200, 1.25, err=0.1),
    ]
    del rounds_b[2]["rejected"]  # optional field
    # the ledger's totals win over the round sums (they may count bytes outside rounds)
    a = write_run(tmp_path, "a", rounds_a, totals={"uplink_bytes": 3010, "downlink_bytes": 1200})
    b = write_run(tmp_path, "b", rounds_b, totals=False, config={"codec.uplink": "int8"})

    report = build_report([load_run(a), load_run(b)])

    assert report.metric == "accuracy"
    assert report.target == pytest.approx(0.9 * 0.65)
    ra, rb = report.rows
    assert (ra.final_accuracy, ra.best_accuracy, ra.final_loss) == (0.65, 0.70, 0.75)
    assert (rb.final_accuracy, rb.best_accuracy) == (0.50, 0.50)
    assert ra.rounds_to_target == 2 and rb.rounds_to_target is None  # 0.585: B never
    assert (ra.uplink_bytes, ra.downlink_bytes) == (3010, 1200)  # from totals
    assert (rb.uplink_bytes, rb.downlink_bytes) == (900, 600)  # summed over rounds
    assert ra.seconds == pytest.approx(9.5) and rb.seconds == pytest.approx(3.25)
    assert ra.aggregation_error == pytest.approx(0.3)  # null of round 2 skipped
    assert rb.aggregation_error == pytest.approx(0.1)
    assert (ra.rejected, rb.rejected) == (3, 0)
    assert ra.rounds == rb.rounds == 3
    assert (ra.label, rb.label) == ("fedit uplink=identity", "fedit uplink=int8")
    assert ra.pareto and rb.pareto  # B cheaper, A more accurate
    header, rows = run_table(report)
    assert header[4] == "rounds to ≥ 0.585"
    assert rows[0][4] == "2" and rows[1][4] == "never"
    assert rows[0][6:8] == ["3,010", "1,200"]
    assert report.groups == ()  # no label shared across seeds

    given = build_report([load_run(a), load_run(b)], target=0.45)
    assert [r.rounds_to_target for r in given.rows] == [1, 2]
    assert given.target_note.startswith("given")


def test_pareto_front_hand_made():
    points = [(1.0, 0.5), (2.0, 0.6), (3.0, 0.55), (2.0, 0.4), (4.0, 0.9), (1.0, 0.5), (5.0, 0.9)]
    # (3, .55) is beaten by (2, .6); (2, .4) by (1, .5); (5, .9) by (4, .9); equal points both stay.
    assert pareto_front(points) == (0, 1, 4, 5)
    assert pareto_front([]) == ()


def test_pareto_flags_in_report(tmp_path):
    dirs = [
        _acc_run(tmp_path, "cheap", [0.3, 0.6], up=100, config={"lora.r": 2}),
        _acc_run(tmp_path, "mid", [0.3, 0.5], up=200, config={"lora.r": 4}),  # dominated
        _acc_run(tmp_path, "rich", [0.3, 0.8], up=400, config={"lora.r": 8}),
    ]
    report = build_report([load_run(d) for d in dirs])
    assert [r.pareto for r in report.rows] == [True, False, True]
    assert [r.label for r in report.rows] == ["fedit r=2", "fedit r=4", "fedit r=8"]


def test_seed_groups_mean_std(tmp_path):
    fed = [[0.3, 0.5, 0.6], [0.3, 0.55, 0.7], [0.3, 0.5, 0.8]]
    dirs = [_acc_run(tmp_path, f"fedit-{s}", acc, seed=s) for s, acc in enumerate(fed)]
    dirs += [
        _acc_run(tmp_path, f"int8-{s}", acc, seed=s, up=25, config={"codec.uplink": "int8"})
        for s, acc in enumerate([[0.3, 0.4, 0.5], [0.3, 0.5, 0.6]])
    ]

    report = build_report([load_run(d) for d in dirs])

    assert report.rows[0].label == "fedit uplink=identity seed=0"
    assert [g.label for g in report.groups] == ["fedit uplink=identity", "fedit uplink=int8"]
    g1, g2 = report.groups
    assert g1.seeds == (0, 1, 2) and g1.run_indices == (0, 1, 2)
    assert g1.final_metric.mean == pytest.approx(0.7)
    assert g1.final_metric.std == pytest.approx(0.1)  # sample std of 0.6, 0.7, 0.8
    assert g2.final_metric.mean == pytest.approx(0.55)
    assert g2.final_metric.std == pytest.approx(statistics.stdev([0.5, 0.6]))
    assert g1.seconds.mean == pytest.approx(3.0) and g1.seconds.std == pytest.approx(0.0)
    # target 0.9 * 0.8 = 0.72: only fedit seed 2 reaches it (round 2)
    assert (g1.rounds_to_target.count, g1.rounds_to_target.mean) == (1, 2.0)
    assert g2.rounds_to_target.count == 0
    assert g1.pareto and g2.pareto  # int8 is cheaper, identity more accurate
    header, rows = group_table(report)
    assert rows[0][2] == "0.7000 ± 0.1000"
    assert rows[0][4] == "2.0 (1/3)"
    assert rows[1][4] == "— (0/2)"


def test_compare_writes_report_and_valid_pngs(tmp_path):
    from PIL import Image

    dirs = [
        _acc_run(tmp_path / "runs", "a", [0.3, 0.5, 0.6]),
        _acc_run(tmp_path / "runs", "b", [0.3, 0.4, 0.7], up=300, config={"lora.r": 16}),
    ]
    out = tmp_path / "report"

    report = compare(dirs, out)

    assert report.markdown_path == out / "report.md"
    assert sorted(p.name for p in out.iterdir()) == sorted(["report.md", ROUND_PLOT, UPLINK_PLOT])
    for name in (ROUND_PLOT, UPLINK_PLOT):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            assert image.size[0] > 400 and image.size[1] > 300
    md = report.markdown_path.read_text()
    assert f"]({ROUND_PLOT})" in md and f"]({UPLINK_PLOT})" in md
    assert f"Generated {report.generated:%Y-%m-%d}" in md
    for d in dirs:
        assert f"`{d}`" in md
        assert "](../runs/" + d.name + "/summary.json)" in md
    assert "| fedit r=8 | 2 | 0.6000 | 0.6000 | never |" in md  # target 0.9 * 0.7 = 0.63
    assert "| fedit r=16 | 2 | 0.7000 | 0.7000 | 2 |" in md
    terminal = render_terminal_table(report)
    for cells in run_table(report)[1]:
        assert all(cell in terminal for cell in cells)


def test_causal_lm_falls_back_to_loss(tmp_path):
    def lm_rounds(losses):
        return [
            _round(
                i,
                None,
                loss,
                10 * (i > 0),
                5 * (i > 0),
                1.0,
                err=0.1 if i else None,
                perplexity=math.exp(loss),
            )
            for i, loss in enumerate(losses)
        ]

    dirs = [
        write_run(tmp_path, "lm-a", lm_rounds([3.0, 2.5, 2.0]), task="causal-lm"),
        write_run(
            tmp_path, "lm-b", lm_rounds([3.0, 2.8, 2.6]), task="causal-lm", config={"lora.r": 4}
        ),
    ]

    report = build_report([load_run(d) for d in dirs])

    assert report.metric == "loss"
    assert report.target == pytest.approx(2.2)  # 1.1 x the best final loss
    assert [r.rounds_to_target for r in report.rows] == [2, None]
    assert [r.final_accuracy for r in report.rows] == [None, None]
    assert [r.best_loss for r in report.rows] == [2.0, 2.6]
    assert report.rows[0].final_perplexity == pytest.approx(math.exp(2.0))
    assert [r.pareto for r in report.rows] == [True, False]  # same bytes, a has lower loss
    header, rows = run_table(report)
    assert "final acc" not in header and "best loss" in header and "final ppl" in header
    assert header[3] == "rounds to ≤ 2.2"
    assert rows[1][3] == "never"
    at_boundary = build_report([load_run(d) for d in dirs], target=2.5)
    assert [r.rounds_to_target for r in at_boundary.rows] == [1, None]  # loss 2.5 <= 2.5
    assert "Metric: **loss**" in render_markdown(report, tmp_path)


def test_labels_show_only_distinguishing_keys(tmp_path):
    dirs = [
        _acc_run(tmp_path, "x", [0.3, 0.5], config={"data.partition": "dirichlet"}),
        _acc_run(
            tmp_path,
            "y",
            [0.3, 0.5],
            strategy="lora-fair",
            config={"lora-fair.residual-weight": 0.5, "output.dir": "elsewhere"},
        ),
    ]
    runs = [load_run(d) for d in dirs]
    # lora-fair.residual-weight exists in one run only: not a label
    assert [r.label for r in build_report(runs).rows] == [
        "fedit partition=dirichlet",
        "lora-fair partition=iid",
    ]
    assert [r.label for r in build_report(runs, label_keys=["lora.r"]).rows] == [
        "fedit",
        "lora-fair",
    ]
    same = [
        _acc_run(tmp_path / "p", "run", [0.3, 0.5]),
        _acc_run(tmp_path / "q", "run", [0.3, 0.5]),
    ]
    labels = [r.label for r in build_report([load_run(d) for d in same]).rows]
    assert labels == ["fedit (p/run)", "fedit (q/run)"]


def test_without_config_json_labels_come_from_summary(tmp_path):
    a = _acc_run(tmp_path, "a", [0.3, 0.5], with_config=False)
    b = _acc_run(tmp_path, "b", [0.3, 0.6], with_config=False, config={"codec.uplink": "int8"})
    run = load_run(a)
    assert run.config["codec.uplink"] == "identity" and run.seed == 0
    assert [r.label for r in build_report([run, load_run(b)]).rows] == [
        "fedit uplink=identity",
        "fedit uplink=int8",
    ]


def test_real_run_results_files(tmp_path):
    directory = tmp_path / "real"
    results = RunResults(directory, strategy="fedit", task="classification")
    results.extra.update(
        {"seed": 3, "clients": 2, "codec": {"uplink": "identity", "downlink": "identity"}}
    )
    write_config(directory, {**BASE_CONFIG, "seed": 3}, 3)
    results.add_round(_round(0, 0.40, 1.09, 0, 0, 0.0))
    results.add_round(_round(1, 0.55, 1.01, 1234, 999, 2.5, err=0.125))
    results.add_round(_round(2, 0.60, 0.95, 1234, 999, 2.0, err=0.0625, rejected=1))
    results.extra["totals"] = {"uplink_bytes": 2468, "downlink_bytes": 1998}
    results.write()

    run = load_run(directory)
    report = build_report([run])

    assert (run.strategy, run.task, run.seed) == ("fedit", "classification", 3)
    row = report.rows[0]
    assert (row.final_accuracy, row.best_accuracy, row.final_loss) == (0.60, 0.60, 0.95)
    assert (row.uplink_bytes, row.downlink_bytes, row.rejected) == (2468, 1998, 1)
    assert row.seconds == pytest.approx(4.5)
    assert row.aggregation_error == pytest.approx(0.09375)
    assert row.rounds_to_target == 1  # 0.9 * 0.6 = 0.54


@pytest.mark.parametrize(
    ("breakage", "match"),
    [
        ("no-summary", r"summary\.json: no such file"),
        ("bad-json", r"summary\.json: not valid JSON"),
        ("bad-bytes", r"summary\.json: rounds\[1\]\.uplink_bytes must be an integer, got 'abc'"),
        ("no-seconds", r"summary\.json: rounds\[0\] \(round 0\) has no 'seconds' field"),
        ("no-rounds", r"summary\.json: 'rounds' must be a non-empty list"),
        ("bad-config", r"config\.json: expected an object with a 'config' object"),
        ("nan-loss", r"summary\.json: rounds\[1\]\.loss must be a finite number"),
    ],
)
def test_malformed_run_dir_names_the_file(tmp_path, breakage, match):
    d = _acc_run(tmp_path, "broken", [0.3, 0.5])
    summary = json.loads((d / "summary.json").read_text())
    if breakage == "no-summary":
        (d / "summary.json").unlink()
    elif breakage == "bad-json":
        (d / "summary.json").write_text('{"strategy": "fedit", "rounds": [')
    elif breakage == "bad-config":
        (d / "config.json").write_text("[1, 2]")
    else:
        if breakage == "bad-bytes":
            summary["rounds"][1]["uplink_bytes"] = "abc"
        elif breakage == "no-seconds":
            del summary["rounds"][0]["seconds"]
        elif breakage == "no-rounds":
            summary["rounds"] = []
        elif breakage == "nan-loss":
            summary["rounds"][1]["loss"] = float("nan")
        (d / "summary.json").write_text(json.dumps(summary))

    with pytest.raises(FedPeftError, match=match) as info:
        load_run(d)
    assert str(d) in str(info.value)


def test_compare_rejects_missing_or_repeated_dirs(tmp_path):
    a = _acc_run(tmp_path, "a", [0.3, 0.5])
    with pytest.raises(FedPeftError, match="not a directory"):
        compare([tmp_path / "nope"], tmp_path / "out")
    with pytest.raises(FedPeftError, match="given more than once"):
        compare([a, tmp_path / "a"], tmp_path / "out")
    with pytest.raises(FedPeftError, match="at least one run"):
        build_report([])
    with pytest.raises(FedPeftError, match=r"target must be an accuracy in \(0, 1\].*got 90"):
        build_report([load_run(a)], target=90)


def test_groups_never_mix_configs_hidden_by_label_keys(tmp_path):
    dirs = [
        _acc_run(
            tmp_path, f"{codec}-s{s}", [0.3, 0.5 + 0.1 * s], seed=s, config={"codec.uplink": codec}
        )
        for codec in ("identity", "int8")
        for s in (0, 1)
    ]

    report = build_report([load_run(d) for d in dirs], label_keys=["data.partition"])

    assert report.rows[0].label == "fedit seed=0 (identity-s0)"
    assert [g.label for g in report.groups] == [
        "fedit (identity-s0, identity-s1)",
        "fedit (int8-s0, int8-s1)",
    ]
    assert [g.run_indices for g in report.groups] == [(0, 1), (2, 3)]
