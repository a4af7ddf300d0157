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
    Atoms are done, and leave the loop, once the step or the error it leaves (about
    ``psi'' step^2 / (2 |psi'|)``, Newton's quadratic convergence) is below
    ``1e-15 max(1, |tau|)``.
    """
    tau = np.clip(tau0, lo, hi)
    lo, hi = lo.copy(), hi.copy()
    act = None  # all atoms (no gather on the first sweep)
    for _ in range(_NEWTON_ITERS):
        if act is None:
            mi, ti, li, hi_ = m, tau, lo, hi
            act = slice(None)
        elif act.size == 0:
            break
        else:
            mi, ti, li, hi_ = m[act], tau[act], lo[act], hi[act]
        s = expit(ti - mi)
        psi = s - k * ti
        up = psi > 0
        li = np.where(up, ti, li)
        hi_ = np.where(up, hi_, ti)
        ds = s * (1.0 - s)
        dpsi = ds - k
        with np.errstate(divide="ignore", invalid="ignore"):
            new = ti - psi / dpsi
            # Newton's error after this step is about psi'' step^2 / (2 |psi'|)
            step = np.abs(new - ti)
            nxt_err = np.abs(ds * (1.0 - 2.0 * s)) * step**2 / (2.0 * np.abs(dpsi))
        bad = ~((new >= li) & (new <= hi_))
        new = np.where(bad, 0.5 * (li + hi_), new)
        tau[act], lo[act], hi[act] = new, li, hi_
        scale = 1e-15 * np.maximum(1.0, np.abs(new))
        keep = bad | ((step > scale) & ~(nxt_err <= 0.1 * scale))
        act = np.flatnonzero(keep) if isinstance(act, slice) else act[keep]
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
    chosen move, ``t = tau / b``; ``right[i]`` tells whether it is the maximiser on the
    right piece (``tau >= m + s_k``, see :func:`best_move`).
    """

    lam: float
    tau: np.ndarray
    flip: np.ndarray
    value: np.ndarray
    cost: np.ndarray
    roots: tuple = ()
    right: np.ndarray | None = None


def _moves(m: np.ndarray, b: float, lam: float, kappa: float, start: tuple = ()) -> Moves:
    k = 2.0 * lam / b**2
    tau, val, _, _, roots = best_move(m, k, start[0] if start else None)
    right = roots[2] & (tau == roots[0])
    flip = np.zeros(m.shape, dtype=bool)
    roots = (roots,)
    if np.isfinite(kappa):
        # softplus(tau + m) <= softplus(m) + tau, so the flipped branch is worth at most
        # softplus(m) + b^2 / (4 lambda) - lambda kappa, and the unflipped one at least
        # softplus(-m): flipping can win only where m > lambda kappa - b^2 / (4 lambda).
        cand = np.flatnonzero(m > lam * kappa - b**2 / (4.0 * lam))
        prev = start[1] if len(start) > 1 else None
        roots_f = tuple(np.zeros_like(r) for r in roots[0]) if prev is None else tuple(
            r.copy() for r in prev)
        flip = np.zeros(m.shape, dtype=bool)
        if cand.size:
            tau_f, val_f, _, _, sub = best_move(
                -m[cand], k, None if prev is None else (prev[0][cand], prev[1][cand]))
            for full, part in zip(roots_f, sub, strict=True):
                full[cand] = part
            val_f = val_f - lam * kappa
            win = val_f > val[cand]
            flip[cand[win]] = True
            tau[cand[win]], val[cand[win]] = tau_f[win], val_f[win]
            right[cand[win]] = (sub[2] & (tau_f == sub[0]))[win]
        roots = roots + (roots_f,)
    cost = (tau / b) ** 2 + np.where(flip, kappa, 0.0)
    return Moves(lam, tau, flip, val, cost, roots, right)


def _branch(m: np.ndarray, b: float, lam: float, kappa: float, flip: np.ndarray,
            right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Value and cost of fixed branches (flipped or not, right or left maximiser) at
    ``lambda``; the value is ``nan`` where that local maximiser does not exist."""
    k = 2.0 * lam / b**2
    mm = np.where(flip, -m, m)
    tau_r, tau_l, r_ok, l_ok = best_move(mm, k)[4]
    tau = np.where(right, tau_r, tau_l)
    price = np.where(flip, kappa, 0.0)
    val = softplus(tau - mm) - 0.5 * k * tau**2 - lam * price
    return np.where(np.where(right, r_ok, l_ok), val, np.nan), (tau / b) ** 2 + price


def _switch_points(m: np.ndarray, b: float, kappa: float, lo: Moves, hi: Moves,
                   idx: np.ndarray, bracket: tuple | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``lambda`` in ``bracket`` (default ``[lo.lam, hi.lam]``) where atoms ``idx`` switch
    from their move at ``lo`` (branch A) to their move at ``hi`` (B): the root of
    ``V_A - V_B``, whose derivative in ``lambda`` is ``cost_B - cost_A`` (envelope
    theorem), by safeguarded Newton; also the drop ``cost_A - cost_B`` of each atom's
    cost there."""
    bracket = (lo.lam, hi.lam) if bracket is None else bracket
    # atoms with equal margins and branches switch together: one root per distinct key
    keys = np.column_stack([m[idx], lo.flip[idx], lo.right[idx], hi.flip[idx], hi.right[idx]])
    keys, inverse = np.unique(keys, axis=0, return_inverse=True)
    mi = keys[:, 0]
    a_branch = (keys[:, 1] > 0, keys[:, 2] > 0)
    b_branch = (keys[:, 3] > 0, keys[:, 4] > 0)
    out, drop = np.empty(mi.size), np.zeros(mi.size)
    for i in range(mi.size):  # a few distinct keys; one scalar root each
        left, right = bracket
        lam = 0.5 * (left + right)
        for _ in range(100):
            va, ca = _branch(mi[i:i + 1], b, lam, kappa, *(x[i:i + 1] for x in a_branch))
            vb, cb = _branch(mi[i:i + 1], b, lam, kappa, *(x[i:i + 1] for x in b_branch))
            diff = va[0] - vb[0]
            if math.isnan(diff):  # a maximiser is absent: the other branch wins
                diff = -math.inf if math.isnan(va[0]) else math.inf
            if diff > 0:
                left = lam
            else:
                right = lam
            step = lam + diff / float(ca[0] - cb[0]) if ca[0] > cb[0] else math.nan
            new = step if left < step < right else 0.5 * (left + right)
            if abs(new - lam) <= 2e-16 * lam or right - left <= 4e-16 * lam:
                lam = new
                break
            lam = new
        out[i], drop[i] = lam, float(ca[0] - cb[0])
    return out[inverse.ravel()], drop[inverse.ravel()]


def _dcost_dlam(m: np.ndarray, mv: Moves, b: float) -> np.ndarray:
    """Per-atom ``d cost / d lambda`` on the chosen branch (implicit differentiation)."""
    mm = np.where(mv.flip, -m, m)
    s = expit(mv.tau - mm)
    k = 2.0 * mv.lam / b**2
    denom = s * (1.0 - s) - k  # < 0 at a strict local maximum
    dtau_dk = np.where(denom < 0, mv.tau / np.where(denom < 0, denom, -1.0), 0.0)
    return 2.0 * mv.tau / b**2 * dtau_dk * (2.0 / b**2)


#: Bracketed jumps of ``E cost`` are located through at most this many switching atoms.
_MAX_SWITCH = 16
#: Relative distance from a switch point at which both sides are evaluated.
_SWITCH_EPS = 1e-13


def _bracket_jump(m, w, b, kappa, lo, hi, g):
    """Narrow a bracket ``lo = (moves, g > 0)``, ``hi = (moves, g <= 0)`` at its switches.

    Atoms whose move differs between the ends switch inside the bracket, at the points and
    with the cost drops of :func:`_switch_points`. A model of ``g`` (linear between the
    ends once the known drops are taken out, minus the drops passed) predicts where ``g``
    changes sign: at a switch, ``g`` is evaluated just below and above it, and if the sign
    changes there ``lambda*`` is that switch and ``(hi, lo)`` moves are returned;
    otherwise ``(lo, hi, next lambda)`` with the narrowed bracket and the model's root.
    ``None`` if there are no or too many switching atoms.
    """
    a, c = lo[0], hi[0]
    # moving between pieces is continuous where there is one maximiser (k >= 1/4)
    idx = np.flatnonzero((a.flip != c.flip) | (
        (a.right != c.right) if 2.0 * a.lam / b**2 < 0.25 else False))
    if idx.size == 0 or np.unique(m[idx]).size > _MAX_SWITCH:
        return None
    pts, drop = _switch_points(m, b, kappa, a, c, idx)
    order = np.argsort(pts)
    pts, jump = pts[order], (w[idx] * drop)[order]
    slope = (hi[1] - lo[1] + float(jump.sum())) / (c.lam - a.lam)
    before = lo[1] + slope * (pts - a.lam) - np.concatenate([[0.0], np.cumsum(jump)[:-1]])
    after = before - jump
    crossed = np.flatnonzero(after <= 0)
    j = int(crossed[0]) if crossed.size else pts.size
    if j == pts.size or before[j] <= 0:  # the model's root is between switches
        passed = float(jump[:j].sum())
        nxt = a.lam + (passed - lo[1]) / slope if slope < 0 else math.nan
        if not a.lam < nxt < c.lam:
            nxt = math.sqrt(a.lam * c.lam)
        return lo, hi, nxt
    s = float(pts[j])
    # both sides of the switch, or the bracket's end where the switch is closer than that
    below = g(s * (1.0 - _SWITCH_EPS)) if s * (1.0 - 2 * _SWITCH_EPS) > a.lam else lo
    above = g(s * (1.0 + _SWITCH_EPS)) if s * (1.0 + 2 * _SWITCH_EPS) < c.lam else hi
    for mv, gv in (below, above):
        if gv > 0:
            lo = (mv, gv)
        else:
            hi = (mv, gv)
    if below[1] > 0 >= above[1]:
        return above[0], below[0]
    return lo, hi, math.sqrt(lo[0].lam * hi[0].lam)


def solve_lambda(m: np.ndarray, w: np.ndarray, b: float, rho: float, kappa: float,
                 lam0: float | None = None, start: tuple = (),
                 jump: tuple | None = None) -> tuple[Moves, Moves]:
    """Minimise ``G(lambda) = lambda rho^2 + E_P phi`` over ``lambda > 0`` (``b, rho > 0``).

    ``jump``, the ``(hi, lo)`` result of an earlier search that ended at a jump of
    ``E cost`` within ``1e-4`` (relative) of ``lam0``, is tried first: the switch points
    of its switching atoms are recomputed near ``lam0`` and, if one is still there,
    ``G'`` is evaluated on both sides of it (two evaluations when ``lambda*`` is still
    at that jump).

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
    last_side, prev, damp = 0, None, [1.0, 1.0]  # damp: Illinois factors of (lo, hi)
    if (jump is not None and jump[0] is not jump[1] and lam0 is not None
            and abs(jump[0].lam - lam0) <= 1e-4 * lam0):  # late Newton steps only
        a, c = jump[1], jump[0]
        idx = np.flatnonzero(a.flip != c.flip)
        if 0 < np.unique(m[idx]).size <= _MAX_SWITCH:
            ends = (lam0 * (1 - 1e-3), lam0 * (1 + 1e-3))
            pts, _ = _switch_points(m, b, kappa, a, c, idx, ends)
            pts = pts[(pts > ends[0] * (1 + 1e-12)) & (pts < ends[1] * (1 - 1e-12))]
            if pts.size:  # the old switches are still near lam0
                s = float(np.median(pts))
                below, above = g(s * (1.0 - _SWITCH_EPS)), g(s * (1.0 + _SWITCH_EPS))
                if below[1] > 0 >= above[1]:
                    return above[0], below[0]
                for mv, gv in (below, above):
                    if gv > 0:
                        lo = (mv, gv)
                    else:
                        hi = (mv, gv)
                lam = math.sqrt(lo[0].lam * hi[0].lam) if lo and hi else (
                    lo or hi)[0].lam * (1.01 if lo else 0.99)
    for _ in range(300):
        mv, gv = g(lam)
        if gv > 0:
            lo = (mv, gv)
        else:
            hi = (mv, gv)
        if abs(gv) <= 1e-14 * r2:
            return mv, mv
        u = math.log(lam)
        llo = math.log(lo[0].lam) if lo else -math.inf
        lhi = math.log(hi[0].lam) if hi else math.inf
        if lo and hi and lhi - llo <= 1e-15 * max(1.0, abs(lhi)):
            break
        if lo and hi and lhi - llo < 1e-3:
            # With many atoms E cost has many small jumps (an atom switching branches);
            # rather than bisect onto one, locate the switches in the bracket exactly.
            jump = _bracket_jump(m, w, b, kappa, lo, hi, g)
            if isinstance(jump, tuple) and len(jump) == 2 and isinstance(jump[0], Moves):
                return jump
            if jump is not None:
                lo, hi, lam = jump
                continue
        if lo and hi:
            # Illinois regula falsi on log E cost against log lambda: the secant sees the
            # small jumps of E cost (atoms switching branches) that the derivative misses.
            side = 1 if gv > 0 else -1
            if side == last_side:  # the same end moved twice: damp the other one
                damp[1 if side > 0 else 0] *= 0.5
            damp[0 if side > 0 else 1] = 1.0
            last_side = side
            h_lo = damp[0] * math.log1p(lo[1] / r2)
            h_hi = damp[1] * math.log1p(hi[1] / r2)
            nxt = llo + (lhi - llo) * h_lo / (h_lo - h_hi)
            if not llo < nxt < lhi:
                nxt = 0.5 * (llo + lhi)
        else:
            # log E cost against log lambda is nearly linear (E t*^2 ~ lambda^-2 for small
            # moves): a Newton step, then secant steps, until the root is bracketed.
            cost = math.log(gv + r2)
            if prev is None:
                slope = float(w @ _dcost_dlam(m, mv, b)) * lam / (gv + r2)
            else:
                slope = (cost - prev[1]) / (u - prev[0]) if u != prev[0] else math.nan
            prev = (u, cost)
            nxt = u - (cost - math.log(r2)) / slope if slope < 0 else (
                u + 1.4 if gv > 0 else u - 1.4)
            nxt = min(max(nxt, u - 1.4), u + 1.4)  # a trust region: lambda changes 4x at most
        lam = math.exp(nxt)
    else:
        raise RuntimeError("Wasserstein p=2 dual search did not converge (status: max_iter)")
    # E cost jumps across lambda*: the caller mixes the moves of the switching atoms.
    return hi[0], lo[0]
