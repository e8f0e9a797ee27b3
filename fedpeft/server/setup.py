"""Building a run's server side from its config, checked once, in one place.

``build_strategy`` is the single place where strategy × ranks × codecs × privacy
compatibility is decided (``parse_run_config`` checks keys and values;
``fedpeft.preflight.check_config`` runs both before any model is loaded).
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from datetime import datetime

from fedpeft.aggregation.robust_mean import INCOMPARABLE_STRATEGIES
from fedpeft.client.algorithm import overrides
from fedpeft.codecs import build_codec
from fedpeft.codecs.base import Chain
from fedpeft.codecs.budget import tunable
from fedpeft.config import RunConfig
from fedpeft.devices import DeviceProfile, parse_device_profile, profile_for, tier_of
from fedpeft.errors import ConfigError
from fedpeft.registry import FedStrategy, StrategyEnv, get_strategy
from fedpeft.types import NodeInfo


def strategy_env(cfg: RunConfig) -> StrategyEnv:
    """Run-level facts handed to a strategy's ``build``."""
    return StrategyEnv(
        seed=cfg.seed,
        num_rounds=cfg.federation.rounds,
        clients_per_round=cfg.federation.sampled,
        rank=cfg.lora.max_rank,
        ranks=cfg.lora.rank_list,
        lora_alpha=cfg.lora.alpha,
        use_rslora=cfg.lora.rslora,
    )


def build_strategy(cfg: RunConfig) -> tuple[FedStrategy, Chain, Chain]:
    """The configured strategy and codecs, with their compatibility checked.

    Raises:
        ConfigError: every incompatibility at once (a lossy codec with a strategy that
            needs exact tensors, an uplink-only stage on the downlink, privacy options
            the strategy or codec cannot honour).
    """
    name = cfg.strategy.name
    try:
        fed = get_strategy(name).build(cfg.options, strategy_env(cfg))
    except ValueError as err:
        raise ConfigError(f"{name}: {err}") from err
    if not fed.mixed_ranks and len(set(cfg.lora.rank_list)) > 1:
        raise ConfigError(
            f"strategy {name!r} does not support mixed ranks (lora.ranks={cfg.lora.ranks!r}); "
            "use one rank or a strategy with mixed-rank support"
        )
    uplink, downlink = build_codec(cfg.codec.uplink), build_codec(cfg.codec.downlink)
    if not fed.lossy_codecs:
        lossy = [
            f"codec.{d}={c.name!r}" for d, c in (("uplink", uplink), ("downlink", downlink))
            if not c.lossless
        ]
        if lossy:
            raise ConfigError(
                f"strategy {cfg.strategy.name!r} needs exact client tensors and cannot be "
                f"combined with the lossy codec {', '.join(lossy)}; use a lossless chain "
                "such as 'identity' or 'zstd'"
            )
    problems = []
    if cfg.budget.bytes_per_round:
        try:
            tunable(uplink)
        except ConfigError as err:
            problems.append(str(err))
    one_way = [s.name for s in downlink.stages if getattr(s, "uplink_only", False)]
    if one_way:
        problems.append(
            f"codec.downlink: stage(s) {one_way} code a client's change and work on the "
            "uplink only; use them in codec.uplink"
        )
    if cfg.privacy.secagg:
        if fed.needs_individual_updates:
            problems.append(
                f"privacy.secagg: strategy {name!r} needs each client's individual update, "
                "which sum-only secure aggregation hides; it cannot run under SecAgg"
            )
        else:
            problems.append(
                "privacy.secagg: Flower 1.41 provides SecAgg+ only in its legacy API, which "
                "fedpeft does not use; secure aggregation is not available"
            )
    if cfg.eval.split == "validation" and cfg.data.validation_size == 0:
        problems.append("eval.split=validation needs data.validation-size > 0 (the share to "
                        "evaluate on)")
    if cfg.train.prox_mu > 0 and overrides(fed.client, "local_round"):
        problems.append(
            f"train.prox-mu: strategy {name!r} trains in its own local_round, outside the "
            "framework's loop that adds the proximal term; it cannot use FedProx"
        )
    if cfg.train.logit_adjust > 0 and cfg.task.name != "classification":
        problems.append(
            f"train.logit-adjust needs a classification task (a label prior), got "
            f"task.name={cfg.task.name!r}"
        )
    if cfg.scaffold.enabled:
        if fed.own_global_update:
            problems.append(f"scaffold.enabled does not compose with strategy {name!r}: "
                            f"{fed.own_global_update}")
        if overrides(fed.client, "local_round"):
            problems.append(
                f"scaffold.enabled: strategy {name!r} trains in its own local_round, outside "
                "the framework's loop that applies the control variates"
            )
        if len(set(cfg.lora.rank_list)) > 1:
            problems.append(
                "scaffold.enabled needs one rank for every client (a variate per global "
                f"tensor), got lora.ranks={cfg.lora.ranks!r}"
            )
        if cfg.privacy.dp != "none":
            problems.append(
                "scaffold.enabled with privacy.dp: the control variates travel beside the "
                "update, outside what Flower's DP wrapper clips and noises; use one or the other"
            )
        if cfg.train.optimizer != "sgd":
            problems.append(
                "scaffold.enabled needs train.optimizer=sgd: its variates (x − y)/(K·lr) "
                "estimate the mean gradient only under SGD; under AdamW they are normalised "
                "steps, orders of magnitude larger than the gradients they correct (measured: "
                "fedit with SCAFFOLD and AdamW fell to the majority class, 0.42 vs 0.56)"
            )
    if cfg.server_opt.name != "none":
        if fed.own_global_update:
            problems.append(f"server-opt.name={cfg.server_opt.name!r} does not compose with "
                            f"strategy {name!r}: {fed.own_global_update}")
        if cfg.privacy.dp != "none":
            problems.append(
                f"server-opt.name={cfg.server_opt.name!r} with privacy.dp: Flower's DP wrapper "
                "adds its noise after fedpeft's aggregation, so the optimizer's moments would "
                "see the clients' updates without noise; use one or the other"
            )
    if cfg.privacy.dp != "none":
        if not fed.dp_compatible:
            problems.append(
                f"privacy.dp={cfg.privacy.dp!r} does not compose with strategy {name!r}: Flower's "
                "DP clipping needs clients to upload the whole global adapter (use fedit with "
                "one rank)"
            )
        if not uplink.lossless:
            problems.append(
                f"privacy.dp={cfg.privacy.dp!r} needs a lossless codec.uplink, got {uplink.name!r}"
            )
    if cfg.aggregation.robust_rule.name != "none":
        problems += robust_problems(cfg, fed)
    if problems:
        raise ConfigError(problems)
    return fed, uplink, downlink


