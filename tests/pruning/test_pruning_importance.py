"""LoRAPrune-style importance (ALGORITHMS.md §11 test 3)."""

from __future__ import annotations

import pytest
import torch

from fedpeft.lora.factors import LoraFactors
from fedpeft.pruning.blocks import AttentionBlock, FFNBlock, Projection
from fedpeft.pruning.importance import (
    channel_scores,
    element_scores,
    ema_update,
    head_scores,
    lora_weight_change,
    normalize_scores,
)


def rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def lora_proj(
    gen: torch.Generator, d_out: int, d_in: int, zero_grads: bool = False
) -> Projection:
    a, b = rand(gen, 2, d_in), rand(gen, d_out, 2)
    grad_a, grad_b = rand(gen, 2, d_in), rand(gen, d_out, 2)
    if zero_grads:
        grad_a, grad_b = torch.zeros_like(grad_a), torch.zeros_like(grad_b)
    return Projection(
        weight=rand(gen, d_out, d_in),
        lora=LoraFactors(a=a, b=b, scaling=2.0),
        grad_a=grad_a,
        grad_b=grad_b,
    )


def test_element_scores_match_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    p = lora_proj(gen, 5, 3)
    assert p.lora is not None and p.grad_a is not None and p.grad_b is not None
    a, b, ga, gb = p.lora.a, p.lora.b, p.grad_a, p.grad_b

    expected_g = torch.zeros(5, 3, dtype=torch.float64)
    for i in range(5):
        for j in range(3):
            for k in range(2):
                expected_g[i, j] += (
                    gb[i, k] * a[k, j] + b[i, k] * ga[k, j] - gb[i, k] * ga[k, j]
                )
    expected = (expected_g * (p.weight + 2.0 * b @ a)).abs()

    torch.testing.assert_close(lora_weight_change(a, b, ga, gb), expected_g)
    torch.testing.assert_close(element_scores(p), expected)


def test_zero_gradients_give_zero_scores() -> None:
    gen = torch.Generator().manual_seed(1)
    block = AttentionBlock(
        q=lora_proj(gen, 8, 6, True),
        k=lora_proj(gen, 8, 6, True),
        v=lora_proj(gen, 8, 6, True),
        o=lora_proj(gen, 6, 8, True),
        head_dim=2,
    )
    ffn = FFNBlock(up=lora_proj(gen, 7, 6, True), down=lora_proj(gen, 6, 7, True))

    assert torch.equal(head_scores(block), torch.zeros(4, dtype=torch.float64))
    assert torch.equal(channel_scores(ffn), torch.zeros(7, dtype=torch.float64))
    assert torch.equal(
        normalize_scores(head_scores(block)), torch.zeros(4, dtype=torch.float64)
    )


def test_group_sums() -> None:
    gen = torch.Generator().manual_seed(2)
    q, k, v = lora_proj(gen, 8, 6), lora_proj(gen, 4, 6), lora_proj(gen, 4, 6)
    o = Projection(weight=rand(gen, 6, 8))  # no LoRA: contributes nothing
    block = AttentionBlock(q=q, k=k, v=v, o=o, head_dim=2)  # 4 heads, 2 K/V groups
    sq, sk, sv = (element_scores(p).sum(dim=1) for p in (q, k, v))  # type: ignore[union-attr]

    expected = torch.stack(
        [
            sq[0:4].sum() + sk[0:2].sum() + sv[0:2].sum(),
            sq[4:8].sum() + sk[2:4].sum() + sv[2:4].sum(),
        ]
    )
    torch.testing.assert_close(head_scores(block), expected)

    up, down = lora_proj(gen, 5, 6), lora_proj(gen, 6, 5)
    ffn = FFNBlock(up=up, down=down)
    expected_c = element_scores(up).sum(dim=1) + element_scores(down).sum(dim=0)  # type: ignore[union-attr]
    torch.testing.assert_close(channel_scores(ffn), expected_c)


def test_normalize_and_ema_formula() -> None:
    s = torch.tensor([3.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(
        normalize_scores(s), torch.tensor([0.6, 0.8], dtype=torch.float64)
    )

    prev = torch.tensor([1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(ema_update(prev, s), 0.9 * prev + 0.1 * s)
    torch.testing.assert_close(ema_update(None, s, beta=0.5), 0.5 * s)
    with pytest.raises(ValueError, match="slice the EMA"):
        ema_update(prev, torch.zeros(3, dtype=torch.float64))
