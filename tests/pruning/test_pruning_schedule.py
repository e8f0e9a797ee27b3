"""Selection of structures and the sparsity schedule (ALGORITHMS.md §11 test 2)."""

from __future__ import annotations

import pytest
import torch

from fedpeft.pruning.schedule import (
    compose_keep,
    cubic_sparsity,
    num_to_prune,
    protected_layers,
    round_sparsity_goal,
    select_prune,
    select_prune_count,
    structure_sparsity,
)


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.29, 0.5, 0.99, 1.0])
def test_ratio_removes_floor_fraction_min_one_kept(ratio: float) -> None:
    gen = torch.Generator().manual_seed(0)
    scores = {i: torch.rand(n, generator=gen) for i, n in enumerate((12, 7, 100))}

    for scope in ("layer", "global"):
        keep = select_prune(scores, ratio, scope=scope)  # type: ignore[arg-type]
        if scope == "layer":
            for i, s in scores.items():
                expected = min(int(ratio * s.numel() + 1e-9), s.numel() - 1)
                assert int((~keep[i]).sum()) == expected
        else:
            removed = sum(int((~m).sum()) for m in keep.values())
            assert removed == min(int(ratio * 119 + 1e-9), 119 - 3)
        assert all(int(m.sum()) >= 1 for m in keep.values())


def test_lowest_scores_go_and_protected_layers_are_untouched() -> None:
    scores = {
        "a": torch.tensor([0.5, 0.1, 0.9, 0.3]),
        "b": torch.tensor([0.05, 0.2]),
        "c": torch.zeros(3),
    }

    keep = select_prune_count(scores, 3, protected={"c"})

    assert keep["a"].tolist() == [True, False, True, False]
    assert keep["b"].tolist() == [False, True]
    assert keep["c"].all()
    per_layer = select_prune(scores, 0.5, protected={"c"}, scope="layer")
    assert per_layer["a"].tolist() == [True, False, True, False]
    assert per_layer["b"].tolist() == [False, True]


def test_min_keep_caps_a_layer() -> None:
    scores = {0: torch.zeros(3), 1: torch.ones(3)}
    keep = select_prune_count(scores, 4, min_keep=1)
    assert keep[0].tolist() == [False, False, True]
    assert int((~keep[1]).sum()) == 2


def test_protected_layers() -> None:
    assert protected_layers(12) == frozenset({0, 11})
    assert protected_layers(32) == frozenset({0, 1, 2, 31})
    assert protected_layers(2, protect_last=False) == frozenset()


def test_cubic_schedule_and_round_goal() -> None:
    values = [cubic_sparsity(k, 100, 0.1, 0.4) for k in range(0, 101, 10)]
    assert values[0] == pytest.approx(0.1) and values[-1] == pytest.approx(0.4)
    assert all(a < b for a, b in zip(values, values[1:], strict=False))
    assert cubic_sparsity(50, 100, 0.0, 0.8) == pytest.approx(0.8 - 0.8 * 0.5**3)
    assert round_sparsity_goal(0.2, 0.25, 0.5) == pytest.approx(0.4)
    assert round_sparsity_goal(0.4, 0.3, 0.5) == 0.5


def test_simulated_rounds_are_monotone_and_reach_target() -> None:
    gen = torch.Generator().manual_seed(3)
    layers, heads, target, interval, steps = 6, 8, 0.5, 20, 100
    protected = protected_layers(layers, first_fraction=0.2)
    prunable = (layers - len(protected)) * heads
    kept = {i: torch.ones(heads, dtype=torch.bool) for i in range(layers)}
    history = [0.0]
    for _ in range(6):
        s_prev = history[-1]
        goal = round_sparsity_goal(s_prev, 0.3, target)
        for step in range(interval, steps + 1, interval):
            s_now = cubic_sparsity(step, steps, s_prev, goal)
            current = {
                i: torch.rand(int(m.sum()), generator=gen) for i, m in kept.items()
            }
            num_kept = sum(int(kept[i].sum()) for i in kept if i not in protected)
            count = num_to_prune(s_now, prunable, num_kept)
            masks = select_prune_count(current, count, protected)
            kept = {i: compose_keep(kept[i], masks[i]) for i in kept}
            history.append(structure_sparsity(kept, protected))
            for i in protected:
                assert kept[i].all()
    assert all(a <= b for a, b in zip(history, history[1:], strict=False))
    assert history[-1] == pytest.approx(int(target * prunable) / prunable)


def test_compose_keep() -> None:
    prev = torch.tensor([True, False, True, True])
    assert compose_keep(prev, torch.tensor([True, False, True])).tolist() == [
        True,
        False,
        False,
        True,
    ]
    with pytest.raises(ValueError, match="structures are kept"):
        compose_keep(prev, torch.ones(4, dtype=torch.bool))
