"""Global one-dimensional inner maximisation of the Wasserstein p = 2 dual (SPEC 3.3).

For an atom of margin ``m`` the adversary moves ``x`` by ``t >= 0`` along
``-ytil u``, ``u = (theta - theta_ref) / ||theta - theta_ref||``, and gains

    phi_lambda(m) = sup_{t >= 0} softplus(b t - m) - lambda t^2,   b = beta ||theta - theta_ref||.

With ``tau = b t`` and ``k = 2 lambda / b^2`` this is
``sup_{tau >= 0} f(tau) = softplus(tau - m) - (k / 2) tau^2`` whose stationary points
solve ``psi(tau) = sigmoid(tau - m) - k tau = 0``, and ``tau* <= 1 / k`` (so
``t* <= b / (2 lambda)``). ``psi' = sigmoid'(tau - m) - k``: for ``k >= 1/4``
(``lambda >= b^2 / 8``) ``psi`` decreases and the root is unique; for ``k < 1/4``,
``psi`` decreases on ``tau - m < -s_k``, increases on ``|tau - m| < s_k`` and decreases
again on ``tau - m > s_k``, where ``sigmoid'(s_k) = k``, so ``f`` has up to two local
maxima (one root per decreasing piece) and a local minimum between them. Each
candidate is found by Newton's method from the end of its piece where Newton
converges monotonically (``psi`` is convex left of the inflection ``tau = m`` and
concave right of it), and the larger of the two values is the global maximum.

With a finite label-flip price ``kappa`` the flipped branch ``phi_lambda(-m) -
lambda kappa`` competes. :func:`solve_lambda` then finds the ``lambda*``
minimising ``G(lambda) = lambda rho^2 + E_P max(branches)`` (``G' = rho^2 - E cost``)
by safeguarded Newton steps in ``log lambda`` and, where ``lambda*`` sits at a
jump of ``E cost`` (an atom with two maximisers), splits the mass of the atoms
that switch so that the budget ``rho^2`` is met exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from ..losses import softplus

__all__ = ["best_move", "Moves", "solve_lambda"]

_NEWTON_ITERS = 200


def _root(m: np.ndarray, k: float, lo: np.ndarray, hi: np.ndarray,
          tau0: np.ndarray) -> np.ndarray:
    """Root of the decreasing ``psi(tau) = sigmoid(tau - m) - k tau`` on ``[lo, hi]``.

    Newton steps from ``tau0`` (a warm start), kept inside a bracket that every
    evaluation of ``psi`` shrinks; a step leaving the bracket is replaced by bisection.
    """
    lo, hi = lo.copy(), hi.copy()
    tau = np.clip(tau0, lo, hi)
    for _ in range(_NEWTON_ITERS):
        s = expit(tau - m)
        psi = s - k * tau
        dpsi = s * (1.0 - s) - k
        up = psi > 0
        lo = np.where(up, tau, lo)
        hi = np.where(up, hi, tau)
        with np.errstate(divide="ignore", invalid="ignore"):
            new = tau - psi / dpsi
        bad = ~((new >= lo) & (new <= hi))
        new = np.where(bad, 0.5 * (lo + hi), new)
        done = np.max(np.abs(new - tau) - 1e-15 * np.maximum(1.0, np.abs(new)), initial=-1.0) <= 0
        tau = new
        if done:
            break
    return tau


def best_move(m: np.ndarray, k: float, start: tuple | None = None):
    """Global maximiser of ``f(tau) = softplus(tau - m) - (k/2) tau^2`` over ``tau >= 0``.

    Parameters
    ----------
    m : array
        Margins of the atoms.
    k : float
        ``2 lambda / b^2 > 0``.
    start : (tau_right, tau_left), optional
        Warm starts for the two local maximisers (the ``roots`` of an earlier call).

    Returns
    -------
    tau, value : arrays
        The global maximiser ``tau*`` and ``f(tau*)``.
    tau_alt, value_alt : arrays
        The other local maximiser and its value where ``f`` has two (``nan``
        elsewhere), used to detect ties.
    roots : (tau_right, tau_left, right_exists, left_exists)
        The roots on both pieces (for warm starts; 0 where a piece has none).
    """
    m = np.asarray(m, dtype=np.float64)
    k = float(k)
    if k < 0.25:  # s_k > 0 with sigmoid'(s_k) = k; psi increases on |tau - m| < s_k
        disc = math.sqrt(1.0 - 4.0 * k)
        s_k = math.log1p(disc) - math.log1p(-disc) if disc < 1.0 else math.inf
    else:  # psi decreases everywhere; split at the inflection tau = m
        s_k = 0.0
    top = 1.0 / k
    if math.isinf(s_k):  # k underflows: psi > 0 up to tau ~ 1/k, a single right root
        r_ok, l_ok, s_k = np.ones(m.shape, dtype=bool), np.zeros(m.shape, dtype=bool), 0.0
    else:
        # right piece tau >= max(m + s_k, 0) (psi concave decreasing): a root iff psi >= 0
        # at its start; left piece 0 <= tau <= m - s_k (psi convex decreasing): a root iff
        # psi(m - s_k) < 0 there.
        r_ok = (m + s_k < 0) | (float(expit(s_k)) - k * (m + s_k) >= 0)
        l_ok = (m - s_k > 0) & (float(expit(-s_k)) - k * (m - s_k) < 0)
    tau_r, tau_l = np.zeros_like(m), np.zeros_like(m)
    f_r, f_l = np.full_like(m, -np.inf), np.full_like(m, -np.inf)
    i = np.flatnonzero(r_ok)
    mi = m[i]
    lo = np.clip(mi + s_k, 0.0, top)
    hi = np.full_like(mi, top)
    tau_r[i] = _root(mi, k, lo, hi, hi if start is None else start[0][i])
    f_r[i] = softplus(tau_r[i] - mi) - 0.5 * k * tau_r[i] ** 2
    i = np.flatnonzero(l_ok)
    mi = m[i]
    lo = np.zeros_like(mi)
    tau_l[i] = _root(mi, k, lo, np.clip(mi - s_k, 0.0, top), lo if start is None
                     else start[1][i])
    f_l[i] = softplus(tau_l[i] - mi) - 0.5 * k * tau_l[i] ** 2
    right = f_r >= f_l
    tau = np.where(right, tau_r, tau_l)
    value = np.where(right, f_r, f_l)
    both = r_ok & l_ok
    tau_alt = np.where(both, np.where(right, tau_l, tau_r), np.nan)
    value_alt = np.where(both, np.where(right, f_l, f_r), np.nan)
    return tau, value, tau_alt, value_alt, (tau_r, tau_l, r_ok, l_ok)


@dataclass(frozen=True)
class Moves:
    """Per-atom adversarial moves at ``lambda``.

    ``value[i]`` is ``max`` over branches of ``phi - lambda * kappa * flip`` and
    ``cost[i] = t^2 + kappa * flip`` the transport cost per unit mass of the
    chosen move, ``t = tau / b``.
    """

    lam: float
    tau: np.ndarray
    flip: np.ndarray
    value: np.ndarray
    cost: np.ndarray
    roots: tuple = ()


def _moves(m: np.ndarray, b: float, lam: float, kappa: float, start: tuple = ()) -> Moves:
    k = 2.0 * lam / b**2
    tau, val, _, _, roots = best_move(m, k, start[0] if start else None)
    flip = np.zeros(m.shape, dtype=bool)
    roots = (roots,)
    if np.isfinite(kappa):
        tau_f, val_f, _, _, roots_f = best_move(-m, k, start[1] if len(start) > 1 else None)
        roots = roots + (roots_f,)
        val_f = val_f - lam * kappa
        flip = val_f > val
        tau = np.where(flip, tau_f, tau)
        val = np.where(flip, val_f, val)
    cost = (tau / b) ** 2 + np.where(flip, kappa, 0.0)
    return Moves(lam, tau, flip, val, cost, roots)


def _dcost_dlam(m: np.ndarray, mv: Moves, b: float) -> np.ndarray:
    """Per-atom ``d cost / d lambda`` on the chosen branch (implicit differentiation)."""
    mm = np.where(mv.flip, -m, m)
    s = expit(mv.tau - mm)
    k = 2.0 * mv.lam / b**2
    denom = s * (1.0 - s) - k  # < 0 at a strict local maximum
    dtau_dk = np.where(denom < 0, mv.tau / np.where(denom < 0, denom, -1.0), 0.0)
    return 2.0 * mv.tau / b**2 * dtau_dk * (2.0 / b**2)


def solve_lambda(m: np.ndarray, w: np.ndarray, b: float, rho: float, kappa: float,
                 lam0: float | None = None, start: tuple = ()) -> tuple[Moves, Moves]:
    """Minimise ``G(lambda) = lambda rho^2 + E_P phi`` over ``lambda > 0`` (``b, rho > 0``).

    Returns
    -------
    hi, lo : Moves
        The moves at the two ends ``lambda_lo <= lambda* <= lambda_hi`` of the final
        bracket (``lo is hi`` when ``E cost = rho^2`` was met at a single point);
        otherwise ``E cost`` jumps across ``lambda*`` and the caller mixes the moves
        of the atoms that switch between ``lo`` and ``hi``.
    """
    r2 = rho**2
    last = [start]

    def g(lam):
        mv = _moves(m, b, lam, kappa, last[0])
        last[0] = mv.roots
        return mv, float(w @ mv.cost) - r2

    lam = lam0 if lam0 is not None and lam0 > 0 else b / (2.0 * rho)
    lo = hi = None  # (moves, g) with g > 0 (lambda too small) and g <= 0
    for _ in range(300):
        mv, gv = g(lam)
        if gv > 0:
            lo = (mv, gv)
        else:
            hi = (mv, gv)
        if abs(gv) <= 1e-14 * r2:
            return mv, mv
        u = np.log(lam)
        llo = np.log(lo[0].lam) if lo else -np.inf
        lhi = np.log(hi[0].lam) if hi else np.inf
        if lo and hi and lhi - llo <= 1e-15 * max(1.0, abs(lhi)):
            break
        # Newton on log E cost against log lambda, nearly linear (E t*^2 ~ lambda^-2 for
        # small moves), so two or three steps suffice from a warm start.
        cost = gv + r2
        slope = float(w @ _dcost_dlam(m, mv, b)) * lam / cost
        nxt = u - (math.log(cost) - math.log(r2)) / slope if slope < 0 else (
            u + 1.4 if gv > 0 else u - 1.4)
        nxt = min(max(nxt, u - 1.4), u + 1.4)  # a trust region: lambda changes 4x at most
        if not llo < nxt < lhi:
            nxt = 0.5 * (llo + lhi) if lo and hi else (u + 1.4 if gv > 0 else u - 1.4)
        lam = float(np.exp(nxt))
    else:
        raise RuntimeError("Wasserstein p=2 dual search did not converge (status: max_iter)")
    # E cost jumps across lambda*: the caller mixes the moves of the switching atoms.
    return hi[0], lo[0]
