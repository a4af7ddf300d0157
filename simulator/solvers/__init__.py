"""Exact robust evaluations and solvers (SPEC 3): ``robust_objective`` and ``solve``."""

from .dual import solve
from .inner import robust_objective

__all__ = ["robust_objective", "solve"]