def robust_problems(cfg: RunConfig, fed: FedStrategy) -> list[str]:
    """Why ``aggregation.robust`` cannot serve this run (empty: it can).

    Every rule compares the clients' uploads tensor by tensor, so their uploads must
    mean the same thing on every client (one rank; not Ferret's coordinates, FedSpine's
    pruned factors, FLoRA's fresh A per client, HetLoRA's shrinking ranks). The
    aggregate rules (median, trimmed-mean, geomed) replace the strategy's mean, so the
    strategy's aggregate must be a mean of the uploads.
    """
    name = cfg.strategy.name
    rule = cfg.aggregation.robust_rule
    key = f"aggregation.robust={cfg.aggregation.robust!r}"
    out = []
    if name in INCOMPARABLE_STRATEGIES:
        out.append(f"{key} does not apply to strategy {name!r}: {INCOMPARABLE_STRATEGIES[name]}")
    elif not fed.lossy_codecs:
        out.append(
            f"{key} does not apply to strategy {name!r}: it needs the exact client tensors, "
            "whose meaning only it knows"
        )
    if len(set(cfg.lora.rank_list)) > 1:
        out.append(
            f"{key} needs one rank for every client: uploads of different ranks "
            f"(lora.ranks={cfg.lora.ranks!r}) cannot be compared coordinate by coordinate"
        )
    if not rule.selects and name not in INCOMPARABLE_STRATEGIES and (
        fed.needs_individual_updates or fed.own_global_update
    ):
        why = fed.own_global_update or (
            "it computes its global update from each client's factors (products, "
            "residuals or an SVD), and a median of A and a median of B is not a median of BA"
        )
        out.append(
            f"{key} replaces the strategy's mean of the uploads, which strategy {name!r} "
            f"does not compute: {why}; use a rule that keeps whole clients (krum:f, "
            "multi-krum:f, cosine-filter)"
        )
    n = cfg.federation.sampled
    if rule.name in ("krum", "multi-krum") and n <= 2 * rule.param + 2:
        out.append(
            f"{key}: Krum tolerates f attackers among n clients only when n > 2f + 2; "
            f"{n} clients are sampled per round"
        )
    if rule.name == "trimmed-mean" and rule.param > 0 and int(rule.param * n) == 0:
        out.append(
            f"{key}: with {n} clients per round it trims int({rule.param:g}·{n}) = 0 "
            "values from each side, a plain mean; raise β or the clients per round"
        )
    if cfg.privacy.dp != "none":
        out.append(
            f"{key} with privacy.dp: the DP noise is calibrated to a mean of clipped "
            "updates, and a rule that looks at each update changes that sensitivity; "
            "use one or the other"
        )
    return out


def device_profiles(mix: str, nodes: Sequence[NodeInfo]) -> dict[int, tuple[str, DeviceProfile]]:
    """``{node_id: (tier, profile)}`` from the mix ``devices.profile`` (by partition id)
    and each node's ``device.*`` node-config overrides; ``{}`` when ``mix`` is ``""``.

    Raises:
        ConfigError: a node's ``device.*`` keys are invalid (the node is named).
    """
    if not mix:
        return {}
    out = {}
    for n in nodes:
        props = dict(n.properties)
        try:
            profile = parse_device_profile(props, default=profile_for(mix, n.partition_id))
        except ConfigError as err:
            raise ConfigError(f"node {n.node_id} (partition {n.partition_id}): {err}") from err
        out[n.node_id] = (str(props.get("device.tier", tier_of(mix, n.partition_id))), profile)
    return out


def resolve_output_dir(cfg: RunConfig) -> pathlib.Path:
    """``output.dir``, or a fresh ``runs/<strategy>-<timestamp>``."""
    if cfg.output.dir:
        return pathlib.Path(cfg.output.dir).expanduser().resolve()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return (pathlib.Path("runs") / f"{cfg.strategy.name}-{stamp}").resolve()


def checkpoint_dir(cfg: RunConfig) -> pathlib.Path:
    """``checkpoint.dir``, or ``<output.dir>/checkpoint``."""
    if cfg.checkpoint.dir:
        return pathlib.Path(cfg.checkpoint.dir).expanduser().resolve()
    return resolve_output_dir(cfg) / "checkpoint"
