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

On top of that search this module evaluates ``F`` with its Danskin gradient and Hessian
(:func:`w2_blocks`; at a tie the Schur complement of the KKT matrix), and, where Newton
on ``F`` stalls at a kink away from ``delta = 0``, solves the KKT system with an active
set of tied atoms (:func:`kink_fallback`). ``delta = 0`` is optimal iff
``||E_P a|| / 2 <= rho beta / 2`` for ``kappa = inf``; for finite ``kappa`` the exact test
is :func:`flip_shares` (a distribution in the ball with ``E_Q ytil' x' = 0``). Every answer
is certified by weak duality (:func:`certify`). There is no conic form (``conic.py``
refuses p = 2).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy.optimize import lsq_linear
from scipy.special import expit

from ..losses import dpo_loss, softplus
from .core import (
    _CERT_ATOMS,
    _CERT_SUBSET_OK,
    Atoms,
    InnerResult,
    Minimum,
    SetMethods,
    Stalled,
    curvature_bound,
    psd_solve,
    scaled_lstsq,
    weighted_hess,
)
from .nominal import nominal_result
from .result import WorstCase

__all__ = ["METHODS", "BestMove", "Bracket", "Mixture", "MoveRoots", "Moves", "Roots",
           "W2Blocks", "W2State", "best_move", "certify", "flip_shares", "kink_certificate",
           "solve_lambda", "w2_blocks"]

#: Newton iterations of the per-atom root search (quadratic: a dozen suffice).
_NEWTON_ITERS = 200
#: The per-atom roots are resolved to this (relative to ``max(1, |tau|)``): double precision.
_ROOT_TOL = 1e-15
#: ``lambda*`` search: iterations allowed (a few dozen are used).
_LAMBDA_ITERS = 300
#: ... it stops when ``|E cost - rho^2| <= _BUDGET_TOL rho^2`` (rounding of an n-term sum) ...
_BUDGET_TOL = 1e-14
#: ... or the bracket in ``log lambda`` is below ``_BRACKET_TOL`` (relative): double precision.
_BRACKET_TOL = 1e-15
#: Below this bracket width in ``log lambda`` the jumps of ``E cost`` are located exactly.
_JUMP_WIDTH = 1e-3
#: Trust region of the unbracketed steps in ``log lambda`` (lambda changes 4x at most).
_TRUST = 1.4
#: An earlier search's jump is reused when within this (relative) of the warm start ...
_JUMP_REUSE = 1e-4
#: ... searching for its switch points in ``lam0 (1 -+ _JUMP_WINDOW)``.
_JUMP_WINDOW = 1e-3
#: Switch points strictly inside that window (relative margin at its ends).
_JUMP_INSIDE = 1e-12
#: Bracketed steps (secant, or the jump model's root) allowed without halving the bracket
#: before a bisection: beside a jump of ``E cost`` far above ``rho^2`` both creep towards it
#: (property problem 7, ``k = 0.04``: 300 steps of ``1e-6`` relative, status ``max_iter``).
_SECANT_PATIENCE = 4
#: Iterations of the scalar switch-point search (safeguarded Newton; bisection bound).
_SWITCH_ITERS = 100
#: ... which stops once Newton's step is below this (relative): 4 ulps, where the rounding of
#: ``V_A - V_B`` moves it (with 1 ulp the steps wandered at rounding and bisection took over:
#: 43 iterations for one switch at n = 1e4, 6 to 12 elsewhere). The sides are evaluated
#: ``1e-13`` away from it (``_SWITCH_EPS``), far outside that error.
_SWITCH_TOL = 4.0 * np.finfo(float).eps
#: Bisections in a row towards one end of a window before its far end is checked for a
#: switch at all (an earlier point's switch, reused, that moved out of the window: 40
#: bisections onto its end at n = 1e4 before).
_SWITCH_BISECTIONS = 3


class Roots(NamedTuple):
    """The local maximisers of every atom on the right and left pieces of ``psi`` and
    whether they exist (where a piece has none its entry is a warm start only: 0, or for
    ``k >= 1/4``, where every atom has one maximiser, the same array holds both)."""

    tau_right: np.ndarray
    tau_left: np.ndarray
    right_exists: np.ndarray
    left_exists: np.ndarray


class BestMove(NamedTuple):
    """:func:`best_move`'s answer (see there)."""

    tau: np.ndarray
    value: np.ndarray
    tau_alt: np.ndarray
    value_alt: np.ndarray
    roots: Roots


class MoveRoots(NamedTuple):
    """Warm starts of :func:`_moves`: the roots of the kept branch (every atom) and of the
    flipped branch on the atoms ``flipped_at`` where it was a candidate."""

    plain: Roots
    flipped: Roots | None = None
    flipped_at: np.ndarray | None = None


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
        scale = _ROOT_TOL * np.maximum(1.0, np.abs(new))
        keep = bad | ((step > scale) & ~(nxt_err <= 0.1 * scale))
        act = np.flatnonzero(keep) if isinstance(act, slice) else act[keep]
    return tau


#: Unbracketed Newton sweeps of :func:`_concave_roots` before the atoms left unresolved
#: go to the bracketed :func:`_root` (from a warm start two or three are used).
_FAST_SWEEPS = 8


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-z))`` (a few ulps, as ``expit``, and several times faster: ``exp``
    is vectorised); ``0`` where ``exp(-z)`` overflows (``z < -709``: ``sigmoid < 1e-308``)."""
    with np.errstate(over="ignore"):
        e = np.exp(-z)
    e += 1.0
    return np.divide(1.0, e, out=e)  # the same rounding as np.reciprocal, in half the time


def _concave_roots(m: np.ndarray, k: float, tau0: np.ndarray) -> np.ndarray:
    """The root of ``psi(tau) = sigmoid(tau - m) - k tau`` on ``[0, 1/k]`` for ``k >= 1/4``
    (``psi`` decreases there: one root per atom).

    Newton steps from ``tau0`` on every atom at once (the first sweep without gathers),
    with :func:`_root`'s stopping test; an atom whose step leaves ``[0, 1/k]`` or that is
    unresolved after ``_FAST_SWEEPS`` is finished by the bracketed :func:`_root`.
    """
    top = 1.0 / k
    tau = np.clip(tau0, 0.0, top)
    act = None  # every atom
    failed = []
    for _ in range(_FAST_SWEEPS):
        mi, ti = (m, tau) if act is None else (m[act], tau[act])
        # worked in place (seven n-vectors on the first, all-atom sweep: the memory target
        # of issue 9), with the same operations in the same order as the plain formulas
        s = _sigmoid(ti - mi)
        ds = s * s
        np.subtract(s, ds, out=ds)  # sigmoid'
        dpsi = ds - k
        with np.errstate(divide="ignore", invalid="ignore"):
            step = np.multiply(ti, k)
            np.subtract(s, step, out=step)
            step /= dpsi  # (s - k tau) / psi'
            new = ti - step
            scale = np.abs(new)
            np.maximum(scale, 1.0, out=scale)
            scale *= _ROOT_TOL
            np.abs(step, out=step)
            # Newton's error after this step is about psi'' step^2 / (2 |psi'|):
            # |ds - 2 s ds| step^2 <= 0.2 scale |dpsi|
            np.multiply(s, ds, out=s)
            s *= -2.0
            s += ds
            np.abs(s, out=s)
            np.multiply(step, step, out=ds)
            s *= ds
            np.multiply(scale, 0.2, out=ds)
            np.abs(dpsi, out=dpsi)
            ds *= dpsi
            done = (step <= scale) | (s <= ds)
            out = ~((new >= 0.0) & (new <= top))
        del s, ds, dpsi, scale
        if act is None:
            np.copyto(tau, new, where=~out)  # tau is np.clip's copy: updated in place
            act = np.flatnonzero(~done | out)
            if out.any():
                failed.append(np.flatnonzero(out))
                act = np.setdiff1d(act, failed[-1], assume_unique=True)
        else:
            tau[act] = np.where(out, ti, new)
            if out.any():
                failed.append(act[out])
            act = act[~done & ~out]
        if act.size == 0:
            break
    rest = np.concatenate([act, *failed]) if act is not None else np.zeros(0, dtype=int)
    if rest.size:
        tau[rest] = _root(m[rest], k, np.zeros(rest.size), np.full(rest.size, top), tau[rest])
    return tau


def best_move(m: np.ndarray, k: float, start: Roots | None = None,
              values: bool = True) -> BestMove:
    """Global maximiser of ``f(tau) = softplus(tau - m) - (k/2) tau^2`` over ``tau >= 0``.

    Parameters
    ----------
    m : array
        Margins of the atoms.
    k : float
        ``2 lambda / b^2 > 0``.
    start : Roots, optional
        Warm starts for the two local maximisers (the ``roots`` of an earlier call).
    values : bool
        Whether to compute ``value`` (``None`` otherwise) where it is not needed to choose
        between two maximisers (``k >= 1/4``).

    Returns
    -------
    BestMove
        ``tau``, ``value``: the global maximiser ``tau*`` and ``f(tau*)``; ``tau_alt``,
        ``value_alt``: the other local maximiser and its value where ``f`` has two
        (``nan`` elsewhere), used to detect ties; ``roots``: the roots on both pieces
        (for warm starts).
    """
    m = np.asarray(m, dtype=np.float64)
    k = float(k)
    if k >= 0.25:  # psi decreases: one maximiser, on the right piece tau >= m iff psi(m) >= 0
        r_ok = (m < 0) | (0.5 - k * m >= 0)
        if start is None:
            tau0 = np.where(r_ok, 1.0 / k, 0.0)
        elif start.tau_right is start.tau_left:  # one array holds both
            tau0 = start.tau_right
        else:
            tau0 = np.where(start.right_exists, start.tau_right, start.tau_left)
        tau = _concave_roots(m, k, tau0)
        value = softplus(tau - m) - 0.5 * k * tau**2 if values else None
        nan = np.full(m.shape, np.nan)
        return BestMove(tau, value, nan, nan, Roots(tau, tau, r_ok, ~r_ok))
    # k < 1/4: s_k > 0 with sigmoid'(s_k) = k; psi increases on |tau - m| < s_k
    disc = math.sqrt(1.0 - 4.0 * k)
    s_k = math.log1p(disc) - math.log1p(-disc) if disc < 1.0 else math.inf
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
    tau_r[i] = _root(mi, k, lo, hi, hi if start is None else start.tau_right[i])
    f_r[i] = softplus(tau_r[i] - mi) - 0.5 * k * tau_r[i] ** 2
    i = np.flatnonzero(l_ok)
    mi = m[i]
    lo = np.zeros_like(mi)
    tau_l[i] = _root(mi, k, lo, np.clip(mi - s_k, 0.0, top), lo if start is None
                     else start.tau_left[i])
    f_l[i] = softplus(tau_l[i] - mi) - 0.5 * k * tau_l[i] ** 2
    right = f_r >= f_l
    tau = np.where(right, tau_r, tau_l)
    value = np.where(right, f_r, f_l)
    both = r_ok & l_ok
    tau_alt = np.where(both, np.where(right, tau_l, tau_r), np.nan)
    value_alt = np.where(both, np.where(right, f_l, f_r), np.nan)
    return BestMove(tau, value, tau_alt, value_alt, Roots(tau_r, tau_l, r_ok, l_ok))


@dataclass(frozen=True, eq=False)
class Moves:
    """Per-atom adversarial moves at ``lambda`` for the margins ``m``.

    ``value[i]`` (computed when first read) is ``max`` over branches of ``phi - lambda *
    kappa * flip`` and ``cost[i] = t^2 + kappa * flip`` the transport cost per unit mass of
    the chosen move, ``t = tau / b``; ``right[i]`` tells whether it is the maximiser on the
    right piece (``tau >= m + s_k``, see :func:`best_move`).
    """

    lam: float
    tau: np.ndarray
    flip: np.ndarray
    cost: np.ndarray
    roots: MoveRoots | None
    right: np.ndarray
    m: np.ndarray
    b: float
    kappa: float

    @functools.cached_property
    def value(self) -> np.ndarray:
        return _moves_value(self.m, self.b, self.lam, self.kappa, self.tau, self.flip)

    @functools.cached_property
    def flips(self) -> np.ndarray:
        """The flipped atoms, ``flatnonzero(flip)`` (one scan of the flags, on first read)."""
        return np.flatnonzero(self.flip)

    def cost_at(self, rows: np.ndarray) -> np.ndarray:
        """``cost[rows]``."""
        return self.cost[rows]

    def expected_cost(self, w: np.ndarray) -> float:
        """``E cost = w @ cost`` under the weights ``w``."""
        return float(w @ self.cost)


class _FastMoves(Moves):
    """:func:`_fast_moves`' :class:`Moves` (roots ``tau`` at ``k > 1/4``: one maximiser per
    atom and branch), whose ``cost``, ``right`` and ``roots`` are built on first read: an
    evaluation reads its moves' costs only through :meth:`cost_at` and :meth:`expected_cost`
    and the other two not at all (the three n-vectors took about 0.3 pass of each of the
    four calls of a solve at n = 1e6). ``flips``, where given, are the flipped atoms
    (:attr:`Moves.flips`, known to the caller: no scan of the flags); ``squares``, where
    given, ``(w, w @ tau^2)`` (:meth:`expected_cost`'s sum under ``w``, known to the
    caller: no pass)."""

    def __init__(self, k: float, tau: np.ndarray, flip: np.ndarray, m: np.ndarray, b: float,
                 kappa: float, lam: float | None = None, flips: np.ndarray | None = None,
                 squares: tuple[np.ndarray, float] | None = None) -> None:
        fields = {"lam": 0.5 * k * b**2 if lam is None else lam, "tau": tau, "flip": flip,
                  "m": m, "b": b, "kappa": kappa, "k": k, "_squares": squares}
        if flips is not None:
            fields["flips"] = flips  # the cached property's value
        for name, v in fields.items():  # frozen: as the dataclass's own __init__ sets them
            object.__setattr__(self, name, v)

    @functools.cached_property
    def cost(self) -> np.ndarray:
        cost = self.tau * self.tau
        cost *= 1.0 / self.b**2
        idx = self.flips
        if idx.size:
            cost[idx] += self.kappa
        return cost

    @functools.cached_property
    def right(self) -> np.ndarray:
        # the root is on the right piece (tau >= mm): best_move's (mm < 0) | (0.5 - k mm >=
        # 0), which is k mm <= 0.5 exactly (k > 0; the sign of a rounded difference is
        # exact); mm = -m on the flipped atoms, whose products are negated (exactly)
        km = np.multiply(self.m, self.k)
        right = km <= 0.5
        idx = self.flips
        right[idx] = -km[idx] <= 0.5
        return right

    @functools.cached_property
    def roots(self) -> MoveRoots:
        return MoveRoots(Roots(self.tau, self.tau, self.right, ~self.right))

    def cost_at(self, rows: np.ndarray) -> np.ndarray:
        t = self.tau[rows]
        c = t * t
        c *= 1.0 / self.b**2  # as cost rounds it
        return np.where(self.flip[rows], c + self.kappa, c)

    def expected_cost(self, w: np.ndarray) -> float:
        # w @ tau^2 kept for the last weights asked about: the switch point's test and the
        # evaluation's split of the same moves read it under the same weights (a pass over
        # two n-vectors and an n-vector temporary each)
        last = self._squares
        if last is None or last[0] is not w:
            last = (w, float((w * self.tau) @ self.tau))
            object.__setattr__(self, "_squares", last)
        idx = self.flips
        price = self.kappa * float(w[idx].sum()) if idx.size else 0.0
        return last[1] / self.b**2 + price


def _moves_value(m, b, lam, kappa, tau, flip) -> np.ndarray:
    """``V = softplus(tau - s m) - lambda t^2 - lambda kappa 1[flip]`` of moves (``s = -1``
    where flipped, ``t = tau / b``)."""
    k = 2.0 * lam / b**2
    val = softplus(tau - np.where(flip, -m, m)) - 0.5 * k * tau**2
    if flip.any():
        val[flip] -= lam * kappa
    return val


class Bracket(NamedTuple):
    """The moves at the ends ``lambda_lo <= lambda* <= lambda_hi`` of :func:`solve_lambda`'s
    final bracket (``lo is hi`` when the budget was met at a single point)."""

    hi: Moves
    lo: Moves


class _SwitchBracket(Bracket):
    """A :class:`Bracket` at a switch point whose switching atoms ``switch`` (sorted) are
    known (the evaluation then need not compare the two ends over every atom). Its ``lo``
    moves are ``hi``'s with the atoms ``switch`` flipped too (flipped roots ``tau_lo``),
    built in full (:func:`_flipped_too`, four n-vectors copied: about a pass at n = 1e6)
    only when read; the evaluation reads their entries at the switch alone
    (:meth:`lo_at`)."""

    def __new__(cls, hi: Moves, k: float, switch: np.ndarray,
                tau_lo: np.ndarray) -> _SwitchBracket:
        self = super().__new__(cls, hi, None)
        self.switch, self.k, self.tau_lo = switch, k, tau_lo
        self.cost_lo = tau_lo * tau_lo * (1.0 / hi.b**2) + hi.kappa  # as _fast_moves rounds it
        return self

    @functools.cached_property
    def lo(self) -> Moves:
        """The ``lo`` moves in full, built on first read."""
        return _flipped_too(self.hi, self.k, self.switch, self.tau_lo)

    def lo_at(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(tau, flip, cost)`` of the ``lo`` moves at ``rows`` (a subset of ``switch``)."""
        pos = np.searchsorted(self.switch, rows)
        return self.tau_lo[pos], np.ones(rows.size, dtype=bool), self.cost_lo[pos]


class _Probe(NamedTuple):
    """The moves at one ``lambda`` and ``G'(lambda) = E cost - rho^2`` there (negated)."""

    moves: Moves
    g: float


def _moves(m: np.ndarray, b: float, lam: float, kappa: float,
           start: MoveRoots | None = None) -> Moves:
    k = 2.0 * lam / b**2
    start = start or None  # () from older callers: no warm start
    plain = best_move(m, k, None if start is None else start.plain, values=False)
    tau, roots0 = plain.tau, plain.roots
    right = (roots0.right_exists.copy() if tau is roots0.tau_right
             else roots0.right_exists & (tau == roots0.tau_right))
    flip = np.zeros(m.shape, dtype=bool)
    roots = MoveRoots(roots0)
    if np.isfinite(kappa):
        # softplus(tau + m) <= softplus(m) + tau, so the flipped branch is worth at most
        # softplus(m) + b^2 / (4 lambda) - lambda kappa, and the unflipped one at least
        # softplus(-m): flipping can win only where m > lambda kappa - b^2 / (4 lambda).
        cand = np.flatnonzero(m > lam * kappa - b**2 / (4.0 * lam))
        warm = None
        old = None if start is None else start.flipped_at
        if cand.size and old is not None and old.size:
            # the flipped roots of the candidates that were candidates before, else cold
            pos = np.minimum(np.searchsorted(old, cand), old.size - 1)
            hit = old[pos] == cand
            top = 1.0 / k
            warm = Roots(np.where(hit, start.flipped.tau_right[pos], top),
                         np.where(hit, start.flipped.tau_left[pos], 0.0),
                         start.flipped.right_exists[pos] & hit,
                         start.flipped.left_exists[pos] & hit)
        flipped = best_move(-m[cand], k, warm)
        sub = flipped.roots
        mc, tc = m[cand], tau[cand]
        win = flipped.value - lam * kappa > softplus(tc - mc) - 0.5 * k * tc**2
        if cand.size and win.any():
            tau = tau.copy()  # tau may be the warm-start array of the roots
            flip[cand[win]] = True
            tau[cand[win]] = flipped.tau[win]
            right[cand[win]] = (sub.right_exists & (flipped.tau == sub.tau_right))[win]
        roots = MoveRoots(roots0, sub, cand)
    cost = (tau / b) ** 2
    if flip.any():
        cost[flip] += kappa
    return Moves(lam, tau, flip, cost, roots, right, m, b, kappa)


