"""simulations/attack_matrix.py: the quick matrix runs end to end and writes its table;
the cell logic (difference to clean, the issue's goal lines) on synthetic summaries;
defence parameters follow the attacker count."""

from __future__ import annotations

import json
import math

import pytest

from tests.support.scripts import load_script

matrix = load_script("attack_matrix")


# -- defence parameters -----------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.3, 0.4])
def test_trimmed_mean_trims_as_many_values_per_side_as_there_are_attackers(rate):
    from fedpeft.config import parse_robust

    m = matrix.attacker_count(rate, 10)
    spec, keys, note = matrix.defence_keys("trimmed-mean", m, 10, None)
    beta = parse_robust(keys["aggregation.robust"]).param
    assert int(beta * 10) == m and beta >= m / 10 and beta < 0.5 and not note  # fedpeft trims int(β·n)
    assert spec == f"trimmed-mean:{rate:g}"


def test_trimmed_beta_is_nudged_up_when_the_product_rounds_down():
    beta = matrix.trimmed_beta(29, 100)  # 0.29 * 100 == 28.999999999999996
    assert int(beta * 100) == 29 and beta == pytest.approx(0.29)


def test_trimmed_mean_cannot_remove_half_the_clients():
    with pytest.raises(ValueError, match="β < 0.5"):
        matrix.defence_keys("trimmed-mean", 5, 10, None)


@pytest.mark.parametrize("defence", ["krum", "multi-krum"])
def test_krum_f_is_the_attacker_count_up_to_what_krum_accepts(defence):
    assert matrix.attacker_count(0.2, 10) == 2 and matrix.attacker_count(0.4, 10) == 4
    spec, keys, note = matrix.defence_keys(defence, 2, 10, None)
    assert keys == {"aggregation.robust": f"{defence}:2"} and spec == f"{defence}:2" and not note
    # 4 of 10: Krum needs n > 2f + 2, so f = 3 at most, and the report says so
    spec, keys, note = matrix.defence_keys(defence, 4, 10, None)
    assert keys == {"aggregation.robust": f"{defence}:3"} and "3 < 4 attackers" in note


def test_every_defence_at_every_rate_passes_fedpeft_s_own_checks():
    from fedpeft.config import parse_run_config
    from fedpeft.server.setup import build_strategy

    for rate in (0.0, 0.2, 0.4):
        for defence in matrix.DEFENCES:
            _, keys, _ = matrix.defence_keys(defence, matrix.attacker_count(rate, 10), 10, 1.0)
            cfg = parse_run_config({"federation.clients": 10, "faults.byzantine-rate": rate,
                                    "faults.attack": "sign-flip", **keys})
            build_strategy(cfg)  # raises ConfigError on a refused combination


def test_the_clip_norm_is_the_median_honest_norm_and_other_defences_ignore_it():
    assert matrix.clip_from([3.0, 1.0, 2.0, 10.0]) == 2.5 and matrix.clip_from([]) is None
    assert matrix.defence_keys("clip", 2, 10, 2.5)[1] == {"validation.clip-norm": 2.5}
    with pytest.raises(ValueError):
        matrix.defence_keys("clip", 2, 10, None)
    assert matrix.defence_keys("median", 4, 10, None)[1] == {"aggregation.robust": "median"}
    assert matrix.defence_keys("none", 4, 10, None)[1] == {}


# -- cell logic on synthetic summaries ----------------------------------------------------


def summary(acc, asr=None, rejected=(0, 0), kept=None, seconds=2.0, client_seconds=0.5, flip=None):
    """A two-round summary: final accuracy, backdoor ASR and flip (default: the ASR),
    per-round rejections, the partitions kept (default all of 0..9)."""
    flip = asr if flip is None else flip
    kept = list(range(10)) if kept is None else kept
    rounds = [{"round": 0, "accuracy": 0.3, "seconds": 0.0}]
    for r, rej in enumerate(rejected, start=1):
        rounds.append({
            "round": r, "accuracy": acc, "rejected": rej, "seconds": seconds,
            "clients": [{"partition_id": p, "client_seconds": client_seconds} for p in kept],
            **({"backdoor_asr": asr, "backdoor_flip": flip} if asr is not None else {}),
        })
    return {"clients": 10, "rounds": rounds}


