"""Robust aggregation rules on the clients' changes (``aggregation.robust``).

Every rule works on the change ``u_k = x_k − r_k`` (upload minus what client ``k``
received), stacked over the round's ``n`` clients as ``U`` of shape ``(n, d)`` (one
row per client: a tensor flattened, or every shared tensor concatenated). With one
common start ``r`` (the usual broadcast) a rule on ``x_k`` and the same rule on
``u_k`` differ by ``r`` exactly, so the numbers are those of Flower's strategies,
which work on ``x_k``.

Two kinds:

* **Aggregates** replace the strategy's weighted mean (unweighted, as in the papers
  and in Flower, except the geometric median, which takes RFA's weights ``α_k``):

  - :func:`coordinate_median`: ``med_j = median_k U[k, j]`` (mean of the two middle
    values for even ``n``; Yin et al., "Byzantine-Robust Distributed Learning:
    Towards Optimal Statistical Rates", ICML 2018; Flower's ``FedMedian``).
  - :func:`trimmed_mean`: per coordinate, drop the ``b = ⌊β·n⌋`` largest and the
    ``b`` smallest values and average the ``n − 2b`` left (Yin et al., 2018;
    Flower's ``FedTrimmedAvg`` / ``trim_mean``).
  - :func:`geometric_median`: ``argmin_z Σ_k α_k ‖z − u_k‖₂`` by the smoothed
    Weiszfeld iteration of RFA (Pillutla, Kakade, Harchaoui, "Robust Aggregation for
    Federated Learning", IEEE TSP 2022, Algorithm 2):
    ``β_k = α_k / max(ν, ‖z − u_k‖)``, ``z ← Σ β_k u_k / Σ β_k`` until the objective
    changes by less than ``tol`` × itself.

* **Selections** keep whole clients and let the strategy aggregate them:

  - :func:`krum_scores` / :func:`krum_select`: with ``D_ij = ‖u_i − u_j‖²``, client
    ``i``'s score is the sum of its ``max(1, n − f − 2)`` smallest ``D_ij`` (``j ≠ i``);
    Krum keeps the lowest score, Multi-Krum the ``m`` lowest (Blanchard, El Mhamdi,
    Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent", NeurIPS 2017; Flower's ``select_multikrum``; fedpeft's
    ``multi-krum:f`` takes ``m = n − f``, ``krum:f`` ``m = 1``).
  - :func:`cosine_to_median`: ``c_k = ⟨u_k, med⟩ / (‖u_k‖·‖med‖)`` with ``med`` the
    coordinate-wise median change of the round; ``cosine-filter:τ`` drops clients with
    ``c_k < τ``. A direction check as FLTrust's (Cao et al., NDSS 2021), whose
    reference is a server update on a root data set; fedpeft has none, so the
    reference is the round's median change, which stays honest while fewer than half
    the clients attack. A zero change has ``c_k = 0``.

Which tensors a rule sees is decided by :func:`shared_keys`: the floating-point keys
that every client uploaded with one shape *and* received with that shape. Tensors a
client uploads without having received them (FedSA-LoRA's local B, reported for
evaluation) are not compared across clients. What this means per strategy is in
:class:`fedpeft.aggregation.layers.RobustAggregate` and
:class:`fedpeft.aggregation.layers.RobustSelect`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fedpeft.types import ClientUpdate, TensorDict

INCOMPARABLE_STRATEGIES: Mapping[str, str] = {
    "ferret": (
        "its uploads are sparse coordinates (a value and a pool index per entry) on "
        "seeded random bases, not tensors that line up coordinate by coordinate across "
        "clients"
    ),
    "fedspine": (
        "each client uploads the LoRA factors of the rows and columns it kept after "
        "pruning, so uploads differ in shape and coordinates across clients"
    ),
    "flora": (
        "every client trains a fresh random A each round, so neither its A nor its B "
        "is comparable with another client's (only the products B_k A_k are)"
    ),
    "hetlora": (
        "its clients shrink their ranks during the run (self-pruning), so uploads "
        "differ in shape across clients"
    ),
}
"""Built-in strategies whose uploads no robust rule can compare across clients, with
the reason (refused at config time by ``fedpeft.server.setup.build_strategy``)."""


def shared_keys(updates: Sequence[ClientUpdate], global_tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Floating-point keys every update uploaded with one shape and received with that
    shape (an update with an empty ``received`` counts as having received the global
    tensors), sorted."""
    if not updates:
        return []
    out = []
    for key, value in updates[0].tensors.items():
        if not value.is_floating_point():
            continue
        shape = value.shape
        ok = True
        for u in updates:
            x = u.tensors.get(key)
            r = (u.received or global_tensors).get(key)
            if x is None or r is None or x.shape != shape or r.shape != shape:
                ok = False
                break
        if ok:
            out.append(key)
    return sorted(out)


