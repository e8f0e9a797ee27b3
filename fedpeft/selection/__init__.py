"""Client selection and per-client plans (no Flower import)."""

from fedpeft.selection.base import Selector
from fedpeft.selection.uniform import UniformSelector

__all__ = ["Selector", "UniformSelector"]
