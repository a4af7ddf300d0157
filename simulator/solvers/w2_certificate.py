"""Fallback certificate of the Wasserstein p = 2 set, attached by :mod:`.registry` while
:mod:`.wasserstein2` brings none of its own (``METHODS.certify is None``).

Weak duality through the worst case (:func:`~.core.worst_case_gap`) and, where atoms split
between two moves at ``lambda*`` (a kink of ``F``), also through the split shares that make
the worst case's gradient smallest: a bounded least-squares problem in the shares ``s_i``
(the gradient of ``E_Q l`` is affine in them), with the budget as a heavily weighted row;
any shares within the budget give a distribution in the ball, so the bound stays valid.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import lsq_linear
from scipy.special import expit

from .core import Atoms, InnerResult, logistic_gap, worst_case_gap
from .wasserstein2 import Moves, W2State

__all__ = ["w2_fallback_certificate"]

#: Weight of the budget row in the least-squares choice of the split shares (relative to the
#: gradient rows): the budget is then met to about 1e-6 of the gradient scale, and the shares
#: are scaled back into the ball afterwards.
_BUDGET_WEIGHT = 1e6
#: Two moves of one atom with ``tau`` closer than this (relative to ``1 + tau``) are the same
#: (the threshold :mod:`.wasserstein2` uses to find the switching atoms).
_SAME_MOVE = 1e-7


def _moved_atoms(at: Atoms, mv: Moves, rows: np.ndarray, u: np.ndarray, b: float) -> np.ndarray:
    """``ytil' beta x'`` of the atoms ``rows`` after the moves ``mv``."""
    y = np.where(mv.flip[rows], 1.0 - at.y[rows], at.y[rows])
    sgn = 2.0 * y - 1.0
    x = at.x[rows] - (sgn * mv.tau[rows] / b)[:, None] * u[None, :]
    return (sgn * at.beta)[:, None] * x


def w2_fallback_certificate(at: Atoms, amb, delta: np.ndarray, res: InnerResult,
                            info: dict) -> float:
    """Certified relative gap of ``delta`` (see the module docstring)."""
    gap = worst_case_gap(at, amb, delta, res, info)
    state = res.state
    if not isinstance(state, W2State) or state.pair is None or state.pair.lo is state.pair.hi:
        return gap
    hi, lo, w = state.pair.hi, state.pair.lo, at.w
    switch = (lo.flip != hi.flip) | (np.abs(lo.tau - hi.tau) > _SAME_MOVE * (1.0 + hi.tau))
    idx = np.flatnonzero(switch & (w > 0))
    if idx.size == 0:
        return gap
    dn = float(np.linalg.norm(delta))
    u, b = delta / dn, at.beta * dn
    a_hi = _moved_atoms(at, hi, np.arange(w.size), u, b)
    a_lo = _moved_atoms(at, lo, idx, u, b)
    g_hi = -(w * expit(-(a_hi @ delta)))[:, None] * a_hi
    g_lo = -expit(-(a_lo @ delta))[:, None] * a_lo
    cols = (w[idx][:, None] * (g_lo - g_hi[idx] / w[idx][:, None])).T  # (d, |idx|)
    c = w[idx] * (lo.cost[idx] - hi.cost[idx])
    room = amb.rho**2 - float(w @ hi.cost)
    scale = _BUDGET_WEIGHT * max(float(np.linalg.norm(cols)), 1e-300) / max(
        float(np.linalg.norm(c)), 1e-300)
    fit = lsq_linear(np.vstack([cols, scale * c[None, :]]),
                     np.append(-g_hi.sum(axis=0), scale * room), bounds=(0.0, 1.0))
    s = fit.x
    spent = float(c @ s)
    if spent > room > 0:
        s = s * (room / spent)
    elif spent > room:
        return gap
    q_hi = w.copy()
    q_hi[idx] *= 1.0 - s
    split = logistic_gap(np.vstack([a_hi, a_lo]), np.concatenate([q_hi, w[idx] * s]), delta,
                         res.value) / max(1.0, abs(res.value))
    return min(gap, split)
