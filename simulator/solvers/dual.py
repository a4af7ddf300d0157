"""The fast ``dual`` solver: Newton's method on the partially minimised dual (SPEC 3.4).

Every robust objective is ``F(delta) = min_nu G(delta, nu)`` over a one-dimensional dual
variable ``nu`` (``lambda`` for KL and Wasserstein, ``eta`` for chi-square), with
``G`` jointly convex, so ``F`` is convex in ``delta = theta - theta_ref``. At each
iterate the set's module (:mod:`simulator.solvers.registry`) solves the 1-D problem in
``nu`` exactly (warm-started) and returns ``F``, its Danskin gradient and its Hessian
(the Schur complement ``G_dd - G_dn G_nd / G_nn``). Damped Newton steps
(:func:`simulator.solvers.core.newton`) then converge quadratically; every pass over the
data is vectorised, ``O(n d^2)``.

``F`` is not differentiable at ``delta = 0`` (all losses tie at ``log 2``, and
``b = beta ||delta||`` has a kink) for every set with ``rho > 0``. Whether ``delta = 0`` is
the minimiser (``0`` in the subdifferential there) is decided first, by the set's
``zero_test``. A set may bring its own minimisation (the p = 1, finite-kappa
homotopy of :mod:`.wasserstein1`) and its own fallback where Newton stalls at a kink
(the p = 2 KKT solve of :mod:`.wasserstein2`). Nominal, KL and chi-square on separable
data have no minimiser (all margins positive at the returned point): that raises. If
Newton stalls near ``delta = 0`` it restarts along ``E_P a``. Problems with more than
``_SUBSAMPLE_RATIO * _SUBSAMPLE_N`` atoms start Newton from the minimiser of a subsample;
its value below ``F(0) = log 2`` then also proves ``delta = 0`` is not optimal. Above
``QUASI_NEWTON_MIN_D`` (or with ``method="lbfgs"``) the smooth sets are minimised by
L-BFGS on values and gradients instead, polished by Newton to the same stopping test
(:func:`simulator.solvers.core.quasi_newton`), with the same certificate. See docs/formulations.md.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import replace

import numpy as np

from .._validation import check_data, check_positive, check_positive_int
from ..ambiguity import AmbiguitySet
from ..data import PreferenceData
from .core import (
    FUSED,
    Atoms,
    Minimum,
    Stalled,
    newton,
    primal_value,
    psd_solve,
    quasi_newton,
    separating_direction,
    unmerge,
    weighted_hess,
    worst_case_gap,
)
from .inner import evaluate_inner, prepare
from .registry import methods
from .result import Solution

__all__ = ["solve", "solve_dual"]

_SOLVERS = ("dual", "cvxpy")
_METHODS = ("auto", "newton", "lbfgs")

#: Problems with more than ``_SUBSAMPLE_RATIO * _SUBSAMPLE_N`` atoms are started from the
#: solution on a subsample of ``_SUBSAMPLE_N`` atoms. Measured (CPU time, best of 3, one
#: BLAS thread, d = 8, DPO / KL / chi-square at n = 1e5, 2e5, 4e5 on Gaussian and
#: environment data): 12,500 was the fastest size in 15 of 18 cases (KL, n = 4e5,
#: environment: 0.131 s against 0.147 s with 50,000 and 0.239 s with no subsample); below
#: n = 5e4 no subsample paid (n = 2e4: the start costs what it saves).
_SUBSAMPLE_N = 12_500
_SUBSAMPLE_RATIO = 4
#: ... and the robust reweighting sets (KL and chi-square with ``rho > 0``) on at least this
#: fraction of the atoms (:func:`_subsample_size`): their minimiser weighs the losses' tail,
#: which a subsample of fixed size resolves worse on more atoms. Measured at n = 1e6, d = 8
#: (seeds 0-2, full-data evaluations and Hessians): KL on the environment data without
#: merging took 5 evaluations and 3 Hessians from 12,500 atoms, 4 and 3 from 25,000 (every
#: seed), chi-square 4 and 3 against 4 and 2 in two seeds of three; the Gaussian data the
#: same counts (one Hessian fewer for KL in one seed). The larger subsample costs about 5
#: ms (half a pass), an evaluation about 30 ms. DPO, with no tail to resolve, keeps 12,500.
_SUBSAMPLE_FRACTION = 1.0 / 40.0
#: A set with ``SetMethods.subsample_model`` corrects Newton's full-data steps by its
#: subsample's problem (:func:`core._model_step`) where the subsample holds at most this
#: fraction of the atoms: each step then costs a Hessian and about four evaluations of the
#: subsample, a fifth of a full evaluation at 1/20 (1/40 at n >= 5e5), for the full
#: evaluation it saves.
_MODEL_FRACTION = 1.0 / 20.0
#: ... and solves the subsample only to this gradient: its minimiser is within about
#: ``n_sub^-1/2`` (1e-3 .. 1e-2 in the gradient) of the full one, and the model matches the
#: full gradient at whatever point it starts from, so the last digits of the subsample's
#: solve (one or two evaluations and a Hessian of its atoms) change no full-data step.
_MODEL_SUB_TOL = 1e-7
#: Default certified relative optimality gap: Newton to ``tol = 1e-10`` leaves about 1e-20
#: and rounding 1e-16 (1e-13 for the unattained p = 1 suprema); 1e-9 is what the p = 1,
#: finite-kappa homotopy guarantees.
_GAP_TOL = 1e-9
#: An answer whose certificate fails is refined once by Newton to this fraction of ``tol``
#: before ``uncertified`` is raised (:func:`_refined`). The weak-duality bound of a worst case
#: whose moved atoms are (nearly) collinear needs the gradient inside the Hessian's range to
#: rounding (``core._NULL_GRAD``): on a 3-atom W2 problem the point at ``||grad|| = 1.8e-11``
#: (below ``tol``) certified ``inf`` and one more step, to ``4e-15``, certified ``3.6e-29``.
#: 1e-4 asks for the few further digits Newton's quadratic rate gives in a step or two.
_REFINE_TOL = 1e-4
#: A stall within this fraction of the starting point's norm is "caught at the kink at 0".
_NEAR_ZERO = 1e-2
#: A Newton run that *converged* to within this fraction of ``_NEAR_ZERO * scale`` ended on
#: the kink at 0 itself (round-off-sized iterates, about 1e-15 of the start, where the
#: subdifferential test already said 0 is not optimal); restarted like a stall.
_EPS_ZERO = 1e-8
#: ``method="auto"`` minimises a smooth ``F`` (``SetMethods.smooth``) by L-BFGS above this
#: dimension, by Newton up to it. Measured (benchmarks/crossover.py --repeat 3, n = 2e4
#: Gaussian features, CPU time, one BLAS thread; benchmarks/README.md), Newton's time over
#: L-BFGS's after the Hessian-free polish and the 8 d-atom certificate: 0.96-2.36 at d = 16,
#: 1.25-2.57 at d = 24, 0.44 (chi-square) to 4.36 at d = 32, 1.19-2.68 at d = 48 and 64,
#: 1.39-2.54 at d = 128: L-BFGS wins for every smooth set above d = 32 (at 32 chi-square
#: still loses, below it the ratios are within noise of 1 for some set).
QUASI_NEWTON_MIN_D = 32
#: ``merge=True`` merges the atoms of more than this many only when a probe of this many of
#: them (evenly spaced rows) holds enough repeats (:func:`_worth_merging`). The merge costs
#: about 15 passes at n = 1e6, d = 8 (a hash of every row and a hash-table grouping,
#: :meth:`PreferenceData.merged`); continuous features repeat no row, and 4096 rows tell
#: them apart for ``O(4096 d)``.
_MERGE_PROBE = 4096
#: Merging pays when the distinct atoms are at most this fraction of the atoms: the merged
#: solve then costs a few passes where the unmerged one costs 15-50 (env data of the
#: benchmark, n = 1e6: 30,000 distinct atoms, 1/33). The count of distinct atoms is
#: estimated from the probe's repeats ``c`` (birthday estimate ``K ~ s^2 / (2 c)`` for ``s``
#: probed rows of ``K`` equally likely atoms; a lower estimate where the atoms are unequally
#: likely, which costs at most a merge that did not pay).
_MERGE_FRACTION = 1.0 / 16.0
#: Repeats the probe must see at least before the birthday estimate is trusted (its relative
#: standard error is about ``c^-1/2``: 18% at 32).
_MERGE_MIN_REPEATS = 32
#: A stall of a set without a norm term (:func:`solve_dual`) is checked for strict
#: separability by a linear program over at most this many atoms (HiGHS, one thread,
#: measured: 3-6 ms at n = 100, d = 3, 0.08-0.10 s at 1e4 and 0.8 s at 1e5, d = 8: at most
#: a few solves' time); above, the stall is raised as it is.
_SEPARABILITY_LP_ATOMS = 100_000
#: Every set has ``F(0) = log 2`` (all losses are ``log 2`` at ``theta_ref``, whatever the
#: atoms): a start with ``F`` below ``log 2 (1 - _BELOW_ZERO)`` proves ``delta = 0`` is not
#: the minimiser without the zero test. 1e-12 is above the rounding of an ``n``-term sum
#: (``core._SUM_ROUNDING``, 1e-13).
_BELOW_ZERO = 1e-12
#: ``F(0)``, the same for every set.
_LOG2 = math.log(2.0)
#: Newton's start from scratch, the first Newton step of ``E_P l``, is shrunk towards
#: ``theta_ref`` while that lowers ``F`` (:func:`_shrunk_start`), by at most this factor in
#: all. A robust minimiser lies closer to ``theta_ref`` than the nominal one (KL(0.1) on the
#: environment benchmark data at n = 1e4: 0.39 against a start of norm 2.6), where Newton
#: from the nominal start spent half its 13 evaluations in line searches; ``2^-8`` is the
#: 256-fold span of the eight halvings this search replaced.
_START_SHRINK = 2.0**-8
#: Each shrinkage ``t`` is the minimiser of the quadratic along the ray through ``F(0) =
#: log 2``, ``F(delta)`` and the slope ``g . delta`` (:func:`_ray_minimiser`), at least
#: ``_START_MIN_RATIO`` (a model fitted on ``[0, 1]`` is not trusted for a jump beyond a
#: sixteenth of its interval, and an over-shrunk start costs a few line-search halvings).
_START_MIN_RATIO = 1.0 / 16.0
#: ... and tried only below ``_START_MODEL_MAX``: above it the model predicts a gain of less
#: than ``(1 - 0.75)^2 a`` (``a`` its curvature), not worth a full evaluation. Measured at
#: n = 1e4, d = 8 on 66 problems (docs/formulations.md): 306 evaluations against 416 for the
#: halvings this search replaced, none more on any problem.
_START_MODEL_MAX = 0.75
#: L-BFGS's start (:func:`_quasi_start`) takes its step length from this many atoms: the
#: estimate of ``E_P (a . v)^2`` is then within a few percent (its relative standard error
#: is about ``(2 / k)^1/2`` for Gaussian projections), for 1/8 of a pass at n = 1e4 (no
#: more than a start needs).
_START_ATOMS = 1024
#: The restart along ``E_P a`` tries the steps ``2^0, 2^-1, ..., 2^-(_RESTART_GRID - 1)``.
_RESTART_GRID = 40


def _worth_merging(data: PreferenceData) -> bool:
    """Whether merging repeated atoms may pay: always for at most ``_MERGE_PROBE`` atoms, else
    when ``_MERGE_PROBE`` evenly spaced rows hold at least half repeats (few distinct atoms),
    or enough repeats ``c`` that the birthday estimate ``s^2 / (2 c)`` of the distinct atoms
    is at most ``_MERGE_FRACTION n``. Rows are counted by one random projection of each row
    and its label (distinct rows that collide only make the exact merge run where it was not
    needed); no projection when the first half of them (and one) differ already in their
    first feature, as continuous features do. The rows are gathered by ``np.take`` (a third
    of the time of fancy indexing) and counted by sorting."""
    if data.n <= _MERGE_PROBE:
        return True
    rows = np.arange(_MERGE_PROBE) * (data.n - 1) // (_MERGE_PROBE - 1)  # 0, ..., n - 1
    half = _MERGE_PROBE // 2 + 1
    if _distinct(data.x[rows[:half], 0]) == half:
        return False  # more than half distinct already in the first feature (continuous data)
    with np.errstate(over="ignore", invalid="ignore"):
        keys = np.take(data.x, rows, axis=0) @ _projection(data.d)
    chosen = data.y[rows] > 0.5
    repeats = _MERGE_PROBE - _distinct(keys[chosen]) - _distinct(keys[~chosen])
    if 2 * repeats >= _MERGE_PROBE:
        return True
    return (repeats >= _MERGE_MIN_REPEATS
            and _MERGE_PROBE**2 / (2.0 * repeats) <= _MERGE_FRACTION * data.n)


@functools.lru_cache(maxsize=16)
def _projection(d: int) -> np.ndarray:
    """The probe's fixed random projection of ``d`` features (a seeded draw, made once: a new
    generator costs 10 us, as much as the projection itself at n = 1e4)."""
    r = np.random.default_rng(0).standard_normal(d)
    r.flags.writeable = False
    return r


def _distinct(v: np.ndarray) -> int:
    """The number of distinct values of ``v`` (by a sort; NaNs count as distinct)."""
    if v.size == 0:
        return 0
    v = np.sort(v)
    return 1 + int(np.count_nonzero(v[1:] != v[:-1]))


def _zero_test(at: Atoms, amb: AmbiguitySet) -> float | None:
    """``None`` unless ``delta = 0`` provably minimises ``F``; else its certified relative
    gap (see the module docstring)."""
    if float(np.linalg.norm(at.mean_a)) == 0.0:
        return 0.0  # every gradient at 0 vanishes
    if amb.rho == 0.0:
        return None
    return methods(amb).zero_test(at, amb)


def _zero_is_optimal(at: Atoms, amb: AmbiguitySet) -> bool:
    """Whether ``delta = 0`` minimises ``F``."""
    return _zero_test(at, amb) is not None


def _start(at: Atoms, quasi: bool = False) -> np.ndarray:
    """First Newton step of ``E_P l`` from ``delta = 0`` (``H = E a a^T / 4``, ``g = -E a / 2``);
    with ``quasi``, the Hessian-free Newton step along ``v = E_P a`` only, ``2 ||v||^2 v /
    E_P (a . v)^2``, with ``E_P (a . v)^2`` from every ``ceil(n / _START_ATOMS)``-th atom (a
    strided view; all where those weigh nothing): ``O(_START_ATOMS d)`` instead of the
    ``O(n d^2)`` Hessian or an ``O(n d)`` pass."""
    v = at.mean_a
    if not quasi:
        return psd_solve(weighted_hess(at, 0.25 * at.w), 0.5 * v)
    rows = slice(None, None, -(-at.w.size // _START_ATOMS))
    sub = at.subset(rows) if float(at.w[rows].sum()) > 0 else at
    return 2.0 * float(v @ v) / float(sub.w @ sub.matvec(v) ** 2) * v


def _transfer(state):
    """The part of a subsample's warm-start state that starts the full problem."""
    return None if state is None else state.transfer()


