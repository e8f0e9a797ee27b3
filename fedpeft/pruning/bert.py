"""Physical head / FFN-channel pruning of BERT-style encoders (FedSpine §11.1–11.2).

Duck-typed, no ``transformers`` import: the model (or any module inside it, e.g. a
peft ``PeftModel``) must contain a module with ``.encoder.layer[i]``, each layer
having ``attention.self.{query,key,value}`` (with ``num_attention_heads``,
``attention_head_size``, ``all_head_size``), ``attention.output.dense``,
``intermediate.dense`` and ``output.dense`` — the layout of HF BERT and RoBERTa.

Each projection is either a plain ``nn.Linear`` or a peft LoRA layer (a module with
``base_layer`` and per-adapter ``lora_A`` / ``lora_B`` linears and ``scaling``).
Pruning replaces the frozen base ``nn.Linear`` modules by smaller copies and shrinks
the LoRA factor parameters *in place* (same ``nn.Parameter`` objects, so an optimizer
keeps working); pass the optimizer to drop the pruned rows of its state (Adam
moments), as the specification's pitfalls require.

Layers are keyed by their index in ``encoder.layer``. Keep-masks are ``(n,)`` bool
over the layer's *current* heads / channels (on a freshly loaded model, current =
original, so masks kept in client state re-apply directly).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from fedpeft.lora.factors import LoraFactors
from fedpeft.pruning.blocks import AttentionBlock, FFNBlock, Projection, group_indices
from fedpeft.pruning.importance import channel_scores, head_scores, normalize_scores

_MODULE = re.compile(
    r"(?:^|\.)layer\.(\d+)\.(attention\.self\.(?:query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)$"
)


_ROLES = {
    "attention.output.dense": "attention-out",
    "intermediate.dense": "ffn-up",
    "output.dense": "ffn-down",
}


def module_role(module: str) -> tuple[int, str] | None:
    """``(encoder layer, role)`` of a BERT linear module in structured pruning, or
    ``None`` for any other module. Roles: ``attention-in`` (query/key/value: rows are
    heads), ``attention-out`` (``attention.output.dense``: columns are heads),
    ``ffn-up`` (``intermediate.dense``: rows are FFN channels), ``ffn-down`` (the FFN's
    ``output.dense``: columns are channels). The one place that knows BERT's names."""
    match = _MODULE.search(module)
    if match is None:
        return None
    layer, name = int(match.group(1)), match.group(2)
    return layer, _ROLES.get(name, "attention-in")


def encoder_layers(model: nn.Module) -> list[nn.Module]:
    """The encoder layers of ``model`` (the first module with ``.encoder.layer``).

    Raises:
        TypeError: no module of ``model`` has ``.encoder.layer``.
    """
    for module in model.modules():
        encoder = getattr(module, "encoder", None)
        layers = getattr(encoder, "layer", None)
        if isinstance(layers, nn.ModuleList):
            return list(layers)
    raise TypeError(
        f"{type(model).__name__} has no BERT-style '.encoder.layer' module list; "
        f"fedpeft.pruning.bert supports BERT/RoBERTa-like encoders only"
    )


def _lora_pairs(module: nn.Module) -> dict[str, tuple[nn.Linear, nn.Linear]]:
    """``{adapter: (down, up)}`` of a peft LoRA layer; ``{}`` for a plain linear."""
    downs: Any = getattr(module, "lora_A", None)
    ups: Any = getattr(module, "lora_B", None)
    if downs is None or ups is None:
        return {}
    use_dora: Any = getattr(module, "use_dora", {})
    if any(bool(v) for v in dict(use_dora).values()):
        raise TypeError("structured pruning of DoRA layers is not supported")
    return {name: (downs[name], ups[name]) for name in downs if name in ups}


def _base_linear(module: nn.Module) -> nn.Linear:
    base = getattr(module, "base_layer", module)
    if not isinstance(base, nn.Linear):
        raise TypeError(
            f"expected an nn.Linear (or a LoRA layer around one), "
            f"got {type(base).__name__}"
        )
    return base


def _projection(module: nn.Module, adapter: str) -> Projection:
    base = _base_linear(module)
    weight = base.weight.detach()  # (d_out, d_in)
    bias = base.bias.detach() if base.bias is not None else None
    pair = _lora_pairs(module).get(adapter)
    if pair is None:
        return Projection(weight=weight, bias=bias)
    down, up = pair
    scaling = float(getattr(module, "scaling", {}).get(adapter, 1.0))
    lora = LoraFactors(a=down.weight.detach(), b=up.weight.detach(), scaling=scaling)
    grad_a = down.weight.grad.detach() if down.weight.grad is not None else None
    grad_b = up.weight.grad.detach() if up.weight.grad is not None else None
    if grad_a is None or grad_b is None:
        grad_a = grad_b = None
    return Projection(weight=weight, bias=bias, lora=lora, grad_a=grad_a, grad_b=grad_b)


