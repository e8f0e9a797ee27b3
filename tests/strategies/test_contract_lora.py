"""The contract every built-in strategy keeps, checked case by case.

Every built-in strategy has at least one :class:`Case` (a strategy name, its options,
the client ranks) and ``test_every_registered_strategy_has_a_contract_case`` fails when
a built-in is registered without one. Uploads are made by the strategy's own client
half (``client_payload`` → ``ClientAlgorithm.start`` → a stand-in for training →
``finish``) on small hand-built adapters (``_factories``), never by training a model.
The properties, per case:

* identical uploads: the aggregate is what the common upload says (per case:
  the same tensors, the same product ``D + s·B·A``, the same mean on the kept
  coordinates, the same ``B·R·A`` — lora-sb, whose uploads carry R — or — Ferret —
  the same global as one copy of the upload alone);
* the order of the clients does not matter;
* a client with zero examples has no effect (tensors and metrics, except metrics that
  count every planned client by design: ``Case.participant_metrics``);
* the server state survives ``torch.save``/``torch.load`` and continuing from the
  reloaded state gives bit-identical tensors, metrics and payloads;
* metrics are finite floats, the global keeps its keys, shapes and dtypes;
* ``client_payload`` gives each plan tensors of the plan's rank;
* the client half round-trips over two rounds: ``start`` covers every key of
  ``init`` at ``init``'s shapes, the trainable keys are among them, the client state
  is tensors that survive ``torch.save``, and ``finish``'s upload is one the server
  accepts (the server's key/shape/dtype/finiteness validation, the aggregator's
  ``upload_shape`` and ``check_update``, and ``aggregate``).

A property that does not apply to a case is skipped with the reason in
``Case.not_applicable``; a property that a strategy breaks is marked ``xfail(strict)``
with the reason in ``Case.bugs``.

Which registrations count as built-in: those whose ``build`` function or config class
is defined in a module of the ``strategies`` package (what ``fedpeft`` imports for its
built-ins). Plug-ins that other tests register (``test-dup``, ``test-exact``, with
``replace=True``) are defined in test modules and are ignored; a test that replaced a
built-in name with its own plug-in would make that name's cases fail (they would test
the plug-in), which is what it should do.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import strategies  # noqa: F401  (registers the built-in strategies)
from fedpeft import (
    AUX_PREFIX,
    ClientPlan,
    ClientUpdate,
    FedStrategy,
    TensorDict,
    available_strategies,
    get_strategy,
)
from fedpeft.aggregation.layers import stack
from fedpeft.client import finish_with_carry
from fedpeft.lora.peft_io import base_delta_key, is_base_delta_key, shape_for_rank
from strategies import fedit, fedspine, lora_sb
from strategies import ferret as ferret_mod
from tests.strategies import _factories as fx

GLOBAL_SEED = 99
"""The initial global adapter and every client's ``init`` are ``fx.adapter(99, rank)``:
Ferret's clients rebuild version 0 from ``init``, so the two must agree."""
NOISE = 0.3
"""Size of the stand-in for local training (seeded noise on the trainable tensors)."""

# -- FedSpine's structured pruning, faked on BERT-named modules ----------------------

SPINE_HEADS, SPINE_HEAD_DIM, SPINE_FFN = 2, 2, 3
SPINE_SHAPES = {  # (d_out, d_in); hidden 4 = 2 heads × 2, d_ff 3, two layers
    "bert.encoder.layer.0.attention.self.query": (4, 4),  # rows by heads
    "bert.encoder.layer.0.intermediate.dense": (3, 4),  # rows by channels
    "bert.encoder.layer.1.attention.output.dense": (4, 4),  # columns by heads
    "bert.encoder.layer.1.output.dense": (4, 3),  # columns by channels
}