def _branch(m: np.ndarray, b: float, lam: float, kappa: float, flip: np.ndarray,
            right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Value and cost of fixed branches (flipped or not, right or left maximiser) at
    ``lambda``; the value is ``nan`` where that local maximiser does not exist."""
    k = 2.0 * lam / b**2
    mm = np.where(flip, -m, m)
    roots = best_move(mm, k).roots
    tau = np.where(right, roots.tau_right, roots.tau_left)
    price = np.where(flip, kappa, 0.0)
    val = softplus(tau - mm) - 0.5 * k * tau**2 - lam * price
    exists = np.where(right, roots.right_exists, roots.left_exists)
    return np.where(exists, val, np.nan), (tau / b) ** 2 + price


def _sigmoid_float(z: float) -> float:
    """``1 / (1 + exp(-z))`` of one float (no overflow of ``exp``)."""
    if z >= 0.0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _root_float(m: float, k: float) -> float:
    """:func:`best_move`'s root of ``psi(tau) = sigmoid(tau - m) - k tau`` for one atom at ``k
    >= 1/4`` (``psi`` decreases: one root, in ``[0, 1/k]``), in floats: :func:`_root`'s
    bracketed Newton steps and stopping test from :func:`best_move`'s start (``1/k`` on
    the right piece, else 0). The scalar roots of :func:`_switch_points` (several hundred
    per solve) cost a few microseconds each instead of the array routines' overhead."""
    lo, hi = 0.0, 1.0 / k
    tau = hi if (m < 0 or 0.5 - k * m >= 0) else 0.0
    for _ in range(_NEWTON_ITERS):
        s = _sigmoid_float(tau - m)
        psi = s - k * tau
        if psi > 0:
            lo = tau
        else:
            hi = tau
        ds = s * (1.0 - s)
        dpsi = ds - k
        new = tau - psi / dpsi
        step = abs(new - tau)
        nxt_err = abs(ds * (1.0 - 2.0 * s)) * step**2 / (2.0 * abs(dpsi))
        bad = not lo <= new <= hi
        tau = 0.5 * (lo + hi) if bad else new
        scale = _ROOT_TOL * max(1.0, abs(tau))
        if not (bad or (step > scale and not nxt_err <= 0.1 * scale)):
            break
    return tau


def _branch_float(m: float, b: float, lam: float, kappa: float, flip: bool,
                  right: bool) -> tuple[float, float]:
    """:func:`_branch` for one atom at ``k = 2 lambda / b^2 >= 1/4``, in floats."""
    k = 2.0 * lam / b**2
    mm = -m if flip else m
    price = kappa if flip else 0.0
    tau = _root_float(mm, k)
    z = tau - mm
    val = max(z, 0.0) + math.log1p(math.exp(-abs(z))) - 0.5 * k * tau**2 - lam * price
    exists = (mm < 0 or 0.5 - k * mm >= 0) == right  # best_move's right piece
    return (val if exists else math.nan), (tau / b) ** 2 + price


def _switch_points(m: np.ndarray, b: float, kappa: float, lo: Moves, hi: Moves,
                   idx: np.ndarray, bracket: tuple | None = None, maybe_none: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``lambda`` in ``bracket`` (default ``[lo.lam, hi.lam]``) where atoms ``idx`` switch
    from their move at ``lo`` (branch A) to their move at ``hi`` (B): the root of
    ``V_A - V_B``, whose derivative in ``lambda`` is ``cost_B - cost_A`` (envelope
    theorem), by safeguarded Newton; also the drop ``cost_A - cost_B`` of each atom's
    cost there. With ``maybe_none`` (a window that need not hold the switch) the point is
    ``nan`` where ``V_A - V_B`` has one sign on the whole window (checked at its far end
    after ``_SWITCH_BISECTIONS`` bisections towards it)."""
    bracket = (lo.lam, hi.lam) if bracket is None else bracket
    # atoms with equal margins and branches switch together: one root per distinct key
    keys = np.column_stack([m[idx], lo.flip[idx], lo.right[idx], hi.flip[idx], hi.right[idx]])
    keys, inverse = np.unique(keys, axis=0, return_inverse=True)
    mi = keys[:, 0]
    a_branch = (keys[:, 1] > 0, keys[:, 2] > 0)
    b_branch = (keys[:, 3] > 0, keys[:, 4] > 0)
    out, drop = np.empty(mi.size), np.zeros(mi.size)

    def diff_at(i, lam):  # V_A - V_B and cost_A - cost_B of key i at lam
        if 2.0 * lam / b**2 >= 0.25:  # one maximiser per branch: in floats
            va, ca = _branch_float(float(mi[i]), b, lam, kappa, *(bool(x[i]) for x in a_branch))
            vb, cb = _branch_float(float(mi[i]), b, lam, kappa, *(bool(x[i]) for x in b_branch))
        else:
            va, ca = (float(x[0]) for x in _branch(mi[i:i + 1], b, lam, kappa,
                                                   *(x[i:i + 1] for x in a_branch)))
            vb, cb = (float(x[0]) for x in _branch(mi[i:i + 1], b, lam, kappa,
                                                   *(x[i:i + 1] for x in b_branch)))
        diff = va - vb
        if math.isnan(diff):  # a maximiser is absent: the other branch wins
            diff = -math.inf if math.isnan(va) else math.inf
        return diff, ca - cb

    for i in range(mi.size):  # a few distinct keys; one scalar root each
        left, right = bracket
        lam = 0.5 * (left + right)
        run, up = 0, None  # consecutive bisections towards one end (up: the right one)
        for _ in range(_SWITCH_ITERS):
            diff, dc = diff_at(i, lam)
            if diff > 0:
                left = lam
            else:
                right = lam
            step = lam + diff / dc if dc > 0 else math.nan
            bisect = not left < step < right
            new = 0.5 * (left + right) if bisect else step
            run = (run + 1 if up == (diff > 0) else 1) if bisect else 0
            up = diff > 0
            if maybe_none and run == _SWITCH_BISECTIONS:
                far = bracket[1] if diff > 0 else bracket[0]
                if (diff_at(i, far)[0] > 0) == (diff > 0):  # one sign: no switch inside
                    lam = math.nan
                    break
            if abs(new - lam) <= _SWITCH_TOL * lam or right - left <= 4e-16 * lam:
                lam = new
                break
            lam = new
        out[i], drop[i] = lam, dc
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


@dataclass(frozen=True)
class _Narrowed:
    """:func:`_bracket_jump`'s answer: the narrowed bracket ``(lo, hi)`` and the next
    ``lambda`` to try, or ``found``, the bracket whose ends straddle ``lambda*`` at a jump."""

    lo: _Probe | None = None
    hi: _Probe | None = None
    lam: float = math.nan
    found: Bracket | None = None


def _bracket_jump(m, w, b, kappa, lo: _Probe, hi: _Probe, g) -> _Narrowed | None:
    """Narrow a bracket ``lo`` (``g > 0``), ``hi`` (``g <= 0``) at its switches.

    Atoms whose move differs between the ends switch inside the bracket, at the points and
    with the cost drops of :func:`_switch_points`. A model of ``g`` (linear between the
    ends once the known drops are taken out, minus the drops passed) predicts where ``g``
    changes sign: at a switch, ``g`` is evaluated just below and above it, and if the sign
    changes there ``lambda*`` is that switch (``found``); otherwise the narrowed bracket
    and the model's root. ``None`` if there are no or too many switching atoms.
    """
    a, c = lo.moves, hi.moves
    # moving between pieces is continuous where there is one maximiser (k >= 1/4)
    idx = np.flatnonzero((a.flip != c.flip) | (
        (a.right != c.right) if 2.0 * a.lam / b**2 < 0.25 else False))
    if idx.size == 0 or np.unique(m[idx]).size > _MAX_SWITCH:
        return None
    pts, drop = _switch_points(m, b, kappa, a, c, idx)
    order = np.argsort(pts)
    pts, jump = pts[order], (w[idx] * drop)[order]
    slope = (hi.g - lo.g + float(jump.sum())) / (c.lam - a.lam)
    before = lo.g + slope * (pts - a.lam) - np.concatenate([[0.0], np.cumsum(jump)[:-1]])
    after = before - jump
    crossed = np.flatnonzero(after <= 0)
    j = int(crossed[0]) if crossed.size else pts.size
    if j == pts.size or before[j] <= 0:  # the model's root is between switches
        passed = float(jump[:j].sum())
        nxt = a.lam + (passed - lo.g) / slope if slope < 0 else math.nan
        if not a.lam < nxt < c.lam:
            nxt = math.sqrt(a.lam * c.lam)
        return _Narrowed(lo, hi, nxt)
    s = float(pts[j])
    # both sides of the switch, or the bracket's end where the switch is closer than that
    below = g(s * (1.0 - _SWITCH_EPS)) if s * (1.0 - 2 * _SWITCH_EPS) > a.lam else lo
    above = g(s * (1.0 + _SWITCH_EPS)) if s * (1.0 + 2 * _SWITCH_EPS) < c.lam else hi
    for probe in (below, above):
        if probe.g > 0:
            lo = probe
        else:
            hi = probe
    if below.g > 0 >= above.g:
        return _Narrowed(found=Bracket(above.moves, below.moves))
    return _Narrowed(lo, hi, math.sqrt(lo.moves.lam * hi.moves.lam))


#: Sweeps of :func:`_joint_newton` (quadratic convergence from the previous point's moves:
#: two to four are used).
_JOINT_SWEEPS = 6
#: ... which stops once its step in ``k`` is below this (relative): the next one would be
#: about its square, below double precision.
_JOINT_TOL = 1e-9


def _joint_newton(m: np.ndarray, w: np.ndarray, b: float, r2: float, kappa: float,
                  lam: float, prev: Moves, start: MoveRoots) -> tuple[float, MoveRoots] | None:
    """A guess of ``lambda*`` and warm starts for its probe, from the moves ``prev`` of
    another point (``k = 2 lambda / b^2 >= 1/4`` throughout, else ``None``).

    With every atom's branch fixed as in ``prev`` (``mm = -m`` where flipped), Newton's
    method on the budget ``E tau^2 / b^2 + kappa E flip = rho^2`` and every atom's
    stationarity ``psi_i = sigmoid(tau_i - mm_i) - k tau_i = 0`` together: the linearised
    roots ``dtau_i = (tau_i dk - psi_i) / psi'_i`` put into the linearised budget give
    ``dk``, one sweep over the atoms per step. The answer is only a starting point:
    :func:`solve_lambda`'s probe at it is exact (and chooses the branches again).
    """
    k = 2.0 * lam / b**2
    if k < 0.25 or prev.tau.shape != m.shape:
        return None
    flips = np.flatnonzero(prev.flip)
    mm = m
    if flips.size:
        mm = m.copy()
        mm[flips] = -m[flips]
    fixed = kappa * float(w[flips].sum()) if flips.size else 0.0
    tau, c = prev.tau, 2.0 / b**2
    for _ in range(_JOINT_SWEEPS):
        s = _sigmoid(tau - mm)
        dpsi = s - s * s - k
        psi = s - k * tau
        if not np.all(dpsi < 0):
            return None
        q = tau / dpsi
        dk = (c * float(w @ (q * psi)) - (float(w @ tau**2) / b**2 + fixed - r2)) / (
            c * float(w @ (q * tau)))
        tau = tau + (q * dk - psi / dpsi)
        k += dk
        if not (math.isfinite(k) and k >= 0.25):
            return None
        if abs(dk) <= _JOINT_TOL * k:
            break
    plain, sub, at = start.plain, start.flipped, start.flipped_at
    warm = tau
    if flips.size:  # the flipped atoms' own roots are the flipped branch's warm start
        warm = tau.copy()
        warm[flips] = plain.tau_right[flips] if plain.tau_right is plain.tau_left else 0.0
        if sub is not None and at is not None and at.size:
            pos = np.searchsorted(at, flips)
            ok = (pos < at.size) & (at[np.minimum(pos, at.size - 1)] == flips)
            right = sub.tau_right.copy()
            right[pos[ok]] = tau[flips[ok]]
            sub = Roots(right, right, sub.right_exists, sub.left_exists)
    return 0.5 * k * b**2, MoveRoots(Roots(warm, warm, plain.right_exists, plain.left_exists),
                                      sub, at)


#: Atoms per block of the fused sweeps of :func:`_fast_pair`, of :func:`_w2_terms`, of the
#: moved features and of their certificate: the dozen block-sized temporaries of a sweep
#: (64 KB each) stay in the 1 MB L2 cache of a core (measured at n = 1e6, d = 8, CPU time,
#: the shared machine loaded: one joint sweep took 18 to 22 ms in blocks of 2^13 atoms, 35 to
#: 50 ms in blocks of 2^14 and 20 to 24 ms in blocks of 2^11 (per-block overhead); the
#: derivative terms 25 to 30 ms against 35 to 58 ms; earlier, the blocked ``3 x n`` product
#: with ``a`` alone took 4.3 ms in blocks of 2^14 atoms, 8.6 ms in blocks of 2^16).
_BLOCK = 1 << 13
#: Sweeps of :func:`_fast_pair` before it gives up (from a warm start three to five are used,
#: from a cold one about seven: Newton's quadratic convergence).
_FAST_ITERS = 12
#: :func:`_fast_pair`'s first joint solves stop once their step (the largest change of a root,
#: ``k`` about ``3``) is below this: the roots and ``k`` are then right to about its square
#: (Newton's error ``|psi''| step^2 / (2 |psi'|)`` and the cross term ``|dk| step / |psi'|``:
#: a few ``1e-6`` at most), inside the spacing of the atoms' switch points that the flips are
#: chosen at (``1e-4`` relative at n = 1e6; a switch located wrongly is caught by the exact
#: check at it, and a pattern that chooses itself is resumed to the exact test), and the
#: sweeps more that the exact test takes are left to the solve at fixed ``k`` that follows at
#: a switch (one sweep from ``7e-7``), or done where the pattern chooses itself. At ``1e-5``
#: the benchmark at n = 1e6 (Gaussian, ``kappa = 1``) took a second joint sweep in two of its
#: evaluations (steps ``1.4e-3, 1.3e-6`` and ``9.8e-5, 7.4e-8``) for the same fixed-``k``
#: sweeps after them.
_LOOSE_STEP = 2e-3
#: ``max |sigmoid'' |`` ``= 1 / (6 sqrt 3)``: bounds ``|psi''|`` in Newton's error estimate.
_PSI2_MAX = 1.0 / (6.0 * math.sqrt(3.0))
#: :func:`_fast_pair` stops once Newton's error after the last step, about ``|psi''| step^2
#: / (2 |psi'|)`` per atom, is below this (absolute; the roots are at most ``1 / k <= 4``).
#: A joint step adds the cross term ``|dk| step / |psi'|`` of the same order (measured: the
#: roots within ``3e-14`` of :func:`best_move`'s at the ``k`` returned, ``k`` within
#: ``1e-14``). The roots' other reader is the stationarity ``sigmoid = k tau`` of the
#: derivative blocks, whose residual ``|psi'| err`` (``1e-13``) moves the gradient far below
#: Newton's ``tol`` (``1e-10``); the budget is met to rounding by the roots returned
#: (:func:`_joint_sweeps`' last step in ``k``) and the certificate recomputes the worst
#: case's cost, loss and gradient itself. At ``1e-16`` (a few ulps), with the budget's
#: quadratic term held to ``_BUDGET_TOL / 4`` instead of that last step, the step after
#: ``3e-7`` to ``6e-7`` was one more sweep in each evaluation of the benchmark at n = 1e6
#: (steps ``1e-3, 6e-7, 1e-13``: kappa = inf took 8 sweeps, now 4).
_FAST_ERR = 1e-14


def _block_flips(flip: np.ndarray):
    """``(lo, fb)`` for each block of ``_BLOCK`` atoms: its start and the positions in it of
    its flipped atoms (a few hundred at n = 1e6, in most blocks), found once by index: each
    block's are negated at their positions (boolean masks of every block's atoms, for the
    signed margins and the rows, took 0.5 to 0.9 passes of the 2.5 of a :func:`_w2_terms`
    call at n = 1e6)."""
    flips = np.flatnonzero(flip)
    cuts = np.searchsorted(flips, np.arange(0, flip.size + _BLOCK, _BLOCK))
    for j, lo in enumerate(range(0, flip.size, _BLOCK)):
        yield lo, flips[cuts[j]:cuts[j + 1]] - lo


def _newton_block(mm: np.ndarray, t: np.ndarray, k: float,
                  out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Newton's step ``psi / psi'`` at the roots ``t`` of one block (written to ``out``) and
    ``psi'``, for ``psi = sigmoid(t - mm) - k t`` (``psi' = sigmoid' - k``): the per-atom
    arithmetic shared by :func:`_joint_sweeps` and :func:`_fixed_sweeps`, in place (four
    block-sized temporaries)."""
    e = np.subtract(mm, t)
    np.exp(e, out=e)
    e += 1.0
    s = np.divide(1.0, e, out=e)  # sigmoid(t - mm)
    dpsi = s * s
    np.subtract(s, dpsi, out=dpsi)
    dpsi -= k
    psi = np.multiply(t, k)
    np.subtract(s, psi, out=psi)
    return np.divide(psi, dpsi, out=out), dpsi


def _fixed_sweeps(mm: np.ndarray, k: float, tau: np.ndarray,
                  w: np.ndarray | None = None) -> np.ndarray | tuple[np.ndarray, float] | None:
    """:func:`_joint_sweeps` at fixed ``k``: every atom's root of ``psi_i = sigmoid(tau_i -
    mm_i) - k tau_i`` (``k > 1/4``) by Newton's method from ``tau`` (overwritten: the
    answer), with its stopping test (Newton's error ``|psi''| step^2 / (2 |psi'|)``
    below ``_FAST_ERR`` on every atom) and the same failures (``None``: a ``psi'_i`` not
    negative, a root outside ``[0, 1/k]``, ``_FAST_ITERS`` sweeps). Without the budget a
    sweep needs neither ``dtau / dk`` nor the budget's sums: about half the per-atom work
    of a joint sweep (the solve at a switch point, once or twice per evaluation). Each
    block takes its step as soon as it is computed (the step is not global, as the joint
    sweeps' ``dk`` is), with the range test of the roots it gives in the same blocks: no
    last pass over the atoms and no ``n``-vector of steps (the same roots, bit for bit).
    With weights ``w``, ``(tau, w @ tau^2)``, the sum as :func:`_weighted_squares` forms it,
    from each sweep's blocks in cache (the switch point's test reads it: a pass over two
    ``n``-vectors and an ``n``-vector temporary after the sweeps, 2 to 4 ms of each of the
    four calls of the benchmark's solve at n = 1e6)."""
    n = mm.size
    r = np.empty(min(n, _BLOCK))  # one block's psi / psi': its step is -r
    for _ in range(_FAST_ITERS):
        top_r, near = 0.0, -math.inf  # max |step|, max psi' (< 0)
        low, high = math.inf, -math.inf  # the range of the roots after the step
        squares = []  # each block's w @ tau^2 after the step
        for lo in range(0, n, _BLOCK):
            t = tau[lo:lo + _BLOCK]
            rb, dpsi = _newton_block(mm[lo:lo + _BLOCK], t, k, r[:t.size])
            near = max(near, float(dpsi.max()))
            top_r = max(top_r, float(rb.max()), -float(rb.min()))
            t -= rb
            low, high = min(low, float(t.min())), max(high, float(t.max()))
            if w is not None:
                squares.append(float(w[lo:lo + _BLOCK] @ np.square(t, out=rb)))
        if not near < 0:
            return None
        if _PSI2_MAX * top_r**2 <= 2.0 * _FAST_ERR * -near:
            if not (low >= 0.0 and high <= 1.0 / k):
                return None
            return tau if w is None else (tau, math.fsum(squares))
    return None


