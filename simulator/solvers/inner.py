"""Exact inner supremum ``L_U(theta; P) = sup_{Q in U(P)} E_Q l`` at a fixed theta (SPEC 3).

For every ambiguity set this front end returns the dual value with its optimal dual
variable, a worst-case distribution ``Q*`` (the primal certificate), and the gradient of
``F(delta) = L_U(theta_ref + delta)`` by Danskin's theorem; on request also the Hessian of
``F`` (the Hessian of the partial minimum over the dual variable), which the Newton solver
of :mod:`simulator.solvers.dual` uses. The computation itself lives in the set's module,
found through :mod:`simulator.solvers.registry`:

* Nominal: :mod:`.nominal` (``E_P l``).
* KL (SPEC 3.1): :mod:`.kl`.
* Chi-square (SPEC 3.2): :mod:`.chi2`.
* Wasserstein p = 1 (SPEC 3.3): :mod:`.wasserstein1`.
* Wasserstein p = 2 (SPEC 3.3): :mod:`.wasserstein2`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._validation import check_data, check_positive, check_theta
from ..ambiguity import AmbiguitySet
from ..data import PreferenceData
from ..losses import dpo_loss
from .core import Atoms, InnerResult, primal_value, weighted_hess
from .registry import methods
from .result import Evaluation

__all__ = ["robust_objective", "Atoms", "InnerResult", "Problem", "evaluate_inner", "prepare",
           "weighted_hess"]


@dataclass(frozen=True, eq=False)
class Problem:
    """The validated common arguments of ``solve`` / ``robust_objective``."""

    atoms: Atoms
    beta: float
    theta_ref: np.ndarray


def prepare(data, ambiguity, beta, theta_ref, normalise: bool = False) -> Problem:
    """Validate the common arguments of ``solve`` / ``robust_objective``; ``normalise``
    builds the normalised atoms (:class:`Atoms`) the minimisers work with."""
    check_data(data)
    methods(ambiguity)
    beta = check_positive(beta, "beta")
    theta_ref = check_theta(theta_ref, data.d, "theta_ref")
    return Problem(Atoms.from_data(data, beta, normalise), beta, theta_ref)


def evaluate_inner(at: Atoms, delta: np.ndarray, ambiguity: AmbiguitySet, hess: bool = False,
                   worst: bool = True, state: Any = None, margins: np.ndarray | None = None,
                   losses: np.ndarray | None = None) -> InnerResult:
    """``F(delta) = L_U(theta_ref + delta)`` with its dual variable, gradient and worst case.

    ``state`` (the ``state`` of an earlier result) warm-starts the dual variable;
    ``margins`` and ``losses``, those of an earlier result *at the same* ``delta``
    (``InnerResult.margins``, ``.losses``), are reused instead of recomputed (the worst case
    that ends a solve, at the point of Newton's last evaluation: a product with the atoms
    and a softplus fewer).
    """
    m = at.matvec(delta) if margins is None else margins
    mod = methods(ambiguity)
    l = None if not mod.losses else dpo_loss(m) if losses is None or margins is None else losses
    # a reweighting's result carries m and l for its weak-duality certificate
    # (core.reweighting_result, core.worst_case_gap)
    return mod.evaluate(at, delta, m, l, ambiguity, hess, worst, state)


def robust_objective(theta, data: PreferenceData, ambiguity: AmbiguitySet, beta: float = 1.0,
                     theta_ref=None) -> Evaluation:
    """Exact robust objective ``L_U(theta; P) = sup_{Q in U(P)} E_Q l(z; theta)`` (SPEC 3).

    Parameters
    ----------
    theta : array (d,)
        Policy parameter.
    data : PreferenceData
        The nominal distribution ``P`` (weighted atoms).
    ambiguity : Nominal, KL, ChiSquare or Wasserstein
        The ambiguity set ``U(P)``.
    beta : float
        DPO temperature ``> 0``.
    theta_ref : array (d,), optional
        Reference parameter (zeros by default).

    Returns
    -------
    Evaluation
        ``value`` (the dual value), ``dual`` (``lambda*`` for KL / Wasserstein,
        ``eta*`` for chi-square, ``None`` for Nominal; ``inf`` / ``-inf`` at
        ``rho = 0``), ``worst_case`` ``Q*``, ``primal_value = E_{Q*} l``,
        ``gap = |value - primal_value| / max(1, |value|)`` and ``grad``
        (Danskin gradient in theta). See docs/formulations.md.

    Raises
    ------
    ValueError
        On bad arguments (wrong types, ``beta <= 0``, wrong ``theta`` shapes, ``d = 0``).
    """
    prob = prepare(data, ambiguity, beta, theta_ref)
    theta = check_theta(theta, data.d, "theta")
    res = evaluate_inner(prob.atoms, theta - prob.theta_ref, ambiguity, hess=False, worst=True)
    primal = primal_value(res.worst_case, theta, prob.beta, prob.theta_ref)
    return Evaluation(value=res.value, dual=res.dual, worst_case=res.worst_case,
                      primal_value=primal, gap=abs(res.value - primal) / max(1.0, abs(res.value)),
                      grad=res.grad)
