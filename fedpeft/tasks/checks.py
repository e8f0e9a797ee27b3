"""Checks of the model a run names, done before any engine or worker starts.

:func:`check_model` turns what would otherwise be a traceback deep inside a worker
(a model folder that is missing, is not a model or has no tokenizer, a model of
the other task's kind, a target module the model does not have) into one
:class:`~fedpeft.errors.ConfigError` naming the key and the value. It is cheap: the
model's config is read and its module tree is built on the ``meta`` device (no
weights are read or allocated); the tokenizer it loads is cached for the process,
so the server that follows reuses it.
"""

from __future__ import annotations

import pathlib
from typing import Any

import torch

from fedpeft.config import RunConfig
from fedpeft.errors import ConfigError

BUILT_IN = {"classification": ("minilm", "tiny-bert"), "causal-lm": ("smollm2", "tiny-llama")}
"""Built-in model names per task (``model.name``)."""

_KIND = {"classification": "sequence classification", "causal-lm": "causal language"}
_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
)
_GENERATIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def check_model(cfg: RunConfig) -> None:
    """``model.name`` is a model of ``task.name``'s kind whose tokenizer loads, and
    every ``lora.target-modules`` entry names modules of it that LoRA can wrap.

    Raises:
        ConfigError: naming ``model.name`` or ``lora.target-modules`` and the value.
    """
    from fedpeft.tasks import get_task
    from fedpeft.tasks.base import quiet_transformers

    quiet_transformers()
    task = get_task(cfg)
    if cfg.task.name not in BUILT_IN:  # no Hugging Face model (synthetic): it checked its keys
        return
    name = task.model_name
    other = next(t for t in BUILT_IN if t != cfg.task.name)
    built_in = BUILT_IN[cfg.task.name]
    expected = (
        f"{' or '.join(repr(n) for n in built_in)}, or a folder of a {_KIND[cfg.task.name]} model"
    )
    if name in BUILT_IN[other]:
        raise ConfigError(
            f"model.name={name!r} is a {other} model, but task.name is {cfg.task.name!r}; "
            f"use {expected} (or --task {other})"
        )
    if name not in built_in:
        _check_folder(name, cfg.task.name, expected)
    try:
        task.tok()
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ConfigError(
            f"model.name={name!r}: its tokenizer cannot be loaded ({_first_line(err)})"
        ) from err
    skeleton = _skeleton(task, name)
    _check_targets(skeleton, task.targets, name)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_folder(name: str, task_name: str, expected: str) -> None:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    folder = pathlib.Path(name).expanduser()
    if not folder.exists():
        raise ConfigError(
            f"model.name={name!r} is neither a built-in model nor an existing folder; "
            f"use {expected}"
        )
    if not folder.is_dir():
        raise ConfigError(f"model.name={name!r} is a file; expected {expected}")
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"model.name={name!r} is a folder without config.json, not a Hugging Face model "
            "folder; "
            f"expected {expected}"
        )
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"model.name={name!r}: {folder / 'config.json'} cannot be read ({_first_line(err)})"
        ) from err
    if not any((folder / w).is_file() for w in _WEIGHTS):
        raise ConfigError(
            f"model.name={name!r} has no weights ({', '.join(_WEIGHTS[::2])}); expected {expected}"
        )
    architectures = list(getattr(config, "architectures", None) or [])
    model_type = str(getattr(config, "model_type", ""))
    generative = any(a.endswith(_GENERATIVE_SUFFIXES) for a in architectures)
    described = f"a {model_type or 'unknown'} model" + (
        f" ({', '.join(architectures)})" if architectures else ""
    )
    if task_name == "causal-lm":
        ok = generative or (not architectures and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    else:
        classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
        ok = classifier or (
            not generative and model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
        )
    if not ok:
        raise ConfigError(
            f"model.name={name!r} is {described}, not a {_KIND[task_name]} model for "
            f"task.name={task_name!r}; use {expected}"
        )
    if not any((folder / t).is_file() for t in _TOKENIZER_FILES):
        # transformers would build an empty tokenizer that maps every word to [UNK]
        raise ConfigError(
            f"model.name={name!r} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, …); "
            f"expected {expected}"
        )


def _skeleton(task: Any, name: str) -> torch.nn.Module:
    """The model's module tree on the meta device (no weights)."""
    if name in ("tiny-bert", "tiny-llama"):
        with torch.device("meta"):
            return task.base_model()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(task._folder(), local_files_only=True)
    auto = AutoModelForCausalLM if task.name == "causal-lm" else AutoModelForSequenceClassification
    try:
        with torch.device("meta"):
            return auto.from_config(config)
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"model.name={name!r} cannot be built for task {task.name!r} ({_first_line(err)})"
        ) from err


def _wrappable(module: torch.nn.Module) -> bool:
    """Layer types peft's LoRA can wrap."""
    from transformers.pytorch_utils import Conv1D

    kinds = (
        torch.nn.Linear,
        torch.nn.Embedding,
        torch.nn.Conv1d,
        torch.nn.Conv2d,
        torch.nn.Conv3d,
        Conv1D,
    )
    return isinstance(module, kinds)


def _check_targets(model: torch.nn.Module, targets: tuple[str, ...], name: str) -> None:
    """Each target matches (as peft matches a list: the whole module name, or its
    ending after a dot) at least one module LoRA can wrap."""
    if targets == ("all-linear",):
        return
    modules = dict(model.named_modules())
    wrappable = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if n and _wrappable(m)})
    unknown, unwrappable = [], []
    for target in targets:
        hits = [m for n, m in modules.items() if n == target or n.endswith("." + target)]
        if not hits:
            unknown.append(target)
        elif not any(_wrappable(m) for m in hits):
            unwrappable.append(f"{target} ({type(hits[0]).__name__})")
    problems = []
    if unknown:
        verb = "matches" if len(unknown) == 1 else "match"
        problems.append(f"{', '.join(repr(t) for t in unknown)} {verb} no module of {name}")
    if unwrappable:
        problems.append(f"{', '.join(unwrappable)} cannot take a LoRA adapter")
    if problems:
        raise ConfigError(
            f"lora.target-modules={','.join(targets)!r}: {'; '.join(problems)}; modules of "
            f"{name} that can: {', '.join(wrappable)} (or 'all-linear')"
        )