def _joint_sweeps(mm: np.ndarray, w: np.ndarray, b: float, budget: float, k: float,
                  tau0: np.ndarray | None, loose: bool = False
                  ) -> tuple[float, np.ndarray, float, np.ndarray, bool] | None:
    """Every atom's root of ``psi_i = sigmoid(tau_i - mm_i) - k tau_i`` and the ``k`` at
    which ``E tau^2 / b^2 = budget``, for ``k > 1/4``; ``(k, tau,
    dS/dk, dtau/dk, exact)`` (``dS/dk = 2 E tau dtau/dk / b^2``, the budget's slope; ``dtau_i
    / dk = tau_i / psi'_i``, of the last sweep: the first-order move of the roots with
    ``k``; ``exact``: the stopping test below was met) or ``None``. With ``loose`` it also
    stops once the step is below ``_LOOSE_STEP`` (``exact`` False): roots and ``k`` to about
    its square, enough to choose the flips and locate a switch, whose own solve at fixed
    ``k`` then resolves the roots (:func:`_fast_pair`); such roots are only a start (every
    solve from them tests its own), so the last step is applied without the range test
    below.

    Newton's method on the roots and the budget together (as :func:`_joint_newton`: the
    linearised roots ``dtau_i = (tau_i dk - psi_i) / psi'_i`` in the linearised budget give
    ``dk``), from ``tau0`` (a warm start, overwritten: the returned roots; ``None``: ``tau =
    0``). Each sweep is one pass over
    the atoms in blocks of ``_BLOCK`` (the previous step applied, ``psi`` and ``psi'``
    computed, the three sums of the budget's linearisation accumulated). For ``k > 1/4``
    every ``psi_i`` decreases on the real line, so a converged root is the atom's unique
    stationary point, in ``[0, 1/k]``, and the global maximiser of its concave ``f``: exact,
    as :func:`best_move`'s. It stops once Newton's error after the step just taken, about
    ``|psi''| step^2 / (2 |psi'|)`` (and the joint step's cross term ``|dk| step /
    |psi'|``), is below ``_FAST_ERR`` on every atom (at fixed ``k``, :func:`_fixed_sweeps`,
    without the cross term); the budget's residual after that step (the quadratic term ``E
    dtau^2 / b^2`` that the linearisation drops) is then removed by a last step in ``k``
    alone, the roots moved with it along ``dtau / dk`` (first order in a step of about
    ``E dtau^2 / S``, ``1e-12`` relative: the roots' change is of its square). ``None``
    (the caller runs
    :func:`solve_lambda`) where ``k`` leaves ``(1/4, inf)``, a ``psi'_i`` is not negative,
    a root leaves ``[0, 1/k]`` or after ``_FAST_ITERS`` sweeps.
    """
    n, c = mm.size, 2.0 / b**2
    tau = np.zeros(n) if tau0 is None else tau0  # the callers' own array: worked in place
    q, r = np.empty(n), np.empty(n)  # tau / psi' and psi / psi': the step is q dk - r
    dk = None  # the step of the previous sweep (None: none yet)
    s3 = 0.0
    for _ in range(_FAST_ITERS):
        if not (math.isfinite(k) and k > 0.25):
            return None
        s1 = s2 = s3 = 0.0
        top_r = top_q = 0.0
        near = -math.inf  # max psi' (< 0)
        for lo in range(0, n, _BLOCK):
            sl = slice(lo, lo + _BLOCK)
            t = tau[sl]
            if dk is not None:  # the previous sweep's step, in place
                t += q[sl] * dk
                t -= r[sl]
            rb, dpsi = _newton_block(mm[sl], t, k, r[sl])
            qb = np.divide(t, dpsi, out=q[sl])
            wt = w[sl] * t
            s1 += float(wt @ rb)  # E tau psi / psi'
            s2 += float(wt @ t)  # E tau^2
            s3 += float(wt @ qb)  # E tau^2 / psi'
            near = max(near, float(dpsi.max()))
            top_r = max(top_r, float(np.abs(rb).max()))
            top_q = max(top_q, float(np.abs(qb).max()))
        if not near < 0:
            return None
        # dk from c E tau dtau = budget - E tau^2 / b^2, dtau = q dk - r
        dk = 0.0 if s3 == 0 else (c * s1 + budget - s2 / b**2) / (c * s3)
        step = abs(dk) * top_q + top_r
        k += dk
        exact = _PSI2_MAX * step**2 <= 2.0 * _FAST_ERR * -near  # Newton's error on every root
        if exact or (loose and step <= _LOOSE_STEP):
            break
    else:
        return None
    if not (math.isfinite(k) and k > 0.25):
        return None
    if not exact:  # loose: the last step alone (the caller's solve at fixed k, or the
        for lo in range(0, n, _BLOCK):  # exact one resumed, tests the roots it starts from)
            sl = slice(lo, lo + _BLOCK)
            t = tau[sl]
            t += q[sl] * dk
            t -= r[sl]
        return k, tau, c * s3, q, exact
    s2 = 0.0
    for lo in range(0, n, _BLOCK):  # the last step, and E tau^2 of the roots it gives
        sl = slice(lo, lo + _BLOCK)
        t = tau[sl]
        t += q[sl] * dk
        t -= r[sl]
        s2 += float(w[sl] @ (t * t))
    dk = 0.0
    if s3 != 0:  # the budget's residual removed by k alone (dS/dk = c s3)
        dk = (budget - s2 / b**2) / (c * s3)
        k += dk
        if not (math.isfinite(k) and k > 0.25):
            return None
    low, high = math.inf, -math.inf
    for lo in range(0, n, _BLOCK):  # the roots moved with k, and the range test, in blocks
        sl = slice(lo, lo + _BLOCK)
        t = tau[sl]
        if dk:
            t += q[sl] * dk
        low, high = min(low, float(t.min())), max(high, float(t.max()))
    if not (low >= 0.0 and high <= 1.0 / k):
        return None
    return k, tau, c * s3, q, exact


def _weighted_squares(w: np.ndarray, tau: np.ndarray) -> float:
    """``w @ tau^2`` to about an ulp: the products of each block of ``_BLOCK`` atoms summed by
    BLAS, the blocks' sums exactly (``math.fsum``). One BLAS dot over every atom, summed on
    one thread, errs by about ``_BUDGET_TOL`` itself at n = 1e6 (environment data without
    merging, ``kappa = 1``: ``1.1e-14`` relative against the exact sum's ``-1.7e-16``, which
    sent the third evaluation's exact answer to :func:`solve_lambda`: 18 passes more)."""
    return math.fsum(float(w[lo:lo + _BLOCK] @ np.square(tau[lo:lo + _BLOCK]))
                     for lo in range(0, tau.size, _BLOCK))


def _signed(m: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The margins of the chosen branches, ``-m`` on the flipped atoms ``idx``: ``m`` itself
    without flips, else a copy negated on the (few) flipped atoms (``np.where`` over every
    atom took several times as long at n = 1e6)."""
    if idx.size == 0:
        return m
    mm = m.copy()
    mm[idx] = -m[idx]
    return mm


class _Signed:
    """:func:`_signed` for one pattern after another (the rounds of one :func:`_fast_pair`):
    one copy of the margins, updated in place on the atoms whose flag changed (a new copy
    each round took about 0.15 pass at n = 1e6). Each call's answer is valid until the
    next call."""

    def __init__(self, m: np.ndarray) -> None:
        self.m, self.mm, self.flips = m, m, np.zeros(0, dtype=np.intp)

    def __call__(self, flips: np.ndarray) -> np.ndarray:
        """The signed margins of the pattern ``flips`` (the flipped atoms, sorted)."""
        if self.mm is self.m:  # no copy yet (no flips so far)
            self.mm = _signed(self.m, flips)
            self.flips = flips
            return self.mm
        back = np.setdiff1d(self.flips, flips, assume_unique=True)
        new = np.setdiff1d(flips, self.flips, assume_unique=True)
        self.mm[back] = self.m[back]
        self.mm[new] = -self.m[new]
        self.flips = flips
        return self.mm


def _fast_moves(m: np.ndarray, flip: np.ndarray, tau: np.ndarray, k: float, b: float,
                kappa: float, flips: np.ndarray | None = None,
                squares: tuple[np.ndarray, float] | None = None) -> Moves:
    """:class:`Moves` of the roots ``tau`` at ``k = 2 lambda / b^2 > 1/4`` (one maximiser per
    atom and branch: the warm starts are the moves themselves; :class:`_FastMoves`);
    ``flips``: ``flatnonzero(flip)`` where known; ``squares``: ``(w, w @ tau^2)`` where
    known."""
    return _FastMoves(k, tau, flip, m, b, kappa, flips=flips, squares=squares)


def _mask(n: int, idx: np.ndarray) -> np.ndarray:
    """The flags of ``n`` atoms, set on the atoms ``idx``."""
    out = np.zeros(n, dtype=bool)
    out[idx] = True
    return out


def _branch_roots(m: np.ndarray, flips: np.ndarray, tau: np.ndarray | None,
                  last: np.ndarray | None, k: float, fresh: bool = False) -> np.ndarray | None:
    """Warm starts of :func:`_joint_sweeps` for the pattern ``flips`` (the flipped atoms,
    sorted) at ``k > 1/4`` from the roots ``tau`` of the pattern ``last`` (likewise): the
    atoms whose branch changed get their root at ``k`` (:func:`best_move` on them alone;
    with ``tau = 0`` instead, these few atoms took the whole sweep to five or more sweeps).
    ``tau`` is modified in place if ``fresh``."""
    if tau is None or last is None:
        return tau
    changed = np.setxor1d(last, flips, assume_unique=True)
    if changed.size:
        tau = tau if fresh else tau.copy()
        mc = m[changed]
        now = np.isin(changed, flips, assume_unique=True)  # flipped now (else before)
        tau[changed] = best_move(np.where(now, -mc, mc), k, values=False).tau
    return tau


def _predicted_roots(mv: Moves, m: np.ndarray, k: float, change: bool = False):
    """The roots of the moves ``mv`` (of a point with ``k_0 = 2 lambda / b^2 > 1/4``) moved to
    first order to the margins ``m`` and ``k`` on their own branches: ``tau + (sigma' dmm +
    tau dk) / psi'``, ``dmm`` the change of the signed margins, ``dk = k - k_0``, and
    ``sigma' = s - s^2``, ``psi' = sigma' - k_0`` at the old root (``s = k_0 tau`` there, the
    stationarity). The error is of second order in the changes (a step of Newton on
    :func:`_joint_sweeps` starting from it: one sweep fewer than from ``tau`` itself); in
    blocks of ``_BLOCK`` atoms, clipped to ``[0, 1/k]``; a copy of ``mv.tau`` where the shapes
    differ (always a new array: the joint sweeps work in it). With ``change``, ``(roots,
    max |change|)``, the largest first-order change (``inf`` for the copy): the error of
    the prediction is about ``1.6`` to ``3`` times its square (measured at n = 1e6, d = 8)."""
    k0 = 2.0 * mv.lam / mv.b**2
    if mv.tau.shape != m.shape or not k0 > 0.25:
        return (mv.tau.copy(), math.inf) if change else mv.tau.copy()
    dk = k - k0
    out = np.empty_like(mv.tau)
    top = 0.0
    for lo in range(0, m.size, _BLOCK):
        sl = slice(lo, lo + _BLOCK)
        t = mv.tau[sl]
        s = np.multiply(t, k0)
        sp = s * s
        np.subtract(s, sp, out=sp)  # sigmoid' at the old root
        dmm = np.subtract(m[sl], mv.m[sl], out=s)
        dmm *= sp
        sp -= k0  # psi' < 0: k0 > 1/4 >= sigmoid'
        step = np.multiply(t, dk, out=out[sl])
        step += dmm
        step /= sp
        if change:
            top = max(top, float(step.max()), -float(step.min()))
        step += t
        np.clip(step, 0.0, 1.0 / k, out=step)  # in the block, in cache
    flips = mv.flips
    if flips.size:  # the flipped atoms' signed margins move by -dm: redone on their own
        t = mv.tau[flips]
        s = k0 * t
        sp = s - s * s
        step = (sp * (mv.m[flips] - m[flips]) + t * dk) / (sp - k0)
        top = max(top, float(np.abs(step).max()))
        out[flips] = np.clip(t + step, 0.0, 1.0 / k)
    return (out, top) if change else out


#: :func:`_fast_pair`'s first round takes Newton's step on the budget alone from the predicted
#: roots (:func:`_budget_step`) instead of a joint solve where their largest first-order change
#: is at most this: their error, about ``3 change^2`` (``3e-6``), is then about that of the
#: loose joint solve's roots (a few ``1e-6``), and ``k`` is right to the square of the guess's
#: error (the benchmark's third evaluation: ``6e-7`` relative from a guess ``3e-4`` off; the
#: switch points are ``1e-4`` apart at n = 1e6), enough to choose the flips and locate the
#: switch, whose solve at fixed ``k`` resolves the roots (one sweep from below ``7e-7``, two from
#: ``3e-6``; a switch located wrongly is caught by its exact check). Measured at n = 1e6, d = 8
#: (Gaussian and environment data, seeds 0 and 1): the third evaluation's change ``2.4e-4`` to
#: ``5.5e-4`` (error ``1.8e-7`` to ``4.8e-7``), the second's ``1.2e-2`` to ``2.3e-2`` (error
#: ``4e-4`` to ``1.2e-3``: a joint solve). The cold first round (``_table_start``: the grid's
#: ``k`` within the grid's error, about ``1e-6``, of the exact one) takes the grid's ``k`` and
#: slope as such a step's where the grid's Newton converged and the pattern chosen at its ``k``
#: is not the round's own: that round's pattern is then not the answer, and its loose joint
#: solve (a sweep and its last pass) only placed the next flip choice (Gaussian, ``kappa =
#: 1``: the first evaluation's joint solve replaced by the step, and then the step, from the
#: interpolated roots, by the grid's, its roots interpolated only where read, at the switch's
#: ``k``); where the pattern chooses itself there (environment data without merging) the
#: joint solve is kept, since the answer then resolves it exactly anyway (with the step
#: before it, 0.65 pass more).
_PREDICTED_CHANGE = 1e-3


def _budget_step(mm: np.ndarray, w: np.ndarray, b: float, budget: float, k: float,
                 tau: np.ndarray) -> tuple[float, np.ndarray, float, np.ndarray, bool] | None:
    """:func:`_joint_sweeps`' answer from roots ``tau`` close to the exact ones at ``k > 1/4``
    (:func:`_predicted_roots`): Newton's step on the budget ``E tau^2 / b^2 = budget`` alone,
    ``dk = (budget - S) / S'``, ``S' = 2 E tau dtau/dk / b^2``, ``dtau / dk = tau / psi'``
    (``psi' = sigma' - k``, ``sigma' = s - s^2`` at ``s = k tau``, the stationarity the roots
    nearly meet); ``(k + dk, None, S', dtau / dk, False)``, or ``None`` where ``k`` leaves
    ``(1/4, inf)``. The roots are not moved: ``tau + dtau/dk dk``, and any move of ``k`` after
    it, is one move where they are read (:func:`_roots_along_k` from ``tau`` at ``k``: the
    step's own pass over the roots saved). One pass of eight operations per atom where a
    joint sweep takes about twenty and its last step."""
    n, c = mm.size, 2.0 / b**2
    q = np.empty(n)
    s2 = s3 = 0.0
    for lo in range(0, n, _BLOCK):
        sl = slice(lo, lo + _BLOCK)
        t = tau[sl]
        sg = np.multiply(t, k)
        sp = sg * sg
        np.subtract(sg, sp, out=sp)
        sp -= k  # psi' < 0: k > 1/4 >= sigma'
        qb = np.divide(t, sp, out=q[sl])
        wt = np.multiply(w[sl], t, out=sg)
        s2 += float(wt @ t)
        s3 += float(wt @ qb)
    if not s3 < 0:
        return None
    dk = (budget - s2 / b**2) / (c * s3)
    if not (math.isfinite(k + dk) and k + dk > 0.25):
        return None
    return k + dk, None, c * s3, q, False


#: Grid points of :func:`_table_roots` (linear interpolation leaves ``h^2 max |tau''| / 8`` for
#: a spacing ``h``: a few ``1e-6`` over margins 36 apart at ``k = 0.8``, ``3e-7`` at the
#: benchmark's ``k = 3``; the table costs about a quarter of a pass at n = 1e6).
_TABLE_POINTS = 4096
#: Newton steps of :func:`_table_start` on the grid's budget (quadratic from the subsample's
#: ``k``, a few per cent off: four or five; each costs a solve on the grid alone).
_TABLE_ITERS = 30
#: ... which stop once the step of ``k`` is below this (relative): far below the grid's own
#: error (``1e-6``), which the joint sweeps then remove.
_TABLE_TOL = 1e-12


#: Atoms per block of :func:`_table_start`'s deposit: each block's two ``np.bincount`` s fill
#: and add ``_TABLE_POINTS`` sums, which blocks of ``_BLOCK`` atoms paid 123 times a pass
#: (measured at n = 1e6: the deposit 4.4 ms in blocks of 2^15 atoms, 6.8 in blocks of 2^13;
#: three ``bincount`` s a block, as before, 6.7 to 8.5 ms).
_DEPOSIT_BLOCK = 1 << 15


class _Grid(NamedTuple):
    """A uniform grid of ``_TABLE_POINTS`` margins from ``lo``, ``inv`` points per unit."""

    lo: float
    inv: float
    points: np.ndarray


def _grid(mm: np.ndarray) -> _Grid | None:
    """The grid over ``[min mm, max mm]``, or ``None`` where that is not a finite interval."""
    lo, hi = float(mm.min()), float(mm.max())
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        return None
    return _Grid(lo, (_TABLE_POINTS - 1) / (hi - lo), np.linspace(lo, hi, _TABLE_POINTS))


def _grid_cells(grid: _Grid, mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The grid cell ``i`` of each margin of ``mm`` (a block) and its fraction of the step."""
    pos = np.subtract(mm, grid.lo)
    pos *= grid.inv
    i = pos.astype(np.intp)
    np.clip(i, 0, _TABLE_POINTS - 1, out=i)
    pos -= i
    return i, pos


def _table_roots(mm: np.ndarray, k: float, grid: _Grid | None = None) -> np.ndarray:
    """A cold start of :func:`_joint_sweeps` at ``k > 1/4``: the roots (:func:`best_move`) on a
    uniform grid of ``_TABLE_POINTS`` margins over ``[min mm, max mm]``, interpolated
    linearly to every atom (in blocks of ``_BLOCK``): from ``tau = 0`` the first sweep's
    step is about ``1/3``, from these a few ``1e-6``, one sweep fewer."""
    grid = _grid(mm) if grid is None else grid
    if grid is None:
        return np.zeros(mm.size)
    roots = best_move(grid.points, k, values=False).tau
    slope = np.append(np.diff(roots), 0.0)
    out = np.empty(mm.size)
    for a in range(0, mm.size, _BLOCK):
        sl = slice(a, a + _BLOCK)
        i, frac = _grid_cells(grid, mm[sl])
        frac *= slope[i]
        np.add(frac, roots[i], out=out[sl])
    return out


class _TableStart(NamedTuple):
    """:func:`_table_start`'s answer: ``k``, whether the grid's Newton converged
    (``solved``: ``k`` is then the grid's), the grid's budget slope ``dS/dk`` at ``k`` (``2
    sum_j W_j tau_j dtau_j / dk / b^2``) and the grid (``None`` where the margins span no
    finite interval)."""

    k: float
    solved: bool
    slope: float
    grid: _Grid | None

    def roots(self, mm: np.ndarray, k: float) -> np.ndarray:
        """:func:`_table_roots` of the margins ``mm`` at ``k`` on the grid (a new array;
        ``tau = 0`` without a grid)."""
        return np.zeros(mm.size) if self.grid is None else _table_roots(mm, k, self.grid)


def _table_start(mm: np.ndarray, w: np.ndarray, b: float, budget: float,
                 k: float) -> _TableStart:
    """A cold start of :func:`_joint_sweeps` (``k > 1/4``) with its ``k`` too: the weights
    deposited linearly on :func:`_table_roots`' grid (``W_j``, one pass over the margins),
    ``E tau^2 / b^2 = budget`` solved on the grid (``sum_j W_j tau_j(k)^2``, Newton on ``k``
    with ``dtau_j / dk = tau_j / psi'_j``, from ``k``); the roots at that ``k``, interpolated,
    are :meth:`_TableStart.roots` (an ``n``-vector, formed only where read). The grid's ``k``
    is off by the interpolation's error (``1e-6``), not by the subsample's (a few per cent):
    the joint solve from it takes one sweep where it took three. Where the grid's Newton
    fails (``k`` leaves ``(1/4, inf)``, no convergence), the given ``k``."""
    grid = _grid(mm)
    if grid is None:
        return _TableStart(k, False, math.nan, None)
    mass, moment = np.zeros(_TABLE_POINTS), np.zeros(_TABLE_POINTS)  # per cell: W, W f
    for a in range(0, mm.size, _DEPOSIT_BLOCK):
        sl = slice(a, a + _DEPOSIT_BLOCK)
        i, frac = _grid_cells(grid, mm[sl])
        frac *= w[sl]  # w f to the cell's right end, w (1 - f) to its left
        mass += np.bincount(i, w[sl], minlength=_TABLE_POINTS)
        moment += np.bincount(i, frac, minlength=_TABLE_POINTS)
    mass -= moment
    mass[1:] += moment[:-1]  # the last cell (the grid's end) has f = 0
    kk, start = k, None
    for _ in range(_TABLE_ITERS):
        mv = best_move(grid.points, kk, start, values=False)
        tau, start = mv.tau, mv.roots
        s = kk * tau  # sigmoid(tau - m) at the root
        dtau = tau / (s - s * s - kk)
        slope = 2.0 * float(mass @ (tau * dtau)) / b**2
        step = (float(mass @ (tau * tau)) / b**2 - budget) / slope
        kk -= step
        if not (math.isfinite(kk) and kk > 0.25):
            return _TableStart(k, False, math.nan, grid)
        if abs(step) <= _TABLE_TOL * kk:
            return _TableStart(kk, True, slope, grid)
    return _TableStart(k, False, math.nan, grid)


def _flipped_too(mv: Moves, k: float, idx: np.ndarray, tau_idx: np.ndarray) -> Moves:
    """The moves ``mv`` (of :func:`_fast_moves` at ``k``) with the atoms ``idx`` flipped too,
    their flipped roots ``tau_idx``."""
    flip, tau = mv.flip.copy(), mv.tau.copy()
    flip[idx], tau[idx] = True, tau_idx
    return _FastMoves(k, tau, flip, mv.m, mv.b, mv.kappa, mv.lam,
                      flips=np.union1d(mv.flips, idx))


#: :class:`_Pool` takes its candidates at this fraction of the first ``lambda`` it is asked
#: about: the ``lambda`` of one evaluation's flip choices stay within a few per cent of its
#: first guess (the benchmark's first evaluation moved ``lambda*`` by 2% from the subsample's).
_POOL_LOW = 0.9


class _Pool:
    """The atoms that can flip at any ``lambda >= low`` (the candidates' threshold ``lambda
    kappa - b^2 / (4 lambda)`` increases with ``lambda``, so they hold those of every larger
    ``lambda``): one scan of the margins for the several flip choices of an evaluation (each
    a scan of every atom before, about 1.3 ms at n = 1e6), taken again lower where a
    ``lambda`` falls below ``low``."""

    def __init__(self, m: np.ndarray, b: float, kappa: float) -> None:
        self.m, self.b, self.kappa = m, b, kappa
        self.low, self.atoms = math.inf, None

    def cover(self, lam: float) -> np.ndarray:
        """The candidates of ``_POOL_LOW lam`` (or of the lower ``lambda`` taken already;
        ``lam`` must exceed it by ``1e-9``, relative, far beyond the thresholds' rounding)."""
        if not lam > self.low * (1.0 + 1e-9):
            self.low = _POOL_LOW * lam
            self.atoms = np.flatnonzero(
                self.m > self.low * self.kappa - self.b**2 / (4.0 * self.low))
        return self.atoms


def _flip_set(m: np.ndarray, b: float, lam: float, kappa: float,
              pool: _Pool | None = None) -> np.ndarray:
    """The atoms (sorted) where flipping the label wins at ``lambda`` (``k >= 1/4``;
    :func:`_moves`'s rule on its candidates ``m > lambda kappa - b^2 / (4 lambda)``, the only
    atoms it can win on); ``pool``: the candidates of a smaller ``lambda`` (:class:`_Pool`),
    searched instead of every atom where it covers ``lam``. The flip patterns of one
    evaluation are these index arrays (a few hundred atoms at n = 1e6, Gaussian data, the
    pool under a thousand): the flags of every atom, their copies and comparisons, cost
    ``O(n)`` each, and are built once, for the moves of its answer."""
    if not math.isfinite(kappa):
        return np.zeros(0, dtype=np.intp)
    k = 2.0 * lam / b**2
    thr = lam * kappa - b**2 / (4.0 * lam)
    among = pool.cover(lam) if pool is not None else None
    cand = np.flatnonzero(m > thr) if among is None else among[m[among] > thr]
    if cand.size == 0:
        return cand
    (_, keep), (_, flipped) = _both_branches(m[cand], k)
    return cand[flipped - lam * kappa > keep]


def _both_branches(mc: np.ndarray, k: float) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """``(tau, value)`` of :func:`best_move` for the margins ``mc`` and for ``-mc`` (the
    unflipped and the flipped branch of a few candidate atoms), from one call on both (its
    answer is per atom: the same numbers as two calls). The flip choices' calls are on a few
    hundred atoms, where a call's own overhead, about 0.1 ms, was most of the 16 ms that
    ``best_move`` took in the benchmark's solve at n = 1e6 (Gaussian, ``kappa = 1``)."""
    both = best_move(np.concatenate((mc, -mc)), k)
    n = mc.size
    return (both.tau[:n], both.value[:n]), (both.tau[n:], both.value[n:])


def _gains(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether the pattern ``a`` flips an atom that ``b`` does not (sorted flipped atoms)."""
    return np.setdiff1d(a, b, assume_unique=True).size > 0


#: Rounds of :func:`_fast_pair`'s search over the flip patterns (each one joint solve: one
#: where no atom switches near ``lambda*``, a few bisections of the patterns where many do).
_FLIP_ROUNDS = 12


def _fast_pair(m: np.ndarray, w: np.ndarray, b: float, r2: float, kappa: float, lam: float,
               start: Moves | None) -> Bracket | None:
    """:func:`solve_lambda`'s answer where ``k = 2 lambda / b^2 > 1/4`` near ``lam`` (each
    atom has one maximiser per branch), by :func:`_joint_sweeps`, or ``None``.

    With ``kappa = inf`` one joint solve. With finite ``kappa`` the flip pattern (which
    atoms flip, :func:`_flip_set`) is held fixed in each joint solve and chosen again at
    its solution ``lambda_P``: a pattern that chooses itself is the answer (``E cost =
    rho^2`` at a point). Flips win at small ``lambda`` and cost more, so the pattern chosen
    at ``lambda`` shrinks as ``lambda`` grows and ``E cost`` decreases: if the pattern
    chosen at ``lambda_P`` has more flips, ``E cost > rho^2`` there (``lambda* >
    lambda_P``), if fewer, ``E cost < rho^2``. These bracket ``lambda*``; the next pattern
    is the one chosen at the bracket's geometric midpoint (the first, before a bracket: the
    pattern chosen at ``lambda_P``), until the patterns chosen at the bracket's ends differ
    on atoms of one margin only. Then at their switch point ``s`` (:func:`_switch_points`)
    the roots of every atom are solved (``k`` fixed): where ``E cost - rho^2`` is ``> 0``
    with those atoms flipped and ``<= 0`` without, the bracket's two ends are these moves
    at ``s``; otherwise the root is on one side, with that side's pattern. (A pattern chosen
    at ``lambda_c`` also tells the side of ``lambda_c``: ``E cost > rho^2`` there iff its
    root ``lambda_P > lambda_c``.) Anything else
    (a pattern that gains and loses flips, no answer in ``_FLIP_ROUNDS``) gives ``None``.
    ``start``: the moves of an earlier point (their roots are the warm start where the
    branch is the same, else ``tau = 0``).
    """
    k = 2.0 * lam / b**2
    if not k > 0.25:
        return None
    pool = _Pool(m, b, kappa)  # one scan of the margins for the evaluation's flip choices
    signed = _Signed(m)  # and one copy of them for its patterns' signed margins
    flip, chosen = _flip_set(m, b, lam, kappa, pool), lam  # the pattern, where chosen
    tau = last = None
    change = math.inf  # the predicted roots' largest first-order change (_PREDICTED_CHANGE)
    if start is not None:
        (tau, change), last = _predicted_roots(start, m, k, change=True), start.flips
    lo = hi = None  # (lambda, the pattern chosen there) with E cost > rho^2, resp. < rho^2
    later = None  # the first round's roots at a given k, where that round left them unformed

    def along(at: float) -> np.ndarray:
        """The last solve's roots (pattern ``last``) moved to ``k = at``, a new array: the
        first round's ``later`` where it left them unformed, else :func:`_roots_along_k`."""
        return later(at) if tau is None else _roots_along_k(tau, dtau, k, at)

    def bound(at, pattern, above):  # E cost > rho^2 at ``at`` if ``above``, else < rho^2
        nonlocal lo, hi
        if above and (lo is None or at > lo[0]):
            lo = (at, pattern)
        elif not above and (hi is None or at < hi[0]):
            hi = (at, pattern)

    for _ in range(_FLIP_ROUNDS):
        price = kappa * float(w[flip].sum()) if flip.size else 0.0
        if not r2 - price > 0:
            return None
        if tau is None and later is not None:  # the first round's roots, read at last
            tau = along(k)
        mm = signed(flip)
        if tau is None:  # cold: k on the grid's budget too
            table = _table_start(mm, w, b, r2 - price, k)
            k = table.k
            # the grid's k is within its own error (1e-6) of this pattern's root: where the
            # pattern chosen there differs, this one is not the answer, and the grid's k and
            # slope place the next flip choice and the switch (_PREDICTED_CHANGE) as a budget
            # step from the interpolated roots did; the roots are interpolated where read,
            # at the switch's k (one pass, where the roots at the grid's k, the step and the
            # roots moved from them to the switch took three)
            defer = table.solved and math.isfinite(kappa) and not np.array_equal(
                _flip_set(m, b, 0.5 * k * b**2, kappa, pool), flip)
            out = (k, None, table.slope, None, False) if defer else None
            tau0 = None if defer else table.roots(mm, k)
            if defer:

                def later(at, table=table, pattern=flip):
                    return table.roots(signed(pattern), at)
        else:
            tau0 = _branch_roots(m, flip, tau, last, k, fresh=True)  # tau is not read again
            step = change <= _PREDICTED_CHANGE and math.isfinite(kappa)  # the first round only
            out = _budget_step(mm, w, b, r2 - price, k, tau0) if step else None
            if out is not None:  # the step's move of the roots, with the next, where read
                later = functools.partial(_roots_along_k, tau0, out[3], k)
        change = math.inf
        if out is None:
            # loose only where flips are chosen at its solution (kappa = inf: no flips, and
            # the loose solve would be resumed at once: its last pass and call for nothing)
            out = _joint_sweeps(mm, w, b, r2 - price, k, tau0, loose=math.isfinite(kappa))
        if out is None:
            return None
        k, tau, slope, dtau, exact = out
        last, lam = flip, 0.5 * k * b**2
        new = _flip_set(m, b, lam, kappa, pool)
        gained, lost = _gains(new, flip), _gains(flip, new)
        if not (gained or lost):  # the answer: its roots and k resolved to the exact test
            if not exact:  # k moved (by about 1e-11): the pattern chosen again there
                out = _joint_sweeps(mm, w, b, r2 - price, k, along(k) if tau is None else tau)
                if out is None or not np.array_equal(
                        _flip_set(m, b, 0.5 * out[0] * b**2, kappa, pool), flip):
                    return None
                k, tau = out[:2]
            if not abs(_weighted_squares(w, tau) / b**2 + price - r2) <= _BUDGET_TOL * r2:
                return None  # E cost of these moves
            mv = _fast_moves(m, _mask(m.size, flip), tau, k, b, kappa, flips=flip)
            return Bracket(mv, mv)
        if gained and lost:
            return None
        bound(lam, new, gained)  # the pattern chosen at lambda_P adds or removes flips
        if lam != chosen:  # E cost at ``chosen`` (its own pattern) is above rho^2 iff
            bound(chosen, flip, lam > chosen)  # that pattern's root lies beyond it
        ends = _model_ends(m, w, b, kappa, lam, slope * 2.0 / b**2, flip, lo, hi, pool)
        if ends is not None:  # the pattern (or the switch) the model predicts at lambda*
            (a, p_a), (c, p_c) = ends
            idx = np.setdiff1d(p_a, p_c, assume_unique=True)
            if idx.size == 0:
                flip, chosen = p_a, a
                continue
            if np.unique(m[idx]).size == 1 and not _gains(p_c, p_a):
                out = _switch_bracket(m, w, b, r2, kappa, ends[0], ends[1], idx, along,
                                      last, signed)
                if isinstance(out, Bracket):
                    return out
                if out is not None:
                    flip, chosen = out
                    continue
        if lo is None or hi is None:
            flip, chosen = new, lam
            continue
        if not lo[0] < hi[0] or _gains(hi[1], lo[1]):
            return None
        idx = np.setdiff1d(lo[1], hi[1], assume_unique=True)  # the atoms switching in it
        if idx.size == 0:
            flip, chosen = lo[1], lo[0]  # one pattern across the bracket: its root
            continue
        if np.unique(m[idx]).size > 1:
            chosen = math.sqrt(lo[0] * hi[0])
            flip = _flip_set(m, b, chosen, kappa, pool)
            continue
        out = _switch_bracket(m, w, b, r2, kappa, lo, hi, idx, along, last, signed)
        if isinstance(out, Bracket):
            return out
        if out is None:
            return None
        flip, chosen = out  # the root is on one side of the switch, with that side's pattern
    return None


