"""simulations/bench_robust.py: every rule is timed on the same inputs, and the inputs
are what the docstring says (the selecting rules find the sign-flipped 20 %)."""

from __future__ import annotations

from tests.support.scripts import load_script

bench = load_script("bench_robust")


def test_every_rule_is_timed_against_the_plain_mean_and_the_selections_find_the_attackers(capsys):
    rows = bench.main(["--clients", "10", "--repeats", "1"])
    assert [r["rule"] for r in rows] == [
        "none", "clip", "median", "trimmed-mean:0.2", "geomed", "krum:2", "multi-krum:2", "cosine-filter:0",
    ]
    assert rows[0]["ratio"] == 1.0 and all(r["seconds"] > 0 for r in rows)
    left_out = {r["rule"]: r["left_out"] for r in rows}
    assert left_out["multi-krum:2"] == [1, 2] and left_out["cosine-filter:0"] == [1, 2]  # the two attackers
    kept = set(range(1, 11)) - set(left_out["krum:2"])
    assert len(kept) == 1 and kept <= set(range(3, 11))  # Krum keeps one honest update
    assert all(not left_out[r] for r in ("none", "clip", "median", "trimmed-mean:0.2", "geomed"))
    assert "| 10 | multi-krum:2 |" in capsys.readouterr().out


def test_updates_carry_a_shared_direction_that_the_attackers_negate():
    import torch

    global_tensors, updates = bench.updates_for(10)
    change = [torch.cat([(u.tensors[k] - u.received[k]).flatten() for k in global_tensors]) for u in updates]
    norms = [float(c.norm()) for c in change]
    assert all(1.1 < n < 1.5 for n in norms)  # ≈ 1.3, the attack matrix's median honest norm
    honest_mean = torch.stack(change[2:]).mean(dim=0)
    cos = [float(c @ honest_mean / (c.norm() * honest_mean.norm())) for c in change]
    assert cos[0] < 0 and cos[1] < 0 and all(c > 0 for c in cos[2:])
