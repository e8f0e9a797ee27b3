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


__all__ = ["TASKS", "Task", "get_task"]