def _subsample_size(n: int, amb: AmbiguitySet) -> int:
    """Atoms of the subsample start: ``_SUBSAMPLE_N``, for the robust reweighting sets at
    least ``_SUBSAMPLE_FRACTION n``."""
    mod = methods(amb)
    if mod.reweight is not None and amb.rho > 0:
        return max(_SUBSAMPLE_N, int(_SUBSAMPLE_FRACTION * n))
    return _SUBSAMPLE_N


def _stratified(n: int, k: int) -> np.ndarray:
    """``k`` sorted distinct atoms of ``n``: one drawn uniformly (a fixed-seed draw) from
    each of the strata ``[floor(i n / k), floor((i + 1) n / k))``, in ``O(k)``
    (``Generator.choice`` without replacement took 3.5 ms at n = 1e6, half a pass, for
    the same sampling error or less)."""
    edges = (np.arange(k + 1) * n) // k
    u = np.random.default_rng(0).random(k)
    return edges[:-1] + (u * np.diff(edges)).astype(np.intp)


def _subsample_start(at: Atoms, amb: AmbiguitySet, tol: float, max_iter: int):
    """Starting point and dual state from the same problem on a random subsample.

    For ``n > _SUBSAMPLE_RATIO * _SUBSAMPLE_N`` atoms, :func:`_subsample_size` of them (a
    fixed-seed draw, stratified with the subsample model, :func:`_stratified`, weights
    renormalised) are solved first; their minimiser is within ``O(n_sub^-1/2)`` of the full
    one, so Newton on the full data needs only its last, quadratic steps and the dual
    searches start close to ``lambda*``. Returns a
    :class:`Minimum` whose ``result`` is the full problem's evaluation there (Newton's
    first, warm-started by the subsample's transferred state; for Wasserstein p = 1 with
    finite ``kappa`` that of a majorant of ``F``, :class:`.wasserstein1.W1Start`, whose
    homotopy reads only its margins and losses), or ``None`` when the subsample's minimiser
    is ``delta = 0`` or its solve fails (the caller then starts from scratch).

    For a reweighting set whose steps the subsample model does not correct (``corrected``
    below: a set without ``subsample_model``, or a subsample of more than ``_MODEL_FRACTION
    n`` atoms) that evaluation's Hessian is the subsample's at the same point (``O(n_sub
    d^2)`` instead of ``O(n d^2)``, about 0.7 evaluations at n = 1e6, d = 8): its sampling
    error, about ``n_sub^-1/2`` relative, adds ``O(n_sub^-1/2 ||g||)`` to the gradient after
    Newton's first step, small beside the quadratic term from the start's own error.
    Measured at n = 1e6, d = 8 (KL and chi-square, Gaussian and environment data without
    merging, seeds 0-2: 12 solves): one full Hessian fewer in 7, the same counts in 4, one
    evaluation more in 1 (KL, environment data, seed 0: Newton's prediction ``1.04e-10`` at
    the third step just missed ``tol = 1e-10``, so the chord step ran). Both sets now take
    the model at that size instead, which starts from the full Hessian (chi-square since
    issue 9's ninth round: 3 full evaluations and 2 Hessians in each of 6 solves, against 4
    and 1 or 2; docs/formulations.md).
    """
    n, mod = at.w.size, methods(amb)
    size = _subsample_size(n, amb)
    # the stratified draw where the subsample model corrects Newton's steps (KL, DPO, W1 with
    # kappa = inf: where Newton minimises a smooth F); the other sets keep the draw their
    # measured paths come from (the W1 homotopy of finite kappa, which never reads the
    # model, took 0.93-1.05 of the time with it, by the luck of the draw)
    corrected = mod.subsample_model and mod.smooth(amb) and size <= _MODEL_FRACTION * n
    idx = (_stratified(n, size) if corrected
           else np.sort(np.random.default_rng(0).choice(n, size, replace=False)))
    if not at.w[idx].sum() > 0:
        return None
    sub = at.subset(idx)
    try:  # the subsample itself starts from scratch
        found = _minimise(sub, amb, max(tol, _MODEL_SUB_TOL) if corrected else tol, max_iter,
                          zero_test=True)
    except RuntimeError:
        return None
    if not np.any(found.delta):
        return None
    last = found.result
    modelled = corrected and last is not None and last.hess is not None
    # with the model Newton's first step takes the full Hessian here: formed at once, the
    # gradient's product in its pass (core.FUSED)
    res = _objective(at, amb, modelled)(found.delta, _transfer(found.state))
    if last is None or last.hess is None:
        return Minimum(found.delta, 0, res.state, result=res)
    if modelled:
        # the full Hessian at the start, and each step corrected by the subsample's problem
        model = _SubsampleModel(_objective(sub, amb), found.delta, last)
        return Minimum(found.delta, 0, res.state, result=res, model=model)
    if mod.reweight is not None:
        # Newton's first full-data step on the subsample's Hessian at the same point (the
        # docstring); the certificates never read an evaluation's Hessian
        sub_hess = last.hess()
        res = replace(res, hess=lambda: sub_hess)
    return Minimum(found.delta, 0, res.state, result=res)


