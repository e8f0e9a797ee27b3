"""Properties every LoRA-aware aggregator must have, checked for each strategy.

Identical updates leave the model unchanged (where the algebra says so), client order
and zero-weight clients do not matter, the state survives ``torch.save``/``torch.load``
and metrics are finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from fedpeft import get_strategy
from fedpeft.lora.peft_io import base_delta_key, is_base_delta_key
from strategies import (  # noqa: F401  (registers the strategies)
    fedex_lora,
    fedsa_lora,
    ffa_lora,
    flexlora,
    flora,
    hetlora,
    lora_fair,
)
from tests.strategies import _factories as fx


def _no_a(t):
    return {k: v for k, v in t.items() if "lora_A" not in k}


def _no_b(t):
    return {k: v for k, v in t.items() if "lora_B" not in k}


def _with_rank(t):
    rank = next(v.shape[0] for k, v in t.items() if k.endswith("lora_A.weight"))
    return {**t, hetlora.RANK_KEY: torch.tensor(float(rank), dtype=torch.float64)}


def _same(out, upload, glob):
    """The global adapter equals the (common) upload on every uploaded key."""
    return all(
        torch.allclose(out.tensors[k], v, atol=1e-10) for k, v in upload.items() if k in glob
    )


def _same_product(out, upload, glob):
    """The served model change ``D + s·B·A`` equals the upload's product."""
    got, want = fx.factors(out.tensors), fx.factors(upload)
    for module, f in want.items():
        d = out.tensors.get(base_delta_key(module), 0.0)
        if not torch.allclose(got[module].delta() + d, f.delta(), atol=1e-10):
            return False
    return torch.allclose(out.tensors[fx.HEAD], upload[fx.HEAD], atol=1e-12)


def _same_a(out, upload, glob):
    return all(torch.allclose(out.tensors[k], v, atol=1e-12) for k, v in upload.items())


def _same_ffa(out, upload, glob):
    """B averaged to the common B, A untouched."""
    return _same(out, upload, glob) and all(
        torch.equal(out.tensors[k], v) for k, v in glob.items() if "lora_A" in k
    )


@dataclass(frozen=True)
class Case:
    name: str
    options: dict = field(default_factory=dict)
    upload: Callable[[dict], dict] = lambda t: t
    identical: Callable = _same
    ranks: tuple[int, ...] = (4, 4, 4)

    def __str__(self) -> str:
        return self.name


CASES = [
    Case("lora-fair", {"max_iters": 60}),  # fewer iterations: the properties do not need more
    Case("lora-fair", {"placement": "both", "norm": "squared", "max_iters": 40}),
    Case("lora-fair", {"max_iters": 60, "scale_free": True}, ranks=(2, 4, 3)),
    Case("ffa-lora", upload=_no_a, identical=_same_ffa),
    Case("fedex-lora", identical=_same_product),
    Case("flora", identical=_same_product, ranks=(2, 4, 3)),
    Case("fedsa-lora", upload=_no_b, identical=_same_a),
    Case("fedsa-lora", {"report_b": True}),
    Case("flexlora", identical=_same_product),
    Case("flexlora", ranks=(2, 4, 3), identical=lambda o, u, g: True),
    Case("hetlora", upload=_with_rank),
    Case("hetlora", {"weighting": "blend"}, upload=_with_rank, ranks=(2, 4, 3)),
]
IDS = [f"{c.name}-{i}" for i, c in enumerate(CASES)]


def _aggregator(case):
    entry = get_strategy(case.name)
    env = fx.env(rank=4, ranks=tuple(sorted(set(case.ranks))))
    return entry.build(entry.config_cls(**case.options), env).aggregator


def _updates(case, seed, counts=(3, 5, 8)):
    return [
        fx.update(case.upload(fx.adapter(seed + i, rank=r)), c, i, rank=r)
        for i, (r, c) in enumerate(zip(case.ranks, counts, strict=True))
    ]


def _close(x, y, atol=1e-10):
    return set(x) == set(y) and all(torch.allclose(x[k], y[k], atol=atol, rtol=1e-9) for k in x)


def _metrics_close(x, y):
    return set(x) == set(y) and all(math.isclose(x[k], y[k], rel_tol=1e-7, abs_tol=1e-9) for k in x)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_identical_updates_leave_the_model_unchanged(case):
    agg = _aggregator(case)
    glob = fx.adapter(99)
    common = case.upload(fx.adapter(1, rank=4))
    updates = [fx.update(dict(common), c, i, rank=4) for i, c in enumerate((2, 3, 9))]
    out = agg.aggregate(agg.initialize(glob), glob, updates, 1)
    assert case.identical(out, common, glob)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_client_order_does_not_matter(case):
    agg = _aggregator(case)
    glob = fx.adapter(99)
    updates = _updates(case, 10)
    a = agg.aggregate(agg.initialize(glob), glob, updates, 1)
    b = agg.aggregate(agg.initialize(glob), glob, updates[::-1], 1)
    assert _close(a.tensors, b.tensors)
    assert _metrics_close(a.metrics, b.metrics)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_zero_weight_client_has_no_effect(case):
    agg = _aggregator(case)
    glob = fx.adapter(99)
    updates = _updates(case, 20)
    extra = fx.update(case.upload(fx.adapter(77, rank=case.ranks[0])), 0, 9, rank=case.ranks[0])
    a = agg.aggregate(agg.initialize(glob), glob, updates, 1)
    b = agg.aggregate(agg.initialize(glob), glob, [updates[0], extra, *updates[1:]], 1)
    assert _close(a.tensors, b.tensors, atol=1e-12)
    assert _metrics_close(a.metrics, b.metrics)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_survives_a_checkpoint_and_continuing_is_identical(case):
    agg = _aggregator(case)
    glob = fx.adapter(99)
    out1 = agg.aggregate(agg.initialize(glob), glob, _updates(case, 30), 1)
    state, tensors = fx.save_load(out1.state), fx.save_load(out1.tensors)
    assert isinstance(state, dict)
    second = _updates(case, 40)
    a = agg.aggregate(out1.state, out1.tensors, second, 2)
    b = agg.aggregate(state, tensors, second, 2)
    assert set(a.tensors) == set(b.tensors)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert a.metrics == b.metrics
    plan = fx.plan(0, rank=case.ranks[0])
    pa, pb = (
        agg.client_payload(a.state, a.tensors, plan),
        agg.client_payload(b.state, b.tensors, plan),
    )
    assert set(pa) == set(pb) and all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_metrics_are_finite_and_the_global_keeps_its_keys(case):
    agg = _aggregator(case)
    glob = fx.adapter(99)
    out = agg.aggregate(agg.initialize(glob), glob, _updates(case, 50), 1)
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.metrics.values())
    assert set(glob) <= set(out.tensors)
    assert all(k in glob or is_base_delta_key(k) for k in out.tensors)
    assert all(
        out.tensors[k].shape == glob[k].shape and out.tensors[k].dtype == glob[k].dtype
        for k in glob
    )
    assert all(torch.isfinite(v).all() for v in out.tensors.values())
