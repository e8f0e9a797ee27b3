"""Tasks: model + data + loss (transformers and peft live here and in nothing else
of the library besides ``fedpeft.lora.peft_io``'s key spelling)."""

from __future__ import annotations

from fedpeft.config import RunConfig
from fedpeft.tasks.base import Task

TASKS = {"classification": "fedpeft.tasks.classification:Classification",
         "causal-lm": "fedpeft.tasks.causal_lm:CausalLM",
         "synthetic": "fedpeft.tasks.synthetic:Synthetic"}


def get_task(cfg: RunConfig) -> Task:
    """The task named by ``cfg.task.name``."""
    import importlib

    module, _, cls = TASKS[cfg.task.name].partition(":")
    task_cls: type[Task] = getattr(importlib.import_module(module), cls)
    return task_cls(cfg)


def import_libraries() -> None:
    """Import transformers, peft and safetensors as the tasks use them (the model
    classes included): a warm ClientApp zygote does it once, so the processes it forks
    for each message skip ≈ 2–3 s of imports (:mod:`fedpeft.flower.warm_clientapp`)."""
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    from transformers import (  # noqa: F401
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


__all__ = ["TASKS", "Task", "get_task", "import_libraries"]