class _SubsampleModel:
    """A subsample's problem as :func:`core.newton`'s ``model``: ``point -> InnerResult``
    (with its Hessian), each evaluation warm-started from the last; the subsample's own
    evaluation at its minimiser is the first."""

    def __init__(self, objective, delta: np.ndarray, last) -> None:
        self._objective, self._delta, self._last = objective, delta, last

    def __call__(self, point: np.ndarray):
        if not np.array_equal(point, self._delta):
            self._last = self._objective(point, self._last.state)
            self._delta = point
        return self._last


def _smallest_margin(m: np.ndarray, w: np.ndarray) -> float:
    """The smallest margin over atoms of positive weight (no boolean ``n``-vector where every
    weight is positive, as in every empirical sample)."""
    if float(w.min()) > 0:
        return float(m.min())
    return float(m.min(where=w > 0, initial=math.inf))


def _quasi(at: Atoms, amb: AmbiguitySet, method: str) -> bool:
    """Whether ``method`` means :func:`quasi_newton` (L-BFGS) for this problem: for a smooth
    ``F`` only, with ``"auto"`` above ``QUASI_NEWTON_MIN_D``."""
    big = at.x.shape[1] > QUASI_NEWTON_MIN_D
    return methods(amb).smooth(amb) and (method == "lbfgs" or (method == "auto" and big))


