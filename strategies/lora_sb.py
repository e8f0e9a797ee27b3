"""``lora-sb``: Fed-SB — frozen A and B on every client, train and average only R.

Singhal et al., "Fed-SB: A Silver Bullet for Extreme Communication Efficiency and
Performance in (Private) Federated LoRA Fine-Tuning", arXiv:2502.15436 (2025), built
on LoRA-SB (Ponkshe et al., "Initialization using update approximation is a silver
bullet for extreme efficient low-rank fine-tuning", arXiv:2411.19557). Per adapted
layer (peft shapes)::

    W = W0 + s · B R A        B: (d_out, r) frozen,  R: (r, r) trained,  A: (r, d_in) frozen

with the same B and A on every client, so the update is linear in R and the server's
plain weighted mean is exact (Fed-SB §3)::

    R̄ = Σ_k p_k R_k    ⇒    s · B R̄ A = Σ_k p_k s · B R_k A

**Initialisation** (``lora-sb.init``). ``seeded`` (the default and the only one
implemented): A is the run's shared seeded initial ``lora_A`` (peft's kaiming-uniform,
which fedpeft already builds identically on the server and every client from the run
seed), and B is a seeded Rademacher matrix with unit-norm columns,
``B = S / √d_out``, ``S ∈ {±1}^(d_out, r)`` drawn from a ``torch.Generator`` keyed by
``(run seed, module path)`` — integer draws, so every machine computes the same bits
(a QR or Gaussian draw could differ in the last bit across BLAS/libm builds). Its
columns are near-orthogonal (Johnson–Lindenstrauss) and a draw without full column
rank is redrawn. R starts at 0, so the model starts at W0 exactly (the initial global
``lora_B`` is peft's zero) while ``∂L/∂R = s Bᵀ (∂L/∂W) Aᵀ`` is non-zero because both
frozen factors are — a zero B (LoRA's usual init) would leave R without gradient.
The scale: ``‖B R A‖`` is about ``‖R‖·‖A‖`` (unit columns in B), like a LoRA whose B
has unit-norm columns; since only r² numbers train, Fed-SB uses a larger learning
rate than LoRA (``train.lr``), which also absorbs any scale of B under Adam.
``svd`` (LoRA-SB's B, A from a truncated SVD of a first full-gradient estimate) is
NOT implemented: it needs a dense-gradient first round and a one-off A/B broadcast;
asking for it is refused at config time.

**A and B never cross the wire.** Both ends derive them from the run seed, so a
client needs no state. To fail loudly rather than train in a different basis
(another seed, model or torch build on some node), every payload carries a 24-bit
fingerprint of the server's A and B (``aux.lora-sb.basis``, one int64 that lossy
codecs pass through untouched, exact in float32 too) and the client refuses a round whose own A, B
fingerprint differs.

**Wire keys.** The r×r matrix R of module ``m`` travels under ``m.lora_B.weight``
with shape ``(r, r)`` (it is lora_B's coordinates in the frozen basis:
``lora_B = B R``); the server expects that shape (``upload_shape``). Uplink: R per
layer + the trainable head (``modules_to_save``), which is trained and averaged as
in the other strategies; ``lora_A`` is never uploaded. Downlink: R̄ per layer + head +
the fingerprint. So up/down ``Σ_ℓ r²·b`` + head per client per round, against
``Σ_ℓ r (d_in + d_out)·b`` for FedIT; lossy codecs code R − R̄ (the received R̄ is the
reference), as for any other key.

**Global adapter.** The server keeps R̄ per layer in its state (``"r/<module>"``,
``(r, r)``) and publishes a normal peft adapter: ``lora_A = A`` (unchanged) and
``lora_B = B R̄`` ``(d_out, r)``, so server evaluation, checkpoints, the saved adapter
and ``fedpeft compare`` see an ordinary LoRA adapter.

**Client training** (``local_round``). The cached peft model is loaded with the
folded ``lora_B = B R̄``; for the round, each LoRA module's ``lora_B`` linear
(``r → d_out``) is swapped for ``x ↦ B (R x)`` with R an ``(r, r)`` parameter
initialised to ``B⁺ lora_B`` (= R̄ up to fp32 rounding), the framework's own training
loop (``task.train``: optimizer, steps, seeds, precision, ``train.prox-mu`` on R and
the head) trains R and the head on a shallow copy of the model wrapper whose
trainable tensors are exactly those, and the original modules are put back (holding
``B R``) whatever happens. A frozen dataclass; nothing is kept between rounds.

One rank only (no ``lora.ranks``); no server optimizer or SCAFFOLD (they would move
``lora_B`` out of ``span(B)``). Sum-compatible (a plain weighted mean).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedpeft import (
    AUX_PREFIX,
    AggregatorBase,
    ClientAlgorithmBase,
    ClientPlan,
    ClientUpdate,
    ConfigError,
    FedStrategy,
    IncompatibleUpdateError,
    LocalRound,
    RoundOutput,
    StrategyEnv,
    TensorDict,
    client_weights,
    register_strategy,
    weighted_mean,
)
from fedpeft.lora.peft_io import factor_keys, lora_modules

INITS = ("seeded", "svd")
"""Values of ``lora-sb.init`` that are known; only ``seeded`` is implemented."""

FINGERPRINT = f"{AUX_PREFIX}lora-sb.basis"
"""Payload key of the int64 fingerprint of the server's frozen A and B, shape ``(1,)``."""

