"""Smoothed dual of the Wasserstein p = 1 ball with finite label-flip price (SPEC 3.3).

The Shafieezadeh-Abadeh, Mohajerin Esfahani and Kuhn (2015) dual

    F(delta) = min_{lambda >= b} lambda rho + E_P[ l + (m - lambda kappa)_+ ],   b = beta ||delta||,

is piecewise smooth in ``delta`` (a weighted quantile of the margins: its minimiser
often sits where two margins tie at the flip threshold), so Newton's method does
not apply to it directly. The solver minimises instead the smoothed

    F_mu(delta) = min_{lambda >= b} lambda rho + E_P[ l + mu softplus((m - lambda kappa) / mu) ],

which is within ``mu log 2`` of ``F`` everywhere, for a decreasing sequence of
``mu`` (a homotopy warm-starting each Newton run at the previous minimiser). The
final certificate is always computed with the exact, unsmoothed evaluation of
:mod:`simulator.solvers.inner`.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import expit

from .inner import Atoms, InnerResult

__all__ = ["smoothed_w1"]


def _flip_lambda(m, w, b, rho, kappa, mu, lam0=None):
    """``lambda*`` of the smoothed problem: ``kappa E sigmoid((m - lambda kappa)/mu) = rho``."""

    def excess(lam):
        p = expit((m - lam * kappa) / mu)
        return kappa * float(w @ p) - rho, p

    gb, p = excess(b)
    if gb <= 0:
        return b, p
    lo, hi = b, max(b, (float(m.max()) + mu * 40.0) / kappa)
    lam = lam0 if lam0 is not None and lo < lam0 < hi else lo
    for _ in range(200):
        gv, p = excess(lam)
        if gv > 0:
            lo = lam
        else:
            hi = lam
        if abs(gv) <= 1e-15 * rho or hi - lo <= 1e-16 * max(1.0, hi):
            break
        slope = -kappa**2 / mu * float(w @ (p * (1.0 - p)))
        nxt = lam - gv / slope if slope < 0 else math.nan
        lam = nxt if lo < nxt < hi else 0.5 * (lo + hi)
    # lambda is resolved only to rounding, which at small mu leaves kappa E p off by much
    # more: one first-order step in lambda, applied to p, meets the budget to rounding.
    sens = w * p * (1.0 - p)
    if sens.sum() > 0:
        p = np.clip(p + (rho / kappa - float(w @ p)) * p * (1.0 - p) / float(sens.sum()), 0.0, 1.0)
    return lam, p


def smoothed_w1(at: Atoms, delta: np.ndarray, rho: float, kappa: float, mu: float,
                warm: dict | None = None) -> InnerResult:
    """``F_mu(delta)`` with its gradient and Hessian (no worst case: see the module docstring).

    ``warm`` (a dict, updated in place) carries ``lambda`` between calls.
    """
    warm = {} if warm is None else warm
    w, a, beta = at.w, at.a, at.beta
    m = a @ delta
    dn = float(np.linalg.norm(delta))
    b = beta * dn
    lam, p = _flip_lambda(m, w, b, rho, kappa, mu, warm.get("w1"))
    warm["w1"] = lam
    s = expit(-m)
    value = lam * rho + float(w @ (np.logaddexp(0.0, -m) + mu * np.logaddexp(0.0, (m - lam * kappa)
                                                                             / mu)))
    grad = (w * (p - s)) @ a
    curv = p * (1.0 - p) / mu
    g_l = rho - kappa * float(w @ p)
    clamped = not (lam > b or dn == 0.0)
    if clamped:  # lambda = b(delta): chain rule through b = beta ||delta||
        grad = grad + g_l * beta * delta / dn

    def hess():
        h = (a * (w * (s * (1.0 - s) + curv))[:, None]).T @ a
        g_dl = -kappa * (w * curv) @ a
        g_ll = kappa**2 * float(w @ curv)
        if not clamped:  # lambda interior: Schur complement
            return h - np.outer(g_dl, g_dl) / g_ll if g_ll > 0 else h
        u = delta / dn
        db = beta * u
        return (h + np.outer(g_dl, db) + np.outer(db, g_dl) + g_ll * np.outer(db, db)
                + g_l * (beta / dn) * (np.eye(delta.size) - np.outer(u, u)))

    return InnerResult(value, lam, grad, hess, None)