def _first(at: Atoms, amb: AmbiguitySet, tol: float, max_iter: int,
           quasi: bool) -> Minimum | None:
    """The subsample start of a problem with more than ``_SUBSAMPLE_RATIO * _SUBSAMPLE_N``
    atoms, if any.

    L-BFGS starts from scratch: its curvature pairs do not carry over from a subsample, and
    at n = 1e5 (Gaussian data) the subsample start made it 1.1-2.2x slower at d = 64 and
    d = 512 (benchmarks/README.md)."""
    if at.w.size > _SUBSAMPLE_RATIO * _SUBSAMPLE_N and not quasi:
        return _subsample_start(at, amb, tol, max_iter)
    return None


def _ray_minimiser(f0: float, f1: float, slope: float) -> float:
    """Minimiser ``t`` of the quadratic ``q`` with ``q(0) = f0``, ``q(1) = f1`` and ``q'(1) =
    slope``: ``q(t) = f0 + b t + a t^2``, ``a = slope - (f1 - f0)``, ``t = 1 - slope / (2 a)``;
    ``0.5`` (a halving) where ``q`` is not convex (``a <= 0``)."""
    a = slope - (f1 - f0)
    return 1.0 - slope / (2.0 * a) if a > 0 else 0.5


def _shrunk_start(objective, delta: np.ndarray):
    """``delta`` shrunk while that lowers ``F`` (by at most ``_START_SHRINK`` in all), with
    ``F``'s evaluation there in a list (Newton's first, which :func:`core.newton` pops).

    Along the ray ``F(t delta)`` is convex with ``F(0) = log 2`` for every set; the trial
    point is ``t delta``, ``t`` the minimiser of the quadratic through ``F(0)``, ``F(delta)``
    and the slope ``g . delta`` (:func:`_ray_minimiser`; at least ``_START_MIN_RATIO``), tried
    only where it is below ``_START_MODEL_MAX``. None is tried where ``g . delta <= 0``
    (``g`` the (sub)gradient at ``delta``): by convexity ``F(t delta) >= F(delta) - (1 - t)
    g . delta >= F(delta)`` for every ``t < 1``, the minimiser lies beyond."""
    cur, shrink = objective(delta, None), 1.0
    while shrink > _START_SHRINK:
        slope = float(cur.grad @ delta)
        if not slope > 0:
            break
        t = max(_ray_minimiser(_LOG2, cur.value, slope), _START_MIN_RATIO,
                _START_SHRINK / shrink)
        if not t < _START_MODEL_MAX:
            break
        trial = objective(t * delta, cur.state)
        if not trial.value < cur.value:
            break
        delta, cur, shrink = t * delta, trial, shrink * t
    return delta, [cur]


