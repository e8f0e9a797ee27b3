"""Head / channel masks on plain tensors: mask equivalence (§11 tests 1-2)."""

from __future__ import annotations

import pytest
import torch

from fedpeft.lora.factors import LoraFactors
from fedpeft.pruning.blocks import (
    AttentionBlock,
    FFNBlock,
    Projection,
    group_indices,
    prune_attention,
    prune_ffn,
)

D_MODEL, HEAD_DIM = 10, 3


def proj(
    gen: torch.Generator, d_out: int, d_in: int, bias: bool = True, rank: int = 2
) -> Projection:
    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return Projection(
        weight=rand(d_out, d_in),
        bias=rand(d_out) if bias else None,
        lora=LoraFactors(a=rand(rank, d_in), b=rand(d_out, rank), scaling=0.5),
        grad_a=rand(rank, d_in),
        grad_b=rand(d_out, rank),
    )


def linear(p: Projection, x: torch.Tensor) -> torch.Tensor:
    assert p.lora is not None
    w = p.weight + p.lora.delta()  # (d_out, d_in)
    y = x @ w.T  # (T, d_in) @ (d_in, d_out)
    return y + p.bias if p.bias is not None else y


def attention(
    block: AttentionBlock, x: torch.Tensor, zero_groups: tuple[int, ...] = ()
) -> torch.Tensor:
    """Reference grouped-query attention; optionally zero some groups' outputs."""
    t = x.shape[0]
    g, h, d = block.num_groups, block.num_heads, block.head_dim
    q = linear(block.q, x).reshape(t, h, d).transpose(0, 1)  # (H, T, d)
    k = linear(block.k, x).reshape(t, g, d).transpose(0, 1)  # (G, T, d)
    v = linear(block.v, x).reshape(t, g, d).transpose(0, 1)  # (G, T, d)
    k = k.repeat_interleave(h // g, dim=0)  # (H, T, d)
    v = v.repeat_interleave(h // g, dim=0)  # (H, T, d)
    probs = torch.softmax(q @ k.transpose(1, 2) / d**0.5, dim=-1)  # (H, T, T)
    heads = probs @ v  # (H, T, d)
    for group in zero_groups:
        heads[group * (h // g) : (group + 1) * (h // g)] = 0.0
    return linear(block.o, heads.transpose(0, 1).reshape(t, h * d))  # (T, d_model)


def make_attention(gen: torch.Generator, heads: int, groups: int) -> AttentionBlock:
    return AttentionBlock(
        q=proj(gen, heads * HEAD_DIM, D_MODEL),
        k=proj(gen, groups * HEAD_DIM, D_MODEL),
        v=proj(gen, groups * HEAD_DIM, D_MODEL),
        o=proj(gen, D_MODEL, heads * HEAD_DIM),
        head_dim=HEAD_DIM,
    )


@pytest.mark.parametrize(("heads", "groups"), [(4, 4), (6, 2)])
def test_pruned_heads_equal_zeroed_heads(heads: int, groups: int) -> None:
    gen = torch.Generator().manual_seed(0)
    block = make_attention(gen, heads, groups)
    x = torch.randn(5, D_MODEL, generator=gen, dtype=torch.float64)
    keep = torch.ones(groups, dtype=torch.bool)
    keep[1] = False

    pruned = prune_attention(block, keep)

    assert (
        pruned.num_groups == groups - 1 and pruned.num_heads == heads - heads // groups
    )
    assert pruned.q.lora is not None and pruned.o.lora is not None
    assert pruned.q.lora.b.shape == (pruned.num_heads * HEAD_DIM, 2)
    assert pruned.o.lora.a.shape == (2, pruned.num_heads * HEAD_DIM)
    assert (
        pruned.q.grad_b is not None and pruned.q.grad_b.shape == pruned.q.lora.b.shape
    )
    assert pruned.o.weight.shape == (D_MODEL, pruned.num_heads * HEAD_DIM)
    torch.testing.assert_close(
        attention(pruned, x), attention(block, x, zero_groups=(1,)), atol=1e-6, rtol=0
    )


def test_pruned_channels_equal_zeroed_channels() -> None:
    gen = torch.Generator().manual_seed(1)
    block = FFNBlock(
        up=proj(gen, 12, D_MODEL),
        down=proj(gen, D_MODEL, 12),
        gate=proj(gen, 12, D_MODEL),
    )
    x = torch.randn(4, D_MODEL, generator=gen, dtype=torch.float64)
    keep = torch.ones(12, dtype=torch.bool)
    keep[[0, 5, 11]] = False

    def ffn(b: FFNBlock, zero: torch.Tensor | None = None) -> torch.Tensor:
        assert b.gate is not None
        hidden = torch.nn.functional.silu(linear(b.gate, x)) * linear(
            b.up, x
        )  # (T, d_ff)
        if zero is not None:
            hidden = hidden * zero
        return linear(b.down, hidden)

    pruned = prune_ffn(block, keep)

    assert pruned.num_channels == 9 and pruned.down.weight.shape == (D_MODEL, 9)
    assert pruned.down.bias is not None and pruned.down.bias.shape == (D_MODEL,)
    torch.testing.assert_close(
        ffn(pruned), ffn(block, keep.double()), atol=1e-6, rtol=0
    )


def test_masks_are_validated() -> None:
    gen = torch.Generator().manual_seed(2)
    block = make_attention(gen, 4, 4)
    with pytest.raises(ValueError, match="keep at least one"):
        prune_attention(block, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"must be \(4,\)"):
        prune_attention(block, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="multiple of head_dim"):
        AttentionBlock(
            q=block.q, k=proj(gen, 4, D_MODEL), v=block.v, o=block.o, head_dim=3
        )


def test_group_indices() -> None:
    keep = torch.tensor([True, False, True])
    assert group_indices(keep, 2).tolist() == [0, 1, 4, 5]
