"""The Wasserstein p = 1 ball (SPEC 3.3): inner evaluation, smoothing, faces, certificates.

``kappa = inf``: ``F(delta) = E_P l + rho b`` exactly (a norm penalty, ``b = beta ||delta||``);
``delta = 0`` is optimal iff ``||E_P a|| / 2 <= rho beta``. Plain Newton minimises it.

Finite ``kappa``: the Shafieezadeh-Abadeh, Mohajerin Esfahani and Kuhn (2015) dual (SPEC 3.3)

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
(which make ``delta_mu`` stationary for ``L_q``), supply ``q``; :func:`minimise` runs the
homotopy and returns the certified gap as ``info["optimality_gap"]``.

The suprema are not attained (mass moved ever further): the worst case moves a mass
``eps`` of one atom far enough that its primal value is within ``_MOVE_TOL max(1, |L|)``
of ``L``. For finite ``kappa`` the ``kappa = inf`` test of ``delta = 0`` is used: it is
sufficient (a larger ball has larger directional derivatives). Conic forms: ``conic.py``
(forms ``"w1"`` and ``"w1kappa"``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
from scipy.special import expit

from ..losses import dpo_loss, softplus
from .core import (
    Atoms,
    InnerResult,
    Minimum,
    SetMethods,
    Stalled,
    Workspace,
    logistic_gap,
    logistic_hvp,
    loss_sigmoid,
    newton,
    range_basis,
    weighted_hess,
)
from .result import WorstCase

__all__ = ["METHODS", "W1SmoothState", "W1Start", "W1Threshold", "lower_bound", "minimise",
           "polish_face", "smoothed_w1", "smoothing_gap", "w1_lagrangian"]

#: Unattained part of a ``p = 1`` supremum left in the worst case (relative to ``max(1, |L|)``):
#: ten times the rounding of an ``n``-term sum.
_MOVE_TOL = 1e-13

#: Atoms farther than this many ``mu`` from the flip threshold have share 0 or 1 (to 4e-18).
_WINDOW = 40.0
#: Growth factor of the steps that bracket the flip threshold.
_BRACKET_GROWTH = 4.0
#: Atoms of the subsample whose weighted quantile is the first guess of the threshold
#: (its error, about ``n_sub^-1/2`` of the margins' spread, is bracketed in a few tries).
_QUANTILE_ATOMS = 10_000
#: The exact threshold atom is looked for among the margins this many square roots of its
#: estimated rank either side of it in that subsample (:func:`_threshold_atom`).
_BRACKET_SPREAD = 4.0
#: Iteration budget of the safeguarded Newton search for the threshold (bisection alone
#: halves the bracket each time: 100 halvings take any bracket of the margins' scale down
#: to the gap between two doubles).
_ROOT_ITERS = 100
#: The search stops after a Newton step below ``_ROOT_STEP mu``: the next one would be
#: about its square (quadratic convergence), far below rounding, and the budget is then
#: met to rounding by the first-order correction of the shares.
_ROOT_STEP = 1e-9
#: A smoothed share in ``(_FACE_SHARE, 1 - _FACE_SHARE)`` marks an atom as tied at the
#: threshold (outside it the share is within 1e-3 of 0 or 1: ``mu`` resolves the face).
_FACE_SHARE = 1e-3
#: With up to this many times as many groups of identical atoms in the window as a face can
#: tie, the face polish starts from a face it chooses (:func:`_face_start`; more: the
#: smoothing has not yet resolved the face). Counted by group, not by atom: on environment
#: data at n = 1e6 the window at mu = 1e-3 holds 500 to 1200 atoms in 4 to 9 groups.
#: Measured (d = 8, --no-merge, products with the full data): on Gaussian data at n = 1e6
#: (seeds 0-35) the windows at mu = 1e-5 held 10 to 49 atoms, those at 1e-4 over 100; 6
#: instead of 4 started the polish at 1e-5 where 4 waited for 1e-6 and its line searches
#: (seed 10: 15 products instead of 25, seed 27: 9 instead of 12) and changed no other
#: solve, nor any at n = 1e5 (8 Gaussian, 8 environment seeds) or on 8 environment seeds
#: at n = 1e6; 8 gave the same as 6.
_FACE_TRIM = 6
#: With ``lambda = b`` the polish first ties the groups of share within this of 1/2 (0.3 to
#: 0.7: margins within 0.85 mu of the threshold), the others on their side of it. Measured
#: (d = 8, --no-merge, 16 environment seeds at n = 1e6, 8 at n = 1e5): products with the
#: full data 86 instead of 100 (tying none first) and 42 instead of 48; 0.1 gave 89 and
#: 0.25 the same as 0.2. The groups of share near 1/2 at mu = 1e-3 are those the minimiser
#: ties; tying every group in the window moved delta away from it (shares of -10 to 11).
_FACE_TIE_BAND = 0.2
#: Rounding allowance of the face's shares and threshold (relative).
_FACE_ROUND = 1e-12
#: Below this residual the face Newton trusts its next step's shares (quadratic
#: convergence: the steps that follow are smaller): a share predicted outside ``[0, 1]``
#: by more than its step ends the round, a wrong face's shares being far outside (-61 to
#: 24 in one round). Measured residuals of a face solve's steps at n = 1e5 to 1e6: 1e-4 to
#: 3e-4, then 1e-7 to 3e-8, then 1e-12 to 4e-14. Against 1e-6 (d = 8, 12 Gaussian and
#: environment problems, n = 3e4 to 1e6), 1e-3 saved 3 to 4 of 13 to 19 evaluations in 4
#: solves and changed no other.
_FACE_EARLY = 1e-3
#: Active-set rounds of the face polish: a round that exchanges one atom for another
#: usually converges in one Newton step (one evaluation), and a face found saves the
#: later stages. Measured (d = 8, 12 Gaussian and environment problems, n = 3e4 to 1e6):
#: 4 rounds gave up on a face 5 exchanges away (Gaussian n = 1e6, seed 3: 20 smoothed
#: evaluations instead of 8); 6, 8 and 12 rounds the same, 5 solves fewer evaluations.
_FACE_ROUNDS = 8
#: Smallest backtracking step of the face Newton before it gives up: from the smoothed
#: minimiser the right face takes full steps, and a face whose steps must be cut 128-fold
#: is the wrong one (the homotopy goes on). Measured (d = 8, environment data, 13 seeds at
#: n = 3e4 to 1e6): 1e-6 spent 97 evaluations in one failed face at n = 1e5 (seed 5),
#: 1e-2 spent 21 and changed no other solve.
_FACE_MIN_STEP = 1e-2

#: The Hessian of ``E_P l`` built at margins ``m0`` is reused at margins ``m`` with
#: ``max_i |m_i - m0_i|`` below this: each atom's curvature ``s (1 - s)`` then changes by a
#: factor within ``exp(+-1e-3)`` (``|l'''| <= l''``), so Newton's steps stay within 1e-3 of
#: exact ones, three digits gained per step (the late steps of a stage and a face solve move
#: the margins by less). Measured (n = 1e5 and 1e6, Gaussian and environment data, d = 8):
#: 3-5 full-data Hessians instead of 4-8 for 1e-4 with the same evaluations; 1e-2 cost one
#: more evaluation at n = 1e5.
_HESS_REUSE = 1e-3
#: Far from the stage's minimiser (margins moved by more than ``_HESS_COARSE`` since the
#: last Hessian, or none yet) Newton's steps need only a rough Hessian: that of every
#: ``j``-th atom, ``_HESS_ATOMS`` of them (a relative error of about ``sqrt(d / 1e5)``,
#: 1% at d = 8, slows no step that far out), where that is at least ``_HESS_STRIDE_MIN``
#: times fewer atoms. Measured at n = 1e6, d = 8: the first two or three Hessians of the
#: homotopy move the margins by 1e-2 to 0.14, the later ones by 2e-4 to 5e-3.
_HESS_COARSE = 1e-2
_HESS_ATOMS = 100_000
_HESS_STRIDE_MIN = 4
#: A gradient at a point where one with other flip masses was computed corrects that one on
#: the atoms whose masses differ (:meth:`_LogisticPoint.flipped_grad`) where they are at
#: most this fraction of the atoms. Measured at n = 1e6, d = 8: the product with every
#: atom 3.1-3.5 ms, with the rows of 2% of them (``np.take``) 0.2 ms, 5% 0.5-1.6 ms; the
#: band of a stage change at mu = 1e-3 held 1.6% of the atoms (Gaussian data).
_BAND_FRACTION = 1.0 / 16.0

#: Smoothing parameters of the homotopy.
MU_PATH = tuple(10.0 ** -k for k in range(1, 12))
#: Stages below this may stop on rounding (the previous stage's minimiser is kept).
MU_SAFE = 1e-8
#: First smoothing stage when starting from a subsample's minimiser.
MU_WARM = 1e-3
#: The homotopy certifies its stages by a duality gap from this ``mu`` on ...
MU_CHECK = 1e-3
#: ... and stops once the relative gap is below ``GAP_TOL`` (it must end below ``GAP_MAX``):
#: the gap is computed to about 1e-15, and 1e-9 is the least that keeps theta within 1e-5.
GAP_TOL = 1e-13
GAP_MAX = 1e-9
#: Stage tolerance ``max(tol, _STAGE_TOL mu)``: a stage only needs to warm-start the next
#: and point to the face. Measured (d = 8, Gaussian and environment data, n = 1e5 and
#: 1e6): 1e-2 took one Newton step fewer than 1e-3 in 6 of 7 solves, the same optimum;
#: 1e-1 took more at n = 1e6 and left gaps near ``GAP_TOL``.
_STAGE_TOL = 1e-2
#: ... and ``max(tol, _WARM_STAGE_TOL mu)`` for the first stage from a subsample's minimiser
#: (``MU_WARM``), whose face the polish then usually solves (on repeated atoms). Measured
#: (d = 8, --no-merge, products with the full data over 8 environment and 4 to 6 Gaussian
#: seeds): at n = 1e6, 51 instead of 57 (environment) and 32 both (Gaussian); at n = 1e5,
#: 48 instead of 53 and 42 instead of 45. 3e-1 cost more Hessians on Gaussian data.
_WARM_STAGE_TOL = 1e-1


@dataclass(frozen=True, eq=False)
class W1SmoothState:
    """Warm start of the smoothed problem: ``lambda`` and the flip shares at the last point
    (:class:`_Threshold`, on the atoms near and above the threshold), and the homotopy's
    :class:`_Logistic`."""

    lam: float
    shares: _Threshold
    w: np.ndarray
    hess: _Logistic | None = None

    @property
    def q(self) -> np.ndarray:
        """The flip masses ``q = w sigmoid((m - lambda kappa) / mu)`` on every atom."""
        return self.w * self.shares.p

    @property
    def masses(self) -> _Masses:
        """``q`` on the atoms that carry it (:class:`_Masses`: those above and in the
        threshold's window)."""
        thr = self.shares
        return _Masses(np.concatenate([thr.top, thr.window]),
                       np.concatenate([thr.w_top, thr.w_window * thr.p_window]))


class _Masses(NamedTuple):
    """Flip masses ``q`` on the distinct atoms ``idx``, 0 on the others: the few percent of
    the atoms at and above the flip threshold carry them, so that ``q . a`` costs a product
    with their rows instead of all ``n`` (:func:`_row_sum`)."""

    idx: np.ndarray
    q: np.ndarray

    @classmethod
    def of(cls, q: np.ndarray) -> _Masses:
        """The masses of the ``n``-vector ``q``."""
        idx = np.flatnonzero(q)
        return cls(idx, q[idx])

    def dense(self, n: int) -> np.ndarray:
        """``q`` on every one of ``n`` atoms."""
        out = np.zeros(n)
        out[self.idx] = self.q
        return out


@dataclass(frozen=True, eq=False)
class W1Threshold:
    """The exact evaluation's flips at ``delta`` (:class:`_Flips`: its value, ``lambda``
    and flip masses): the final evaluation at the certified ``delta`` reuses them instead
    of searching the margins again. ``point``: ``E_P l`` there (:class:`_LogisticPoint`),
    which that evaluation takes from the certificate instead of computing the margins
    again."""

    delta: np.ndarray
    flips: _Flips
    point: _LogisticPoint | None = None

    def transfer(self) -> W1Start:
        """The state that starts another problem (a subsample's solution): ``lambda*``
        (the threshold is that of these atoms)."""
        return W1Start(self.flips.lam)


@dataclass(frozen=True, eq=False)
class W1Start:
    """A subsample's ``lambda*`` (:meth:`W1Threshold.transfer`), for the one evaluation of
    the full problem at the subsample's minimiser (``rho > 0``): :func:`_evaluate` with
    this state evaluates the majorant ``U(delta) = E_P l + lambda rho + E_P (m - lambda
    kappa)_+ >= F(delta)`` (``lambda >= b`` is feasible in the dual of ``F``, SPEC 3.3)
    instead of searching the margins for the exact flips. Its readers need no more: the
    test ``F < log 2`` (:mod:`.dual`: ``U`` below it proves ``delta = 0`` is not optimal)
    and the homotopy, which takes the margins and losses (``point``) and reads neither
    value nor gradient. Measured at n = 1e6, d = 8 (Gaussian data, loaded machine): the
    exact flips 6.3 ms, the majorant 2.8 ms, a matrix-vector product 5.1 ms."""

    lam: float
    point: _LogisticPoint | None = None


def _rows(at: Atoms, idx: np.ndarray) -> np.ndarray:
    """The rows ``a_idx = factor_idx x_idx`` (a few atoms: the threshold's window, a face)
    without the ``n x d`` matrix :attr:`~.core.Atoms.a`, which this module never builds
    (the products with it are :meth:`~.core.Atoms.matvec` and ``rmatvec``)."""
    return at.x[idx] * at.factor[idx, None]


def _row_sum(at: Atoms, idx: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``sum_j c_j a_{idx_j}``: the product with the rows ``idx`` alone (``np.take``, a
    third of the time of fancy indexing)."""
    return (c * np.take(at.factor, idx)) @ np.take(at.x, idx, axis=0)


def _groups(at: Atoms, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The groups of identical rows among the atoms ``idx``: ``(first, inverse)``, the
    position in ``idx`` of each group's first atom and each atom's group (``np.unique`` of
    the rows :func:`_rows`)."""
    _, first, inverse = np.unique(_rows(at, idx), axis=0, return_index=True,
                                  return_inverse=True)
    return first, inverse.ravel()


def _strided(at: Atoms, rows: slice) -> Atoms:
    """The atoms ``rows`` (a slice: views, no copy), weights as they are (not
    renormalised)."""
    return Atoms(at.x[rows], at.y[rows], at.w[rows], at.factor[rows], at.beta, at.scale,
                 at.radius)


class _Flipped(NamedTuple):
    """The flip masses ``c`` of a gradient ``-(w s - c) . a``
    (:meth:`_LogisticPoint.flipped_grad`): ``w`` on the atoms ``above`` (sorted: every atom
    of margin above ``cut``), ``c`` on the atoms ``idx`` (sorted, margins at most ``cut``),
    0 on the rest."""

    cut: float
    above: np.ndarray
    idx: np.ndarray
    c: np.ndarray


#: No flips: the gradient of ``E_P l`` alone.
_NO_FLIPS = _Flipped(math.inf, np.empty(0, np.intp), np.empty(0, np.intp), np.empty(0))


class _LogisticPoint:
    """``E_P l`` at one ``delta``: margins, losses, ``s = sigmoid(-m)``, value, the
    gradient ``-(w s) . a`` (:attr:`grad`, computed when first read) and the gradients with
    flips (:meth:`flipped_grad`: the smoothed and the exact objectives' single product
    with ``a``, or the correction of the last one at this point)."""

    def __init__(self, at: Atoms, delta: np.ndarray, m: np.ndarray | None = None,
                 l: np.ndarray | None = None) -> None:
        """``m = a delta`` and ``l = softplus(-m)`` are computed unless given; ``l`` and
        ``s`` in vectors of the atoms' pool, as ``m`` (:meth:`~.core.Workspace.fresh`: no
        page faults of fresh memory, 1.7 ms per vector at n = 1e6)."""
        self.at, self.delta = at, delta.copy()
        pool, n = at._pool, at.w.size
        self.m = at.matvec(delta) if m is None else m
        self.l = dpo_loss(self.m, pool.fresh("l", n)) if l is None else l  # softplus(-m)
        self.s = loss_sigmoid(self.l, pool.fresh("s", n))
        self.value = float(at.w @ self.l)
        self._grad: np.ndarray | None = None
        #: the last :meth:`flipped_grad` here, with its flips
        self._flipped: tuple[_Flipped, np.ndarray] | None = None

    @property
    def grad(self) -> np.ndarray:
        if self._grad is None:  # the flipped gradient without flips (or its correction)
            self._grad = self.flipped_grad(_NO_FLIPS)
        return self._grad

    def flipped_grad(self, flips: _Flipped) -> np.ndarray:
        """``-(w s - c) . a`` for the flip masses ``c`` of ``flips``.

        One product with ``a`` of the coefficients (in a vector of the atoms' pool); where
        a gradient with other flips was computed at this point (the homotopy's next stage,
        or its first from the evaluation at the subsample's minimiser, :class:`W1Start`), that one
        corrected by the difference of the masses instead, where it
        lies on at most ``_BAND_FRACTION`` of the atoms: ``-c_old`` on the old ``idx``,
        ``c`` on the new one, and ``+-w`` on the atoms of the lower cut's ``above`` with
        margins up to the higher cut (near the flip threshold; found on ``above`` itself,
        where a scan of the margins took 2 ms at n = 1e6).
        """
        at, m = self.at, self.m
        last, self._flipped = self._flipped, None
        if last is not None:
            old, grad = last
            low, high = (old, flips) if old.cut <= flips.cut else (flips, old)
            between = low.above[np.take(m, low.above) <= high.cut]
            band = np.concatenate([between, flips.idx, old.idx])
            if band.size <= _BAND_FRACTION * m.size:
                sign = 1.0 if low is flips else -1.0  # the new flips take the atoms between
                dc = np.concatenate([sign * np.take(at.w, between), flips.c, -old.c])
                grad = grad + _row_sum(at, band, dc)
                self._flipped = (flips, grad)
                return grad
        coef = np.multiply(at.w, self.s, out=at._pool.fresh("coef", m.size))
        coef[flips.above] -= at.w[flips.above]
        coef[flips.idx] -= flips.c
        grad = -at.rmatvec(coef)
        self._flipped = (flips, grad)
        return grad


class _Logistic:
    """``E_P l`` for one homotopy: the last point evaluated (:meth:`point`: the face
    polish, its rounds and the certificate evaluate the same ``delta`` again), and the
    Hessian ``H(m) = sum_i w_i s_i (1 - s_i) a_i a_i^T`` (:meth:`hess`), rebuilt only when
    the margins have moved by more than ``_HESS_REUSE`` since it was last built: a Newton
    direction within 1e-3 of the exact one for an ``O(n)`` test instead of ``O(n d^2)``,
    and no test where ``max_i ||a_i|| ||delta - delta_0||`` bounds the move by that
    (values, gradients and certificates never use it)."""

    def __init__(self) -> None:
        self.delta: np.ndarray | None = None
        self.m: np.ndarray | None = None
        self.h: np.ndarray | None = None
        self.coarse = False
        self.last: _LogisticPoint | None = None
        #: scratch n-vectors of the homotopy's evaluations (fresh ones cost page faults)
        self.work = Workspace()

    def hess(self, at: Atoms, pt: _LogisticPoint) -> np.ndarray:
        """``H(m)`` at the point ``pt``, or where the margins moved by more than
        ``_HESS_COARSE`` (or at the first call) and there are at least
        ``_HESS_STRIDE_MIN`` times ``_HESS_ATOMS`` atoms, its estimate from every ``j``-th
        atom (``_HESS_ATOMS`` of them, weights scaled to the total), never reused."""
        m, s = pt.m, pt.s
        same = self.m is not None and self.m.shape == m.shape
        if (same and not self.coarse and at.radius is not None
                and at.radius * float(np.linalg.norm(pt.delta - self.delta)) <= _HESS_REUSE):
            return self.h  # |m_i - m0_i| <= ||a_i|| ||delta - delta_0||
        buf = self.work.get("hess", m.size)
        moved = math.inf
        if same:
            np.subtract(m, self.m, out=buf)
            moved = float(np.abs(buf, out=buf).max())
        if self.coarse or not moved <= _HESS_REUSE:
            every = m.size // _HESS_ATOMS
            rows = slice(None, None, every)
            w_sub = float(at.w[rows].sum()) if every >= _HESS_STRIDE_MIN else 0.0
            if moved > _HESS_COARSE and w_sub > 0:
                c = at.w[rows] * s[rows] * (1.0 - s[rows]) * (float(at.w.sum()) / w_sub)
                self.h, self.coarse = weighted_hess(_strided(at, rows), c), True
            else:
                np.multiply(at.w, s, out=buf)
                buf *= 1.0 - s  # w s (1 - s)
                self.h, self.coarse = weighted_hess(at, buf), False
            self.delta, self.m = pt.delta, m
        return self.h

    def point(self, at: Atoms, delta: np.ndarray) -> _LogisticPoint:
        last = self.last
        if last is None or last.at is not at or not np.array_equal(last.delta, delta):
            self.last = last = _LogisticPoint(at, delta)
        return last


class _Face(NamedTuple):
    """A point on one face of the finite-kappa ``F``: ``delta`` and the exact flip masses."""

    delta: np.ndarray
    masses: _Masses


class _FaceSolution(NamedTuple):
    delta: np.ndarray
    t: float
    r: np.ndarray


@dataclass(frozen=True)
class _FarMove:
    """A mass ``eps`` of atom ``k`` (flipped or not) moved to ``x`` with label ``y``, at
    transport cost ``cost``."""

    flipped: bool
    k: int
    eps: float
    x: np.ndarray
    y: float
    cost: float


class _Split(NamedTuple):
    """The atoms near and above a flip threshold (:func:`_flip_threshold`): ``window``
    (sorted) and ``top`` (sorted, margins above ``cut``, total weight ``base``), with their
    margins and weights, gathered once for the evaluation that reads them
    (:func:`smoothed_w1`, the face polish, the gap estimate)."""

    window: np.ndarray
    top: np.ndarray
    cut: float
    m_window: np.ndarray
    w_window: np.ndarray
    m_top: np.ndarray
    w_top: np.ndarray
    base: float


class _Threshold:
    """The flip threshold ``t`` and its shares ``p_i = sigmoid((m_i - t) / mu)``, kept on
    the atoms that carry them: ``p_window`` on the atoms ``window`` within ``_WINDOW mu``
    of ``t`` (a superset), 1 on the atoms ``top`` above the window (those of margin above
    ``cut``, of weight ``base``), 0 on the rest (the fields of ``split``, a
    :class:`_Split`, are attributes); ``mass = sum_i w_i p_i``. Unpacks as
    ``(t, p, window)`` with :attr:`p` on every atom."""

    def __init__(self, t: float, split: _Split, p_window: np.ndarray, mass: float,
                 n: int) -> None:
        self.t, self.p_window, self.mass, self.n = t, p_window, mass, n
        (self.window, self.top, self.cut, self.m_window, self.w_window, self.m_top,
         self.w_top, self.base) = split

    @property
    def p(self) -> np.ndarray:
        p = np.zeros(self.n)
        p[self.top] = 1.0
        p[self.window] = self.p_window
        return p

    def __iter__(self):
        return iter((self.t, self.p, self.window))


def _mass_quantile(m: np.ndarray, w: np.ndarray, c: float) -> float:
    """Estimate of the ``t`` with ``sum_{m_i > t} w_i = c`` from every ``k``-th atom
    (``_QUANTILE_ATOMS`` of them): only the first guess of :func:`_flip_threshold`."""
    k = max(1, m.size // _QUANTILE_ATOMS)
    ms, ws = m[::k], w[::k]
    order = np.argsort(-ms)
    cum = np.cumsum(ws[order]) * (float(w.sum()) / max(float(ws.sum()), 1e-300))
    return float(ms[order[min(int(np.searchsorted(cum, c)), order.size - 1)]])


class _Root(NamedTuple):
    """:func:`_threshold_root`'s answer: ``side`` 0 with the root ``t`` and the shares ``p``
    at the last point evaluated; ``side`` +1 (-1) if the root lies above ``hi`` (below
    ``lo``; then ``t = lo`` and ``p`` its shares)."""

    side: int
    t: float
    p: np.ndarray | None


def _threshold_root(m: np.ndarray, w: np.ndarray, shift: float, mu: float, lo: float,
                    hi: float, t: float) -> _Root:
    """The root of the decreasing ``e(t) = shift + sum_i w_i sigmoid((m_i - t) / mu)`` in
    ``[lo, hi]``, from ``t`` in it, or the side of the interval it lies on.

    Newton's method (``e'(t) = -sum_i w_i p_i (1 - p_i) / mu``); each evaluation's sign
    narrows the bracket of the root, and a step that leaves the bracket bisects it. An end
    of ``[lo, hi]`` is evaluated only when a step leaves the interval there: from a warm
    start a call costs two to four evaluations (Brent's method, with both ends evaluated
    first, took about fifteen).
    """
    below, above = lo, hi  # the bracket: e(below) > 0 >= e(above) where evaluated
    known_below = known_above = False
    p = None
    for _ in range(_ROOT_ITERS):
        p = expit((m - t) / mu)
        e = shift + float(w @ p)
        if e > 0.0:
            below, known_below = t, True
        else:
            above, known_above = t, True
        if e == 0.0:
            return _Root(0, t, p)
        slope = float(w @ (p * (1.0 - p))) / mu
        step = e / slope if slope > 0.0 else math.copysign(math.inf, e)
        if abs(step) <= _ROOT_STEP * mu:
            return _Root(0, min(max(t + step, below), above), p)
        new = t + step
        if new >= above or new <= below:
            if new >= hi and not known_above:
                new = hi  # is the root above the interval?
            elif new <= lo and not known_below:
                new = lo
            else:
                new = 0.5 * (below + above)
                if not below < new < above:  # the bracket is two adjacent doubles
                    return _Root(0, t, p)
        if new == t:  # an end of the interval, evaluated: the root lies beyond it
            return _Root(1, t, p) if e > 0.0 else _Root(-1, t, p)
        t = new
    return _Root(0, t, p)


def _flip_threshold(m: np.ndarray, w: np.ndarray, t_min: float, c: float, mu: float,
                    t0: float | None) -> _Threshold:
    """Threshold ``t >= t_min`` with ``sum_i w_i sigmoid((m_i - t) / mu) = c`` and its shares.

    Returns ``t_min`` if the flipped mass there is already ``<= c``. Atoms more than
    ``_WINDOW mu`` from an interval ``[lo, hi]`` have shares 0 or 1 there (to 4e-18), so the
    mass on ``[lo, hi]`` needs only the atoms near it: the interval is centred at the warm
    start ``t0`` (or an estimate from a subsample of the margins), ``_WINDOW mu`` wide on
    each side, and moved and widened 4-fold until it holds the root (each try costs one
    comparison over the margins: the atoms above ``lo - _WINDOW mu``, the flipped mass
    and the window, are split on themselves, and a safeguarded Newton search,
    :func:`_threshold_root`, on the window alone).
    """
    win = _WINDOW * mu
    center = _mass_quantile(m, w, c) if t0 is None else t0
    half = win
    while True:
        lo = max(center - half, t_min)
        hi = max(center + half, lo + win)
        cand = np.flatnonzero(m > lo - win)
        mc, wc = np.take(m, cand), np.take(w, cand)
        inside = mc < hi + win
        out = ~inside
        w_top = wc[out]
        split = _Split(cand[inside], cand[out], float(np.nextafter(hi + win, -math.inf)),
                       mc[inside], wc[inside], mc[out], w_top, float(w_top.sum()))
        mi, wi, base = split.m_window, split.w_window, split.base
        root = _threshold_root(mi, wi, base - c, mu, lo, hi, min(max(center, lo), hi))
        if root.side == 0:
            break
        if root.side > 0:  # the root is above hi
            center, half = hi + _BRACKET_GROWTH * half, _BRACKET_GROWTH * half
        elif lo == t_min:  # lambda = b: the budget is not all flipped
            return _Threshold(t_min, split, root.p, base + float(wi @ root.p), m.size)
        else:  # the root is below lo
            center, half = lo - _BRACKET_GROWTH * half, _BRACKET_GROWTH * half
    # the shares are those of the last point evaluated, within _ROOT_STEP mu of the root,
    # and t is resolved only to rounding, which at small mu leaves sum w p off by much
    # more: one first-order step in t, applied to p (in the window: elsewhere p(1 - p) <
    # 4e-18), meets the budget to rounding.
    pi = root.p
    dp = pi * (1.0 - pi)
    sens = float(wi @ dp)
    mass = base + float(wi @ pi)
    if sens > 0:
        pi = np.clip(pi + (c - mass) * dp / sens, 0.0, 1.0)
        mass = base + float(wi @ pi)
    return _Threshold(root.t, split, pi, mass, m.size)


def smoothed_w1(at: Atoms, delta: np.ndarray, rho: float, kappa: float, mu: float,
                state: W1SmoothState | None = None,
                cache: _Logistic | None = None) -> InnerResult:
    """``F_mu(delta)`` with its gradient and Hessian (no worst case: see the module docstring).

    ``state`` warm-starts ``lambda``; the result's ``state`` holds ``lambda`` and the flip
    shares ``q = w sigmoid((m - lambda kappa) / mu)``. Besides ``E_P l`` (one product with
    ``a`` for the margins, one for the gradient) each evaluation works on the atoms at and
    above the threshold only. ``cache``: the :class:`_Logistic` to start with when
    ``state`` has none.
    """
    w, beta = at.w, at.beta
    if state is not None and state.hess is not None:
        cache = state.hess
    elif cache is None:
        cache = _Logistic()
    pt = cache.point(at, delta)  # E_P l: the last stage's last point starts the next stage
    m = pt.m
    dn = float(np.linalg.norm(delta))
    b = beta * dn
    t0 = None if state is None else state.lam
    thr = _flip_threshold(m, w, b * kappa, rho / kappa, mu, None if t0 is None else t0 * kappa)
    t, i, top, pi = thr.t, thr.window, thr.top, thr.p_window
    lam = b if t <= b * kappa else t / kappa  # exactly b when clamped
    mi, wi = thr.m_window, thr.w_window
    # mu softplus(x / mu) = x_+ + mu log1p(exp(-|x| / mu)), the second term below 4e-18 mu
    # outside the window (where x_+ is m - t on the atoms above it, 0 below)
    value = lam * rho + pt.value + float(thr.w_top @ (thr.m_top - t)) + float(
        wi @ np.maximum(mi - t, 0.0)) + mu * float(wi @ np.log1p(np.exp(-np.abs(mi - t) / mu)))
    # grad E_P l + sum_i w_i p_i a_i = -(w s - sum_i w_i p_i e_i) . a
    grad = pt.flipped_grad(_Flipped(thr.cut, top, i, wi * pi))
    wc = wi * pi * (1.0 - pi) / mu  # w p (1 - p) / mu: 0 outside the window
    g_l = rho - kappa * thr.mass
    clamped = not (lam > b or dn == 0.0)
    if clamped:  # lambda = b(delta): chain rule through b = beta ||delta||
        grad = grad + g_l * beta * delta / dn

    def hess():
        ai = _rows(at, i)
        bi = ai * np.sqrt(wc)[:, None]
        h = cache.hess(at, pt) + bi.T @ bi
        g_dl = -kappa * (wc @ ai)
        g_ll = kappa**2 * float(wc.sum())
        if not clamped:  # lambda interior: Schur complement
            return h - np.outer(g_dl, g_dl) / g_ll if g_ll > 0 else h
        u = delta / dn
        db = beta * u
        return (h + np.outer(g_dl, db) + np.outer(db, g_dl) + g_ll * np.outer(db, db)
                + g_l * (beta / dn) * (np.eye(delta.size) - np.outer(u, u)))

    return InnerResult(value, lam, grad, hess, None, W1SmoothState(lam, thr, w, cache))


def smoothing_gap(at: Atoms, delta: np.ndarray, state: W1SmoothState, rho: float,
                  kappa: float, point: _LogisticPoint | None = None) -> float:
    """Cheap estimate of the duality gap that :func:`w1_lagrangian` would certify for the
    smoothed shares ``q`` of ``state`` (:attr:`W1SmoothState.q`, at ``delta``).

    With ``t = lam kappa >= kappa b`` the threshold of the shares,
    ``F(delta) - L_q(delta) <= sum_i w_i (m_i - t)_+ - q_i (m_i - t)`` (``lambda = t / kappa``
    is feasible in the dual of ``F``). ``delta`` is stationary for ``L_q``, so
    ``L_q(delta)`` is ``min L_q`` to second order; the estimate is the smaller of that
    bound and ``log 2 - L_q(delta)`` (the candidate ``delta = 0``, where ``F = log 2``),
    relative to ``max(1, F)``. The sums run over the atoms that carry a share
    (:class:`_Threshold`): the terms of the others vanish (share 1 above the window, where
    ``(m_i - t)_+ = m_i - t``; share 0 below it, where ``(m_i - t)_+ = 0``), and the
    window's and the top's few percent of the margins cost no ``n``-vector.
    ``point``: ``E_P l`` at ``delta`` if known (the homotopy's :class:`_Logistic`).
    """
    point = _LogisticPoint(at, delta) if point is None else point
    thr = state.shares  # with the margins at delta
    m_win, w_win = thr.m_window, thr.w_window
    q_win = w_win * thr.p_window
    x = m_win - state.lam * kappa
    flipped = thr.base + float(q_win.sum())  # sum q
    lagrangian = point.value + float(thr.w_top @ thr.m_top) + float(q_win @ m_win) + (
        (rho - kappa * flipped) * at.beta * float(np.linalg.norm(delta)))
    gap = min(float(w_win @ np.maximum(x, 0.0) - q_win @ x), math.log(2.0) - lagrangian)
    return gap / max(1.0, lagrangian)


def _lagrangian(at: Atoms, delta: np.ndarray, qa: np.ndarray, nu: float,
                cache: _Logistic | None = None) -> InnerResult:
    """``E_P l + qa . delta + nu ||delta||`` with its gradient and (lazy) Hessian.

    ``L_q`` of :func:`w1_lagrangian` with ``qa = q . a`` and ``nu = (rho - kappa sum q)
    beta``; also the stationarity part of the face system of :func:`_solve_face`. The
    terms of ``E_P l`` come from ``cache`` when given (:class:`_Logistic`).
    """
    pt = _LogisticPoint(at, delta) if cache is None else cache.point(at, delta)
    dn = float(np.linalg.norm(delta))
    u = delta / dn if dn > 0 else np.zeros_like(delta)

    def hess():
        s = pt.s
        h = weighted_hess(at, at.w * s * (1.0 - s)) if cache is None else cache.hess(at, pt)
        if dn > 0:
            h = h + (nu / dn) * (np.eye(delta.size) - np.outer(u, u))
        return h

    value = pt.value + float(qa @ delta) + nu * dn
    return InnerResult(value, None, pt.grad + qa + nu * u, hess, None)


def w1_lagrangian(at: Atoms, q: np.ndarray, rho: float, kappa: float,
                  cache: _Logistic | None = None):
    """``L_q(delta) = E_P l + q . m + (rho - kappa sum q) beta ||delta||`` for ``q`` in ``Q``.

    ``q`` is scaled down if rounding left ``kappa sum q`` above ``rho``. Returns a function
    ``(delta, state) -> InnerResult`` (value, gradient, Hessian) for Newton's method; its
    minimum is a lower bound on ``min_delta F`` (see the module docstring). ``cache``: as
    for :func:`_lagrangian`.
    """
    qa, nu = _lagrangian_terms(at, _Masses.of(q), rho, kappa)
    return lambda delta, state: _lagrangian(at, delta, qa, nu, cache)


def _lagrangian_terms(at: Atoms, masses: _Masses, rho: float, kappa: float):
    """``(q . a, nu)`` of :func:`w1_lagrangian` for the masses ``q`` (:class:`_Masses`)
    clipped into ``Q``."""
    q = np.clip(masses.q, 0.0, np.take(at.w, masses.idx))
    if kappa * float(q.sum()) > rho:
        q = q * (rho / (kappa * float(q.sum())))
    return _row_sum(at, masses.idx, q), max(rho - kappa * float(q.sum()), 0.0) * at.beta


def _solve_face(at: Atoms, delta: np.ndarray, t: float, tied: np.ndarray, big_w: np.ndarray,
                r0: np.ndarray, full: np.ndarray, clamped: bool, rho: float, kappa: float,
                tol: float, max_iter: int, cache: _Logistic | None = None):
    """Newton's method on the optimality system of ``min F`` on one face (see polish_face).

    ``tied`` holds one representative atom per group of identical atoms, ``big_w`` the
    groups' weights and ``r0`` their starting shares; ``full``, the atoms flipped in full
    (above the threshold: a few percent of them). Returns the face's ``delta``, threshold
    ``t`` and group shares ``r``, or ``None`` if Newton stalls.
    """
    beta, d = at.beta, delta.size
    groups, k = _rows(at, tied), tied.size
    w_rows = np.take(at.w, full)
    a_full = _row_sum(at, full, w_rows)
    w_full = float(w_rows.sum())

    def residual(z):
        """The system's residual at ``z`` and its Jacobian (a function: only the accepted
        points of the line search need it)."""
        delta, r = z[:d], z[d + (0 if clamped else 1):]
        flipped = w_full + float(r @ big_w)
        # stationarity: grad L_q = 0 for the shares q of this face (nu = 0 if lambda > b)
        nu = (rho - kappa * flipped) * beta if clamped else 0.0
        lag = _lagrangian(at, delta, a_full + (r * big_w) @ groups, nu, cache)
        dn = float(np.linalg.norm(delta))

        def jac():
            if clamped:
                slope = groups - kappa * beta * delta / dn  # d (a_j . delta - kappa b) / d delta
                out = np.zeros((d + k, d + k))
                out[:d, :d], out[:d, d:], out[d:, :d] = (
                    lag.hess(), (slope * big_w[:, None]).T, slope)
                return out
            out = np.zeros((d + k + 1, d + k + 1))
            out[:d, :d], out[:d, d + 1:] = lag.hess(), (groups * big_w[:, None]).T
            out[d:d + k, :d], out[d:d + k, d] = groups, -1.0
            out[d + k, d + 1:] = big_w
            return out
        if clamped:
            return np.concatenate([lag.grad, groups @ delta - kappa * beta * dn]), jac
        return np.concatenate([lag.grad, groups @ delta - z[d], [flipped - rho / kappa]]), jac

    z = np.concatenate([delta, r0] if clamped else [delta, [t], r0])
    res, jac = residual(z)
    for _ in range(max_iter):
        if np.max(np.abs(res)) <= tol:
            delta, r = z[:d], z[d + (0 if clamped else 1):]
            return _FaceSolution(
                delta, kappa * beta * float(np.linalg.norm(delta)) if clamped else z[d], r)
        norm = float(np.linalg.norm(res))
        step = np.linalg.lstsq(jac(), -res, rcond=None)[0]
        r, dr = z[d + (0 if clamped else 1):], step[d + (0 if clamped else 1):]
        if (np.max(np.abs(res)) <= _FACE_EARLY
                and np.any(np.abs(r + dr - 0.5) > 0.5 + _FACE_ROUND + np.abs(dr))):
            # near the face's solution a share's Newton prediction leaves [0, 1] by more
            # than the step (and the polish's rounding allowance): the polish moves it off
            # the face without the last steps
            return _FaceSolution(z[:d], kappa * beta * float(np.linalg.norm(z[:d])) if clamped
                                 else z[d], r + dr)
        step_len = 1.0
        while step_len > _FACE_MIN_STEP:
            new = residual(z + step_len * step)
            if float(np.linalg.norm(new[0])) < (1.0 - 1e-4 * step_len) * norm:
                break
            step_len *= 0.5
        else:
            return None
        z, (res, jac) = z + step_len * step, new
    return None


def polish_face(at: Atoms, delta: np.ndarray, state: W1SmoothState, rho: float,
                kappa: float, tol: float, rounds: int | None = None, max_iter: int = 10,
                cache: _Logistic | None = None):
    """Exact minimiser of ``F`` on the face that the smoothed minimiser ``delta`` points to
    (``state``: the smoothing's there, with its ``lambda`` and shares ``q_i / w_i``).

    Atoms with a smoothed share ``q_i / w_i`` in ``(1e-3, 1 - 1e-3)`` are in the window of
    the flip threshold ``t``; identical atoms (the same row ``a_i``, hence the same margin
    and share) form groups ``j`` of weight ``W_j``. The rest keep share 1 or 0. A face ties
    at most ``d + 1`` groups (``d`` if ``lambda = b``). The first face tried
    (:func:`_face_start`):

    * ``lambda = b`` with at most ``_FACE_TRIM d`` groups in the window: the groups of
      share within ``_FACE_TIE_BAND`` of 1/2 tied (at most ``d``, those nearest 1/2), the
      others on the side of ``t`` their share points to. With ``lambda = b`` the budget is
      not all spent, and on repeated atoms the minimiser ties none or a few of the groups
      the window holds at ``mu = 1e-3``; tying them all moved ``delta`` away from it
      (group shares of -10 to 11) and took 3 to 5 rounds. If that face fails, the next
      start is tried;
    * otherwise every group, or, with more than ``d + 1`` (``d``) of them (up to
      ``_FACE_TRIM`` times as many), the half of that many nearest the threshold (shares
      nearest 1/2), the others on their side of it.

    Newton's method then solves the optimality system of ``min F`` on that face, unknowns
    ``delta``, the groups' shares ``r_j`` and (when ``lambda > b``) ``t``:

    * ``grad E_P l + sum_full w_i a_i + sum_j r_j W_j a_j + nu beta u = 0``,
    * ``a_j . delta = t`` for every group, with ``t = kappa b`` if ``lambda = b``,
    * ``kappa (w_full + sum_j r_j W_j) = rho`` if ``lambda > b``; otherwise
      ``nu = rho - kappa (w_full + sum_j r_j W_j)``.

    An active-set loop then moves groups with ``r_j < 0`` (``> 1``) to share 0 (1),
    atoms that crossed ``t`` into the tied set, and switches between ``lambda = b`` and
    ``lambda > b`` when ``nu < 0`` or ``t < kappa b``, and solves again (``rounds``
    times at most from each start, ``_FACE_ROUNDS`` by default). With ``lambda = b`` the
    face may tie no atom (no atom at the threshold ``kappa b``: ``F`` is smooth there, the
    Lagrangian of its flip pattern). Returns the face (its ``delta`` and exact flip masses,
    :class:`_Masses`), or ``None`` (more groups than unknowns, or Newton stalled). The
    caller certifies the answer by the duality gap, so a wrong face costs time, never
    accuracy. ``cache`` (the homotopy's :class:`_Logistic`) supplies the Hessian of ``E_P
    l``.
    """
    cache = _Logistic() if cache is None else cache
    lam = state.lam
    clamped = lam <= at.beta * float(np.linalg.norm(delta))
    for tied_mask, full, share in _face_start(at, state.shares, clamped):
        face = _face_rounds(at, delta, share, tied_mask, full, clamped, lam * kappa, rho, kappa,
                            tol, _FACE_ROUNDS if rounds is None else rounds, max_iter, cache)
        if face is not None:
            return face
    return None


def _face_start(at: Atoms, thr: _Threshold, clamped: bool):
    """The starting faces of :func:`polish_face` from the smoothed shares ``thr``, as
    ``(tied, full)`` masks of the atoms and the shares ``q_i / w_i`` (0 where ``w_i = 0``),
    in the order tried (a generator: the groups are found once, the masks built when
    the previous face failed); none where the window holds more than ``_FACE_TRIM`` times
    as many groups as a face can tie. The tied atoms lie in the window of ``thr`` (share 1
    above it, 0 below), so no ``n``-vector is built before a start is (at n = 1e6 the
    masks and shares cost 4 ms, most of a pass, in the stages whose window is too wide)."""
    win, top, w = thr.window, thr.top, at.w
    w_win, w_top = thr.w_window, thr.w_top
    q_win = w_win * thr.p_window
    share_win = (q_win / w_win if float(w_win.min(initial=1.0)) > 0
                 else np.divide(q_win, w_win, out=np.zeros_like(q_win), where=w_win > 0))
    tied = (share_win > _FACE_SHARE) & (share_win < 1.0 - _FACE_SHARE)
    idx, share_idx = win[tied], share_win[tied]
    # share 1 on the atoms above the window (0 where they weigh nothing, as q / w)
    full_idx = np.concatenate([top[w_top > 0], win[share_win >= 1.0 - _FACE_SHARE]])

    def face(out=None):
        """The masks and shares with the tied atoms ``out`` moved to their side."""
        share = np.zeros(w.size)
        share[top] = np.where(w_top > 0, 1.0, 0.0)
        share[win] = share_win
        tied_mask, full = np.zeros(w.size, bool), np.zeros(w.size, bool)
        tied_mask[idx] = True
        full[full_idx] = True
        if out is not None:
            tied_mask[idx[out]] = False
            full[idx[out]] = share_idx[out] >= 0.5
        return tied_mask, full, share

    limit = at.x.shape[1] + (0 if clamped else 1)
    if idx.size <= (0 if clamped else limit):
        yield face()
        return
    # the smoothing has not resolved the face yet: no start. Identical atoms share their
    # share, so its distinct values (a sort of the window's floats) bound the groups from
    # below without the sort of their rows (1-3 ms for the 1400 distinct atoms of a window
    # at n = 1e6, Gaussian data)
    if np.unique(share_idx).size > _FACE_TRIM * limit:
        return
    first, inverse = _groups(at, idx)
    groups = first.size
    if groups > _FACE_TRIM * limit:
        return
    off = np.abs(share_idx[first] - 0.5)  # each group's share off 1/2
    order = np.argsort(off, kind="stable")
    keeps = [min(int(np.count_nonzero(off < _FACE_TIE_BAND)), limit)] if clamped else []
    keeps.append(limit // 2 if groups > limit else groups)
    for keep in dict.fromkeys(keeps):  # the groups order[:keep] tied, each start once
        yield face(np.isin(inverse, order[keep:]))  # positions in idx


def _face_rounds(at: Atoms, delta: np.ndarray, share: np.ndarray, tied_mask: np.ndarray,
                 full: np.ndarray, clamped: bool, t: float, rho: float, kappa: float,
                 tol: float, rounds: int, max_iter: int, cache: _Logistic):
    """The active-set rounds of :func:`polish_face` from one starting face: a
    :class:`_Face` or ``None``."""
    w, beta, d = at.w, at.beta, delta.size
    for _ in range(rounds):
        idx = np.flatnonzero(tied_mask)
        if idx.size == 0 and not clamped:  # lambda > b needs an atom split at the threshold
            return None
        first, inverse = _groups(at, idx)
        big_w = np.bincount(inverse, w[idx])
        if first.size > d + (0 if clamped else 1):
            return None
        r0 = np.clip(np.bincount(inverse, share[idx] * w[idx]) / big_w, 0.0, 1.0)
        full_idx = np.flatnonzero(full)
        out = _solve_face(at, delta, t, idx[first], big_w, r0, full_idx, clamped, rho, kappa,
                          tol, max_iter, cache)
        if out is None:
            return None
        delta, t, r = out.delta, out.t, out.r
        m = cache.point(at, delta).m
        eps = _FACE_ROUND * max(1.0, abs(t))
        r_atoms = r[inverse]
        below, above = r_atoms < -_FACE_ROUND, r_atoms > 1.0 + _FACE_ROUND
        # the atoms (of positive weight) on the wrong side of t: flipped in full below it,
        # or neither flipped nor tied above it (found among the few above it: no n-vector)
        high = np.flatnonzero(m > t + eps)
        crossed = np.concatenate([full_idx[np.take(m, full_idx) < t - eps],
                                  high[~(full[high] | tied_mask[high])]])
        crossed = crossed[np.take(w, crossed) > 0]
        w_full = np.take(w, full_idx)
        flipped = float(w_full.sum() + r @ big_w)
        switch = (rho - kappa * flipped < -_FACE_ROUND) if clamped else (
            t < kappa * beta * float(np.linalg.norm(delta)) * (1.0 - 1e-15))
        if not (below.any() or above.any() or crossed.size or switch):
            return _Face(delta, _Masses(np.concatenate([full_idx, idx]), np.concatenate(
                [w_full, w[idx] * np.clip(r_atoms, 0.0, 1.0)])))
        full = full.copy()
        full[idx[above]] = True
        tied_mask = tied_mask.copy()
        tied_mask[idx[below | above]] = False
        tied_mask[crossed] = True
        full &= ~tied_mask
        clamped = clamped != switch
        share = full.astype(np.float64)
        share[idx[~(below | above)]] = np.clip(r_atoms[~(below | above)], 0.0, 1.0)
    return None


# --- the exact inner evaluation -------------------------------------------------------------


def _lowest(m: np.ndarray, mass: np.ndarray, sign: float) -> tuple[int, float]:
    """Index and value of the smallest ``sign m_i`` over the atoms with ``mass_i > 0``
    (``(-1, inf)`` if there are none), without an ``n``-array where every mass is positive."""
    pos = mass > 0
    if pos.all():
        k = int(np.argmin(m) if sign > 0 else np.argmax(m))
    else:
        idx = np.flatnonzero(pos)
        if idx.size == 0:
            return -1, math.inf
        k = int(idx[np.argmin(sign * m[idx])])
    return k, sign * float(m[k])


class _FarAtom(NamedTuple):
    """The atom ``k`` whose mass the far move takes (flipped or kept), that mass, and its
    ``+-m_k`` (the margin of its worst-case copy)."""

    flipped: bool
    k: int
    mass: float
    margin: float


def _far_atom(m: np.ndarray, w: np.ndarray, cand: np.ndarray, f: np.ndarray) -> _FarAtom:
    """The kept atom of lowest margin or the flipped one of highest, whichever is lower
    (``f``: the flip masses of the sorted atoms ``cand``, the rest of the mass kept).

    The kept atom is ``argmin m`` over the atoms of positive weight unless the flips take
    all its mass (then it is searched on the kept masses, an ``n``-array): ``cand`` holds
    the highest margins, so this is the lowest kept one with no ``n``-array of masses; the
    flipped one is searched on ``cand`` alone.
    """
    if float(w.min()) > 0:
        k = int(np.argmin(m))
    else:
        pos = np.flatnonzero(w > 0)
        k = int(pos[np.argmin(m[pos])])
    j = int(np.searchsorted(cand, k))
    kept = float(w[k] - f[j]) if j < cand.size and cand[j] == k else float(w[k])
    mk = float(m[k])
    if not kept > 0:  # all of it flipped
        keep = w.copy()
        keep[cand] = w[cand] - f
        k, mk = _lowest(m, keep, 1.0)
        kept = float(keep[k]) if k >= 0 else 0.0
    idx = np.flatnonzero(f > 0)
    if idx.size:
        j_f = int(idx[np.argmax(m[cand[idx]])])
        if -float(m[cand[j_f]]) < mk:
            return _FarAtom(True, int(cand[j_f]), float(f[j_f]), -float(m[cand[j_f]]))
    return _FarAtom(False, k, kept, mk)


def _moved_far(at: Atoms, m: np.ndarray, cand: np.ndarray, f: np.ndarray, delta: np.ndarray,
               mu: float, value: float) -> _FarMove:
    """A mass ``eps`` of the lowest-margin kept atom, moved by ``mu / eps`` along ``-ytil u``.

    ``f`` are the masses of the atoms ``cand`` flipped (:func:`_far_atom`). Moving ``eps``
    by ``t`` gains at least ``mu b - eps softplus(m_k)``; ``eps`` is chosen so that this
    shortfall is at most ``_MOVE_TOL max(1, |value|)``.
    """
    dn = float(np.linalg.norm(delta))
    flipped, k, mass, mk = _far_atom(m, at.w, cand, f)
    eps = min(mass, _MOVE_TOL * max(1.0, abs(value)) / max(float(softplus(mk)), 1e-300))
    t = mu / eps
    y_k = 1.0 - at.y[k] if flipped else at.y[k]
    x_new = at.x[k] - (2.0 * y_k - 1.0) * t * delta / dn
    return _FarMove(flipped, k, eps, x_new, float(y_k), eps * t)


def _atoms_part(x: np.ndarray, y: np.ndarray, mass: np.ndarray, flipped: bool):
    """``(weights, x, y, source)`` of the worst-case atoms at the nominal features ``x``
    (labels ``y``) with ``mass`` (labels flipped if ``flipped``): every atom, zero masses
    included, when at least half have positive mass (the caller's ``x`` itself: no ``n x
    d`` gather, which would cost a copy of the features in time and memory), else those
    with positive mass."""
    if 2 * int(np.count_nonzero(mass > 0)) >= mass.size:
        return mass, x, 1.0 - y if flipped else y, np.arange(mass.size)
    idx = np.flatnonzero(mass > 0)
    return mass[idx], x[idx], 1.0 - y[idx] if flipped else y[idx], idx


class _WorstAtoms:
    """The atoms of the worst case (SPEC 3.3), built only when :class:`.result.WorstCase`
    reads them (its builders :meth:`weights`, :meth:`x`, :meth:`y`, :meth:`source`): the
    kept masses ``w - flip`` at the nominal atoms, the flipped masses ``f`` of the atoms
    ``cand`` at the nominal features with flipped labels, and the far-moved mass ``far``
    (taken from its atom's kept or flipped mass). The solve reads none of them: at n = 1e6
    their ``n``-arrays (masses, labels, sources and their concatenations) cost about five
    passes. Only the caller's arrays ``x``, ``y``, ``w`` are kept, not the atoms (their
    factor and scratch vectors)."""

    def __init__(self, at: Atoms, cand: np.ndarray, f: np.ndarray, far: _FarMove | None):
        self._x, self._y, self._w = at.x, at.y, at.w
        self.cand, self.f, self.far = cand, f, far

    @functools.cached_property
    def _parts(self) -> list:
        far = self.far
        flip = np.zeros_like(self._w)
        flip[self.cand] = self.f
        keep = self._w - flip
        if far is not None:
            (flip if far.flipped else keep)[far.k] -= far.eps
        parts = [_atoms_part(self._x, self._y, keep, False),
                 _atoms_part(self._x, self._y, flip, True)]
        if far is not None:
            parts.append((np.array([far.eps]), far.x[None, :], np.array([far.y]),
                          np.array([far.k])))
        return [part for part in parts if part[0].size]

    def _stacked(self, j: int) -> np.ndarray:
        cols = [part[j] for part in self._parts]
        return cols[0] if len(cols) == 1 else np.concatenate(cols)

    def weights(self) -> np.ndarray:
        return self._stacked(0)

    def x(self) -> np.ndarray:
        """The features (the caller's ``x`` itself where they are all of them)."""
        return self._stacked(1)

    def y(self) -> np.ndarray:
        return self._stacked(2)

    def source(self) -> np.ndarray:
        return self._stacked(3)


class _Above(NamedTuple):
    """:func:`_threshold_atom`'s answer: the threshold atom ``k`` (``-1`` if there is none)
    and the atoms ``sel`` (sorted) of margin above the bracket's lower end, with their
    margins and weights: every atom of margin at least ``m_k`` (every atom above the cut
    where ``k = -1``) is one of them."""

    k: int
    sel: np.ndarray
    m: np.ndarray
    w: np.ndarray


def _threshold_atom(m: np.ndarray, w: np.ndarray, cut: float, rho: float,
                    kappa: float) -> _Above:
    """The atom ``k`` at which the weight of the atoms above ``cut``, summed by decreasing
    margin, first exceeds the budget (``kappa sum > rho``); ``-1`` if all of it is affordable.

    Only the atoms of margins in a bracket ``(lo, hi]`` with ``kappa W(hi) <= rho < kappa
    W(lo)`` (``W(t)``: the weight above ``t``) are sorted: the bracket comes from the order
    statistics of every ``j``-th atom (``_QUANTILE_ATOMS`` of them), ``_BRACKET_SPREAD
    sqrt(i)`` places either side of the estimate ``i`` of the threshold's rank there (a
    binomial count's four standard deviations), and is checked on the atoms above ``lo``
    (one comparison over the margins; widened 4-fold until it holds). A sort of a few
    thousand atoms at ``n = 1e6``, where a partition of every candidate took a pass.
    """
    every = max(1, m.size // _QUANTILE_ATOMS)
    ms, ws = m[::every], w[::every]
    order = np.argsort(-ms)
    cum = np.cumsum(ws[order]) * (float(w.sum()) / max(float(ws.sum()), 1e-300))
    i = int(np.searchsorted(kappa * cum, rho, side="right"))
    spread = int(_BRACKET_SPREAD * math.sqrt(i + 1.0)) + 2
    while True:
        hi = float(ms[order[i - spread]]) if i >= spread else math.inf
        lo = max(float(ms[order[i + spread]]) if i + spread < order.size else cut, cut)
        sel = np.flatnonzero(m > lo)
        m_sel, w_sel = np.take(m, sel), np.take(w, sel)
        up = m_sel > hi
        mass_hi = float(w_sel[up].sum())
        if kappa * float(w_sel.sum()) > rho:
            if not kappa * mass_hi > rho:
                break
        elif lo == cut:  # all the weight above the cut is affordable
            return _Above(-1, sel, m_sel, w_sel)
        spread *= 4  # the estimate missed: hi = inf and lo = cut hold at the latest
    win = np.flatnonzero(~up)  # positions in sel
    win = win[np.argsort(-m_sel[win])]
    j = int(np.searchsorted(kappa * (mass_hi + np.cumsum(w_sel[win])), rho, side="right"))
    return _Above(int(sel[win[min(j, win.size - 1)]]), sel, m_sel, w_sel)


class _Flips(NamedTuple):
    """The exact ``F(delta)`` (:func:`_flips`): value, ``lambda``, the weight ``mu`` of the
    norm term left in the gradient (``rho - kappa sum f``, 0 at a kink of the quantile),
    and the flip masses ``f`` of the atoms ``cand`` at and above the threshold ``thr``, the
    only ones that may carry one (``None`` for ``kappa = inf``)."""

    value: float
    lam: float
    mu: float
    cand: np.ndarray | None
    f: np.ndarray | None
    thr: float = math.inf


def _flips(at: Atoms, delta: np.ndarray, m: np.ndarray, l: np.ndarray, amb, dn: float,
           state) -> _Flips:
    """``F(delta)`` from the margins ``m`` and losses ``l`` (``dn = ||delta||``): the budget
    flips the atoms of largest margin above ``b kappa`` (only those can gain), in full up to
    the threshold atom, which is split at a kink of ``lambda`` (SPEC 3.3). A state
    :class:`W1Threshold` at ``delta`` (the certificate's evaluation) supplies them; with
    a :class:`W1Start` they are those of its majorant (its ``lambda``, weight ``mu = 0``:
    ``lambda`` does not vary with ``delta``)."""
    beta, rho, kappa, w = at.beta, amb.rho, amb.kappa, at.w
    b = beta * dn
    if math.isinf(kappa):
        return _Flips(float(w @ l) + rho * b, b, rho, None, None)
    if isinstance(state, W1Threshold) and np.array_equal(state.delta, delta):
        return state.flips
    if isinstance(state, W1Start):  # the majorant U: every atom above t flipped
        lam = max(state.lam, b)
        t = lam * kappa
        cand = np.flatnonzero(m > t)
        mc, f = np.take(m, cand), np.take(w, cand)
        return _Flips(lam * rho + float(w @ l) + float(f @ (mc - t)), lam, 0.0, cand, f, t)
    above = _threshold_atom(m, w, b * kappa, rho, kappa)  # only m > b kappa can gain
    k = above.k
    v_q = max(0.0, float(m[k])) if k >= 0 else 0.0
    lam = max(b, v_q / kappa)
    # the same product as the cut: a threshold atom (m_k > b kappa) is always a kink (its
    # quotient m_k / kappa may round to b, which left it fully flipped, over the budget)
    kink = v_q > b * kappa
    thr = v_q if kink else lam * kappa  # >= b kappa
    # the atoms that carry a flip: above the threshold, and those tied at it at a kink;
    # all of them lie in above.sel (m_k above its lower end; all above b kappa if k = -1)
    keep = above.m >= thr if kink else above.m > thr
    cand, mc, wk = above.sel[keep], above.m[keep], above.w[keep]
    full = mc > thr
    f = np.where(full, wk, 0.0)
    mu = rho - kappa * float(f.sum())
    if kink:  # lambda* at a kink: split the atoms at the threshold
        tie = (mc == thr) & (wk > 0)
        f = f + np.where(tie, wk, 0.0) * (mu / kappa) / float(wk[tie].sum())
        mu = 0.0
    value = lam * rho + float(w @ l) + float(wk @ np.where(full, mc - thr, 0.0))
    return _Flips(value, lam, max(mu, 0.0), cand, f, thr)


def _evaluate(at: Atoms, delta, m, l, amb, hess, worst, state) -> InnerResult:
    beta, rho, kappa, w = at.beta, amb.rho, amb.kappa, at.w
    majorant = isinstance(state, W1Start)
    if majorant and (worst or rho == 0.0):  # the exact F: a worst case, or plain Newton's
        state, majorant = None, False
    dn = float(np.linalg.norm(delta))
    flips = _flips(at, delta, m, l, amb, dn, state)
    value, lam, mu, cand, f, thr = flips
    finite = not math.isinf(kappa)
    if finite:  # the gradient -(w s - f) . a through E_P l at delta (:class:`_LogisticPoint`)
        # the point that the state brings (the final evaluation's), else a new one
        pt = (state.point if isinstance(state, W1Threshold) and state.point is not None
              and np.array_equal(state.delta, delta) else _LogisticPoint(at, delta, m, l))
        s = pt.s
        tied = m[cand] <= thr  # the atoms at the threshold (a kink's split)
        grad = pt.flipped_grad(_Flipped(thr, cand[~tied], cand[tied], f[tied]))
    else:
        s = loss_sigmoid(l)
        grad = -at.rmatvec(w * s)
    if dn > 0:
        grad = grad + mu * beta * delta / dn

    def h():
        out = weighted_hess(at, w * s * (1.0 - s))
        if dn > 0:
            u = delta / dn
            out = out + (mu * beta / dn) * (np.eye(delta.size) - np.outer(u, u))
        return out

    def hvp(v):  # h() @ v in two O(n d) passes
        out = logistic_hvp(at, w * s * (1.0 - s))(v)
        if dn > 0:
            u = delta / dn
            out = out + (mu * beta / dn) * (v - u * float(u @ v))
        return out
    wc, primal = None, None
    if worst:
        if cand is None:
            cand, f = np.empty(0, np.intp), np.empty(0)
        cost = kappa * float(f.sum()) if f.any() else 0.0
        # E_{Q*} l from the margins: a flipped atom's loss is softplus(m) = l + m
        primal = float(w @ l) + float(f @ m[cand])
        far = None
        if mu > 0 and dn > 0:
            far = _moved_far(at, m, cand, f, delta, mu, value)
            cost += far.cost
            m_far = (2.0 * far.y - 1.0) * beta * float(far.x @ delta)
            # its mass leaves the atom k (loss l_k kept, l_k + m_k flipped) for x_far
            primal += far.eps * (float(dpo_loss(np.array([m_far]))[0])
                                 - float(l[far.k]) - (float(m[far.k]) if far.flipped else 0.0))
        atoms = _WorstAtoms(at, cand, f, far)
        wc = WorstCase(atoms.weights, atoms.x, atoms.y, atoms.source, float(cost), float(rho))
    state = None
    if finite:  # the start's state marks its majorant: no exact flips to reuse
        state = W1Start(lam, pt) if majorant else W1Threshold(delta.copy(), flips,
                                                               None if worst else pt)
    # m and l are kept with the worst case for the certificate (:func:`_certificate`), and
    # for kappa = inf always (no state holds them): the worst case that ends the solve
    # reuses Newton's last (:func:`.inner.evaluate_inner`)
    keep = worst or not finite
    return InnerResult(float(value), float(lam), grad, h if hess else None, wc, state,
                       margins=m if keep else None, losses=l if keep else None,
                       hvp=hvp if hess else None, primal=primal if worst else None)


#: Values of ``s`` tried by the finite-kappa zero test: geometric with ratio ``2^(1/8)``
#: down from ``min(||E xh||, 2 rho)`` (the optimal ``s = ||g_f||`` is at most both), over
#: six octaves. The ``s`` that certify form an interval (the minimum over ``f`` of
#: ``||g_f||^2 / (4 s) + s / 4 + kappa sum f`` is convex in ``s``); a factor-2 grid missed it
#: 2% above the collapse radius (tests/test_defects.py). Closer to the collapse radius the
#: homotopy still decides.
_ZERO_S_STEPS, _ZERO_S_PER_OCTAVE = 48, 8


def _zero_test(at: Atoms, amb) -> float | None:
    """``delta = 0`` certified optimal with gap 0, or ``None``.

    ``kappa = inf``: the subgradient test (exact, closed form) ``||E_P a|| / 2 <= rho beta``.
    Finite ``kappa``: flipping a share ``f_i in [0, w_i]`` of each atom and moving mass far
    (slope 1 per unit of transport) gives ``F'(0; v) >= 0`` for every ``v`` iff ``psi(f) =
    ||g_f|| / 2 + kappa sum f <= rho`` for some ``f``, ``g_f = E xh - 2 sum_i f_i xh_i``, ``xh
    = ytil x`` (the dual ``max_{||e|| <= 1} E[e . xh / 2 - (e . xh - kappa)_+]`` is the collapse
    radius of :func:`simulator.collapse_radius`). With ``||g|| / 2 = min_s ||g||^2 / (4 s) +
    s / 4``, ``psi(f) <= rho`` iff for some ``s``: ``||g_f||^2 + 4 s kappa sum f <= 4 s rho -
    s^2``, the p = 2 flip test (:func:`.wasserstein2.flip_shares`) with radius ``sqrt(4 s rho -
    s^2)`` and price ``4 s kappa``; every candidate ``f`` is checked on ``psi`` itself.
    """
    ea = at.mean_a
    if 0.5 * float(np.linalg.norm(ea)) <= amb.rho * at.beta:
        return 0.0
    if not math.isfinite(amb.kappa):
        return None
    from ..ambiguity import Wasserstein
    from .wasserstein2 import flip_shares

    mean = ea / at.beta  # E xh, without the n x d array xh = a / beta
    norm = float(np.linalg.norm(mean))
    # the dual at e = E xh / ||E xh|| above rho proves delta = 0 not optimal (one pass)
    proj = at.matvec(mean) / (at.beta * norm)
    if 0.5 * norm - float(at.w @ np.maximum(proj - amb.kappa, 0.0)) > amb.rho:
        return None
    s_top = min(norm, 2.0 * amb.rho)
    for s in s_top * 2.0 ** (-np.arange(_ZERO_S_STEPS) / _ZERO_S_PER_OCTAVE):
        r2 = 4.0 * s * amb.rho - s * s
        f = flip_shares(at, Wasserstein(math.sqrt(r2), p=2, kappa=4.0 * s * amb.kappa))
        if f is not None:
            g = mean - 2.0 * at.rmatvec(f) / at.beta
            if 0.5 * float(np.linalg.norm(g)) + amb.kappa * float(f.sum()) <= amb.rho:
                return 0.0
    return None


def _certificate(at: Atoms, amb, delta: np.ndarray, res: InnerResult, info: dict) -> float:
    """Certified relative gap: the homotopy's duality gap for finite ``kappa`` (``rho > 0``);
    otherwise ``F >= E_P l + rho beta u . delta'`` (``u = delta / ||delta||``), a logistic
    regression plus a linear term that equals ``F`` at ``delta``, bounded by
    :func:`~.core.logistic_gap` (the worst case's far-moved mass would make the generic bound
    useless)."""
    if math.isfinite(amb.kappa) and amb.rho > 0:
        return info.get("optimality_gap", math.inf)
    dn = float(np.linalg.norm(delta))
    linear = amb.rho * at.beta * delta / dn if dn > 0 and amb.rho > 0 else None
    m, l = (res.margins, res.losses) if res.margins is not None else (None, None)
    # res.grad, E_P grad l + rho beta u, is that bound's gradient at delta (the same sums)
    return logistic_gap(at, at.w, delta, res.value, linear, m=m, l=l,
                        radius=at.max_norm(), grad=res.grad) / max(1.0, abs(res.value))


# --- the homotopy ------------------------------------------------------------------------


def lower_bound(at: Atoms, amb, delta: np.ndarray, q: _Masses, tol: float,
                max_iter: int, cache: _Logistic | None = None) -> float:
    """A certified lower bound on ``min_delta L_q(delta)``, hence on ``min F``
    (:func:`w1_lagrangian`).

    Newton from ``delta`` (where ``L_q`` is nearly stationary); at its last point ``L_q``
    is bounded below by the logistic loss plus the linear term ``(q . a + nu u) . delta'``
    (``nu ||delta'|| >= nu u . delta'``), equal to it there, whose minimum
    :func:`~.core.logistic_gap` bounds. ``q``: the flip masses (:class:`_Masses`);
    ``cache``: the homotopy's :class:`_Logistic`.
    """
    cache = _Logistic() if cache is None else cache
    qa, nu = _lagrangian_terms(at, q, amb.rho, amb.kappa)  # w1_lagrangian's, kept for the bound

    def objective(d, state):
        return _lagrangian(at, d, qa, nu, cache)
    try:
        delta = newton(objective, delta, tol, max_iter, f"the Lagrangian bound of {amb!r}").delta
    except Stalled as exc:  # rounding-level stall: still a valid point to bound from
        delta = exc.delta

    def bound(delta):
        res = objective(delta, None)  # Newton's last evaluation when delta is its last point
        pt = cache.point(at, delta)
        dn = float(np.linalg.norm(delta))
        linear = qa + (nu * delta / dn if dn > 0 else 0.0)
        # the Lagrangian's gradient res.grad is the bound's at delta (the same sums)
        return res.value - logistic_gap(at, at.w, delta, res.value, linear, m=pt.m, l=pt.l,
                                        radius=at.max_norm(), grad=res.grad)
    lower = bound(delta)
    if lower == -math.inf and (inside := _onto_atoms(at, delta)) is not None:
        lower = bound(inside)
    return lower


def _onto_atoms(at: Atoms, delta: np.ndarray) -> np.ndarray | None:
    """``delta`` projected onto the span ``S`` of the atoms (the range of ``E_P a a^T``, to
    ``core._RANK_TOL``), or ``None`` where they span every direction.

    ``L_q(delta') >= L_q(P delta')`` (``E_P l`` and ``q . a . delta'`` see only ``P
    delta'``, and ``||delta'|| >= ||P delta'||``), so ``min L_q`` is its minimum over ``S``.
    Newton's stopping point has a part outside ``S`` of the size of its tolerance, which the
    linearised norm term ``nu u . delta'`` turns into a linear direction that no atom sees
    (the bound ``-inf``: 2 to 5 atoms in d = 2, 3, all on one line or fewer than ``d``); from
    ``P delta`` the bound's gradient lies in ``S``, where ``E_P l`` is strictly convex.
    """
    basis = range_basis(weighted_hess(at, at.w))[1]
    if basis.shape[1] in (0, delta.size):
        return None
    return basis @ (basis.T @ delta)


class _Certified(NamedTuple):
    gap: float
    delta: np.ndarray
    state: W1Threshold | None


def _certify(at: Atoms, amb, delta: np.ndarray, q: _Masses, tol: float,
             max_iter: int, cache: _Logistic) -> _Certified:
    """The better of ``delta`` and ``0`` (``F(0) = log 2``: ``theta_ref`` can be optimal
    through flips alone) and its relative gap to ``min L_q``."""
    pt = cache.point(at, delta)
    flips = _flips(at, delta, pt.m, pt.l, amb, float(np.linalg.norm(delta)), None)
    upper, state = flips.value, W1Threshold(delta.copy(), flips)
    if upper > math.log(2.0):
        upper, delta, state = math.log(2.0), np.zeros_like(delta), None
    lower = lower_bound(at, amb, delta, q, tol, max_iter, cache)
    return _Certified(max(upper - lower, 0.0) / max(1.0, abs(upper)), delta, state)


def _homotopy(at: Atoms, amb, delta: np.ndarray, tol: float, max_iter: int,
              mu_first: float, cache: _Logistic) -> Minimum:
    """Minimise the finite-kappa ``F`` through the smoothed ``F_mu`` (module docstring).

    From ``mu = MU_CHECK`` on, each stage's minimiser is first polished on the face it
    points to (:func:`polish_face`), and the candidates are certified by the duality gap
    ``F(delta) - min L_q`` (:func:`lower_bound`); the homotopy stops at the first relative
    gap below ``GAP_TOL``, reported as ``info["optimality_gap"]``. ``cache``: the
    :class:`_Logistic` of the first stage.
    """
    label, total, state = repr(amb), 0, None
    for mu in (mu for mu in MU_PATH if mu <= mu_first):
        rel = _WARM_STAGE_TOL if mu == mu_first == MU_WARM else _STAGE_TOL
        stage_tol = tol if mu == MU_PATH[-1] else max(tol, rel * mu)  # warm starts
        try:
            run = newton(lambda d, st, mu=mu: smoothed_w1(at, d, amb.rho, amb.kappa, mu, st,
                                                          cache),
                         delta, stage_tol, max_iter, f"{label} (smoothing mu={mu:g})", state)
        except Stalled as stall:
            if mu < MU_SAFE:
                break  # below MU_SAFE the minimiser has stopped moving at double precision
            # a stage can stall at a kink of F_mu's limit, where the stall's flip masses may
            # still certify it (theta_ref optimal through flips alone: one atom, kappa <
            # 2 rho, stalled at delta = 1e-10 with every q = w / 2, certified gap 0)
            if not isinstance(stall.state, W1SmoothState):
                raise
            terms = stall.state.hess or cache
            cert = _certify(at, amb, stall.delta, stall.state.masses, tol, max_iter, terms)
            if not cert.gap <= GAP_TOL:
                raise
            return _found(at, amb, cert, total, terms)
        total += run.iterations
        delta, state = run.delta, run.state
        if mu > MU_CHECK:
            continue
        face = polish_face(at, delta, state, amb.rho, amb.kappa, tol, cache=state.hess)
        if face is not None:
            cert = _certify(at, amb, face.delta, face.masses, tol, max_iter, state.hess)
            if cert.gap <= GAP_TOL:
                return _found(at, amb, cert, total, state.hess)
        if smoothing_gap(at, delta, state, amb.rho, amb.kappa,
                         state.hess.point(at, delta)) <= 0.5 * GAP_TOL:
            cert = _certify(at, amb, delta, state.masses, tol, max_iter, state.hess)
            if cert.gap <= GAP_TOL:
                return _found(at, amb, cert, total, state.hess)
    cert = _certify(at, amb, delta, state.masses, tol, max_iter, state.hess)
    if not cert.gap <= GAP_MAX:
        raise RuntimeError(f"dual solver did not certify {label} (status: gap): the duality "
                           f"gap stayed at {cert.gap:.3e} > {GAP_MAX:g} after the smoothing "
                           "homotopy")
    return _found(at, amb, cert, total, state.hess)


def _found(at: Atoms, amb, cert: _Certified, iterations: int, cache: _Logistic) -> Minimum:
    """The certified minimiser with the exact evaluation there, worst case included (from
    the margins and losses that the certificate computed: the solve needs no evaluation
    of its own)."""
    pt = cache.point(at, cert.delta)  # with E_P l's gradient, where the bound computed it
    state = None if cert.state is None else replace(cert.state, point=pt)
    res = _evaluate(at, cert.delta, pt.m, pt.l, amb, False, True, state)
    return Minimum(cert.delta, iterations, cert.state, {"optimality_gap": cert.gap},
                   result=res)


def minimise(at: Atoms, amb, delta: np.ndarray, tol: float, max_iter: int,
             warm_started: bool, start: list | None = None) -> Minimum | None:
    """The homotopy for finite ``kappa`` and ``rho > 0`` (from ``MU_WARM`` when started at a
    subsample's minimiser, where the coarse stages would only move away from it); ``None``
    otherwise (plain Newton minimises ``E l + rho b``). ``start``: a list holding the
    evaluation at ``delta`` (:func:`_evaluate`; at a subsample's minimiser that of the
    majorant of :class:`W1Start`), popped: its margins and losses start the first stage."""
    if math.isinf(amb.kappa) or amb.rho == 0.0:
        return None
    cache = _Logistic()
    res = start.pop() if start else None
    if res is not None and isinstance(res.state, W1Start):
        cache.last = res.state.point  # cache.point checks its delta
    return _homotopy(at, amb, delta, tol, max_iter, MU_WARM if warm_started else MU_PATH[0],
                     cache)


METHODS = SetMethods(
    name="wdpo1", evaluate=_evaluate, zero_test=_zero_test, certify=_certificate,
    coercive=lambda amb: amb.rho > 0, minimise=minimise,
    smooth=lambda amb: math.isinf(amb.kappa) or amb.rho == 0.0,  # E_P l + rho b
    subsample_model=True,  # Newton's steps on E_P l + rho b (the homotopy never reads it)
    conic="simulator.solvers.conic: forms 'w1' (norm penalty) and 'w1kappa' (SA 2015)")