def _below_zero(res) -> bool:
    """Whether the evaluation ``res`` proves ``delta = 0`` is not the minimiser: ``F`` below
    ``F(0) = log 2`` beyond rounding (``_BELOW_ZERO``)."""
    return res.value < _LOG2 * (1.0 - _BELOW_ZERO)


def _unbounded(amb: AmbiguitySet) -> RuntimeError:
    """The error of separable data, where ``amb`` (no norm term) has no minimiser."""
    return RuntimeError(
        f"dual solver: the data are separable (status: unbounded); {amb!r} has no "
        "minimiser (the objective decreases to its infimum as ||theta|| grows)")


def _objective(at: Atoms, amb: AmbiguitySet, fused: bool = False):
    """``(delta, state) -> InnerResult``: ``F`` with its Hessian, no worst case (what Newton
    and L-BFGS minimise); with ``fused``, the Hessian formed at once (``core.FUSED``: for a
    point whose Hessian is certainly taken)."""
    hess = FUSED if fused else True

    def objective(d, st):
        return evaluate_inner(at, d, amb, hess=hess, worst=False, state=st)
    return objective


def _minimise(at: Atoms, amb: AmbiguitySet, tol: float, max_iter: int,
              quasi: bool = False, first: Minimum | None = None,
              start: list | None = None, zero_test: bool = False) -> Minimum:
    """Newton (or with ``quasi`` L-BFGS, then Newton) on the exact ``F`` from ``first`` (a
    subsample start; ``start``, a list holding its evaluation, which Newton pops) or the
    first Newton step, or the set's own minimisation, with the fallbacks above. With
    ``zero_test``, ``delta = 0`` is returned where it is the minimiser, with ``info`` the
    certified gap and ``zero_kink``: the subdifferential test (:func:`_zero_test`) runs only
    where the shrunk start does not already lie below ``F(0)``."""
    label = repr(amb)
    mod = methods(amb)
    delta, state = (first.delta, first.state) if first is not None else (_start(at, quasi), None)
    shrink = first is None and not quasi and amb.rho > 0

    def at_zero(gap):  # the minimiser delta = 0, certified by the subdifferential test
        if start:
            start.clear()  # not kept alive beside the caller's evaluations
        return Minimum(np.zeros_like(delta), 0, None, {"optimality_gap": gap, "zero_kink": True})

    objective = _objective(at, amb)

    # the shrunk start (below) and L-BFGS's first evaluation (here) come before the test,
    # which they make unnecessary where F lies below F(0) = log 2 there
    ahead = quasi and not start and mod.minimise is None and amb.rho > 0
    if ahead and zero_test:
        start = [objective(delta, state)]
        zero_test = not _below_zero(start[0])
    if zero_test and not (shrink and mod.minimise is None):
        gap = _zero_test(at, amb)
        if gap is not None:
            return at_zero(gap)
        zero_test = False
    if mod.minimise is not None:
        # with the list holding the subsample start's evaluation, which the set pops where
        # it takes it (as Newton does: what it computed at delta is reused)
        special = mod.minimise(at, amb, delta, tol, max_iter, first is not None, start)
        if special is not None:
            return special

    scale = float(np.linalg.norm(delta))
    # a reweighting set's F from its margins alone: L-BFGS's line searches in margin space
    reweight = (None if mod.reweight is None
                else lambda m, l, st: mod.reweight(at, m, l, amb, st))

    def run(d, st, start=None, model=None) -> Minimum:
        # Newton's step test can also stop it *at* the kink delta = 0 (steps of round-off
        # size while the one-sided gradient there stays large): that is a stall too
        out = (quasi_newton(objective, d, tol, max_iter, label, st, start, at, reweight)
               if quasi else newton(objective, d, tol, max_iter, label, st, start, model=model,
                                    fused=None if model is None else _objective(at, amb, True)))
        if float(np.linalg.norm(out.delta)) < _NEAR_ZERO * scale * _EPS_ZERO:
            raise Stalled(f"{label}: Newton stopped at the kink delta = 0", out.delta, out.state)
        return Minimum(out.delta, out.iterations, out.state, result=out.result)

    if shrink:
        delta, start = _shrunk_start(objective, delta)
        gap = None if not zero_test or _below_zero(start[0]) else _zero_test(at, amb)
        if gap is not None:
            return at_zero(gap)
    try:
        return run(delta, state, start, None if first is None else first.model)
    except Stalled as exc:
        stall = exc
    if float(np.linalg.norm(stall.delta)) < _NEAR_ZERO * scale:
        # caught at the kink at delta = 0, which the subdifferential test showed is not
        # optimal: restart from the best point along a descent direction there (the set's
        # steepest one, then E_P a)
        steepest = None if mod.descent_at_zero is None else mod.descent_at_zero(at, amb)
        for v in ([] if steepest is None else [steepest]) + [at.mean_a]:
            v = v * (scale / float(np.linalg.norm(v)))
            ts = 2.0 ** -np.arange(0, _RESTART_GRID)
            vals = [evaluate_inner(at, t * v, amb, worst=False).value for t in ts]
            try:
                return run(ts[int(np.argmin(vals))] * v, None)
            except Stalled as exc:
                stall = exc
    if mod.stall_fallback is None:
        raise stall
    return mod.stall_fallback(at, amb, stall, tol)