def _spine_keep(
    module: str, heads: torch.Tensor, channels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column keep-masks ``((d_out,), (d_in,))`` of a module of SPINE_SHAPES."""
    d_out, d_in = SPINE_SHAPES[module]
    layer = int(module.split(".layer.")[1].split(".")[0])
    rows, cols = torch.ones(d_out, dtype=torch.bool), torch.ones(d_in, dtype=torch.bool)
    by_head = heads[layer].bool().repeat_interleave(SPINE_HEAD_DIM)
    if ".attention.self." in module:
        rows = by_head
    elif module.endswith("attention.output.dense"):
        cols = by_head
    elif module.endswith("intermediate.dense"):
        rows = channels[layer].bool()
    elif module.endswith(".output.dense"):
        cols = channels[layer].bool()
    return rows, cols


def _spine_local(
    start: TensorDict, trainable: frozenset[str], plan: ClientPlan, state: TensorDict, seed: int
) -> tuple[TensorDict, TensorDict]:
    """Stand-in for ``FedSpineClient.local_round``: train, prune further from the stored
    masks (every layer keeps a head and a channel; at least one more of each goes while
    that is possible), upload the factors on the kept coordinates plus the int8 masks,
    keep the masks in the state."""
    gen = torch.Generator().manual_seed(seed)
    layers = 2
    heads = state.get(fedspine.STATE_HEADS, torch.ones(layers, SPINE_HEADS, dtype=torch.int8))
    channels = state.get(fedspine.STATE_CHANNELS, torch.ones(layers, SPINE_FFN, dtype=torch.int8))
    masks = []
    for mask in (heads.bool(), channels.bool()):
        new = mask & (torch.rand(mask.shape, generator=gen) < 0.6)
        for i in range(layers):
            if not new[i].any():  # keep one that was kept
                new[i, int(mask[i].nonzero()[0])] = True
        for i in range(layers):
            if torch.equal(new, mask) and int(new[i].sum()) > 1:  # prune one at least
                new[i, int(new[i].nonzero()[-1])] = False
        masks.append(new.to(torch.int8))
    heads, channels = masks
    trained = fx.perturb({k: v for k, v in start.items() if k in trainable}, trainable, seed, NOISE)
    for module in SPINE_SHAPES:
        rows, cols = _spine_keep(module, heads, channels)
        a_key, b_key = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        trained[a_key], trained[b_key] = trained[a_key][:, cols], trained[b_key][rows]
    trained[fedspine.HEADS_KEY], trained[fedspine.CHANNELS_KEY] = heads, channels
    return trained, {fedspine.STATE_HEADS: heads, fedspine.STATE_CHANNELS: channels}


def _spine_init(rank: int) -> TensorDict:
    return fx.adapter(GLOBAL_SEED, rank, shapes=SPINE_SHAPES)


def _ferret_full_init(rank: int) -> TensorDict:
    """``mode=full``: the model also exposes the base deltas of the LoRA modules."""
    tensors = fx.adapter(GLOBAL_SEED, rank)
    return {**ferret_mod.tuned_space(tensors, "full"), **tensors}


# -- Fed-SB: only R (r×r) per layer is trained, between frozen seeded A and B --------


def _sb_init(rank: int) -> TensorDict:
    """lora-sb needs the initial lora_B to be zero (R = 0); A is the seeded init."""
    return fx.adapter(GLOBAL_SEED, rank, zero_b=True)


def _sb_local(
    start: TensorDict, trainable: frozenset[str], plan: ClientPlan, state: TensorDict, seed: int
) -> tuple[TensorDict, TensorDict]:
    """Stand-in for ``TrainR.local_round``: R = B⁺·lora_B (the start's coordinates in
    the frozen basis, i.e. the received R̄) plus seeded noise, ``(r, r)`` under each
    ``lora_B`` key, and the noisy head; what ``work.tensors()`` holds (no ``lora_A``)."""
    gen = torch.Generator().manual_seed(seed)
    trained: TensorDict = {}
    for key in sorted(trainable):
        value = start[key]
        if key.endswith(".lora_B.weight"):
            d_out, rank = value.shape
            module = key.removesuffix(".lora_B.weight")
            basis = lora_sb.basis_b(fx.env().seed, module, int(d_out), int(rank))
            value = torch.linalg.lstsq(basis.double(), value.double()).solution.to(value.dtype)
        trained[key] = value + NOISE * torch.randn(value.shape, generator=gen, dtype=value.dtype)
    return trained, {}


def _sb_factors(tensors: Mapping[str, torch.Tensor], upload: Mapping[str, torch.Tensor]):
    """``(B·R, A)`` per module, R from ``upload``'s ``lora_B`` keys, A from ``tensors``."""
    out = {}
    for key, r in upload.items():
        if key.endswith(".lora_B.weight"):
            module = key.removesuffix(".lora_B.weight")
            a = tensors[f"{module}.lora_A.weight"]
            d_out, rank = int(tensors[key].shape[0]), int(r.shape[0])
            basis = lora_sb.basis_b(fx.env().seed, module, d_out, rank)
            out[module] = (basis.double() @ r.double(), a.double())
    return out


# -- what "identical uploads" give -----------------------------------------------------


def _same(out, one, upload, glob):
    """The global equals the (common) upload on every uploaded global key."""
    return all(
        torch.allclose(out.tensors[k], v, atol=1e-10) for k, v in upload.items() if k in glob
    )


def _same_product(out, one, upload, glob):
    """The served model change ``D + s·B·A`` equals the upload's product."""
    got, want = fx.factors(out.tensors), fx.factors(upload)
    for module, f in want.items():
        d = out.tensors.get(base_delta_key(module), 0.0)
        if not torch.allclose(got[module].delta() + d, f.delta(), atol=1e-10):
            return False
    return torch.allclose(out.tensors[fx.HEAD], upload[fx.HEAD], atol=1e-12)


def _same_a(out, one, upload, glob):
    """FedSA-LoRA: the uploaded A (and head) become the global ones; B is untouched."""
    return _same(out, one, upload, glob) and all(
        torch.equal(out.tensors[k], v) for k, v in glob.items() if "lora_B" in k
    )


def _same_ffa(out, one, upload, glob):
    """FFA-LoRA: B averaged to the common B, A untouched."""
    return _same(out, one, upload, glob) and all(
        torch.equal(out.tensors[k], v) for k, v in glob.items() if "lora_A" in k
    )


def _as_one(out, one, upload, glob):
    """N copies of an upload give the global that one copy alone gives."""
    return fx.allclose(out.tensors, one.tensors)


def _dense_step(out, one, upload, glob):
    """Ferret's dense baseline: the global moves by the common ``Δ = replica − trained``
    (the replica is the global here), i.e. to the clients' common model."""
    delta = {k.removeprefix(ferret_mod.DENSE): v for k, v in upload.items()}
    tuned = [k for k in glob if k in delta]
    return len(tuned) == len(glob) and all(
        torch.allclose(out.tensors[k], glob[k] - delta[k].double(), atol=1e-12) for k in tuned
    )


def _same_on_kept(out, one, upload, glob):
    """FedSpine: on the coordinates the masks keep, the product is the upload's; the
    coordinates nobody kept keep the previous global product (r_max = 4 ≥ min(d_out,
    d_in), so the rank truncation is exact)."""
    got, before, want = fx.factors(out.tensors), fx.factors(glob), fx.factors(upload)
    heads, channels = upload[fedspine.HEADS_KEY], upload[fedspine.CHANNELS_KEY]
    for module, f in want.items():
        rows, cols = _spine_keep(module, heads, channels)
        expected = before[module].delta().clone()
        expected[torch.outer(rows, cols)] = f.delta().reshape(-1)
        if not torch.allclose(got[module].delta(), expected, atol=1e-10):
            return False
    return torch.allclose(out.tensors[fx.HEAD], upload[fx.HEAD], atol=1e-12)


def _same_sb_product(out, one, upload, glob):
    """lora-sb: the upload carries R ``(r, r)``, the global a peft adapter with
    ``lora_B = B·R̄``: the served product ``B·R̄·A`` is the upload's ``B·R·A`` (A is the
    frozen global A, unchanged), and the head is the upload's."""
    for module, (br, a) in _sb_factors(glob, upload).items():
        key_a, key_b = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        if not torch.equal(out.tensors[key_a], glob[key_a]):
            return False
        got = out.tensors[key_b].double() @ out.tensors[key_a].double()
        if not torch.allclose(got, br @ a, atol=1e-10):
            return False
    return torch.allclose(out.tensors[fx.HEAD], upload[fx.HEAD], atol=1e-12)


# -- cases --------------------------------------------------------------------------

Local = Callable[
    [TensorDict, frozenset, ClientPlan, TensorDict, int], tuple[TensorDict, TensorDict]
]
PROPERTIES = ("identical", "order", "zero_weight", "checkpoint", "metrics", "payload", "client")


@dataclass(frozen=True)
class Case:
    """One strategy configuration the contract runs against.

    Attributes:
        label: test id.
        name: registered strategy name.
        options: fields of the strategy's config class.
        weighting: ``aggregation.weighting`` (the engine's layer around the strategy).
        ranks: the ranks of the three clients (the global rank is 4).
        identical: what N identical uploads give (see the ``_same*`` checks).
        init: a client's fresh adapter of a rank; the initial global is ``init(4)``.
        local: a stand-in for the algorithm's ``local_round`` hook, if it has one.
        participant_metrics: metrics that describe every planned client, zero-weight
            ones too, so they change when a zero-weight client is added.
        not_applicable: property → why it does not apply (the test is skipped).
        bugs: property → the bug it exposes (the test is ``xfail(strict=True)``).
    """

    label: str
    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    weighting: str = "examples"
    ranks: tuple[int, ...] = (4, 4, 4)
    identical: Callable[..., bool] = _same
    init: Callable[[int], TensorDict] = lambda rank: fx.adapter(GLOBAL_SEED, rank)
    local: Local | None = None
    participant_metrics: frozenset[str] = frozenset()
    not_applicable: Mapping[str, str] = field(default_factory=dict)
    bugs: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.label


_EQUAL_WEIGHTS = (
    "aggregation.weighting=equal gives every client weight 1/N whatever its example count, so a client "
    "with zero examples counts by design"
)
_FERRET_BYTES = frozenset(
    {
        "ferret/uplink_formula_bytes",  # bytes every client sent, weighted or not
        "ferret/coefficients_mean",  # mean upload size over the clients
        "ferret/full_syncs",  # clients that synced from the full state
        "ferret/replayed_rounds",  # rounds the clients replayed
    }
)
_SPINE_PARTICIPANTS = frozenset(
    {"fedspine/rank_mean", "fedspine/sparsity_mean"}  # over every planned device
)

CASES = [
    Case("fedit", "fedit"),
    Case(
        "fedit-equal-weights",
        "fedit",
        weighting="equal",
        not_applicable={"zero_weight": _EQUAL_WEIGHTS},
    ),
    Case(
        "lora-fair-equal-weights-mixed",
        "lora-fair",
        {"max_iters": 60},
        weighting="equal",
        ranks=(2, 4, 3),
        identical=_same_product,
        not_applicable={"zero_weight": _EQUAL_WEIGHTS},
    ),
    Case("fedit-mixed-ranks", "fedit", ranks=(2, 4, 3), identical=_same_product),
    # fewer solver iterations: the properties do not need more
    Case("lora-fair", "lora-fair", {"max_iters": 60}),
    Case(
        "lora-fair-both-squared",
        "lora-fair",
        {"placement": "both", "norm": "squared", "max_iters": 40},
    ),
    Case(
        "lora-fair-scale-free-mixed",
        "lora-fair",
        {"max_iters": 60, "scale_free": True},
        ranks=(2, 4, 3),
        identical=_same_product,
    ),
    Case("ffa-lora", "ffa-lora", identical=_same_ffa),
    Case("fedex-lora", "fedex-lora", identical=_same_product),
    Case("flora-mixed-ranks", "flora", ranks=(2, 4, 3), identical=_same_product),
    Case("fedsa-lora", "fedsa-lora", identical=_same_a),
    Case("fedsa-lora-report-b", "fedsa-lora", {"report_b": True}),
    Case("flexlora", "flexlora", identical=_same_product),
    Case("flexlora-mixed-ranks", "flexlora", ranks=(2, 4, 3), identical=_same_product),
    Case("hetlora", "hetlora"),
    Case(
        "hetlora-blend-mixed",
        "hetlora",
        {"weighting": "blend"},
        ranks=(2, 4, 3),
        identical=_same_product,
    ),
    # Ferret: one rank for everyone (shared bases). Identical coordinates do not make
    # the global equal the clients' model (the projection is lossy); they make it equal
    # to what one copy alone gives.
    Case(
        "ferret", "ferret", {"num_seeds": 8}, identical=_as_one, participant_metrics=_FERRET_BYTES
    ),
    Case(
        "ferret-momentum",
        "ferret",
        {"num_seeds": 8, "momentum": 0.5, "refresh_pool": False},
        identical=_as_one,
        participant_metrics=_FERRET_BYTES,
    ),
    Case(
        "ferret-full",
        "ferret",
        {"num_seeds": 8, "mode": "full"},
        identical=_as_one,
        init=_ferret_full_init,
        participant_metrics=_FERRET_BYTES,
    ),
    # the dense baseline Ferret's bytes are compared with: FedAvg on Δ
    Case(
        "ferret-dense",
        "ferret",
        {"projection": False},
        identical=_dense_step,
        participant_metrics=_FERRET_BYTES,
    ),
    Case(
        "fedspine",
        "fedspine",
        identical=_same_on_kept,
        local=_spine_local,
        init=_spine_init,
        participant_metrics=_SPINE_PARTICIPANTS,
    ),
    Case(
        "fedspine-mixed-ranks",
        "fedspine",
        ranks=(2, 4, 3),
        identical=_same_on_kept,
        local=_spine_local,
        init=_spine_init,
        participant_metrics=_SPINE_PARTICIPANTS,
    ),
    # Fed-SB: one rank only (mixed_ranks=False, so the server setup refuses lora.ranks;
    # B is drawn per (seed, module, shape): a client of another rank has another basis)
    Case(
        "lora-sb",
        "lora-sb",
        identical=_same_sb_product,
        init=_sb_init,
        local=_sb_local,
        not_applicable={
            "payload": "lora-sb's downlink carries R̄ (r, r) under each lora_B key by design "
            "(r² per layer, lora_B = B·R̄ is rebuilt by the client from its seeded B), not "
            "the (d_out, r) factor; what start builds from it (the plan's rank at init's "
            "shapes) is checked by the client round trip"
        },
    ),
]


def _params(prop: str) -> list[Any]:
    out = []
    for case in CASES:
        marks = []
        if prop in case.not_applicable:
            marks.append(pytest.mark.skip(reason=case.not_applicable[prop]))
        if prop in case.bugs:
            marks.append(pytest.mark.xfail(strict=True, reason=case.bugs[prop]))
        out.append(pytest.param(case, id=case.label, marks=marks))
    return out


# -- which strategies are built in ------------------------------------------------------


def _is_builtin(build: Any, config_cls: type) -> bool:
    """A registration made by a module of the ``strategies`` package."""
    modules = (getattr(build, "__module__", None) or "", config_cls.__module__)
    return any(m == "strategies" or m.startswith("strategies.") for m in modules)


def _builtin_strategies() -> set[str]:
    out = set()
    for name in available_strategies():
        entry = get_strategy(name)
        if _is_builtin(entry.build, entry.config_cls):
            out.add(name)
    return out


def test_every_registered_strategy_has_a_contract_case():
    builtin = _builtin_strategies()
    cased = {c.name for c in CASES}
    missing = sorted(builtin - cased)
    assert not missing, f"built-in strategies without a contract case in CASES: {missing}"
    stale = sorted(cased - builtin)
    assert not stale, f"contract cases for strategies that are not built-in (any more): {stale}"
    assert len({c.label for c in CASES}) == len(CASES), "case labels must be unique"
    assert all(set(c.not_applicable) | set(c.bugs) <= set(PROPERTIES) for c in CASES)


def test_plugins_registered_elsewhere_do_not_count_as_built_in():
    @dataclass(frozen=True)
    class _Cfg:
        x: int = 0

    def _build(config: _Cfg, env: Any) -> FedStrategy:
        return FedStrategy(aggregator=None)  # type: ignore[arg-type]

    assert not _is_builtin(_build, _Cfg)
    assert _is_builtin(fedit.build, fedit.FedItConfig)
    assert {"fedit", "ferret", "fedspine"} <= _builtin_strategies()


# -- the harness: uploads through the strategy's client half ----------------------------


def _fed(case: Case) -> FedStrategy:
    entry = get_strategy(case.name)
    env = fx.env(rank=4, ranks=tuple(sorted(set(case.ranks))))
    fed = entry.build(entry.config_cls(**case.options), env)
    return dataclasses.replace(fed, aggregator=stack(fed.aggregator, weighting=case.weighting))


def _global(case: Case) -> TensorDict:
    return case.init(4)


def _payload(fed: FedStrategy, state: Any, glob: TensorDict, plan: ClientPlan) -> TensorDict:
    """``client_payload``; an aggregator without one sends the global adapter."""
    hook = getattr(fed.aggregator, "client_payload", None)
    return hook(state, glob, plan) if callable(hook) else dict(glob)


@dataclass
class Client:
    """One client's view of a round: what it got, started from, trained and sent."""

    plan: ClientPlan
    received: TensorDict
    init: TensorDict
    start: TensorDict
    trainable: frozenset[str]
    upload: TensorDict
    state: TensorDict


def _client(
    case: Case,
    fed: FedStrategy,
    state: Any,
    glob: TensorDict,
    plan: ClientPlan,
    cstate: TensorDict,
    seed: int,
) -> Client:
    """payload → start → stand-in training (or ``case.local``) → finish, as the
    ClientApp runs it (client state through ``torch.save``)."""
    received = _payload(fed, state, glob, plan)
    init = case.init(plan.rank)
    cstate = fx.save_load(cstate)
    started = fed.client.start(received, init, cstate, plan)
    start, trainable = started
    if case.local is not None:
        trained, extra = case.local(start, trainable, plan, cstate, seed)
        cstate = {**cstate, **extra}
    else:
        trained = fx.perturb(start, trainable, seed, NOISE)
        trained = {k: v for k, v in trained.items() if k in init}  # model.tensors()
    upload, new_state = finish_with_carry(fed.client, started, trained, received, cstate, plan)
    return Client(plan, received, init, start, trainable, upload, new_state)


def _round(
    case: Case,
    fed: FedStrategy,
    state: Any,
    glob: TensorDict,
    server_round: int,
    clients: list[tuple[int, int, int]],
    cstates: dict[int, TensorDict] | None = None,
) -> tuple[list[ClientUpdate], dict[int, TensorDict], list[Client]]:
    """Uploads of ``clients`` = ``[(partition id, rank, examples)]`` this round."""
    cstates = dict(cstates or {})
    updates, views = [], []
    for pid, rank, count in clients:
        plan = fx.plan(pid, rank=rank, seed=1000 * server_round + pid)
        view = _client(case, fed, state, glob, plan, cstates.get(pid, {}), plan.seed)
        cstates[pid] = view.state
        views.append(view)
        updates.append(ClientUpdate(plan.node_id, view.upload, count, {}, plan))
    return updates, cstates, views


def _three(case: Case, counts=(3, 5, 8)) -> list[tuple[int, int, int]]:
    return [(i, r, c) for i, (r, c) in enumerate(zip(case.ranks, counts, strict=True))]


def _close(x, y, atol=1e-10):
    return set(x) == set(y) and all(torch.allclose(x[k], y[k], atol=atol, rtol=1e-9) for k in x)


def _metrics_close(x, y, ignore=frozenset()):
    keys = set(x) - ignore
    return keys == set(y) - ignore and all(
        math.isclose(x[k], y[k], rel_tol=1e-7, abs_tol=1e-9) for k in keys
    )


def _accepts(fed: FedStrategy, state: Any, glob: TensorDict, u: ClientUpdate) -> None:
    """What the server checks before an upload reaches ``aggregate``: keys are global
    adapter keys (no base delta) or ``aux.*``; shapes are those of the plan's rank
    (or the aggregator's ``upload_shape``); float and finite; ``check_update`` passes."""
    assert u.tensors, "empty upload"
    upload_shape = getattr(fed.aggregator, "upload_shape", None)
    for key, value in u.tensors.items():
        if key.startswith(AUX_PREFIX):
            assert not value.is_floating_point() or torch.isfinite(value).all(), key
            continue
        assert key in glob and not is_base_delta_key(key), f"unexpected upload key {key!r}"
        want = shape_for_rank(key, tuple(glob[key].shape), u.plan.rank)
        if callable(upload_shape):
            want = tuple(upload_shape(key, want, u.tensors, u.plan))
        assert tuple(value.shape) == want, (key, tuple(value.shape), want)
        assert value.is_floating_point() and torch.isfinite(value).all(), key
    check = getattr(fed.aggregator, "check_update", None)
    if callable(check):
        check(state, u.tensors, u.plan)


# -- the properties ---------------------------------------------------------------------


@pytest.mark.parametrize("case", _params("identical"))
def test_identical_updates_leave_the_model_unchanged(case):
    """N clients uploading the same tensors: the global becomes what that upload says
    (``Case.identical``: for FedAvg-like cases the upload itself)."""
    fed = _fed(case)
    glob = _global(case)
    state = fed.aggregator.initialize(glob)
    (first,), _, _ = _round(case, fed, state, glob, 1, [(0, case.ranks[0], 1)])
    copies = [
        ClientUpdate(100 + i, dict(first.tensors), n, {}, fx.plan(i, case.ranks[0]))
        for i, n in enumerate((2, 3, 9))
    ]
    for u in copies:
        _accepts(fed, state, glob, u)
    out = fed.aggregator.aggregate(state, glob, copies, 1)
    one = fed.aggregator.aggregate(state, glob, [first], 1)
    assert case.identical(out, one, first.tensors, glob)


@pytest.mark.parametrize("case", _params("order"))
def test_client_order_does_not_matter(case):
    fed = _fed(case)
    glob = _global(case)
    state = fed.aggregator.initialize(glob)
    updates, _, _ = _round(case, fed, state, glob, 1, _three(case))
    a = fed.aggregator.aggregate(state, glob, updates, 1)
    b = fed.aggregator.aggregate(state, glob, updates[::-1], 1)
    assert _close(a.tensors, b.tensors)
    assert _metrics_close(a.metrics, b.metrics)


@pytest.mark.parametrize("case", _params("zero_weight"))
def test_a_zero_weight_client_has_no_effect(case):
    fed = _fed(case)
    glob = _global(case)
    state = fed.aggregator.initialize(glob)
    clients = _three(case)
    updates, _, _ = _round(case, fed, state, glob, 1, clients)
    (extra,), _, _ = _round(case, fed, state, glob, 1, [(9, case.ranks[0], 0)])
    a = fed.aggregator.aggregate(state, glob, updates, 1)
    b = fed.aggregator.aggregate(state, glob, [updates[0], extra, *updates[1:]], 1)
    assert _close(a.tensors, b.tensors, atol=1e-12)
    assert _metrics_close(a.metrics, b.metrics, ignore=case.participant_metrics)


@pytest.mark.parametrize("case", _params("checkpoint"))
def test_state_survives_a_checkpoint_and_continuing_is_identical(case):
    fed = _fed(case)
    glob = _global(case)
    state0 = fed.aggregator.initialize(glob)
    updates, cstates, _ = _round(case, fed, state0, glob, 1, _three(case))
    out1 = fed.aggregator.aggregate(fx.save_load(state0), glob, updates, 1)
    state, tensors = fx.save_load(out1.state), fx.save_load(out1.tensors)
    assert isinstance(state, dict)
    plans = [fx.plan(pid, rank) for pid, rank, _ in _three(case)]
    for p in plans:  # what round 2 sends does not depend on the checkpoint
        pa = _payload(fed, out1.state, out1.tensors, p)
        pb = _payload(fed, state, tensors, p)
        assert set(pa) == set(pb) and all(torch.equal(pa[k], pb[k]) for k in pa)
    second, _, _ = _round(case, fed, out1.state, out1.tensors, 2, _three(case, (4, 7, 2)), cstates)
    a = fed.aggregator.aggregate(out1.state, out1.tensors, second, 2)
    b = fed.aggregator.aggregate(state, tensors, second, 2)
    assert set(a.tensors) == set(b.tensors)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert a.metrics == b.metrics
    sa, sb = fx.save_load(a.state), fx.save_load(b.state)
    for p in plans:  # and neither does round 3's
        pa = _payload(fed, sa, a.tensors, p)
        pb = _payload(fed, sb, b.tensors, p)
        assert set(pa) == set(pb) and all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize("case", _params("metrics"))
def test_metrics_are_finite_and_the_global_keeps_its_keys(case):
    fed = _fed(case)
    glob = _global(case)
    state = fed.aggregator.initialize(glob)
    updates, _, _ = _round(case, fed, state, glob, 1, _three(case))
    out = fed.aggregator.aggregate(state, glob, updates, 1)
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.metrics.values())
    assert set(glob) <= set(out.tensors)
    assert all(k in glob or is_base_delta_key(k) for k in out.tensors)
    assert all(
        out.tensors[k].shape == glob[k].shape and out.tensors[k].dtype == glob[k].dtype
        for k in glob
    )
    assert all(torch.isfinite(v).all() for v in out.tensors.values())


