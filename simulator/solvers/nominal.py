"""The nominal set ``{P}``: plain DPO, ``F(delta) = E_P l`` (SPEC 3).

Conic form: ``conic.py`` (form ``"nominal"``). Also the ``rho = 0`` case of every other
set, which calls :func:`nominal_result` with its own limiting dual variable.
"""

from __future__ import annotations

import numpy as np

from .core import Atoms, InnerResult, SetMethods, reweighting_result

__all__ = ["METHODS", "nominal_result"]


def nominal_result(at: Atoms, m: np.ndarray, l: np.ndarray, hess: bool,
                   dual: float | None = None) -> InnerResult:
    """``E_P l`` with its gradient, Hessian ``E_P sigmoid' a a^T`` and the worst case ``P``."""
    return reweighting_result(at, m, at.w, float(at.w @ l), dual, hess, l=l)


def _evaluate(at, delta, m, l, amb, hess, worst, state) -> InnerResult:
    return nominal_result(at, m, l, hess)


METHODS = SetMethods(
    name="dpo", evaluate=_evaluate,
    zero_test=lambda at, amb: None,  # rho = 0: only E_P a = 0 makes 0 optimal
    coercive=lambda amb: False, smooth=lambda amb: True,
    conic="simulator.solvers.conic: form 'nominal', min E_P softplus(-m)")
