"""``synthetic``: tiny dense layers + LoRA on per-client low-rank regression targets.

Why it exists. Claims about LoRA aggregation (FedIT's mean of factors is not the mean
of products and the gap grows with client disagreement; FedEx-LoRA and FLoRA are
exact; LoRA-FAIR narrows the gap) need many seeds to separate, and a 2-core CPU
cannot run many seeds of MiniLM. Here a 4-client × 5-round run takes seconds, the
clients' disagreement is one knob, and every target is exactly reachable by a LoRA
update, so what is left of the global loss is the aggregation and the heterogeneity,
not the model's capacity.

Model. A frozen random three-layer network (no biases), seeded by the run seed only,
so the server and every client build the same base::

    x  (B, 16)  ──fc1 (32×16)──▶ σ ──fc2 (32×32)──▶ σ ──fc3 (16×32)──▶ ŷ  (B, 16)
    W_l ~ N(0, 1/d_in) entry-wise                       σ = tanh (``model.name=mlp``,
                                                        default) or the identity
                                                        (``model.name=linear``)

wrapped by peft's LoRA on ``fc1``, ``fc2``, ``fc3`` (``lora.target-modules``, default
all three; ``all-linear`` means the same), so the adapter is an ordinary peft adapter
(keys ``base_model.model.fc1.lora_A.weight`` ``(r, 16)`` …) and every LoRA strategy
runs on it unchanged.

Targets. For each layer ``l`` (shape ``(d_out, d_in)``), a shared update ``S_l`` and,
per client ``k``, an own update ``O_{l,k}``, each a rank-4 product ``G_B G_A`` of
Gaussian ``(d_out, 4)`` and ``(4, d_in)`` factors rescaled to Frobenius norm
``0.5 · ‖W_l‖_F``. With ``h = data.heterogeneity`` ∈ [0, 1]::

    ΔW_{l,k} = √(1 − h) · S_l + √h · O_{l,k}                          (d_out, d_in)
    f_k(x)   = fc3' σ(fc2' σ(fc1' x))   with  fc_l' = W_l + ΔW_{l,k}   (client k's map)
    y        = f_k(x) + 0.01 · ε,       x, ε ~ N(0, I)                 (B, 16) each

``h = 0``: every client has the same target map (only its samples differ); ``h = 1``:
each client's update is its own, independent of the others'. In between,
``E⟨ΔW_j, ΔW_k⟩ / E‖ΔW‖² = 1 − h`` for ``j ≠ k`` (the square roots keep every
client's update equally large, so ``h`` changes the disagreement, not the
difficulty). Each client's update has rank ≤ 8, so a rank-8 adapter (``lora.r``
default) can fit any one client exactly; the average of several cannot in general.
``S`` depends on ``seed``, ``O_{·,k}`` on ``(seed, k)`` and the samples on
``(seed, k)``, so a client's data does not depend on the number of clients, and the
inputs ``x`` do not depend on ``h``.

Data. Client ``k`` trains on ``data.max-examples`` examples (256 when 0) drawn
from its own map; with ``eval.client`` it also gets ``⌊n · data.client-test-fraction⌋``
(at least 1) fresh examples for local evaluation. The server's test set
(``data.test-size``, 512 when 0) is ``⌊test-size / K⌋`` examples from each of the
``K = federation.clients`` clients' maps, so the server's loss is the equal-weight
mean of the clients' objectives (equal to the example-weighted mean: every client
has the same size) — the "global loss". Loss: mean squared error over examples and
output coordinates. Evaluation reports ``loss`` only (no accuracy).

``model.name=linear`` drops the activations: the network is a product of matrices,
so with one layer in ``lora.target-modules`` the loss is quadratic in that layer's
LoRA product, and in ``B`` alone when ``A`` is frozen (FFA-LoRA): a quadratic for
claims such as client-drift corrections.

Not supported: ``data.partition`` other than ``iid`` (the split is the targets, set
by ``data.heterogeneity``) and ``fedspine`` (it prunes BERT attention heads and FFN
channels; this model has neither); both are refused with a :class:`ConfigError` when
the task is built. FedSA-LoRA runs but keeps every ``B`` on its client, so the global
adapter's ``B`` stays 0 and the server's loss stays at round 0's: use ``eval.client``.

Local training is :func:`fedpeft.tasks.train.local_train`'s loop (same steps,
optimizer, seeded batch order, penalty and ``on_step`` hooks) on regression batches:
``local_train`` batches token :class:`~fedpeft.tasks.data.Examples` itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedpeft.config import RunConfig
from fedpeft.errors import ConfigError
from fedpeft.seeding import derive_seed
from fedpeft.tasks.base import PARTITIONS_BUILT, Task
from fedpeft.tasks.model import AdapterModel, cached, seeded
from fedpeft.tasks.train import PenaltyFn, StepFn, TrainResult, local_train

D_IN, HIDDEN, D_OUT = 16, 32, 16
LAYERS: dict[str, tuple[int, int]] = {
    "fc1": (HIDDEN, D_IN),
    "fc2": (HIDDEN, HIDDEN),
    "fc3": (D_OUT, HIDDEN),
}
"""Layer name → weight shape ``(d_out, d_in)``, in forward order."""
TARGET_RANK = 4
"""Rank of the shared and of each own update (a client's update has rank ≤ 8)."""
TARGET_SCALE = 0.5
"""``‖S_l‖_F = ‖O_{l,k}‖_F = TARGET_SCALE · ‖W_l‖_F``."""
NOISE_STD = 0.01
DEFAULT_EXAMPLES = 256
DEFAULT_TEST_SIZE = 512
MODELS = {"mlp": torch.tanh, "linear": None}
"""``model.name`` → activation between layers (``None``: identity)."""


def _generator(*parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def base_weights(seed: int) -> dict[str, torch.Tensor]:
    """The frozen base ``{layer: W_l (d_out, d_in)}``, entries ``N(0, 1/d_in)``."""
    gen = _generator(seed, "synthetic", "base")
    return {
        name: torch.randn(shape, generator=gen) / math.sqrt(shape[1])
        for name, shape in LAYERS.items()
    }


def _low_rank(gen: torch.Generator, shape: tuple[int, int], norm: float) -> torch.Tensor:
    """A Gaussian rank-:data:`TARGET_RANK` matrix of Frobenius norm ``norm``."""
    left = torch.randn((shape[0], TARGET_RANK), generator=gen)  # (d_out, 4)
    right = torch.randn((TARGET_RANK, shape[1]), generator=gen)  # (4, d_in)
    product = left @ right  # (d_out, d_in)
    return product * (norm / float(product.norm()))


def shared_update(seed: int) -> dict[str, torch.Tensor]:
    """``{layer: S_l (d_out, d_in)}``, common to every client."""
    gen = _generator(seed, "synthetic", "shared")
    return {
        name: _low_rank(gen, w.shape, TARGET_SCALE * float(w.norm()))
        for name, w in base_weights(seed).items()
    }


def own_update(seed: int, partition_id: int) -> dict[str, torch.Tensor]:
    """``{layer: O_{l,k} (d_out, d_in)}`` of client ``k = partition_id``."""
    gen = _generator(seed, "synthetic", "own", partition_id)
    return {
        name: _low_rank(gen, w.shape, TARGET_SCALE * float(w.norm()))
        for name, w in base_weights(seed).items()
    }


def target_update(seed: int, partition_id: int, heterogeneity: float) -> dict[str, torch.Tensor]:
    """``{layer: ΔW_{l,k} = √(1 − h) S_l + √h O_{l,k}}`` of client ``k = partition_id``."""
    shared = shared_update(seed)
    if heterogeneity == 0.0:
        return shared
    own = own_update(seed, partition_id)
    a, b = math.sqrt(1.0 - heterogeneity), math.sqrt(heterogeneity)
    return {name: a * shared[name] + b * own[name] for name in LAYERS}


def forward(
    weights: Mapping[str, torch.Tensor], x: torch.Tensor, model: str = "mlp"
) -> torch.Tensor:
    """The network with ``weights`` (``{layer: (d_out, d_in)}``) applied to ``x`` ``(B, 16)``;
    returns ``(B, 16)``."""
    act = MODELS[model]
    h = x
    for i, name in enumerate(LAYERS):
        h = h @ weights[name].T  # (B, d_out of layer)
        if act is not None and i < len(LAYERS) - 1:
            h = act(h)
    return h


def target_weights(seed: int, partition_id: int, heterogeneity: float) -> dict[str, torch.Tensor]:
    """Client ``k``'s target weights ``{layer: W_l + ΔW_{l,k}}``."""
    base = base_weights(seed)
    delta = target_update(seed, partition_id, heterogeneity)
    return {name: base[name] + delta[name] for name in LAYERS}


@dataclass(frozen=True)
class SyntheticData:
    """Regression examples.

    Attributes:
        x: inputs ``(n, 16)``.
        y: targets ``(n, 16)``.
        source: partition id of the client whose map made each example ``(n,)``.
    """

    x: torch.Tensor
    y: torch.Tensor
    source: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batch(self, indices: Sequence[int] | np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """``{"x": (B, 16), "y": (B, 16)}`` of ``indices`` (all examples when ``None``)."""
        if indices is None:
            return {"x": self.x, "y": self.y}
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return {"x": self.x[idx], "y": self.y[idx]}


def sample(
    seed: int, partition_id: int, heterogeneity: float, n: int, stream: str, model: str = "mlp"
) -> SyntheticData:
    """``n`` examples of client ``partition_id``'s map; ``stream`` names the draw
    (``"train"``, ``"client-test"``, ``"test"``): its inputs and noise depend on
    ``(seed, stream, partition_id)`` only, not on ``heterogeneity``."""
    gen = _generator(seed, "synthetic", stream, partition_id)
    x = torch.randn((n, D_IN), generator=gen)  # (n, 16)
    noise = torch.randn((n, D_OUT), generator=gen)  # (n, 16)
    with torch.no_grad():
        y = forward(target_weights(seed, partition_id, heterogeneity), x, model) + NOISE_STD * noise
    return SyntheticData(x=x, y=y, source=torch.full((n,), partition_id, dtype=torch.long))


class DenseNet(torch.nn.Module):
    """The frozen base: ``fc1``, ``fc2``, ``fc3`` without biases (see the module doc)."""

    def __init__(self, weights: Mapping[str, torch.Tensor], model: str) -> None:
        super().__init__()
        self.act_name = model
        for name, (d_out, d_in) in LAYERS.items():
            layer = torch.nn.Linear(d_in, d_out, bias=False)
            with torch.no_grad():
                layer.weight.copy_(weights[name])
            setattr(self, name, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 16) -> (B, 16)
        act = MODELS[self.act_name]
        h = x
        for i, name in enumerate(LAYERS):
            h = getattr(self, name)(h)
            if act is not None and i < len(LAYERS) - 1:
                h = act(h)
        return h


class Synthetic(Task):
    """Per-client low-rank regression on a tiny dense network (see the module doc)."""

    name = "synthetic"
    classification = False
    default_model = "mlp"
    default_targets = tuple(LAYERS)
    default_test_size = DEFAULT_TEST_SIZE

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        problems = []
        if self.model_name not in MODELS:
            problems.append(
                f"model.name={self.model_name!r} is not a synthetic model; use "
                f"{' or '.join(repr(m) for m in MODELS)} (or '' for 'mlp')"
            )
        if self.targets == ("all-linear",):
            self.targets = tuple(LAYERS)
        unknown = [t for t in self.targets if t not in LAYERS]
        if unknown:
            problems.append(
                f"lora.target-modules={','.join(self.targets)!r}: {', '.join(map(repr, unknown))} "
                f"is not a layer of the synthetic model; its layers are {', '.join(LAYERS)} "
                "(or 'all-linear')"
            )
        if cfg.data.partition != "iid":
            problems.append(
                f"data.partition={cfg.data.partition!r} does not apply to task.name='synthetic' "
                "(its clients differ by their targets: set data.heterogeneity); use iid"
            )
        if cfg.strategy.name == "fedspine":
            problems.append(
                "strategy fedspine prunes BERT attention heads and FFN channels; the synthetic "
                "task's dense layers have neither: use another strategy or task.name=classification"
            )
        if problems:
            raise ConfigError("; ".join(problems))
        self.heterogeneity = float(cfg.data.heterogeneity)
        self.examples = cfg.data.max_examples or DEFAULT_EXAMPLES

    # -- model --------------------------------------------------------------------
    def _build(self, rank: int) -> AdapterModel:
        from peft import LoraConfig, get_peft_model

        base = DenseNet(base_weights(self.cfg.seed), self.model_name)
        for p in base.parameters():
            p.requires_grad_(False)
        with seeded(derive_seed(self.cfg.seed, "init")):  # LoRA A's initialisation
            lora = LoraConfig(
                r=rank,
                lora_alpha=self.cfg.lora.alpha,
                lora_dropout=self.cfg.lora.dropout,
                target_modules=list(self.targets),
                use_rslora=self.cfg.lora.rslora,
            )
            peft_model = get_peft_model(base, lora)
        peft_model.eval()
        return AdapterModel(peft_model, pad_id=0, layout=self.layout(rank))

    def loss(
        self, model: AdapterModel, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(MSE, prediction (B, 16))`` of a batch ``{"x": (B, 16), "y": (B, 16)}``."""
        pred = model.model(batch["x"])
        return torch.nn.functional.mse_loss(pred, batch["y"]), pred

    # -- data ---------------------------------------------------------------------
    def _data_key(self, *parts: Any) -> tuple[Any, ...]:
        return self._key("synthetic-data", self.cfg.seed, self.heterogeneity, *parts)

    def target_weights(self, partition_id: int) -> dict[str, torch.Tensor]:
        """Client ``partition_id``'s target weights ``{layer: W_l + ΔW_{l,k}}``."""
        return target_weights(self.cfg.seed, partition_id, self.heterogeneity)

    def test_data(self) -> SyntheticData:
        """``⌊test-size / K⌋`` examples from each of the ``K = federation.clients``
        clients' maps (the mixture: the server's loss is the mean client objective);
        with ``eval.split=validation``, ``⌊data.validation-size / K⌋`` fresh ones of
        the same mixture (another stream, so tuning never sees the test draw)."""
        clients = self.cfg.federation.clients
        validation = self.cfg.eval.split == "validation"
        stream = "validation" if validation else "test"
        size = self.cfg.data.validation_size if validation else self.test_size
        per = max(1, size // clients)

        def build() -> SyntheticData:
            parts = [
                sample(self.cfg.seed, k, self.heterogeneity, per, stream, self.model_name)
                for k in range(clients)
            ]
            return SyntheticData(
                x=torch.cat([p.x for p in parts]),
                y=torch.cat([p.y for p in parts]),
                source=torch.cat([p.source for p in parts]),
            )

        return cached(self._data_key(stream, clients, per, self.model_name), build)

    def client_data(
        self, partition_id: int, num_partitions: int
    ) -> tuple[SyntheticData, SyntheticData]:
        """``(train, local test)`` of one client; local test is empty unless ``eval.client``."""
        if not 0 <= partition_id < num_partitions:
            raise ConfigError(f"partition-id must be in [0, {num_partitions}), got {partition_id}")
        n = self.examples
        n_test = max(1, int(n * self.cfg.data.client_test_fraction)) if self.cfg.eval.client else 0

        def build() -> tuple[SyntheticData, SyntheticData]:
            PARTITIONS_BUILT[(partition_id, num_partitions)] += 1
            args = (self.cfg.seed, partition_id, self.heterogeneity)
            return (
                sample(*args, n, "train", self.model_name),
                sample(*args, n_test, "client-test", self.model_name),
            )

        return cached(self._data_key("client", partition_id, n, n_test, self.model_name), build)

    def target_cosine(self, num_partitions: int) -> float:
        """Mean pairwise cosine of the clients' updates ``ΔW_k`` (all layers as one vector;
        ≈ ``1 − h``; 1.0 with one client)."""
        flat = torch.stack(
            [
                torch.cat(
                    [
                        d.flatten()
                        for d in target_update(self.cfg.seed, k, self.heterogeneity).values()
                    ]
                )
                for k in range(num_partitions)
            ]
        )  # (K, Σ d_out·d_in)
        if num_partitions < 2:
            return 1.0
        unit = flat / flat.norm(dim=1, keepdim=True)
        cos = unit @ unit.T  # (K, K)
        off = cos[~torch.eye(num_partitions, dtype=torch.bool)]
        return float(off.mean())

    def split_summary(self, num_partitions: int) -> dict[str, Any]:
        """Client sizes, ``heterogeneity`` and the clients' mean pairwise target cosine
        (``labels`` are empty: regression)."""
        per_test = max(1, self.test_size // self.cfg.federation.clients)
        return {
            "partition": "synthetic",
            "alpha": None,
            "heterogeneity": self.heterogeneity,
            "target_cosine": self.target_cosine(num_partitions),
            "label_names": [],
            "pool": [],
            "test": [per_test] * self.cfg.federation.clients,  # examples per client's map
            "dropped_test_copies": 0,
            "clients": [
                {"partition_id": pid, "examples": self.examples, "labels": []}
                for pid in range(num_partitions)
            ],
        }

    # -- training -----------------------------------------------------------------
    def train(
        self,
        model: AdapterModel,
        data: SyntheticData,  # type: ignore[override]
        trainable: frozenset[str],
        seed: int,
        penalty: PenaltyFn | None = None,
        on_step: StepFn | None = None,
    ) -> TrainResult:
        """One round of local training: :func:`fedpeft.tasks.train.local_train` on
        regression batches."""
        return local_train(
            model, data, self.cfg.train, trainable, self.loss, seed, penalty, on_step, batch_fn=data.batch
        )

    def evaluate(self, model: AdapterModel, data: SyntheticData) -> dict[str, float]:  # type: ignore[override]
        """``{"loss": MSE}`` over ``data`` (``{}`` when empty)."""
        if len(data) == 0:
            return {}
        model.model.eval()
        with torch.inference_mode():
            loss, _ = self.loss(model, data.batch())
        return {"loss": float(loss)}