def _refined(at: Atoms, amb: AmbiguitySet, delta: np.ndarray, found: Minimum, gap: float,
             tol: float, max_iter: int, quasi: bool, certify):
    """``(found, evaluation, gap)`` at the point Newton reaches from ``delta`` with
    ``_REFINE_TOL tol`` (the same damped Newton, Hessian-free where ``quasi``) where its
    certificate is below ``gap``, the one at ``delta``; else ``None`` (also where Newton
    fails): the second chance of an answer whose certificate failed at ``tol``."""
    try:
        run = newton(_objective(at, amb), delta, _REFINE_TOL * tol, max_iter, repr(amb),
                     found.state, hessian_free=quasi)
    except RuntimeError:  # Stalled included: the answer at delta stands as it is
        return None
    res = evaluate_inner(at, run.delta, amb, hess=False, worst=True, state=run.state)
    new_gap = certify(at, amb, run.delta, res, found.info)
    if not new_gap < gap:
        return None
    return (Minimum(run.delta, found.iterations + run.iterations, run.state, found.info),
            res, new_gap)


def solve_dual(data: PreferenceData, ambiguity: AmbiguitySet, beta: float = 1.0,
               theta_ref=None, tol: float = 1e-10, max_iter: int = 100,
               gap_tol: float = _GAP_TOL, merge: bool = True, method: str = "auto") -> Solution:
    """Minimise the exact robust objective by Newton's method on the dual (SPEC 3.4).

    Parameters
    ----------
    data, ambiguity, beta, theta_ref
        As in :func:`simulator.solve`.
    tol : float
        Stop when ``||grad||_inf <= tol`` for the gradient in the normalised parameter
        ``scale (theta - theta_ref)``, ``scale = sqrt(E_P ||beta x||^2)``: relative to the
        problem's own scale, so that scaling the features (and a Wasserstein radius) by
        ``c`` maps ``theta - theta_ref`` to ``(theta - theta_ref) / c``, and ``beta`` likewise.
    max_iter : int
        Newton iterations allowed.
    gap_tol : float
        The certified relative optimality gap a solution must reach to be returned.
    merge : bool
        Solve on the distinct atoms (:meth:`PreferenceData.merged`, ``O(n d)`` and a
        hash-table grouping of ``n`` keys) and map the worst case back to the caller's atoms
        (built when read); the answer is the same (a speed-up for samples of a finite
        world). Above ``_MERGE_PROBE = 4096`` atoms the merge is done only when 4096 evenly
        spaced rows show it pays (at most half of them distinct, or a birthday estimate of at
        most ``n / 16`` distinct atoms).
    method : {"auto", "newton", "lbfgs"}
        How a smooth ``F`` (DPO, KL, chi-square, Wasserstein p = 1 with ``kappa = inf``) is
        minimised: ``"newton"``, damped Newton (a dense ``d x d`` Hessian per step,
        ``O(n d^2)``); ``"lbfgs"``, L-BFGS on values and gradients (``O(n d)`` per step)
        polished by Newton to the same stopping test; ``"auto"``, L-BFGS for ``d >
        QUASI_NEWTON_MIN_D``. The other sets always use their own method. Either way the
        answer is certified; ``info["method"]`` says which ran.

    Returns
    -------
    Solution
        With ``solver="dual"`` and the certificate of :func:`robust_objective` at the
        returned ``theta``; ``info["zero_kink"]`` tells whether ``theta = theta_ref``
        was certified optimal by the subdifferential test, and ``info["optimality_gap"]``
        is a certified upper bound on ``(L_U(theta) - min L_U) / max(1, |L_U(theta)|)``
        (weak duality; the bound each set uses is in docs/formulations.md).

    Raises
    ------
    ValueError
        On bad arguments.
    RuntimeError
        When Newton's method does not converge, or its answer cannot be certified to
        ``gap_tol`` (status ``uncertified``); the message names the status.
    """
    t0 = time.perf_counter()
    check_data(data)
    inverse = None
    if merge and _worth_merging(data):
        distinct, inverse = data.merged()
        if distinct.n == data.n:
            inverse = None
        else:
            data, caller = distinct, data
    prob = prepare(data, ambiguity, beta, theta_ref, normalise=True)
    at, beta, theta_ref = prob.atoms, prob.beta, prob.theta_ref
    tol = check_positive(tol, "tol")
    max_iter = check_positive_int(max_iter, "max_iter")
    gap_tol = check_positive(gap_tol, "gap_tol")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    quasi = _quasi(at, ambiguity, method)
    mod = methods(ambiguity)
    first = _first(at, ambiguity, tol, max_iter, quasi)
    start = []  # the evaluation at the subsample start, handed on to Newton without a copy
    if first is not None:
        # the state travels with the evaluation (Newton takes both from start): no reference
        # here keeps the evaluation's vectors alive once Newton has moved past it
        start.append(first.result)
        first = replace(first, result=None, state=None)
    # F(first) < F(0) = log 2 proves delta = 0 is not the minimiser (so does an upper bound on
    # F(first): the p = 1, finite-kappa start's value, wasserstein1.W1Start); else _minimise
    # decides
    try:
        found = _minimise(at, ambiguity, tol, max_iter, quasi, first, start,
                          zero_test=not (start and _below_zero(start[0])))
    except Stalled as stall:
        # Newton stalls on its way to infinity where strictly separable data leave a set
        # without a norm term no minimiser (2 to 5 atoms in d = 2, 3: line_search_failed or
        # stagnated); the separability LP (core.separating_direction, scale-free) names it
        if mod.coercive(ambiguity) or at.w.size > _SEPARABILITY_LP_ATOMS:
            raise
        if separating_direction(at.a, at.w) is not None:
            raise _unbounded(ambiguity) from stall
        raise
    zero = bool(found.info.get("zero_kink", False))
    delta = found.delta  # normalised: theta - theta_ref = delta / at.scale
    res = found.result  # the evaluation at delta that ended the minimisation, if any
    if not mod.coercive(ambiguity):
        m = res.margins if res is not None and res.margins is not None else at.matvec(delta)
        if _smallest_margin(m, at.w) > 0:
            # every margin is positive: scaling delta up lowers every loss, so no minimiser
            raise _unbounded(ambiguity)
        del m
    if res is None or res.worst_case is None:  # Newton's last evaluation lacks the worst case
        # its margins and losses (where it kept them) are those at delta
        m, l = (None, None) if res is None else (res.margins, res.losses)
        del res
        found = replace(found, result=None)  # not kept alive beside the new evaluation
        res = evaluate_inner(at, delta, ambiguity, hess=False, worst=True, state=found.state,
                             margins=m, losses=l)
        del m, l
    info = {"zero_kink": zero, "method": "lbfgs" if quasi else "newton", **found.info}
    certify = mod.certify or worst_case_gap
    if not zero:
        info["optimality_gap"] = certify(at, ambiguity, delta, res, found.info)
        if not info["optimality_gap"] <= gap_tol:
            better = _refined(at, ambiguity, delta, found, info["optimality_gap"], tol,
                              max_iter, quasi, certify)
            if better is not None:
                found, res, gap = better
                delta = found.delta
                info.update(found.info, optimality_gap=gap)
    if not info["optimality_gap"] <= gap_tol:
        raise RuntimeError(
            f"dual solver could not certify {ambiguity!r} (status: uncertified): the certified "
            f"optimality gap is {info['optimality_gap']:.3e} > gap_tol = {gap_tol:g} after "
            f"{found.iterations} iterations")
    theta = theta_ref + delta / at.scale
    wc = res.worst_case
    if res.primal is not None:
        primal = res.primal  # the set's own E_{Q*} l (the worst case's x is built on demand)
    elif wc.y is at.y and wc.x is at.x and res.losses is not None:
        primal = float(wc.weights @ res.losses)  # a reweighting: E_{Q*} l on the same atoms
    else:
        primal = primal_value(wc, theta, beta, theta_ref)
    if inverse is not None:
        wc = unmerge(wc, inverse, caller.weights)
        info["distinct_atoms"] = data.n
    if wc.budget is not None:
        info["transport_cost"] = wc.transport_cost
        info["budget"] = wc.budget
    return Solution(
        theta=theta, value=res.value, dual=res.dual, worst_case=wc, primal_value=primal,
        gap=abs(res.value - primal) / max(1.0, abs(res.value)), status="optimal",
        solver="dual", ambiguity=ambiguity, beta=beta, theta_ref=theta_ref,
        grad_norm=0.0 if zero else float(np.linalg.norm(res.grad)) * at.scale,
        iterations=found.iterations, solve_time_s=time.perf_counter() - t0, info=info)


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
        Passed to the solver (``tol``, ``max_iter``, ``gap_tol``, ``merge``, ``method``
        for ``dual``; ``solvers``, ``verbose``, ``rescale`` for ``cvxpy``).

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
        When the dual solver does not converge or cannot certify its answer.
    """
    if solver == "dual":
        return solve_dual(data, ambiguity, beta, theta_ref, **options)
    if solver == "cvxpy":
        from .conic import solve_cvxpy

        return solve_cvxpy(data, ambiguity, beta, theta_ref, **options)
    raise ValueError(f"solver must be one of {_SOLVERS}, got {solver!r}")
