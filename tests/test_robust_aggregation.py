"""aggregation.robust: each rule's closed form, Flower's numbers on the same arrays,
the config key, refusals, and a tiny run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum, MultiKrum
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from fedpeft import ClientPlan, ClientUpdate, ConfigError, WeightedMean
from fedpeft.aggregation import robust_mean as rm
from fedpeft.aggregation.layers import RobustAggregate, RobustSelect, stack
from fedpeft.config import parse_run_config
from fedpeft.server.setup import build_strategy

SHAPES = {"m.lora_A.weight": (3, 5), "m.lora_B.weight": (4, 3), "head.weight": (2,)}


def _update(node: int, tensors, received, n: int = 1) -> ClientUpdate:
    plan = ClientPlan(node_id=node, partition_id=node, rank=3, seed=node)
    return ClientUpdate(node, tensors, n, {}, plan, received=received)


def _arrays(seed: int, count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: rng.normal(scale=0.1, size=s).astype(np.float32) for k, s in SHAPES.items()}
            for _ in range(count)]


def _torch(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}


def _reply(arrays: dict[str, np.ndarray], n: int, node: int) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": n})})
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)


# -- closed forms -----------------------------------------------------------------------


def test_coordinate_median_odd_and_even_counts():
    odd = torch.tensor([[1.0, 9.0], [5.0, -1.0], [3.0, 4.0]])
    assert rm.coordinate_median(odd).tolist() == [3.0, 4.0]
    even = torch.tensor([[1.0, 9.0], [5.0, -1.0], [3.0, 4.0], [100.0, 0.0]])
    assert rm.coordinate_median(even).tolist() == [4.0, 2.0]  # mean of the two middle values


def test_trimmed_mean_drops_floor_beta_n_from_each_side():
    col = torch.tensor([[-100.0], [1.0], [2.0], [3.0], [100.0]])
    assert rm.trimmed_mean(col, 0.2).item() == 2.0  # ⌊0.2·5⌋ = 1 each side
    assert rm.trimmed_mean(col, 0.39).item() == 2.0  # ⌊1.95⌋ = 1
    assert rm.trimmed_mean(col, 0.0).item() == pytest.approx(1.2)  # a plain mean
    ten = torch.arange(10.0).reshape(10, 1) ** 2  # 0, 1, 4, …, 81
    assert rm.trimmed_mean(ten, 0.2).item() == pytest.approx(sum(i * i for i in range(2, 8)) / 6)
    with pytest.raises(ValueError, match="β must be in"):
        rm.trimmed_mean(col, 0.5)


def test_multi_krum_keeps_the_cluster_and_krum_its_centre():
    flat = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.1, 0.1], [0.05, 0.05],
                         [10.0, 10.0], [-9.0, 8.0]], dtype=torch.float64)
    kept, scores = rm.krum_select(flat, f=2, m=5)
    assert kept == [0, 1, 2, 3, 4]
    # n − f − 2 = 3 closest: the centre (0.05, 0.05) has three neighbours at 0.005 each
    assert scores[4] == pytest.approx(3 * 0.005)
    assert rm.krum_select(flat, f=2, m=1)[0] == [4]


def test_weiszfeld_finds_known_geometric_medians():
    # collinear: the geometric median of points on a line is their median (odd n)
    line = torch.tensor([[0.0, 0.0], [1.0, 2.0], [2.0, 4.0], [3.0, 6.0], [50.0, 100.0]])
    z, iters = rm.geometric_median(line)
    assert torch.allclose(z, torch.tensor([2.0, 4.0], dtype=torch.float64), atol=1e-5)
    assert iters > 1
    # symmetric: the four corners of a square meet at the centre
    square = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])
    z, _ = rm.geometric_median(square)
    assert torch.allclose(z, torch.zeros(2, dtype=torch.float64), atol=1e-9)
    # equilateral triangle: the Fermat point is the centroid
    tri = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 3**0.5]])
    z, _ = rm.geometric_median(tri)
    assert torch.allclose(z, torch.tensor([1.0, 3**0.5 / 3], dtype=torch.float64), atol=1e-6)
    # weights: a heavy point is the weighted geometric median once its weight exceeds half
    z, _ = rm.geometric_median(torch.tensor([[0.0], [1.0], [2.0]]), [0.6, 0.2, 0.2])
    assert z.item() == pytest.approx(0.0, abs=1e-5)


def test_cosine_filter_drops_a_sign_flipped_client():
    rng = torch.Generator().manual_seed(0)
    direction = torch.randn(20, generator=rng, dtype=torch.float64)
    honest = [direction + 0.1 * torch.randn(20, generator=rng, dtype=torch.float64) for _ in range(4)]
    flat = torch.stack([*honest, -3.0 * direction])  # (5, 20)
    cos = rm.cosine_to_median(flat)
    assert all(c > 0.9 for c in cos[:4]) and cos[4] < -0.9
    glob = {"w": torch.zeros(20)}
    updates = [_update(i, {"w": row.float()}, glob) for i, row in enumerate(flat)]
    out = RobustSelect(WeightedMean(), "cosine-filter", 0.0).aggregate({}, glob, updates, 1)
    assert list(out.rejected) == [4] and "below aggregation.robust=cosine-filter:0" in out.rejected[4]
    assert [u.node_id for u in out.updates] == [0, 1, 2, 3]
    assert out.metrics["robust/dropped"] == 1.0
    expected = torch.stack(honest).mean(dim=0).float()
    assert torch.allclose(out.tensors["w"], expected, atol=1e-6)


# -- layers -----------------------------------------------------------------------------


def test_aggregate_layer_works_on_changes_and_keeps_tensors_nobody_received():
    glob = {"a": torch.full((2,), 10.0), "local": torch.zeros(2)}
    sent = {"a": torch.full((2,), 10.0)}  # "local" is uploaded but was never sent
    ups = [_update(i, {"a": sent["a"] + d, "local": torch.full((2,), float(i))}, sent)
           for i, d in enumerate([1.0, 2.0, 30.0])]
    out = RobustAggregate(WeightedMean(), "median").aggregate({}, glob, ups, 1)
    assert out.tensors["a"].tolist() == [12.0, 12.0]  # r + median(u)
    assert out.tensors["local"].tolist() == [1.0, 1.0]  # the inner mean, untouched
    assert out.metrics["robust/keys"] == 1.0


def test_stack_puts_the_robust_layer_innermost_and_none_adds_nothing():
    inner = WeightedMean()
    assert stack(inner, robust="none") is inner
    layered = stack(inner, norm_factor=3.0, weighting="equal", robust="multi-krum:1")
    chain = []
    while hasattr(layered, "inner"):
        chain.append(type(layered).__name__)
        layered = layered.inner
    assert chain == ["RejectOutliers", "EqualWeights", "RobustSelect"]
    with pytest.raises(ValueError, match="aggregation.robust must be one of"):
        stack(inner, robust="mode")


# -- Flower's numbers -------------------------------------------------------------------


def _both(arrays, counts, start):
    """(Flower replies, fedpeft updates, global) for the same uploads from ``start``."""
    replies = [_reply(a, n, 10 + i) for i, (a, n) in enumerate(zip(arrays, counts, strict=True))]
    ups = [_update(10 + i, _torch(a), _torch(start), n) for i, (a, n) in enumerate(zip(arrays, counts, strict=True))]
    return replies, ups, _torch(start)


def _assert_same(flower_record: ArrayRecord, ours: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    for key, arr in flower_record.items():
        theirs = arr.numpy()
        mine = ours[key].double().numpy()
        assert theirs.shape == mine.shape
        worst = max(worst, float(np.abs(theirs - mine).max()))
    assert worst < 1e-6
    return worst


@pytest.mark.parametrize("count", [5, 6])
def test_median_equals_flowers_fedmedian(count):
    arrays, counts = _arrays(1, count), list(range(3, 3 + count))
    start = _arrays(99, 1)[0]
    replies, ups, glob = _both(arrays, counts, start)
    theirs, _ = FedMedian().aggregate_train(1, replies)
    ours = stack(WeightedMean(), robust="median").aggregate({}, glob, ups, 1)
    _assert_same(theirs, ours.tensors)


@pytest.mark.parametrize("beta", [0.1, 0.2, 0.3])
def test_trimmed_mean_equals_flowers_fedtrimmedavg(beta):
    arrays, counts = _arrays(2, 7), [5] * 7
    start = _arrays(98, 1)[0]
    replies, ups, glob = _both(arrays, counts, start)
    theirs, _ = FedTrimmedAvg(beta=beta).aggregate_train(1, replies)
    ours = stack(WeightedMean(), robust=f"trimmed-mean:{beta}").aggregate({}, glob, ups, 1)
    _assert_same(theirs, ours.tensors)
    stacked = np.stack([a["m.lora_B.weight"] for a in arrays]).astype(np.float64)
    direct = rm.trimmed_mean(torch.from_numpy(stacked), beta).numpy()
    assert np.abs(direct - trim_mean(stacked, beta)).max() < 1e-12


def _poisoned(seed: int, count: int, bad: int) -> list[dict[str, np.ndarray]]:
    arrays = _arrays(seed, count)
    for a in arrays[:bad]:  # the first `bad` clients send large sign-flipped uploads
        for k in a:
            a[k] = -8.0 * a[k] + 0.5
    return arrays


@pytest.mark.parametrize(("f", "bad"), [(1, 1), (2, 2), (2, 1)])
def test_multi_krum_and_krum_equal_flowers(f, bad):
    count = 7
    arrays, counts = _poisoned(3, count, bad), [4, 9, 2, 6, 5, 8, 3]
    start = {k: np.zeros(s, dtype=np.float32) for k, s in SHAPES.items()}
    replies, ups, glob = _both(arrays, counts, start)
    theirs, _ = MultiKrum(num_malicious_nodes=f, num_nodes_to_select=count - f).aggregate_train(1, replies)
    ours = stack(WeightedMean(), robust=f"multi-krum:{f}").aggregate({}, glob, ups, 1)
    _assert_same(theirs, ours.tensors)
    assert {10 + i for i in range(bad)} <= set(ours.rejected)  # the attackers are left out
    assert len(ours.rejected) == f
    replies, ups, glob = _both(arrays, counts, start)
    theirs, _ = Krum(num_malicious_nodes=f).aggregate_train(1, replies)
    ours = stack(WeightedMean(), robust=f"krum:{f}").aggregate({}, glob, ups, 1)
    _assert_same(theirs, ours.tensors)
    assert len(ours.updates) == 1 and "Krum score" in next(iter(ours.rejected.values()))


# -- config and setup -------------------------------------------------------------------


@pytest.mark.parametrize("value", ["mean", "median:2", "trimmed-mean", "trimmed-mean:0.5",
                                   "krum", "multi-krum:1.5", "multi-krum:-1", "geomed:3",
                                   "cosine-filter:1.5", "cosine-filter:x"])
def test_malformed_values_are_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match="aggregation.robust must be one of none, median, trimmed-mean"):
        parse_run_config({"aggregation.robust": value})


@pytest.mark.parametrize("value", ["none", "median", "trimmed-mean:0.2", "krum:1", "multi-krum:0",
                                   "geomed", "cosine-filter", "cosine-filter:-0.5"])
def test_valid_values_parse(value):
    rule = parse_run_config({"aggregation.robust": value}).aggregation.robust_rule
    assert rule.name == value.split(":")[0]


@pytest.mark.parametrize(("strategy", "robust", "match"), [
    ("fedex-lora", "median", "a median of A and a median of B is not a median of BA"),
    ("flexlora", "geomed", "use a rule that keeps whole clients"),
    ("lora-sb", "trimmed-mean:0.3", "frozen basis"),
    ("ferret", "multi-krum:1", "does not apply to strategy 'ferret'"),
    ("fedspine", "cosine-filter", "does not apply to strategy 'fedspine'"),
    ("flora", "krum:1", "fresh random A"),
    ("hetlora", "median", "shrink their ranks"),
])
def test_incompatible_strategies_are_refused_with_the_reason(strategy, robust, match):
    cfg = parse_run_config({"strategy.name": strategy, "aggregation.robust": robust,
                            "federation.clients": 5})
    with pytest.raises(ConfigError, match=match):
        build_strategy(cfg)


def test_setup_refusals_for_ranks_krum_bound_trimming_and_dp():
    with pytest.raises(ConfigError, match="needs one rank for every client"):
        build_strategy(parse_run_config({"aggregation.robust": "median", "lora.ranks": "4,8"}))
    with pytest.raises(ConfigError, match=r"n > 2f \+ 2; 4 clients"):
        build_strategy(parse_run_config({"aggregation.robust": "multi-krum:1", "federation.clients": 4}))
    with pytest.raises(ConfigError, match="a plain mean"):
        build_strategy(parse_run_config({"aggregation.robust": "trimmed-mean:0.1", "federation.clients": 4}))
    for name, robust in [("fedit", "geomed"), ("ffa-lora", "median"), ("fedsa-lora", "trimmed-mean:0.2"),
                         ("fedex-lora", "multi-krum:1"), ("lora-fair", "cosine-filter"), ("lora-sb", "krum:1")]:
        build_strategy(parse_run_config({"strategy.name": name, "aggregation.robust": robust,
                                         "federation.clients": 5}))


# -- a run ------------------------------------------------------------------------------


def test_a_tiny_run_with_the_median_completes(tiny_config):
    from fedpeft.flower.inprocess import run_in_process

    results = run_in_process({**tiny_config, "federation.rounds": 1, "aggregation.robust": "median"})
    assert [r["round"] for r in results.rounds][-1] == 1
    assert np.isfinite(results.rounds[1]["loss"])


def test_a_tiny_run_with_multi_krum_rejects_f_clients_per_round(tiny_config):
    from fedpeft.flower.inprocess import run_in_process

    results = run_in_process({**tiny_config, "federation.rounds": 1, "federation.clients": 5,
                              "aggregation.robust": "multi-krum:1"})
    assert results.rounds[1]["rejected"] == 1