STATE_R = "r/"
"""Aggregator-state prefix of R̄ per module, ``(r, r)``."""


@dataclass(frozen=True)
class LoraSbConfig:
    """Options of ``lora-sb``.

    Attributes:
        init: how the frozen A and B are chosen: ``"seeded"`` (A from the run's
            seeded initial adapter, B a seeded Rademacher basis; see the module doc).
            ``"svd"`` (LoRA-SB's gradient-SVD initialisation) is not implemented and
            is refused.
    """

    init: str = "seeded"

    def problems(self) -> list[str]:
        """Invalid values, one line each."""
        if self.init == "svd":
            return [
                "lora-sb.init='svd' (LoRA-SB's initialisation from a truncated SVD of a "
                "first-round gradient) is not implemented; use lora-sb.init='seeded'"
            ]
        if self.init not in INITS:
            return [f"lora-sb.init must be 'seeded', got {self.init!r}"]
        return []


# -- the frozen basis -------------------------------------------------------------------


def _stream_seed(seed: int, module: str, draw: int) -> int:
    digest = hashlib.sha256(f"lora-sb/B/{seed}/{module}/{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def basis_b(seed: int, module: str, d_out: int, rank: int) -> torch.Tensor:
    """The frozen B of ``module``: ``S / √d_out``, ``S ∈ {±1}^(d_out, rank)``, fp32.

    Integer draws from a generator keyed by ``(seed, module)``: the same bits on every
    machine. A draw without full column rank is replaced by the next one.

    Raises:
        IncompatibleUpdateError: ``rank > d_out`` (no rank-``rank`` basis exists).
    """
    if rank > d_out:
        raise IncompatibleUpdateError(
            f"lora-sb: rank {rank} exceeds d_out={d_out} of {module!r}; B (d_out, r) "
            "cannot have full column rank"
        )
    for draw in range(64):
        gen = torch.Generator().manual_seed(_stream_seed(seed, module, draw))
        signs = torch.randint(0, 2, (d_out, rank), generator=gen, dtype=torch.int64) * 2 - 1
        if int(torch.linalg.matrix_rank(signs.to(torch.float64))) == rank:
            return signs.to(torch.float32) / torch.tensor(float(d_out)).sqrt()
    raise IncompatibleUpdateError(f"lora-sb: no full-rank basis for {module!r} ({d_out}×{rank})")


def bases(seed: int, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The frozen B ``(d_out, r)`` of every LoRA module of a peft-shaped adapter."""
    out = {}
    for module in lora_modules(tensors):
        d_out, rank = tensors[factor_keys(module)[1]].shape
        out[module] = basis_b(seed, module, int(d_out), int(rank))
    return out


def fingerprint(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """An int64 ``(1,)`` digest of the frozen factors (``a`` and ``b`` keyed by module).

    24 bits, so it is exact in float32 too: a lossy chain coding the downlink as a
    delta against what the client holds turns it into ``ref.float() + 0``. A chance
    collision (2⁻²⁴) only matters for a node that is misconfigured anyway.
    """
    h = hashlib.sha256()
    for module in sorted(b):
        h.update(module.encode())
        for t in (a[module], b[module]):
            t = t.detach().to("cpu", torch.float32).contiguous()
            h.update(repr(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
    return torch.tensor([int.from_bytes(h.digest()[:3], "little")], dtype=torch.int64)


def _frozen_a(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {m: tensors[factor_keys(m)[0]] for m in lora_modules(tensors)}


def _lstsq(b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``B⁺ W`` in float64: R ``(r, r)`` from ``W = B R`` ``(d_out, r)``."""
    return torch.linalg.lstsq(b.double(), w.double()).solution


# -- server -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSbAggregator(AggregatorBase[Any]):
    """Mean of the uploaded R (and extras); publishes ``lora_B = B R̄``, A unchanged.

    State: ``"r/<module>"`` → R̄ ``(r, r)``; ``"fingerprint"`` → the basis digest.
    """

    seed: int

    def initialize(self, global_tensors: TensorDict) -> dict[str, Any]:
        """R̄ = 0 per module (the global ``lora_B`` must be peft's zero init).

        Raises:
            IncompatibleUpdateError: a non-zero initial ``lora_B`` (not ``B·R`` for R=0).
        """
        b = bases(self.seed, global_tensors)
        state: dict[str, Any] = {}
        for module, basis in b.items():
            lora_b = global_tensors[factor_keys(module)[1]]
            if bool(lora_b.any()):
                raise IncompatibleUpdateError(
                    f"lora-sb needs the initial lora_B to be zero (R = 0); {module!r} is not"
                )
            rank = int(basis.shape[1])
            dtype = torch.promote_types(torch.float32, lora_b.dtype)  # at least float32
            state[STATE_R + module] = torch.zeros(rank, rank, dtype=dtype)
        state["fingerprint"] = fingerprint(_frozen_a(global_tensors), b)
        return state

    def client_payload(
        self, state: dict[str, Any], global_tensors: TensorDict, plan: ClientPlan
    ) -> TensorDict:
        """R̄ under each ``lora_B`` key ``(r, r)``, the extras and the fingerprint."""
        modules = lora_modules(global_tensors)
        factor = {k for m in modules for k in factor_keys(m)}
        out = {k: v for k, v in global_tensors.items() if k not in factor}
        out.update({factor_keys(m)[1]: state[STATE_R + m] for m in modules})
        out[FINGERPRINT] = state["fingerprint"]
        return out

    def upload_shape(
        self, key: str, shape: tuple[int, ...], tensors: TensorDict, plan: ClientPlan
    ) -> tuple[int, ...]:
        """``(r, r)`` for a ``lora_B`` key (it carries R); other keys as given."""
        if key.endswith(".lora_B.weight"):
            return (shape[1], shape[1])
        return shape

    def check_update(self, state: dict[str, Any], tensors: TensorDict, plan: ClientPlan) -> None:
        """Refuse an upload with a ``lora_A`` key, or without some module's R.

        Raises:
            IncompatibleUpdateError: that upload is left out of the round.
        """
        a = sorted(k for k in tensors if k.endswith(".lora_A.weight"))
        if a:
            raise IncompatibleUpdateError(f"lora-sb freezes A, but the update contains {a[:2]}")
        missing = sorted(
            factor_keys(k[len(STATE_R):])[1]
            for k in state
            if k.startswith(STATE_R) and factor_keys(k[len(STATE_R):])[1] not in tensors
        )
        if missing:
            raise IncompatibleUpdateError(f"lora-sb: the update has no R for {missing[:2]}")

    def aggregate(
        self,
        state: dict[str, Any],
        global_tensors: TensorDict,
        updates: Sequence[ClientUpdate],
        server_round: int,
    ) -> RoundOutput[dict[str, Any]]:
        """``R̄ = Σ_k p_k R_k`` and the mean extras; ``lora_B = B R̄``."""
        weights = client_weights(updates)
        keys = sorted(set(updates[0].tensors) & set(global_tensors))
        mean = weighted_mean([{k: u.tensors[k] for k in keys} for u in updates], weights)
        b = bases(self.seed, global_tensors)
        new = dict(global_tensors)
        new_state = dict(state)
        for key, value in mean.items():
            if key.endswith(".lora_B.weight"):
                module = key[: -len(".lora_B.weight")]
                # (r, r), at least float32: a float64 adapter's mean is not rounded
                r_bar = value.to(torch.promote_types(torch.float32, global_tensors[key].dtype))
                new_state[STATE_R + module] = r_bar
                new[key] = (b[module].double() @ r_bar.double()).to(global_tensors[key].dtype)
            else:
                new[key] = value
        norms = [float(new_state[STATE_R + m].norm()) for m in b]
        metrics = {"lora-sb/r_norm": sum(norms) / len(norms)} if norms else {}
        return RoundOutput(state=new_state, tensors=new, metrics=metrics)


# -- client -----------------------------------------------------------------------------


class _SbUp(torch.nn.Module):
    """Stand-in for peft's ``lora_B`` linear during training: ``x ↦ B (R x)``.

    ``x`` is ``(..., r)``; R ``(r, r)`` is trained, B ``(d_out, r)`` a frozen buffer.
    """

    def __init__(self, r: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.r = torch.nn.Parameter(r)
        self.register_buffer("b", b, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """``B R`` ``(d_out, r)``, for code that reads ``lora_B.weight`` (dtype, device)."""
        return self.b @ self.r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(torch.nn.functional.linear(x, self.r), self.b)


@dataclass(frozen=True)
class TrainR(ClientAlgorithmBase):
    """Fed-SB's client: frozen A (own seeded init) and B (seeded), train R and extras.

    ``start`` checks the basis fingerprint and loads ``lora_B = B R̄``; ``local_round``
    trains R (see the module doc); ``finish`` uploads R under the ``lora_B`` keys and
    the extras. Keeps no client state.
    """

    seed: int

    def start(
        self, received: TensorDict, init: TensorDict, state: TensorDict, plan: ClientPlan
    ) -> tuple[TensorDict, frozenset[str]]:
        """A from ``init``; ``lora_B = B R̄``; extras as received. Trainable: the
        ``lora_B`` keys (meaning their R) and the extras.

        Raises:
            IncompatibleUpdateError: no or a different basis fingerprint, or a
                missing / wrongly shaped R.
        """
        b = bases(self.seed, init)
        theirs = received.get(FINGERPRINT)
        if theirs is None:
            raise IncompatibleUpdateError(
                f"lora-sb: the server's payload has no {FINGERPRINT!r} (not a lora-sb server?)"
            )
        if not torch.equal(theirs.reshape(-1).to(torch.float64), fingerprint(_frozen_a(init), b).double()):
            raise IncompatibleUpdateError(
                "lora-sb: this client's frozen A/B differ from the server's (different run "
                "seed, model, target modules or torch build?); refusing to train in another basis"
            )
        start = dict(init)
        start.update({k: v for k, v in received.items() if k in init and not k.endswith(".lora_B.weight")})
        a_keys = set()
        for module, basis in b.items():
            key_a, key_b = factor_keys(module)
            a_keys.add(key_a)
            rank = int(basis.shape[1])
            r_bar = received.get(key_b)
            if r_bar is None or tuple(r_bar.shape) != (rank, rank):
                got = None if r_bar is None else tuple(r_bar.shape)
                raise IncompatibleUpdateError(
                    f"lora-sb: expected R {(rank, rank)} under {key_b!r}, got {got}"
                )
            start[key_b] = (basis.double() @ r_bar.double()).to(init[key_b].dtype)
        return start, frozenset(init) - a_keys

    def local_round(
        self, task: Any, model: Any, data: Any, trainable: frozenset[str], plan: ClientPlan, state: TensorDict
    ) -> LocalRound:
        """Train R ``(r, r)`` per module and the extras through ``task.train``."""
        name = model.adapter_name
        modules = lora_modules(model.params)
        extras = frozenset(k for k in trainable if not k.endswith(".lora_B.weight"))
        model.set_trainable(extras)  # A and the real lora_B frozen: no wasted gradients
        swapped: list[tuple[Any, Any, _SbUp]] = []
        try:
            params: dict[str, torch.nn.Parameter] = {k: model.params[k] for k in extras}
            for module in modules:
                key_b = factor_keys(module)[1]
                layer = model.model.get_submodule(module)
                original = layer.lora_B[name]
                w = original.weight.detach()  # (d_out, r) = B R̄
                basis = basis_b(self.seed, module, int(w.shape[0]), int(w.shape[1]))
                r0 = _lstsq(basis, w.float().cpu()).to(w.device, w.dtype)  # (r, r)
                up = _SbUp(r0, basis.to(w.device, w.dtype))
                layer.lora_B[name] = up
                swapped.append((layer, original, up))
                params[key_b] = up.r
            work = copy.copy(model)  # same peft model; its own view of the trainable tensors
            work.params = params
            anchor = {k: p.detach().clone() for k, p in params.items()}
            mu = float(task.cfg.train.prox_mu)
            penalty = None
            if mu > 0:  # FedProx on what is trained here (R and extras)

                def penalty(live: Mapping[str, torch.Tensor]) -> torch.Tensor:
                    return 0.5 * mu * sum(((p - anchor[k]) ** 2).sum() for k, p in live.items())

            result = task.train(work, data, frozenset(params), plan.seed, penalty)
            trained = work.tensors()  # R (r, r) under the lora_B keys, extras
        finally:
            with torch.no_grad():
                for layer, original, up in swapped:
                    original.weight.copy_(up.b @ up.r)
                    layer.lora_B[name] = original
        return LocalRound(result=result, tensors=trained)

    def finish(
        self, trained: TensorDict, received: TensorDict, state: TensorDict, plan: ClientPlan
    ) -> tuple[TensorDict, TensorDict]:
        """Upload R (``(r, r)`` under each ``lora_B`` key) and the extras; no state.

        Raises:
            IncompatibleUpdateError: a ``lora_B`` that is not ``(r, r)`` (not trained
                by :meth:`local_round`).
        """
        upload = {}
        for k, v in trained.items():
            if k.endswith(".lora_A.weight"):
                continue
            if k.endswith(".lora_B.weight") and (v.dim() != 2 or v.shape[0] != v.shape[1]):
                raise IncompatibleUpdateError(f"lora-sb: {k!r} should hold R (r, r), got {tuple(v.shape)}")
            upload[k] = v
        return upload, {}


def build(config: LoraSbConfig, env: StrategyEnv) -> FedStrategy:
    """Fed-SB: frozen seeded A and B; R (r×r per layer) and extras averaged exactly."""
    problems = config.problems()
    if problems:
        raise ConfigError(problems)
    return FedStrategy(
        aggregator=LoraSbAggregator(seed=env.seed),
        client=TrainR(seed=env.seed),
        own_global_update=(
            "lora-sb publishes lora_B = B·R̄ in a frozen basis B; a server optimizer or "
            "control variate would move lora_B out of span(B)"
        ),
    )


register_strategy(
    "lora-sb",
    config_cls=LoraSbConfig,
    build=build,
    summary="Fed-SB: frozen A, B; train and average only R (r×r) (Singhal et al., 2025)",
)
