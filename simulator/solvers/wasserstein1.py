"""The Wasserstein p = 1 ball with finite label-flip price: smoothing, faces, certificates.

The Shafieezadeh-Abadeh, Mohajerin Esfahani and Kuhn (2015) dual (SPEC 3.3)

    F(delta) = E_P l + min_{lambda >= b} lambda rho + E_P (m - lambda kappa)_+,
    b = beta ||delta||,

is piecewise smooth in ``delta`` (a weighted quantile of the margins: its minimiser
usually sits where one or more margins tie at the flip threshold), so Newton's method
does not apply to it directly. :mod:`simulator.solvers.dual` minimises instead the
smoothed

    F_mu(delta) = E_P l + min_{lambda >= b} lambda rho + E_P mu softplus((m - lambda kappa) / mu),

within ``mu log 2`` of ``F``, for ``mu = 1e-1, 1e-2, ...`` (each Newton run warm-started
at the previous minimiser). From each smoothed minimiser it reads off the face of the
exact problem (which atoms tie at the threshold), solves the optimality system on
that face exactly (:func:`polish_face`), and certifies the candidate.

The certificate. By linear programming duality in ``lambda``,

    F(delta) = E_P l + max_{q in Q} q . m + (rho - kappa sum q) b,
    Q = {0 <= q_i <= w_i, kappa sum q <= rho},

so for every ``q in Q`` the smooth, strictly convex Lagrangian
``L_q(delta) = E_P l + q . m + (rho - kappa sum q) b`` has ``min L_q <= min F`` (weak
duality), and ``F(delta) - min L_q`` bounds the suboptimality of ``delta``. The shares of
a solved face, or the smoothed shares ``q_i = w_i sigmoid((m_i - lambda kappa) / mu)``
(which make ``delta_mu`` stationary for ``L_q``), supply ``q``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit

from ..losses import softplus
from .inner import Atoms, InnerResult, weighted_hess

__all__ = ["polish_face", "smoothed_w1", "smoothing_gap", "w1_lagrangian"]

#: Atoms farther than this many ``mu`` from the flip threshold have share 0 or 1 (to 4e-18).
_WINDOW = 40.0


def _flip_threshold(m: np.ndarray, w: np.ndarray, t_min: float, c: float, mu: float,
                    t0: float | None) -> tuple[float, np.ndarray]:
    """Threshold ``t >= t_min`` with ``sum_i w_i sigmoid((m_i - t) / mu) = c`` and its shares.

    Returns ``t_min`` if the flipped mass there is already ``<= c``. The decreasing mass
    is bracketed from the warm start ``t0`` (steps growing 4-fold from ``_WINDOW mu``),
    the bracket is bisected while it is wide, and Brent's method finishes. Atoms more
    than ``_WINDOW mu`` outside the bracket have shares fixed at 0 or 1 and are dropped
    from later passes, so at small ``mu`` (a nearly discontinuous mass) most steps cost
    little.
    """
    sub = {"i": np.arange(m.size), "m": m, "w": w, "base": 0.0}

    def excess(t: float) -> float:
        return sub["base"] + float(sub["w"] @ expit((sub["m"] - t) / mu)) - c

    def restrict(lo: float, hi: float) -> None:
        ms, ws = sub["m"], sub["w"]
        top = ms >= hi + _WINDOW * mu
        keep = ~top & (ms > lo - _WINDOW * mu)
        sub.update(i=sub["i"][keep], m=ms[keep], w=ws[keep],
                   base=sub["base"] + float(ws[top].sum()))

    lo, hi = t_min, math.inf
    if t0 is not None and t0 > t_min and not excess(t0) > 0:
        hi = t0  # the warm start is above the root: step down from it
        restrict(-math.inf, hi)
        step, found = _WINDOW * mu, False
        while not found:
            t = max(hi - step, t_min)
            if excess(t) > 0:
                lo, found = t, True
            elif t == t_min:  # lambda = b: the budget is not all flipped
                return t_min, expit((m - t_min) / mu)
            else:
                hi = t
            restrict(lo, hi)
            step *= 4.0
    else:
        if t0 is not None and t0 > t_min:
            lo = t0
        elif not excess(t_min) > 0:  # lambda = b: the budget is not all flipped
            return t_min, expit((m - t_min) / mu)
        restrict(lo, hi)
        step = _WINDOW * mu
        while math.isinf(hi):  # step up from lo
            t = lo + step
            if excess(t) > 0:
                lo = t
            else:
                hi = t
            restrict(lo, hi)
            step *= 4.0
    while sub["m"].size > 4096 and hi - lo > 16.0 * mu:
        t = 0.5 * (lo + hi)
        if excess(t) > 0:
            lo = t
        else:
            hi = t
        restrict(lo, hi)
    if excess(hi) < 0 < excess(lo):
        t = brentq(excess, lo, hi, xtol=1e-300, rtol=4.0 * np.finfo(float).eps, maxiter=500)
    else:  # the mass meets c at an end of the bracket to rounding
        t = hi if abs(excess(hi)) <= abs(excess(lo)) else lo
    p = expit((m - t) / mu)
    # t is resolved only to rounding, which at small mu leaves sum w p off by much more:
    # one first-order step in t, applied to p (in the window: elsewhere p(1 - p) < 4e-18),
    # meets the budget to rounding.
    i = sub["i"]
    pi = p[i]
    dp = pi * (1.0 - pi)
    sens = float(w[i] @ dp)
    if sens > 0:
        p[i] = np.clip(pi + (c - float(w @ p)) * dp / sens, 0.0, 1.0)
    return t, p


def smoothed_w1(at: Atoms, delta: np.ndarray, rho: float, kappa: float, mu: float,
                warm: dict | None = None) -> InnerResult:
    """``F_mu(delta)`` with its gradient and Hessian (no worst case: see the module docstring).

    ``warm`` (a dict, updated in place) carries ``lambda`` between calls and receives
    the flip shares ``q = w sigmoid((m - lambda kappa) / mu)`` under ``"w1_q"``.
    """
    warm = {} if warm is None else warm
    w, a, beta = at.w, at.a, at.beta
    m = a @ delta
    dn = float(np.linalg.norm(delta))
    b = beta * dn
    t0 = warm.get("w1")
    t, p = _flip_threshold(m, w, b * kappa, rho / kappa, mu, None if t0 is None else t0 * kappa)
    lam = b if t <= b * kappa else t / kappa  # exactly b when clamped
    warm["w1"], warm["w1_q"] = lam, w * p
    s = expit(-m)
    value = lam * rho + float(w @ (softplus(-m) + mu * softplus((m - t) / mu)))
    grad = (w * (p - s)) @ a
    curv = p * (1.0 - p) / mu
    g_l = rho - kappa * float(w @ p)
    clamped = not (lam > b or dn == 0.0)
    if clamped:  # lambda = b(delta): chain rule through b = beta ||delta||
        grad = grad + g_l * beta * delta / dn

    def hess():
        h = weighted_hess(at, w * (s * (1.0 - s) + curv))
        g_dl = -kappa * (w * curv) @ a
        g_ll = kappa**2 * float(w @ curv)
        if not clamped:  # lambda interior: Schur complement
            return h - np.outer(g_dl, g_dl) / g_ll if g_ll > 0 else h
        u = delta / dn
        db = beta * u
        return (h + np.outer(g_dl, db) + np.outer(db, g_dl) + g_ll * np.outer(db, db)
                + g_l * (beta / dn) * (np.eye(delta.size) - np.outer(u, u)))

    return InnerResult(value, lam, grad, hess, None)


def smoothing_gap(at: Atoms, delta: np.ndarray, q: np.ndarray, lam: float, rho: float,
                  kappa: float) -> float:
    """Cheap estimate of the duality gap that :func:`w1_lagrangian` would certify.

    With ``t = lam kappa >= kappa b`` the threshold of the smoothed shares ``q``,
    ``F(delta) - L_q(delta) <= sum_i w_i (m_i - t)_+ - q_i (m_i - t)`` (``lambda = t / kappa``
    is feasible in the dual of ``F``). ``delta`` is stationary for ``L_q``, so
    ``L_q(delta)`` is ``min L_q`` to second order; the estimate is the smaller of that
    bound and ``log 2 - L_q(delta)`` (the candidate ``delta = 0``, where ``F = log 2``),
    relative to ``max(1, F)``.
    """
    m = at.a @ delta
    x = m - lam * kappa
    lagrangian = float(at.w @ softplus(-m) + q @ m) + (
        (rho - kappa * float(q.sum())) * at.beta * float(np.linalg.norm(delta)))
    gap = min(float(at.w @ np.maximum(x, 0.0) - q @ x), math.log(2.0) - lagrangian)
    return gap / max(1.0, lagrangian)


def _lagrangian(at: Atoms, delta: np.ndarray, qa: np.ndarray, nu: float) -> InnerResult:
    """``E_P l + qa . delta + nu ||delta||`` with its gradient and (lazy) Hessian.

    ``L_q`` of :func:`w1_lagrangian` with ``qa = q . a`` and ``nu = (rho - kappa sum q)
    beta``; also the stationarity part of the face system of :func:`_solve_face`.
    """
    m = at.a @ delta
    dn = float(np.linalg.norm(delta))
    s = expit(-m)
    u = delta / dn if dn > 0 else np.zeros_like(delta)

    def hess():
        h = weighted_hess(at, at.w * s * (1.0 - s))
        if dn > 0:
            h = h + (nu / dn) * (np.eye(delta.size) - np.outer(u, u))
        return h

    value = float(at.w @ softplus(-m)) + float(qa @ delta) + nu * dn
    return InnerResult(value, None, -(at.w * s) @ at.a + qa + nu * u, hess, None)


def w1_lagrangian(at: Atoms, q: np.ndarray, rho: float, kappa: float):
    """``L_q(delta) = E_P l + q . m + (rho - kappa sum q) beta ||delta||`` for ``q`` in ``Q``.

    ``q`` is scaled down if rounding left ``kappa sum q`` above ``rho``. Returns a function
    ``(delta, warm) -> InnerResult`` (value, gradient, Hessian) for Newton's method; its
    minimum is a lower bound on ``min_delta F`` (see the module docstring).
    """
    q = np.clip(q, 0.0, at.w)
    if kappa * float(q.sum()) > rho:
        q = q * (rho / (kappa * float(q.sum())))
    qa = q @ at.a
    nu = max(rho - kappa * float(q.sum()), 0.0) * at.beta
    return lambda delta, warm: _lagrangian(at, delta, qa, nu)


def _solve_face(at: Atoms, delta: np.ndarray, t: float, tied: np.ndarray, big_w: np.ndarray,
                r0: np.ndarray, full: np.ndarray, clamped: bool, rho: float, kappa: float,
                tol: float, max_iter: int):
    """Newton's method on the optimality system of ``min F`` on one face (see polish_face).

    ``tied`` holds one representative atom per group of identical atoms, ``big_w`` the
    groups' weights and ``r0`` their starting shares. Returns ``(delta, t, r)`` or
    ``None`` if Newton stalls.
    """
    w, a, beta, d = at.w, at.a, at.beta, delta.size
    groups, k = a[tied], tied.size
    a_full, w_full = w[full] @ a[full], float(w[full].sum())

    def residual(z):
        delta, r = z[:d], z[d + (0 if clamped else 1):]
        flipped = w_full + float(r @ big_w)
        # stationarity: grad L_q = 0 for the shares q of this face (nu = 0 if lambda > b)
        nu = (rho - kappa * flipped) * beta if clamped else 0.0
        lag = _lagrangian(at, delta, a_full + (r * big_w) @ groups, nu)
        g, h = lag.grad, lag.hess()
        if clamped:
            dn = float(np.linalg.norm(delta))
            slope = groups - kappa * beta * delta / dn  # d (a_j . delta - kappa b) / d delta
            jac = np.zeros((d + k, d + k))
            jac[:d, :d], jac[:d, d:], jac[d:, :d] = h, (slope * big_w[:, None]).T, slope
            return np.concatenate([g, groups @ delta - kappa * beta * dn]), jac
        jac = np.zeros((d + k + 1, d + k + 1))
        jac[:d, :d], jac[:d, d + 1:] = h, (groups * big_w[:, None]).T
        jac[d:d + k, :d], jac[d:d + k, d] = groups, -1.0
        jac[d + k, d + 1:] = big_w
        return np.concatenate([g, groups @ delta - z[d], [flipped - rho / kappa]]), jac

    z = np.concatenate([delta, r0] if clamped else [delta, [t], r0])
    res, jac = residual(z)
    for _ in range(max_iter):
        if np.max(np.abs(res)) <= tol:
            delta, r = z[:d], z[d + (0 if clamped else 1):]
            return delta, (kappa * beta * float(np.linalg.norm(delta)) if clamped else z[d]), r
        norm = float(np.linalg.norm(res))
        step = np.linalg.lstsq(jac, -res, rcond=None)[0]
        step_len = 1.0
        while step_len > 1e-6:
            new = residual(z + step_len * step)
            if float(np.linalg.norm(new[0])) < (1.0 - 1e-4 * step_len) * norm:
                break
            step_len *= 0.5
        else:
            return None
        z, (res, jac) = z + step_len * step, new
    return None


def polish_face(at: Atoms, delta: np.ndarray, q: np.ndarray, lam: float, rho: float,
                kappa: float, tol: float, rounds: int = 4, max_iter: int = 10):
    """Exact minimiser of ``F`` on the face that the smoothed minimiser ``delta`` points to.

    Atoms with a smoothed share ``q_i / w_i`` in ``(1e-3, 1 - 1e-3)`` are taken to tie at
    the flip threshold ``t`` (identical atoms merged into groups ``j`` of weight ``W_j``);
    the rest keep share 1 or 0. Newton's method then solves the optimality system of
    ``min F`` on that face, unknowns ``delta``, the groups' shares ``r_j`` and (when
    ``lambda > b``) ``t``:

    * ``grad E_P l + sum_full w_i a_i + sum_j r_j W_j a_j + nu beta u = 0``,
    * ``a_j . delta = t`` for every group, with ``t = kappa b`` if ``lambda = b``,
    * ``kappa (w_full + sum_j r_j W_j) = rho`` if ``lambda > b``; otherwise
      ``nu = rho - kappa (w_full + sum_j r_j W_j)``.

    An active-set loop then moves groups with ``r_j < 0`` (``> 1``) to share 0 (1),
    atoms that crossed ``t`` into the tied set, and switches between ``lambda = b`` and
    ``lambda > b`` when ``nu < 0`` or ``t < kappa b``, and solves again (``rounds``
    times at most). Returns ``(delta, q)`` with the exact shares ``q``, or ``None``
    (more groups than unknowns, or Newton stalled). The caller certifies the answer by
    the duality gap, so a wrong face costs time, never accuracy.
    """
    w, a, beta, d = at.w, at.a, at.beta, delta.size
    share = np.divide(q, w, out=np.zeros_like(q), where=w > 0)
    tied_mask = (share > 1e-3) & (share < 1.0 - 1e-3)
    full = share >= 1.0 - 1e-3
    clamped = lam <= beta * float(np.linalg.norm(delta))
    t = lam * kappa
    for _ in range(rounds):
        idx = np.flatnonzero(tied_mask)
        if idx.size == 0:
            return None
        _, first, inverse = np.unique(a[idx], axis=0, return_index=True, return_inverse=True)
        inverse = inverse.ravel()
        big_w = np.bincount(inverse, w[idx])
        if first.size > d + (0 if clamped else 1):
            return None
        r0 = np.clip(np.bincount(inverse, share[idx] * w[idx]) / big_w, 0.0, 1.0)
        out = _solve_face(at, delta, t, idx[first], big_w, r0, full, clamped, rho, kappa,
                          tol, max_iter)
        if out is None:
            return None
        delta, t, r = out
        m = at.a @ delta
        eps = 1e-12 * max(1.0, abs(t))
        r_atoms = r[inverse]
        below, above = r_atoms < -1e-12, r_atoms > 1.0 + 1e-12
        crossed = (~tied_mask & (full & (m < t - eps) | ~full & (m > t + eps))) & (w > 0)
        flipped = float(w[full].sum() + r @ big_w)
        switch = (rho - kappa * flipped < -1e-12) if clamped else (
            t < kappa * beta * float(np.linalg.norm(delta)) * (1.0 - 1e-15))
        if not (below.any() or above.any() or crossed.any() or switch):
            share = full.astype(np.float64)
            share[idx] = np.clip(r_atoms, 0.0, 1.0)
            return delta, w * share
        full = full.copy()
        full[idx[above]] = True
        tied_mask = tied_mask.copy()
        tied_mask[idx[below | above]] = False
        tied_mask |= crossed
        full &= ~tied_mask
        clamped = clamped != switch
        share = full.astype(np.float64)
        share[idx[~(below | above)]] = np.clip(r_atoms[~(below | above)], 0.0, 1.0)
    return None