#: Half-width of the window in ``log lambda`` in which :func:`_model_ends` looks for the root
#: before a bracket is known (a jump of ``E cost`` moves ``lambda*`` by about its relative
#: size, ``1e-3`` here; ``5%`` covers the first steps of Newton on ``F``).
_MODEL_WINDOW = 0.05
#: Bisections of :func:`_model_ends` (from 10% to ``1e-15`` relative: about 50).
_MODEL_ITERS = 60


def _model_ends(m, w, b, kappa, lam, slope, flip, lo, hi, pool: _Pool | None = None):
    """Where a model of ``E cost - rho^2`` crosses 0: ``((a, P_a), (c, P_c))`` with the model
    ``> 0`` at ``a`` and ``<= 0`` at ``c``, ``P`` the patterns chosen there, narrowed until
    they differ on atoms of one margin at most; or ``None``.

    The model is that of :func:`_fast_pair`'s last joint solve (pattern ``flip``, budget met
    at ``lam``): the linearisation ``slope (lambda - lam)`` of its ``E cost`` plus, exactly,
    the cost change of every candidate atom whose choice at ``lambda`` differs from
    ``flip`` (the roots of both branches on the candidates alone: ``O(|candidates|)`` per
    point). Its prediction is checked by the next joint solve (or :func:`_switch_bracket`).
    The bisection works on the candidates' choices alone (outside them every pattern is
    ``flip``; the two patterns are built once, at the answer: the flags' copy and
    comparison over every atom at each point took about 4 ms of the 5 a call took at n =
    1e6); ``pool``: the evaluation's :class:`_Pool`, searched for the candidates. Patterns
    are the sorted flipped atoms (:func:`_flip_set`).
    """
    a = lam * math.exp(-_MODEL_WINDOW) if lo is None else lo[0]
    c = lam * math.exp(_MODEL_WINDOW) if hi is None else hi[0]
    if not (0 < a < c and slope < 0):
        return None
    thr = a * kappa - b**2 / (4.0 * a)  # the candidates of a: a superset on [a, c]
    among = pool.cover(a) if pool is not None else None
    cand = np.flatnonzero(m > thr) if among is None else among[m[among] > thr]
    mc, wc, fc = m[cand], w[cand], np.isin(cand, flip, assume_unique=True)

    def model(x):  # the model at x and the candidates' choices there
        k = 2.0 * x / b**2
        (t_keep, v_keep), (t_flip, v_flip) = _both_branches(mc, k)
        chose = v_flip - x * kappa > v_keep
        change = t_flip**2 / b**2 + kappa - t_keep**2 / b**2  # flipped less kept
        jumps = float(wc @ np.where(chose == fc, 0.0, np.where(chose, change, -change)))
        return slope * (x - lam) + jumps, chose

    def pattern(chose):  # the pattern of every atom: flip's outside the candidates
        return np.union1d(np.setdiff1d(flip, cand, assume_unique=True), cand[chose])

    (g_a, p_a), (g_c, p_c) = model(a), model(c)
    if not g_a > 0 >= g_c:
        return None
    for _ in range(_MODEL_ITERS):
        idx = np.flatnonzero(p_a != p_c)
        if idx.size == 0 or np.unique(mc[idx]).size == 1:
            return (a, pattern(p_a)), (c, pattern(p_c))
        mid = math.sqrt(a * c)
        if not a < mid < c:
            return None
        g, p = model(mid)
        if g > 0:
            a, p_a = mid, p
        else:
            c, p_c = mid, p
    return None


def _switch_bracket(m, w, b, r2, kappa, lo, hi, idx, along: Callable[[float], np.ndarray],
                    last: np.ndarray, signed: _Signed):
    """:func:`_fast_pair` at the switch point ``s`` of the atoms ``idx`` (one margin) inside
    the bracket ``lo``, ``hi`` (pairs of ``lambda`` and the pattern chosen there): the
    :class:`Bracket` of the moves at ``s`` on both sides, the side that holds the root as
    ``(pattern, lambda)``, or ``None``. ``along``: the roots of the last joint solve (of the
    pattern ``last``) moved to a ``k``, a new array: to first order (``tau + dtau/dk (k_s -
    k)``, an error of order ``(k_s - k)^2``: one sweep of Newton then resolves them), to
    second order (:func:`_roots_along_k`) where the first order's error may take a second
    sweep there, or interpolated at ``k_s`` on the cold round's grid (:class:`_TableStart`);
    they are the warm start of the roots at ``s``. ``signed``: the caller's
    :class:`_Signed`."""
    s = _flip_point(m[idx[0]], b, kappa, lo[0], hi[0])
    if not lo[0] < s < hi[0]:
        return None
    k = 2.0 * s / b**2
    flip = hi[1]
    tau = along(k)
    out = _moves_at_switch(m, w, b, r2, kappa, k, flip, idx,
                           _branch_roots(m, flip, tau, last, k, fresh=True), signed(flip))
    if out is None:
        return None
    if isinstance(out, Bracket):
        return out
    return lo[::-1] if out < 0 else hi[::-1]


#: :func:`_roots_along_k` adds the second-order term where the first order's error bound
#: ``dk^2 max |tau''| / 2`` exceeds this: a start within it takes one sweep of Newton at fixed
#: ``k`` (:func:`_fixed_sweeps`' test passes after a step up to ``sqrt(2 _FAST_ERR |psi'| /
#: _PSI2_MAX)``, about ``7e-7`` at ``k = 3``), with room for the joint solve's own error (a few
#: ``1e-7``: it stops at a step of ``_LOOSE_STEP``). Measured at n = 1e6 (Gaussian, ``kappa =
#: 1``): the first evaluation's move ``dk = 2e-2`` left ``1.4e-5`` to first order (two sweeps),
#: ``9e-8`` to second (one); the later ones' ``dk`` of ``1e-3`` and ``6e-4`` left ``7e-7``
#: (the joint solve's) and ``2e-9`` to first order.
_SECOND_ORDER = 1e-7


def _roots_along_k(tau: np.ndarray, q: np.ndarray, k0: float, k: float) -> np.ndarray:
    """The roots ``tau`` of ``psi = sigmoid(tau - mm) - k_0 tau`` (``k_0 > 1/4``) moved to ``k``:
    ``tau + tau' dk`` (``tau' = q = tau / psi'``, :func:`_joint_sweeps`' ``dtau / dk``), plus
    ``tau'' dk^2 / 2`` where its bound says it matters (``_SECOND_ORDER``), a new array.

    Differentiating ``psi(tau(k), k) = 0`` twice: ``tau'' = (2 tau' - sigma'' tau'^2) / psi'``
    with ``sigma = k_0 tau`` (the stationarity), ``sigma' = sigma - sigma^2``, ``sigma'' =
    sigma' (1 - 2 sigma)``, ``psi' = sigma' - k_0``. Bound: ``tau <= 1 / k_0``, ``|psi'| >= k_0 -
    1/4``, so ``|tau'| <= Q = 1 / (k_0 (k_0 - 1/4))`` and ``|tau''| <= (2 Q + _PSI2_MAX Q^2) /
    (k_0 - 1/4)``. In blocks of ``_BLOCK`` atoms."""
    dk = k - k0
    c = k0 - 0.25
    big_q = 1.0 / (k0 * c)
    if not 0.5 * dk * dk * (2.0 * big_q + _PSI2_MAX * big_q**2) / c > _SECOND_ORDER:
        out = np.multiply(q, dk)  # tau + q dk in one new array (no temporary)
        out += tau
        return out
    half = 0.5 * dk * dk
    out = np.empty_like(tau)
    for lo in range(0, tau.size, _BLOCK):
        sl = slice(lo, lo + _BLOCK)
        t, qb = tau[sl], q[sl]
        sg = np.multiply(t, k0)
        sp = sg * sg
        np.subtract(sg, sp, out=sp)  # sigma'
        sg *= -2.0
        sg += 1.0
        sg *= sp  # sigma''
        sp -= k0  # psi'
        sg *= qb
        sg *= qb
        np.subtract(qb, sg, out=sg)
        sg += qb  # 2 tau' - sigma'' tau'^2
        sg /= sp
        sg *= half
        o = np.multiply(qb, dk, out=out[sl])
        o += t
        o += sg
    return out


def _flip_point(m_i: float, b: float, kappa: float, a: float, c: float,
                maybe_none: bool = False) -> float:
    """The ``lambda`` in ``[a, c]`` (``2 lambda / b^2 > 1/4``) at which flipping an atom of
    margin ``m_i`` stops winning (:func:`_switch_points` on its two branches); with
    ``maybe_none``, ``nan`` where one branch wins on the whole interval."""
    k_mid = math.sqrt(a * c) * 2.0 / b**2
    mi = np.array([float(m_i)])

    def side(flipped):  # the atom's move on one branch, as _switch_points reads it
        mm = -mi if flipped else mi
        right = (mm < 0) | (0.5 - k_mid * mm >= 0)
        return Moves(0.0, mm, np.full(1, flipped), mm, None, right, mi, b, kappa)

    pts, _ = _switch_points(mi, b, kappa, side(True), side(False), np.zeros(1, int), (a, c),
                            maybe_none=maybe_none)
    return float(pts[0])


