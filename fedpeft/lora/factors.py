"""``LoraFactors``: one adapted layer's low-rank update ``ΔW = s · B @ A``.

Shapes follow PEFT and ALGORITHMS.md §0: ``a`` is ``(r, d_in)`` ("down",
``lora_A.weight``), ``b`` is ``(d_out, r)`` ("up", ``lora_B.weight``) and the dense
update ``delta()`` is ``(d_out, d_in)`` — the layout of ``nn.Linear.weight``. For
fan-in-fan-out layers (GPT-2 ``Conv1D``, weight stored ``(d_in, d_out)``) use
:meth:`delta_for_weight`, which returns the update in the base weight's layout.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class LoraFactors:
    """The LoRA factors of one layer.

    Attributes:
        a: ``(r, d_in)``.
        b: ``(d_out, r)``.
        scaling: ``s = α / r`` (``α / √r`` with rsLoRA).
        fan_in_fan_out: the base weight is stored ``(d_in, d_out)``.
    """

    a: torch.Tensor
    b: torch.Tensor
    scaling: float = 1.0
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        if self.a.dim() != 2 or self.b.dim() != 2 or self.a.shape[0] != self.b.shape[1]:
            raise ValueError(
                f"LoRA factors need a (r, d_in) and b (d_out, r) with the same r; "
                f"got a {tuple(self.a.shape)} and b {tuple(self.b.shape)}"
            )

    @property
    def rank(self) -> int:
        """``r``."""
        return int(self.a.shape[0])

    @property
    def d_in(self) -> int:
        """Input features ``n``."""
        return int(self.a.shape[1])

    @property
    def d_out(self) -> int:
        """Output features ``m``."""
        return int(self.b.shape[0])

    def delta(self) -> torch.Tensor:
        """Dense ``s · B @ A``, shape ``(d_out, d_in)``."""
        return self.scaling * (self.b @ self.a)  # (d_out, r) @ (r, d_in)

    def delta_for_weight(self) -> torch.Tensor:
        """The dense update in the base weight's own layout."""
        d = self.delta()  # (d_out, d_in)
        return d.T if self.fan_in_fan_out else d  # Conv1D stores (d_in, d_out)

    def with_factors(self, a: torch.Tensor, b: torch.Tensor) -> LoraFactors:
        """Same layer metadata, new factors."""
        return replace(self, a=a, b=b)
