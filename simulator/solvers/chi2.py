"""The chi-square ball ``{Q << P : E_P (dQ/dP - 1)^2 <= rho}`` (SPEC 3.2).

Inner evaluation: ``F = min_eta eta + sqrt(1 + rho) sqrt(E_P (l - eta)_+^2)``, solved
exactly on the sorted losses (on each interval between consecutive losses the minimiser
is a closed form); ``Q* ∝ P (l - eta*)_+``. The Hessian of ``F`` is the Schur complement
of the joint Hessian of ``eta + c sqrt(E r^2)``, ``r = (l - eta)_+``.

``delta = 0`` is optimal iff ``max_{g, nu} 2 g - 1 - E_P (g + nu . a)_+^2 <= rho`` (the dual
of the smallest chi-square divergence with ``E_Q a = 0``). Conic form: ``conic.py``
(form ``"chi2"``, a second-order cone).
"""

from __future__ import annotations

import math

import numpy as np

from .core import (
    Atoms,
    InnerResult,
    SetMethods,
    concave_max,
    logistic_gap,
    min_norm_mean,
    reweighting_result,
    top_atoms,
)
from .nominal import nominal_result

__all__ = ["METHODS"]


def _evaluate(at: Atoms, delta, m, l, amb, hess, worst, state) -> InnerResult:
    rho = amb.rho
    if rho == 0.0:
        return nominal_result(at, m, l, hess, dual=-math.inf)
    top, lmax = top_atoms(at, l)
    w = at.w
    c2 = 1.0 + rho
    c = math.sqrt(c2)
    z = l - lmax
    order = np.argsort(-z, kind="stable")
    zs, ws = z[order], w[order]
    a0, a1, a2 = np.cumsum(ws), np.cumsum(ws * zs), np.cumsum(ws * zs**2)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu = np.where(a0 > 0, a1 / a0, 0.0)
        var = np.clip(np.where(a0 > 0, a2 / a0, 0.0) - mu**2, 0.0, None)
        den = c2 * a0 - 1.0
        eta_k = np.where(den > 0, mu - np.sqrt(var / np.where(den > 0, den, 1.0)), -np.inf)
    left = np.append(zs[1:], -np.inf)
    eta_c = np.clip(eta_k, left, zs)
    f = eta_c + c * np.sqrt(np.clip(a2 - 2 * eta_c * a1 + eta_c**2 * a0, 0.0, None))
    k = int(np.argmin(f))
    eta = float(eta_c[k])
    if den[k] > 0 and eta_k[k] > left[k]:  # interior stationary point: two-pass refinement
        act = order[: k + 1]
        wa = w[act]
        mu_k = float(wa @ z[act]) / float(wa.sum())
        var_k = float(wa @ (z[act] - mu_k) ** 2) / float(wa.sum())
        eta = min(mu_k - math.sqrt(var_k / (c2 * float(wa.sum()) - 1.0)), float(zs[k]))
    r = np.maximum(z - eta, 0.0)
    er = float(w @ r)
    if er <= 0.0:  # eta* = max l: the max-loss atoms take all the mass
        q = np.where(top, w, 0.0)
        q = q / q.sum()
        return reweighting_result(at, m, q, lmax, lmax, hess, l=l)
    nrm = math.sqrt(float(w @ r**2))
    q = w * r / er
    value = lmax + eta + c * nrm
    act = (r > 0).astype(np.float64)

    def parts(sg, grad):
        # Hessian of F = Schur complement of the joint Hessian of eta + c sqrt(E r^2), with
        # the per-atom loss gradients g_i = -sg_i a_i: E_{c w r / nrm} hess l + h_dd -
        # h_de h_de^T / h_ee, h_dd = c (E_P act g g^T / nrm - erg erg^T / nrm^3)
        wa = w * act
        curv = (c / nrm) * sg * (w * r * (1.0 - sg) + wa * sg)
        erg = -((w * r * sg) @ at.a)
        eag = -((wa * sg) @ at.a)
        h_de = c * (-eag / nrm + erg * er / nrm**3)
        h_ee = c * (float(w @ act) / nrm - er**2 / nrm**3)
        low = [(-c / nrm**3, erg)]
        if h_ee > 0:
            low.append((-1.0 / h_ee, h_de))
        return curv, low

    return reweighting_result(at, m, q, value, lmax + eta, hess, parts, l=l)


def _zero_test(at: Atoms, amb) -> float | None:
    """``delta = 0`` is optimal iff ``max_{g, nu} 2 g - 1 - E_P (g + nu . a)_+^2 <= rho``;
    ``Q ∝ P (g + nu . a)_+`` at the maximiser (mixed with ``P`` into the ball if rounding left
    it outside) is the witness whose logistic regression bounds ``min F`` below."""
    a, w = at.a, at.w

    def dual_chi2(y):  # concave: 2 g - 1 - E (g + nu . a)_+^2, with y = (g, nu)
        r = np.maximum(y[0] + a @ y[1:], 0.0)
        act = w * (r > 0)
        grad = np.concatenate([[2.0 - 2.0 * float(w @ r)], -2.0 * (w * r) @ a])

        def hess():  # -2 E_act (1, a)(1, a)^T in blocks, without an n x (d + 1) copy
            v = act @ a
            b = a * np.sqrt(act)[:, None]
            return -2.0 * np.block([[np.array([[act.sum()]]), v[None, :]],
                                    [v[:, None], b.T @ b]])

        return 2.0 * y[0] - 1.0 - float(w @ r**2), grad, hess

    y0 = np.zeros(a.shape[1] + 1)
    y0[0] = 1.0
    found = concave_max(dual_chi2, y0, amb.rho)
    if found.above is not False:
        return None
    q = w * np.maximum(found.y[0] + a @ found.y[1:], 0.0)
    q = q / q.sum()
    pos = w > 0
    div = float(q[pos] @ (q[pos] / w[pos])) - 1.0
    if div > amb.rho:  # chi2((1 - t) Q + t P) = (1 - t)^2 chi2(Q) = rho
        t = 1.0 - math.sqrt(amb.rho / div)
        q = (1.0 - t) * q + t * w
    return logistic_gap(a, q, np.zeros(a.shape[1]), math.log(2.0))


def _descent_at_zero(at: Atoms, amb) -> np.ndarray | None:
    """The steepest descent direction of ``F`` at ``delta = 0`` (not optimal there):
    :func:`.core.min_norm_mean` over ``Q_nu ∝ P r``, ``r = (1 + nu . a)_+`` (the KKT form of
    the minimiser of ``||E_Q a||`` in the chi-square ball), with ``S = E_P r``, ``T = E_P
    r^2``: ``c = E_P r a / S``, ``chi2 = T / S^2 - 1``."""
    a, w = at.a, at.w

    def family(nu):
        r = np.maximum(1.0 + a @ nu, 0.0)
        wr, wact = w * r, w * (r > 0)
        big_s, big_t = float(wr.sum()), float(wr @ r)
        c = wr @ a / big_s
        jac = ((a - c) * wact[:, None]).T @ a / big_s
        ddiv = 2.0 * (wr @ a) / big_s**2 - 2.0 * big_t * (wact @ a) / big_s**3
        return c, jac, big_t / big_s**2 - 1.0, ddiv

    return min_norm_mean(family, a.shape[1], amb.rho)


METHODS = SetMethods(
    name="chi2dpo", evaluate=_evaluate, zero_test=_zero_test, descent_at_zero=_descent_at_zero,
    coercive=lambda amb: False, smooth=lambda amb: True,
    conic="simulator.solvers.conic: form 'chi2', eta + sqrt(1 + rho) ||sqrt(w) r||_2")