def _moves_at_switch(m, w, b, r2, kappa, k, flip, idx, tau0, mm, t_idx=None):
    """The moves at ``k = 2 s / b^2`` with the flips ``flip`` (``after``) and with the atoms
    ``idx`` flipped too (``before``), their roots solved at fixed ``k`` from ``tau0``: their
    :class:`_SwitchBracket` where ``E cost - rho^2`` is ``> 0`` before and ``<= 0`` after
    (``lambda* = s``), else ``-1`` (the root is below ``s``) or ``1`` (above); ``None`` where
    the solve fails. ``flip``: the flipped atoms (sorted); ``mm``: ``_signed(m, flip)``;
    ``t_idx``: the flipped roots of the atoms ``idx`` at ``k`` where known."""
    out = _fixed_sweeps(mm, k, tau0, w)
    if out is None:
        return None
    tau, squares = out
    after = _fast_moves(m, _mask(m.size, flip), tau, k, b, kappa, flips=flip,
                        squares=(w, squares))
    if t_idx is None:
        t_idx = best_move(-m[idx], k).tau
    pair = _SwitchBracket(after, k, idx, t_idx)
    g_after = after.expected_cost(w) - r2
    g_before = g_after + float(w[idx] @ (pair.cost_lo - after.cost_at(idx)))
    if g_before > 0 >= g_after:
        return pair
    return -1 if g_before <= 0 else 1


#: :func:`_switch_again` is tried where the first-order guess of ``lambda*`` is this close
#: (relative) to the previous point's: the spacing of the atoms' switch points at n = 1e6
#: (Gaussian benchmark: Newton's last step moved ``lambda*`` by ``1e-6`` and kept its switching
#: atom, the steps before by ``7e-4`` and ``2e-2`` and changed it; a failed try costs a pass) ...
_AGAIN_GATE = 1e-4
#: ... and looks for that switch this far (relative) from the guess.
_AGAIN_WINDOW = 1e-3
#: ... and solves the roots there only where the first-order roots' ``E cost - rho^2`` is this
#: far (relative to ``rho^2``) inside the jump on both sides (their error is of second order
#: in the step: ``1e-8`` of ``rho^2`` at the benchmark's last step, the jump ``4e-4``).
_AGAIN_MARGIN = 1e-6


def _switch_again(m, w, b, r2, kappa, lam, old: _SwitchBracket) -> Bracket | None:
    """``lambda*`` at the switch of the atoms ``old.switch`` again (one margin, flipped below
    it): the previous point's answer, a :class:`_SwitchBracket`, at the margins ``m``.

    Late in Newton's run ``lambda*`` stays at the same atom's switch point ``s`` (where its
    share keeps the budget met) while ``delta`` moves. ``s`` is that atom's own scalar root
    (:func:`_flip_point`, near the guess ``lam``), the flips elsewhere are chosen at
    ``s (1 -+ _SWITCH_EPS)``, and the previous roots moved to first order to ``m`` and ``s``
    (:func:`_predicted_roots`) predict ``E cost`` on both sides: only where that prediction
    brackets ``rho^2`` by ``_AGAIN_MARGIN`` are the roots solved at fixed ``k`` (one sweep)
    and the bracket checked exactly (:func:`_moves_at_switch`). ``None`` otherwise (the
    switch moved to another atom, or ``lam`` is more than ``_AGAIN_GATE`` from the previous
    point's ``lambda*``: :func:`_fast_pair` from scratch)."""
    idx = old.switch
    if not abs(lam - old.hi.lam) <= _AGAIN_GATE * lam:
        return None
    if idx.size == 0 or old.hi.tau.shape != m.shape or np.unique(m[idx]).size != 1:
        return None
    if not (old.lo_at(idx)[1].all() and not old.hi.flip[idx].any()):
        return None
    s = _flip_point(m[idx[0]], b, kappa, lam * (1.0 - _AGAIN_WINDOW),
                    lam * (1.0 + _AGAIN_WINDOW), maybe_none=True)  # nan: none there
    k = 2.0 * s / b**2
    if not k > 0.25:  # also nan: no switch in the window
        return None
    pool = _Pool(m, b, kappa)
    lower = _flip_set(m, b, s * (1.0 - _SWITCH_EPS), kappa, pool)
    flip = _flip_set(m, b, s * (1.0 + _SWITCH_EPS), kappa, pool)
    if not np.array_equal(np.setxor1d(lower, flip, assume_unique=True), idx) or np.isin(
            idx, flip, assume_unique=True).any():
        return None
    tau = _branch_roots(m, flip, _predicted_roots(old.hi, m, k), old.hi.flips, k, fresh=True)
    after = float(w @ (tau * tau)) / b**2 + kappa * float(w[flip].sum()) - r2
    t_idx = best_move(-m[idx], k).tau
    jump = float(w[idx] @ ((t_idx**2 - tau[idx] ** 2) / b**2 + kappa))
    if not (after < -_AGAIN_MARGIN * r2 and after + jump > _AGAIN_MARGIN * r2):
        return None
    out = _moves_at_switch(m, w, b, r2, kappa, k, flip, idx, tau, _signed(m, flip), t_idx)
    return out if isinstance(out, Bracket) else None


def solve_lambda(m: np.ndarray, w: np.ndarray, b: float, rho: float, kappa: float,
                 lam0: float | None = None, start: MoveRoots | None = None,
                 jump: Bracket | None = None) -> Bracket:
    """Minimise ``G(lambda) = lambda rho^2 + E_P phi`` over ``lambda > 0`` (``b, rho > 0``).

    ``start`` warm-starts the per-atom roots. ``jump``, the result of an earlier search
    that ended at a jump of ``E cost`` within ``_JUMP_REUSE`` (relative) of ``lam0``, is
    tried first: the switch points of its switching atoms are recomputed near ``lam0`` and,
    if one is still there, ``G'`` is evaluated on both sides of it (two evaluations when
    ``lambda*`` is still at that jump).

    Returns
    -------
    Bracket
        The moves at the two ends ``lambda_lo <= lambda* <= lambda_hi`` of the final
        bracket (``lo is hi`` when ``E cost = rho^2`` was met at a single point);
        otherwise ``E cost`` jumps across ``lambda*`` and the caller mixes the moves
        of the atoms that switch between ``lo`` and ``hi``.
    """
    r2 = rho**2
    roots = start or None

    def g(lam: float) -> _Probe:
        nonlocal roots
        mv = _moves(m, b, lam, kappa, roots)
        roots = mv.roots
        return _Probe(mv, float(w @ mv.cost) - r2)

    lam = lam0 if lam0 is not None and lam0 > 0 else b / (2.0 * rho)
    lo = hi = None  # probes with g > 0 (lambda too small) and g <= 0
    last_side, prev, damp = 0, None, [1.0, 1.0]  # damp: Illinois factors of (lo, hi)
    width, since = math.inf, 0  # the bracket's width when last halved, and steps since then
    if (jump is not None and jump.hi is not jump.lo and lam0 is not None
            and abs(jump.hi.lam - lam0) <= _JUMP_REUSE * lam0):  # late Newton steps only
        a, c = jump.lo, jump.hi
        idx = np.flatnonzero(a.flip != c.flip)
        if 0 < np.unique(m[idx]).size <= _MAX_SWITCH:
            ends = (lam0 * (1 - _JUMP_WINDOW), lam0 * (1 + _JUMP_WINDOW))
            pts, _ = _switch_points(m, b, kappa, a, c, idx, ends, maybe_none=True)
            pts = pts[(pts > ends[0] * (1 + _JUMP_INSIDE)) & (pts < ends[1] * (1 - _JUMP_INSIDE))]
            if pts.size:  # the old switches are still near lam0
                s = float(np.median(pts))
                below, above = g(s * (1.0 - _SWITCH_EPS)), g(s * (1.0 + _SWITCH_EPS))
                if below.g > 0 >= above.g:
                    return Bracket(above.moves, below.moves)
                for probe in (below, above):
                    if probe.g > 0:
                        lo = probe
                    else:
                        hi = probe
                lam = math.sqrt(lo.moves.lam * hi.moves.lam) if lo and hi else (
                    lo or hi).moves.lam * (1.01 if lo else 0.99)
    if lo is None and hi is None and roots is not None and jump is not None:
        # from the previous point's moves: lambda* and every root together, then one probe
        joint = _joint_newton(m, w, b, r2, kappa, lam, jump.hi, roots)
        if joint is not None:
            lam, roots = joint
    for _ in range(_LAMBDA_ITERS):
        probe = g(lam)
        mv, gv = probe
        if gv > 0:
            lo = probe
        else:
            hi = probe
        if abs(gv) <= _BUDGET_TOL * r2:
            return Bracket(mv, mv)
        u = math.log(lam)
        llo = math.log(lo.moves.lam) if lo else -math.inf
        lhi = math.log(hi.moves.lam) if hi else math.inf
        if lo and hi and lhi - llo <= _BRACKET_TOL * max(1.0, abs(lhi)):
            break
        stalled = False  # the bracket not halved in _SECANT_PATIENCE steps: bisect
        if lo and hi:
            since += 1
            if lhi - llo <= 0.5 * width:
                width, since = lhi - llo, 0
            stalled = since > _SECANT_PATIENCE
            if stalled:
                width, since = lhi - llo, 0
        if lo and hi and lhi - llo < _JUMP_WIDTH:
            # With many atoms E cost has many small jumps (an atom switching branches);
            # rather than bisect onto one, locate the switches in the bracket exactly.
            narrowed = _bracket_jump(m, w, b, kappa, lo, hi, g)
            if narrowed is not None and narrowed.found is not None:
                return narrowed.found
            if narrowed is not None:
                lo, hi, lam = narrowed.lo, narrowed.hi, narrowed.lam
                if stalled:  # the model's root creeps towards one end
                    lam = math.sqrt(lo.moves.lam * hi.moves.lam)
                continue
        if lo and hi:
            # Illinois regula falsi on log E cost against log lambda: the secant sees the
            # small jumps of E cost (atoms switching branches) that the derivative misses.
            side = 1 if gv > 0 else -1
            if side == last_side:  # the same end moved twice: damp the other one
                damp[1 if side > 0 else 0] *= 0.5
            damp[0 if side > 0 else 1] = 1.0
            last_side = side
            h_lo = damp[0] * math.log1p(lo.g / r2)
            # E cost = 0 (no atom moves at lambda_hi): log E cost floored, still below the root
            h_hi = damp[1] * math.log(max(hi.g + r2, _TINY) / r2)
            nxt = llo + (lhi - llo) * h_lo / (h_lo - h_hi)
            if not llo < nxt < lhi or stalled:
                # bisection where the secant stalls (one end fixed beside a jump of E cost
                # far larger than rho^2: the other end creeps towards it)
                nxt = 0.5 * (llo + lhi)
        else:
            # log E cost against log lambda is nearly linear (E t*^2 ~ lambda^-2 for small
            # moves): a Newton step, then secant steps, until the root is bracketed.
            # E cost = 0 (no atom moves at this lambda, or rounding below 0): floored as in
            # the bracketed secant above, so that the step below shrinks lambda
            spent = max(gv + r2, _TINY)
            cost = math.log(spent)
            joint = None if prev is not None else _joint_newton(m, w, b, r2, kappa, lam, mv,
                                                                  roots)
            if joint is not None and abs(math.log(joint[0]) - u) <= _TRUST:
                # Newton on lambda and the roots from this probe's exact ones, branches fixed
                prev = _Secant(u, cost)
                lam, roots = joint
                continue
            if prev is None:
                slope = float(w @ _dcost_dlam(m, mv, b)) * lam / spent
            else:
                slope = (cost - prev.cost) / (u - prev.u) if u != prev.u else math.nan
            prev = _Secant(u, cost)
            nxt = u - (cost - math.log(r2)) / slope if slope < 0 else (
                u + _TRUST if gv > 0 else u - _TRUST)
            nxt = min(max(nxt, u - _TRUST), u + _TRUST)
        lam = math.exp(nxt)
    else:
        raise RuntimeError("Wasserstein p=2 dual search did not converge (status: max_iter)")
    # E cost jumps across lambda*: the caller mixes the moves of the switching atoms.
    return Bracket(hi.moves, lo.moves)


class _Secant(NamedTuple):
    """The last unbracketed point of the ``lambda*`` search: ``log lambda``, ``log E cost``."""

    u: float
    cost: float


# --- the inner evaluation of F ----------------------------------------------------------------

#: Two moves of one atom with ``tau`` closer than this (relative to ``1 + tau``) are the same.
_SAME_MOVE = 1e-7
#: Floor of ``D = 2 lambda - b^2 sigmoid'`` (``> 0`` at a strict local maximum).
_TINY = 1e-300
#: A first-order guess of ``lambda*`` along a step is used only above this fraction of the
#: last ``lambda*`` (a guess that far off means the linearisation broke down).
_GUESS_FLOOR = 0.5


@dataclass(frozen=True, eq=False)
class W2State:
    """Warm start of the ``lambda*`` search: the last ``lambda*``, the point ``at`` with its
    bracket ``pair`` (whose ``hi`` moves hold the per-atom roots, :attr:`roots`), and ``slope``,
    ``d lambda* / d delta = -G_ld / G_ll`` there (at a tie, of the ``hi`` moves); ``mixture``, a
    function returning the worst case's per-atom moves in pieces (:class:`Mixture` s, for
    :func:`certify`: the nominal atoms' moves, and the split atoms' other moves at a tie; built
    on first call, their concatenation, an ``O(n)`` copy, left to a reader of the worst case);
    ``value``, ``grad`` and ``primal``, ``F``, its gradient and ``E_{Q*} l`` at ``at`` (an
    evaluation there again without the Hessian, the worst case's, reuses them)."""

    lam: float | None = None
    at: np.ndarray | None = None
    pair: Bracket | None = None
    slope: np.ndarray | None = None
    mixture: Callable[[], tuple[Mixture, ...]] | None = None
    value: float | None = None
    grad: np.ndarray | None = None
    primal: float | None = None
    #: evaluations made from this point (Newton's trials along one step: a one-element
    #: counter, the state itself being frozen) and the heavily damped steps at ties in a row
    #: that led to it (see :data:`_KINK_STEPS`)
    trials: list = dataclasses.field(default_factory=lambda: [0])
    damped: int = 0

    @property
    def roots(self) -> MoveRoots | None:
        """The per-atom roots of the ``hi`` moves (read only by :func:`solve_lambda`: those
        of :func:`_fast_moves` are built then)."""
        return None if self.pair is None else self.pair.hi.roots

    def transfer(self) -> W2State:
        """The state to start another problem (a subsample's solution) with: ``lambda*``."""
        return W2State(lam=self.lam)


class Mixture(NamedTuple):
    """A distribution of moved atoms by per-atom scalars: atom ``k`` has weight ``q[k]``,
    comes from nominal atom ``src[k]``, is flipped where ``flip[k]`` and moved by ``t =
    tau[k] / b`` along ``-ytil' u`` (so ``a'_k = s_k a_src - beta t_k u``, ``s_k = -1`` if
    flipped): ``O(n)`` numbers instead of its ``n x d`` features."""

    q: np.ndarray
    src: np.ndarray
    tau: np.ndarray
    flip: np.ndarray


class W2Blocks(NamedTuple):
    """Derivatives of ``sum_k q_k V_k`` (see :func:`w2_blocks`)."""

    g_d: np.ndarray
    g_l: float
    h_dd: np.ndarray
    h_dl: np.ndarray
    h_ll: float


def w2_blocks(a, q, m, tau, flip, b, lam, beta, delta, dd_block: bool = True) -> W2Blocks:
    """Derivatives of ``sum_k q_k V_k`` for the Wasserstein p = 2 moves ``(tau_k, flip_k)``.

    ``V_k(delta, lambda) = softplus(tau_k - s_k m_k) - lambda t_k^2`` (``s_k = -1`` if
    flipped, ``t = tau / b``) is the envelope value of one local maximiser; with
    ``f(t; m, b, lambda) = softplus(b t - m) - lambda t^2`` its second derivatives are
    ``f_xy + f_xt f_ty / D``, ``D = 2 lambda - b^2 sigmoid'``, chained through
    ``m = a . delta`` and ``b = beta ||delta||``. The gradient in ``lambda`` is without
    ``rho^2``; ``dd_block=False`` skips the ``O(n d^2)`` block ``h_dd`` (``None``). Every
    ``tau_k`` must be a stationary point (``sigmoid(tau_k - s_k m_k) = 2 lambda tau_k / b^2``,
    which gives the sigmoid without an ``exp``). ``a``: the ``n x d`` rows or the
    :class:`~.core.Atoms` (their products then from ``x`` and ``factor``: W2 never builds
    the ``n x d`` copy :attr:`~.core.Atoms.a`, several passes of page faults at n = 1e6).
    """
    blk, h_dd, _ = _w2_terms(a, q, m, tau, flip, b, lam, beta, delta)
    return blk._replace(h_dd=h_dd() if dd_block else None)


def _w2_terms(a, q, m, tau, flip, b, lam, beta, delta, hessian: bool = True,
              value: bool = False, scaled: tuple[np.ndarray, float] | None = None
              ) -> tuple[W2Blocks, Callable | None, float | None]:
    """:func:`w2_blocks` without ``h_dd``, and a function returning ``h_dd`` (its ``O(n d^2)``
    Gram matrix is formed only when called; ``None`` without ``hessian``), and with ``value``
    ``sum_k q_k (softplus(tau_k - s_k m_k) - lambda t_k^2)`` (the flips' price not included;
    else ``None``).

    With ``s = k tau`` (``k = 2 lambda / b^2``: the stationarity ``sigmoid(tau - s m) = k
    tau``), ``sigma' = s - s^2``, ``D = 2 lambda - b^2 sigma'`` and ``A = q sigma' / D``,
    every term is one of two per-atom rows and three sums. With ``q = D q / D``: the
    envelope blocks' ``f_tm = -b sigma'``, ``f_tb = tau sigma' + s`` (``f_tl = -2 t``, ``t =
    tau / b``) give ``b A f_tb + q sigma' t = 2 k b A tau`` (the mixed row of ``h_dd``, a
    multiple of the ``h_dl`` row ``A t``), ``q sigma' + b^2 sigma'^2 q / D = 2 lambda A``
    (the Gram weights), and the sums ``E (q / D) f_tb t = b (S_A + k S_D)``, ``E (q sigma'
    t^2 + (q / D) f_tb^2) = b^2 (3 k S_A + k^2 S_D)`` from ``S_Q = sum q t^2`` (``E t^2``),
    ``S_D = sum (q / D) t^2`` and ``S_A = sum A t^2``: about 14 operations per atom (33 for
    the blocks term by term; ``t^2`` and ``E t^2`` rounded as there, so that the value and
    the gradient are the same to the last bit). The two ``O(n d)`` products with ``a`` are
    one product of a ``2 x _BLOCK`` matrix per block of atoms. ``scaled = (idx, c)``: the
    weights are ``q`` with the (sorted) atoms ``idx`` scaled by ``c``, in each block's copy
    of its weights (a tie's split: no ``n``-vector of weights, a copy of ``q`` per
    evaluation before; the same numbers)."""
    dn = float(np.linalg.norm(delta))
    u = delta / dn
    n = q.size
    prod = np.zeros((2, delta.size))
    s_q = s_d = s_a = total = 0.0
    c_mm = np.empty(n) if hessian else None
    inv_b, k, b2 = 1.0 / b, 2.0 * lam / b**2, b * b
    # in blocks of _BLOCK atoms: every per-atom temporary is a block (the memory target of
    # issue 9: the whole-array form kept eight n-vectors alive at once), in cache
    cuts = None if scaled is None else np.searchsorted(
        scaled[0], np.arange(0, n + _BLOCK, _BLOCK))
    for j, (lo, fb) in enumerate(_block_flips(flip)):  # fb: the block's flipped atoms
        sl = slice(lo, lo + _BLOCK)
        qb, tb = q[sl], tau[sl]
        if cuts is not None and cuts[j] < cuts[j + 1]:
            qb = qb.copy()
            qb[scaled[0][cuts[j]:cuts[j + 1]] - lo] *= scaled[1]
        if value:
            z = tb - m[sl]
            if fb.size:  # tau - s m = tau + m there
                z[fb] = tb[fb] + m[sl][fb]
            total += float(qb @ softplus(z))  # less lambda E t^2, after the loop
        rows = np.empty((2, qb.size))
        sg = np.multiply(tb, k, out=rows[1])  # sigmoid(tau - s m) at a stationary point
        sp = sg * sg
        np.subtract(sg, sp, out=sp)  # sigmoid', >= 0 (k tau rounds above 1 where sigmoid ~ 1)
        np.maximum(sp, 0.0, out=sp)
        np.multiply(qb, sg, out=rows[0])  # the gradient's row (sg is not read again)
        d = np.multiply(sp, -b2)
        d += 2.0 * lam
        np.maximum(d, _TINY, out=d)  # D > 0 at a strict local maximum
        qd = np.divide(qb, d, out=d)
        big_a = np.multiply(qd, sp, out=sp if c_mm is None else c_mm[sl])
        np.multiply(big_a, tb, out=rows[1])  # A tau: the h_dl row (times 1 / b)
        if fb.size:
            rows[:, fb] *= -1.0
        prod += _rows_at(rows, a, sl)
        tt = np.multiply(tb, inv_b, out=sp if c_mm is not None else None)  # t = tau / b
        tt *= tt
        s_q += float(qb @ tt)
        s_d += float(qd @ tt)
        s_a += float(big_a @ tt)
    bu = beta * u
    g_tt = s_q  # E t^2
    h_ll = s_d  # E (q / D) t^2
    hdl_t = b * (s_a + k * s_d)  # E (q / D) f_tb t
    total = total - lam * g_tt if value else None
    g_d = -prod[0] + (2.0 * lam * inv_b) * g_tt * bu  # sum q sg t = (2 lambda / b) E t^2
    h_dl = 2.0 * prod[1] - 2.0 * hdl_t * bu
    blk = W2Blocks(g_d, -g_tt, None, h_dl, 4.0 * h_ll)
    if not hessian:
        return blk, None, total
    g_tsg = (2.0 * lam * inv_b) * g_tt
    v_bb = b2 * (3.0 * k * s_a + k * k * s_d)
    p = -(4.0 * lam / b) * prod[1]

    def h_dd() -> np.ndarray:
        # weighted_hess reads only the atoms' ``a``; the weights 2 lambda A, the factor after
        gram = weighted_hess(a, c_mm) * (2.0 * lam)
        return (gram + np.outer(p, bu) + np.outer(bu, p) + v_bb * np.outer(bu, bu)
                + g_tsg * (beta / dn) * (np.eye(delta.size) - np.outer(u, u)))

    return blk, h_dd, total


