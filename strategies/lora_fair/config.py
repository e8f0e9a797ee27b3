"""LoRA-FAIR's options and their checks (see the package docstring).
"""

from __future__ import annotations

from dataclasses import dataclass

PLACEMENTS = ("b", "a", "both")
NORMS = ("fro", "squared")
OBJECTIVES = ("fro-no-shrink", "fro", "residual", "cosine", "cosine-rescaled")
_FRO = ("fro", "fro-no-shrink")  # the closed-form ridge (then floored, for the second)
MAX_SWEEPS = 10
"""Block-coordinate sweeps of ``placement="both"``; each B- or A-step gets
``ceil(max_iters / MAX_SWEEPS)`` iterations, so each factor gets at most ``max_iters``."""
_ARMIJO_C1 = 1e-4
_MAX_BACKTRACKS = 60
_CHUNK_BYTES = 1 << 26  # stacked client factors per batch of layers (64 MiB)


@dataclass(frozen=True)
class LoraFairConfig:
    """Options of ``lora-fair`` (run-config section ``lora-fair``).

    Attributes:
        lam: regularisation weight λ (paper: 0.01; its units depend on the objective,
            module doc).
        placement: which factor is corrected: ``"b"`` (paper), ``"a"`` or ``"both"``.
        norm: ``"fro"`` for ``λ‖ΔB‖_F`` or ``"squared"`` for ``λ‖ΔB‖_F²``.
        scale_free: use ``λ‖ΔB‖/‖B̄‖`` so λ does not depend on the scale of B.
        objective: one of :data:`OBJECTIVES` (module doc); default ``"fro-no-shrink"``
            (the paper's S, read as cosine in ALGORITHMS.md §8, is ``"cosine"``).
        max_iters: gradient-descent iterations per layer (and per sweep).
        tol: stop when the relative objective change is below this.
    """

    lam: float = 0.01
    placement: str = "b"
    norm: str = "fro"
    scale_free: bool = False
    objective: str = "fro-no-shrink"
    max_iters: int = 200
    tol: float = 1e-8

    def problems(self) -> list[str]:
        """Invalid values, one line each."""
        out = []
        if not self.lam >= 0.0:
            out.append(f"lora-fair.lam must be >= 0, got {self.lam}")
        if self.placement not in PLACEMENTS:
            out.append(f"lora-fair.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.norm not in NORMS:
            out.append(f"lora-fair.norm must be one of {NORMS}, got {self.norm!r}")
        if self.objective not in OBJECTIVES:
            out.append(f"lora-fair.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.max_iters < 0:
            out.append(f"lora-fair.max-iters must be >= 0, got {self.max_iters}")
        if not self.tol >= 0.0:
            out.append(f"lora-fair.tol must be >= 0, got {self.tol}")
        return out
