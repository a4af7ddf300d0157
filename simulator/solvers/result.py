"""Result objects of the exact robust evaluations and solvers (SPEC 3)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..ambiguity import AmbiguitySet
from ..data import PreferenceData

__all__ = ["WorstCase", "Evaluation", "Solution"]


@dataclass(frozen=True, eq=False)
class WorstCase:
    """A worst-case distribution ``Q*`` in the ambiguity set.

    Atom ``k`` of ``Q*`` comes from nominal atom ``source[k]``, sits at
    features ``x[k]`` with label ``y[k]`` and has probability ``weights[k]``.
    For the reweighting sets (KL, chi-square) ``x`` and ``y`` are the nominal
    ones; for Wasserstein sets atoms move (and may flip labels when
    ``kappa < inf``), and ``transport_cost`` is ``E_pi c_p`` of the coupling
    that moves them, to be compared with ``budget = rho**p``.

    ``weights``, ``x``, ``y`` and ``source`` may each be given as a function of
    no arguments that builds it: it is then built on first access (a solver's
    stacked ``n``-sized arrays and ``n x d`` features, which the solve itself
    never reads, cost nothing until a caller does). Pickling builds them.
    """

    weights: np.ndarray
    x: np.ndarray
    y: np.ndarray
    source: np.ndarray
    transport_cost: float | None = None
    budget: float | None = None

    def as_data(self) -> PreferenceData:
        """``Q*`` as a :class:`PreferenceData` (atoms of zero weight dropped)."""
        keep = self.weights > 0
        w = self.weights[keep]
        return PreferenceData(self.x[keep], self.y[keep], w / w.sum())

    def __reduce__(self):  # pickled with x built (a builder need not pickle)
        return (WorstCase, (self.weights, self.x, self.y, self.source, self.transport_cost,
                            self.budget))


class _BuiltOnAccess:
    """A field of :class:`WorstCase` (``name``): stored as given, and where that is a
    builder (a callable), replaced by what it builds on the first read."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.name] = value

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        value = obj.__dict__[self.name]
        if callable(value):
            value = obj.__dict__[self.name] = value()
        return value


for _name in ("weights", "x", "y", "source"):
    setattr(WorstCase, _name, _BuiltOnAccess(_name))
del _name


@dataclass(frozen=True, eq=False)
class Evaluation:
    """The exact robust objective ``L_U(theta; P)`` at a fixed ``theta``.

    Attributes
    ----------
    value : float
        Dual value of ``sup_{Q in U(P)} E_Q l(z; theta)``.
    dual : float or None
        Optimal dual variable: ``lambda`` for KL and Wasserstein, ``eta`` for
        chi-square, ``None`` for the nominal set.
    worst_case : WorstCase
        A maximising ``Q*``.
    primal_value : float
        ``E_{Q*} l`` recomputed from ``worst_case``.
    gap : float
        Certificate ``|value - primal_value| / max(1, |value|)``.
    grad : ndarray (d,)
        ``grad_theta L_U`` by Danskin's theorem.
    """

    value: float
    dual: float | None
    worst_case: WorstCase
    primal_value: float
    gap: float
    grad: np.ndarray


@dataclass(frozen=True, eq=False)
class Solution:
    """Minimiser of the robust objective and its certificate.

    Attributes
    ----------
    theta : ndarray (d,)
        The robust estimator ``argmin_theta L_U(theta; P)``.
    value, dual, worst_case, primal_value, gap
        As in :class:`Evaluation`, at ``theta``.
    status : str
        ``"optimal"`` (anything else raises before a Solution is returned; for ``dual``
        only when ``info["optimality_gap"]`` is at most ``gap_tol``).
    solver : str
        ``"dual"`` or ``"cvxpy:<SOLVER>"``.
    ambiguity : AmbiguitySet
    beta : float
    theta_ref : ndarray (d,)
    grad_norm : float
        ``||grad_theta L_U(theta)||`` at the returned point (for the Wasserstein p = 1,
        finite-kappa set, whose minimiser sits at a kink, the norm of one subgradient).
    iterations : int
        Newton iterations on the full data (for ``n > 5e4`` the ``dual`` solver first
        solves a subsample, whose iterations are not counted).
    solve_time_s : float
    info : dict
        Solver-specific extras. ``dual``: ``optimality_gap`` (every set: a certified upper
        bound on ``(L_U(theta) - min L_U) / max(1, |L_U(theta)|)`` by weak duality, at most
        the solve's ``gap_tol``; docs/formulations.md says which bound each set uses),
        ``zero_kink`` (``theta_ref`` certified optimal by the subdifferential test),
        ``distinct_atoms`` (when repeated atoms were merged), ``transport_cost`` /
        ``budget`` (Wasserstein); ``cvxpy``: the fallback chain tried.
    """

    theta: np.ndarray
    value: float
    dual: float | None
    worst_case: WorstCase
    primal_value: float
    gap: float
    status: str
    solver: str
    ambiguity: AmbiguitySet
    beta: float
    theta_ref: np.ndarray
    grad_norm: float = float("nan")
    iterations: int = 0
    solve_time_s: float = 0.0
    info: dict = field(default_factory=dict)