def test_the_difference_to_clean_is_paired_by_seed():
    clean = {0: summary(0.60), 1: summary(0.70), 2: summary(0.65)}
    runs = {"0": summary(0.59), "1": summary(0.66), "2": summary(0.64)}  # JSON keys are strings
    s = matrix.cell_stats(runs, clean)
    diffs = [-0.01, -0.04, -0.01]
    mean, half = matrix.paired(diffs)
    assert s["delta"] == pytest.approx(mean) and s["half"] == pytest.approx(half)
    assert s["accuracy"] == pytest.approx((0.59 + 0.66 + 0.64) / 3) and s["seeds"] == ["0", "1", "2"]
    assert s["asr"] is None
    one = matrix.cell_stats({0: summary(0.5)}, clean)
    assert one["delta"] == pytest.approx(-0.1) and math.isnan(one["half"])


def test_rejections_split_into_attackers_and_honest_clients():
    # round 1 drops attackers 3 and 7, round 2 drops attacker 3 and honest 5
    s1 = summary(0.6, rejected=(2, 2), kept=[0, 1, 2, 4, 5, 6, 8, 9])
    s1["rounds"][2]["clients"] = [{"partition_id": p, "client_seconds": 0.5} for p in (0, 1, 2, 4, 6, 7, 8, 9)]
    s = matrix.cell_stats({0: s1}, {0: summary(0.6)}, {0: [3, 7]})
    assert s["rejected"] == 4 and s["rejected_attackers"] == 3
    assert matrix._rejected(s) == "3 / 1"


def test_server_seconds_are_the_round_minus_the_clients():
    s = summary(0.6, seconds=7.0, client_seconds=0.5)  # 10 clients × 0.5 s
    assert matrix.server_seconds(s) == pytest.approx(2.0)


def test_the_attack_goal_needs_two_points_and_under_the_backdoor_a_flip_below_ten_percent():
    clean = {0: summary(0.60)}
    close = matrix.cell_stats({0: summary(0.585, asr=0.45, flip=0.05)}, clean)  # a high ASR alone does not fail
    far = matrix.cell_stats({0: summary(0.57, asr=0.05)}, clean)
    leaky = matrix.cell_stats({0: summary(0.60, asr=0.12)}, clean)
    assert close["asr"] == 0.45 and close["flip"] == 0.05
    assert matrix.meets_attack_goal(close, backdoor=True) and matrix.meets_attack_goal(close, backdoor=False)
    assert not matrix.meets_attack_goal(far, backdoor=False)
    assert not matrix.meets_attack_goal(leaky, backdoor=True) and matrix.meets_attack_goal(leaky, backdoor=False)
    cells = {"none": matrix.cell_stats({0: summary(0.62, asr=0.9)}, clean), "median": leaky,
             "krum:2": close, "geomed": far}
    # the most accurate defence meeting the goal; "none" is no defence even when it is best
    assert matrix.best_defence(cells, backdoor=True) == ("krum:2", True)
    assert matrix.best_defence(cells, backdoor=False) == ("median", True)
    assert matrix.best_defence({"geomed": far}, backdoor=False) == ("geomed", False)


def test_the_cost_goal_is_one_point_on_clean_data():
    clean = {0: summary(0.60)}
    assert matrix.meets_cost_goal(matrix.cell_stats({0: summary(0.591)}, clean))
    assert not matrix.meets_cost_goal(matrix.cell_stats({0: summary(0.585)}, clean))


