"""The nominal set ``{P}``: plain DPO, ``F(delta) = E_P l`` (SPEC 3).

Conic form: ``conic.py`` (form ``"nominal"``). Also the ``rho = 0`` case of every other
set, which calls :func:`nominal_reweighting` (or :func:`nominal_result`) with its own
limiting dual variable.
"""

from __future__ import annotations

import numpy as np

from .core import (
    Atoms,
    InnerResult,
    Reweighting,
    SetMethods,
    reweighting_result,
)

__all__ = ["METHODS", "nominal_result", "nominal_reweighting"]


def nominal_reweighting(at: Atoms, l: np.ndarray, dual: float | None = None) -> Reweighting:
    """``E_P l`` with the worst case ``P`` itself."""
    return Reweighting(at.w, float(at.w @ l), dual)


def nominal_result(at: Atoms, m: np.ndarray, l: np.ndarray, hess: bool,
                   dual: float | None = None) -> InnerResult:
    """``E_P l`` with its gradient, Hessian ``E_P sigmoid' a a^T`` and the worst case ``P``."""
    return reweighting_result(at, m, nominal_reweighting(at, l, dual), hess, l=l)


def _reweight(at, m, l, amb, state) -> Reweighting:
    return nominal_reweighting(at, l)


METHODS = SetMethods(
    name="dpo", reweight=_reweight,
    zero_test=lambda at, amb: None,  # rho = 0: only E_P a = 0 makes 0 optimal
    coercive=lambda amb: False, smooth=lambda amb: True, subsample_model=True,
    conic="simulator.solvers.conic: form 'nominal', min E_P softplus(-m)")
