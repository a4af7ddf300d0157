"""The KL ball ``{Q << P : KL(Q || P) <= rho}`` (KLDPO, SPEC 3.1).

Inner evaluation: ``F = min_{lambda > 0} lambda rho + lambda log E_P exp(l / lambda)``;
``lambda*`` solves ``KL(Q_lambda || P) = rho`` with ``Q_lambda ∝ P exp(l / lambda)`` (a
monotone 1-D root, safeguarded Newton in ``log(1/lambda)``); ``lambda* = 0`` and
``F = max l`` once ``rho >= -log P(argmax l)``. Hessian of ``F``: ``E_Q hess l + s
[Cov_Q(grad l) - c c^T / Var_Q l]``, ``c = Cov_Q(grad l, l)``, ``s = 1 / lambda``.

``delta = 0`` is optimal iff ``min_nu log E_P exp(nu . a) >= -rho`` (the I-projection of
``P`` onto ``{E_Q a = 0}`` lies in the ball). Conic form: ``conic.py`` (form ``"kl"``,
an exponential cone per atom).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..losses import dpo_loss
from .core import (
    GRADIENT,
    Atoms,
    Reweighting,
    RowSum,
    SetMethods,
    Workspace,
    concave_max,
    logistic_gap,
    loss_sigmoid,
    min_norm_mean,
    top_atoms,
    weighted_hess,
)
from .nominal import nominal_reweighting

__all__ = ["KLState", "METHODS"]

#: Iterations of the root search for ``lambda*`` (it needs a few dozen at most).
_ROOT_ITERS = 300
#: The root search stops once ``|KL - rho|`` is within the rounding of ``KL = s E_Q z - log
#: E_P exp(s z)``: ``_SUM_EPS (|s E_Q z| + |log E_P exp(s z)| + rho)``. numpy's pairwise sums
#: of ``n`` terms err by about ``log2(n)`` ulps, so 64 ulps cover every ``n`` (on 1e5+ atoms
#: the old absolute 1e-15 was unreachable) ...
_SUM_EPS = 64 * 2.0**-52
#: ... or once the bracket (or the Newton step) in ``u = log(1 / lambda)`` is below
#: ``_ROOT_TOL max(1, |u|)``: a few ulps of ``u`` (the old purely relative width could not be
#: reached near ``lambda = 1``, ``u = 0``).
_ROOT_TOL = 1e-15
#: Trust region of a Newton step in ``log(1 / lambda)`` (``lambda`` changes 20-fold at most).
_TRUST = 3.0
#: Step in ``log(1 / lambda)`` while the root is bracketed on one side only.
_EXPAND = 2.0
#: Smallest variance of the losses used for the first guess ``sqrt(2 rho / Var_P l)``.
_TINY = 1e-300
#: Atoms per block of the pass over the losses (:func:`_losses`): the block's margins,
#: losses and scratch, and the last losses and worst case of the first guess, seven vectors
#: of 128 KB at 16384, stay in the core's own 1 MB cache. Measured (n = 1e6, one BLAS
#: thread, this shared machine under a load of 1.3 to 2): the losses with the first guess's
#: sums 6.0-8.1 ms in blocks of 16384, 6.4-7.1 at 32768, 6.6 at 65536, 8.2-9.2 unblocked,
#: 9.3-9.7 at 4096; the two separate passes 7.6 ms. (The normalisation of ``Q*`` with the
#: sigmoid, two vectors, runs unblocked: 1.8-2.0 ms against 2.2-2.4 ms in blocks of 16384.)
_LOSS_BLOCK = 16384
#: :func:`_tilt` sums the moments in its first pass about a centre ``c`` unless they would
#: cancel, ``(E_Q z - c)^2 > Var_Q z / _SHIFT_RATIO`` (their relative rounding is then at
#: most about ``_SHIFT_RATIO`` ulps: far below what Halley's step needs).
_SHIFT_RATIO = 1e6
#: A tilt with ``|KL - rho| <= _LAST_STEP rho`` is expected to be the last but one: Halley's
#: cubic step from it lands within rounding (measured at n = 1e6: after ``|KL - rho| =
#: 1e-9 .. 1.5e-9`` the next tilt ended the search, after ``1e-4 .. 4e-4`` it did not), so
#: the next tilt leaves its moments to a second pass on first use.
_LAST_STEP = 1e-5
#: Atoms per block of the tilt's passes: a block's pieces of ``z``, ``q`` and two scratch
#: blocks (2 MB at 65536) stay in cache from one operation to the next instead of
#: streaming 8 MB vectors from memory for each at n = 1e6. Measured (one tilt with its
#: moments, n = 1e6, one BLAS thread, on this shared machine under a load of 5): 5.1 ms
#: unblocked, 3.6 to 3.7 ms with blocks of 32768 to 131072, 4.9 ms with 16384 (the
#: Python loop's overhead).
_BLOCK = 65536


@dataclass(frozen=True)
class KLState:
    """Warm start of the KL root search: the last ``lambda*``, the losses ``l``, the
    worst case ``q`` and ``mean = E_q l`` of that evaluation (:func:`_first_guess` predicts
    the next ``lambda*`` from them), and the :class:`.core.Workspace` shared along one
    minimisation."""

    lam: float | None = None
    l: np.ndarray | None = field(default=None, compare=False, repr=False)
    q: np.ndarray | None = field(default=None, compare=False, repr=False)
    warm: Workspace | None = field(default=None, compare=False, repr=False)
    mean: float | None = field(default=None, compare=False, repr=False)

    def transfer(self) -> KLState:
        """The state to start another problem (a subsample's solution) with: ``lambda*`` and
        ``E_q l`` (the losses, the worst case and the scratch vectors are the subsample's)."""
        return KLState(self.lam, mean=self.mean)


class _Tilt:
    """``Q_s ∝ P exp(s z)`` at ``s = 1 / lambda``: ``KL(Q_s || P)``, ``Var_Q z``, ``q ∝ Q``
    (normalised by the caller once the root is found), ``log E_P exp(s z)``, the rounding
    ``noise`` of ``KL`` and the third central moment ``skew = E_Q (z - E_Q z)^3`` (for
    Halley's step). ``var`` and ``skew`` may be left to ``moments`` (a function returning
    both), computed on first use: the last tilt of a root search, which stops on ``kl``,
    never needs them (its Hessian takes ``Var_Q l`` from ``Q``)."""

    __slots__ = ("kl", "q", "lse", "noise", "ez", "tot", "_var", "_skew", "_moments")

    def __init__(self, kl: float, var: float | None, q: np.ndarray, lse: float, noise: float,
                 skew: float | None, moments: Callable | None = None, ez: float = math.nan,
                 tot: float = math.nan) -> None:
        self.kl, self.q, self.lse, self.noise = kl, q, lse, noise
        self.ez, self.tot = ez, tot  # E_Q z and the sum of the unnormalised q
        self._var, self._skew, self._moments = var, skew, moments

    @property
    def var(self) -> float:
        if self._var is None:
            self._var, self._skew = self._moments()
        return self._var

    @property
    def skew(self) -> float:
        if self._skew is None:
            self._var, self._skew = self._moments()
        return self._skew


def _tilt(w: np.ndarray | float, z: np.ndarray, s: float, buf: tuple,
          centre: float | None = None) -> _Tilt:
    """The tilt at ``s``, worked in place in ``buf = (q, zc, zk)`` (``q``, unnormalised,
    an n-vector overwritten by the next call; ``zc``, ``zk``, scratch of at least
    ``min(n, _BLOCK)`` entries); ``w`` is the weights, or their common value when all are
    equal (the product with them is then left out). The mass and mean, then the centred
    moments on first use (``E z^2 - (E z)^2`` would cancel), run block by block
    (``_BLOCK``), the blocks' sums added exactly (``math.fsum``): the rounding stays that
    of one block's pairwise sum. With ``centre``, an estimate ``c`` of ``E_Q z`` (the last
    tilt's), the moments about ``c`` are summed in the same pass, with each block still in
    cache, and moved to ``E_Q z = c + e``: ``Var = E (z - c)^2 - e^2``, ``E (z - E z)^3 = E (z
    - c)^3 - 3 e E (z - c)^2 + 2 e^3``, unless ``e^2 > _SHIFT_RATIO Var`` (they would
    cancel: the second pass then runs on first use). The moments only steer Halley's steps;
    the root test reads ``KL`` alone."""
    # z <= 0 with z = 0 on atoms of positive weight: exp cannot overflow
    q, zc, zk = buf
    equal = isinstance(w, float)
    tots, sums, m2, m3 = [], [], [], []
    for lo in range(0, z.size, _BLOCK):
        qb, zb = q[lo:lo + _BLOCK], z[lo:lo + _BLOCK]
        np.multiply(zb, s, out=qb)
        np.exp(qb, out=qb)
        if not equal:
            qb *= w[lo:lo + _BLOCK]
        tots.append(float(qb.sum()))
        sums.append(float(qb @ zb))
        if centre is not None:
            m2.append(_central(qb, zb, centre, zc, zk, m3))
    tot = math.fsum(tots)
    lse = math.log(tot) + (math.log(w) if equal else 0.0)
    ez = math.fsum(sums) / tot
    var = skew = None
    if centre is not None:
        e, v2, v3 = ez - centre, math.fsum(m2) / tot, math.fsum(m3) / tot
        if e * e <= _SHIFT_RATIO * (v2 - e * e):
            var, skew = v2 - e * e, v3 - 3.0 * e * v2 + 2.0 * e**3

    def moments():
        var, skew = [], []
        for lo in range(0, z.size, _BLOCK):
            var.append(_central(q[lo:lo + _BLOCK], z[lo:lo + _BLOCK], ez, zc, zk, skew))
        return math.fsum(var) / tot, math.fsum(skew) / tot

    return _Tilt(s * ez - lse, var, q, lse, _SUM_EPS * (abs(s * ez) + abs(lse)), skew,
                 moments, ez, tot)


def _central(qb: np.ndarray, zb: np.ndarray, c: float, zc: np.ndarray, zk: np.ndarray,
             third: list) -> float:
    """``sum_i q_i (z_i - c)^2`` of one block, with ``sum_i q_i (z_i - c)^3`` appended to
    ``third`` (``zc``, ``zk``: scratch of the block's size at least)."""
    d, k = zc[:zb.size], zk[:zb.size]
    np.subtract(zb, c, out=d)
    np.multiply(qb, d, out=k)
    second = float(k @ d)
    np.multiply(k, d, out=k)
    third.append(float(k @ d))
    return second


def _halley(f: float, s: float, var: float, skew: float) -> float:
    """Halley's step for ``f(u) = KL(Q_s || P) - rho`` in ``u = log s``: ``f' = s^2 Var_Q z``,
    ``f'' = 2 f' + s^3 E_Q (z - E_Q z)^3``; Newton's step where Halley's correction is not
    within ``[1/2, 2]`` of it (far from the root, where the cubic model is no better)."""
    d1 = s * s * var
    if d1 == 0.0:  # underflow: no derivative information (the caller bisects)
        return math.nan
    step = f / d1
    den = 1.0 - 0.5 * step * (2.0 + s * skew / var)  # 1 - f f'' / (2 f'^2)
    return step / den if 0.5 <= den <= 2.0 else step


def _first_guess(state: KLState | None, w, l: np.ndarray, z: np.ndarray, rho: float,
                 warm: Workspace, drift: tuple | None = None) -> float:
    """Where the root search starts: the last ``s = 1 / lambda*`` moved by the first-order
    change of ``log s`` for the change ``dl`` of the losses since that evaluation, ``-Cov_Q(l,
    dl) / Var_Q l`` at its ``Q`` and ``l`` (implicit differentiation of ``KL(Q_s || P) = rho``:
    ``d KL / d log s = s^2 Var_Q l``, and ``dl`` moves ``KL`` by ``s^2 Cov_Q(l, dl)``; at
    most ``_TRUST`` in ``log s``), from ``O(n)`` operations on the two loss vectors (no
    product with ``A``; ``drift``, those two sums where :func:`_losses` formed them, else
    :func:`_drift_moments`); else ``sqrt(2 rho / Var_P l)`` (the small-``rho`` expansion
    ``KL ~ s^2 Var_P l / 2``)."""
    if state is not None and state.lam:
        u = -math.log(state.lam)
        if drift is None:
            drift = _drift_moments(state, l, warm)
        if drift is not None and drift[0] > 0:
            u -= min(max(drift[1] / drift[0], -_TRUST), _TRUST)
        return math.exp(u)
    wz = float(z.mean()) if isinstance(w, float) else float(w @ z)
    zc = np.square(z - wz)
    var = float(zc.mean()) if isinstance(w, float) else float(w @ zc)
    return math.sqrt(2.0 * rho / max(var, _TINY))


def _drifting(state: KLState | None, n: int) -> tuple | None:
    """``(l, q, E_q l)`` of the last evaluation where ``state`` carries them for ``n`` atoms."""
    if state is None or state.l is None or state.q is None or state.l.size != n:
        return None
    old, q = state.l, state.q
    return old, q, float(q @ old) if state.mean is None else state.mean


def _drift_sums(ob: np.ndarray, qb: np.ndarray, lb: np.ndarray, mean: float, d_: np.ndarray,
                k_: np.ndarray, var: list, cov: list) -> None:
    """Append one block's ``sum_i q_i (old_i - mean)^2`` to ``var`` and ``sum_i q_i (old_i -
    mean) (l_i - old_i)`` to ``cov`` (``d_``, ``k_``: scratch of the block's size)."""
    np.subtract(ob, mean, out=d_)
    np.multiply(qb, d_, out=k_)
    var.append(float(k_ @ d_))
    np.subtract(lb, ob, out=d_)
    cov.append(float(k_ @ d_))


def _drift_moments(state: KLState | None, l: np.ndarray, warm: Workspace) -> tuple | None:
    """``(Var_Q l_old, Cov_Q(l_old, l - l_old))`` about the old ``E_Q l`` in one pass of
    cache-sized blocks, or ``None`` where the state carries no losses of these atoms."""
    found = _drifting(state, l.size)
    if found is None:
        return None
    old, q, mean = found
    blk = min(l.size, _BLOCK)
    dev, qd = warm.get("gdev", blk), warm.get("gqd", blk)
    var, cov = [], []
    for lo in range(0, l.size, _BLOCK):
        ob = old[lo:lo + _BLOCK]
        _drift_sums(ob, q[lo:lo + _BLOCK], l[lo:lo + _BLOCK], mean, dev[:ob.size],
                    qd[:ob.size], var, cov)
    return math.fsum(var), math.fsum(cov)


def _losses(m: np.ndarray, warm: Workspace,
            state: KLState | None = None) -> tuple[np.ndarray, tuple | None]:
    """``l = softplus(-m)`` (:func:`simulator.losses.dpo_loss` block by block) in a recycled
    vector of ``warm``
    (:meth:`.core.Workspace.fresh`: the losses outlive the evaluation, and a new vector would
    cost its page faults), with the first guess's two sums (:func:`_drift_moments`) where
    ``state`` carries the last losses: one pass of blocks of ``_LOSS_BLOCK`` atoms, each
    block's pieces in the core's own cache from one operation to the next."""
    n = m.size
    l = warm.fresh("l", n)
    found = _drifting(state, n)
    blk = min(n, _LOSS_BLOCK)
    dev, qd = warm.get("gdev", blk), warm.get("gqd", blk)
    var, cov = [], []
    for lo in range(0, n, _LOSS_BLOCK):
        mb, lb = m[lo:lo + _LOSS_BLOCK], l[lo:lo + _LOSS_BLOCK]
        dpo_loss(mb, out=lb)
        if found is not None:
            old, q, mean = found
            _drift_sums(old[lo:lo + _LOSS_BLOCK], q[lo:lo + _LOSS_BLOCK], lb, mean,
                        dev[:mb.size], qd[:mb.size], var, cov)
    return l, None if found is None else (math.fsum(var), math.fsum(cov))


def _reweight(at: Atoms, m, l, amb, state) -> Reweighting:
    """``F``, ``lambda*`` and ``Q*`` from the losses ``l`` (computed from ``m`` when
    ``None``, :func:`_losses`; the module docstring). Every vector that outlives the
    evaluation (``l``, ``Q*``, ``sigmoid(-m)`` and the Hessian's curvatures) is recycled
    from the shared workspace (:meth:`.core.Workspace.fresh`)."""
    rho = amb.rho
    warm = state.warm if state is not None and state.warm is not None else Workspace()
    drift = None
    if l is None:
        l, drift = _losses(m, warm, state)
    if rho == 0.0:
        return nominal_reweighting(at, l, dual=math.inf)._replace(losses=l)
    n = l.size
    w0 = warm.equal_weight(at.w)
    w = at.w if w0 is None else w0
    positive = w0 is not None and w0 > 0
    top, lmax = top_atoms(at, l, positive=positive,
                          out=warm.get("top", n, bool) if positive else None)
    pmax = w0 * int(np.count_nonzero(top)) if positive else float(at.w[top].sum())
    if rho >= -math.log(pmax):
        q = np.where(top, at.w, 0.0) / pmax
        return Reweighting(q, lmax, 0.0, state=state, losses=l)
    z = np.subtract(l, lmax, out=warm.get("z", n))
    # q is the worst case (it outlives the evaluation); the other two are scratch
    blk = min(n, _BLOCK)
    buf = (warm.fresh("q", n), warm.get("zc", blk), warm.get("zk", blk))
    s = _first_guess(state, w, l, z, rho, warm, drift)
    lo, hi = 0.0, math.inf
    # the moments summed in the tilt's own pass, about the last E_Q z, except after a tilt
    # whose Halley step is expected to end the search (the last tilt needs none)
    centre = None if state is None or state.mean is None else state.mean - lmax
    for _ in range(_ROOT_ITERS):
        tilt = _tilt(w, z, s, buf, centre)
        kl = tilt.kl
        if abs(kl - rho) <= tilt.noise + _SUM_EPS * rho:
            break
        centre = tilt.ez if abs(kl - rho) > _LAST_STEP * rho else None
        if kl < rho:
            lo = s
        else:
            hi = s
        u = math.log(s)
        var = tilt.var
        nxt = u - _halley(kl - rho, s, var, tilt.skew) if var > 0 else math.nan
        nxt = min(max(nxt, u - _TRUST), u + _TRUST)
        lo_u = math.log(lo) if lo > 0 else -math.inf
        hi_u = math.log(hi) if math.isfinite(hi) else math.inf
        if not lo_u < nxt < hi_u:
            if math.isinf(hi_u):
                nxt = u + _EXPAND
            elif math.isinf(lo_u):
                nxt = u - _EXPAND
            else:
                nxt = 0.5 * (lo_u + hi_u)
        width = _ROOT_TOL * max(1.0, abs(u))
        if hi_u - lo_u <= width or abs(nxt - u) <= width:
            break
        s = math.exp(nxt)
    else:
        raise RuntimeError("KL dual root search did not converge (status: max_iter)")
    lam = 1.0 / s
    q = tilt.q
    # q normalised by the tilt's own (block-exact) sum, and sigmoid(-m) = 1 - exp(-l)
    # (core.loss_sigmoid)
    q *= 1.0 / tilt.tot
    sig = loss_sigmoid(l, warm.fresh("sigmoid", n))
    value = lmax + (rho + tilt.lse) * lam

    mean = lmax + tilt.ez  # E_Q l, from the last tilt's sums

    def parts(sg):
        # E_Q hess l + s [Cov_Q(g) - c c^T / Var_Q l] with g_i = -sg_i a_i: Cov_Q(g) =
        # sum_i q_i sg_i^2 a_i a_i^T - grad grad^T and c = -E_Q (l - E_Q l) sg a; from l
        # and q alone, in one pass of cache-sized blocks (z and the tilt's block scratch are
        # dead by now)
        curv = warm.fresh("curv", n)  # q sg (1 + (s - 1) sg)
        qd = warm.get("neg", n)  # q (l - E_Q l) sg
        dev = buf[1]
        var = []
        for lo in range(0, n, _BLOCK):
            sb, qb = sg[lo:lo + _BLOCK], q[lo:lo + _BLOCK]
            cb, kb = curv[lo:lo + _BLOCK], qd[lo:lo + _BLOCK]
            np.multiply(sb, s - 1.0, out=cb)
            cb += 1.0
            cb *= sb
            cb *= qb
            d_ = dev[:sb.size]
            np.subtract(l[lo:lo + _BLOCK], mean, out=d_)
            np.multiply(qb, d_, out=kb)
            var.append(float(kb @ d_))
            kb *= sb
        var = math.fsum(var)
        low = [(-s, GRADIENT)]
        if var > 0:
            low.append((-s / var, RowSum(qd)))  # u u^T, u = qd @ a, in the Gram's pass
        return curv, low

    return Reweighting(q, value, lam, parts, KLState(lam, l, q, warm, mean), losses=l,
                       sigmoid=sig)


def _zero_test(at: Atoms, amb) -> float | None:
    """``delta = 0`` is optimal iff ``max_nu -log E_P exp(nu . a) <= rho``; the tilt
    ``Q_nu ∝ P exp(nu . a)`` at the maximiser (mixed with ``P`` into the ball if rounding
    left it outside) is the witness whose logistic regression bounds ``min F`` below.
    Products through the atoms (:meth:`.core.Atoms.matvec`): no ``n x d`` matrix."""
    w, d = at.w, at.x.shape[1]

    def neg_lse(nu):  # concave: -log E exp(nu . a), Hessian -Cov_Q a
        lse, q = _tilted(at, nu)
        mean = at.rmatvec(q)
        return -lse, -mean, lambda: np.outer(mean, mean) - weighted_hess(at, q)

    found = concave_max(neg_lse, np.zeros(d), amb.rho)
    if found.above is not False:
        return None
    q = _tilted(at, found.y)[1]
    pos = q > 0
    kl = float(q[pos] @ np.log(q[pos] / w[pos]))
    if kl > amb.rho:  # KL((1 - t) Q + t P || P) <= (1 - t) KL(Q || P) = rho
        t = 1.0 - amb.rho / kl
        q = (1.0 - t) * q + t * w
    return logistic_gap(at, q, np.zeros(d), math.log(2.0), radius=at.max_norm())


def _tilted(at: Atoms, nu: np.ndarray) -> tuple[float, np.ndarray]:
    """``log E_P exp(nu . a)`` and the tilt ``Q ∝ P exp(nu . a)``, shifted by the largest
    exponent over positive weights (no overflow), worked in place."""
    w = at.w
    q = at.matvec(nu)
    top = float(q[w > 0].max())
    q -= top
    np.exp(q, out=q)
    q *= w
    tot = float(q.sum())
    q *= 1.0 / tot
    return top + math.log(tot), q


def _descent_at_zero(at: Atoms, amb) -> np.ndarray | None:
    """The steepest descent direction of ``F`` at ``delta = 0`` (not optimal there):
    :func:`.core.min_norm_mean` over the tilts ``Q_nu ∝ P exp(nu . a)``, whose mean has
    ``d c / d nu = Cov_{Q_nu} a`` and ``KL = nu . c - log E_P exp(nu . a)``. Near the collapse
    radius ``c*`` is far from ``E_P a`` (the nominal direction), along which Newton is caught
    at the kink."""

    def tilt(nu):
        lse, q = _tilted(at, nu)
        c = at.rmatvec(q)
        cov = weighted_hess(at, q) - np.outer(c, c)
        return c, cov, float(nu @ c) - lse, cov @ nu

    return min_norm_mean(tilt, at.x.shape[1], amb.rho)


METHODS = SetMethods(
    name="kldpo", reweight=_reweight, losses=False, subsample_model=True,
    zero_test=_zero_test, descent_at_zero=_descent_at_zero,
    coercive=lambda amb: False, smooth=lambda amb: True,
    conic="simulator.solvers.conic: form 'kl', t + lambda rho with exponential cones")
