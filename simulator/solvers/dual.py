"""The fast ``dual`` solver: Newton's method on the partially minimised dual (SPEC 3.4).

Every robust objective is ``F(delta) = min_nu G(delta, nu)`` over a one-dimensional dual
variable ``nu`` (``lambda`` for KL and Wasserstein, ``eta`` for chi-square), with
``G`` jointly convex, so ``F`` is convex in ``delta = theta - theta_ref``. At each
iterate :func:`simulator.solvers.inner.evaluate_inner` solves the 1-D problem in
``nu`` exactly (warm-started) and returns ``F``, its Danskin gradient and its
Hessian (the Schur complement ``G_dd - G_dn G_nd / G_nn``). Newton steps with an
Armijo backtracking line search then converge quadratically; every pass over the
data is vectorised, ``O(n d^2)``.

``F`` is not differentiable at ``delta = 0`` (all losses tie at ``log 2``, and
``b = beta ||delta||`` has a kink) for every set with ``rho > 0``. Whether
``delta = 0`` is the minimiser (``0`` in the subdifferential there) is decided first:

* KL: ``0 in {E_Q a / 2 : KL(Q || P) <= rho}`` iff
  ``min_nu log E_P exp(nu . a) >= -rho`` (the I-projection onto ``E_Q a = 0``).
* Chi-square: iff ``max_{g, nu} 2 g - 1 - E_P (g + nu . a)_+^2 <= rho`` (the dual of
  the minimal chi-square divergence with ``E_Q a = 0``).
* Wasserstein, ``kappa = inf``: iff ``||E_P a|| / 2 <= rho beta`` (p = 1) or
  ``<= rho beta / 2`` (p = 2); for finite ``kappa`` this test is sufficient.

Wasserstein p = 1 with finite ``kappa`` is piecewise smooth (a weighted quantile of the
margins); it is minimised through a homotopy on the smoothed problems of
:mod:`simulator.solvers.wasserstein1`, each stage polished on the face it points to and
certified by a duality gap (:func:`_w1_homotopy`). Nominal, KL and chi-square on
separable data have no minimiser (all margins positive at the returned point): that
raises. If Newton stalls near ``delta = 0`` it restarts along ``E_P a``; for Wasserstein
p = 2, a stall at a kink (distinct atoms tied at ``lambda*``) is resolved by Newton on
the KKT system with an active set of tied atoms (:func:`_w2_kink`). Problems with more
than ``_SUBSAMPLE_N`` atoms start from the minimiser of a subsample. See
docs/formulations.md.
"""

from __future__ import annotations

import math
import time

import numpy as np
from scipy.special import logsumexp

from ..ambiguity import KL, AmbiguitySet, ChiSquare, Wasserstein
from ..data import PreferenceData
from ..losses import softplus
from .inner import Atoms, evaluate_inner, prepare, primal_value, w2_blocks
from .result import Solution
from .wasserstein1 import polish_face, smoothed_w1, smoothing_gap, w1_lagrangian
from .wasserstein2 import best_move

__all__ = ["solve", "solve_dual"]

_SOLVERS = ("dual", "cvxpy")

#: Newton stops once its step is below this (relative to ``1 + ||delta||_inf``).
_STEP_TOL = 1e-13

#: Problems with more atoms are started from the solution on a subsample of this size.
_SUBSAMPLE_N = 50_000

#: Smoothing parameters of the p = 1, finite-kappa homotopy (simulator.solvers.wasserstein1).
_MU_PATH = tuple(10.0 ** -k for k in range(1, 12))
#: Stages below this may stop on rounding (the previous stage's minimiser is kept).
_MU_SAFE = 1e-8
#: First smoothing stage when starting from a subsample's minimiser.
_MU_WARM = 1e-3
#: The homotopy certifies its stages by a duality gap from this ``mu`` on ...
_MU_CHECK = 1e-3
#: ... and stops once the relative gap is below ``_GAP_TOL`` (it must end below ``_GAP_MAX``).
_GAP_TOL = 1e-13
_GAP_MAX = 1e-9


