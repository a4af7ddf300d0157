"""Shared core of the exact solvers: atoms, inner results, the PSD solve, damped Newton.

Nothing here knows about a particular ambiguity set: the set modules
(:mod:`.nominal`, :mod:`.kl`, :mod:`.chi2`, :mod:`.wasserstein1`, :mod:`.wasserstein2`)
build on it, and :mod:`.registry` maps each set to its module.

Notation (SPEC 3, docs/formulations.md): ``a_i = ytil_i beta x_i``, ``delta = theta -
theta_ref``, margins ``m_i = a_i . delta``, losses ``l_i = softplus(-m_i)``, per-atom
gradients ``-sigmoid(-m_i) a_i`` and Hessians ``sigmoid(m_i) sigmoid(-m_i) a_i a_i^T``.
Every robust objective is ``F(delta) = L_U(theta_ref + delta)``.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np
from scipy.linalg.lapack import dpotrf, dpotrs
from scipy.optimize import linprog, minimize
from scipy.special import expit

from ..data import PreferenceData
from ..losses import dpo_loss, margins
from .result import WorstCase

__all__ = ["Atoms", "InnerResult", "atom_radius", "Minimum", "NewtonRun", "SetMethods",
           "Reweighting", "RowSum", "Stalled", "Workspace", "ConcaveMax", "cg_solve", "concave_max",
           "min_norm_mean", "separating_direction",
           "curvature_bound", "logistic_gap", "logistic_hvp", "loss_sigmoid",
           "newton", "primal_value", "quasi_newton", "psd_solve", "reweighted",
           "reweighting_evaluate", "reweighting_result", "top_atoms", "unmerge", "weighted_hess",
           "worst_case_gap"]

#: The normalised problem (``Atoms.scale``) must keep ``theta ~ 1 / scale`` and its square
#: far from overflow and underflow (double precision spans 1e-308 .. 1e308).
_MIN_SCALE = 1e-150
_MAX_SCALE = 1e150
#: Entries of ``a`` between this and its inverse have squares (and sums of ``d`` squares)
#: far from overflow and underflow.
_SQUARE_SAFE = 1e-100
#: :meth:`Atoms.from_data` takes the scale from ``E_P ||x||^2`` directly when that is at
#: least this and every ``||x_i||^2`` at most its inverse: no square overflows, and squares
#: that underflow (each below 1e-308) change the mean by less than 1e-108 of itself.
_MEAN_SQ_SAFE = 1e-200
#: Relative allowance on the computed ``max_i ||a_i||`` for its rounding (a sum of ``d``
#: squares, a square root and a division: a few ulps), so that ``Atoms.radius`` bounds it.
_RADIUS_ULPS = 1e-12
#: Rows per chunk of the chunked ``n x d`` passes (:func:`weighted_hess`,
#: :func:`atom_radius`), so that no ``n x d`` temporary is allocated (the memory target of
#: issue 9: peak <= 4x the data at n = 1e7) and a chunk's temporary stays in cache.
#: Measured (one BLAS thread, ``weighted_hess``): 4096 rows was as fast as or faster than
#: 32768, 131072 and unchunked at (n, d) = (1e5, 8), (1e6, 8) and (1e5, 64).
_CHUNK_ROWS = 4096
#: :func:`_row_moments` works on blocks of this many entries (4 MB): a block and its squares
#: stay in cache from the squaring to the row sums.
_MOMENT_BLOCK = 1 << 19
#: From this many columns on, :func:`_row_moments` sums each block's row squares by
#: ``einsum("ij,ij->i")`` (no squared copy of the block: at n = 1e4, d = 64 the copy's 4 MB
#: of fresh pages cost about 1 ms inside a solve, 10% of a KL solve); below, the squares
#: and a product with ones are faster (one thread: at n = 1e6, d = 8 7.9 against 9.7 ms;
#: at d = 16 12.0 against 10.2 ms, at n = 1e5, d = 512 26.6 against 20.9 ms).
_MOMENT_EINSUM_D = 16
#: The products with the features (:meth:`Atoms.matvec`, :meth:`Atoms.rmatvec`) use
#: numpy's einsum loops instead of BLAS for matrices of at least this many columns and bytes
#: (beyond the last-level cache). Measured (one thread, this project's OpenBLAS 0.3.31 on
#: the shared AMD EPYC, ``x @ v`` and ``u @ x``, BLAS time over einsum's): 2.0-2.4 at d =
#: 64 and 128 from 50 MB on (n = 1e5 .. 1e6), 1.6-2.0 at d = 256, 0.9-1.4 at d = 512, but
#: 0.4-0.7 in cache (d = 64, n = 1e4 and 3e4) and 0.3-0.5 at d = 8 and 16 at every n.
#: On an Intel Xeon (OpenBLAS kernel ``SkylakeX``) BLAS was the faster at every size tried
#: (0.72-0.95 at d = 64 .. 512, n = 1e4 .. 1e6), so einsum is taken only where OpenBLAS
#: runs one of the kernels of ``_STREAM_KERNELS`` (:func:`_slow_dgemv`): a property of the
#: machine, the same for every solve of a process (results stay reproducible).
_STREAM_MIN_D = 48
_STREAM_MIN_BYTES = 24 << 20
_STREAM_KERNELS = ("zen",)
#: :func:`weighted_hess` uses the symmetric rank-k update from this many columns on; below,
#: the plain product (no square roots, no scaled copy of the chunk) is faster: one thread,
#: n = 1e6, 10.2 against 14.9-22.7 ms at d = 4 and 12.8-14.6 against 18.5-24.4 ms at d = 8,
#: equal at d = 16, and at d = 512 the update takes 0.56x the product's time.
_SYRK_MIN_D = 16
#: ... and the vectors a pool keeps at most: more than an evaluation, its line-search trial
#: and the warm-start state hold at once (a larger pool would only keep dead memory).
_POOL_SIZE = 4
#: Regularisations (relative to the mean diagonal) tried in turn when a Cholesky factor of
#: a PSD Hessian fails: from none up to 1e-5, below which a Newton step stays a descent
#: direction that the line search can shorten.
_PSD_REGS = (0.0, 1e-14, 1e-11, 1e-8, 1e-5)
#: Newton stops once its step is below this (relative to ``1 + ||delta||_inf``): a few
#: ulps of the iterate, where the step no longer changes it.
_STEP_TOL = 1e-13
#: Armijo's sufficient-decrease fraction (the customary 1e-4).
_ARMIJO = 1e-4
#: Rounding of an ``n``-term sum, relative to ``max(1, |F|)``: a step that raises ``F`` by
#: less than this is accepted if it lowers the gradient.
_SUM_ROUNDING = 1e-13
#: A full Newton step that cut ``||grad||_inf`` by at least this factor keeps its Hessian
#: for the next step (the chord method): near the minimiser the Hessian changes by
#: ``O(||step||)``, so the old one still gains two digits a step at no ``O(n d^2)`` cost. On
#: the benchmark problems (n = 1e6, d = 8) the last two of three full-data steps reuse the
#: first one's Hessian with the same gradients to within a factor of 10 (``1e-3, 1e-5,
#: 1e-8, 1e-11``); a slower step takes a fresh Hessian.
_CHORD_RATIO = 1e-2
#: ... unless the chord step cannot end the run where a fresh Hessian can
#: (:func:`_keeps_hessian`): the chord step from a Hessian one step old cuts the gradient
#: by about ``2 r`` (``r`` the last step's cut: the Hessian's error is ``L ||e_{k-1}|| ~ 2 r``
#: of it), a step older by the last chord step's cut; a fresh one by ``C ||g||`` with ``C =
#: ||g_k|| / ||g_{k-1}||^2`` of the last full step on a fresh Hessian (quadratic
#: convergence). Where the chord's prediction misses ``tol`` and Newton's meets it, one
#: Hessian (``O(n d^2)``, about 0.6 evaluations at n = 1e6, d = 8) saves an evaluation. On
#: the benchmark's environment data without merging (n = 1e6, chi-square) the gradients
#: ``4e-3, 1e-4, 2.5e-7, 8e-10, 3e-12`` (the chord's prediction ``9e-10``, measured
#: ``8.4e-10``; Newton's ``8e-13``) become ``4e-3, 1e-4, 2.5e-7, 1e-12``.
_CHORD_PREDICTION = 2.0
#: Chord steps that cut below ``_CHORD_RATIO`` and end the run within this many are taken
#: rather than a fresh Hessian that ends it in two: three evaluations against two and a
#: Hessian (at n = 1e6, d = 8 a Hessian costs about 0.6 evaluations, relatively more at
#: larger d), so the status quo is kept where the two are that close.
_CHORD_STEPS = 3
#: :func:`newton` with a ``fused`` objective evaluates the point after a fresh Hessian's
#: full step by it (the next Hessian formed at once, the gradient's product in its pass:
#: :data:`FUSED`) where the chord rule takes a fresh Hessian there for every gradient ``K
#: ||g||_inf^2`` with ``K`` in these (quadratic convergence; :func:`_takes_fresh`). Measured
#: on the model-corrected steps at n = 1e6, d = 8 (KL and chi-square, both data kinds,
#: seeds 0-2): ``K = 0.19 .. 0.96`` after the first step from the subsample start, ``0.45
#: .. 11`` after the second; a wrong guess costs a Hessian (about two passes there), a right
#: one saves the gradient's product (a third of a pass), so the smallest ``K`` lies below
#: every one measured (at ``K = 0.1`` the chord rule's own prediction would end the run from
#: the first step's ``||g||_inf = 1.5e-3`` already, and nothing is guessed there).
_QUADRATIC_RATES = (0.15, 1.0, 10.0)
#: :func:`_model_step`: chord iterations on the subsample model at most (each one subsample
#: evaluation; they contract by the Hessian's relative change along the step, 1e-2 .. 1e-1 on
#: the benchmark problems, so three reach the model's own accuracy) ...
_MODEL_ITERS = 3
#: ... stopped early once the model's gradient is below this fraction of Newton's ``tol``
#: (the step then ends the run as far as the model can tell).
_MODEL_TOL = 0.1
#: Smallest line-search step before Newton gives up (``2^-33``: 33 halvings).
_MIN_STEP = 1e-10
#: When the line search fails with ``||grad||_inf <= _NEAR_TOL * tol`` the iterate is
#: accepted: the gradient is within rounding of the tolerance.
_NEAR_TOL = 1e3
#: A step damped below this (six halvings) counts as heavily damped ...
_SHORT_STEP = 1.0 / 64
#: ... and this many in a row mean the iterates sit at a kink (status ``stagnated``).
_MAX_SHORT = 8
#: Iterates farther than this from ``theta_ref`` mean no minimiser (status ``unbounded``).
_DIVERGED = 1e8
#: A Newton step ending below this fraction of the current norm heads for the kink at 0.
_TOWARDS_ZERO = 0.5
#: Iterations of L-BFGS in :func:`quasi_newton` (it needs a few hundred at most on the
#: benchmark problems; Newton then polishes whatever is left).
_QN_ITERS = 2000
#: Correction pairs L-BFGS stores. Measured with the margin-space L-BFGS (iterations, pairs
#: 5 / 10 / 20 / 40): Gaussian n = 1e4, d = 512, DPO 13 / 13 / 13 / 13, KL 21 / 19 / 19 / 19,
#: chi-square 16 / 15 / 15 / 15; d = 64 the same from 10 pairs on; environment data (n =
#: 1e4, 1e5, d = 64) DPO 10 at every count but 9 with 5 pairs at 1e5 (KL and chi-square
#: have theta_ref optimal there).
#: The old note that scipy's default 10 needed 1.5x the iterations on the environment data
#: was not reproduced; 20 costs the same (the solves take about 20 iterations or fewer).
_QN_PAIRS = 20
#: The margin-space line search of :func:`_margin_lbfgs` (:func:`_ray_search`): a step is
#: accepted once ``|dF/dt| <= _WOLFE |dF/dt(0)|`` (strong Wolfe). The customary 0.9 of
#: quasi-Newton methods saves trial points; here a trial costs ``O(n)`` and an iteration two
#: ``O(n d)`` products, so a closer search pays where it saves iterations. Measured (Gaussian,
#: n = 1e4): DPO at d = 512, 15 iterations and 15 trial points with 0.9, 14 and 21 with 0.2,
#: 13 and 25 with 0.1; chi-square at d = 64, 11 and 12, 10 and 14, 9 and 15 ...
_WOLFE = 0.1
#: ... at most this many trial points (doubling or bisecting spans 2^40) before it gives
#: up (rounding: the polish takes over) ...
_LS_TRIALS = 40
#: ... a step still too short grows to the secant root of the slope, within this range of
#: multiples of itself ...
_EXPAND_MIN = 2.0
_EXPAND_MAX = 8.0
#: ... and a trial inside a bracket keeps this fraction of its width from either end.
_SAFEGUARD = 0.1
#: The margin-space search pays where a product with the atoms costs more than a trial
#: point (an ``O(n)`` loss, the set's dual search, a sigmoid): where the features stream from
#: memory (:data:`_STREAM_MIN_BYTES`, beyond the last-level cache). In cache (n = 1e4, d =
#: 64: a product 0.09 ms, a KL trial about 0.2 ms with its 2-3 tilts) it saved no time: by
#: count KL took 40 tilts and 23 products against scipy's 28 and 25, DPO 17 trials to save 4
#: products, and side by side the ratios were within the noise of scipy's path.
_MARGIN_MIN_BYTES = _STREAM_MIN_BYTES
#: Evaluations :func:`quasi_newton` keeps, for the point scipy returns (the last accepted
#: iterate: at most a line search's rejected trials back, two in the runs measured).
_QN_KEEP = 3
#: :func:`cg_solve` stops at this residual (relative to ``||g||``): each inexact Newton step
#: then cuts the gradient about 1e4-fold, so the polish from L-BFGS's last point (within a
#: few orders of the tolerance) takes one or two steps ...
_CG_TOL = 1e-4
#: ... of at most this many Hessian-vector products (two ``O(n d)`` passes each), or fewer
#: once the residual (the next gradient to first order) is below this fraction of Newton's
#: ``tol`` in the max norm: a polish from just above ``tol`` (L-BFGS stopped by rounding at
#: ``1.1 tol``: KL, n = 1e4, d = 512) then takes one or two products instead of 11 (the
#: fraction leaves room for the second-order term and the differences' error).
_CG_ITERS = 200
_CG_ATOL = 0.25
#: Step of the forward-difference Hessian-vector product (relative to ``1 + ||delta||``):
#: ``sqrt(eps)`` balances the ``O(h)`` truncation against the ``O(eps / h)`` rounding of
#: the gradients, a relative error of about 1e-8, far below ``_CG_TOL``.
_DIFF_STEP = 2.0**-26
#: Max-loss atoms: losses within this (relative) of the largest tie (rounding of softplus).
_TIE_TOL = 1e-14
#: Damped Newton iterations of :func:`concave_max` (it converges in a handful).
_CONCAVE_ITERS = 200
#: Before its Newton steps :func:`concave_max` probes the gradient ray at up to this many
#: steps ``2^k (level - value) / ||g||^2``, ``k = 1, 2, ...`` (doubling spans a 2^12-fold
#: range of curvature along the ray; each probe costs one ``O(n d)`` pass, a Newton step
#: ``O(n d^2)``).
_CONCAVE_PROBES = 12
#: :func:`concave_max` has converged when the Newton decrement (twice the rise its model
#: predicts) is below the rounding of the ``n``-term sums (:data:`_SUM_ROUNDING`, relative):
#: the old double-precision test (1e-15) was out of reach at n = 1e6. On the chi-square test
#: of a finite world's sample (n = 1e6, 30,000 distinct atoms, env seed 1 of
#: benchmarks/solvers.py) the decrement stopped at ``3.5e-15`` (the value at
#: ``0.27 +- 2e-15``, against ``rho >= 0.3``), and Newton went on with steps of ``2^-32``
#: for 200 iterations: 190 s, and then "undecided", so Newton on ``F`` stalled at the kink
#: where the merged atoms had certified ``delta = 0`` in 0.1 s.
_CONCAVE_TOL = _SUM_ROUNDING
#: Smallest line-search step of :func:`concave_max`.
_CONCAVE_MIN_STEP = 1e-12


@dataclass(frozen=True, eq=False)
class Atoms:
    """The data of one problem in the form the solvers use: ``a = ytil beta x / scale``.

    ``beta`` is the temperature divided by ``scale`` too, so that ``m = a . delta`` and
    ``b = beta ||delta||`` are those of the caller's problem at ``theta - theta_ref =
    delta / scale``: the solvers work on the normalised parameter ``delta = scale (theta -
    theta_ref)``, in which every tolerance is relative to the problem's own scale.

    The atoms are kept as the caller's ``x`` and the per-row factor ``factor = ytil beta``
    (with this ``beta``, the temperature over ``scale``: ``a_i = factor_i x_i``, ``|factor_i|
    = beta``): the products of the reweighting sets' passes are :meth:`matvec` (``a @ v =
    factor * (x @ v)``) and :meth:`rmatvec` (``u @ a = (u factor) @ x``), an ``O(n)``
    product more each, and the ``n x d`` matrix ``a`` itself (a copy: about 2.5 passes at n
    = 1e4, d = 512, for the page faults of fresh memory) is built only where it is read (the
    Wasserstein sets); once built, the products use it. ``mean``, when given, is ``E_P a``
    (:attr:`mean_a`).
    """

    x: np.ndarray
    y: np.ndarray
    w: np.ndarray
    factor: np.ndarray
    beta: float
    scale: float = 1.0
    radius: float | None = None
    mean: np.ndarray | None = field(default=None, repr=False)

    @functools.cached_property
    def a(self) -> np.ndarray:
        """The ``n x d`` matrix of the atoms ``a_i = factor_i x_i`` (built on first read)."""
        return self.x * self.factor[:, None]

    @functools.cached_property
    def index(self) -> np.ndarray:
        """``0, ..., n - 1``: the source of every atom of a reweighting (:func:`reweighted`,
        built when a worst case's ``source`` is first read), one array for all the
        evaluations of a minimisation."""
        return np.arange(self.x.shape[0])

    @property
    def mean_a(self) -> np.ndarray:
        """``E_P a``: one ``O(n d)`` product on first read, kept (the zero tests, the start
        and the restart all use it)."""
        if self.mean is None:
            object.__setattr__(self, "mean", self.rmatvec(self.w))
        return self.mean

    def built(self) -> np.ndarray | None:
        """The matrix :attr:`a` if it has been built (read), else ``None``."""
        return self.__dict__.get("a")

    def matvec(self, v: np.ndarray) -> np.ndarray:
        """``a @ v = factor * (x @ v)`` (:func:`_matvec`), or ``a @ v`` once :attr:`a` is
        built: a new ``n``-vector, or one of an earlier product that nothing references any
        more (:meth:`Workspace.fresh`)."""
        a = self.built()
        out = (self._pool.fresh("matvec", self.x.shape[0])
               if self.x.dtype == np.float64 and v.dtype == np.float64 else None)
        if a is not None:
            return _matvec(a, v, out)
        m = _matvec(self.x, v, out)
        m *= self.factor
        return m

    @functools.cached_property
    def _pool(self) -> Workspace:
        return Workspace()

    def rmatvec(self, u: np.ndarray, v: np.ndarray | None = None) -> np.ndarray:
        """``u @ a = (u factor) @ x`` (:func:`_rmatvec`), or ``u @ a`` once :attr:`a` is
        built; with ``v``, ``(u v) @ a`` (the product ``u v`` formed in the same scratch
        vector: no temporary)."""
        a = self.built()
        if a is not None:
            return _rmatvec(u if v is None else u * v, a)
        # u factor in one scratch n-vector of the atoms (a fresh one per product costs page
        # faults at n = 1e6)
        out = np.multiply(u, self.factor, out=self._scratch)
        if v is not None:
            out *= v
        return _rmatvec(out, self.x)

    @functools.cached_property
    def _scratch(self) -> np.ndarray:
        return np.empty(self.x.shape[0])

    def max_norm(self) -> float:
        """An upper bound on ``max_i ||a_i||`` (exact unless a subset's atoms): ``radius``
        when :meth:`from_data` computed it, else one ``O(n d)`` pass."""
        if self.radius is not None:
            return self.radius
        return atom_radius(self.x, self.factor)

    @classmethod
    def from_data(cls, data: PreferenceData, beta: float, normalise: bool = False) -> Atoms:
        """The atoms of ``data``; with ``normalise``, ``scale`` is the root mean square
        ``sqrt(E_P ||ytil beta x||^2)`` (1 if every atom is 0).

        With ``normalise`` the scale and the radius come from one chunked pass over ``x``
        (:func:`_row_moments`: ``||ytil beta x_i|| = beta ||x_i||``); no ``n x d`` matrix is
        built. ``E_P a`` is left to :attr:`mean_a`, a product on first read: a solve that
        starts from a subsample never reads it (at n = 1e6, d = 8 the product inside the
        moments' pass cost 2.5 ms, a third of a pass).

        Raises
        ------
        ValueError
            When that scale is outside ``[_MIN_SCALE, _MAX_SCALE]``: double precision
            cannot then represent ``theta`` (``O(1 / scale)``) and the margins together.
        """
        x, w, ytil = data.x, data.weights, data.ytil  # ytil: a new vector, scaled in place
        if not normalise:
            ytil *= beta
            return cls(x, data.y, w, ytil, beta)
        mean_sq, top_sq = _row_moments(x, w)
        unit = 1.0
        if not (_MEAN_SQ_SAFE <= mean_sq and top_sq <= 1.0 / _MEAN_SQ_SAFE):
            # squares that could overflow or underflow: the moments of x / max |x|
            unit = max(float(x.max()), -float(x.min()))  # no n x d temporary
            if unit == 0.0:  # every atom is 0
                ytil *= beta
                return cls(x, data.y, w, ytil, beta, mean=np.zeros(data.d))
            mean_sq, top_sq = _row_moments(x, w, unit)
        rms = unit * math.sqrt(mean_sq)
        scale = _check_scale(beta * rms)
        inv = 1.0 / rms
        if not math.isfinite(inv):  # a_i = x_i / rms: the factor itself must be finite
            raise ValueError(f"x has root mean square {rms:.3e}: its inverse, the factor of "
                             "the normalised atoms, overflows; rescale the features")
        # max ||a_i|| after the scaling, with a few ulps to spare: an upper bound
        radius = unit * math.sqrt(top_sq) / rms * (1.0 + _RADIUS_ULPS)
        ytil *= inv
        return cls(x, data.y, w, ytil, inv, scale, radius)

    def subset(self, idx: np.ndarray) -> Atoms:
        """The atoms ``idx`` (integer indices or a slice), weights renormalised (``radius``
        stays an upper bound). Integer rows are gathered by ``np.take``: 0.6 ms against
        2.4 ms for fancy indexing of 25,000 rows of ``x`` at n = 1e6, d = 8 (the subsample
        start)."""
        if isinstance(idx, slice):
            x, y, w, factor = self.x[idx], self.y[idx], self.w[idx], self.factor[idx]
        else:
            x, y, w, factor = (np.take(v, idx, axis=0)
                               for v in (self.x, self.y, self.w, self.factor))
        return Atoms(x, y, w / w.sum(), factor, self.beta, self.scale, self.radius)


@functools.lru_cache(maxsize=1)
def _slow_dgemv() -> bool:
    """Whether numpy's BLAS is an OpenBLAS running a kernel of ``_STREAM_KERNELS`` (its
    architecture as :func:`threadpoolctl.threadpool_info` reports it; read once)."""
    from threadpoolctl import threadpool_info
    return any(str(lib.get("architecture", "")).lower().startswith(_STREAM_KERNELS)
               for lib in threadpool_info() if lib.get("internal_api") == "openblas")


def _streams(x: np.ndarray) -> bool:
    """Whether the products with ``x`` take :func:`numpy.einsum`'s loops instead of BLAS
    (``_STREAM_MIN_D``, ``_STREAM_MIN_BYTES``; rows contiguous in memory, on a BLAS of
    :func:`_slow_dgemv`, as measured)."""
    return (x.shape[1] >= _STREAM_MIN_D and x.nbytes >= _STREAM_MIN_BYTES
            and x.flags.c_contiguous and _slow_dgemv())


def _matvec(x: np.ndarray, v: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``x @ v`` (into ``out`` if given), by einsum where :func:`_streams` says so."""
    return np.einsum("ij,j->i", x, v, out=out) if _streams(x) else np.matmul(x, v, out=out)


def _rmatvec(u: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``u @ x``, by einsum where :func:`_streams` says so."""
    return np.einsum("i,ij->j", u, x) if _streams(x) else u @ x


def _row_moments(x: np.ndarray, w: np.ndarray,
                 unit: float = 1.0) -> tuple[float, float]:
    """``(E_P ||x_i / unit||^2, max_i ||x_i / unit||^2)`` in one pass over blocks of
    ``_MOMENT_BLOCK`` entries: below ``_MOMENT_EINSUM_D`` columns (or with a ``unit``) each
    block's squares in one scratch block and their row sums by a product with ones (at n =
    1e6, d = 8, one BLAS thread: 5.2 ms against 6.6 ms for ``einsum("ij,ij->i")``), from
    there by that einsum (no scratch block)."""
    rows = max(1, _MOMENT_BLOCK // x.shape[1])
    ones = np.ones(x.shape[1])
    narrow = x.shape[1] < _MOMENT_EINSUM_D
    buf = np.empty((min(rows, x.shape[0]), x.shape[1])) if narrow or unit != 1.0 else None
    tot, top = [], 0.0
    # squares beyond double precision are expected (inf or 0): the caller then asks again
    # with ``unit = max |x|``
    with np.errstate(over="ignore", under="ignore"):
        for lo in range(0, x.shape[0], rows):
            blk = x[lo:lo + rows]
            if buf is None:
                sq = np.einsum("ij,ij->i", blk, blk)
            else:
                sq = buf[:blk.shape[0]]
                if unit == 1.0:
                    np.multiply(blk, blk, out=sq)
                else:
                    np.divide(blk, unit, out=sq)
                    sq *= sq
                sq = sq @ ones
            tot.append(float(w[lo:lo + rows] @ sq))
            top = max(top, float(sq.max()))
    return math.fsum(tot), top


def _check_scale(scale: float) -> float:
    """``scale`` if double precision can hold ``theta ~ 1 / scale`` and the margins together."""
    if not _MIN_SCALE <= scale <= _MAX_SCALE:
        raise ValueError(
            f"beta * x has scale {scale:.3e} (root mean square of ytil beta x), outside "
            f"[{_MIN_SCALE:g}, {_MAX_SCALE:g}]: double precision cannot represent the "
            "minimiser theta (of order 1 / scale); rescale the features or beta")
    return scale


def atom_radius(a: np.ndarray, factor: np.ndarray | None = None) -> float:
    """``max_i ||a_i||``, or with ``factor`` ``max_i |factor_i| ||a_i||`` (one ``O(n d)``
    pass, in chunks: no ``n x d`` temporary)."""
    top = 0.0
    for lo in range(0, a.shape[0], _CHUNK_ROWS):
        blk = a[lo:lo + _CHUNK_ROWS]
        sq = np.einsum("ij,ij->i", blk, blk)
        if factor is not None:
            sq *= np.square(factor[lo:lo + _CHUNK_ROWS])
        top = max(top, float(sq.max(initial=0.0)))
    return math.sqrt(top)




@dataclass(frozen=True, eq=False)
class InnerResult:
    """``F(delta)``, its dual variable, Danskin gradient, optional Hessian and worst case.

    ``hess`` is a function of no arguments returning the Hessian (computed only when
    called, so that line searches do not pay for it), or ``None`` if not requested.
    ``state`` is the set's warm-start state at ``delta`` (a frozen dataclass of the set's
    module, or ``None``), passed to the next evaluation. ``margins`` and ``losses`` are
    ``m = a delta`` and ``l = softplus(-m)`` on the problem's atoms (set by
    :func:`reweighting_result` for the sets certified by :func:`worst_case_gap`, which
    reuses them).
    ``hvp``, where the set supplies it, is ``v -> H v`` without forming ``H`` (two
    ``O(n d)`` passes, e.g. :func:`logistic_hvp`): :func:`quasi_newton`'s Newton polish then
    solves by conjugate gradients instead of the ``O(n d^2)`` dense Hessian; ``None`` means
    use ``hess``. ``primal``, where the set computes it with the worst case, is ``E_{Q*} l``
    from the margins it already has (``None``: recomputed from the worst case's atoms).
    ``chord=False`` keeps :func:`newton` from reusing the Hessian for the step after this
    evaluation (the chord rule): for a set whose evaluation costs many times its Hessian.
    """

    value: float
    dual: float | None
    grad: np.ndarray
    hess: Callable[[], np.ndarray] | None
    worst_case: WorstCase | None
    state: Any = None
    margins: np.ndarray | None = None
    losses: np.ndarray | None = None
    hvp: Callable[[np.ndarray], np.ndarray] | None = None
    primal: float | None = None
    chord: bool = True


def _pool_only_count() -> int:
    """The reference count :meth:`Workspace.fresh` reads for a pooled vector that nothing
    else holds, measured the same way (the pool's list and the argument of
    ``sys.getrefcount``: 2 in CPython 3.11; measured, not assumed, since the interpreter's
    own counting of the argument may differ between versions)."""
    pool = [np.empty(0)]
    i = 0
    return sys.getrefcount(pool[i])


#: :meth:`Workspace.fresh`: the reference count of a pooled vector that nothing else holds.
_POOL_ONLY = _pool_only_count()


class Workspace:
    """What the evaluations along one minimisation share (a set's warm-start state carries
    it from one to the next): named scratch ``n``-vectors, reused because at n = 1e6 a
    fresh one costs page faults (the kernel maps and zeroes its 8 MB) on top of the work
    done in it, and whether the weights are all equal (the sets then leave out their
    products with them). Scratch from :meth:`get` is overwritten by the next evaluation, so
    nothing that outlives an evaluation (a result's arrays, what its Hessian closure reads)
    may be one; those come from :meth:`fresh`, which recycles only vectors nothing else
    references any more."""

    def __init__(self) -> None:
        self._bufs: dict[str, np.ndarray] = {}
        self._pools: dict[str, list[np.ndarray]] = {}
        self._w: np.ndarray | None = None
        self._w0: float | None = None

    def get(self, name: str, n: int, dtype=np.float64) -> np.ndarray:
        """The scratch vector ``name`` of ``n`` entries (uninitialised)."""
        buf = self._bufs.get(name)
        if buf is None or buf.shape != (n,) or buf.dtype != dtype:
            buf = self._bufs[name] = np.empty(n, dtype)
        return buf

    def fresh(self, name: str, n: int) -> np.ndarray:
        """A vector of ``n`` floats (uninitialised) that may outlive the evaluation: one of
        the pool ``name`` that nothing outside the pool references any more (no result, view
        or closure: CPython's reference count), else a new one, added to the pool while it
        holds fewer than :data:`_POOL_SIZE`. The same values as a new array, without the page
        faults of fresh memory (about 1.7 ms per 8 MB vector at n = 1e6, a fifth of a pass:
        a KL evaluation made four, a Hessian one more)."""
        pool = self._pools.setdefault(name, [])
        for i in range(len(pool)):  # no loop variable: it would hold a reference
            if sys.getrefcount(pool[i]) == _POOL_ONLY and pool[i].shape == (n,):
                return pool[i]
        buf = np.empty(n)
        if len(pool) < _POOL_SIZE:
            pool.append(buf)
        return buf

    def equal_weight(self, w: np.ndarray) -> float | None:
        """``w_0`` when every weight equals it, else ``None`` (checked once per ``w``)."""
        if self._w is not w:
            self._w = w
            self._w0 = float(w[0]) if float(w.min()) == float(w.max()) else None
        return self._w0


@dataclass(frozen=True, eq=False)
class NewtonRun:
    """Where a Newton run stopped: the iterate, its iterations and warm-start state, and
    the objective's evaluation there (reused by the front end instead of a repeat)."""

    delta: np.ndarray
    iterations: int
    state: Any
    result: InnerResult | None = None


@dataclass(frozen=True, eq=False)
class Minimum:
    """A minimiser of ``F`` as a set module returns it; ``info`` is what the solve reports
    (for example ``optimality_gap``), kept apart from the warm-start ``state``; ``result``
    is the evaluation at ``delta`` when the minimisation ended on one; ``model``, for a
    subsample's minimiser, that subsample's problem as :func:`newton`'s model."""

    delta: np.ndarray
    iterations: int
    state: Any
    info: dict = field(default_factory=dict)
    result: InnerResult | None = None
    model: Callable | None = None


class Stalled(RuntimeError):
    """Newton stopped without converging; ``delta`` and ``state`` hold the last iterate."""

    def __init__(self, message: str, delta: np.ndarray, state: Any) -> None:
        super().__init__(message)
        self.delta, self.state = delta, state


def weighted_hess(at: Atoms | np.ndarray, c: np.ndarray, vectors: tuple = ()):
    """``sum_i c_i a_i a_i^T`` for ``c >= 0`` (``at``: atoms or the ``n x d`` matrix ``a``),
    over chunks of rows (the temporaries stay in cache instead of an ``n x d`` copy): below
    ``_SYRK_MIN_D`` columns as the product ``(a_k^T c_k) a_k`` (symmetrised), from there as
    ``sum_k b_k^T b_k``, ``b_i = sqrt(c_i) a_i``, which numpy computes as a symmetric rank-k
    update (half the work of a product). With ``vectors`` (``n``-vectors ``v``), returns
    ``(hess, [v @ a, ...])``, the products from the same chunks (one read of the features
    for both: at n = 1e6, d = 8 a product alone streams them in about 3 ms); below
    ``_SYRK_MIN_D`` as further rows of the chunk's left factor, ``[a_k^T c_k; v_k] a_k``
    in one product (a separate vector-matrix product per chunk and vector cost about 3 ms
    per vector at n = 1e6, d = 8, the stacked rows about a tenth of the Gram's 13 ms)."""
    unit, factor = 1.0, None
    if not isinstance(at, Atoms):
        a = at
    elif (a := at.built()) is None:  # beta^2 sum_i c_i x_i x_i^T (factor_i^2 = beta^2)
        a, unit, factor = at.x, at.beta**2, at.factor
    d, k = a.shape[1], len(vectors)
    out = np.zeros((d, d))
    sums = np.zeros((k, d))
    r = np.sqrt(c) if d >= _SYRK_MIN_D else None
    left = np.empty((d + k, min(_CHUNK_ROWS, a.shape[0]))) if r is None else None
    for lo in range(0, a.shape[0], _CHUNK_ROWS):
        rows = slice(lo, lo + _CHUNK_ROWS)
        blk = a[rows]
        if r is not None:
            b = blk * r[rows, None]
            out += b.T @ b
            for j, v in enumerate(vectors):
                sums[j] += (v[rows] if factor is None else v[rows] * factor[rows]) @ blk
            continue
        lb = left[:, :blk.shape[0]]  # [a_k^T c_k; v_k (factor_k)]
        np.multiply(blk.T, c[rows], out=lb[:d])
        for j, v in enumerate(vectors):
            if factor is None:
                lb[d + j] = v[rows]
            else:
                np.multiply(v[rows], factor[rows], out=lb[d + j])
        prod = lb @ blk
        out += prod[:d]
        sums += prod[d:]
    if r is None:
        out = (out + out.T) / 2.0
    if unit != 1.0:
        out *= unit
    return (out, list(sums)) if vectors else out


class RowSum(NamedTuple):
    """A low-rank term's vector of the reweighting sets' Hessian ``parts``
    (:func:`reweighting_result`) given by weights: ``u = scale (w @ a) + along grad``, the
    product ``w @ a`` formed in the pass of the Gram matrix (none where ``w`` is ``None``),
    ``grad`` the evaluation's gradient (:data:`GRADIENT`: the gradient itself)."""

    w: np.ndarray | None
    scale: float = 1.0
    along: float = 0.0

    def formed(self, product: np.ndarray | None, grad: np.ndarray) -> np.ndarray:
        """``u`` from the product ``w @ a`` (``None`` without ``w``) and the gradient."""
        u = 0.0 if product is None else product if self.scale == 1.0 else self.scale * product
        return u + self.along * grad if self.along else u


#: The low-rank vector that is the evaluation's gradient (a :class:`RowSum` without weights).
GRADIENT = RowSum(None, along=1.0)
#: ``hess=FUSED`` asks an evaluation for a Hessian its caller certainly takes (Newton's first
#: step from the subsample start, :func:`.dual._subsample_start`): a reweighting set then
#: forms it at once, the gradient's product in the Gram matrix's pass (:func:`weighted_hess`:
#: a further row of each chunk's product instead of a product of its own, about 2.5 ms at
#: n = 1e6, d = 8); every other set reads it as ``hess=True``.
FUSED = "fused"


def logistic_hvp(at: Atoms, c: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """``v -> sum_i c_i a_i (a_i . v)``: the product with :func:`weighted_hess`'s matrix in
    two ``O(n d)`` passes, without forming it (``c = w sigmoid(m) sigmoid(-m)`` gives the
    nominal Hessian of SPEC 3, ``E_P sigmoid'(m) a a^T``)."""
    return lambda v: at.rmatvec(c * at.matvec(v))


def psd_solve(h: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Solve ``h s = g`` for a symmetric PSD ``h``, regularising if it is singular."""
    scale = max(float(np.trace(h)) / h.shape[0], 1e-300)
    for reg in _PSD_REGS:
        # LAPACK's factor and solve directly: 1 us against numpy's 18 us at d = 8 (five
        # solves per Newton minimisation, about 1.5 passes at n = 1e4); info > 0: not PD
        factor, info = dpotrf(h + reg * scale * np.eye(h.shape[0]) if reg else h, lower=0)
        if info == 0:
            return dpotrs(factor, g, lower=0)[0]
    return np.linalg.lstsq(h, g, rcond=None)[0]


#: Sweeps of :func:`scaled_lstsq`'s row and column equilibration (Ruiz's: each sweep takes
#: the square root of the rows' and columns' largest entries, so the scales' imbalance falls
#: to its square root; three sweeps bring ``1e30`` to about ``1e4``).
_RUIZ_SWEEPS = 3


def scaled_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The least-squares solution of ``a x = b`` on the equilibrated ``R a C`` (``x = C y``).

    KKT Jacobians mix equations and unknowns of unrelated units: a budget row of ``1e-10``
    beside gradient rows of ``1``, ``lambda`` about ``1e7`` beside shares in ``[0, 1]``. Plain
    ``lstsq`` cuts singular values below ``1e-16`` of the largest, which there drops whole
    equations (the budget's step came out ``1e-18`` for a residual of ``2e-11``:
    ``tests/test_defects.py``); after the scaling the cut sees the problem's own conditioning."""
    r, c = np.ones(a.shape[0]), np.ones(a.shape[1])
    for _ in range(_RUIZ_SWEEPS):
        big = np.sqrt(np.abs(a * r[:, None] * c).max(axis=1))
        r /= np.where(big > 0, big, 1.0)
        big = np.sqrt(np.abs(a * r[:, None] * c).max(axis=0))
        c /= np.where(big > 0, big, 1.0)
    return np.linalg.lstsq(a * r[:, None] * c, b * r, rcond=None)[0] * c


def primal_value(wc: WorstCase, theta: np.ndarray, beta: float, theta_ref: np.ndarray) -> float:
    """``E_{Q*} l`` recomputed from the atoms of the worst case."""
    return float(wc.weights @ dpo_loss(margins(theta, wc.x, wc.y, beta, theta_ref)))


def unmerge(wc: WorstCase, inverse: np.ndarray, w: np.ndarray) -> WorstCase:
    """The worst case of merged atoms (:meth:`PreferenceData.merged`) on the caller's atoms.

    Worst-case atom ``k`` from merged atom ``j = wc.source[k]`` is split among the caller's
    copies ``i`` of ``j`` (``inverse[i] = j``) in proportion to their weights ``w_i`` (equally
    where the copies weigh 0): the same distribution, with a coupling of the same cost whose
    first marginal is the caller's ``P``. The four ``n``-sized arrays (a stable sort of
    ``inverse`` and gathers: more than the merged solve itself at n = 1e6) are built
    together when a field is first read.
    """

    @functools.cache
    def build() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        order = np.argsort(inverse, kind="stable")
        counts = np.bincount(inverse, minlength=int(inverse.max()) + 1)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        group_w = np.bincount(inverse, w, minlength=counts.size)
        reps = counts[wc.source]
        k = np.repeat(np.arange(wc.source.size), reps)
        offset = np.arange(k.size) - np.repeat(np.cumsum(reps) - reps, reps)
        src = order[starts[wc.source[k]] + offset]
        j = inverse[src]
        share = np.where(group_w[j] > 0, w[src] / np.where(group_w[j] > 0, group_w[j], 1.0),
                         1.0 / counts[j])
        return wc.weights[k] * share, wc.x[k], wc.y[k], src

    def field(i: int):
        return lambda: build()[i]

    return WorstCase(*(field(i) for i in range(4)), wc.transport_cost, wc.budget)

# --- the reweighting sets (nominal, KL, chi-square) -------------------------------------


def reweighted(at: Atoms, q: np.ndarray) -> WorstCase:
    """The worst case that keeps the atoms and reweights them to ``q`` (its ``source``,
    :attr:`Atoms.index`, built when read: the solves never read it)."""
    return WorstCase(q, at.x, at.y, lambda: at.index)


def top_atoms(at: Atoms, l: np.ndarray, positive: bool = False,
              out: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Indicator of the max-loss atoms (ties within ``_TIE_TOL``) among positive weights,
    and the largest loss; ``positive``: the caller knows every weight is positive (equal
    weights, :meth:`Workspace.equal_weight`), so they are not compared again, and the
    indicator is written into ``out`` (a boolean scratch vector) if given."""
    if positive:
        lmax = float(l.max())
        return np.greater_equal(l, lmax - _TIE_TOL * max(1.0, abs(lmax)), out=out), lmax
    pos = at.w > 0
    if pos.all():  # no copy of l (8 MB at n = 1e6) when every weight is positive
        lmax = float(l.max())
        return l >= lmax - _TIE_TOL * max(1.0, abs(lmax)), lmax
    lmax = float(l[pos].max())
    return pos & (l >= lmax - _TIE_TOL * max(1.0, abs(lmax))), lmax


def loss_sigmoid(l: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``sigmoid(-m) = 1 - exp(-l)`` from the losses ``l = softplus(-m)`` (into ``out`` if
    given): one vectorised ``exp`` (several times faster than ``expit``), to an absolute
    error of an ulp of 1 (the relative error grows only where ``sigmoid(-m) < 1e-8``, whose
    gradient and curvature contributions are that small). The certificates use ``expit``
    itself."""
    s = np.negative(l, out=out)
    np.exp(s, out=s)
    np.subtract(1.0, s, out=s)
    return s


class Reweighting(NamedTuple):
    """A reweighting set's ``F`` at given margins, from the losses alone: the worst case
    ``q`` (weights on the atoms), ``F``, the dual variable, the Hessian's ``parts`` (as in
    :func:`reweighting_result`; ``None``: ``E_Q hess l``) and the warm-start state for the
    next evaluation. No product with the atoms: ``F`` along a line ``delta + t p`` costs
    ``O(n)`` per point once ``A p`` is known (:func:`quasi_newton`'s line search).
    ``losses`` and ``sigmoid``, where the set computed them (``l = softplus(-m)`` for a set
    that is passed none, ``SetMethods.losses = False``; ``sigmoid(-m)``), are used instead
    of computing them again."""

    q: np.ndarray
    value: float
    dual: float | None
    parts: Callable | None = None
    state: Any = None
    losses: np.ndarray | None = None
    sigmoid: np.ndarray | None = None


def reweighting_result(at: Atoms, m: np.ndarray, rw: Reweighting, hess: bool | str,
                       l: np.ndarray | None = None,
                       s: np.ndarray | None = None) -> InnerResult:
    """Danskin gradient ``E_Q grad l = -E_Q sigmoid(-m) a`` and Hessian of a reweighting
    set's ``F`` at the margins ``m``, from its :class:`Reweighting` ``rw``.

    The Hessian is ``sum_i c_i a_i a_i^T + sum_k k_k u_k u_k^T``, one chunked rank-n
    update (:func:`weighted_hess`) plus rank-one terms, with ``(c, [(k_k, u_k), ...]) =
    rw.parts(s)`` (``s = sigmoid(-m)``; a :class:`RowSum` ``u_k`` is formed in the
    update's pass, from its product and the gradient); without ``parts`` it is ``E_Q hess
    l``, ``c = q s (1 - s)``. Every reweighting set's Schur complement has that form
    (:mod:`.kl`, :mod:`.chi2`): no ``n x d`` temporary is built; ``hvp`` is its product
    with a vector (:func:`logistic_hvp` plus the rank-one terms). With ``hess=FUSED`` the
    Hessian is formed at once and the gradient's product in its pass. ``s`` may be passed
    when known; else it is :func:`loss_sigmoid` of the losses ``l`` (``expit(-m)`` without
    them). The result carries ``m`` and ``l`` (for :func:`worst_case_gap`).
    """
    q, parts = rw.q, rw.parts
    if s is None:
        s = expit(-m) if l is None else loss_sigmoid(l)
    cache = []  # the Hessian's pieces, every RowSum formed (its weights may be scratch)

    def raw():
        return (q * s * (1.0 - s), []) if parts is None else parts(s)

    def gram(extra: tuple = ()):  # the first Gram matrix, the RowSums' products (and
        # extra's, last) in its pass; the pieces cached
        curv, low_rank = raw()
        lazy = tuple(u.w for _, u in low_rank if isinstance(u, RowSum) and u.w is not None)
        vectors = lazy + extra
        out, sums = weighted_hess(at, curv, vectors) if vectors else (weighted_hess(at, curv), [])
        grad = -sums[-1] if extra else grad_now
        formed = iter(sums)  # in the order of the RowSums
        cache.append((curv, [(k, u.formed(None if u.w is None else next(formed), grad)
                              if isinstance(u, RowSum) else u) for k, u in low_rank]))
        return out, grad

    def pieces():
        if not cache:
            curv, low_rank = raw()
            cache.append((curv, [(k, u.formed(None if u.w is None else at.rmatvec(u.w),
                                              grad_now) if isinstance(u, RowSum) else u)
                                 for k, u in low_rank]))
        return cache[0]

    def h():
        out = weighted_hess(at, cache[0][0]) if cache else gram()[0]
        for k, u in cache[0][1]:
            out += k * np.outer(u, u)
        return out

    if hess == FUSED:  # the gradient's weights q s in the rmatvec's scratch vector
        fused, grad_now = gram((np.multiply(q, s, out=at._scratch),))
        for k, u in cache[0][1]:
            fused += k * np.outer(u, u)

        def hessian():
            return fused.copy()
    else:
        grad_now, hessian = -at.rmatvec(q, s), h

    def hvp(v):  # the same matrix times v in two O(n d) passes
        curv, low_rank = pieces()
        out = logistic_hvp(at, curv)(v)
        for k, u in low_rank:
            out += (k * float(u @ v)) * u
        return out

    return InnerResult(float(rw.value), rw.dual, grad_now, hessian if hess else None,
                       reweighted(at, q), rw.state, margins=m, losses=l,
                       hvp=hvp if hess else None)


def reweighting_evaluate(reweight: Callable) -> Callable:
    """A reweighting set's ``SetMethods.evaluate`` from its ``reweight(at, m, l, ambiguity,
    state) -> Reweighting``: :func:`reweighting_result` of it."""
    def evaluate(at, delta, m, l, amb, hess, worst, state) -> InnerResult:
        rw = reweight(at, m, l, amb, state)
        return reweighting_result(at, m, rw, hess, l=l if rw.losses is None else rw.losses,
                                  s=rw.sigmoid)
    return evaluate


# --- damped Newton ----------------------------------------------------------------------


class ConcaveMax(NamedTuple):
    """:func:`concave_max`'s answer: ``above`` is ``True`` when a point with a value above
    the level was found, ``False`` when the maximum was reached below it (Newton decrement
    at rounding), ``None`` when neither could be established; ``y`` is the last point."""

    above: bool | None
    y: np.ndarray


def concave_max(fun, y0: np.ndarray, level: float,
                value: Callable | None = None) -> ConcaveMax:
    """Whether ``max_y fun(y) > level`` for a concave ``fun`` returning (value, grad, hess).

    ``hess`` may be a function of no arguments (called only where a Newton step is taken:
    a trial point above ``level`` never pays for its ``O(n d^2)`` Hessian). Damped Newton
    ascent, after probing the gradient ray (``_CONCAVE_PROBES``; on concave ``fun`` no
    step shorter than ``(level - value) / ||g||^2`` can pass ``level``), which settles the
    usual case (the maximum far above ``level``) without a Hessian. Where the Hessian is
    singular along the gradient (an unbounded direction, as for a single atom) a gradient
    step long enough to pass ``level`` on the linear model is tried instead. ``value``
    (optional) returns ``fun``'s value alone: the probes need no gradient.
    """
    y = y0
    val, g, h = fun(y)
    gg = float(g @ g)
    if val <= level and gg > 0:
        best = -math.inf
        for k in range(1, _CONCAVE_PROBES + 1):
            cand = y + (2.0**k * (level - val) / gg) * g
            probe = value(cand) if value is not None else fun(cand)[0]
            if probe > level:
                return ConcaveMax(True, cand)
            if not probe > best:  # past the maximum along the ray
                break
            best = probe
    for _ in range(_CONCAVE_ITERS):
        if val > level:
            return ConcaveMax(True, y)
        step = psd_solve(-(h() if callable(h) else h), g)
        dec = float(g @ step)
        if not (np.all(np.isfinite(step)) and math.isfinite(dec)):
            gg = float(g @ g)
            step = g * max(1.0, 2.0 * (level - val) / gg) if gg > 0 else np.zeros_like(g)
            dec = float(g @ step)
        if dec <= _CONCAVE_TOL * max(1.0, abs(val)):  # converged to double precision
            return ConcaveMax(False, y)
        t = 1.0
        while t > _CONCAVE_MIN_STEP:
            nv, ng, nh = fun(y + t * step)
            if nv >= val + _ARMIJO * t * dec:
                break
            t *= 0.5
        else:
            return ConcaveMax(True if val > level else None, y)
        stuck = t < 1.0 and nv - val <= _CONCAVE_TOL * max(1.0, abs(val))
        y, val, g, h = y + t * step, nv, ng, nh
        if stuck:  # a damped step that rose by rounding alone: no further progress to make
            return ConcaveMax(True if val > level else None, y)
    return ConcaveMax(True if val > level else None, y)


def _diverged(label: str) -> RuntimeError:
    return RuntimeError(
        f"dual solver diverged (status: unbounded): ||theta - theta_ref|| > "
        f"{_DIVERGED:.1e}; the data may be separable so that {label} has no minimiser")


def newton(objective, delta: np.ndarray, tol: float, max_iter: int, label: str,
           state: Any = None, start: list | None = None,
           hessian_free: bool = False, model: Callable | None = None,
           fused: Callable | None = None) -> NewtonRun:
    """Damped Newton on a convex ``objective(delta, state) -> InnerResult`` (with Hessian).

    ``start``, when given, is a list holding ``objective(delta, state)`` already computed;
    Newton pops it, so that no caller keeps an ``O(n)`` evaluation alive that Newton has
    moved past (the memory target of issue 9).
    ``state`` seeds the warm starts of the objective's dual variable; each accepted point's
    ``InnerResult.state`` seeds the next evaluation. Stops when ``||grad||_inf <= tol`` or
    the Newton step is below ``_STEP_TOL (1 + ||delta||_inf)``. A full step that cut the
    gradient by ``_CHORD_RATIO`` keeps its Hessian for the next step (unless the new
    evaluation has ``chord=False``). With ``hessian_free``, an evaluation that supplies
    ``hvp`` gets its step by :func:`cg_solve` (inexact Newton) instead of the dense Hessian.
    ``model``, a cheaper objective of the same shape (the same problem on a subsample), corrects
    each dense step for the gradient's nonlinearity along it (:func:`_model_step`).
    ``fused``, the objective whose evaluations form their Hessian at once (:data:`FUSED`),
    evaluates a fresh Hessian's full step where the next Hessian is surely taken
    (:func:`_takes_fresh`).

    Raises
    ------
    Stalled
        ``line_search_failed``, ``stagnated`` or ``max_iter`` (with the last iterate).
    RuntimeError
        ``unbounded``: the iterates left every bounded region.
    """
    cur = start.pop() if start else objective(delta, state)
    state = cur.state
    short = 0  # consecutive heavily damped steps: the sign of a kink
    gn = float(np.max(np.abs(cur.grad)))
    h = None  # the Hessian in use (kept by the chord rule)
    rate = quad = None  # the chord steps' cut and Newton's constant C (_keeps_hessian)
    for it in range(max_iter):
        g = cur.grad
        gn = float(np.max(np.abs(g)))
        if gn <= tol:
            return NewtonRun(delta, it, state, cur)
        fresh = h is None
        if hessian_free and cur.hvp is not None:
            step = -cg_solve(cur.hvp, g, tol)
        else:
            if h is None:
                h = cur.hess()
            step = -psd_solve(h, g)
            if model is not None:
                step = _model_step(model, delta, g, h, step, tol)
        if float(np.max(np.abs(step))) <= _STEP_TOL * (1.0 + float(np.max(np.abs(delta)))):
            return NewtonRun(delta, it, state, cur)  # the Newton step (the distance) is tiny
        dec = -float(g @ step)
        if not dec > 0:
            step, dec = -g, float(g @ g)
        t = 1.0
        ahead = fused is not None and fresh and _takes_fresh(gn, tol)
        while True:
            cand = delta + t * step
            new = (fused if ahead and t == 1.0 else objective)(cand, state)
            slack = _SUM_ROUNDING * max(1.0, abs(cur.value))
            if new.value <= cur.value - _ARMIJO * t * dec or (
                    new.value <= cur.value + slack
                    and float(np.max(np.abs(new.grad))) < gn):
                break
            t *= 0.5
            if t < _MIN_STEP:
                if gn <= _NEAR_TOL * tol:  # converged to the accuracy the arithmetic allows
                    return NewtonRun(delta, it, state, cur)
                raise Stalled(
                    f"dual solver stalled (status: line_search_failed) at iteration {it} "
                    f"with gradient norm {gn:.3e} for {label}", delta, state)
        # A step towards the kink at delta = 0 (not a minimiser here) may overshoot into it;
        # keep halving while that improves F.
        while t > _MIN_STEP and np.linalg.norm(cand) < _TOWARDS_ZERO * np.linalg.norm(delta):
            half = objective(delta + 0.5 * t * step, state)
            if not half.value < new.value:
                break
            t *= 0.5
            cand, new = delta + t * step, half
        cut = float(np.max(np.abs(new.grad))) / gn if t == 1.0 else math.inf
        if fresh and t == 1.0:
            rate, quad = _CHORD_PREDICTION * cut, cut / gn
        elif t == 1.0:
            rate = cut
        if not (new.chord and _keeps_hessian(cut * gn, cut, rate, quad, tol)):
            h = None
        delta, cur, state = cand, new, new.state
        short = short + 1 if t < _SHORT_STEP else 0
        if short >= _MAX_SHORT:
            raise Stalled(f"dual solver stalled (status: stagnated) at iteration {it} "
                          f"with gradient norm {gn:.3e} for {label}", delta, state)
        if float(np.linalg.norm(delta)) > _DIVERGED:
            raise _diverged(label)
    raise Stalled(f"dual solver did not converge (status: max_iter) in {max_iter} "
                  f"iterations for {label}; gradient norm {gn:.3e}", delta, state)


def _model_step(model: Callable, delta: np.ndarray, g: np.ndarray, h: np.ndarray,
                step: np.ndarray, tol: float) -> np.ndarray:
    """Newton's ``step`` (``h step = -g``) moved to the minimiser of the model ``M(delta + s)
    = G(delta + s) + (g - g_G) . s + s^T (h - H_G) s / 2`` of :func:`newton`'s objective
    ``F``, with ``G = model(delta) -> (g_G, H_G)`` (``model``: ``point -> InnerResult``, the
    same problem on a subsample): ``M`` matches ``F``'s gradient and Hessian at ``delta``,
    and its third and higher derivatives are ``G``'s, which estimate ``F``'s. So ``F``'s
    gradient after the step is the error of that estimate (about ``n_sub^-1/2`` of the
    quadratic term Newton's step leaves) instead of the quadratic term itself.

    The chord iteration ``s <- s - h^-1 grad M(delta + s)`` from Newton's step (each ``O(n_sub
    d)``; it contracts by about the relative change of the Hessian along the step), at most
    :data:`_MODEL_ITERS` times, until ``||grad M||_inf <= _MODEL_TOL tol`` or while it falls.
    Measured at n = 1e6, d = 8 (KL, subsample of 25,000): from ``||g||_inf = 2.6e-3`` the
    gradient after the step was ``7e-6`` instead of Newton's ``2.6e-5`` (Gaussian), ``1.4e-6``
    instead of ``2e-4`` (environment data), and after the second step ``5e-11`` and ``2e-12``
    instead of ``1e-8`` and ``1.5e-6``: three full-data evaluations instead of four."""
    base = model(delta)
    off = g - base.grad
    corr = h - base.hess()
    best, best_r = step, math.inf
    for _ in range(_MODEL_ITERS):
        r = model(delta + step).grad + off + corr @ step
        rn = float(np.max(np.abs(r)))
        if not (rn < best_r and np.all(np.isfinite(r))):
            return best  # the iteration stopped contracting: the last step that did
        best, best_r = step, rn
        if rn <= _MODEL_TOL * tol:
            break
        step = step - psd_solve(h, r)
    return step


def _takes_fresh(gn: float, tol: float) -> bool:
    """Whether :func:`newton` takes a fresh Hessian after a full step on a fresh one from
    the gradient norm ``gn``, for every gradient ``K gn^2`` after it, ``K`` in
    :data:`_QUADRATIC_RATES`: not converged, and the chord rule (:func:`_keeps_hessian`, with
    the cut and rates such a step sets) declines the old Hessian."""
    for k in _QUADRATIC_RATES:
        new = k * gn * gn
        cut = new / gn
        if not new > tol or _keeps_hessian(new, cut, _CHORD_PREDICTION * cut, cut / gn, tol):
            return False
    return True


def _keeps_hessian(gn: float, cut: float, rate: float | None, quad: float | None,
                   tol: float) -> bool:
    """Whether :func:`newton` takes its next step on the Hessian in use (the chord rule):
    after a full step that cut the gradient by ``cut <= _CHORD_RATIO`` (``inf`` after a
    damped one) to ``gn``, unless a fresh Hessian ends the run in fewer evaluations than the
    chord steps (predicted cut ``rate`` each; a fresh step leaves ``quad gn^2``;
    :data:`_CHORD_PREDICTION`): in one where the chord step needs two, or in two where the
    chord steps need a Hessian as well or more than :data:`_CHORD_STEPS` steps."""
    if not cut <= _CHORD_RATIO:
        return False
    if rate * gn <= tol or quad is None:
        return True  # the chord step ends the run (or no prediction of Newton's)
    newton = quad * gn * gn
    if newton <= tol:
        return False  # one fresh Hessian ends it, the chord step would not
    if rate <= _CHORD_RATIO and rate**_CHORD_STEPS * gn <= tol:
        return True  # a few chord steps end it (each cutting below _CHORD_RATIO): no Hessian
    # the fresh step leaves a gradient that one chord step from it ends (its cut, about
    # newton / gn, doubled, times newton <= tol): two steps and one Hessian, which the
    # chord steps need as well (one whose cut exceeds _CHORD_RATIO takes one) or more steps
    return not newton * newton <= 0.5 * tol * gn


def cg_solve(hvp: Callable[[np.ndarray], np.ndarray], g: np.ndarray,
             tol: float = 0.0) -> np.ndarray:
    """Conjugate gradients for ``H s = g`` (``H`` PSD, given by ``hvp``), stopped once the
    residual is below ``_CG_TOL ||g||``, or once ``||residual||_inf <= _CG_ATOL tol`` (the
    gradient after the step ``-s`` is the residual to first order: it then meets
    :func:`newton`'s test ``||grad||_inf <= tol``), or after ``min(d, _CG_ITERS)``
    products: the inexact Newton step of :func:`newton`'s Hessian-free polish. Where ``H``
    is singular along a search direction the iterate so far is returned (``g`` itself if
    that is zero), a descent direction either way."""
    x = np.zeros_like(g)
    r = g.copy()
    p = r.copy()
    rr = float(r @ r)
    stop = _CG_TOL**2 * rr
    for _ in range(min(g.size, _CG_ITERS)):
        hp = hvp(p)
        php = float(p @ hp)
        if not php > 0:
            break
        alpha = rr / php
        x += alpha * p
        r -= alpha * hp
        rr, rr_old = float(r @ r), rr
        if rr <= stop or float(np.max(np.abs(r))) <= _CG_ATOL * tol:
            break
        p = r + (rr / rr_old) * p
    return x if np.any(x) else g.copy()


def _difference_hvp(objective, delta: np.ndarray, res: InnerResult):
    """``v -> (grad F(delta + h v) - grad F(delta)) / h``, ``h = _DIFF_STEP (1 + ||delta||) /
    ||v||``: a Hessian-vector product for a set without ``hvp``, one evaluation (two
    ``O(n d)`` passes, as an exact product) with relative error about ``_DIFF_STEP``."""
    def hvp(v):
        h = _DIFF_STEP * (1.0 + float(np.linalg.norm(delta))) / float(np.linalg.norm(v))
        return (objective(delta + h * v, res.state).grad - res.grad) / h
    return hvp


def quasi_newton(objective, delta: np.ndarray, tol: float, max_iter: int, label: str,
                 state: Any = None, start: list | None = None, atoms: Atoms | None = None,
                 reweight: Callable | None = None) -> NewtonRun:
    """L-BFGS on ``objective`` (values and gradients only), then :func:`newton` from there.

    The Hessian-free path of high dimensions: each L-BFGS iteration costs ``O(n d)`` passes
    instead of Newton's ``O(n d^2)`` Hessian. For a reweighting set (``reweight(m, l,
    state) -> Reweighting``, with its ``atoms``, at least ``_MARGIN_MIN_BYTES`` of features)
    L-BFGS searches its lines in margin space (:func:`_margin_lbfgs`: two products with the
    atoms per iteration, none per trial point); otherwise scipy's L-BFGS-B runs on
    ``objective`` (:func:`_scipy_lbfgs`). Either
    stops at the first point that meets ``||grad||_inf <= tol`` (Newton's test) or where
    its line search meets rounding; from a point that does not meet the test,
    :func:`newton` polishes (``hessian_free``: conjugate-gradient steps on
    ``InnerResult.hvp`` where the set supplies it, else on forward differences of the
    gradient, :func:`_difference_hvp`: never the ``O(n d^2)`` dense Hessian), so both
    paths stop at the same test. Each evaluation's warm-start ``state`` seeds the next one;
    ``start``, a list holding the evaluation at ``delta``, serves L-BFGS's first (popped,
    as in :func:`newton`).

    Raises
    ------
    Stalled, RuntimeError
        As :func:`newton` (``unbounded`` also when L-BFGS leaves every bounded region).
    """
    if reweight is not None and atoms.x.nbytes >= _MARGIN_MIN_BYTES:
        x, res, iters = _margin_lbfgs(atoms, reweight, delta, tol, label, state, start)
    else:
        x, res, iters = _scipy_lbfgs(objective, delta, tol, label, state, start)
    if float(np.max(np.abs(res.grad))) <= tol:
        return NewtonRun(x, iters, res.state, res)

    def polish(d, st):
        out = objective(d, st)
        return out if out.hvp is not None else replace(out, hvp=_difference_hvp(objective, d,
                                                                               out))

    first = res if res.hvp is not None else replace(res, hvp=_difference_hvp(objective, x,
                                                                             res))
    state = res.state
    del res
    run = newton(polish, x, tol, max_iter, label, state, [first], hessian_free=True)
    return NewtonRun(run.delta, iters + run.iterations, run.state, run.result)


def _scipy_lbfgs(objective, delta: np.ndarray, tol: float, label: str, state: Any,
                 start: list | None) -> tuple[np.ndarray, InnerResult, int]:
    """scipy's L-BFGS-B on ``objective``: the point it stopped at, the evaluation there and
    its iterations.

    It runs (``ftol = 0``) until an evaluation meets ``||grad||_inf <= tol`` (also a
    line-search trial that scipy would reject because its value is above the last by
    rounding: at n = 1e6, d = 64 that waited 7 evaluations, F flat to 1e-16 and
    ``||grad||_inf`` about ``tol``) or its line search meets rounding. The last
    ``_QN_KEEP`` evaluations are kept: the returned point's is the answer (no further
    pass) where it is among them."""
    last: dict = {"state": state, "recent": [], "iters": 0}

    def fun(x):
        if float(np.linalg.norm(x)) > _DIVERGED:
            raise _diverged(label)
        res = start.pop() if start and np.array_equal(x, delta) else objective(x, last["state"])
        last["state"] = res.state
        recent = last["recent"]
        recent.append((x.copy(), res))
        del recent[:-_QN_KEEP]
        if float(np.max(np.abs(res.grad))) <= tol:
            raise _Converged  # whether or not scipy's line search would accept the point
        return res.value, res.grad

    def count(_):
        last["iters"] += 1

    try:
        x = minimize(fun, delta, jac=True, method="L-BFGS-B", callback=count,
                     options={"gtol": tol, "ftol": 0.0, "maxiter": _QN_ITERS,
                              "maxcor": _QN_PAIRS}).x
    except _Converged:
        x = last["recent"][-1][0]
    res = next((r for y, r in reversed(last["recent"]) if np.array_equal(y, x)), None)
    if res is None:
        res = objective(x, last["state"])  # scipy returned an earlier point
    return x, res, last["iters"]


class _Memory:
    """L-BFGS's inverse-Hessian estimate from at most ``size`` correction pairs ``(s, y)``,
    ``s . y > 0``, in the compact form of Byrd, Nocedal and Schnabel (1994, eq. 3.1): with
    the pairs as the columns of ``S``, ``Y`` (oldest first), ``R`` the upper triangle of ``S^T
    Y``, ``D`` its diagonal and ``gamma = s . y / y . y`` of the newest pair, ``H = gamma I +
    [S, gamma Y] [[R^-T (D + gamma Y^T Y) R^-1, -R^-T], [-R^-1, 0]] [S, gamma Y]^T``: the
    matrix of the two-loop recursion (Nocedal and Wright Alg. 7.4, ``H_0 = gamma I``), whose
    ``-H g`` (:meth:`direction`) then takes a fixed handful of products with the ``k x d``
    blocks and ``k x k`` matrices instead of four vector operations per pair (measured at d =
    64 and 512: 56 and 67 us over 10 pairs by the recursion, 9.5 and 11 us here, plus 10 and
    15 us to add a pair). ``R^-1`` is kept, not refactored: a new pair appends a column
    (``O(k^2)``), and dropping the oldest keeps the trailing block (the inverse of a trailing
    block of an upper triangular matrix is the trailing block of its inverse)."""

    def __init__(self, d: int, size: int) -> None:
        self._s, self._y = np.empty((size, d)), np.empty((size, d))
        self._rinv, self._yy = np.zeros((size, size)), np.empty((size, size))
        self._sy = np.empty(size)
        self._k, self._gamma = 0, 1.0

    def __len__(self) -> int:
        """The pairs held."""
        return self._k

    def clear(self) -> None:
        """Drop every pair (the next direction is ``-g``)."""
        self._k = 0

    def add(self, s: np.ndarray, y: np.ndarray, sy: float) -> None:
        """Append the pair ``(s, y)`` (``sy = s . y > 0``), dropping the oldest when full."""
        k, size = self._k, self._sy.size
        if k == size:
            for a in (self._s, self._y, self._sy):
                a[:-1] = a[1:]
            for a in (self._rinv, self._yy):
                a[:-1, :-1] = a[1:, 1:]
            k -= 1
        rinv = self._rinv
        col = self._s[:k] @ y  # s_i . y, the new column of R
        rinv[:k, k] = (rinv[:k, :k] @ col) * (-1.0 / sy)
        rinv[k, :k] = 0.0
        rinv[k, k] = 1.0 / sy
        yy = self._y[:k] @ y
        self._yy[k, :k] = yy
        self._yy[:k, k] = yy
        yn = float(y @ y)
        self._yy[k, k] = yn
        self._s[k], self._y[k], self._sy[k] = s, y, sy
        self._k, self._gamma = k + 1, sy / yn

    def direction(self, g: np.ndarray) -> np.ndarray:
        """``-H g`` (``-g`` without pairs): with ``v = R^-1 S^T g`` and ``w = R^-T ((D +
        gamma Y^T Y) v - gamma Y^T g)``, ``H g = gamma g + S w - gamma Y v``."""
        k = self._k
        if k == 0:
            return -g
        s, y, gam = self._s[:k], self._y[:k], self._gamma
        rinv = self._rinv[:k, :k]
        v = rinv @ (s @ g)
        w = rinv.T @ (self._sy[:k] * v + gam * (self._yy[:k, :k] @ v - y @ g))
        p = g * -gam
        p -= w @ s
        p += (gam * v) @ y
        return p


class _RayPoint(NamedTuple):
    """A trial point ``delta + t p`` of the margin-space line search: its margins, losses,
    ``sigmoid(-m)`` and :class:`Reweighting`, and the slope ``dF / dt``."""

    t: float
    m: np.ndarray
    l: np.ndarray
    s: np.ndarray
    rw: Reweighting
    slope: float


def _ray_point(reweight: Callable, m0: np.ndarray, u: np.ndarray, t: float,
               state: Any) -> _RayPoint:
    """``F`` at ``delta + t p`` from the margins ``m0 + t u`` (``u = A p``) alone, ``O(n)``:
    by Danskin ``grad F = -A^T (q s)``, so ``dF / dt = -(q s) . u``."""
    m = m0 + t * u
    l = dpo_loss(m)
    rw = reweight(m, l, state)
    s = loss_sigmoid(l) if rw.sigmoid is None else rw.sigmoid
    return _RayPoint(t, m, l, s, rw, -float((rw.q * s) @ u))


def _ray_search(reweight: Callable, cur: InnerResult, u: np.ndarray, gp: float, t: float,
                limit: float, label: str) -> _RayPoint | None:
    """A step ``t`` along ``p`` (``u = A p``, slope ``gp = grad . p < 0`` at ``t = 0``) that
    meets the strong Wolfe conditions ``|dF/dt| <= _WOLFE |gp|`` and ``F(t) <= F(0) +
    _ARMIJO t gp`` (or ``F(t) <= F(0)`` up to the rounding of its sum, ``_SUM_ROUNDING``:
    near the minimiser the values no longer resolve the decrease, the exact slopes still
    do), from the first trial ``t``: while too short (slope below ``_WOLFE gp``) the
    secant root of the slope, within ``[_EXPAND_MIN, _EXPAND_MAX]`` times the step; once
    bracketed the secant (or bisection) kept ``_SAFEGUARD`` of the bracket from its ends.
    ``limit``: the largest ``t`` inside the bounded region (``unbounded`` beyond: the
    error of :func:`newton`). ``None`` after ``_LS_TRIALS`` trial points (rounding)."""
    f0, m0 = cur.value, cur.margins
    slack = _SUM_ROUNDING * max(1.0, abs(f0))
    lo, slo, hi, shi = 0.0, gp, math.inf, math.nan
    state = cur.state
    for _ in range(_LS_TRIALS):
        if t > limit:
            raise _diverged(label)
        pt = _ray_point(reweight, m0, u, t, state)
        state = pt.rw.state
        value, slope = pt.rw.value, pt.slope
        decrease = value <= f0 + _ARMIJO * t * gp or value <= f0 + slack
        if decrease and abs(slope) <= -_WOLFE * gp:
            return pt
        if decrease and slope < 0:  # too short
            prev, sprev, lo, slo = lo, slo, t, slope
            if math.isinf(hi):
                step = t - prev
                grow = -slope * step / (slope - sprev) if slope > sprev else math.inf
                t += min(max(grow, (_EXPAND_MIN - 1.0) * t), (_EXPAND_MAX - 1.0) * t)
                continue
        else:
            hi, shi = t, slope
        width = hi - lo
        if not width > _STEP_TOL * hi:
            return None
        t = (lo - slo * width / (shi - slo) if slo < 0 < shi and math.isfinite(shi)
             else lo + 0.5 * width)
        t = min(max(t, lo + _SAFEGUARD * width), hi - _SAFEGUARD * width)
    return None


def _margin_lbfgs(at: Atoms, reweight: Callable, delta: np.ndarray, tol: float, label: str,
                  state: Any, start: list | None) -> tuple[np.ndarray, InnerResult, int]:
    """L-BFGS (``_QN_PAIRS`` pairs) on a reweighting set's ``F`` with line searches in
    margin space: per iteration one product ``u = A p`` for the direction ``p``, the trial
    points ``F(m + t u)`` in ``O(n)`` each (:func:`_ray_search`), and one product for the
    gradient at the accepted point; the margins are carried along (``m + t u``, rounding
    of the order of a fresh product's after ``_QN_ITERS`` steps). The first step is
    ``-g`` with the length of a Newton step along it on ``E_Q hess l`` (``O(n)``). Stops
    at ``||grad||_inf <= tol``, or where the line search or the curvature fails (the
    polish takes over); returns the point, its evaluation and the iterations."""
    cur = start.pop() if start else None
    if cur is None or cur.margins is None or cur.losses is None:
        m = at.matvec(delta)
        l = dpo_loss(m)
        cur = reweighting_result(at, m, reweight(m, l, state), True, l=l)
    x = delta
    pairs = _Memory(delta.size, _QN_PAIRS)
    iters = 0
    while iters < _QN_ITERS:
        g = cur.grad
        if float(np.max(np.abs(g))) <= tol:
            break
        p = pairs.direction(g)
        gp = float(g @ p)
        if not gp < 0:  # the pairs lost positive definiteness to rounding: restart
            pairs.clear()
            p, gp = -g, -float(g @ g)
        u = at.matvec(p)
        t = 1.0
        if not pairs:  # Newton's step length along p on E_Q hess l
            s = loss_sigmoid(cur.losses)
            curv = float((cur.worst_case.weights * s * (1.0 - s)) @ (u * u))
            t = -gp / curv if curv > 0 and math.isfinite(curv) else 1.0 / float(np.abs(g).max())
        limit = (_DIVERGED + float(np.linalg.norm(x))) / float(np.linalg.norm(p))
        pt = _ray_search(reweight, cur, u, gp, t, limit, label)
        if pt is None:
            break
        x = x + pt.t * p
        new = reweighting_result(at, pt.m, pt.rw, True, l=pt.l, s=pt.s)
        y = new.grad - g
        sy = float(pt.t * float(p @ y))
        if sy > 0 and math.isfinite(sy):
            pairs.add(pt.t * p, y, sy)
        cur = new
        iters += 1
    return x, cur, iters


class _Converged(Exception):
    """Raised inside :func:`quasi_newton`'s L-BFGS at a point that meets the stopping test."""


# --- certificates ---------------------------------------------------------------------------

#: Eigenvalues of a Hessian below this fraction of the largest span its null space (the
#: directions no atom sees): double precision resolves about 1e-16 of the spectrum.
_RANK_TOL = 1e-12
#: A gradient component outside the Hessian's range above this (relative to the largest
#: atom norm) is a real linear direction (the function is unbounded along it), not rounding.
_NULL_GRAD = 1e-12
#: :func:`logistic_gap` on at least twice as many atoms first bounds the curvature by
#: every ``ceil(n / k)``-th atom alone (a smaller PSD matrix, so still a valid bound, about
#: ``n / k`` times looser), ``k = _CERT_PER_D d 2^-j`` for ``j = _CERT_HALVINGS, ..., 1,
#: 0``: ``O(k d^2)`` instead of ``O(n d^2)``. With 8 d atoms the subset's smallest
#: eigenvalue is still ``(1 - 8^-1/2)^2 = 0.42`` of its mean for isotropic features
#: (Marchenko-Pastur); measured at n = 1e4, d = 512 (Gaussian, DPO): bound 9e-14 from 1250
#: atoms, 2e-14 from 2500, 4e-15 from all, the Hessian costing 0.009, 0.016 and 0.061 s.
_CERT_PER_D = 8
#: The smaller subsets first (2 d and 4 d atoms): the Newton-decrement bound of
#: :func:`curvature_bound` (``g^T H^-1 g / 2``) needs no large smallest eigenvalue, and at
#: the end of the L-BFGS solves of the benchmark (Gaussian, d = 64 and 512, n = 1e4 ..
#: 1e6, ``||grad||_inf <= 1e-10``) 2 d atoms gave bounds of 1e-15 .. 1e-14, the Hessian of
#: 1112 atoms costing 0.007 s at d = 512 against 0.030 s for the 5000 of ``n // (8 d)``.
_CERT_HALVINGS = 2
#: ... then (where those bounds are too loose) every ``n / _CERT_ATOMS``-th atom,
#: ``O(_CERT_ATOMS d^2)``, 10x less than all at n = 1e5 ...
_CERT_ATOMS = 10_000
#: ... and keeps that bound when it is below this (absolute; the full bound is about
#: ``||g||^2 / (2 mu)``, 1e-20 .. 1e-15 at ``tol = 1e-10``), else computes the full one.
_CERT_SUBSET_OK = 1e-13
#: The curvature floor :func:`logistic_gap` asks a subset's Cholesky factor to prove: its
#: Marchenko-Pastur estimate of the smallest eigenvalue, ``(tr H / d) (1 - sqrt(d / k))^2``
#: for ``k`` isotropic atoms, over this. The estimate was 1.1-2.1x the computed eigenvalue
#: on the Gaussian benchmark subsets of 2 d to 8 d atoms (d = 64, 512), so the factor
#: exists; the floor enters the bound only through ``gamma = R nu / sqrt(mu)`` (1e-4 there)
#: and the shifted solve, which is then within ``1 / 30`` of the unshifted one.
_CERT_SHIFT_DIV = 64.0
#: Backward error of a Cholesky factor that ran to completion: ``R^T R = A + E`` with
#: ``||E||_2 <= gamma_{d+1} ||R||_F^2 = gamma_{d+1} tr(A + E)`` (Higham, Accuracy and
#: Stability of Numerical Algorithms, 2nd ed., Thm 10.3; blocked LAPACK factors satisfy the
#: same bound with a small constant, here 4), plus ``d`` roundings of the shifted diagonal
#: and of the trace: ``lambda_min(A) >= -_CHOL_ULPS (d + 1) eps tr(A)`` up to second order.
_CHOL_ULPS = 8.0
#: Safety factor on the ``gamma_k = k eps / (1 - k eps)`` of the dot products and
#: matrix-vector products in :func:`_decrement_bound` (their rounding error bounds).
_DOT_ULPS = 4.0
#: Below this ``gamma`` the series of ``gamma + (1 - gamma) log(1 - gamma)`` is used
#: (the closed form cancels there).
_SERIES_GAMMA = 1e-3


def _curvature_tail(mu: float, radius: float, gn: float) -> float:
    """``(mu / R^2) (gamma + (1 - gamma) log(1 - gamma))``, ``gamma = R ||g|| / mu``
    (``inf`` for ``gamma >= 1``): :func:`curvature_bound`'s bound for the curvature ``mu``."""
    gamma = radius * gn / mu
    if not gamma < 1.0:
        return math.inf
    # gamma + (1 - gamma) log(1 - gamma) = sum_{k >= 2} gamma^k / (k (k - 1))
    tail = (gamma**2 / 2 + gamma**3 / 6 + gamma**4 / 12 if gamma < _SERIES_GAMMA
            else gamma + (1.0 - gamma) * math.log1p(-gamma))
    return mu / radius**2 * tail


def _shifted_factor(hess: np.ndarray, shift: float, terms: int):
    """A Cholesky factor ``U`` (upper, ``U^T U ~ hess - s I``) that proves ``mu = shift <=
    lambda_min(hess)``, with ``(U, mu)``, or ``None`` where it fails (the smallest
    eigenvalue may be below ``shift``). ``s = shift`` plus the rounding allowance of the
    factor (``_CHOL_ULPS``) and of ``hess``'s own sum of ``terms`` rank-one terms
    (``gamma_terms tr(hess)``, Higham Thm 3.5 with ``|| |B|^T |B| ||_2 <= ||B||_F^2``).
    ``hess`` is shifted in place and restored."""
    d = hess.shape[0]
    trace = float(np.trace(hess))
    allowance = (_CHOL_ULPS * (d + 1) + terms) * np.finfo(float).eps * (trace + d * shift)
    s = shift + allowance
    diag = hess.diagonal().copy()
    hess.flat[::d + 1] = diag - s
    try:
        # LAPACK's factor itself (2.5x faster than np.linalg.cholesky at d = 512); info > 0:
        # a leading minor is not positive (or NaN)
        factor, info = dpotrf(hess, lower=0, clean=0)
    finally:
        hess.flat[::d + 1] = diag
    return (factor, s - allowance) if info == 0 else None  # mu >= shift up to an ulp


def _decrement_bound(hess: np.ndarray, factor: np.ndarray, grad: np.ndarray,
                     mu: float) -> float:
    """An upper bound on ``nu^2 = g^T H^-1 g`` for ``H = hess >= mu I``: for every ``y``,
    ``nu^2 = 2 g . y - y^T H y + r^T H^-1 r <= 2 g . y - y^T H y + ||r||^2 / mu``, ``r = g -
    H y``; ``y`` solves with the shifted ``factor`` (:func:`_shifted_factor`; within
    ``mu / lambda_min`` of ``H^-1 g``). Each computed dot product and ``H y`` is widened by
    its rounding bound ``gamma_d`` (Higham Thm 3.5, ``|| |H| ||_2 <= ||H||_F``)."""
    d = grad.size
    y = dpotrs(factor, grad, lower=0)[0]
    hy = hess @ y
    r = grad - hy
    eps = np.finfo(float).eps
    gam = _DOT_ULPS * (d + 2) * eps
    yn, gn, hyn = float(np.linalg.norm(y)), float(np.linalg.norm(grad)), float(np.linalg.norm(hy))
    e_hy = gam * float(np.linalg.norm(hess)) * yn  # ||fl(H y) - H y||
    e_r = e_hy + gam * (gn + hyn)
    quad = 2.0 * float(grad @ y) - float(y @ hy) + gam * (2.0 * gn + hyn) * yn + e_hy * yn
    return (quad + (float(np.linalg.norm(r)) + e_r) ** 2 / mu) * (1.0 + gam)


def curvature_bound(grad: np.ndarray, hess: np.ndarray, radius: float,
                    full_rank: bool = False, shift: float | None = None,
                    terms: int = 0) -> float:
    """Upper bound on ``f(delta) - inf f`` for ``f = sum_i q_i softplus(-a_i . delta) + c .
    delta`` from its gradient and Hessian at ``delta`` and ``radius = max_i ||a_i||``.

    Along any line, ``h(t) = f(delta + t D)`` has ``|h'''| <= R ||D|| h''`` (the logistic
    loss has ``|l'''| <= l''``), so (Bach 2010, Lemma 1) ``f(delta + D) >= f + g . D +
    D^T H D psi(R ||D||)``, ``psi(S) = (e^-S + S - 1) / S^2`` (decreasing). With ``mu``
    any lower bound on the smallest eigenvalue of ``H`` on its range (``f`` is constant
    along the null space when ``g`` has no part there) the minimum over ``D`` gives ``f -
    inf f <= (mu / R^2) (gamma + (1 - gamma) log(1 - gamma))``, ``gamma = R ||g|| / mu``
    (about ``||g||^2 / (2 mu)``), and ``inf`` when ``gamma >= 1``. Any PSD ``hess`` below
    the Hessian (``D^T hess D <= D^T H D``) gives a valid bound when it has full rank
    (``full_rank``: ``inf`` otherwise, since its null space need not be one along which
    ``f`` is constant). Without ``shift``, ``mu`` is the computed smallest eigenvalue
    (``eigvalsh``, ``O(d^3)``).

    With a ``shift > 0`` (and ``full_rank``) no eigenvalue is computed, and the bound is the
    Newton decrement's: a Cholesky factor of ``hess - shift I`` (``d^3 / 3``) proves
    ``hess >= mu I``, ``mu = shift`` (``terms``: how many rank-one terms ``hess`` sums, for
    its rounding; :func:`_shifted_factor`), and with ``h = ||D||_hess >= sqrt(mu) ||D||``
    and ``g . D >= -nu h``, ``nu^2 = g^T hess^-1 g`` (bounded by :func:`_decrement_bound`),
    ``f(delta + D) - f >= -nu h + h^2 psi(R h / sqrt(mu))``: the same minimum with ``||g||``
    replaced by ``nu sqrt(mu)``, about ``nu^2 / 2`` (not ``||g||^2 / (2 lambda_min)``), and
    ``gamma = R nu / sqrt(mu)``. ``inf`` where no factor exists.
    """
    gn = float(np.linalg.norm(grad))
    if gn == 0.0:
        return 0.0
    if not radius > 0:
        return math.inf
    if shift is not None and full_rank and shift > 0:
        found = _shifted_factor(hess, shift, terms)
        if found is None:
            return math.inf
        factor, mu = found
        nu = math.sqrt(_decrement_bound(hess, factor, grad, mu))
        return _curvature_tail(mu, radius, nu * math.sqrt(mu))
    evals = np.linalg.eigvalsh(hess)  # eigenvectors (4x the work) only for a null space
    top = float(evals[-1])
    if not top > 0:
        return math.inf
    keep = evals > _RANK_TOL * top
    if keep.all():  # full rank: all of grad lies in the range
        g_range_norm, low = gn, float(evals[0])
    elif full_rank:
        return math.inf
    else:
        evals, basis = range_basis(hess)
        low = float(evals[-basis.shape[1]])  # the least eigenvalue on the range (ascending)
        g_range = basis.T @ grad
        if float(np.linalg.norm(grad - basis @ g_range)) > _NULL_GRAD * radius:
            return math.inf
        g_range_norm = float(np.linalg.norm(g_range))
    return _curvature_tail(low, radius, g_range_norm)


def range_basis(hess: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(eigenvalues, U)`` of the PSD ``hess``, ``U`` an orthonormal basis of its range: the
    eigenvectors of the eigenvalues above ``_RANK_TOL`` of the largest (``eigh``)."""
    evals, evecs = np.linalg.eigh(hess)
    return evals, evecs[:, evals > _RANK_TOL * float(evals[-1])]


def logistic_gap(a: np.ndarray | Atoms, q: np.ndarray, delta: np.ndarray, upper: float,
                 linear: np.ndarray | None = None, m: np.ndarray | None = None,
                 l: np.ndarray | None = None, radius: float | None = None,
                 grad: np.ndarray | None = None) -> float:
    """``upper - inf_D f(D)`` bounded from above, ``f(D) = sum_i q_i softplus(-a_i . D)
    (+ linear . D)``: ``upper - f(delta)`` plus :func:`curvature_bound` at ``delta`` (from the
    Hessian of every ``ceil(n / k)``-th atom, ``k = _CERT_PER_D d 2^-j``, ``j =
    _CERT_HALVINGS, ..., 0``, then ``_CERT_ATOMS``, by its Newton decrement, when that bound
    is below ``_CERT_SUBSET_OK``; else from the full Hessian's smallest eigenvalue). A
    subset whose Marchenko-Pastur prediction of that bound, ``||g||^2 / (2 (tr H / d) (1 -
    d / k))`` (``E 1 / lambda``), is above ``_CERT_SUBSET_OK`` is skipped without forming its
    Hessian.

    ``a`` is the ``n x d`` matrix or the :class:`Atoms` themselves (no copy of their
    matrix). ``m = a delta``, ``l = softplus(-m)``, an upper bound ``radius >= max_i ||a_i||``
    and ``grad``, the gradient of ``f`` at ``delta`` (for example the Danskin gradient of a
    reweighting, the same sum), may be passed when known (they are recomputed otherwise)."""
    # atoms with q_i = 0 add nothing to f, its gradient or its Hessian (and only enlarge the
    # radius bound): no n x d copy of the others
    atoms = isinstance(a, Atoms)
    if m is None:
        m = a.matvec(delta) if atoms else a @ delta
    if l is None:
        l = dpo_loss(m)
    with np.errstate(invalid="ignore"):  # 0 * inf for an infinite loss of weight 0
        lq = np.multiply(q, l, out=a._scratch if atoms else None)  # no new n-vector
        value = float(lq.sum())
        if not math.isfinite(value):
            value = float(np.where(q > 0, lq, 0.0).sum())
    if grad is None:
        u = -(q * expit(-m))
        grad = a.rmatvec(u) if atoms else u @ a
        if linear is not None:
            grad = grad + linear
    if linear is not None:
        value += float(linear @ delta)
    if radius is None:
        radius = a.max_norm() if atoms else atom_radius(a)
    gap = max(upper - value, 0.0)
    d = delta.size
    gn2 = float(grad @ grad)
    per_d = _CERT_PER_D * d
    for k in sorted({per_d >> j for j in range(_CERT_HALVINGS + 1)} | {_CERT_ATOMS}):
        if q.size < 2 * k:
            continue
        # sum over a subset <= the Hessian: a cheaper, looser bound
        rows = slice(None, None, -(-q.size // k))
        s = expit(-m[rows])
        curv = q[rows] * s * (1.0 - s)
        if curv.size <= d:
            continue  # rank-deficient
        # b_i = sqrt(curv_i) a_i in one copy of the subset's rows (of x for the atoms)
        root = np.sqrt(curv)
        if atoms:
            root *= a.factor[rows]
        b = (a.x if atoms else a)[rows] * root[:, None]
        mean = float(np.einsum("ij,ij->", b, b)) / d  # tr H_k / d: of the eigenvalues
        if not (mean > 0 and gn2 / (2.0 * mean * (1.0 - d / curv.size)) <= _CERT_SUBSET_OK):
            continue  # no weight on the subset, or the bound would (most likely) be too loose
        floor = mean * (1.0 - math.sqrt(d / curv.size))**2 / _CERT_SHIFT_DIV
        bound = curvature_bound(grad, b.T @ b, radius, full_rank=True, shift=floor,
                                terms=curv.size)
        if bound <= _CERT_SUBSET_OK:
            return gap + bound
    s = expit(-m)
    return gap + curvature_bound(grad, weighted_hess(a, q * s * (1.0 - s)), radius)


def worst_case_gap(at: Atoms, amb, delta: np.ndarray, res: InnerResult, info: dict) -> float:
    """Certified relative gap of ``delta`` by weak duality through the worst case ``Q*``.

    ``Q*`` lies in the ambiguity set, so ``min F >= min_theta E_{Q*} l(theta)``, a weighted
    logistic regression on ``Q*``'s atoms (moved and relabelled for Wasserstein sets), bounded
    below by :func:`logistic_gap`; at the minimiser ``Q*`` is a saddle point and the bound is
    about ``||grad||^2 / (2 mu)``.
    """
    wc = res.worst_case
    if wc.y is at.y and wc.x is at.x:  # a reweighting: the atoms' own a, m and l, and
        # F's Danskin gradient E_Q* grad l is f's at delta (the same sum over the same q)
        gap = logistic_gap(at, wc.weights, delta, res.value, m=res.margins, l=res.losses,
                           radius=at.max_norm(), grad=res.grad)
    else:
        a = ((2.0 * wc.y - 1.0) * at.beta)[:, None] * wc.x
        gap = logistic_gap(a, wc.weights, delta, res.value)
    return gap / max(1.0, abs(res.value))


#: SLSQP's tolerance and iteration budget for the steepest descent direction at 0 (only the
#: direction is needed: a few digits suffice, and it converges in a few dozen steps).
_DESCENT_FTOL = 1e-14
_DESCENT_ITERS = 200
#: Rounding allowance of a divergence summed over the atoms (a few ulps per term, pairwise).
_DIV_EPS = 64 * 2.0**-52


def min_norm_mean(family: Callable, d: int, rho: float) -> np.ndarray | None:
    """``c* = argmin ||E_Q a||`` over the distributions ``Q_nu`` of a ``d``-parameter family
    with divergence ``<= rho``: the steepest descent direction of ``F`` at ``delta = 0``.

    ``F'(0; D) = -min_Q E_Q a . D / 2`` over the ball, most negative on the unit sphere at
    ``D = c* / ||c*||``; by the KKT conditions of ``min ||E_Q a||^2 / 2`` the minimising ``Q``
    lies in a family fixed by the set (KL: tilts ``P exp(nu . a)``; chi-square: ``P (1 + nu
    . a)_+``). ``family(nu)`` returns ``(c, dc/dnu, divergence, d divergence/dnu)``; SLSQP
    with these exact derivatives, from ``nu = 0`` (``Q = P``). ``None`` if the search fails.
    """
    def objective(nu):
        c, jac = family(nu)[:2]
        return 0.5 * float(c @ c), jac.T @ c

    found = minimize(objective, np.zeros(d), jac=True, method="SLSQP",
                     constraints=[{"type": "ineq", "fun": lambda nu: rho - family(nu)[2],
                                   "jac": lambda nu: -family(nu)[3]}],
                     options={"ftol": _DESCENT_FTOL, "maxiter": _DESCENT_ITERS})
    c, _, div, _ = family(found.x)
    if not (np.all(np.isfinite(c)) and div <= rho + _DIV_EPS * max(rho, 1.0) and np.any(c)):
        return None
    return c


# --- the interface of a set module --------------------------------------------------------


#: Separability LP: rows of ``A`` are normalised (after equilibrating its columns), so
#: margins ``a_i . e / ||a_i||`` are O(1) whatever the feature scale; a separating
#: direction must reach this normalised margin, ten times HiGHS's feasibility
#: tolerance (1e-7), below which a "direction" is constraint violation, not separation.
_SEPARATION_TOL = 1e-6


def separating_direction(A: np.ndarray, w: np.ndarray, q: np.ndarray | None = None
                         ) -> np.ndarray | None:
    """A direction along which the losses without a norm term decrease forever, or ``None``.

    ``q is None`` (strict separation): ``max t`` s.t. ``a_i . e >= t ||a_i||`` on every
    atom of positive weight, ``|e|_inf <= 1``; a positive ``t`` lowers every loss
    along ``theta_ref + t e``, hence every robust objective (a supremum over a compact
    set of distributions), which then has no minimiser. Otherwise (weak separation
    charged by ``q``): ``max sum_i q_i a_i . e / ||a_i||`` s.t. ``a_i . e >= 0``.
    The columns of ``A`` are equilibrated and its rows normalised first, so the
    answer does not depend on the scale of the features or of beta. Atoms with
    ``a_i = 0`` have a constant loss and are left out. Returns the unit direction in
    the original coordinates.
    """
    col = np.sqrt(w @ A**2)
    col = np.where(col > 0, col, 1.0)
    rows = A[w > 0] / col
    norms = np.linalg.norm(rows, axis=1)
    live = norms > 0
    if not live.any():
        return None
    rows = rows[live] / norms[live, None]
    k, d = rows.shape
    if q is None:
        c = np.zeros(d + 1)
        c[-1] = -1.0
        res = linprog(c, A_ub=np.hstack([-rows, np.ones((k, 1))]), b_ub=np.zeros(k),
                      bounds=[(-1.0, 1.0)] * d + [(None, 1.0)], method="highs")
        found, e = res.status == 0 and -res.fun > _SEPARATION_TOL, res.x[:d]
    else:
        qk = q[w > 0][live]
        res = linprog(-(qk @ rows), A_ub=-rows, b_ub=np.zeros(k), bounds=(-1.0, 1.0),
                      method="highs")
        found, e = res.status == 0 and -res.fun > _SEPARATION_TOL * qk.sum(), res.x
    if not found:
        return None
    e = e / col
    return e / np.linalg.norm(e)


@dataclass(frozen=True)
class SetMethods:
    """What one ambiguity set's module supplies to the front ends (see :mod:`.registry`).

    Attributes
    ----------
    name : str
        The set's method name (``AmbiguitySet.name``): the registry key.
    evaluate : callable
        ``(at, delta, m, l, ambiguity, hess, worst, state) -> InnerResult``: ``F(delta)``
        with ``m = A delta`` and ``l = softplus(-m)`` precomputed; derived from
        ``reweight`` (:func:`reweighting_evaluate`) where that is given instead.
    zero_test : callable or None
        ``(at, ambiguity) -> float | None``: ``None`` unless ``0`` is (provably) in the
        subdifferential of ``F`` at ``delta = 0``, else the certified relative optimality
        gap of ``delta = 0``; called for ``rho > 0`` and ``E_P a != 0``.
    coercive : callable
        ``ambiguity -> bool``: whether ``F`` grows without bound (so that separable data
        still have a minimiser).
    minimise : callable or None
        ``(at, ambiguity, delta0, tol, max_iter, warm_started, start) -> Minimum | None``:
        a special minimisation (the p = 1, finite-kappa homotopy); ``None`` (or a ``None``
        result) means damped Newton on ``evaluate``. ``warm_started``: ``delta0`` is a
        subsample's minimiser; ``start``: ``None`` or a list holding ``evaluate``'s result
        at ``delta0`` (no worst case), which the set pops where it reuses it (its margins
        and losses), as :func:`newton` does.
    stall_fallback : callable or None
        ``(at, ambiguity, stall, tol) -> Minimum``: what to try when Newton stalls away
        from ``delta = 0`` (the p = 2 kink solve); it re-raises ``stall`` on failure.
    certify : callable or None
        ``(at, ambiguity, delta, res, info) -> float``: a certified upper bound on
        ``(F(delta) - min F) / max(1, |F(delta)|)`` from the exact evaluation ``res`` at
        ``delta`` (with its worst case) and the minimisation's ``info``; ``None`` means
        :func:`worst_case_gap` (weak duality through the worst case).
    smooth : callable
        ``ambiguity -> bool``: whether ``F`` is continuously differentiable away from
        ``delta = 0``, so that the Hessian-free :func:`quasi_newton` may minimise it above
        the crossover dimension (:mod:`.dual`); ``False`` keeps damped Newton.
    descent_at_zero : callable or None
        ``(at, ambiguity) -> ndarray | None``: a descent direction of ``F`` at ``delta = 0``
        for the restart when Newton is caught at that kink; ``None`` means ``E_P a`` (the
        nominal gradient's direction).
    conic : str
        Where the set's conic form lives (``simulator.solvers.conic``), or why none.
    losses : bool
        Whether ``evaluate`` reads the losses ``l = softplus(-m)``; ``False`` passes
        ``l = None`` (the set computes them where it needs them), one ``O(n)`` softplus
        fewer per evaluation.
    reweight : callable or None
        ``(at, m, l, ambiguity, state) -> Reweighting``: for a set whose ``F`` and worst
        case are functions of the margins alone (the reweighting sets; ``evaluate`` is then
        :func:`reweighting_evaluate` of it, built here), so that :func:`quasi_newton`
        searches its lines in margin space (``O(n)`` per trial point, no product with the atoms).
    subsample_model : bool
        Whether Newton on all the atoms, started at a subsample's minimiser, corrects its
        steps by that subsample's problem (:func:`_model_step`, ``newton(model=...)``):
        where its quadratic convergence leaves a fourth evaluation that the model saves.
    """

    name: str
    coercive: Callable
    evaluate: Callable | None = None
    zero_test: Callable | None = None
    minimise: Callable | None = None
    stall_fallback: Callable | None = None
    certify: Callable | None = None
    smooth: Callable = lambda amb: False
    descent_at_zero: Callable | None = None
    conic: str = ""
    losses: bool = True
    reweight: Callable | None = None
    subsample_model: bool = False

    def __post_init__(self) -> None:
        if (self.evaluate is None) == (self.reweight is None):
            raise ValueError(f"SetMethods {self.name!r}: give exactly one of evaluate and "
                             "reweight")
        if self.evaluate is None:
            object.__setattr__(self, "evaluate", reweighting_evaluate(self.reweight))
