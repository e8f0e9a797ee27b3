"""LoRA algebra: factored inner products and the mixed-rank primitive.

**Factored products.** A sum of products ``X = Σ_i c_i B_i A_i`` is itself a product
of stacked factors, ``X = [c_1 B_1, …, c_N B_N] @ [A_1; …; A_N]``, so Frobenius inner
products reduce to ``r×r`` traces: ``⟨B_i A_i, B_j A_j⟩ = tr((B_iᵀ B_j)(A_j A_iᵀ))``.
Cost ``O(N² r² (m + n))``, memory ``O(N² r²)``. The thin SVD of such a product is
computed from QR factorisations of the two stacks (:func:`svd_factors`), again without
a dense ``(d_out, d_in)`` matrix.

**Mixed ranks and the scaling rule.** A rank-``r`` module computes ``s · B @ A`` with
``s = α / r`` (``α / √r`` with rsLoRA), so the same factors mean different products
at different ranks. Every primitive that moves factors to another rank therefore
takes the *target* scaling and folds the ratio into ``B``::

    B' = B · (s_k / s)        # so that s · B' @ A' == s_k · B @ A

Padding appends zero rows to ``A`` and zero columns to ``B`` (the product is
unchanged); truncation keeps the leading ``r`` rows/columns (for SVD-ordered factors
this is the best rank-``r`` approximation). ``truncate(pad(f)) == f`` up to the two
scale multiplications (bitwise when the ratio is a power of two).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch

from fedpeft.lora.factors import LoraFactors
from fedpeft.lora.peft_io import AdapterLayout, join_adapter, split_adapter
from fedpeft.types import TensorDict

SIGMA_SPLITS = ("b", "a", "sqrt")
"""Where :func:`refactor_svd` puts the singular values: ``B = UΣ, A = Vᵀ`` (``"b"``),
``B = U, A = ΣVᵀ`` (``"a"``) or ``B = U√Σ, A = √ΣVᵀ`` (``"sqrt"``)."""


def product_frobenius_inner(
    x: Sequence[tuple[float, LoraFactors]], y: Sequence[tuple[float, LoraFactors]]
) -> float:
    """``⟨Σ_i c_i s_i B_i A_i, Σ_j d_j s_j B_j A_j⟩_F`` in float64, factored."""
    total = torch.zeros((), dtype=torch.float64)
    for ci, fi in x:
        bi = fi.b.to(torch.float64) * (ci * fi.scaling)  # (m, r_i)
        ai = fi.a.to(torch.float64)  # (r_i, n)
        for dj, fj in y:
            bj = fj.b.to(torch.float64) * (dj * fj.scaling)  # (m, r_j)
            aj = fj.a.to(torch.float64)  # (r_j, n)
            total += torch.trace((bi.T @ bj) @ (aj @ ai.T))  # (r_i, r_j) @ (r_j, r_i)
    return float(total)


def aggregation_error(
    clients: Sequence[Mapping[str, LoraFactors]],
    weights: Sequence[float],
    global_factors: Mapping[str, LoraFactors],
    base_shift: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """How far the global adapter's product is from the ideal mean of products.

    Per layer, with ideal ``I = Σ_k p_k s_k B_k A_k`` and global ``G = s B_g A_g``
    (plus ``base_shift``, a dense change a strategy folded into the base weight,
    e.g. FedEx-LoRA's residual):

    * ``relative``: ``‖I − G‖_F / ‖I‖_F``;
    * ``cosine``: ``⟨I, G⟩ / (‖I‖ ‖G‖)``.

    Returns ``{"relative": …, "cosine": …}`` over all layers together (squared norms
    summed) and the same per layer under ``"<module>/relative"`` and
    ``"<module>/cosine"``. Modules missing from any client are skipped.
    """
    out: dict[str, float] = {}
    tot_ii = tot_gg = tot_ig = 0.0
    for module, g in global_factors.items():
        if not all(module in c for c in clients):
            continue
        ideal = [(w, c[module]) for c, w in zip(clients, weights, strict=True)]
        ii = product_frobenius_inner(ideal, ideal)
        gg = product_frobenius_inner([(1.0, g)], [(1.0, g)])
        ig = product_frobenius_inner(ideal, [(1.0, g)])
        if base_shift is not None and module in base_shift:
            shift = base_shift[module].to(torch.float64)  # (m, n)
            dense_ideal = sum(
                (w * f.delta().to(torch.float64) for w, f in ideal),
                torch.zeros_like(shift),
            )
            dense_g = g.delta().to(torch.float64) + shift
            ii = float((dense_ideal * dense_ideal).sum())
            gg = float((dense_g * dense_g).sum())
            ig = float((dense_ideal * dense_g).sum())
        out[f"{module}/relative"] = _relative(ii, gg, ig)
        out[f"{module}/cosine"] = _cosine(ii, gg, ig)
        tot_ii, tot_gg, tot_ig = tot_ii + ii, tot_gg + gg, tot_ig + ig
    out["relative"] = _relative(tot_ii, tot_gg, tot_ig)
    out["cosine"] = _cosine(tot_ii, tot_gg, tot_ig)
    return out


def _relative(ii: float, gg: float, ig: float) -> float:
    err2 = max(ii - 2.0 * ig + gg, 0.0)  # ‖I − G‖² = ‖I‖² − 2⟨I,G⟩ + ‖G‖²
    return (err2**0.5) / (ii**0.5) if ii > 0.0 else 0.0


def _cosine(ii: float, gg: float, ig: float) -> float:
    denom = (ii * gg) ** 0.5
    return ig / denom if denom > 0.0 else 1.0


# -- mixed-rank primitive -------------------------------------------------------------


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype server algebra runs in: the tensors' own, but at least float32."""
    return torch.promote_types(dtype, torch.float32)


def rescale(f: LoraFactors, scaling: float) -> LoraFactors:
    """The same product with scaling ``scaling``: ``B ← B · (f.scaling / scaling)``."""
    if scaling <= 0.0:
        raise ValueError(f"scaling must be > 0, got {scaling}")
    if scaling == f.scaling:
        return f
    return replace(f, b=f.b * (f.scaling / scaling), scaling=scaling)


def pad_rank(f: LoraFactors, rank: int, scaling: float | None = None) -> LoraFactors:
    """Zero-pad ``f`` to ``rank``: ``A`` gets zero rows, ``B`` zero columns.

    Args:
        f: factors of rank ``r ≤ rank``.
        rank: the target rank.
        scaling: the target scaling (e.g. ``α / rank``); the ratio is folded into
            ``B`` so the product ``s·B·A`` is preserved. ``None`` keeps ``f.scaling``.

    Raises:
        ValueError: ``rank`` is smaller than ``f.rank``.
    """
    if rank < f.rank:
        raise ValueError(f"pad_rank: rank must be >= the factors' rank {f.rank}, got {rank}")
    f = rescale(f, f.scaling if scaling is None else scaling)
    extra = rank - f.rank
    if extra == 0:
        return f
    a = torch.cat([f.a, f.a.new_zeros(extra, f.d_in)], dim=0)  # (rank, d_in)
    b = torch.cat([f.b, f.b.new_zeros(f.d_out, extra)], dim=1)  # (d_out, rank)
    return f.with_factors(a, b)


def truncate_rank(f: LoraFactors, rank: int, scaling: float | None = None) -> LoraFactors:
    """Keep the leading ``rank`` rows of ``A`` and columns of ``B``.

    Args:
        f: factors of rank ``r ≥ rank``.
        rank: the target rank (``≥ 0``).
        scaling: the target scaling; ``f.scaling / scaling`` is folded into ``B``.
            ``None`` keeps ``f.scaling``.

    Raises:
        ValueError: ``rank`` is negative or larger than ``f.rank``.
    """
    if not 0 <= rank <= f.rank:
        raise ValueError(
            f"truncate_rank: rank must be in [0, {f.rank}] (the factors' rank), got {rank}"
        )
    if rank < f.rank:
        f = f.with_factors(f.a[:rank].clone(), f.b[:, :rank].clone())  # (rank, n), (m, rank)
    return rescale(f, f.scaling if scaling is None else scaling)


def resize_rank(f: LoraFactors, rank: int, scaling: float | None = None) -> LoraFactors:
    """:func:`pad_rank` or :func:`truncate_rank`, whichever ``rank`` needs."""
    if rank >= f.rank:
        return pad_rank(f, rank, scaling)
    return truncate_rank(f, rank, scaling)


def stack_factors(factors: Sequence[LoraFactors], weights: Sequence[float]) -> LoraFactors:
    """FLoRA's stack: one factor pair whose product is ``Σ_k w_k s_k B_k A_k``.

    ``B_st = [w_1 s_1 B_1, …, w_N s_N B_N]`` (``(d_out, Σ r_k)``), ``A_st = [A_1; …; A_N]``
    (``(Σ r_k, d_in)``), scaling 1. Clients with ``w_k == 0`` are left out, so a
    zero-weight client changes nothing, not even rounding. Computed in
    :func:`work_dtype`.

    Raises:
        ValueError: no factors, mismatched layer shapes or weight count.
    """
    if not factors:
        raise ValueError("stack_factors needs at least one client's factors, got none")
    if len(weights) != len(factors):
        raise ValueError(f"stack_factors: {len(factors)} factors but {len(weights)} weights")
    first = factors[0]
    for f in factors:
        if (f.d_out, f.d_in) != (first.d_out, first.d_in):
            raise ValueError(
                f"stack_factors: layer shapes differ, (d_out, d_in) {(f.d_out, f.d_in)} "
                f"vs {(first.d_out, first.d_in)}"
            )
    dtype = work_dtype(first.a.dtype)
    kept = [(w, f) for w, f in zip(weights, factors, strict=True) if w != 0.0]
    a = torch.cat(
        [f.a.to(dtype) for _, f in kept] or [first.a.new_zeros(0, first.d_in, dtype=dtype)]
    )  # (Σ r_k, d_in)
    b = torch.cat(
        [f.b.to(dtype) * (w * f.scaling) for w, f in kept]
        or [first.b.new_zeros(first.d_out, 0, dtype=dtype)],
        dim=1,
    )  # (d_out, Σ r_k)
    return LoraFactors(a=a, b=b, scaling=1.0, fan_in_fan_out=first.fan_in_fan_out)


def product_mean(clients: Sequence[LoraFactors], weights: Sequence[float]) -> torch.Tensor:
    """The dense ideal update ``Σ_k p_k s_k B_k A_k``, ``(d_out, d_in)``.

    One matrix product of the stacked factors (:func:`stack_factors`), in
    :func:`work_dtype`. ``nn.Linear`` layout whatever the module's ``fan_in_fan_out``.
    """
    st = stack_factors(clients, weights)
    return st.b @ st.a  # (d_out, Σr) @ (Σr, d_in)


def svd_factors(
    f: LoraFactors, complete: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``U, σ, Vᵀ`` of ``s · B @ A`` without forming the product.

    ``s·B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (QR), so ``s·B·A = Q_B (R_B R_Aᵀ) Q_Aᵀ`` and
    only the small core ``R_B R_Aᵀ`` (at most ``r×r``) is decomposed. Cost
    ``O(r²(m + n))``. Signs are fixed so the largest-magnitude entry of every left
    singular vector is positive, which makes the result independent of the order in
    which a stack was assembled (up to rounding).

    Args:
        f: the factors.
        complete: optional ``(c, d_in)`` rows appended to ``A`` with zero columns in
            ``B``: the product is unchanged, but the returned right singular basis then
            spans ``r + c`` directions (extra singular values are 0), all inside the
            row space of ``[A; complete]``.

    Returns:
        ``u`` ``(d_out, k)``, ``sigma`` ``(k,)`` descending, ``vh`` ``(k, d_in)`` with
        ``k = min(r + c, d_out, d_in)``, in :func:`work_dtype`.
    """
    dtype = work_dtype(f.a.dtype)
    a, b = f.a.to(dtype), f.b.to(dtype) * f.scaling  # (r, n), (m, r)
    if complete is not None:
        a = torch.cat([a, complete.to(dtype)])  # (r + c, n)
        b = torch.cat([b, b.new_zeros(f.d_out, complete.shape[0])], dim=1)  # (m, r + c)
    qb, rb = torch.linalg.qr(b)  # (m, k1), (k1, r)
    qa, ra = torch.linalg.qr(a.T)  # (n, k2), (k2, r)
    uc, sigma, vch = torch.linalg.svd(rb @ ra.T, full_matrices=False)  # (k1, k2) core
    u = qb @ uc  # (m, k1) @ (k1, k)
    vh = vch @ qa.T  # (k, k2) @ (k2, n)
    return _fix_signs(u, sigma, vh)


def _fix_signs(
    u: torch.Tensor, sigma: torch.Tensor, vh: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if u.shape[1] == 0:
        return u, sigma, vh
    pivot = u.abs().argmax(dim=0)  # (k,)
    signs = torch.sign(u.gather(0, pivot[None, :]))[0]  # (k,)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, sigma, vh * signs[:, None]


def factors_from_svd(
    u: torch.Tensor,
    sigma: torch.Tensor,
    vh: torch.Tensor,
    rank: int,
    scaling: float = 1.0,
    *,
    split: str = "sqrt",
    fan_in_fan_out: bool = False,
) -> LoraFactors:
    """Rank-``rank`` factors with ``scaling · B @ A = U_r Σ_r V_rᵀ``.

    ``scaling`` is folded into ``B``; ``split`` places ``Σ`` (one of
    :data:`SIGMA_SPLITS`): ``"b"`` gives ``B = U_r Σ_r / scaling, A = V_rᵀ``. Ranks
    beyond ``len(sigma)`` are zero rows of ``A`` and zero columns of ``B``.

    Raises:
        ValueError: unknown ``split``, negative ``rank`` or non-positive ``scaling``.
    """
    if split not in SIGMA_SPLITS:
        raise ValueError(f"sigma split must be one of {SIGMA_SPLITS}, got {split!r}")
    if rank < 0 or scaling <= 0.0:
        raise ValueError(f"need rank >= 0 and scaling > 0, got rank={rank}, scaling={scaling}")
    k = min(rank, sigma.shape[0])
    u, sigma, vh = u[:, :k], sigma[:k], vh[:k]  # (m, k), (k,), (k, n)
    if split == "b":
        b, a = u * (sigma / scaling), vh
    elif split == "a":
        b, a = u / scaling, sigma[:, None] * vh
    else:
        root = sigma.sqrt()
        b, a = u * (root / scaling), root[:, None] * vh
    out = LoraFactors(a=a, b=b, scaling=scaling, fan_in_fan_out=fan_in_fan_out)
    return pad_rank(out, rank) if k < rank else out


def refactor_svd(
    source: torch.Tensor | LoraFactors,
    rank: int,
    scaling: float = 1.0,
    *,
    sigma: str = "sqrt",
    complete: torch.Tensor | None = None,
    fan_in_fan_out: bool = False,
) -> LoraFactors:
    """Best rank-``rank`` LoRA factors of a dense update or of a (stacked) product.

    Eckart–Young: with ``source = U Σ Vᵀ`` the result satisfies
    ``scaling · B @ A = U_r Σ_r V_rᵀ``, ``‖source − scaling·B·A‖_F² = Σ_{j>r} σ_j²``.
    ``scaling`` is folded into ``B`` (``B = U_r Σ_r / scaling`` for ``sigma="b"``).

    Args:
        source: a dense ``(d_out, d_in)`` update (full ``torch.linalg.svd``, for small
            layers) or factors whose product ``s·B·A`` is the update (QR route,
            :func:`svd_factors`; never forms the dense matrix).
        rank: the rank of the result.
        scaling: the scaling the result will be used with (``α / rank``).
        sigma: where ``Σ`` goes, one of :data:`SIGMA_SPLITS`.
        complete: factored route only — rows completing the right singular basis when
            the product has fewer than ``rank`` directions (see :func:`svd_factors`).
            With ``sigma="b"`` this gives orthonormal, trainable ``A`` rows instead
            of zero rows.
        fan_in_fan_out: layout flag of the returned factors.

    Raises:
        ValueError: unknown ``sigma``, bad ``rank``/``scaling`` or a dense source that
            is not 2-D.
    """
    if isinstance(source, LoraFactors):
        u, sv, vh = svd_factors(source, complete)
    else:
        if source.dim() != 2:
            raise ValueError(
                f"refactor_svd: a dense source must be (d_out, d_in), got {tuple(source.shape)}"
            )
        dense = source.to(work_dtype(source.dtype))
        u, sv, vh = _fix_signs(*torch.linalg.svd(dense, full_matrices=False))
    return factors_from_svd(u, sv, vh, rank, scaling, split=sigma, fan_in_fan_out=fan_in_fan_out)


def pad_adapter_to(
    tensors: Mapping[str, torch.Tensor], rank: int, layout: AdapterLayout
) -> TensorDict:
    """Zero-pad every LoRA module of a peft-keyed adapter to ``rank``.

    Scales follow ``layout`` (``s_k = layout.scaling(r_k)`` folded into ``B`` as
    ``s_k / layout.scaling(rank)``); extra tensors (heads, base deltas) are kept as
    they are.

    Raises:
        ValueError: a module's rank is above ``rank``.
    """
    factors, extra = split_adapter(tensors, layout)
    target = layout.scaling(rank)
    return join_adapter({m: pad_rank(f, rank, target) for m, f in factors.items()}, extra)


def truncate_adapter_to(
    tensors: Mapping[str, torch.Tensor], rank: int, layout: AdapterLayout
) -> TensorDict:
    """Truncate every LoRA module of a peft-keyed adapter to ``rank`` (see
    :func:`pad_adapter_to` for the scaling rule).

    Raises:
        ValueError: a module's rank is below ``rank``.
    """
    factors, extra = split_adapter(tensors, layout)
    target = layout.scaling(rank)
    return join_adapter({m: truncate_rank(f, rank, target) for m, f in factors.items()}, extra)


def resize_adapter_to(
    tensors: Mapping[str, torch.Tensor], rank: int, layout: AdapterLayout
) -> TensorDict:
    """Pad or truncate every LoRA module to ``rank`` (whichever each module needs)."""
    factors, extra = split_adapter(tensors, layout)
    target = layout.scaling(rank)
    return join_adapter({m: resize_rank(f, rank, target) for m, f in factors.items()}, extra)
