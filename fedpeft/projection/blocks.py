"""Partition of a flat list of trainable tensors into Ferret projection blocks.

Ferret projects each block ``l`` of the flattened update separately (its own ``d_l`` and
budget ``K_l``). The rule is the authors' (``FerretFramework._group_parameters`` in
``allen4747/Ferret``, ALGORITHMS.md §10 [CODE]): walk the tensors in the caller's order
with ``target = ⌊0.9 · median(numel)⌋`` and start a new block whenever adding the next
tensor would take the current block above ``target``; a tensor larger than ``target``
is therefore a block of its own, and runs of small tensors (biases, LayerNorms) are
merged. The order of the ``(name, numel)`` list is part of the protocol: client and
server must build the layout from the same list.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedpeft.errors import ConfigError, IncompatibleUpdateError
from fedpeft.types import TensorDict


@dataclass(frozen=True)
class Block:
    """One projection block: consecutive tensors flattened and concatenated.

    Attributes:
        index: position ``l`` of the block in the layout.
        names: tensor names, in order.
        numels: element counts of those tensors.
    """

    index: int
    names: tuple[str, ...]
    numels: tuple[int, ...]

    @property
    def size(self) -> int:
        """``d_l``: elements in the block."""
        return sum(self.numels)


@dataclass(frozen=True)
class BlockLayout:
    """An ordered partition of named tensors into blocks.

    Attributes:
        blocks: the blocks in order; together they cover every tensor exactly once.
    """

    blocks: tuple[Block, ...]

    @property
    def num_blocks(self) -> int:
        """``L``."""
        return len(self.blocks)

    @property
    def sizes(self) -> tuple[int, ...]:
        """``(d_1, …, d_L)``."""
        return tuple(b.size for b in self.blocks)

    @property
    def names(self) -> tuple[str, ...]:
        """Every tensor name in layout order."""
        return tuple(n for b in self.blocks for n in b.names)

    def check(self, tensors: Mapping[str, torch.Tensor], what: str = "tensors") -> None:
        """Raise ``IncompatibleUpdateError`` unless ``tensors`` match names and sizes."""
        known = set(self.names)
        missing = [n for n in self.names if n not in tensors]
        extra = [n for n in tensors if n not in known]
        wrong = [
            f"{n!r} has {tensors[n].numel()} elements, layout expects {k}"
            for b in self.blocks
            for n, k in zip(b.names, b.numels, strict=True)
            if n in tensors and tensors[n].numel() != k
        ]
        if missing or extra or wrong:
            parts = []
            if missing:
                parts.append(f"missing {missing[:3]}")
            if extra:
                parts.append(f"unexpected {extra[:3]}")
            parts.extend(wrong[:3])
            raise IncompatibleUpdateError(
                f"{what} do not match the Ferret block layout ({self.num_blocks} blocks, "
                f"{len(self.names)} tensors): " + "; ".join(parts)
            )

    def vector(
        self,
        tensors: Mapping[str, torch.Tensor],
        index: int,
        dtype: torch.dtype = torch.float64,
    ) -> torch.Tensor:
        """Block ``index`` of ``tensors`` as one flat CPU vector ``(d_l,)`` of ``dtype``."""
        block = self.blocks[index]
        return torch.cat(
            [tensors[n].detach().reshape(-1).to("cpu", dtype) for n in block.names]
        )  # (d_l,)

    def split(
        self, vector: torch.Tensor, index: int, like: Mapping[str, torch.Tensor]
    ) -> TensorDict:
        """Cut a flat ``(d_l,)`` vector back into block ``index``'s tensors.

        Shapes come from ``like``; the dtype stays the vector's.
        """
        block = self.blocks[index]
        if vector.numel() != block.size:
            raise IncompatibleUpdateError(
                f"block {index} vector has {vector.numel()} elements, expected {block.size}"
            )
        out: TensorDict = {}
        for name, piece in zip(block.names, vector.split(list(block.numels)), strict=True):
            out[name] = piece.reshape(like[name].shape)
        return out


def partition_blocks(entries: Sequence[tuple[str, int]], ratio: float = 0.9) -> BlockLayout:
    """Group ``(name, numel)`` entries into blocks by the Ferret rule.

    Args:
        entries: trainable tensors in protocol order (e.g. ``named_parameters`` order).
        ratio: the target block size as a fraction of the median tensor size (0.9).

    Returns:
        The layout; ``sum(layout.sizes) == sum(numel)``.
    """
    if not entries:
        raise ConfigError("partition_blocks got no tensors; expected at least one")
    if not ratio > 0.0:
        raise ConfigError(f"block ratio must be > 0, got {ratio}")
    names = [n for n, _ in entries]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"partition_blocks got duplicate tensor names {dup[:3]}")
    bad = [(n, k) for n, k in entries if k < 1]
    if bad:
        raise ConfigError(f"tensor sizes must be >= 1, got {bad[:3]}")
    target = int(ratio * statistics.median(k for _, k in entries))
    groups: list[list[tuple[str, int]]] = []
    current: list[tuple[str, int]] = []
    filled = 0
    for name, numel in entries:
        if current and filled + numel > target:
            groups.append(current)
            current, filled = [], 0
        current.append((name, numel))
        filled += numel
    groups.append(current)
    return BlockLayout(
        tuple(
            Block(i, tuple(n for n, _ in g), tuple(k for _, k in g)) for i, g in enumerate(groups)
        )
    )


def layout_of(tensors: Mapping[str, torch.Tensor], ratio: float = 0.9) -> BlockLayout:
    """``partition_blocks`` over a tensor dict in its iteration order."""
    return partition_blocks([(n, t.numel()) for n, t in tensors.items()], ratio)