def _scaled(w: np.ndarray, scaled: tuple[np.ndarray, float] | None,
            rows: np.ndarray | None = None) -> np.ndarray:
    """The weights ``w`` with the (sorted) atoms ``scaled[0]`` scaled by ``scaled[1]`` (a
    tie's split, :func:`_w2_terms`' ``scaled``): at the sorted atoms ``rows`` (a gather),
    else every atom (a copy; ``w`` itself without ``scaled``)."""
    if rows is None:
        if scaled is None:
            return w
        out = w.copy()
        out[scaled[0]] *= scaled[1]
        return out
    out = w[rows]
    if scaled is not None:
        out[np.isin(rows, scaled[0], assume_unique=True)] *= scaled[1]
    return out


def _rows_at(rows: np.ndarray, a: Atoms | np.ndarray, sl: slice) -> np.ndarray:
    """``rows @ a[sl]`` for the matrix ``a`` or the atoms ``a``: ``(rows factor) @ x`` until
    :attr:`~.core.Atoms.a` is built (W2 never builds it on its own path)."""
    if isinstance(a, Atoms):
        if a.built() is None:
            return (rows * a.factor[sl]) @ a.x[sl]
        a = a.built()
    return rows @ a[sl]


def _rows(at: Atoms, idx) -> np.ndarray:
    """The rows ``a[idx]`` of a few atoms (from ``x`` and ``factor``: not the n x d ``a``)."""
    a = at.built()
    return a[idx] if a is not None else at.x[idx] * at.factor[idx, None]


def _schur(blk: W2Blocks, h_dd: np.ndarray) -> np.ndarray:
    """Hessian of ``F = min_lambda G``: the Schur complement ``G_dd - G_dl G_ld / G_ll``."""
    return h_dd - np.outer(blk.h_dl, blk.h_dl) / blk.h_ll if blk.h_ll > 0 else h_dd


def _tie_hessian(at: Atoms, m, hi: Moves, lo: tuple, split: np.ndarray, q_lo: np.ndarray, b,
                 delta, kappa, hi_blocks: W2Blocks) -> np.ndarray:
    """Hessian of ``F`` where atoms are split between two maximisers (``lo`` / ``hi``).

    There ``lambda*(delta)`` keeps the split atoms tied and their shares keep the budget
    met, so ``F`` is the partial minimum of ``G`` over ``lambda`` subject to the ties: its
    Hessian is the Schur complement of the KKT matrix
    ``[[G_dd, G_dl, C], [G_ld, G_ll, c], [C^T, c^T, 0]]`` onto ``delta``, where column ``i`` of
    ``(C; c)`` is ``w_i`` times the difference of the two moves' gradients in
    ``(delta, lambda)``. ``split``: the split atoms (sorted), ``lo`` their ``lo`` moves'
    ``(lambda, tau, flip)`` and ``q_lo`` those moves' weights ``w share``; ``hi_blocks``:
    :func:`w2_blocks` of the ``hi`` moves with weights ``w (1 - share)``.
    """
    w, beta = at.w, at.beta
    lo_lam, lo_tau, lo_flip = lo
    # the lo moves carry mass only on the split atoms: O(|split| d^2)
    blocks = [hi_blocks,
              w2_blocks(_rows(at, split), q_lo, m[split], lo_tau, lo_flip, b, lo_lam, beta,
                        delta)]
    h_dd = blocks[0].h_dd + blocks[1].h_dd
    h_dl = blocks[0].h_dl + blocks[1].h_dl
    h_ll = blocks[0].h_ll + blocks[1].h_ll
    cols = []
    for j, i in enumerate(split):
        diff = []
        for lam, tau, flip in ((lo_lam, lo_tau[j:j + 1], lo_flip[j:j + 1]),
                               (hi.lam, hi.tau[i:i + 1], hi.flip[i:i + 1])):
            one = w2_blocks(_rows(at, slice(i, i + 1)), np.ones(1), m[i:i + 1], tau, flip, b,
                            lam, beta, delta, dd_block=False)
            diff.append(np.append(one.g_d, one.g_l - (kappa if flip[0] else 0.0)))
        cols.append(w[i] * (diff[0] - diff[1]))
    c = np.array(cols).T  # (d + 1, |S|)
    d = delta.size
    border = np.column_stack([h_dl, c[:d]])  # couplings of delta with (lambda, ties)
    inner = np.zeros((1 + c.shape[1],) * 2)
    inner[0, 0], inner[0, 1:], inner[1:, 0] = h_ll, c[d], c[d]
    # equilibrated: with ``r = sqrt(G_ll)`` and tie columns scaled by ``r / |c_i|`` the
    # matrix is ``[[1, +-1], [+-1, 0]]``-like, so the pseudo-inverse keeps the ``-G_ll / c^2``
    # entry. Unscaled, that entry is ``G_ll / |c|`` (``1e-18`` at a one-atom tie of costs
    # ``1e-24`` and ``2e-12``) of the others, below the SVD's rounding: it came out 0 and
    # the Hessian lost ``(G_ll / c^2) C C^T``, indefinite (``tests/test_defects.py``).
    # ``D pinv(D K D) D`` is a generalised inverse of ``K``, so the consistent ties of
    # duplicated atoms (proportional columns, ``K`` singular) give the same Hessian.
    r = math.sqrt(h_ll) if h_ll > 0 else max(float(np.abs(c[d]).max()), 1.0)
    scale = np.concatenate([[1.0 / r], np.divide(r, np.abs(c[d]), out=np.full(c.shape[1], 1.0 / r),
                                                   where=c[d] != 0)])
    border = border * scale
    return h_dd - border @ np.linalg.pinv(inner * np.outer(scale, scale)) @ border.T


def _moved(at: Atoms, mix: Mixture, b: float, u: np.ndarray):
    """Features and labels of the atoms of ``mix``: ``x`` moved by ``t = tau / b`` along
    ``-ytil' u`` (``ytil'`` the label after the flip), written block by block (the only
    ``n x d`` array is the answer; where the atoms are the nominal ones in order, a copy
    instead of a gather, a quarter of its time)."""
    whole = _in_order(at, mix)
    ynew = _moved_labels(at, mix)
    coef = (2.0 * ynew - 1.0) * mix.tau / b
    x = at.x.copy() if whole else at.x[mix.src]
    for lo in range(0, coef.size, _BLOCK):
        x[lo:lo + _BLOCK] -= np.multiply.outer(coef[lo:lo + _BLOCK], u)
    return x, ynew


def _in_order(at: Atoms, mix: Mixture) -> bool:
    """Whether the atoms of ``mix`` are the nominal ones in order."""
    src, n = mix.src, at.w.size
    return src.size == n and n > 0 and bool(np.all(src == np.arange(n)))


def _moved_labels(at: Atoms, mix: Mixture) -> np.ndarray:
    """The labels of the atoms of ``mix`` (flipped where ``mix.flip``), a new array."""
    ysrc = at.y.copy() if _in_order(at, mix) else at.y[mix.src]
    return np.where(mix.flip, 1.0 - ysrc, ysrc) if mix.flip.any() else ysrc


def _moved_features(at: Atoms, mix: Mixture, b: float, u: np.ndarray) -> np.ndarray:
    """:func:`_moved`'s features alone (the worst case's ``x``, built on first read)."""
    return _moved(at, mix, b, u)[0]


def _pieces(q: np.ndarray, tau: np.ndarray, flip: np.ndarray,
            split: tuple | None) -> tuple[Mixture, ...]:
    """The worst case's moves in pieces: every atom of weight ``q > 0`` on the moves ``(tau,
    flip)`` and, at a tie, ``split = (q_lo, atoms, tau_lo, flip_lo)``, the split atoms' other
    moves (:func:`_joined` concatenates them)."""
    n = q.size
    if float(q.min()) > 0:  # every atom carries mass (no n-vector of indices to find)
        out = (Mixture(q, np.arange(n), tau, flip),)
    else:
        keep = np.flatnonzero(q > 0)
        out = (Mixture(q[keep], keep, tau[keep], flip[keep]),)
    return out + ((Mixture(*split),) if split is not None else ())


def _joined(pieces: tuple[Mixture, ...]) -> Mixture:
    """The :class:`Mixture` of the atoms of every piece, in order (the piece itself if one)."""
    if len(pieces) == 1:
        return pieces[0]
    return Mixture(*(np.concatenate(col) for col in zip(*pieces, strict=True)))


#: With finite ``kappa``, Newton's trials along one step ending at a tie of ``lambda*`` (a
#: step damped at least ``2^-(_KINK_TRIALS - 1)``) ...
_KINK_TRIALS = 3
#: ... this many such steps, with none full between them, stop Newton (``Stalled``, for
#: :func:`kink_fallback`): where
#: the atoms' switch points crowd ``lambda*`` (a small ``kappa`` against ``rho^2``) ``F`` has
#: a kink wherever two of them meet, about ``1/n`` apart, and Newton's steps on one piece's
#: Hessian only zigzag (n = 3000, ``rho = 0.2``, ``kappa = 0.3``: 25 iterations and 150
#: evaluations before the front end's rule of eight steps damped below 1/64 stopped it).
_KINK_STEPS = 4


def _evaluate(at: Atoms, delta, m, l, amb, hess, worst, state: W2State | None) -> InnerResult:
    """``F(delta)`` (SPEC 3.3) with its Danskin gradient, Hessian (``hess``), worst case and
    warm-start state (:class:`~.core.SetMethods` ``evaluate``). Away from ``rho = 0`` and
    ``delta = 0`` the worst case comes with every evaluation, ``worst`` or not: none of it
    is built until read (the certificate reads only its pieces), and Newton's last
    evaluation then serves the certificate without a second one; the result carries the
    margins ``m`` too (the front end's separability test reads them, no product again)."""
    beta, rho, kappa, w = at.beta, amb.rho, amb.kappa, at.w
    n = w.size
    if rho == 0.0:
        res = nominal_result(at, m, dpo_loss(m), hess, dual=math.inf)
        wc = WorstCase(at.w, at.x, at.y, np.arange(n), 0.0, 0.0)
        return InnerResult(res.value, math.inf, res.grad, res.hess, wc)
    dn = float(np.linalg.norm(delta))
    b = beta * dn
    if b == 0.0:  # theta = theta_ref: every loss is log 2 and moving gains nothing
        res = nominal_result(at, m, dpo_loss(m), hess, dual=0.0)
        wc = WorstCase(w, at.x, at.y, np.arange(n), 0.0, rho**2) if worst else None
        return InnerResult(res.value, 0.0, res.grad, res.hess, wc, state)
    state = W2State() if state is None else state
    lam0 = state.lam
    again = lam0 is not None and state.at is not None and np.array_equal(delta, state.at)
    if again:
        pair = state.pair  # evaluated already
    else:
        state.trials[0] += 1
        if state.damped >= _KINK_STEPS and math.isfinite(kappa):
            raise Stalled(f"dual solver stalled (status: stagnated): {state.damped} Newton "
                          f"steps in a row damped at ties of lambda* for {amb!r} (dense kinks "
                          f"of F)", state.at, state)
        if lam0 is not None and state.slope is not None and state.at is not None:
            guess = lam0 + float(state.slope @ (delta - state.at))  # first order along the step
            lam0 = guess if guess > _GUESS_FLOOR * lam0 else lam0
        pair = None
        if lam0 is not None and isinstance(state.pair, _SwitchBracket):
            pair = _switch_again(m, w, b, rho**2, kappa, lam0, state.pair)
        if lam0 is not None and pair is None:
            warm = None if state.pair is None else state.pair.hi
            pair = _fast_pair(m, w, b, rho**2, kappa, lam0,
                              warm if warm is not None and warm.tau.shape == m.shape else None)
        if pair is None:
            pair = solve_lambda(m, w, b, rho, kappa, lam0, state.roots, state.pair)
    hi = pair.hi
    # the lo moves where they differ from hi's: a switch bracket's by its own entries (its
    # full lo moves not built), else from the arrays
    switched = isinstance(pair, _SwitchBracket)
    lo = None if switched else pair.lo
    lo_at = pair.lo_at if switched else (lambda rows: (lo.tau[rows], lo.flip[rows],
                                                        lo.cost_at(rows)))
    lo_lam = hi.lam if switched else lo.lam
    sp, theta = np.zeros(0, dtype=np.intp), 0.0  # the split atoms and their share of lo
    if switched or lo is not hi:  # E cost jumps at lambda*: mix the moves of the switching atoms
        switch = pair.switch if switched else np.flatnonzero(
            (lo.flip != hi.flip) | (np.abs(lo.tau - hi.tau) > _SAME_MOVE * (1.0 + hi.tau)))
        extra = float(w[switch] @ (lo_at(switch)[2] - hi.cost_at(switch)))
        theta = float(np.clip((rho**2 - hi.expected_cost(w)) / extra if extra > 0 else 0.0,
                              0.0, 1.0))
        sp = np.unique(switch) if theta > 0 else sp
        sp = sp[w[sp] > 0]  # the atoms whose lo moves carry mass
    tied = sp.size > 0
    lo_tau, lo_flip, _ = lo_at(sp)
    u = delta / dn
    # the split's weights by their indices (a few atoms): w (1 - share) for hi is w with the
    # split atoms scaled (``scaled``; the n-vector only for the worst case's readers), and
    # lo's weights w share are nonzero on the split atoms alone
    q_lo = w[sp] * theta
    scaled = (sp, 1.0 - theta) if tied else None
    q_hi = functools.cache(lambda: _scaled(w, scaled))
    blk = None
    if again and not hess and state.grad is not None:  # the terms of the first evaluation
        value, grad, slope, primal = state.value, state.grad, state.slope, state.primal
    else:
        # the gradient, d lambda* / d delta and (when called) the Hessian on hi's branches,
        # and in the same blocks the value E_P V of hi's moves (at a tie the split atoms'
        # share of it separately: V is the same on both moves there)
        blk, h_dd, total = _w2_terms(at, w, m, hi.tau, hi.flip, b, hi.lam, beta,
                                     delta, hess, value=True, scaled=scaled)
        price = kappa * float(_scaled(w, scaled, hi.flips).sum()) if hi.flips.size else 0.0
        value = hi.lam * (rho**2 - price) + total
        # E_{Q*} l = sum_k q_k softplus(tau_k - s_k m_k) over the worst case's moves: hi's from
        # the same sums (V less the moves' cost), at a tie the split atoms' lo moves apart
        primal = total - hi.lam * blk.g_l
        if tied:
            value += float(q_lo @ _moves_value(m[sp], b, hi.lam, kappa, hi.tau[sp],
                                               hi.flip[sp]))
            primal += float(q_lo @ softplus(lo_tau - np.where(lo_flip, -m[sp], m[sp])))
        grad = blk.g_d
        # at a tie too (hi's moves): the guess is first order in the smooth part of E cost,
        # which the few atoms at the jump hardly move at large n
        slope = -blk.h_dl / blk.h_ll if blk.h_ll > 0 else None
        if tied:  # plus the split atoms' lo moves
            grad = grad + _w2_terms(_rows(at, sp), q_lo, m[sp], lo_tau, lo_flip,
                                    b, lo_lam, beta, delta)[0].g_d
    # a step damped at a tie counts, a step halved once holds the count, a full step resets it
    trials = state.trials[0]
    damped = (state.damped + 1 if tied and trials >= _KINK_TRIALS
              else state.damped if trials > 1 else 0)
    new_state = W2State(hi.lam, delta, pair, slope, value=value, grad=grad,
                        primal=primal, damped=damped)
    # E cost: hi's from the blocks' E t^2 (no n-vector of costs) where they were summed
    cost = (-blk.g_l + price if blk is not None else hi.expected_cost(q_hi())) + (
        float(q_lo @ lo_at(sp)[2]) if tied else 0.0)
    h = None
    if hess:
        h = ((lambda: _tie_hessian(at, m, hi, (lo_lam, lo_tau, lo_flip), sp, q_lo, b, delta,
                                   kappa, blk._replace(h_dd=h_dd()))) if tied
             else (lambda: _schur(blk, h_dd())))
    # the worst case with every evaluation, even without ``worst`` (nothing of it is built
    # until read: its pieces, their concatenation, the labels and the n x d moved features,
    # which the certificate never reads), so that the front end needs no second evaluation at
    # the answer (a product with the features and the reuse of this one's terms)
    pieces = functools.cache(lambda: _pieces(q_hi(), hi.tau, hi.flip,
                                               (q_lo, sp, lo_tau, lo_flip) if tied else None))
    mix = functools.cache(lambda: _joined(pieces()))
    wc = WorstCase(lambda: mix().q, lambda: _moved_features(at, mix(), b, u),
                   lambda: _moved_labels(at, mix()), lambda: mix().src, cost, rho**2)
    new_state = dataclasses.replace(new_state, mixture=pieces)
    # chord=False: a fresh Hessian (about one pass at n = 1e6, d = 8) beside an evaluation
    # (eight to fifteen): the chord step's linear rate cost the benchmark's finite-kappa solve
    # a fifth full-data evaluation (gradients 4e-5, 1.3e-7, 4e-9, 5e-17 against 4e-5, 1.3e-7,
    # 8e-14 with fresh Hessians; tol 1e-10)
    return InnerResult(float(value), float(hi.lam), grad, h, wc, new_state, margins=m,
                       primal=primal, chord=False)


# --- the exact test at delta = 0 ------------------------------------------------------------

#: First smoothing width of the flip-share test, relative to ``max(kappa, rho^2, ||E ytil x||^2)``
#: (the scale of the hinge arguments ``4 ytil x . nu - kappa``).
_FLIP_MU_START = 1e-1
#: Each stage divides the width by this ...
_FLIP_MU_FACTOR = 10.0
#: ... down to this (relative): below it the hinges are resolved to double precision.
_FLIP_MU_MIN = 1e-15
#: Newton iterations per smoothing stage (a strongly concave, smooth problem: a handful).
_FLIP_NEWTON_ITERS = 50
#: Points ``2^-j E xh`` (``j <= _FLIP_RAY``) tried first: the hinges vanish once ``2^-j`` is
#: below ``kappa / (4 max xh . E xh)``, and then ``Psi > rho^2`` whenever ``||E xh|| >> rho``.
_FLIP_RAY = 30
#: A stage's Newton has converged when its decrement is below this (relative): rounding.
_FLIP_DEC_TOL = 1e-15


def _flip_step(gram: np.ndarray, k: float, grad: np.ndarray) -> np.ndarray:
    """The Newton step ``(2 I + k G)^-1 grad`` of :func:`flip_shares`' smoothed dual (``G``
    PSD). Where ``k G`` swamps ``2 I`` in rounding (``mu`` small, the active atoms along one
    direction: one distinct atom, ``k G`` about 1e17) the sum is singular to LAPACK, and the
    step is taken on ``G``'s eigenvectors, ``V diag(1 / (2 + k lambda)) V^T grad``, which
    keeps the ``2`` of every direction."""
    try:
        return np.linalg.solve(2.0 * np.eye(grad.size) + k * gram, grad)
    except np.linalg.LinAlgError:
        lam, vec = np.linalg.eigh(gram)
        return vec @ ((vec.T @ grad) / (2.0 + k * np.maximum(lam, 0.0)))


