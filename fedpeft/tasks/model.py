"""A peft model seen as named adapter tensors, and the per-process model cache.

``AdapterModel`` hides peft's parameter naming: the adapter is a ``TensorDict``
keyed like ``peft.get_peft_model_state_dict`` (see :mod:`fedpeft.lora.peft_io`),
loaded by copying into the live parameters. Base deltas
(``"<module>.base_layer.delta"``) are added to the frozen base weight for as long as
that adapter is loaded and removed when another adapter is loaded, so one cached
model serves every client a worker process runs.

The cache (:func:`cached`) is a module-level dict: it survives across messages inside
a simulation worker (Ray actor), so a base model is loaded once per process, not per
round (FLOWER.md §7.1). ``LOADS`` counts real loads so tests can check it.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from fedpeft.errors import IncompatibleUpdateError
from fedpeft.lora.peft_io import (
    AdapterLayout,
    base_delta_key,
    base_delta_module,
    is_base_delta_key,
    param_key,
)
from fedpeft.types import TensorDict

LOADS: Counter[str] = Counter()
_CACHE: dict[Any, Any] = {}


def cached(key: Any, factory: Callable[[], Any]) -> Any:
    """Return the cached object for ``key``, building it once per process."""
    if key not in _CACHE:
        _CACHE[key] = factory()
        LOADS[str(key[0]) if isinstance(key, tuple) else str(key)] += 1
    return _CACHE[key]


def clear_cache() -> None:
    """Forget every cached model and dataset (tests)."""
    _CACHE.clear()
    LOADS.clear()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with the global torch RNG seeded, restoring it afterwards.

    transformers and peft initialise weights from the global RNG; this confines that
    to a known seed without disturbing anyone else's random stream.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _host(t: torch.Tensor) -> torch.Tensor:
    """A detached fp32 CPU copy of ``t`` (a plain clone for fp32 CPU tensors)."""
    return t.detach().to("cpu", torch.float32, copy=True)


class AdapterModel:
    """A peft model plus the bookkeeping to load, read and train its adapter.

    Args:
        model: a ``peft.PeftModel``.
        pad_id: the tokenizer's padding id.
        layout: scaling/layout facts of the adapter, for LoRA algebra.
        adapter_name: peft adapter name.
    """

    def __init__(
        self, model: Any, pad_id: int, layout: AdapterLayout, adapter_name: str = "default"
    ) -> None:
        self.model = model
        self.pad_id = pad_id
        self.layout = layout
        self.adapter_name = adapter_name
        self.params: dict[str, torch.nn.Parameter] = {
            param_key(name, adapter_name): p
            for name, p in model.named_parameters()
            if p.requires_grad
        }
        self._trained_base: set[str] = set()
        self.initial: TensorDict = self.tensors()
        self._base_original: dict[str, torch.Tensor] = {}
        self._shifted: set[str] = set()

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live (``train.device``)."""
        return next(iter(self.params.values())).device if self.params else torch.device("cpu")

    def tensors(self) -> TensorDict:
        """A detached fp32 CPU copy of every adapter tensor (what is sent and
        aggregated, whatever the model's device and dtype), plus the base delta
        ``(d_out, d_in)`` of every base weight made trainable by :meth:`set_trainable`."""
        out = {k: _host(p) for k, p in self.params.items()}
        for module in sorted(self._trained_base):
            change = _host(self._base_weight(module)) - _host(self._base_original[module])
            if getattr(self._layer(module), "fan_in_fan_out", False):
                change = change.T  # Conv1D stores (in, out)
            out[base_delta_key(module)] = change.contiguous()
        return out

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load adapter tensors (every key) and optional base deltas.

        Raises:
            IncompatibleUpdateError: keys or shapes do not match this model; the
                message lists the first offending keys.
        """
        adapter = {k: v for k, v in tensors.items() if not is_base_delta_key(k)}
        deltas = {base_delta_module(k): v for k, v in tensors.items() if is_base_delta_key(k)}
        missing = sorted(set(self.params) - set(adapter))
        extra = sorted(set(adapter) - set(self.params))
        wrong = [
            f"{k}: got {tuple(v.shape)}, model has {tuple(self.params[k].shape)}"
            for k, v in adapter.items()
            if k in self.params and tuple(v.shape) != tuple(self.params[k].shape)
        ]
        if missing or extra or wrong:
            parts = []
            if missing:
                parts.append(f"missing {missing[:3]}")
            if extra:
                parts.append(f"unexpected {extra[:3]}")
            if wrong:
                parts.append(f"wrong shape {wrong[:3]}")
            raise IncompatibleUpdateError("adapter does not fit the model: " + "; ".join(parts))
        with torch.no_grad():
            for k, v in adapter.items():
                self.params[k].copy_(v)
            self._apply_base_deltas(deltas)

    def _apply_base_deltas(self, deltas: Mapping[str, torch.Tensor]) -> None:
        for module in list(self._shifted - set(deltas)):
            self._base_weight(module).copy_(self._base_original[module])
            self._shifted.discard(module)
        for module, delta in deltas.items():
            weight = self._base_weight(module)
            if module not in self._base_original:
                self._base_original[module] = weight.detach().clone()
            layer = self.model.get_submodule(module)
            d = delta.T if getattr(layer, "fan_in_fan_out", False) else delta  # Conv1D: (in, out)
            if tuple(d.shape) != tuple(weight.shape):
                raise IncompatibleUpdateError(
                    f"base delta for {module!r} has shape {tuple(delta.shape)}, expected "
                    f"(d_out, d_in) matching base weight {tuple(weight.shape)}"
                )
            weight.copy_(self._base_original[module] + d.to(weight.device, weight.dtype))
            self._shifted.add(module)

    def _base_weight(self, module: str) -> torch.Tensor:
        layer = self.model.get_submodule(module)
        base = getattr(layer, "base_layer", layer)
        return base.weight.data

    def set_trainable(self, keys: frozenset[str]) -> list[torch.nn.Parameter]:
        """Freeze every adapter tensor not in ``keys``; return the trainable ones.

        ``keys`` may also hold base-delta keys (``"<module>.base_layer.delta"`` of a
        LoRA-wrapped module): that module's frozen base weight is then trained
        directly (full-parameter tuning of a subset, e.g. Ferret's ``mode=full``), and
        :meth:`tensors` reports its change as the delta key until the next call.
        """
        deltas = {base_delta_module(k) for k in keys if is_base_delta_key(k)}
        unknown = sorted(set(keys) - set(self.params) - {k for k in keys if is_base_delta_key(k)})
        unknown += [m for m in sorted(deltas) if not hasattr(self._layer(m), "base_layer")]
        if unknown:
            raise IncompatibleUpdateError(f"cannot train unknown adapter keys {unknown[:3]}")
        for module in self._trained_base - deltas:
            self._base_param(module).requires_grad_(False)
        out = []
        for k, p in self.params.items():
            p.requires_grad_(k in keys)
            if k in keys:
                out.append(p)
        for module in sorted(deltas):
            weight = self._base_param(module)
            if module not in self._base_original:
                self._base_original[module] = weight.detach().clone()
            self._shifted.add(module)
            weight.requires_grad_(True)
            out.append(weight)
        self._trained_base = deltas
        return out

    def _layer(self, module: str) -> Any:
        try:
            return self.model.get_submodule(module)
        except AttributeError as err:
            raise IncompatibleUpdateError(f"the model has no module {module!r}") from err

    def _base_param(self, module: str) -> torch.nn.Parameter:
        return self._layer(module).base_layer.weight

    def save_adapter(self, directory: pathlib.Path) -> None:
        """Save the loaded adapter in peft format (``PeftModel.from_pretrained`` loads it).

        Base deltas cannot be expressed in peft format; they are written next to it
        as ``base_delta.safetensors`` (dense ``(d_out, d_in)`` per module).
        """
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(directory))
        if self._shifted:
            from safetensors.torch import save_file

            save_file(
                {
                    m: (self._base_weight(m) - self._base_original[m]).contiguous()
                    for m in sorted(self._shifted)
                },
                str(directory / "base_delta.safetensors"),
            )