def reference(updates: Sequence[ClientUpdate], global_tensors: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    """``r̄ = (1/n) Σ_k r_k[key]`` in float64: the common start when all clients got
    the same tensor, their mean otherwise."""
    refs = [(u.received or global_tensors)[key].double() for u in updates]
    return torch.stack(refs).mean(dim=0)


def changes(updates: Sequence[ClientUpdate], global_tensors: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    """``U = [u_1; …; u_n]`` for one key, float64, shape ``(n, *shape)``."""
    return torch.stack(
        [u.tensors[key].double() - (u.received or global_tensors)[key].double() for u in updates]
    )


def flat_changes(
    updates: Sequence[ClientUpdate], global_tensors: Mapping[str, torch.Tensor], keys: Sequence[str]
) -> torch.Tensor:
    """Every shared key's change concatenated per client: ``(n, d)``, float64."""
    n = len(updates)
    return torch.cat([changes(updates, global_tensors, k).reshape(n, -1) for k in keys], dim=1)


def coordinate_median(stack: torch.Tensor) -> torch.Tensor:
    """Median over clients per coordinate: ``(n, ...) → (...)``; for even ``n`` the mean
    of the two middle values (``numpy.median``'s convention, as Flower's FedMedian)."""
    n = stack.shape[0]
    s = stack.sort(dim=0).values  # (n, ...)
    if n % 2:
        return s[n // 2].clone()
    return (s[n // 2 - 1] + s[n // 2]) / 2


def trimmed_mean(stack: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean per coordinate after dropping the ``⌊β·n⌋`` largest and smallest values:
    ``(n, ...) → (...)``; ``0 ≤ β < 0.5`` (Flower's ``trim_mean``)."""
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trimmed-mean: β must be in [0, 0.5), got {beta}")
    n = stack.shape[0]
    cut = int(beta * n)
    s = stack.sort(dim=0).values  # (n, ...)
    return s[cut : n - cut].mean(dim=0)


def geometric_median(
    points: torch.Tensor,
    weights: Sequence[float] | None = None,
    *,
    nu: float = 1e-6,
    tol: float = 1e-10,
    max_iter: int = 200,
) -> tuple[torch.Tensor, int]:
    """The weighted geometric median ``argmin_z Σ_k α_k ‖z − p_k‖₂`` of ``points``
    ``(n, d)`` by RFA's smoothed Weiszfeld iteration (Pillutla et al., 2022), started at
    the weighted mean.

    Args:
        points: one row per client, ``(n, d)``.
        weights: ``α_k`` (normalised here); ``None`` = equal.
        nu: RFA's smoothing ν: distances below it count as ν (no division by zero
            when ``z`` lands on a point).
        tol: stop when the objective changed by less than ``tol`` × itself.
        max_iter: at most this many iterations.

    Returns:
        ``(z, iterations)``: ``z`` of shape ``(d,)``.
    """
    p = points.double()  # (n, d)
    n = p.shape[0]
    a = torch.full((n,), 1.0 / n, dtype=torch.float64) if weights is None else torch.tensor(
        list(weights), dtype=torch.float64
    )
    a = a / a.sum()
    z = (a[:, None] * p).sum(dim=0)  # (d,)
    objective = float((a * (p - z).norm(dim=1)).sum())
    iterations, done = 0, False
    while not done and iterations < max_iter:
        iterations += 1
        beta = a / (p - z).norm(dim=1).clamp_min(nu)  # (n,)
        z = (beta[:, None] * p).sum(dim=0) / beta.sum()  # (d,)
        new = float((a * (p - z).norm(dim=1)).sum())
        done = abs(objective - new) <= tol * max(new, 1e-300)
        objective = new
    return z, iterations


def pairwise_sq_distances(flat: torch.Tensor) -> torch.Tensor:
    """``D_ij = ‖u_i − u_j‖²`` for rows of ``flat`` ``(n, d)`` → ``(n, n)``, computed from
    the differences (exact zeros on the diagonal)."""
    n = flat.shape[0]
    dist = torch.zeros((n, n), dtype=torch.float64)  # (n, n)
    for i in range(n):
        for j in range(i + 1, n):
            diff = flat[i] - flat[j]  # (d,)
            dist[i, j] = dist[j, i] = float(diff @ diff)
    return dist


def krum_scores(flat: torch.Tensor, f: int) -> list[float]:
    """Krum's score per client: the sum of its ``max(1, n − f − 2)`` smallest squared
    distances to the other clients (``flat``: ``(n, d)``)."""
    n = flat.shape[0]
    if n == 1:
        return [0.0]
    closest = min(n - 1, max(1, n - f - 2))
    dist = pairwise_sq_distances(flat)  # (n, n)
    scores = []
    for i in range(n):
        others = torch.cat([dist[i, :i], dist[i, i + 1 :]])  # (n − 1,)
        scores.append(float(others.sort().values[:closest].sum()))
    return scores


def krum_select(flat: torch.Tensor, f: int, m: int) -> tuple[list[int], list[float]]:
    """Indices of the ``m`` clients of lowest Krum score (ties: lower index first),
    and every score."""
    scores = krum_scores(flat, f)
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return sorted(order[: max(1, m)]), scores


def cosine_to_median(flat: torch.Tensor) -> list[float]:
    """``c_k = cos(u_k, med)`` with ``med`` the coordinate-wise median row of ``flat``
    ``(n, d)``; 0 for a zero ``u_k``; all 1 when ``med`` is zero (no direction)."""
    med = coordinate_median(flat)  # (d,)
    med_norm = float(med.norm())
    if med_norm == 0.0 or not math.isfinite(med_norm):
        return [1.0] * flat.shape[0]
    out = []
    for row in flat:
        norm = float(row.norm())
        out.append(0.0 if norm == 0.0 else float(row @ med) / (norm * med_norm))
    return out


def robust_tensors(
    rule: str,
    param: float,
    updates: Sequence[ClientUpdate],
    global_tensors: Mapping[str, torch.Tensor],
    keys: Sequence[str],
    weights: Sequence[float],
) -> tuple[TensorDict, dict[str, float]]:
    """``r̄ + agg(U)`` per key for the aggregate rules (``median``, ``trimmed-mean``,
    ``geomed``), float64; and metrics. The geometric median is taken of the whole
    concatenated change (one point per client), the others per coordinate — also on
    the concatenation, one sort for every key: the same numbers as key by key, and
    faster than many sorts of small ``(n, 384, 8)`` stacks (at 100 clients of MiniLM's
    shapes, ``simulations/bench_robust.py`` measured the median's aggregation at about
    half the time)."""
    if rule not in ("median", "trimmed-mean", "geomed"):
        raise ValueError(f"aggregation.robust: {rule!r} is not an aggregate rule")
    metrics: dict[str, float] = {}
    flat = flat_changes(updates, global_tensors, keys)  # (n, d)
    if rule == "geomed":
        z, iterations = geometric_median(flat, weights)  # (d,)
        metrics["geomed_iterations"] = float(iterations)
    elif rule == "median":
        z = coordinate_median(flat)  # (d,)
    else:
        z = trimmed_mean(flat, param)  # (d,)
    out: TensorDict = {}
    start = 0
    for key in keys:
        shape = updates[0].tensors[key].shape
        size = math.prod(shape)
        out[key] = reference(updates, global_tensors, key) + z[start : start + size].reshape(shape)
        start += size
    return out, metrics
