"""Exact inner supremum ``L_U(theta; P) = sup_{Q in U(P)} E_Q l`` at a fixed theta (SPEC 3).

For every ambiguity set this module returns the dual value with its optimal dual
variable, a worst-case distribution ``Q*`` (the primal certificate), and the
gradient of ``F(delta) = L_U(theta_ref + delta)`` by Danskin's theorem; on request
also the Hessian of ``F`` (the Schur complement of the joint Hessian of the dual
objective in ``(delta, dual variable)``, i.e. the Hessian of the partial minimum),
which the Newton solver of :mod:`simulator.solvers.dual` uses.

Notation: ``a_i = ytil_i beta x_i``, margins ``m_i = a_i . delta``, losses
``l_i = softplus(-m_i)``, per-atom gradients ``g_i = -sigmoid(-m_i) a_i`` and
Hessians ``sigmoid(m_i) sigmoid(-m_i) a_i a_i^T``, ``b = beta ||delta||``.

* Nominal: ``E_P l``.
* KL (SPEC 3.1): ``min_{lambda > 0} lambda rho + lambda log E_P exp(l / lambda)``;
  ``lambda*`` solves ``KL(Q_lambda || P) = rho`` with ``Q_lambda ∝ P exp(l / lambda)``
  (a monotone 1-D root, safeguarded Newton in ``log(1/lambda)``); ``lambda* = 0`` and
  ``L = max l`` once ``rho >= -log P(argmax l)``.
* Chi-square (SPEC 3.2): ``min_eta eta + sqrt(1 + rho) sqrt(E_P (l - eta)_+^2)``,
  solved exactly on the sorted losses (on each interval between consecutive losses
  the minimiser is a closed form); ``Q* ∝ P (l - eta*)_+``.
* Wasserstein p = 1, ``kappa = inf``: ``E_P l + rho b``.
* Wasserstein p = 1, finite ``kappa`` (Shafieezadeh-Abadeh et al. 2015):
  ``min_{lambda >= b} lambda rho + E_P max(l, softplus(m) - lambda kappa)``, a weighted
  quantile of the margins.
* Wasserstein p = 2: :mod:`simulator.solvers.wasserstein2`.

The suprema of the ``p = 1`` sets are not attained (mass moved ever further); the
worst case moves a mass ``eps`` of one atom far enough that its primal value is
within ``1e-13 max(1, |L|)`` of ``L``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from .._validation import check_positive, check_theta
from ..ambiguity import KL, AmbiguitySet, ChiSquare, Nominal, Wasserstein
from ..data import PreferenceData
from ..losses import dpo_loss, margins, softplus
from .result import Evaluation, WorstCase
from .wasserstein2 import Moves, solve_lambda

__all__ = ["robust_objective", "Atoms", "InnerResult", "evaluate_inner", "prepare", "w2_blocks",
           "weighted_hess"]

#: Unattained part of a ``p = 1`` supremum left in the worst case (relative to ``max(1, |L|)``).
_MOVE_TOL = 1e-13


@dataclass(frozen=True, eq=False)
class Atoms:
    """The data of one problem in the form the solvers use (``a = ytil beta x``)."""

    x: np.ndarray
    y: np.ndarray
    w: np.ndarray
    a: np.ndarray
    beta: float

    @classmethod
    def from_data(cls, data: PreferenceData, beta: float) -> Atoms:
        return cls(data.x, data.y, data.weights, (data.ytil * beta)[:, None] * data.x, beta)


@dataclass(frozen=True, eq=False)
class InnerResult:
    """``F(delta)``, its dual variable, Danskin gradient, optional Hessian and worst case.

    ``hess`` is a function of no arguments returning the Hessian (computed only when
    called, so that line searches do not pay for it), or ``None`` if not requested.
    """

    value: float
    dual: float | None
    grad: np.ndarray
    hess: Callable[[], np.ndarray] | None
    worst_case: WorstCase | None


def prepare(data, ambiguity, beta, theta_ref) -> tuple[Atoms, float, np.ndarray]:
    """Validate the common arguments of ``solve`` / ``robust_objective``."""
    if not isinstance(data, PreferenceData):
        raise ValueError(f"data must be a PreferenceData, got {type(data).__name__}")
    if not isinstance(ambiguity, AmbiguitySet):
        raise ValueError(f"ambiguity must be Nominal, KL, ChiSquare or Wasserstein, "
                         f"got {ambiguity!r}")
    beta = check_positive(beta, "beta")
    theta_ref = check_theta(theta_ref, data.d, "theta_ref")
    return Atoms.from_data(data, beta), beta, theta_ref


def weighted_hess(at: Atoms, c: np.ndarray) -> np.ndarray:
    """``sum_i c_i a_i a_i^T``."""
    return (at.a * c[:, None]).T @ at.a


def _reweighted(at: Atoms, q: np.ndarray) -> WorstCase:
    return WorstCase(q, at.x, at.y, np.arange(at.x.shape[0]))


def _nominal(at, m, l, hess, dual=None):
    s = expit(-m)
    grad = -(at.w * s) @ at.a
    h = (lambda: weighted_hess(at, at.w * s * (1.0 - s))) if hess else None
    return InnerResult(float(at.w @ l), dual, grad, h, _reweighted(at, at.w))


def _top(at, l):
    """Indicator of the max-loss atoms (ties within ``1e-14``) among positive weights."""
    pos = at.w > 0
    lmax = float(l[pos].max())
    return pos & (l >= lmax - 1e-14 * max(1.0, abs(lmax))), lmax


def _reweighting_result(at, m, q, value, dual, hess_extra, hess, q_hess=None):
    """Danskin gradient ``E_Q grad l`` and Hessian ``E_{q_hess} hess l + hess_extra(g)``."""
    s = expit(-m)
    grad = -(q * s) @ at.a

    def h():
        out = weighted_hess(at, (q if q_hess is None else q_hess) * s * (1.0 - s))
        if hess_extra is not None:
            out = out + hess_extra(-s[:, None] * at.a)
        return out

    return InnerResult(float(value), dual, grad, h if hess else None, _reweighted(at, q))


def _kl(at, m, l, rho, hess, warm):
    top, lmax = _top(at, l)
    pmax = float(at.w[top].sum())
    if rho >= -math.log(pmax):
        q = np.where(top, at.w, 0.0) / pmax
        return _reweighting_result(at, m, q, lmax, 0.0, None, hess)
    z = l - lmax
    w = at.w

    def kl_at(s):  # z <= 0 with z = 0 on atoms of positive weight: exp cannot overflow
        e = w * np.exp(s * z)
        tot = float(e.sum())
        q = e / tot
        ez = float(q @ z)
        return s * ez - math.log(tot), float(q @ (z - ez) ** 2), q, math.log(tot)

    var_p = float(w @ (z - w @ z) ** 2)
    s = 1.0 / warm["kl"] if warm.get("kl") else math.sqrt(2.0 * rho / max(var_p, 1e-300))
    lo, hi = 0.0, math.inf
    for _ in range(300):
        kl, var, q, lse = kl_at(s)
        if abs(kl - rho) <= 1e-15 * max(rho, 1.0):
            break
        if kl < rho:
            lo = s
        else:
            hi = s
        u = math.log(s)
        nxt = u - (kl - rho) / (s * s * var) if var > 0 else math.nan
        nxt = min(max(nxt, u - 3.0), u + 3.0)  # a trust region in log(1 / lambda)
        lo_u = math.log(lo) if lo > 0 else -math.inf
        hi_u = math.log(hi) if math.isfinite(hi) else math.inf
        if not lo_u < nxt < hi_u:
            if math.isinf(hi_u):
                nxt = u + 2.0
            elif math.isinf(lo_u):
                nxt = u - 2.0
            else:
                nxt = 0.5 * (lo_u + hi_u)
        if math.isfinite(lo_u) and math.isfinite(hi_u) and hi_u - lo_u <= 1e-15 * abs(hi_u):
            break
        s = math.exp(nxt)
    else:
        raise RuntimeError("KL dual root search did not converge (status: max_iter)")
    lam = 1.0 / s
    warm["kl"] = lam
    value = lmax + (rho + lse) * lam

    def extra(g):
        gbar = q @ g
        gc = g - gbar
        cov = (gc * q[:, None]).T @ gc
        c = (q * (z - q @ z)) @ g
        return s * (cov - np.outer(c, c) / var) if var > 0 else s * cov

    return _reweighting_result(at, m, q, value, lam, extra, hess)


def _chi2(at, m, l, rho, hess):
    top, lmax = _top(at, l)
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
        return _reweighting_result(at, m, q, lmax, lmax, None, hess)
    nrm = math.sqrt(float(w @ r**2))
    q = w * r / er
    value = lmax + eta + c * nrm
    act = (r > 0).astype(np.float64)

    def extra(g):
        # Hessian of F = Schur complement of the joint Hessian of eta + c sqrt(E r^2).
        erg = (w * r) @ g
        eag = (w * act) @ g
        h_dd = c * ((g * (w * act)[:, None]).T @ g / nrm - np.outer(erg, erg) / nrm**3)
        h_de = c * (-eag / nrm + erg * er / nrm**3)
        h_ee = c * (float(w @ act) / nrm - er**2 / nrm**3)
        return h_dd - np.outer(h_de, h_de) / h_ee if h_ee > 0 else h_dd

    return _reweighting_result(at, m, q, value, lmax + eta, extra, hess, q_hess=c * w * r / nrm)


def _moved_far(at, keep, flip, m, delta, mu, value):
    """A mass ``eps`` of the lowest-margin kept atom, moved by ``mu / eps`` along ``-ytil u``.

    ``keep`` / ``flip`` are the masses left in place and flipped. Moving ``eps`` by ``t``
    gains at least ``mu b - eps softplus(m_k)``; ``eps`` is chosen so that this shortfall is
    at most ``_MOVE_TOL max(1, |value|)``. Returns ``(keep, eps, x_new, k, cost)``.
    """
    dn = float(np.linalg.norm(delta))
    # candidates: the kept atoms at margin m and the flipped ones at margin -m
    marg = np.where(keep > 0, m, np.inf)
    marg_f = np.where(flip > 0, -m, np.inf)
    k, k_f = int(np.argmin(marg)), int(np.argmin(marg_f))
    flipped = marg_f[k_f] < marg[k]
    k = k_f if flipped else k
    mk = float(marg_f[k] if flipped else marg[k])
    eps = min(float((flip if flipped else keep)[k]),
              _MOVE_TOL * max(1.0, abs(value)) / max(float(softplus(mk)), 1e-300))
    t = mu / eps
    y_k = 1.0 - at.y[k] if flipped else at.y[k]
    x_new = at.x[k] - (2.0 * y_k - 1.0) * t * delta / dn
    return flipped, k, eps, x_new, y_k, eps * t


def _w1(at, m, l, delta, amb, hess, worst):
    beta, rho, kappa, w = at.beta, amb.rho, amb.kappa, at.w
    dn = float(np.linalg.norm(delta))
    b = beta * dn
    flip = np.zeros_like(w)
    if math.isinf(kappa):
        lam, mu = b, rho
        value = float(w @ l) + rho * b
    else:
        # only atoms with m > b kappa can be flipped: sort those (by decreasing margin)
        cand = np.flatnonzero(m > b * kappa)
        order = cand[np.argsort(-m[cand], kind="stable")]
        cum = np.cumsum(w[order])
        j = int(np.searchsorted(kappa * cum, rho, side="right"))  # atoms fully affordable
        v_q = max(0.0, float(m[order[j]])) if j < order.size else 0.0
        lam = max(b, v_q / kappa)
        thr = v_q if v_q / kappa > b else lam * kappa
        full = m > thr
        flip = np.where(full, w, 0.0)
        mu = rho - kappa * float(flip.sum())
        if v_q / kappa > b:  # lambda* at a kink: split the atoms at the threshold
            tie = (m == thr) & (w > 0)
            flip = flip + np.where(tie, w, 0.0) * (mu / kappa) / float(w[tie].sum())
            mu = 0.0
        mu = max(mu, 0.0)
        value = lam * rho + float(w @ l) + float(w @ np.where(full, m - thr, 0.0))
    s = expit(-m)
    grad = -(w * s) @ at.a + flip @ at.a
    if dn > 0:
        grad = grad + mu * beta * delta / dn

    def h():
        out = weighted_hess(at, w * s * (1.0 - s))
        if dn > 0:
            u = delta / dn
            out = out + (mu * beta / dn) * (np.eye(delta.size) - np.outer(u, u))
        return out
    wc = None
    if worst:
        keep = w - flip
        cost = kappa * float(flip.sum()) if flip.any() else 0.0
        extra = None
        if mu > 0 and dn > 0:
            flipped, k, eps, x_new, y_new, moved = _moved_far(at, keep, flip, m, delta, mu,
                                                              value)
            (flip if flipped else keep)[k] -= eps
            extra = (eps, x_new, y_new, k)
            cost += moved
        stay, flp = np.flatnonzero(keep > 0), np.flatnonzero(flip > 0)
        parts = [(keep[stay], at.x[stay], at.y[stay], stay),
                 (flip[flp], at.x[flp], 1.0 - at.y[flp], flp)]
        if extra is not None:
            eps, x_new, y_new, k = extra
            parts.append((np.array([eps]), x_new[None, :], np.array([y_new]), np.array([k])))
        wc = WorstCase(*(np.concatenate([part[i] for part in parts]) for i in range(4)),
                       float(cost), float(rho))
    return InnerResult(float(value), float(lam), grad, h if hess else None, wc)


def w2_blocks(a, q, m, tau, flip, b, lam, beta, delta):
    """Derivatives of ``sum_k q_k V_k`` for the Wasserstein p = 2 moves ``(tau_k, flip_k)``.

    ``V_k(delta, lambda) = softplus(tau_k - s_k m_k) - lambda t_k^2`` (``s_k = -1`` if
    flipped, ``t = tau / b``) is the envelope value of one local maximiser; with
    ``f(t; m, b, lambda) = softplus(b t - m) - lambda t^2`` its second derivatives are
    ``f_xy + f_xt f_ty / D``, ``D = 2 lambda - b^2 sigmoid'``, chained through
    ``m = a . delta`` and ``b = beta ||delta||``.

    Returns
    -------
    g_d, g_l : the gradient in ``delta`` (d,) and in ``lambda`` (without ``rho^2``)
    h_dd, h_dl, h_ll : the Hessian blocks
    """
    dn = float(np.linalg.norm(delta))
    u = delta / dn
    sgn = np.where(flip, -1.0, 1.0)
    t = tau / b
    sg = expit(tau - sgn * m)
    sp = sg * (1.0 - sg)
    dd = np.maximum(2.0 * lam - b * b * sp, 1e-300)
    f_tm, f_tb, f_tl = -b * sp, sg + tau * sp, -2.0 * t
    v_mm = sp + f_tm**2 / dd
    v_mb = -t * sp + f_tm * f_tb / dd
    v_bb = t**2 * sp + f_tb**2 / dd
    bu = beta * u
    g_d = -(q * sg * sgn) @ a + float(q @ (t * sg)) * bu
    g_l = -float(q @ t**2)
    p = (q * v_mb * sgn) @ a
    h_dd = ((a * (q * v_mm)[:, None]).T @ a + np.outer(p, bu) + np.outer(bu, p)
            + float(q @ v_bb) * np.outer(bu, bu)
            + float(q @ (t * sg)) * (beta / dn) * (np.eye(delta.size) - np.outer(u, u)))
    h_dl = (q * f_tm * f_tl / dd * sgn) @ a + float(q @ (f_tb * f_tl / dd)) * bu
    h_ll = float(q @ (f_tl**2 / dd))
    return g_d, g_l, h_dd, h_dl, h_ll


def _w2_hessian(at, m, mv: Moves, b, delta, warm):
    """Hessian of ``F`` (Schur complement in ``lambda``) on the branches chosen in ``mv``.

    Also stores ``d lambda* / d delta = -G_ld / G_ll`` in ``warm`` (key ``"w2_slope"``), so
    that the next evaluation starts its search for ``lambda*`` from a first-order guess.
    """
    _, _, h, hl, h_ll = w2_blocks(at.a, at.w, m, mv.tau, mv.flip, b, mv.lam, at.beta, delta)
    if h_ll > 0:
        warm["w2_slope"] = -hl / h_ll
        return h - np.outer(hl, hl) / h_ll
    return h


def _w2_tie_hessian(at, m, hi: Moves, lo: Moves, share, b, delta, kappa):
    """Hessian of ``F`` where atoms are split between two maximisers (``lo`` / ``hi``).

    There ``lambda*(delta)`` keeps the split atoms tied and their shares keep the budget
    met, so ``F`` is the partial minimum of ``G`` over ``lambda`` subject to the ties: its
    Hessian is the Schur complement of the KKT matrix
    ``[[G_dd, G_dl, C], [G_ld, G_ll, c], [C^T, c^T, 0]]`` onto ``delta``, where column ``i`` of
    ``(C; c)`` is ``w_i`` times the difference of the two moves' gradients in
    ``(delta, lambda)``.
    """
    w, beta = at.w, at.beta
    blocks = [w2_blocks(at.a, q, m, mv.tau, mv.flip, b, mv.lam, beta, delta)
              for mv, q in ((hi, w * (1.0 - share)), (lo, w * share))]
    h_dd = blocks[0][2] + blocks[1][2]
    h_dl = blocks[0][3] + blocks[1][3]
    h_ll = blocks[0][4] + blocks[1][4]
    cols = []
    for i in np.flatnonzero(share > 0):
        diff = []
        for mv in (lo, hi):
            g_d, g_l, *_ = w2_blocks(at.a[i:i + 1], np.ones(1), m[i:i + 1], mv.tau[i:i + 1],
                                     mv.flip[i:i + 1], b, mv.lam, beta, delta)
            diff.append(np.append(g_d, g_l - (kappa if mv.flip[i] else 0.0)))
        cols.append(w[i] * (diff[0] - diff[1]))
    c = np.array(cols).T  # (d + 1, |S|)
    d = delta.size
    border = np.column_stack([h_dl, c[:d]])  # couplings of delta with (lambda, ties)
    inner = np.zeros((1 + c.shape[1],) * 2)
    inner[0, 0], inner[0, 1:], inner[1:, 0] = h_ll, c[d], c[d]
    return h_dd - border @ np.linalg.pinv(inner) @ border.T


def _w2(at, m, l, delta, amb, hess, worst, warm):
    beta, rho, kappa, w = at.beta, amb.rho, amb.kappa, at.w
    dn = float(np.linalg.norm(delta))
    b = beta * dn
    n = w.size
    if b == 0.0:  # theta = theta_ref: every loss is log 2 and moving gains nothing
        res = _nominal(at, m, l, hess, dual=0.0)
        wc = WorstCase(w, at.x, at.y, np.arange(n), 0.0, rho**2) if worst else None
        return InnerResult(res.value, 0.0, res.grad, res.hess, wc)
    lam0 = warm.get("w2")
    if lam0 is not None and np.array_equal(delta, warm.get("w2_at")):  # evaluated already
        hi, lo = warm["w2_pair"]
    else:
        if lam0 is not None and "w2_slope" in warm:  # first-order guess along the step
            guess = lam0 + float(warm["w2_slope"] @ (delta - warm["w2_at"]))
            lam0 = guess if guess > 0.5 * lam0 else lam0
        hi, lo = solve_lambda(m, w, b, rho, kappa, lam0, warm.get("w2_roots", ()),
                              warm.get("w2_pair"))
        warm.pop("w2_slope", None)
    warm.update(w2=hi.lam, w2_roots=hi.roots, w2_at=delta, w2_pair=(hi, lo))
    value = hi.lam * rho**2 + float(w @ hi.value)
    share = np.zeros(n)
    if lo is not hi:  # E cost jumps at lambda*: mix the moves of the switching atoms
        switch = (lo.flip != hi.flip) | (np.abs(lo.tau - hi.tau) > 1e-7 * (1.0 + hi.tau))
        extra = float(w @ np.where(switch, lo.cost - hi.cost, 0.0))
        theta = (rho**2 - float(w @ hi.cost)) / extra if extra > 0 else 0.0
        share = np.where(switch, float(np.clip(theta, 0.0, 1.0)), 0.0)
    u = delta / dn
    parts = [(hi, w * (1.0 - share))] + ([(lo, w * share)] if share.any() else [])
    grad = np.zeros(delta.size)
    xs, ys, srcs, qs, cost = [], [], [], [], 0.0
    for mv, q in parts:
        sgn = np.where(mv.flip, -1.0, 1.0)
        sg = expit(mv.tau - sgn * m)
        grad = grad + (q * sg * -sgn) @ at.a + float(q @ (sg * mv.tau / b)) * beta * u
        cost += float(q @ mv.cost)
        if worst:
            keep = q > 0
            ynew = np.where(mv.flip, 1.0 - at.y, at.y)[keep]
            shift = ((2.0 * ynew - 1.0) * mv.tau[keep] / b)[:, None] * u[None, :]
            xs.append(at.x[keep] - shift)
            ys.append(ynew)
            srcs.append(np.flatnonzero(keep))
            qs.append(q[keep])
    h = None
    if hess:
        h = ((lambda: _w2_tie_hessian(at, m, hi, lo, share, b, delta, kappa)) if share.any()
             else (lambda: _w2_hessian(at, m, hi, b, delta, warm)))
    wc = None
    if worst:
        wc = WorstCase(np.concatenate(qs), np.concatenate(xs), np.concatenate(ys),
                       np.concatenate(srcs), cost, rho**2)
    return InnerResult(float(value), float(hi.lam), grad, h, wc)


def evaluate_inner(at: Atoms, delta: np.ndarray, ambiguity: AmbiguitySet, hess: bool = False,
                   worst: bool = True, warm: dict | None = None) -> InnerResult:
    """``F(delta) = L_U(theta_ref + delta)`` with its dual variable, gradient and worst case.

    ``warm`` (a dict, updated in place) carries the last dual variable between calls.
    """
    warm = {} if warm is None else warm
    m = at.a @ delta
    l = dpo_loss(m)
    rho = ambiguity.rho
    if isinstance(ambiguity, Nominal):
        return _nominal(at, m, l, hess)
    if isinstance(ambiguity, KL | ChiSquare):
        if rho == 0.0:
            return _nominal(at, m, l, hess, dual=math.inf if isinstance(ambiguity, KL)
                            else -math.inf)
        if isinstance(ambiguity, KL):
            return _kl(at, m, l, rho, hess, warm)
        return _chi2(at, m, l, rho, hess)
    if isinstance(ambiguity, Wasserstein):
        if ambiguity.p == 1:
            return _w1(at, m, l, delta, ambiguity, hess, worst)
        if rho == 0.0:
            res = _nominal(at, m, l, hess, dual=math.inf)
            n = at.w.size
            wc = WorstCase(at.w, at.x, at.y, np.arange(n), 0.0, 0.0)
            return InnerResult(res.value, math.inf, res.grad, res.hess, wc)
        return _w2(at, m, l, delta, ambiguity, hess, worst, warm)
    raise ValueError(f"ambiguity must be Nominal, KL, ChiSquare or Wasserstein, got {ambiguity!r}")


def primal_value(wc: WorstCase, theta: np.ndarray, beta: float, theta_ref: np.ndarray) -> float:
    """``E_{Q*} l`` recomputed from the atoms of the worst case."""
    return float(wc.weights @ dpo_loss(margins(theta, wc.x, wc.y, beta, theta_ref)))


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
        On bad arguments (wrong types, ``beta <= 0``, wrong ``theta`` shapes).
    """
    at, beta, theta_ref = prepare(data, ambiguity, beta, theta_ref)
    theta = check_theta(theta, data.d, "theta")
    res = evaluate_inner(at, theta - theta_ref, ambiguity, hess=False, worst=True)
    primal = primal_value(res.worst_case, theta, beta, theta_ref)
    return Evaluation(value=res.value, dual=res.dual, worst_case=res.worst_case,
                      primal_value=primal, gap=abs(res.value - primal) / max(1.0, abs(res.value)),
                      grad=res.grad)