def test_the_report_marks_the_goal_at_20_percent_and_reports_40_percent_as_measured():
    clean = {"0": summary(0.60, asr=0.3)}
    cell = lambda acc, asr=None, **kw: {"defence": "median", "spec": "median", "note": "", "runs": {"0": summary(acc, asr)},  # noqa: E731
                                        "attackers": {"0": [3, 7]}, **kw}
    results = {
        "budget": matrix.budget(matrix.parser().parse_args([])), "seeds": [0], "rates": [0.2, 0.4],
        "defences": ["none", "median"], "clip_norm": {"0": 1.5},
        "clean": {"none": {"defence": "none", "note": "", "runs": clean},
                  "median": {"defence": "median", "note": "", "runs": {"0": summary(0.585, asr=0.2)}}},
        "attacked": {
            "0.2": {"backdoor": {"none": cell(0.55, 0.9, spec="none"), "median": cell(0.59, 0.05)}},
            "0.4": {"backdoor": {"none": cell(0.50, 0.95, spec="none"), "median": cell(0.52, 0.6)}},
        },
    }
    text = matrix.render(results)
    assert "ASR / flip of the trigger without any attacker 0.300 / 0.300" in text and "seed 0: 1.5" in text
    assert "| median | 0.585 ± 0.000 | -0.015 | 0.200 / 0.200 | 0 |" in text and "| **no** |" in text  # cost > 1 point
    assert "| backdoor | median | -0.010, ASR / flip 0.050 / 0.050 | **met** |" in text
    assert "| backdoor | median | -0.080, ASR / flip 0.600 / 0.600 | outside |" in text
    assert "Reported as measured" in text
    assert "| backdoor | -0.050 (0.900) | -0.010 (0.050) |" in text


def _scheduled(monkeypatch, tmp_path, *options):
    """The run directories ``main`` would run with ``options`` (nothing trains)."""
    ran = []

    def fake(flat, out, record_norms=False):
        ran.append(out.relative_to(tmp_path / "runs").as_posix())
        return {"summary": {"rounds": [{"accuracy": 0.5}]}, "seconds": 0.0, "reused": False, "norms": [1.0]}

    monkeypatch.setattr(matrix, "run", fake)
    args = matrix.parser().parse_args(["--out", str(tmp_path), "--seeds", "0", "--rates", "0.2", *options])
    matrix.benchmark(args)
    return ran


def test_the_grid_options_drop_the_clean_costs_or_the_undefended_cells(monkeypatch, tmp_path):
    full = _scheduled(monkeypatch, tmp_path, "--attacks", "sign-flip", "--defences", "multi-krum")
    assert full == ["rate0/clean/none-seed0", "rate0/clean/multi-krum-2-seed0",
                    "rate0.2/sign-flip/none-seed0", "rate0.2/sign-flip/multi-krum-2-seed0"]
    defended = _scheduled(monkeypatch, tmp_path, "--attacks", "sign-flip", "--defences", "multi-krum",
                          "--no-costs", "--no-undefended")
    assert defended == ["rate0/clean/none-seed0", "rate0.2/sign-flip/multi-krum-2-seed0"]
    costs = _scheduled(monkeypatch, tmp_path, "--attacks", "", "--defences", "clip,krum")
    assert costs == ["rate0/clean/none-seed0", "rate0/clean/clip-seed0", "rate0/clean/krum-2-seed0"]


# -- the quick matrix, end to end ---------------------------------------------------------


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("attacks")
    results = matrix.main(["--quick", "--out", str(out)])
    return out, results


def test_the_quick_matrix_writes_every_cell_of_its_grid(quick):
    out, results = quick
    text = (out / "attacks.md").read_text()
    assert results["rates"] == [0.2] and results["attacks"] == ["scale:10", "backdoor"]
    for attack in ("scale:10", "backdoor"):
        for spec in ("none", "median", "multi-krum:2"):
            assert f"| {attack} | {spec} |" in text
    for spec in ("none", "median", "multi-krum:2"):  # the clean cost of every defence
        assert f"| {spec} |" in text
        cfg = json.loads((out / "runs" / "rate0" / "clean" / f"{spec.replace(':', '-')}-seed0" / "config.json")
                         .read_text())["config"]
        assert cfg["faults.byzantine-rate"] == 0 and cfg["faults.attack"] == "backdoor"
    assert "| ASR / flip |" in text and "ASR / flip (no attacker)" in text and "Best defence per attack" in text
    assert (out / "runs" / "rate0" / "clean" / "none-seed0" / matrix.NORMS_FILE).is_file()
    saved = json.loads((out / "attacks.json").read_text())
    assert set(saved["attacked"]["0.2"]) == {"scale:10", "backdoor"}


