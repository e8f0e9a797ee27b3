"""The in-process grid lives in the library (``fedpeft.flower.inprocess``)."""

from fedpeft.flower.inprocess import InProcessGrid, run_in_process

__all__ = ["InProcessGrid", "run_in_process"]
