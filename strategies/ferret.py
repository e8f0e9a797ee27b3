"""``ferret``: first-order local updates sent as coordinates on shared random bases.

Shu, Hu, Ng, Low, Yu, "Ferret: Federated Full-Parameter Tuning at Scale for Large
Language Models", ICML 2025 (PMLR 267), arXiv 2409.06277; code ``allen4747/Ferret``.
Specification: ALGORITHMS.md §10. The math (seeds, bases, budgets, normalisations,
aggregation, replay) lives in :mod:`fedpeft.projection`; this module wires it into
the strategy protocols. Per round ``t``, for the tuned tensors ``w`` (``(d_l,)`` blocks):

    client k:  sync its replica to w_{t−1} (replay Γ's, or the full state)
               train; Δ = w_{t−1} − w^{(k)}                   (old minus new)
               upload γ^{(k)}: Σ_l K_l (fp32 value, uint16 pool index) + offsets
    server:    Γ_t = μ Γ_{t−1} + Σ_k p_k γ^{(k)}              (dense (L, K) table)
               w_t = w_{t−1} − η_s Σ_{l,j} clip(Γ_t[l, j] v_{l,j}, C)
    downlink:  (Γ_t, P_t, η_s) per missed round — 4·L·K + 24 bytes each

Modes (``ferret.mode``):

* ``lora``: the tuned tensors are the LoRA adapter (A, B and any trainable head);
  Ferret replaces FedAvg's dense exchange of them.
* ``full``: full-parameter tuning of the base weights of the modules listed in
  ``lora.target-modules`` (``all-linear`` for every linear layer) plus any trainable
  head; the LoRA factors stay frozen at their initialisation (B = 0, no effect). The
  global model carries the change of each base weight as ``"<module>.base_layer.delta"``.

The projection of LoRA updates is also available as the uplink codec stage
``ferret:K`` (:mod:`fedpeft.codecs.ferret`) that any LoRA strategy can chain.

Sync. Both ends start from the same deterministic initial tensors (version 0; the
task seeds the model from the run seed). The server keeps every round's ``(Γ, P, η_s)``
and, per client, the version the client last trained from. A client is sent the
rounds it missed (replay, bit-exact on any machine) unless there are more than
``ferret.max-replay`` of them or the replay would be larger than the dense state, in
which case it receives the full state; every choice is logged. A client whose replica
was lost replies with an error, and the server resyncs it from version 0 (or the full
state) at its next message.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from fedpeft import (
    AUX_PREFIX,
    AggregatorBase,
    ClientAlgorithmBase,
    ClientPlan,
    ClientUpdate,
    ConfigError,
    FedPeftError,
    FedStrategy,
    IncompatibleUpdateError,
    RoundOutput,
    Started,
    StrategyEnv,
    TensorDict,
    client_weights,
    register_strategy,
)
from fedpeft.lora.peft_io import (
    base_delta_key,
    factor_keys,
    is_base_delta_key,
    is_lora_key,
    lora_modules,
)
from fedpeft.projection import (
    BlockLayout,
    FerretConfig,
    FerretServerState,
    RoundUpdate,
    apply_update,
    catch_up,
    client_seed,
    decode_coefficients,
    downlink_nbytes,
    encode_coefficients,
    encode_update,
    partition_blocks,
    pool_seed,
    server_update,
    upload_nbytes,
)

log = logging.getLogger("fedpeft")

PREFIX = AUX_PREFIX + "ferret."
HEADER = PREFIX + "header"
"""Downlink: int64 ``(target version, pool seed P_t, round t)``; uplink: int64
``(version trained from, round t, replayed rounds or −1 after a full state)``."""
REPLAY = {k: PREFIX + k for k in ("gamma", "rounds", "pool_seeds", "server_lrs")}
UPLOAD = {k: PREFIX + k for k in ("values", "indices", "offsets")}
REPLICA = PREFIX + "replica."
VERSION = PREFIX + "version"
FULL = PREFIX + "full."
DENSE = PREFIX + "dense."
HEADER_BYTES = 24
"""The int64 round header of every Ferret message (3 × 8 bytes)."""


@dataclass(frozen=True)
class FerretOptions:
    """Options of ``ferret`` (run-config section ``ferret``).

    Attributes:
        mode: ``lora`` (project LoRA updates) or ``full`` (train the base weights of
            the LoRA target modules and project them).
        num_seeds: ``K``, the shared seed pool and the largest per-block budget
            (reference script: 200).
        normalisation: ``unbiased`` (``γ = ⟨Δ, v⟩/(K_l σ²)``, ``E[Δ̃] = Δ``) or
            ``reference`` (the authors' ``d_l/K_l`` scaling, ≈ Δ/3 in expectation).
        server_lr: ``η_s``; 0 picks the normalisation's default (1 unbiased, 10 reference).
        server_lr_schedule: ``constant``, or ``linear`` annealing from ``server_lr``
            to 0 over the run (the reference's argparse default).
        clip_norm: per-(block, seed) clip ``C`` of the server update; negative picks
            the default (off for unbiased, 10 for reference); 0 turns it off.
        momentum: server momentum ``μ`` on the coordinate table.
        min_seeds: floor of the adaptive per-block budget.
        refresh_pool: a new seed pool every round (default; the paper's fresh shared
            randomness per round) instead of one for the run (``false``; the reference
            code, needed for ``momentum > 0``). With one pool every round's
            reconstruction is biased by the same basis and the run-long average does not
            converge to the true update; see :mod:`fedpeft.projection.ferret`.
        block_ratio: a new block starts when adding a tensor would exceed
            ``block_ratio × median tensor size``.
        max_replay: most missed rounds a client replays before it is sent the full
            state instead.
        projection: ``false`` turns Ferret off and exchanges the tuned tensors densely
            (client change up, full state down, example-weighted mean): FedAvg on the
            same tensors, the baseline Ferret's bytes are compared with (with
            ``mode=full``: full-parameter FedAvg).

    Defaults that differ from the paper (Shu et al., ICML 2025) or its reference
    code (``allen4747/Ferret``, ``scripts/ferret.sh``):

    * Default differs from the paper: ``mode=lora`` (paper: full-parameter tuning)
      because fedpeft compares Ferret with the LoRA strategies on the same adapter;
      ``mode=full`` with ``lora.target-modules=all-linear`` is the paper's setting.
    * Default differs from the reference code: ``normalisation=unbiased`` with
      ``η_s = 1`` and no clipping (code: ``d_l/K_l`` scaling, ≈ Δ/3 in expectation,
      compensated by ``η_s = 10`` and a per-term clip of 10) because the paper states
      an unbiased reconstruction; ``normalisation=reference`` restores the code's.
    * Default differs from the reference script: clients weighted by examples
      (script: ``--equal_weight``) because every fedpeft strategy weights by examples
      (ALGORITHMS.md §0), so methods are compared alike; the framework key
      ``aggregation.weighting=equal`` gives the script's weights.
    * Default differs from the reference code: ``refresh_pool=true`` (code: one pool
      of ``K`` candidate seeds drawn once in ``main.py``) because the paper draws
      fresh shared randomness every round and only then do the projection errors of
      successive rounds cancel.
    """

    mode: Literal["lora", "full"] = "lora"
    num_seeds: int = 200
    normalisation: Literal["unbiased", "reference"] = "unbiased"
    server_lr: float = 0.0
    server_lr_schedule: Literal["constant", "linear"] = "constant"
    clip_norm: float = -1.0
    momentum: float = 0.0
    min_seeds: int = 2
    refresh_pool: bool = True
    block_ratio: float = 0.9
    max_replay: int = 20
    projection: bool = True

    def core(self) -> FerretConfig:
        """The projection core's settings (validated there)."""
        reference = self.normalisation == "reference"
        slr = self.server_lr if self.server_lr > 0 else (10.0 if reference else 1.0)
        if self.clip_norm < 0:
            clip = 10.0 if reference else None
        else:
            clip = self.clip_norm if self.clip_norm > 0 else None
        return FerretConfig(
            num_seeds=self.num_seeds,
            normalisation=self.normalisation,
            server_lr=slr,
            clip_norm=clip,
            momentum=self.momentum,
            min_seeds=self.min_seeds,
            refresh_pool=self.refresh_pool,
        )


# --------------------------------------------------------------------------- tuned space


def tuned_space(tensors: Mapping[str, torch.Tensor], mode: str) -> TensorDict:
    """The tensors Ferret tunes, in a fixed (sorted) order.

    ``lora``: every adapter tensor. ``full``: the base delta ``(d_out, d_in)`` of every
    LoRA module (zeros unless ``tensors`` holds it) and every non-LoRA tensor (head).
    """
    if mode == "lora":
        out = {k: v for k, v in tensors.items() if not is_base_delta_key(k)}
    else:
        out = {k: v for k, v in tensors.items() if not is_lora_key(k)}
        for module in lora_modules(tensors):
            a_key, b_key = factor_keys(module)
            key = base_delta_key(module)
            if key not in out:  # (d_out, d_in) = (rows of B, columns of A)
                out[key] = torch.zeros(tensors[b_key].shape[0], tensors[a_key].shape[1])
    return {k: out[k] for k in sorted(out)}


def block_layout(space: Mapping[str, torch.Tensor], ratio: float) -> BlockLayout:
    """Blocks over the tuned space (both ends build it from the same names and sizes)."""
    return partition_blocks([(k, v.numel()) for k, v in space.items()], ratio)


def _lr_for(
    options: FerretOptions, core: FerretConfig, server_round: int, num_rounds: int
) -> float:
    if options.server_lr_schedule == "linear" and num_rounds > 0:
        return core.server_lr * max(0.0, 1.0 - (server_round - 1) / num_rounds)
    return core.server_lr


def _history_updates(state: Mapping[str, Any], start: int) -> list[RoundUpdate]:
    """Stored round updates of versions ``start+1 …`` (version = position + 1)."""
    out = []
    for i in range(start, len(state["gamma"])):
        out.append(
            RoundUpdate(
                i + 1,
                int(state["pool_seeds"][i]),
                state["gamma"][i],
                float(state["server_lrs"][i]),
            )
        )
    return out


def _pack_replay(updates: Sequence[RoundUpdate], num_blocks: int, num_seeds: int) -> TensorDict:
    gamma = (
        torch.stack([u.gamma.to(torch.float32) for u in updates])
        if updates
        else torch.zeros(0, num_blocks, num_seeds)
    )  # (R, L, K)
    lrs = torch.tensor([u.server_lr for u in updates], dtype=torch.float64)
    return {
        REPLAY["gamma"]: gamma,
        REPLAY["rounds"]: torch.tensor([u.server_round for u in updates], dtype=torch.int64),
        REPLAY["pool_seeds"]: torch.tensor([u.pool_seed for u in updates], dtype=torch.int64),
        REPLAY["server_lrs"]: lrs.view(torch.int64),  # float64 bits: exact on both ends
    }


def _unpack_replay(received: Mapping[str, torch.Tensor]) -> list[RoundUpdate]:
    gamma = received[REPLAY["gamma"]]
    rounds, seeds = received[REPLAY["rounds"]], received[REPLAY["pool_seeds"]]
    lrs = received[REPLAY["server_lrs"]].to(torch.int64).view(torch.float64)
    n = gamma.shape[0]
    if not (rounds.shape == seeds.shape == lrs.shape == (n,)):
        raise IncompatibleUpdateError(
            f"Ferret replay has {n} tables but rounds/pool_seeds/server_lrs of shapes "
            f"{tuple(rounds.shape)}, {tuple(seeds.shape)}, {tuple(lrs.shape)}"
        )
    return [RoundUpdate(int(rounds[i]), int(seeds[i]), gamma[i], float(lrs[i])) for i in range(n)]


# --------------------------------------------------------------------------- server


@dataclass(frozen=True)
class FerretAggregator(AggregatorBase[dict[str, Any]]):
    """Server half: aggregate coordinates, reconstruct once, keep the replay history.

    State (checkpointable plain values): ``gamma``/``pool_seeds``/``server_lrs``/
    ``rounds`` (one entry per version), ``synced`` (partition id → version the
    client last trained from, ``-1`` = unknown), ``momentum`` (last Γ or ``None``),
    ``num_blocks``.
    """

    options: FerretOptions
    run_seed: int
    num_rounds: int

    def initialize(self, global_tensors: TensorDict) -> dict[str, Any]:
        """Empty history; every client is at version 0 (the shared initial tensors)."""
        space = tuned_space(global_tensors, self.options.mode)
        return {
            "gamma": [],
            "pool_seeds": [],
            "server_lrs": [],
            "rounds": [],
            "synced": {},
            "momentum": None,
            "num_blocks": block_layout(space, self.options.block_ratio).num_blocks,
            "shapes": {k: list(v.shape) for k, v in space.items()},
        }

    def client_payload(
        self, state: dict[str, Any], global_tensors: TensorDict, plan: ClientPlan
    ) -> TensorDict:
        """The missed rounds' ``(Γ, P, η_s)`` — or the full state — plus the header."""
        core = self.options.core()
        version = len(state["rounds"])
        server_round = int(state["rounds"][-1]) + 1 if state["rounds"] else 1
        synced = int(state["synced"].get(str(plan.partition_id), 0))
        start = synced if 0 <= synced <= version else 0
        missed = version - start
        space = tuned_space(global_tensors, self.options.mode)
        dense = sum(v.numel() * 4 for v in space.values())
        replay_bytes = downlink_nbytes(state["num_blocks"], core.num_seeds, missed)
        header = torch.tensor(
            [version, pool_seed(self.run_seed, server_round, core), server_round], dtype=torch.int64
        )
        if not self.options.projection:
            out = {FULL + k: v for k, v in space.items()}  # FedAvg: the model, every round
        elif missed <= self.options.max_replay and replay_bytes <= dense:
            if missed:
                log.info(
                    "ferret: partition %d catches up from version %d by replaying %d round(s) (%d B)",
                    plan.partition_id,
                    start,
                    missed,
                    replay_bytes,
                )
            out = _pack_replay(_history_updates(state, start), state["num_blocks"], core.num_seeds)
        else:
            log.info(
                "ferret: partition %d is %d round(s) behind (ferret.max-replay=%d, replay %d B "
                "vs dense %d B): sending the full state",
                plan.partition_id,
                missed,
                self.options.max_replay,
                replay_bytes,
                dense,
            )
            out = {FULL + k: v for k, v in space.items()}
        out[HEADER] = header
        return out

    def check_update(self, state: dict[str, Any], tensors: TensorDict, plan: ClientPlan) -> None:
        """Reject uploads that are not well-formed coordinates of this round."""
        expected = (
            set(UPLOAD.values())
            if self.options.projection
            else {DENSE + k for k in state["shapes"]}
        ) | {HEADER}
        unknown = sorted(set(tensors) - expected)
        if unknown:
            raise IncompatibleUpdateError(
                f"Ferret upload has unexpected tensors {unknown[:3]}; expected only "
                f"{sorted(expected)[:4]}"
            )
        if self.options.projection:
            self._decode(state, tensors)
        else:
            for key, shape in state["shapes"].items():
                value = tensors.get(DENSE + key)
                if value is None or list(value.shape) != list(shape):
                    raise IncompatibleUpdateError(
                        f"dense upload of {key!r} is {None if value is None else tuple(value.shape)}, "
                        f"expected {tuple(shape)}"
                    )
        header = tensors.get(HEADER)
        version = len(state["rounds"])
        if header is None or tuple(header.shape) != (3,) or int(header[0]) != version:
            raise IncompatibleUpdateError(
                f"Ferret upload header {None if header is None else header.tolist()} does not "
                f"say it was trained from the current version {version}"
            )

    def _decode(self, state: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Any:
        arrays = {
            k.removeprefix(PREFIX): v.numpy() for k, v in tensors.items() if k in UPLOAD.values()
        }
        return decode_coefficients(
            arrays, num_blocks=state["num_blocks"], num_seeds=self.options.num_seeds
        )

    def client_failed(self, state: dict[str, Any], plan: ClientPlan, reason: str) -> dict[str, Any]:
        """A client that replied with an error may have lost its replica: resync it."""
        synced = dict(state["synced"])
        synced[str(plan.partition_id)] = -1
        return {**state, "synced": synced}

    def aggregate(
        self,
        state: dict[str, Any],
        global_tensors: TensorDict,
        updates: Sequence[ClientUpdate],
        server_round: int,
    ) -> RoundOutput[dict[str, Any]]:
        """``Γ_t = μΓ_{t−1} + Σ_k p_k γ^{(k)}``, then ``w_t = w_{t−1} − η_s Σ clip(Γ v)``."""
        core = self.options.core()
        version = len(state["rounds"])
        weights = client_weights(updates)
        space = tuned_space(global_tensors, self.options.mode)
        if self.options.projection:
            uploads = [self._decode(state, u.tensors) for u in updates]
            given = {int(u.tensors[HEADER][1]) for u in updates}
            if len(given) != 1:
                raise IncompatibleUpdateError(
                    f"Ferret uploads were trained for different rounds {sorted(given)}"
                )
            new_server, update = server_update(
                _server_state(state),
                uploads,
                weights,
                server_round=version + 1,
                pool_seed=pool_seed(self.run_seed, given.pop(), core),
                config=core,
                server_lr=_lr_for(self.options, core, server_round, self.num_rounds),
            )
            new_space = apply_update(
                space, block_layout(space, self.options.block_ratio), update, core
            )
            sent = [float(upload_nbytes(c.budgets) + HEADER_BYTES) for c in uploads]
            record = (update.gamma, update.pool_seed, update.server_lr)
            momentum = new_server.gamma if core.momentum > 0 else None
        else:  # FedAvg on the same tensors: w_t = w_{t−1} − Σ_k p_k Δ_k
            new_space = {}
            for key, value in space.items():
                mean = sum(
                    p * u.tensors[DENSE + key].double()
                    for p, u in zip(weights, updates, strict=True)
                )
                new_space[key] = (value.double() - mean).to(value.dtype)
            sent = [float(sum(v.numel() * 4 for v in space.values()) + HEADER_BYTES)] * len(updates)
            record = (torch.zeros(0), 0, 1.0)
            momentum = None
        tensors = {**global_tensors, **new_space}
        synced = dict(state["synced"])
        replayed = []
        for u in updates:
            synced[str(u.plan.partition_id)] = version
            replayed.append(float(u.tensors[HEADER][2]))
        step = math.sqrt(sum(float(((new_space[k] - space[k]).double() ** 2).sum()) for k in space))
        new_state = {
            **state,
            "gamma": [*state["gamma"], record[0]],
            "pool_seeds": [*state["pool_seeds"], record[1]],
            "server_lrs": [*state["server_lrs"], record[2]],
            "rounds": [*state["rounds"], server_round],
            "synced": synced,
            "momentum": momentum,
        }
        metrics = {
            "ferret/uplink_formula_bytes": float(sum(sent)),
            "ferret/full_syncs": float(sum(1 for r in replayed if r < 0)),
            "ferret/replayed_rounds": float(sum(r for r in replayed if r > 0)),
            "ferret/step_norm": step,
        }
        if self.options.projection:
            metrics["ferret/coefficients_mean"] = float(np.mean([sum(c.budgets) for c in uploads]))
            metrics["ferret/server_lr"] = record[2]
        return RoundOutput(new_state, tensors, metrics)


def _server_state(state: Mapping[str, Any]) -> FerretServerState:
    return FerretServerState(state["momentum"], len(state["rounds"]))


# --------------------------------------------------------------------------- client


@dataclass(frozen=True)
class FerretClient(ClientAlgorithmBase):
    """Client half: sync the replica, train the tuned tensors, upload coordinates.

    State: the replica of the tuned tensors (``aux.ferret.replica.<key>``) and its
    version (``aux.ferret.version``).
    """

    options: FerretOptions
    run_seed: int

    def _replica(
        self, received: TensorDict, init: TensorDict, state: TensorDict
    ) -> tuple[TensorDict, int, int]:
        """``(tuned tensors at the target version, that version, replayed or −1)``."""
        core = self.options.core()
        header = received.get(HEADER)
        if header is None:
            raise IncompatibleUpdateError(
                f"Ferret message lacks {HEADER!r}; is the server running ferret?"
            )
        target = int(header[0])
        full = {k[len(FULL) :]: v for k, v in received.items() if k.startswith(FULL)}
        if full:
            return dict(full), target, -1
        updates = _unpack_replay(received)
        first = updates[0].server_round - 1 if updates else target
        mine = int(state[VERSION][0]) if VERSION in state else 0
        if mine >= first and mine <= target and VERSION in state:
            replica = {k[len(REPLICA) :]: v for k, v in state.items() if k.startswith(REPLICA)}
        elif first == 0:
            replica, mine = tuned_space(init, self.options.mode), 0
        else:
            raise FedPeftError(
                f"Ferret replica is at version {mine if VERSION in state else 'none'} but the "
                f"server replays from version {first}: this client's state was lost; the "
                "server resyncs it at its next message"
            )
        layout = block_layout(replica, self.options.block_ratio)
        replica, version = catch_up(replica, layout, updates, core, synced_round=mine)
        if version != target:
            raise IncompatibleUpdateError(
                f"Ferret replay ended at version {version}, the server is at {target}"
            )
        return replica, target, len([u for u in updates if u.server_round > mine])

    def start(
        self, received: TensorDict, init: TensorDict, state: TensorDict, plan: ClientPlan
    ) -> Started:
        """Load the synced replica over ``init``; train exactly the tuned tensors.
        ``finish`` gets the synced replica as ``carry`` (a replay is computed once)."""
        replica, version, replayed = self._replica(received, init, state)
        start = dict(init)
        start.update(replica)
        return Started(start, frozenset(replica), carry=(replica, version, replayed))

    def finish(
        self,
        trained: TensorDict,
        received: TensorDict,
        state: TensorDict,
        plan: ClientPlan,
        carry: Any = None,
    ) -> tuple[TensorDict, TensorDict]:
        """Project ``Δ = replica − trained`` on the round's bases; keep the replica."""
        if carry is None:
            raise FedPeftError("FerretClient.finish needs the carry its start returned")
        replica, version, replayed = carry
        new = {k: trained[k] for k in replica}
        server_round = int(received[HEADER][2])
        header = torch.tensor([version, server_round, replayed], dtype=torch.int64)
        new_state: TensorDict = {REPLICA + k: v for k, v in replica.items()}
        new_state[VERSION] = torch.tensor([version], dtype=torch.int64)
        if not self.options.projection:
            dense = {DENSE + k: (replica[k].float() - new[k].float()) for k in replica}
            return {**dense, HEADER: header}, {}
        layout = block_layout(replica, self.options.block_ratio)
        coeffs = encode_update(
            replica,
            new,
            layout,
            pool_seed=int(received[HEADER][1]),
            client_seed=client_seed(self.run_seed, server_round, plan.partition_id),
            config=self.options.core(),
        )
        packed = encode_coefficients(coeffs)
        upload: TensorDict = {UPLOAD[k]: torch.from_numpy(v) for k, v in packed.items()}
        upload[HEADER] = header
        return upload, new_state


def build(config: FerretOptions, env: StrategyEnv) -> FedStrategy:
    """Ferret on the LoRA adapter (``mode=lora``) or on base weights (``mode=full``)."""
    config.core()  # validate early: a bad option fails at config time
    if config.max_replay < 0:
        raise ConfigError(f"ferret.max-replay must be >= 0, got {config.max_replay}")
    if not 0.0 < config.block_ratio:
        raise ConfigError(f"ferret.block-ratio must be > 0, got {config.block_ratio}")
    if len(set(env.ranks)) > 1:
        raise ConfigError(
            f"ferret needs one rank for every client (the seed bases are shared), got "
            f"lora.ranks={','.join(map(str, env.ranks))}"
        )
    return FedStrategy(
        aggregator=FerretAggregator(config, env.seed, env.num_rounds),
        client=FerretClient(config, env.seed),
        lossy_codecs=False,
        own_global_update=(
            "Ferret's clients rebuild the global adapter by replaying the server's own "
            "updates, which an outside step would change behind their back, and upload "
            "projections, not tensors; use ferret.momentum and ferret.server-lr"
        ),
    )


register_strategy(
    "ferret",
    config_cls=FerretOptions,
    build=build,
    summary="shared-seed projection of first-order updates, LoRA or full (Shu et al., ICML 2025)",
)