def flip_shares(at: Atoms, amb) -> np.ndarray | None:
    """Flip shares ``f`` that certify ``delta = 0`` optimal, or ``None`` (SPEC 3.3).

    With ``xh_i = ytil_i x_i`` and ``g_f = E_P xh - 2 sum_i f_i xh_i``, the distribution
    ``Q_f`` that flips a mass ``f_i in [0, w_i]`` of each atom and moves every atom by
    ``-ytil' g_f`` (``ytil'`` its label after the flip) costs ``||g_f||^2 + kappa sum f`` and
    has ``E_Q ytil' x' = 0``, so ``E_Q l(theta)`` has gradient 0 at ``theta_ref``: if the cost
    is at most ``rho^2``, weak duality gives ``min F >= min E_Q l = log 2 = F(0)``. Conversely
    ``F'(0; v) = (beta / 2) sup_Q E_Q[-ytil' x' . v]`` for ``||v|| = 1``, so ``0`` is optimal iff
    ``min_f psi(f) = ||g_f||^2 + kappa sum f <= rho^2``; by duality (``||g||^2 = max_nu 2 nu . g
    - ||nu||^2``) ``min_f psi = max_nu Psi(nu)``, ``Psi(nu) = 2 nu . E xh - ||nu||^2 - E (4 xh .
    nu - kappa)_+``, and any ``nu`` with ``Psi(nu) > rho^2`` proves ``0`` not optimal. ``Psi``
    is maximised by Newton on its smoothing (``(z)_+ -> mu softplus(z / mu)``) for decreasing
    ``mu``, whose maximiser gives both ``nu`` and ``f_i = w_i sigmoid(z_i / mu)``; the loop
    stops at the first certificate either way. ``None`` also when neither is reached (``min
    psi = rho^2`` to rounding). For ``kappa = inf`` only ``f = 0`` is allowed: the closed
    form ``||E xh|| <= rho``.
    """
    w, r2, kappa = at.w, amb.rho**2, amb.kappa
    mean = at.mean_a / at.beta  # E xh, xh = ytil x = a / beta
    if float(mean @ mean) <= r2:
        return np.zeros_like(w)
    if not math.isfinite(kappa):
        return None
    # nu = c E xh for c = 1, 1/2, ..., 2^-_FLIP_RAY (one product with the data): the
    # certificate of descent usually holds on this ray already
    z, mm = at.matvec(mean) / at.beta, float(mean @ mean)
    act = np.flatnonzero(z > 0)  # the atoms whose hinge is active at c (shrinks with c)
    for c in 2.0 ** -np.arange(_FLIP_RAY + 1):
        act = act[4.0 * c * z[act] > kappa]
        if (2.0 * c - c * c) * mm - float(w[act] @ (4.0 * c * z[act] - kappa)) > r2:
            return None
    xh = at.a / at.beta  # ytil x

    def primal(f: np.ndarray) -> float:
        g = mean - 2.0 * (f @ xh)
        return float(g @ g) + kappa * float(f.sum())

    def dual(nu: np.ndarray) -> float:
        z = 4.0 * (xh @ nu) - kappa
        return 2.0 * float(nu @ mean) - float(nu @ nu) - float(w @ np.maximum(z, 0.0))

    nu = mean.copy()
    scale = max(kappa, r2, float(mean @ mean))
    mu = _FLIP_MU_START * scale

    def smooth(nu):
        z = (4.0 * (xh @ nu) - kappa) / mu
        s = expit(z)
        return (2.0 * float(nu @ mean) - float(nu @ nu) - mu * float(w @ softplus(z)),
                2.0 * mean - 2.0 * nu - 4.0 * ((w * s) @ xh), s)

    while mu >= _FLIP_MU_MIN * scale:
        val, grad, s = smooth(nu)
        for _ in range(_FLIP_NEWTON_ITERS):
            step = _flip_step(weighted_hess(xh, w * s * (1.0 - s)), 16.0 / mu, grad)
            dec = float(grad @ step)
            if not dec > _FLIP_DEC_TOL * max(1.0, abs(val)):
                break
            t = 1.0
            while True:
                nv, ng, ns = smooth(nu + t * step)
                if nv >= val + 1e-4 * t * dec or t < _FLIP_DEC_TOL:
                    break
                t *= 0.5
            nu, val, grad, s = nu + t * step, nv, ng, ns
        f = w * s
        if primal(f) <= r2:
            return f
        if dual(nu) > r2:
            return None
        mu /= _FLIP_MU_FACTOR
    return None


def _zero_test(at: Atoms, amb) -> float | None:
    """Gap 0 when :func:`flip_shares` finds a zero-gradient distribution in the ball (exact
    in both directions), else ``None``."""
    return 0.0 if flip_shares(at, amb) is not None else None


#: A worst case whose recomputed transport cost exceeds ``rho^2`` (by rounding) has its moves
#: shortened (their cost scaled), or is mixed with ``P`` at a weight, this much (relative)
#: below ``rho^2 / cost``: a few ulps of safety.
_MIX_ROUND = 4.0 * np.finfo(float).eps


def certify(at: Atoms, amb, delta: np.ndarray, res: InnerResult, info: dict) -> float:
    """Certified upper bound on ``(F(delta) - min F) / max(1, |F(delta)|)`` (weak duality).

    ``delta = 0``: ``0`` when :func:`flip_shares` certifies it (``Q_f`` has ``min_theta E_Q l
    = log 2 = F(0)``), else ``inf``. Otherwise the worst case ``Q*`` of ``res`` (every atom
    moved by its ``t*``, flipped where that wins, split atoms with both moves) is in the ball:
    its transport cost is recomputed from its moves (``t^2 ||u||^2 + kappa 1[y' != y]``) and,
    where rounding puts it above ``rho^2``, the moves are shortened to spend the budget (or,
    where the flips alone exceed it, ``Q*`` is mixed with ``P``: the coupling that keeps a
    share of ``P`` in place costs that share less). So ``min F >= min_theta E_Q l``, a
    weighted logistic regression bounded below by :func:`~.core.logistic_gap`; at the
    minimiser ``E_{Q*} l`` is stationary (Danskin) and the bound is about ``||grad||^2 / (2
    mu)``. ``info`` is not used.
    """
    if not np.any(delta):
        return 0.0 if flip_shares(at, amb) is not None else math.inf
    state = res.state if isinstance(res.state, W2State) else None
    pieces = state.mixture() if state is not None and state.mixture is not None else None
    if pieces is None:  # b = beta ||delta|| underflowed to 0: the unmoved atoms
        n = at.w.size
        pieces = (Mixture(at.w, np.arange(n), np.zeros(n), np.zeros(n, dtype=bool)),)
    gap = _weak_duality_gap(at, amb, delta, res.value, pieces, res.margins)
    if gap > _KINK_CERTIFY and res.dual is not None and 0 < res.dual < math.inf:
        gap = min(gap, kink_certificate(at, amb, delta, res.value, res.dual)[0])
    return gap


#: Above this certified gap the mixture of tied moves that :func:`kink_certificate` fits is tried
#: too (the evaluation's own split is one subgradient, not the stationary one, at a kink).
_KINK_CERTIFY = 1e-12
#: Tie levels of :func:`kink_certificate` (relative gap of an atom's two best moves): from the
#: rounding of one value (the KKT fallback solves the ties to ``_KKT_TIE``) up to ``1e-2``
#: (beyond it the value lost on untied atoms exceeds any useful bound).
_CERT_TIE_LEVELS = (1e-14, 1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2)


def kink_certificate(at: Atoms, amb, delta: np.ndarray, value: float,
                     lam: float) -> tuple[float, Mixture | None]:
    """The smallest :func:`_weak_duality_gap`, with its :class:`Mixture` (``(inf, None)``
    without ties), of the mixtures of every atom's two best moves at ``lambda`` whose
    shares (in ``[0, 1]``, on the atoms whose two best moves tie within a level of
    ``_CERT_TIE_LEVELS``, relative) make the Danskin gradient of ``E_Q l`` smallest and
    spend the budget (bounded least squares), tried from the tightest level up.

    A loose level lets atoms that are not tied carry their second move, which costs their
    value gap in ``E_Q l`` (``1e-7`` of ``F`` at ``1e-2`` on 2500 atoms); a tight one may
    miss atoms that are tied to the evaluation's rounding: each level is one bound, and the
    smallest is kept (the first at most ``_KINK_CERTIFY`` ends the loop)."""
    cand = _candidates(at, delta, lam, amb.kappa)
    rows = np.arange(at.w.size)
    order = np.argsort(-cand.value, axis=1)
    c0, c1 = order[:, 0], order[:, 1]
    v1, v2 = cand.value[rows, c0], cand.value[rows, c1]
    close = (at.w > 0) & np.isfinite(v2)
    rel = np.where(close, (v1 - v2) / (1.0 + np.abs(v1)), np.inf)
    if not np.any(rel <= _CERT_TIE_LEVELS[-1]):
        return math.inf, None
    b, u = cand.b, delta / float(np.linalg.norm(delta))
    w = at.w

    def per_atom(c):
        """The moves ``c``, the per-atom gradient coefficients (``grad_i = ga_i a_i + gu_i
        beta u``), the mean gradient and the costs."""
        tau, flip = cand.tau[rows, c], cand.flip[rows, c]
        sgn = np.where(flip, -1.0, 1.0)
        sg = expit(tau - sgn * cand.m)
        ga, gu = -sgn * sg, sg * tau / b
        mean = at.rmatvec(w * ga) + float(w @ gu) * at.beta * u
        return tau, flip, ga, gu, mean, (tau / b) ** 2 + np.where(flip, amb.kappa, 0.0)

    tau0, flip0, ga0, gu0, mean0, k0 = per_atom(c0)
    tau1, flip1, ga1, gu1, _, k1 = per_atom(c1)
    best, seen = (math.inf, None), 0
    for level in _CERT_TIE_LEVELS:
        tied = np.flatnonzero(rel <= level)
        if tied.size == seen:  # the same atoms as the level before
            continue
        seen = tied.size
        cols = (w[tied, None] * ((ga1 - ga0)[tied, None] * _rows(at, tied)
                                 + (gu1 - gu0)[tied, None] * (at.beta * u)[None, :])).T
        dcost = w[tied] * (k1[tied] - k0[tied])
        weight = (max(float(np.linalg.norm(cols)), 1.0)
                  / max(float(np.linalg.norm(dcost)), _TINY))
        lhs = np.vstack([cols, weight * dcost[None, :]])
        rhs = np.append(-mean0, weight * (amb.rho**2 - float(w @ k0)))
        xi = np.zeros(w.size)
        xi[tied] = lsq_linear(lhs, rhs, bounds=(0.0, 1.0)).x
        both = np.flatnonzero(xi > 0)
        mix = Mixture(np.concatenate([w * (1.0 - xi), w[both] * xi[both]]),
                      np.concatenate([rows, both]), np.concatenate([tau0, tau1[both]]),
                      np.concatenate([flip0, flip1[both]]))
        gap = _weak_duality_gap(at, amb, delta, value, (mix,), cand.m)
        if gap < best[0]:
            best = (gap, mix)
        if gap <= _KINK_CERTIFY:
            break
    return best


def _weak_duality_gap(at: Atoms, amb, delta, value, pieces: tuple[Mixture, ...],
                      m: np.ndarray | None = None) -> float:
    """``(value - min_theta E_Q l) / max(1, |value|)`` bounded above for the distribution ``Q``
    of the :class:`Mixture` s ``pieces`` (together): where its transport cost exceeds
    ``rho^2`` (by rounding),
    first every move is shortened by the factor that spends the budget (less a few ulps),
    else (the flips alone exceed it) ``Q`` is mixed with ``P``, so that it lies in the ball.

    The cost is that of the moves themselves, ``t^2 ||u||^2 + kappa 1[flipped]`` per unit
    mass (``u`` the rounded direction, so the moved atoms are exactly those of ``mix``), and
    the bound is :func:`~.core.logistic_gap`'s on the atoms ``a'_k = s_k a_src - beta t_k u``
    (:func:`_moved_logistic_gap`, without forming them; ``m``, the margins ``a delta``
    where known).
    """
    u = delta / float(np.linalg.norm(delta))
    scale = 1.0 / (at.beta * float(np.linalg.norm(delta)))

    def moves_cost(pieces):  # sum q t^2 ||u||^2, t = tau / b
        return sum(float((mix.q * mix.tau) @ mix.tau) for mix in pieces) * scale**2 * float(u @ u)

    moving = moves_cost(pieces)
    flipped = [float(mix.q[mix.flip].sum()) for mix in pieces if mix.flip.any()]
    flips = amb.kappa * sum(flipped) if flipped else 0.0  # no inf * 0 where kappa = inf
    budget = amb.rho**2
    if moving + flips > budget and budget > flips and moving > 0:
        # rounding: every move shortened by sqrt(c) (the same directions, cost c moving)
        c = math.sqrt((budget - flips) / moving * (1.0 - _MIX_ROUND))
        shrunk = tuple(mix._replace(tau=mix.tau * c) for mix in pieces)
        if (less := moves_cost(shrunk)) + flips <= budget:
            pieces, moving = shrunk, less
    cost = moving + flips
    parts = [(mix, 1.0) for mix in pieces]
    if cost > budget:  # Q's share of the mixture with P, P's atoms unmoved
        share = budget / cost * (1.0 - _MIX_ROUND)
        n = at.w.size
        parts = [(mix, share) for mix in pieces] + [
            (Mixture(at.w, np.arange(n), np.zeros(n), np.zeros(n, dtype=bool)), 1.0 - share)]
    return _moved_logistic_gap(at, delta, u, value, parts, m) / max(1.0, abs(value))


def _moved_logistic_gap(at: Atoms, delta, u, upper: float, parts,
                        m: np.ndarray | None = None) -> float:
    """:func:`~.core.logistic_gap` of ``f(D) = sum_k q_k softplus(-a'_k . D)`` for the moved
    atoms ``a'_k = s_k a_src - beta t_k u`` of the mixtures ``parts`` (pairs of a
    :class:`Mixture` and its share) from per-atom scalars (``O(n d)``, no ``n x d`` array):
    margins ``s_k m_src - beta t_k (u . delta)``, gradient ``-sum c_k s_k a_src + beta (sum
    c_k t_k) u`` (``c = q sigmoid(-m')``), Hessian ``sum C_i a_i a_i^T - beta (p u^T + u
    p^T) + beta^2 (sum c'_k t_k^2) u u^T`` (``c' = c sigmoid(m')``, ``C_i`` its sum over the
    atoms from ``i``, ``p = sum c'_k s_k t_k a_src``), radius ``max_i ||a_i|| + beta max t
    ||u||`` (``Atoms.max_norm`` and the triangle inequality: at least ``max ||a'||``); like
    :func:`~.core.logistic_gap`, the Hessian of every ``N / _CERT_ATOMS``-th atom of each part
    first (``N`` atoms in all). ``m``: the margins ``a delta`` of the nominal atoms where
    known (the evaluation's: no product for them in the blocks), else each block's ``x_src
    delta`` (the same to rounding)."""
    n, beta, d = at.w.size, at.beta, delta.size
    inv_b = 1.0 / (beta * float(np.linalg.norm(delta)))
    total = sum(mix.q.size for mix, _ in parts)
    step = total // _CERT_ATOMS if total > _CERT_ATOMS else 0
    unorm = float(np.linalg.norm(u))
    # a_src = factor_src x_src: the rows of x and the sign times the factor (no n x d
    # copy of a unless it is built already)
    rows_of, factor = (at.x, at.factor) if at.built() is None else (at.built(), None)
    along = beta * float(u @ delta)

    def sweep(full: bool):
        """The value, the gradient, the radius and the subset's rows; with ``full`` also the
        sums of the full Hessian, ``tt``, ``p`` and ``C`` (else ``None``)."""
        value, radius, tt, g_u = 0.0, 0.0, 0.0, 0.0
        curv_c = np.zeros(n) if full else None  # per source atom
        # sum c_k s_k a_src (and p), from each block's rows in cache
        both = np.zeros((2 if full else 1, d))
        subs = []
        for mix, share in parts:
            for lo, fb in _block_flips(mix.flip):  # blocks: O(_BLOCK) temporaries
                blk = slice(lo, lo + _BLOCK)
                q = mix.q[blk] if share == 1.0 else mix.q[blk] * share
                src = mix.src[blk]
                t = mix.tau[blk] * inv_b  # t = tau / b, as the moves' cost reads it
                first, top = int(src.min()), int(src.max()) + 1  # a range of sources
                # the block's source atoms (no n-vector of margins): a view where they are
                # a range in order (the unsplit atoms), else a gather
                run = top - first == src.size and bool(np.all(np.diff(src) == 1))
                x_src = rows_of[first:top] if run else rows_of[src]
                # s_k factor_src (s_k = -1 if flipped): the factor alone without flips
                sf = (np.ones(q.size) if factor is None
                      else factor[first:top] if run else factor[src])
                if fb.size:
                    sf = sf.copy() if run and factor is not None else sf  # not a view
                    sf[fb] = -sf[fb]
                neg = np.multiply(t, along)  # -m' = beta t (u . delta) - s a.delta
                if m is None:
                    neg -= np.multiply(x_src @ delta, sf)
                else:
                    neg -= m[first:top] if run else m[src]
                    if fb.size:  # + m there
                        neg[fb] = t[fb] * along + (m[first + fb] if run else m[src[fb]])
                value += float(q @ softplus(neg))
                sg = _sigmoid(neg)
                c = q * sg
                g_u += float(c @ t)
                coef = np.empty((both.shape[0], q.size))
                np.multiply(c, sf, out=coef[0])
                if full:
                    curv = c * (1.0 - sg)  # the subset's alone without ``full``
                    tt += float(curv @ t**2)
                    np.multiply(curv * t, sf, out=coef[1])
                    curv_c[first:top] += curv if run else np.bincount(
                        src - first, curv, minlength=top - first)
                # the rows just read for the margins: a product in cache
                both += coef @ x_src if full else coef[0] @ x_src
                radius = max(radius, at.max_norm() + beta * unorm * float(t.max()))
                if step and not full:
                    sub = slice((-lo) % step, None, step)  # every step-th atom of the part
                    rows = (sf[sub, None] * x_src[sub]
                            - (beta * t[sub])[:, None] * u[None, :])
                    subs.append(rows * np.sqrt(c[sub] * (1.0 - sg[sub]))[:, None])
        grad = -both[0] + beta * g_u * u
        return value, grad, radius, subs, (tt, both[1], curv_c) if full else None

    if step:  # sum over a subset <= the Hessian: a cheaper, looser bound
        # first without the full Hessian's sums (its second product row, its per-atom
        # curvature and their n-vector: a quarter of the sweep), which are swept for only
        # where this bound is too loose
        value, grad, radius, subs, _ = sweep(full=False)
        bsub = np.vstack(subs) if subs else np.zeros((0, d))
        bound = curvature_bound(grad, bsub.T @ bsub, radius, full_rank=True)
        if bound <= _CERT_SUBSET_OK:
            return max(upper - value, 0.0) + bound
    value, grad, radius, _, (tt, p, curv_c) = sweep(full=True)
    hess = (weighted_hess(at, curv_c) - beta * (np.outer(p, u) + np.outer(u, p))
            + beta**2 * tt * np.outer(u, u))
    return max(upper - value, 0.0) + curvature_bound(grad, hess, radius)


# --- minimisers at a kink of F ------------------------------------------------------------------

#: Tie levels of the kink solve: the atoms whose two best moves are this close (relative) at
#: the stalled point get a share variable (a looser level is tried where a tighter one fails).
_TIE_LEVELS = (1e-5, 1e-3, 1e-2, 1e-1)
#: Most share variables of one kink solve, the closest atoms first (the Jacobian is dense in
#: them: ``(d + 1 + 256)^2`` entries; a minimiser has at most ``d + 1`` atoms tied, and the
#: others' shares only need room to leave the tie).
_POOL_MAX = 256
#: The shares start at 0 (every atom on its best move) except on the atoms tied within this
#: at the stalled point (rounding of a value): 1/2, shifted to meet the budget.
_TIED_START = 1e-9
#: A relative gap of this between an atom's two moves moves its share across ``[0, 1]`` in
#: the natural residual of the box (any positive scale has the same solutions): the pool's
#: loosest level, so that an atom whose moves are farther apart than that goes to the bound
#: of its better move while the atoms tied to rounding keep shares inside for many steps.
#: Measured on the 8 sweep problems (n = 300 and 2000, d = 3 and 8) where Newton stalled at
#: a kink: all solved with 1e-1 (and 7 of 7 with 1e-2); with 1e-3 or less (the bound atoms
#: then jump between the two regimes of the residual) and with ``c = 1`` (an atom whose
#: second move overtakes the first is forced to a tie) 0 to 5 of 7.
_SHARE_SPAN = _TIE_LEVELS[-1]
#: KKT Newton iterations (semismooth Newton: quadratic once the active set settles).
_KKT_ITERS = 100
#: The KKT residual is solved when the budget is met to ``_KKT_BUDGET rho^2`` and the ties to
#: ``_KKT_TIE`` (rounding of an n-term sum and of one loss).
_KKT_BUDGET = 1e-12
_KKT_TIE = 1e-15
#: Smallest KKT backtracking step before the solve gives up.
_KKT_MIN_STEP = 1e-8
#: Residual decrease fraction demanded of a KKT step (Armijo's customary 1e-4).
_KKT_ARMIJO = 1e-4


