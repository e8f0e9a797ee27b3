"""Ferret block partition: the reference grouping rule and flatten/split round trips."""

from __future__ import annotations

import pytest
import torch

from fedpeft.errors import ConfigError, IncompatibleUpdateError
from fedpeft.projection.blocks import layout_of, partition_blocks


def test_rule_matches_reference_grouping():
    # median(1, 1, 1, 3, 4, 10, 10, 10) = 3.5 -> target int(0.9 * 3.5) = 3
    entries = [("a", 10), ("b", 10), ("c", 1), ("d", 1), ("e", 1), ("f", 10), ("g", 3), ("h", 4)]
    layout = partition_blocks(entries)
    assert [b.names for b in layout.blocks] == [
        ("a",),
        ("b",),
        ("c", "d", "e"),
        ("f",),
        ("g",),
        ("h",),
    ]
    assert layout.sizes == (10, 10, 3, 10, 3, 4)
    assert [b.index for b in layout.blocks] == list(range(6))


def test_small_tensors_merge_and_large_tensors_stand_alone():
    # A MiniLM-like layer: weight matrices with biases / LayerNorms in between.
    entries = []
    for i in range(3):
        entries += [
            (f"l{i}.q.w", 384 * 384),
            (f"l{i}.q.b", 384),
            (f"l{i}.ln.w", 384),
            (f"l{i}.ln.b", 384),
            (f"l{i}.ff.w", 384 * 1536),
            (f"l{i}.ff.b", 1536),
        ]
    layout = partition_blocks(entries)
    assert layout.names == tuple(n for n, _ in entries)  # order kept, every tensor once
    assert sum(layout.sizes) == sum(k for _, k in entries)
    target = int(0.9 * 1536 / 2 + 0.9 * 384 / 2)  # median of 18 sizes = (384 + 1536) / 2
    for block in layout.blocks:
        assert len(block.names) == 1 or block.size <= target


def test_vector_and_split_round_trip():
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(3, 5, generator=gen),
        "b": torch.randn(5, generator=gen),
        "v": torch.randn(2, 2, generator=gen),
    }
    layout = layout_of(tensors)
    for index in range(layout.num_blocks):
        vec = layout.vector(tensors, index)
        assert vec.dtype == torch.float64 and vec.shape == (layout.sizes[index],)
        for name, piece in layout.split(vec, index, tensors).items():
            assert torch.equal(piece.float(), tensors[name])


def test_mismatched_tensors_are_named():
    layout = partition_blocks([("w", 6), ("b", 2)])
    with pytest.raises(IncompatibleUpdateError, match=r"'w' has 4 elements, layout expects 6"):
        layout.check({"w": torch.zeros(4), "b": torch.zeros(2)})
    with pytest.raises(IncompatibleUpdateError, match=r"missing \['b'\]"):
        layout.check({"w": torch.zeros(6)})


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([], "no tensors"),
        ([("a", 1), ("a", 2)], "duplicate tensor names"),
        ([("a", 0)], "sizes must be >= 1"),
    ],
)
def test_invalid_entries(entries, message):
    with pytest.raises(ConfigError, match=message):
        partition_blocks(entries)