def _psd_solve(h: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Solve ``h s = g`` for a symmetric PSD ``h``, regularising if it is singular."""
    scale = max(float(np.trace(h)) / h.shape[0], 1e-300)
    for reg in (0.0, 1e-14, 1e-11, 1e-8, 1e-5):
        try:
            c = np.linalg.cholesky(h + reg * scale * np.eye(h.shape[0]))
        except np.linalg.LinAlgError:
            continue
        return np.linalg.solve(c.T, np.linalg.solve(c, g))
    return np.linalg.lstsq(h, g, rcond=None)[0]


def _concave_max_above(fun, y0: np.ndarray, level: float, iters: int = 200) -> bool:
    """Whether ``max_y fun(y) > level`` for a concave ``fun`` returning (value, grad, hess)."""
    y = y0
    val, g, h = fun(y)
    for _ in range(iters):
        if val > level:
            return True
        step = _psd_solve(-h, g)
        dec = float(g @ step)
        if dec <= 1e-15 * max(1.0, abs(val)):  # converged to double precision
            return False
        t = 1.0
        while t > 1e-12:
            nv, ng, nh = fun(y + t * step)
            if nv >= val + 1e-4 * t * dec:
                break
            t *= 0.5
        else:
            return val > level
        y, val, g, h = y + t * step, nv, ng, nh
    return val > level


def _zero_is_optimal(at: Atoms, amb: AmbiguitySet) -> bool:
    """Whether ``delta = 0`` minimises ``F`` (see the module docstring)."""
    a, w, rho, beta = at.a, at.w, amb.rho, at.beta
    half_mean = 0.5 * float(np.linalg.norm(w @ a))
    if half_mean == 0.0:
        return True
    if rho == 0.0:
        return False
    if isinstance(amb, Wasserstein):
        return half_mean <= rho * beta * (1.0 if amb.p == 1 else 0.5)
    if isinstance(amb, KL):
        def neg_lse(nu):  # concave: -log E exp(nu . a)
            z = a @ nu
            lse = logsumexp(z, b=w)
            q = w * np.exp(z - lse)
            mean = q @ a
            ac = a - mean
            return -lse, -mean, -(ac * q[:, None]).T @ ac

        return not _concave_max_above(neg_lse, np.zeros(a.shape[1]), rho)
    if isinstance(amb, ChiSquare):
        at1 = np.hstack([np.ones((a.shape[0], 1)), a])

        def dual_chi2(y):  # concave: 2 g - 1 - E (g + nu . a)_+^2
            r = np.maximum(at1 @ y, 0.0)
            e0 = np.zeros_like(y)
            e0[0] = 2.0
            act = w * (r > 0)
            return (2.0 * y[0] - 1.0 - float(w @ r**2), e0 - 2.0 * (w * r) @ at1,
                    -2.0 * (at1 * act[:, None]).T @ at1)

        y0 = np.zeros(a.shape[1] + 1)
        y0[0] = 1.0
        return not _concave_max_above(dual_chi2, y0, rho)
    return False


def _start(at: Atoms) -> np.ndarray:
    """First Newton step of ``E_P l`` from ``delta = 0`` (``H = E a a^T / 4``, ``g = -E a / 2``)."""
    h = 0.25 * (at.a * at.w[:, None]).T @ at.a
    return _psd_solve(h, 0.5 * (at.w @ at.a))


class _Stalled(RuntimeError):
    """Newton stopped without converging; ``delta`` and ``warm`` hold the last iterate."""

    def __init__(self, message: str, delta: np.ndarray, warm: dict) -> None:
        super().__init__(message)
        self.delta, self.warm = delta, warm


def _newton(objective, delta: np.ndarray, tol: float, max_iter: int, label: str,
            warm: dict | None = None):
    """Damped Newton on a convex ``objective(delta, warm) -> InnerResult`` (with Hessian).

    ``warm`` (copied) seeds the warm starts of the objective's dual variable.
    """
    warm = {} if warm is None else dict(warm)
    cur = objective(delta, warm)
    limit = 1e8
    short = 0  # consecutive heavily damped steps: the sign of a kink
    for it in range(max_iter):
        g = cur.grad
        gn = float(np.max(np.abs(g)))
        if gn <= tol:
            return delta, it, warm
        step = -_psd_solve(cur.hess(), g)
        if float(np.max(np.abs(step))) <= _STEP_TOL * (1.0 + float(np.max(np.abs(delta)))):
            return delta, it, warm  # the Newton step (the distance to the minimiser) is tiny
        dec = -float(g @ step)
        if not dec > 0:
            step, dec = -g, float(g @ g)
        t = 1.0
        while True:
            cand = delta + t * step
            trial_warm = dict(warm)
            new = objective(cand, trial_warm)
            slack = 1e-13 * max(1.0, abs(cur.value))  # rounding of sums over many atoms
            if new.value <= cur.value - 1e-4 * t * dec or (
                    new.value <= cur.value + slack
                    and float(np.max(np.abs(new.grad))) < gn):
                break
            t *= 0.5
            if t < 1e-10:
                if gn <= 1e3 * tol:  # converged to the accuracy the arithmetic allows
                    return delta, it, warm
                raise _Stalled(
                    f"dual solver stalled (status: line_search_failed) at iteration {it} "
                    f"with gradient norm {gn:.3e} for {label}", delta, warm)
        # A step towards the kink at delta = 0 (not a minimiser here) may overshoot into it;
        # keep halving while that improves F.
        while t > 1e-10 and np.linalg.norm(cand) < 0.5 * np.linalg.norm(delta):
            half_warm = dict(warm)
            half = objective(delta + 0.5 * t * step, half_warm)
            if not half.value < new.value:
                break
            t *= 0.5
            cand, new, trial_warm = delta + t * step, half, half_warm
        delta, cur, warm = cand, new, trial_warm
        short = short + 1 if t < 1.0 / 64 else 0
        if short >= 8:
            raise _Stalled(f"dual solver stalled (status: stagnated) at iteration {it} "
                           f"with gradient norm {gn:.3e} for {label}", delta, warm)
        if float(np.linalg.norm(delta)) > limit:
            raise RuntimeError(
                f"dual solver diverged (status: unbounded): ||theta - theta_ref|| > {limit:.1e}; "
                f"the data may be separable so that {label} has no minimiser")
    raise _Stalled(f"dual solver did not converge (status: max_iter) in {max_iter} "
                   f"iterations for {label}; gradient norm {gn:.3e}", delta, warm)


def _w1_lower_bound(at: Atoms, amb: Wasserstein, delta: np.ndarray, q: np.ndarray,
                    tol: float, max_iter: int) -> float:
    """``min_delta L_q(delta)``, a lower bound on ``min F`` (:func:`w1_lagrangian`).

    Newton from ``delta`` (where ``L_q`` is nearly stationary); the minimum is the last
    value less half the Newton decrement, which is within rounding of it.
    """
    objective = w1_lagrangian(at, q, amb.rho, amb.kappa)
    try:
        delta = _newton(objective, delta, tol, max_iter, f"the Lagrangian bound of {amb!r}")[0]
    except _Stalled as exc:  # rounding-level stall: still a valid point to bound from
        delta = exc.delta
    res = objective(delta, {})
    return res.value - 0.5 * float(res.grad @ _psd_solve(res.hess(), res.grad))


def _w1_homotopy(at: Atoms, amb: Wasserstein, delta: np.ndarray, tol: float, max_iter: int,
                 mu_first: float = _MU_PATH[0]):
    """Minimise the p = 1, finite-kappa ``F`` through the smoothed ``F_mu`` (see above).

    From ``mu = _MU_CHECK`` on, each stage's minimiser is first polished on the face it
    points to (:func:`polish_face`), and the candidates are certified by the duality gap
    ``F(delta) - min L_q`` (:func:`_w1_lower_bound`); the homotopy stops at the first
    relative gap below ``_GAP_TOL``. Returns ``(delta, iterations, info)`` with
    ``info["optimality_gap"]`` the certified gap.
    """
    label, total, gap, warm = repr(amb), 0, math.inf, {}

    def certify(delta, q):
        """``(gap, point)``: the better of ``delta`` and ``0`` (``F(0) = log 2``), and its
        relative gap to ``min L_q`` (``theta_ref`` can be optimal through flips alone)."""
        upper = evaluate_inner(at, delta, amb, worst=False).value
        if upper > math.log(2.0):
            upper, delta = math.log(2.0), np.zeros_like(delta)
        lower = _w1_lower_bound(at, amb, delta, q, tol, max_iter)
        return max(upper - lower, 0.0) / max(1.0, abs(upper)), delta

    for mu in (mu for mu in _MU_PATH if mu <= mu_first):
        stage_tol = tol if mu == _MU_PATH[-1] else max(tol, 1e-3 * mu)  # warm starts
        try:
            new, its, warm = _newton(
                lambda d, w, mu=mu: smoothed_w1(at, d, amb.rho, amb.kappa, mu, w),
                delta, stage_tol, max_iter, f"{label} (smoothing mu={mu:g})", warm)
        except _Stalled:
            if mu >= _MU_SAFE:
                raise
            break  # below _MU_SAFE the minimiser has stopped moving at double precision
        total += its
        delta, q = new, warm["w1_q"]
        if mu > _MU_CHECK:
            continue
        face = polish_face(at, delta, q, warm["w1"], amb.rho, amb.kappa, tol)
        if face is not None:
            gap, best = certify(*face)
            if gap <= _GAP_TOL:
                return best, total, {"optimality_gap": gap}
        if smoothing_gap(at, delta, q, warm["w1"], amb.rho, amb.kappa) <= 0.5 * _GAP_TOL:
            gap, best = certify(delta, q)
            if gap <= _GAP_TOL:
                return best, total, {"optimality_gap": gap}
    gap, best = certify(delta, q)
    if not gap <= _GAP_MAX:
        raise RuntimeError(f"dual solver did not certify {label} (status: gap): the duality "
                           f"gap stayed at {gap:.3e} > {_GAP_MAX:g} after the smoothing homotopy")
    return best, total, {"optimality_gap": gap}


def _subsample_start(at: Atoms, amb: AmbiguitySet, tol: float, max_iter: int):
    """Starting point and dual variable from the same problem on a random subsample.

    For ``n > _SUBSAMPLE_N`` atoms, ``_SUBSAMPLE_N`` of them (a fixed-seed draw, weights
    renormalised) are solved first; their minimiser is within ``O(n_sub^-1/2)`` of the
    full one, so Newton on the full data needs only its last, quadratic steps and the
    dual searches start close to ``lambda*``. Returns ``(delta, warm)``, or ``None``
    when the subsample's minimiser is ``delta = 0`` or its solve fails (the caller
    then starts from scratch).
    """
    n = at.w.size
    idx = np.sort(np.random.default_rng(0).choice(n, _SUBSAMPLE_N, replace=False))
    w = at.w[idx]
    if not w.sum() > 0:
        return None
    sub = Atoms(at.x[idx], at.y[idx], w / w.sum(), at.a[idx], at.beta)
    if _zero_is_optimal(sub, amb):
        return None
    try:
        delta, _, warm = _minimise(sub, amb, tol, max_iter)
    except RuntimeError:
        return None
    if not np.any(delta):
        return None
    return delta, {key: warm[key] for key in ("kl", "w2") if key in warm}


def _minimise(at: Atoms, amb: AmbiguitySet, tol: float, max_iter: int):
    """Newton on the exact ``F``; for p = 1 with finite kappa a smoothing homotopy first."""
    label = repr(amb)
    first = _subsample_start(at, amb, tol, max_iter) if at.w.size > _SUBSAMPLE_N else None
    delta, warm = first if first is not None else (_start(at), {})
    if isinstance(amb, Wasserstein) and amb.p == 1 and math.isfinite(amb.kappa) and amb.rho > 0:
        # from a subsample's minimiser the coarse stages would only move away from it
        return _w1_homotopy(at, amb, delta, tol, max_iter,
                            _MU_PATH[0] if first is None else _MU_WARM)

    def objective(d, w):
        return evaluate_inner(at, d, amb, hess=True, worst=False, warm=w)

    try:
        return _newton(objective, delta, tol, max_iter, label, warm)
    except _Stalled as exc:
        stall = exc
    scale = float(np.linalg.norm(delta))
    if float(np.linalg.norm(stall.delta)) < 1e-2 * scale:
        # caught at the kink at delta = 0, which the subdifferential test showed is not
        # optimal: restart from the best point along E a (a descent direction there)
        v = (at.w @ at.a) * (scale / float(np.linalg.norm(at.w @ at.a)))
        ts = 2.0 ** -np.arange(0, 40)
        vals = [evaluate_inner(at, t * v, amb, worst=False).value for t in ts]
        try:
            return _newton(objective, ts[int(np.argmin(vals))] * v, tol, max_iter, label)
        except _Stalled as exc:
            stall = exc
    if not (isinstance(amb, Wasserstein) and amb.p == 2 and "w2" in stall.warm):
        raise stall
    return _w2_kink(at, amb, stall.delta, stall.warm["w2"], tol, stall)


def _w2_candidates(at: Atoms, delta: np.ndarray, lam: float, kappa: float):
    """Every local maximiser of every atom at ``(delta, lambda)``: arrays of shape (n, C)."""
    m = at.a @ delta
    b = at.beta * float(np.linalg.norm(delta))
    k = 2.0 * lam / b**2
    taus, flips, vals = [], [], []
    for sign in ((1.0, -1.0) if math.isfinite(kappa) else (1.0,)):
        tau_r, tau_l, r_ok, l_ok = best_move(sign * m, k)[4]
        for tau, ok in ((tau_r, r_ok), (tau_l, l_ok)):
            val = softplus(tau - sign * m) - 0.5 * k * tau**2 - (lam * kappa if sign < 0 else 0)
            taus.append(tau)
            flips.append(np.full(m.shape, sign < 0))
            vals.append(np.where(ok, val, -np.inf))
    return m, b, np.column_stack(taus), np.column_stack(flips), np.column_stack(vals)


def _w2_kink(at: Atoms, amb: Wasserstein, delta: np.ndarray, lam: float, tol: float,
             stalled: RuntimeError):
    """Newton on the KKT system where the p = 2 minimiser sits at a kink of ``F``.

    There atoms ``T`` (typically two with nearly equal margins) have two maximisers of
    equal value at ``lambda*`` and the optimal coupling splits each between them with
    shares ``xi_i``. Unknowns ``(delta, lambda, xi)``; equations: the Danskin gradient of
    the mixture vanishes, the mixture spends ``rho^2``, and ``w_i (V_i^1 - V_i^0) = 0`` on
    ``T``. ``T`` is chosen by an active-set loop: the atoms whose two best moves are within
    ``1e-5``, then ``1e-3``, then ``1e-2`` (relative) at the stalled point, less those
    whose share leaves ``[0, 1]`` in a solve. On failure the stall is re-raised.
    """
    vals = _w2_candidates(at, delta, lam, amb.kappa)[4]
    order = np.argsort(-vals, axis=1)
    rows = np.arange(at.w.size)
    v1, v2 = vals[rows, order[:, 0]], vals[rows, order[:, 1]]
    close = (at.w > 0) & np.isfinite(v2)
    gap = np.where(close, (v1 - v2) / (1.0 + np.abs(v1)), np.inf)
    tried = set()
    for level in (1e-5, 1e-3, 1e-2):
        tied = gap <= level
        for _ in range(4):
            key = tuple(np.flatnonzero(tied))
            if not key or key in tried:
                break
            tried.add(key)
            out = _w2_kink_solve(at, amb, delta, lam, tol, np.flatnonzero(tied), order)
            if out is None:
                break
            if isinstance(out, np.ndarray):  # atoms whose share left [0, 1]: not tied
                tied[out] = False
                continue
            return out
    raise stalled


def _w2_kink_solve(at: Atoms, amb: Wasserstein, delta: np.ndarray, lam: float, tol: float,
                   ti: np.ndarray, order: np.ndarray):
    """One KKT solve of :func:`_w2_kink` with tied atoms ``ti``.

    Returns ``(delta, iterations, warm)`` on success, the atoms whose share left
    ``[0, 1]`` if that is why it failed, or ``None``.
    """
    kappa, rho2, w, d = amb.kappa, amb.rho**2, at.w, delta.size
    rows = np.arange(w.size)
    # identical atoms behave identically: one representative each, carrying their weight
    _, first, inverse = np.unique(at.a[ti], axis=0, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    wt = np.bincount(inverse, w[ti])
    groups = ti[first]
    if groups.size > d + 1:
        return None
    rest = w.copy()
    rest[ti] = 0.0
    c0, c1 = order[groups, 0], order[groups, 1]

    def residual(delta, lam, xi):
        m, b, taus, flips, vals = _w2_candidates(at, delta, lam, kappa)
        best = np.argmax(vals, axis=1)
        g_d, g_l, h_dd, h_dl, h_ll = w2_blocks(at.a, rest, m, taus[rows, best],
                                               flips[rows, best], b, lam, at.beta, delta)
        g_l -= kappa * float(rest @ flips[rows, best]) if math.isfinite(kappa) else 0.0
        cols, res_t = [], []
        for j, i in enumerate(groups):
            part = []
            for c, share in ((c0[j], 1.0 - xi[j]), (c1[j], xi[j])):
                one = w2_blocks(at.a[i:i + 1], np.ones(1), m[i:i + 1], taus[i:i + 1, c],
                                flips[i:i + 1, c], b, lam, at.beta, delta)
                gl = one[1] - (kappa if flips[i, c] else 0.0)
                g_d, g_l = g_d + wt[j] * share * one[0], g_l + wt[j] * share * gl
                h_dd, h_dl = h_dd + wt[j] * share * one[2], h_dl + wt[j] * share * one[3]
                h_ll += wt[j] * share * one[4]
                part.append((np.append(one[0], gl), vals[i, c]))
            cols.append(wt[j] * (part[1][0] - part[0][0]))
            res_t.append(wt[j] * (part[1][1] - part[0][1]))
        res = np.concatenate([g_d, [rho2 + g_l], res_t])
        jac = np.zeros((d + 1 + groups.size,) * 2)
        cmat = np.array(cols).T
        jac[:d, :d], jac[:d, d], jac[d, :d], jac[d, d] = h_dd, h_dl, h_dl, h_ll
        jac[:d + 1, d + 1:], jac[d + 1:, :d + 1] = cmat, cmat.T
        return res, jac

    # shares that meet the budget at the start, then Newton on the KKT residual
    xi = np.full(groups.size, 0.5)
    res, jac = residual(delta, lam, xi)
    shift = np.linalg.lstsq(jac[d:d + 1, d + 1:], -res[d:d + 1], rcond=None)[0]
    xi = np.clip(xi + shift, 0.0, 1.0)
    res, jac = residual(delta, lam, xi)
    for it in range(100):
        if (np.max(np.abs(res[:d])) <= tol and abs(res[d]) <= 1e-12 * rho2
                and np.max(np.abs(res[d + 1:]), initial=0.0) <= 1e-15):
            outside = (xi < -1e-9) | (xi > 1 + 1e-9)
            if outside.any():
                return ti[np.isin(inverse, np.flatnonzero(outside))]
            return delta, it, {"w2": lam}
        step = np.linalg.lstsq(jac, -res, rcond=None)[0]
        t, norm0 = 1.0, float(np.linalg.norm(res))
        while t > 1e-8:
            cand = (delta + t * step[:d], lam + t * step[d], xi + t * step[d + 1:])
            if cand[1] > 0:
                new = residual(*cand)
                if np.isfinite(new[0]).all() and np.linalg.norm(new[0]) < (1 - 1e-4 * t) * norm0:
                    break
            t *= 0.5
        else:
            return None
        (delta, lam, xi), (res, jac) = cand, new
    return None


def solve_dual(data: PreferenceData, ambiguity: AmbiguitySet, beta: float = 1.0,
               theta_ref=None, tol: float = 1e-10, max_iter: int = 100) -> Solution:
    """Minimise the exact robust objective by Newton's method on the dual (SPEC 3.4).

    Parameters
    ----------
    data, ambiguity, beta, theta_ref
        As in :func:`simulator.solve`.
    tol : float
        Stop when ``||grad_theta L_U||_inf <= tol``.
    max_iter : int
        Newton iterations allowed.

    Returns
    -------
    Solution
        With ``solver="dual"`` and the certificate of :func:`robust_objective` at the
        returned ``theta``; ``info["zero_kink"]`` tells whether ``theta = theta_ref``
        was certified optimal by the subdifferential test.

    Raises
    ------
    ValueError
        On bad arguments.
    RuntimeError
        When Newton's method does not converge (the message names the status).
    """
    t0 = time.perf_counter()
    at, beta, theta_ref = prepare(data, ambiguity, beta, theta_ref)
    tol = float(tol)
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter!r}")
    zero = _zero_is_optimal(at, ambiguity)
    if zero:
        delta, iters, warm = np.zeros(data.d), 0, {}
    else:
        delta, iters, warm = _minimise(at, ambiguity, tol, int(max_iter))
    coercive = isinstance(ambiguity, Wasserstein) and ambiguity.rho > 0
    if not coercive and np.min((at.a @ delta)[at.w > 0]) > 0:
        # every margin is positive: scaling delta up lowers every loss, so no minimiser exists
        raise RuntimeError(
            f"dual solver: the data are separable (status: unbounded); {ambiguity!r} has no "
            "minimiser (the objective decreases to its infimum as ||theta|| grows)")
    res = evaluate_inner(at, delta, ambiguity, hess=False, worst=True, warm=warm)
    theta = theta_ref + delta
    primal = primal_value(res.worst_case, theta, beta, theta_ref)
    info = {"zero_kink": zero}
    if "optimality_gap" in warm:
        info["optimality_gap"] = warm["optimality_gap"]
    wc = res.worst_case
    if wc.budget is not None:
        info["transport_cost"] = wc.transport_cost
        info["budget"] = wc.budget
    return Solution(
        theta=theta, value=res.value, dual=res.dual, worst_case=wc, primal_value=primal,
        gap=abs(res.value - primal) / max(1.0, abs(res.value)), status="optimal",
        solver="dual", ambiguity=ambiguity, beta=beta, theta_ref=theta_ref,
        grad_norm=0.0 if zero else float(np.linalg.norm(res.grad)), iterations=iters,
        solve_time_s=time.perf_counter() - t0, info=info)


def solve(data: PreferenceData, ambiguity: AmbiguitySet, beta: float = 1.0, theta_ref=None,
          solver: str = "dual", **options) -> Solution:
    """Robust DPO estimator ``argmin_theta sup_{Q in U(P)} E_Q l(z; theta)`` (SPEC 3).

    Parameters
    ----------
    data : PreferenceData
        Weighted atoms (an empirical sample or an exact population).
    ambiguity : Nominal, KL, ChiSquare or Wasserstein
        The ambiguity set around ``data``.
    beta : float
        DPO temperature ``> 0``.
    theta_ref : array (d,), optional
        Reference parameter (zeros by default).
    solver : {"dual", "cvxpy"}
        ``"dual"``: Newton on the dual (:func:`solve_dual`, every set);
        ``"cvxpy"``: the conic reference (:func:`simulator.solvers.conic.solve_cvxpy`,
        not Wasserstein p = 2).
    **options
        Passed to the solver (``tol``, ``max_iter`` for ``dual``; ``solvers``,
        ``verbose``, ``rescale`` for ``cvxpy``).

    Returns
    -------
    Solution
        ``theta``, ``value``, ``dual``, ``worst_case``, ``primal_value``, ``gap``, ...

    Raises
    ------
    ValueError
        On bad arguments or an unknown solver; ``cvxpy`` raises when no conic solver
        reports optimal.
    RuntimeError
        When the dual solver does not converge.
    """
    if solver == "dual":
        return solve_dual(data, ambiguity, beta, theta_ref, **options)
    if solver == "cvxpy":
        from .conic import solve_cvxpy

        return solve_cvxpy(data, ambiguity, beta, theta_ref, **options)
    raise ValueError(f"solver must be one of {_SOLVERS}, got {solver!r}")