@pytest.mark.parametrize("case", _params("payload"))
def test_client_payload_has_the_plan_rank(case):
    """Adapter tensors in a payload have the plan's rank; everything else is a global
    key (base deltas, heads) at its global shape or an ``aux.*`` tensor. (Ferret's
    payload is only ``aux.*``: the rank of what its client builds from it is checked by
    the client round trip.)"""
    fed = _fed(case)
    glob = _global(case)
    state = fed.aggregator.initialize(glob)
    updates, _, _ = _round(case, fed, state, glob, 1, _three(case))
    out = fed.aggregator.aggregate(state, glob, updates, 1)
    for st, tensors in ((state, glob), (out.state, out.tensors)):
        for pid, rank in [(0, r) for r in sorted(set(case.ranks))] + [(7, case.ranks[-1])]:
            payload = _payload(fed, st, tensors, fx.plan(pid, rank))
            assert payload
            for key, value in payload.items():
                if key.startswith(AUX_PREFIX):
                    continue
                assert key in tensors, f"payload key {key!r} is not a global key"
                assert tuple(value.shape) == shape_for_rank(key, tuple(tensors[key].shape), rank)


@pytest.mark.parametrize("case", _params("client"))
def test_the_client_half_round_trips(case):
    """Two rounds through the client half; round 2 has a newcomer (partition 3) next to
    clients that carry state from round 1."""
    fed = _fed(case)
    glob = _global(case)
    state = fed.aggregator.initialize(glob)
    cstates: dict[int, TensorDict] = {}
    penalty = getattr(fed.client, "penalty", None)
    for server_round in (1, 2):
        clients = _three(case, (3 + server_round, 5, 8))
        if server_round == 2:
            clients.append((3, case.ranks[-1], 6))
        updates, cstates, views = _round(case, fed, state, glob, server_round, clients, cstates)
        for v, u in zip(views, updates, strict=True):
            assert set(v.init) <= set(v.start)
            assert all(v.start[k].shape == v.init[k].shape for k in v.init)
            assert v.trainable and v.trainable <= set(v.init)  # the model's tensors
            assert all(isinstance(t, torch.Tensor) for t in v.state.values())
            assert _close(fx.save_load(v.state), v.state, atol=0.0)
            if callable(penalty):
                params = {k: v.start[k].clone().requires_grad_() for k in v.trainable}
                value = penalty(params, v.plan)
                assert value is None or (value.dim() == 0 and torch.isfinite(value))
            _accepts(fed, state, glob, u)
        out = fed.aggregator.aggregate(state, glob, updates, server_round)
        assert set(glob) <= set(out.tensors)
        state, glob = fx.save_load(out.state), out.tensors
