"""PEFT state dicts <-> ``dict[module_path, LoraFactors]``.

The only module that knows PEFT's key spelling. An adapter state dict (as returned by
``peft.get_peft_model_state_dict``, adapter name already stripped) holds keys
``"<module>.lora_A.weight"`` (``(r, d_in)``), ``"<module>.lora_B.weight"``
(``(d_out, r)``) and other trainable tensors (``modules_to_save`` such as a
classification head), which are returned separately as *extra* tensors.

A strategy that changes the frozen base weight (FedEx-LoRA's residual, FLoRA's merge)
expresses it as a *base delta*: key ``"<module>.base_layer.delta"`` holding a dense
``(d_out, d_in)`` tensor (``nn.Linear`` layout, whatever the module's own layout). The
model loader adds it to the base weight for as long as that adapter is loaded; it is
never trained.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fedpeft.lora.factors import LoraFactors
from fedpeft.types import TensorDict

_A = ".lora_A.weight"
_B = ".lora_B.weight"
_BASE_DELTA = ".base_layer.delta"


@dataclass(frozen=True)
class AdapterLayout:
    """How to read factors out of an adapter: scaling and layout per module.

    Attributes:
        lora_alpha: α of the adapter; ``scaling = α / r`` for a rank-``r`` module.
        use_rslora: ``scaling = α / √r`` instead.
        fan_in_fan_out: module paths whose base weight is stored ``(d_in, d_out)``.
    """

    lora_alpha: float = 16.0
    use_rslora: bool = False
    fan_in_fan_out: frozenset[str] = field(default_factory=frozenset)

    def scaling(self, rank: int) -> float:
        """The LoRA scaling of a rank-``rank`` module."""
        return self.lora_alpha / (rank**0.5 if self.use_rslora else rank)


def lora_module_of(key: str) -> str:
    """The module path of a ``lora_A`` / ``lora_B`` key."""
    for suffix in (_A, _B):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    raise ValueError(f"{key!r} is not a LoRA factor key")


def is_lora_key(key: str) -> bool:
    """True for ``lora_A`` / ``lora_B`` weights."""
    return key.endswith(_A) or key.endswith(_B)


def lora_modules(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Module paths that have both LoRA factors, in key order."""
    return [k[: -len(_A)] for k in tensors if k.endswith(_A) and k[: -len(_A)] + _B in tensors]


def split_adapter(
    tensors: Mapping[str, torch.Tensor], layout: AdapterLayout | None = None
) -> tuple[dict[str, LoraFactors], TensorDict]:
    """Split an adapter into per-module factors and the remaining trainable tensors.

    Raises:
        ValueError: a ``lora_A`` without its ``lora_B`` (or the reverse).
    """
    layout = layout or AdapterLayout()
    factors: dict[str, LoraFactors] = {}
    extra: TensorDict = {}
    for key, value in tensors.items():
        if key.endswith(_A):
            module = key[: -len(_A)]
            if module + _B not in tensors:
                raise ValueError(f"adapter has {key!r} but no {module + _B!r}")
            a = value
            b = tensors[module + _B]
            factors[module] = LoraFactors(
                a=a,
                b=b,
                scaling=layout.scaling(int(a.shape[0])),
                fan_in_fan_out=module in layout.fan_in_fan_out,
            )
        elif key.endswith(_B):
            if key[: -len(_B)] + _A not in tensors:
                raise ValueError(f"adapter has {key!r} but no lora_A for it")
        else:  # trainable extras (heads) and base deltas
            extra[key] = value
    return factors, extra


def join_adapter(factors: Mapping[str, LoraFactors], extra: Mapping[str, torch.Tensor]) -> TensorDict:
    """Inverse of :func:`split_adapter`."""
    out: TensorDict = {}
    for module, f in factors.items():
        out[module + _A] = f.a
        out[module + _B] = f.b
    out.update(extra)
    return out


def base_delta_key(module: str) -> str:
    """Key of the dense base-weight change of ``module``."""
    return module + _BASE_DELTA


def is_base_delta_key(key: str) -> bool:
    """True for keys made by :func:`base_delta_key`."""
    return key.endswith(_BASE_DELTA)


def base_delta_module(key: str) -> str:
    """The module path of a base-delta key."""
    return key[: -len(_BASE_DELTA)]


def param_key(param_name: str, adapter_name: str = "default") -> str:
    """State-dict key of a named parameter of a peft model.

    ``"….query.lora_A.default.weight"`` → ``"….query.lora_A.weight"`` and
    ``"….classifier.modules_to_save.default.weight"`` → ``"….classifier.weight"``.
    """
    return param_name.replace(f".modules_to_save.{adapter_name}.", ".").replace(
        f".{adapter_name}.", "."
    )


def shape_for_rank(key: str, global_shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
    """The shape a tensor of the global adapter has in a rank-``rank`` client adapter.

    ``lora_A`` is ``(rank, d_in)``, ``lora_B`` is ``(d_out, rank)``; every other tensor
    keeps its global shape.
    """
    if key.endswith(_A):
        return (rank, global_shape[1])
    if key.endswith(_B):
        return (global_shape[0], rank)
    return tuple(global_shape)


def factor_keys(module: str) -> tuple[str, str]:
    """The ``(lora_A, lora_B)`` keys of ``module``."""
    return module + _A, module + _B