def test_the_quick_matrix_counts_what_multi_krum_rejects(quick):
    _, results = quick
    for attack in ("scale:10", "backdoor"):
        cell = results["attacked"]["0.2"][attack]["multi-krum"]
        s = matrix.cell_stats(cell["runs"], results["clean"]["none"]["runs"], cell["attackers"])
        assert s["rejected"] == 2 * 2  # f = 2 dropped in each of 2 rounds
        assert s["rejected_attackers"] is not None and 0 <= s["rejected_attackers"] <= s["rejected"]
        assert len(cell["attackers"][0]) == 2
        none = results["attacked"]["0.2"][attack]["none"]
        assert matrix.cell_stats(none["runs"], results["clean"]["none"]["runs"])["rejected"] == 0
    # a boosted update stands out: Multi-Krum drops the two attackers in both rounds
    cell = results["attacked"]["0.2"]["scale:10"]["multi-krum"]
    assert matrix.cell_stats(cell["runs"], {}, cell["attackers"])["rejected_attackers"] == 4
    backdoor = results["attacked"]["0.2"]["backdoor"]["none"]["runs"][0]
    assert {"backdoor_asr", "backdoor_flip"} <= set(backdoor["rounds"][-1])


def test_a_run_recorded_before_the_flip_is_rescored_from_its_last_checkpoint(quick, tmp_path):
    """A copy of a quick backdoor run with ``backdoor_flip`` removed (as runs recorded
    before fedpeft reported it): the rescoring reproduces the recorded accuracy and ASR
    from the final checkpoint, fills in the same flip as the live evaluation, and keeps
    it beside the run; a checkpoint that does not reproduce the record is refused."""
    import shutil

    out, _ = quick
    run = tmp_path / "moved"  # elsewhere than recorded: the checkpoint is found beside the run
    shutil.copytree(out / "runs" / "rate0.2" / "backdoor" / "none-seed0", run)
    live = json.loads((run / "summary.json").read_text())
    old = json.loads((run / "summary.json").read_text())
    flip = old["rounds"][-1].pop("backdoor_flip")
    filled = matrix.with_backdoor_flip(run, old)
    assert filled["rounds"][-1]["backdoor_flip"] == pytest.approx(flip, abs=1e-12)
    assert filled["rounds"][-1] == live["rounds"][-1]
    assert json.loads((run / matrix.SCORES_FILE).read_text())["backdoor_flip"] == pytest.approx(flip, abs=1e-12)
    assert json.loads((run / "summary.json").read_text()) == live  # the run's own files unchanged
    stale = {**json.loads((run / matrix.SCORES_FILE).read_text()), "backdoor_flip": 0.5, "accuracy": 0.01}
    (run / matrix.SCORES_FILE).write_text(json.dumps(stale))  # kept for another run: not used
    fresh = json.loads((run / "summary.json").read_text())
    del fresh["rounds"][-1]["backdoor_flip"]
    again = matrix.with_backdoor_flip(run, fresh)
    assert again["rounds"][-1]["backdoor_flip"] == pytest.approx(flip, abs=1e-12)
    assert json.loads((run / matrix.SCORES_FILE).read_text())["accuracy"] == live["rounds"][-1]["accuracy"]
    (run / matrix.SCORES_FILE).unlink()
    wrong = json.loads((run / "summary.json").read_text())
    del wrong["rounds"][-1]["backdoor_flip"]
    wrong["rounds"][-1]["accuracy"] += 0.01
    with pytest.raises(RuntimeError, match="recorded"):
        matrix.with_backdoor_flip(run, wrong)
    assert not (run / matrix.SCORES_FILE).exists()


def test_report_only_reuses_the_complete_runs_and_runs_nothing(quick, monkeypatch):
    import fedpeft.flower.inprocess as inprocess

    out, results = quick

    def refuse(*args, **kwargs):
        raise AssertionError("--report-only must not run anything")

    monkeypatch.setattr(inprocess, "run_in_process", refuse)
    again = matrix.main(["--quick", "--out", str(out), "--report-only"])
    assert (out / "attacks.md").read_text() == matrix.render(again)
    assert set(again["attacked"]["0.2"]) == set(results["attacked"]["0.2"])
    assert again["clip_norm"] == results["clip_norm"]