class _Candidates(NamedTuple):
    """Every local maximiser of every atom at ``(delta, lambda)``: arrays of shape (n, C)."""

    m: np.ndarray
    b: float
    tau: np.ndarray
    flip: np.ndarray
    value: np.ndarray


def _candidates(at: Atoms, delta: np.ndarray, lam: float, kappa: float) -> _Candidates:
    """The columns: the right and left maximisers of the kept branch, then of the flipped one.
    For ``k >= 1/4`` a branch's one maximiser is in its right column (``best_move`` names its
    piece, which changes with ``m`` and ``k``: a fixed column would lose it along a step)."""
    m = at.matvec(delta)
    b = at.beta * float(np.linalg.norm(delta))
    k = 2.0 * lam / b**2
    taus, flips, vals = [], [], []
    for sign in ((1.0, -1.0) if math.isfinite(kappa) else (1.0,)):
        roots = best_move(sign * m, k).roots
        if k >= 0.25:
            roots = roots._replace(right_exists=np.ones(m.shape, dtype=bool),
                                   left_exists=np.zeros(m.shape, dtype=bool))
        for tau, ok in ((roots.tau_right, roots.right_exists),
                        (roots.tau_left, roots.left_exists)):
            val = softplus(tau - sign * m) - 0.5 * k * tau**2 - (lam * kappa if sign < 0 else 0)
            taus.append(tau)
            flips.append(np.full(m.shape, sign < 0))
            vals.append(np.where(ok, val, -np.inf))
    return _Candidates(m, b, np.column_stack(taus), np.column_stack(flips),
                       np.column_stack(vals))


def kink_fallback(at: Atoms, amb, stall: Stalled, tol: float) -> Minimum:
    """Semismooth Newton on the KKT system where the p = 2 minimiser sits at a kink of ``F``.

    There some atoms have two maximisers of equal value at ``lambda*`` and the optimal
    coupling splits each between them with shares ``xi_i in [0, 1]``: ``(delta, lambda)``
    minimises and ``xi`` maximises ``H = lambda rho^2 + sum_i w_i ((1 - xi_i) V_i^0 + xi_i
    V_i^1)`` (the two best moves of each atom of a pool), a saddle point. Unknowns
    ``(delta, lambda, xi)``; equations: the Danskin gradient of the mixture vanishes, the
    mixture spends ``rho^2``, and ``xi_i = clip(xi_i + w_i (V_i^1 - V_i^0), 0, 1)`` (a
    tie where the share is inside ``(0, 1)``, else the share at the bound of the better
    move): the natural residual of the box constraint, so that the active set (which
    atoms are tied) changes within the solve. The pool: the atoms whose two best moves are
    within ``_TIE_LEVELS`` (relative) at the stalled point, tried from the tightest level
    up. On failure ``stall`` is re-raised.
    """
    state = stall.state
    if not isinstance(state, W2State) or state.lam is None:
        raise stall
    delta, lam = stall.delta, state.lam
    vals = _candidates(at, delta, lam, amb.kappa).value
    order = np.argsort(-vals, axis=1)
    rows = np.arange(at.w.size)
    v1, v2 = vals[rows, order[:, 0]], vals[rows, order[:, 1]]
    close = (at.w > 0) & np.isfinite(v2)
    gap = np.where(close, (v1 - v2) / (1.0 + np.abs(v1)), np.inf)
    dense = math.isfinite(amb.kappa)  # the kinks of crowded switch points: smoothing first
    found = smoothed_fallback(at, amb, delta, lam, tol) if dense else None
    if found is not None:
        return found
    seen = 0
    for level in _TIE_LEVELS:
        pool = np.flatnonzero(gap <= level)
        if pool.size == seen:  # the same pool as the level before
            continue
        seen = pool.size
        if pool.size > _POOL_MAX:
            pool = pool[np.argsort(gap[pool], kind="stable")[:_POOL_MAX]]
        found = _kink_solve(at, amb, delta, lam, tol, pool, order, gap)
        if found is not None:
            return found
    found = None if dense else smoothed_fallback(at, amb, delta, lam, tol)
    if found is not None:
        return found
    raise stall


def _kink_solve(at: Atoms, amb, delta: np.ndarray, lam: float, tol: float,
                pool: np.ndarray, order: np.ndarray, gap: np.ndarray,
                xi0: np.ndarray | None = None, iters: int = _KKT_ITERS,
                min_step: float = _KKT_MIN_STEP) -> Minimum | None:
    """One semismooth KKT solve of :func:`kink_fallback` with share variables on the atoms
    ``pool`` (``None``: failed)."""
    kappa, rho2, w, d, beta = amb.kappa, amb.rho**2, at.w, delta.size, at.beta
    finite = math.isfinite(kappa)
    rows = np.arange(w.size)
    # identical atoms behave identically: one representative each, carrying their weight
    _, first, inverse = np.unique(_rows(at, pool), axis=0, return_index=True, return_inverse=True)
    wt = np.bincount(inverse.ravel(), w[pool])
    groups = pool[first]
    ng = groups.size
    rest = w.copy()
    rest[pool] = 0.0
    c0, c1 = order[groups, 0], order[groups, 1]
    ag = _rows(at, groups)

    def residual(delta, lam, xi, full=False):
        """The KKT residual and, with ``full``, its Jacobian (``O(n d^2)``; else ``None``)."""
        cand = _candidates(at, delta, lam, kappa)
        m, b, taus, flips, vals = cand
        best = np.argmax(vals, axis=1)
        fl = flips[rows, best]
        blk = w2_blocks(at, rest, m, taus[rows, best], fl, b, lam, beta, delta,
                        dd_block=full)
        g_d, h_dd, h_dl, h_ll = blk.g_d, blk.h_dd, blk.h_dl, blk.h_ll
        g_l = blk.g_l - (kappa * float(rest @ fl) if finite else 0.0)
        u = delta / float(np.linalg.norm(delta))
        grads, values = [], []
        for c, share in ((c0, 1.0 - xi), (c1, xi)):
            tau, flip = taus[groups, c], flips[groups, c]
            part = w2_blocks(ag, wt * share, m[groups], tau, flip, b, lam, beta, delta,
                             dd_block=full)
            g_d = g_d + part.g_d
            g_l += part.g_l - (kappa * float((wt * share) @ flip) if finite else 0.0)
            if full:
                h_dd = h_dd + part.h_dd
            h_dl, h_ll = h_dl + part.h_dl, h_ll + part.h_ll
            # each atom's Danskin gradient of V in (delta, lambda)
            t, sgn = tau / b, np.where(flip, -1.0, 1.0)
            sg = expit(tau - sgn * m[groups])
            gd = np.outer(sg * t, beta * u) - (sg * sgn)[:, None] * ag
            grads.append(np.column_stack([gd, -t * t - np.where(flip, kappa, 0.0)]))
            values.append(vals[groups, c])
        # the box's natural residual xi - clip(xi + c dv, 0, 1), dv = w (V^1 - V^0), with
        # c dv = (V^1 - V^0) / (_SHARE_SPAN (1 + |V^0|)): a relative value gap of
        # _SHARE_SPAN moves a share across the box; divided by c (value units: -dv at a tie),
        # so that the ties weigh in the residual's norm as the other equations do
        scale = wt * _SHARE_SPAN * (1.0 + np.abs(values[0]))  # 1 / c
        with np.errstate(invalid="ignore"):  # a move lost along a step: rejected (not finite)
            z = xi + (wt * (values[1] - values[0])) / scale
        inside = (z > 0.0) & (z < 1.0)  # a tie; else the share sits at a bound
        res = np.concatenate([g_d, [rho2 + g_l], (xi - np.clip(z, 0.0, 1.0)) * scale])
        if not full:
            return res, None
        cols = (wt[:, None] * (grads[1] - grads[0])).T  # (d + 1, groups): d(dv) / d(delta, lam)
        jac = np.zeros((d + 1 + ng,) * 2)
        jac[:d, :d], jac[:d, d], jac[d, :d], jac[d, d] = h_dd, h_dl, h_dl, h_ll
        jac[:d + 1, d + 1:] = cols
        jac[d + 1:, :d + 1] = np.where(inside[:, None], -cols.T, 0.0)
        jac[d + 1 + np.arange(ng), d + 1 + np.arange(ng)] = np.where(inside, 0.0, scale)
        return res, jac

    if xi0 is not None:  # the shares given (per atom of the pool)
        xi = xi0[first]
        res, jac = residual(delta, lam, xi, full=True)
    else:
        # every atom on its best move but the tied ones: half on each, shifted to meet the
        # budget
        tied = gap[groups] <= _TIED_START
        if not tied.any():
            tied[int(np.argmin(gap[groups]))] = True
        xi = np.where(tied, 0.5, 0.0)
        res, jac = residual(delta, lam, xi, full=True)
        col = jac[d, d + 1:] * tied
        if col @ col > 0:
            xi = np.clip(xi - res[d] * col / float(col @ col), 0.0, 1.0)
            res, jac = residual(delta, lam, xi, full=True)
    for it in range(iters):
        if not np.isfinite(res).all():
            return None
        if (np.max(np.abs(res[:d])) <= tol and abs(res[d]) <= _KKT_BUDGET * rho2
                and np.max(np.abs(res[d + 1:]), initial=0.0) <= _KKT_TIE):
            return Minimum(delta, it, W2State(lam=lam))
        if jac is None:  # the Jacobian only where a step is taken (trials need the residual)
            jac = residual(delta, lam, xi, full=True)[1]
        step = scaled_lstsq(jac, -res)
        t, norm0 = 1.0, float(np.linalg.norm(res))
        while t > min_step:
            cand = (delta + t * step[:d], lam + t * step[d], xi + t * step[d + 1:])
            if cand[1] > 0 and np.any(cand[0]):
                new = residual(*cand)
                if (np.isfinite(new[0]).all()
                        and np.linalg.norm(new[0]) < (1 - _KKT_ARMIJO * t) * norm0):
                    break
            t *= 0.5
        else:
            return None
        (delta, lam, xi), (res, jac) = cand, new
    return None


# --- minimisers at a kink of F: the smoothed joint problem --------------------------------------

#: First smoothing width of :func:`smoothed_fallback` (value units: the losses are O(1)); each
#: stage divides it by ``_SMOOTH_FACTOR`` down to ``_SMOOTH_MIN``, where the smoothing moves
#: ``G`` by at most ``_SMOOTH_MIN log 4`` (four moves at most per atom; far below rounding).
_SMOOTH_START = 1e-2
_SMOOTH_FACTOR = 10.0
_SMOOTH_MIN = 1e-14
#: Newton iterations per smoothing stage (a smooth convex problem warm-started from the
#: previous stage's minimiser: a few each).
_SMOOTH_ITERS = 40
#: A stage has converged when its Newton decrement ``g H^-1 g`` is below this times ``mu``
#: (``G_mu`` within about that of its minimum: the next stage starts well inside the region
#: where its Newton steps are full; a tighter test only spent backtracking on rounding).
_SMOOTH_DEC = 1e-8
#: Smallest step of a stage's backtracking (rounding of ``G_mu``: the stage has converged).
_SMOOTH_MIN_STEP = 1e-6
#: Columns whose share is below this are left out of the derivatives (``exp(-700 / 10)``:
#: their contribution is far below rounding).
_SMOOTH_SHARE = 1e-30
#: The KKT solve is tried from each stage's minimiser from this width on, with share
#: variables on the atoms whose second move keeps at least ``_SMOOTH_POOL`` of the softmax
#: (measured on the n = 3000 problem of tests/test_w2.py, before the bound below: from
#: ``mu = 1e-3``, 36 to 97 atoms and 24 KKT iterations; from 1e-4, 11 to 18 atoms and 4).
_SMOOTH_KKT = 1e-4
_SMOOTH_POOL = 1e-6
#: ... and their shares start there, but at the bound 0 below this (an atom started inside
#: the box counts as tied until its share reaches a bound, one damped step each: from the
#: softmax's shares alone 27 of 58 atoms at n = 1e4, and the KKT solve failed; from 1e-2 on
#: it succeeds on the problems of tests/test_w2.py).
_SMOOTH_BOUND = 1e-2
#: KKT iterations from a stage's minimiser: 2 to 6 where it succeeds on the problems of
#: tests/test_w2.py; one that needs more starts too far (the next stage starts closer).
_SMOOTH_KKT_ITERS = 12
#: ... and its smallest backtracking step (ten halvings: a step shorter than that is no
#: longer the quadratic phase the start was chosen for).
_SMOOTH_KKT_STEP = 1e-3


def _smoothed(at: Atoms, amb, x: np.ndarray, mu: float, full: bool):
    """``G_mu(delta, lambda) = lambda rho^2 + sum_i w_i mu log sum_c exp(V_ic / mu)`` over
    every local maximiser ``c`` of every atom (:func:`_candidates`), at ``x = (delta,
    lambda)``: its value, and with ``full`` its gradient and Hessian in ``(delta, lambda)``
    (``sum_c xi_c grad^2 V_c + Cov_xi(grad V) / mu``, ``xi`` the softmax shares)."""
    kappa, rho2, w, beta = amb.kappa, amb.rho**2, at.w, at.beta
    d = x.size - 1
    delta, lam = x[:d], float(x[d])
    m, b, taus, flips, vals = _candidates(at, delta, lam, kappa)
    vmax = vals.max(axis=1)
    z = np.exp((vals - vmax[:, None]) / mu)
    s = z.sum(axis=1)
    value = lam * rho2 + float(w @ (vmax + mu * np.log(s)))
    if not full:
        return value, None, None
    xi = z / s[:, None]
    grad, hess = np.zeros(d + 1), np.zeros((d + 1, d + 1))
    grad[d] = rho2
    u = delta / float(np.linalg.norm(delta))
    per = []  # per-atom gradients of each column on the atoms with several columns
    multi = np.flatnonzero(np.sum(xi > _SMOOTH_SHARE, axis=1) > 1)
    a_multi = _rows(at, multi)
    for c in range(vals.shape[1]):
        q = w * xi[:, c]
        rows = np.flatnonzero(q > _SMOOTH_SHARE * w)
        if rows.size == 0:
            per.append(np.zeros((multi.size, d + 1)))
            continue
        sub = at if rows.size == w.size else _rows(at, rows)
        tau, flip = taus[rows, c], flips[rows, c]
        blk = w2_blocks(sub, q[rows], m[rows], tau, flip, b, lam, beta, delta)
        grad[:d] += blk.g_d
        grad[d] += blk.g_l - (kappa * float(q[rows] @ flip) if flip.any() else 0.0)
        hess[:d, :d] += blk.h_dd
        hess[:d, d] += blk.h_dl
        hess[d, :d] += blk.h_dl
        hess[d, d] += blk.h_ll
        # each multi atom's Danskin gradient of V_c in (delta, lambda), as kink_fallback's
        tau, flip = taus[multi, c], flips[multi, c]
        t, sgn = tau / b, np.where(flip, -1.0, 1.0)
        sg = expit(tau - sgn * m[multi])
        gd = np.outer(sg * t, beta * u) - (sg * sgn)[:, None] * a_multi
        gl = -t * t - (kappa if math.isfinite(kappa) else 0.0) * flip
        per.append(np.where(np.isfinite(vals[multi, c])[:, None],
                            np.column_stack([gd, gl]), 0.0))
    if multi.size:
        gc = np.stack(per, axis=1)  # (atoms, columns, d + 1)
        x_m = xi[multi]
        dev = gc - np.einsum("ic,icj->ij", x_m, gc)[:, None, :]
        hess += np.einsum("i,ic,icj,ick->jk", w[multi] / mu, x_m, dev, dev)
    return value, grad, hess


def _kkt_from(at: Atoms, amb, x: np.ndarray, mu: float, tol: float) -> Minimum | None:
    """:func:`_kink_solve` from a minimiser ``x = (delta, lambda)`` of ``G_mu``: share
    variables on the atoms whose second-best move keeps a share above ``_SMOOTH_POOL`` of
    the softmax, started at those shares."""
    delta, lam = x[:-1], float(x[-1])
    vals = _candidates(at, delta, lam, amb.kappa).value
    order = np.argsort(-vals, axis=1)
    rows = np.arange(at.w.size)
    v1, v2 = vals[rows, order[:, 0]], vals[rows, order[:, 1]]
    share = expit((v2 - v1) / mu)  # the second move's share of the two
    pool = np.flatnonzero((at.w > 0) & np.isfinite(v2) & (share > _SMOOTH_POOL))
    if pool.size == 0 or pool.size > _POOL_MAX:
        return None
    gap = np.where(np.isfinite(v2), (v1 - v2) / (1.0 + np.abs(v1)), np.inf)
    xi0 = np.where(share[pool] >= _SMOOTH_BOUND, share[pool], 0.0)
    return _kink_solve(at, amb, delta, lam, tol, pool, order, gap, xi0, _SMOOTH_KKT_ITERS,
                       _SMOOTH_KKT_STEP)


def smoothed_fallback(at: Atoms, amb, delta: np.ndarray, lam: float,
                      tol: float) -> Minimum | None:
    """The p = 2 minimiser where ``F`` has kinks too dense for Newton on ``F`` (finite
    ``kappa`` small against the budget: most atoms' switch points lie near ``lambda*``, and
    ``F`` has a kink wherever two of them meet, about ``1/n`` apart).

    ``G(delta, lambda) = lambda rho^2 + E_P max_c V_c`` is jointly convex (a supremum of
    functions convex in ``delta`` and affine in ``lambda``) and ``F = min_lambda G``. Its
    maxima over each atom's local maximisers are smoothed, ``max_c V_c <= mu log sum_c
    exp(V_c / mu) <= max_c V_c + mu log C``, keeping joint convexity; damped Newton in
    ``(delta, lambda)`` minimises ``G_mu`` for ``mu = _SMOOTH_START, ...,
    _SMOOTH_MIN`` (each stage from the last), a path of smooth convex problems whose
    minimisers converge to the minimiser of ``F``; from ``_SMOOTH_KKT`` on, the KKT solve of
    :func:`kink_fallback` starts from each stage's minimiser (:func:`_kkt_from`) and its
    solution is the answer (certified by the caller as any other). ``None`` where a stage
    fails (no descent) or no KKT solve succeeds.
    """
    d = delta.size
    x = np.concatenate([delta, [lam]])
    mu = _SMOOTH_START
    while True:
        value, g, h = _smoothed(at, amb, x, mu, True)
        for _ in range(_SMOOTH_ITERS):
            step = -psd_solve(h, g)
            dec = -float(g @ step)
            if not (np.all(np.isfinite(step)) and dec >= 0):
                return None
            if dec <= _SMOOTH_DEC * mu:
                break
            t = 1.0
            while True:
                cand = x + t * step
                if cand[d] > 0 and np.any(cand[:d]):
                    new = _smoothed(at, amb, cand, mu, False)[0]
                    if new <= value - _KKT_ARMIJO * t * dec:
                        break
                t *= 0.5
                if t < _SMOOTH_MIN_STEP:
                    break
            if t < _SMOOTH_MIN_STEP:
                break  # rounding: the stage is as converged as its arithmetic allows
            x = cand
            value, g, h = _smoothed(at, amb, x, mu, True)
        if mu <= _SMOOTH_KKT:
            found = _kkt_from(at, amb, x, mu, tol)
            if found is not None:
                return found
        if mu <= _SMOOTH_MIN:
            return None
        mu /= _SMOOTH_FACTOR


METHODS = SetMethods(
    name="wdpo2", evaluate=_evaluate, zero_test=_zero_test,
    coercive=lambda amb: amb.rho > 0, stall_fallback=kink_fallback, certify=certify,
    losses=False,  # the per-atom maximisations work on the margins alone
    conic="none: conic.py refuses p = 2 (no conic form of the per-atom sup); see "
          "tests/test_w2.py for the brute-force check")
