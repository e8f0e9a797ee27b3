"""Ferret wire format: byte counts equal the formula, round trips, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.errors import CodecError
from fedpeft.projection import ferret, wire
from fedpeft.projection.blocks import layout_of


@pytest.fixture
def upload():
    gen = torch.Generator().manual_seed(0)
    old = {
        "w": torch.randn(50, 20, generator=gen),
        "b": torch.randn(20, generator=gen),
        "h": torch.randn(700, generator=gen),
    }
    new = {k: v - 0.1 * torch.randn(v.shape, generator=gen) for k, v in old.items()}
    layout = layout_of(old)
    config = ferret.FerretConfig(num_seeds=200)
    coeffs = ferret.encode_update(old, new, layout, pool_seed=1, client_seed=2, config=config)
    return layout, coeffs


def test_upload_bytes_equal_formula(upload):
    layout, coeffs = upload
    arrays = wire.encode_coefficients(coeffs)
    measured = sum(a.nbytes for a in arrays.values())
    budgets = coeffs.budgets
    assert measured == wire.upload_nbytes(budgets) == 6 * sum(budgets) + 4 * (len(budgets) + 1)
    assert arrays["indices"].dtype == np.uint16 and arrays["values"].dtype == np.float32


def test_upload_round_trip(upload):
    layout, coeffs = upload
    back = wire.decode_coefficients(
        wire.encode_coefficients(coeffs), num_blocks=layout.num_blocks, num_seeds=200
    )
    assert back.budgets == coeffs.budgets
    assert (back.indices == coeffs.indices).all() and (back.values == coeffs.values).all()
    assert torch.equal(back.table(), coeffs.table())


def test_downlink_bytes_and_round_trip():
    gen = torch.Generator().manual_seed(1)
    updates = [
        ferret.RoundUpdate(t, 1000 + t, torch.randn(3, 50, generator=gen), 10.0 - t) for t in (4, 5)
    ]
    arrays = wire.encode_round_updates(updates)
    assert sum(a.nbytes for a in arrays.values()) == wire.downlink_nbytes(3, 50, 2)
    back = wire.decode_round_updates(arrays)
    for u, v in zip(updates, back, strict=True):
        assert (u.server_round, u.pool_seed, u.server_lr) == (
            v.server_round,
            v.pool_seed,
            v.server_lr,
        )
        assert torch.equal(u.gamma, v.gamma)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("values", lambda a: a["values"].astype(np.float64), "expected 1-d float32"),
        ("indices", lambda a: np.full_like(a["indices"], 250), "pool index 250"),
        ("indices", lambda a: a["indices"][::-1].copy(), "increase strictly"),
        ("offsets", lambda a: a["offsets"][:-1].copy(), "expected num_blocks"),
        ("values", lambda a: np.full_like(a["values"], np.inf), "non-finite"),
    ],
)
def test_decode_rejects_broken_uploads(upload, field, value, message):
    layout, coeffs = upload
    arrays = wire.encode_coefficients(coeffs)
    arrays[field] = value(arrays)
    with pytest.raises(CodecError, match=message):
        wire.decode_coefficients(arrays, num_blocks=layout.num_blocks, num_seeds=200)