def attention_block(layer: nn.Module, adapter: str = "default") -> AttentionBlock:
    """The attention block of one encoder layer, with live LoRA factors and grads."""
    sa = layer.attention.self
    return AttentionBlock(
        q=_projection(sa.query, adapter),
        k=_projection(sa.key, adapter),
        v=_projection(sa.value, adapter),
        o=_projection(layer.attention.output.dense, adapter),
        head_dim=int(sa.attention_head_size),
    )


def ffn_block(layer: nn.Module, adapter: str = "default") -> FFNBlock:
    """The FFN block of one encoder layer, with live LoRA factors and grads."""
    return FFNBlock(
        up=_projection(layer.intermediate.dense, adapter),
        down=_projection(layer.output.dense, adapter),
    )


def structure_scores(
    model: nn.Module, adapter: str = "default", normalize: bool = True
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Per-layer head and channel scores from the current LoRA gradients.

    Call after ``loss.backward()`` and before ``optimizer.zero_grad()``.

    Returns:
        ``(heads, channels)``: ``{layer: (num_heads,)}`` and ``{layer: (d_ff,)}``,
        each L2-normalised per layer when ``normalize``.
    """
    heads: dict[int, torch.Tensor] = {}
    channels: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for i, layer in enumerate(encoder_layers(model)):
            h = head_scores(attention_block(layer, adapter))
            c = channel_scores(ffn_block(layer, adapter))
            heads[i] = normalize_scores(h) if normalize else h
            channels[i] = normalize_scores(c) if normalize else c
    return heads, channels


def structure_counts(model: nn.Module) -> tuple[dict[int, int], dict[int, int]]:
    """Current ``({layer: heads}, {layer: FFN channels})``."""
    layers = encoder_layers(model)
    heads = {
        i: int(layer.attention.self.num_attention_heads)
        for i, layer in enumerate(layers)
    }
    channels = {
        i: _base_linear(layer.intermediate.dense).out_features
        for i, layer in enumerate(layers)
    }
    return heads, channels


def _smaller_linear(
    linear: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None
) -> nn.Linear:
    weight = linear.weight.detach()  # (d_out, d_in)
    bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        weight = weight[rows]  # (d_out', d_in)
        bias = bias[rows] if bias is not None else None
    if cols is not None:
        weight = weight[:, cols]  # (d_out', d_in')
    new = nn.Linear(
        weight.shape[1],
        weight.shape[0],
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        new.weight.requires_grad_(linear.weight.requires_grad)
        if bias is not None and new.bias is not None and linear.bias is not None:
            new.bias.copy_(bias)
            new.bias.requires_grad_(linear.bias.requires_grad)
    new.train(linear.training)
    return new


def _shrink_parameter_(
    param: nn.Parameter,
    index: torch.Tensor,
    dim: int,
    optimizer: torch.optim.Optimizer | None,
) -> None:
    """Keep ``index`` along ``dim`` of ``param``, its grad and its optimizer state."""
    old_shape = param.shape
    index = index.to(param.device)
    param.data = param.data.index_select(dim, index)
    if param.grad is not None:
        param.grad = param.grad.index_select(dim, index)
    if optimizer is not None and param in optimizer.state:
        state = optimizer.state[param]
        for key, value in list(state.items()):
            if isinstance(value, torch.Tensor) and value.shape == old_shape:
                state[key] = value.index_select(dim, index.to(value.device))


def _shrink_(
    parent: nn.Module,
    name: str,
    rows: torch.Tensor | None,
    cols: torch.Tensor | None,
    optimizer: torch.optim.Optimizer | None,
) -> None:
    module = getattr(parent, name)
    base = _base_linear(module)
    small = _smaller_linear(base, rows, cols)
    if module is base:
        setattr(parent, name, small)
        return
    module.base_layer = small
    for down, up in _lora_pairs(module).values():
        if cols is not None:
            _shrink_parameter_(down.weight, cols, 1, optimizer)  # A: (r, d_in')
            down.in_features = cols.numel()
        if rows is not None:
            _shrink_parameter_(up.weight, rows, 0, optimizer)  # B: (d_out', r)
            if up.bias is not None:
                _shrink_parameter_(up.bias, rows, 0, optimizer)
            up.out_features = rows.numel()
    if hasattr(module, "in_features"):
        module.in_features = small.in_features
    if hasattr(module, "out_features"):
        module.out_features = small.out_features


def _check_keep(keep: torch.Tensor, count: int, what: str, layer: int) -> torch.Tensor:
    keep = keep.to(torch.bool).reshape(-1)
    if keep.numel() != count:
        raise ValueError(
            f"layer {layer}: {what} keep-mask has {keep.numel()} entries, "
            f"expected {count}"
        )
    if not bool(keep.any()):
        raise ValueError(
            f"layer {layer}: {what} keep-mask removes everything; keep at least one"
        )
    return keep


def prune_bert_(
    model: nn.Module,
    keep_heads: Mapping[int, torch.Tensor] | None = None,
    keep_channels: Mapping[int, torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Remove heads and FFN channels in place.

    Heads: rows of query/key/value (and their LoRA ``B`` rows) and columns of
    ``attention.output.dense`` (and its LoRA ``A`` columns); ``num_attention_heads``
    and ``all_head_size`` are updated. Channels: rows of ``intermediate.dense``
    (LoRA ``B`` rows) and columns of ``output.dense`` (LoRA ``A`` columns).

    Args:
        model: a BERT-style model (or peft model around one).
        keep_heads: ``{layer: (num_heads,) bool}`` over the current heads.
        keep_channels: ``{layer: (d_ff,) bool}`` over the current channels.
        optimizer: if given, its per-parameter state of the shrunk LoRA factors is
            sliced the same way (pruned rows dropped).

    Raises:
        ValueError: a mask of the wrong length, or one that keeps nothing.
    """
    layers = encoder_layers(model)
    for i, keep in (keep_heads or {}).items():
        sa = layers[i].attention.self
        keep = _check_keep(keep, int(sa.num_attention_heads), "head", i)
        if bool(keep.all()):
            continue
        rows = group_indices(keep, int(sa.attention_head_size))  # (kept·d_h,)
        for name in ("query", "key", "value"):
            _shrink_(sa, name, rows, None, optimizer)
        _shrink_(layers[i].attention.output, "dense", None, rows, optimizer)
        sa.num_attention_heads = int(keep.sum())
        sa.all_head_size = sa.num_attention_heads * int(sa.attention_head_size)
    for i, keep in (keep_channels or {}).items():
        count = _base_linear(layers[i].intermediate.dense).out_features
        keep = _check_keep(keep, count, "channel", i)
        if bool(keep.all()):
            continue
        idx = group_indices(keep, 1)  # (kept,)
        _shrink_(layers[i].intermediate, "dense", idx, None, optimizer)
        _shrink_(layers[i].output, "dense", None, idx, optimizer)


def lora_masks(
    module_paths: Iterable[str],
    keep_heads: Mapping[int, torch.Tensor],
    keep_channels: Mapping[int, torch.Tensor],
    head_dim: int,
) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Row/column keep-masks of each LoRA module, for mask-aware aggregation.

    Args:
        module_paths: LoRA module paths, e.g.
            ``"….encoder.layer.3.attention.self.query"``.
        keep_heads: ``{layer: (num_heads,) bool}`` over the ORIGINAL heads.
        keep_channels: ``{layer: (d_ff,) bool}`` over the ORIGINAL channels.
        head_dim: ``attention_head_size``.

    Returns:
        ``{path: (row_keep, col_keep)}`` over the module's original ``(d_out, d_in)``;
        ``None`` where that dimension is not pruned. Paths that are not a BERT
        projection get ``(None, None)``.
    """
    out: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
    for path in module_paths:
        match = _MODULE.search(path)
        rows: torch.Tensor | None = None
        cols: torch.Tensor | None = None
        if match is not None:
            layer, kind = int(match.group(1)), match.group(2)
            heads = keep_heads.get(layer)
            channels = keep_channels.get(layer)
            if kind.startswith("attention.self") and heads is not None:
                rows = heads.to(torch.bool).repeat_interleave(head_dim)  # (H·d_h,)
            elif kind == "attention.output.dense" and heads is not None:
                cols = heads.to(torch.bool).repeat_interleave(head_dim)  # (H·d_h,)
            elif kind == "intermediate.dense" and channels is not None:
                rows = channels.to(torch.bool)
            elif kind == "output.dense" and channels is not None:
                cols = channels.to(torch.bool)
        out[path] = (rows, cols)
    return out
