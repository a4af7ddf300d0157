"""The chi-square ball ``{Q << P : E_P (dQ/dP - 1)^2 <= rho}`` (SPEC 3.2).

Inner evaluation: ``F = min_eta eta + sqrt(1 + rho) sqrt(E_P (l - eta)_+^2)``, convex and
continuously differentiable in ``eta`` (while some mass lies above ``eta``). On the active
set ``A = {l > eta}`` (mass ``a0``, mean ``mu``, variance ``V``) its only stationary point
is ``mu - sqrt(V / ((1 + rho) a0 - 1))``; :func:`_minimiser` iterates this closed form on
the active set of the previous iterate (a Newton step on the exact piecewise-quadratic
model, warm-started at the last ``eta*``, ``Chi2State``) and stops exactly when the
candidate's active set is the one it was computed from: then it is the minimiser. ``Q* ∝
P (l - eta*)_+``. The Hessian of ``F`` is the Schur complement of the joint Hessian of
``eta + c sqrt(E r^2)``, ``r = (l - eta)_+``.

``delta = 0`` is optimal iff ``max_{g, nu} 2 g - 1 - E_P (g + nu . a)_+^2 <= rho`` (the dual
of the smallest chi-square divergence with ``E_Q a = 0``). Conic form: ``conic.py``
(form ``"chi2"``, a second-order cone).
"""

from __future__ import annotations

import math
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

__all__ = ["Chi2State", "METHODS"]


#: Iterations of the active-set search for ``eta*`` before the sorted closed form takes
#: over. Each costs a fifth to a third of a data pass at n = 1e6 (a few elementwise
#: operations), the sort of the losses 10 to 20 passes (benchmarks/chi2_search.py): past
#: about 40 iterations the sort would have been cheaper. The search is a Newton iteration on
#: the exact piecewise-quadratic model and needs 1 or 2 iterations from a warm start, 0 to 5
#: from a cold one on Gaussian losses (up to 15 on the heavy-tailed losses of
#: tests/test_chi2.py); it always terminates, in at most about ``2 n`` iterations, so the
#: bound only caps adversarial spacings of the losses.
_SEARCH_ITERS = 40


#: The closed form's exact recomputation on the converged active set works on the shifted
#: losses ``r = z - eta`` of the last iterate where ``E_A r`` is at most this many times the
#: closed form's root ``sqrt(V_A / ((1 + rho) P(A) - 1))`` (:func:`_shifted_closed_form`):
#: the rounding of each ``r_i``, ``eps |z_i - eta|``, then perturbs ``V_A`` by a few ulps
#: more than the direct two passes over ``z`` do. From farther (a warm start ``100`` below
#: ``eta*``, tests/test_chi2.py) the shift would cost two digits: the direct form runs.
_SHIFT_ROOTS = 2.0


@dataclass(frozen=True)
class Chi2State:
    """Warm start of the search for ``eta*``: the last ``eta*`` (in units of the loss),
    whether every atom was active there (``full``), and the :class:`.core.Workspace` shared
    along one minimisation."""

    eta: float | None = None
    work: Workspace | None = field(default=None, compare=False, repr=False)
    full: bool = False

    def transfer(self) -> Chi2State:
        """The state to start another problem (a subsample's solution) with: ``eta*`` and
        ``full`` (the workspace is the subsample's)."""
        return Chi2State(self.eta, full=self.full)


def _mass(w: np.ndarray | float, v: np.ndarray, buf: np.ndarray) -> float:
    """``E_P v = sum_i w_i v_i`` as a pairwise sum (``buf``: scratch), or ``w sum_i v_i``
    when ``w`` is the weights' common value: a BLAS dot of ``n`` equal weights ``1 / n``
    errs by about ``1e-13`` at n = 1e6, which the closed form amplifies by ``1 / ((1 +
    rho) P(A) - 1)``."""
    if isinstance(w, float):
        return float(v.sum()) * w
    return float(np.multiply(w, v, out=buf).sum())


def _closed_form(w: np.ndarray | float, z: np.ndarray, c2: float, a0: float,
                 buf: np.ndarray, act: np.ndarray | None = None) -> float:
    """``eta_A = mu_A - sqrt(V_A / (c2 a0 - 1))`` of the set ``A = act`` of mass ``a0``
    (every atom if ``None``: SPEC 3.2's ``E z - sqrt(Var z / rho)``), with a two-pass mean
    and variance of ``z`` itself (in the scratch array ``buf``; ``w`` as in :func:`_mass`):
    exact to rounding however far from ``A`` the search started."""
    if act is None:
        mu = _mass(w, z, buf) / a0
        dev = np.subtract(z, mu, out=buf)
    else:
        mu = _mass(w, np.multiply(z, act, out=buf), buf) / a0
        dev = np.subtract(z, mu, out=buf)
        dev *= act
    np.square(dev, out=dev)
    return mu - math.sqrt(_mass(w, dev, dev) / a0 / (c2 * a0 - 1.0))


def _shifted_closed_form(w: np.ndarray | float, r: np.ndarray, eta: float, mean: float,
                         c2: float, a0: float, buf: np.ndarray, act: np.ndarray) -> float:
    """:func:`_closed_form` on ``A = act`` from ``r = (z - eta)_+`` (zero off ``A``) and its
    mean ``mean = E_P r / a0`` on ``A``: ``eta_A = eta + mean - sqrt(V_A / (c2 a0 - 1))``, the
    variance ``V_A`` of ``r`` on ``A`` (that of ``z``) by a second pass over the deviations
    (in ``buf``): as exact as the two passes over ``z``, in three vectorised operations
    where those take six."""
    dev = np.subtract(r, mean, out=buf)
    dev *= act
    var = float(dev @ dev) * w if isinstance(w, float) else float(np.multiply(w, dev) @ dev)
    return eta + mean - math.sqrt(var / a0 / (c2 * a0 - 1.0))


def _count_above(z: np.ndarray, eta: float, buf: np.ndarray) -> int:
    """The size of ``{z > eta}`` (``buf``: a boolean scratch array)."""
    return int(np.count_nonzero(np.greater(z, eta, out=buf)))


def _active_sums(w: np.ndarray | float, z: np.ndarray, eta: float, r: np.ndarray,
                 wr: np.ndarray, act: np.ndarray):
    """``r = (z - eta)_+``, the active set ``act = r > 0``, its size and ``E_P r``, ``E_P
    r^2``, ``P(act)``: one vectorised pass of the search, in preallocated arrays (fresh
    ``n``-arrays cost as much again in page faults at n = 1e6); ``w`` as in :func:`_mass`
    (pairwise masses)."""
    np.subtract(z, eta, out=r)
    np.greater(r, 0.0, out=act)
    np.maximum(r, 0.0, out=r)
    count = int(np.count_nonzero(act))
    if isinstance(w, float):
        return count, float(r.sum()) * w, float(r @ r) * w, count * w
    a0 = float(np.multiply(w, act, out=wr).sum())
    np.multiply(w, r, out=wr)
    return count, float(wr.sum()), float(wr @ r), a0


def _minimiser(w: np.ndarray | float, z: np.ndarray, c2: float, eta0: float | None,
               work: Workspace | None = None, full: bool = False) -> float:
    """``eta* = argmin_eta eta + c sqrt(E_P (z - eta)_+^2)``, ``c^2 = c2 = 1 + rho``, for
    ``z <= 0`` with ``max z = 0`` on the positive weights and ``c2 P(z = 0) < 1`` (so
    ``eta* < 0``), from ``eta0`` (``None``: cold); ``w`` as in :func:`_mass`, ``work`` the
    workspace of the scratch vectors (a fresh one if ``None``). With ``full`` (every atom
    was active at the last ``eta*``) the all-active closed form is tried first, as from a
    cold start: where every atom is still active it is ``eta*`` in six vectorised
    operations (the warm search's iteration and recomputation take eleven); else the warm
    search runs from ``eta0``.

    With ``S1 = E (z - eta)_+``, ``S2 = E (z - eta)_+^2``, the derivative ``1 - c S1 /
    sqrt(S2)`` is increasing (``F`` is convex) and ``<= 0`` iff ``psi = c2 S1^2 - S2 >= 0``.
    On a fixed set ``A`` (mass ``a0``, mean ``mu``, variance ``V``), ``psi_A(eta) = a0
    ((c2 a0 - 1) (mu - eta)^2 - V)`` decreases for ``eta < mu`` to its root ``eta_A = mu -
    sqrt(V / (c2 a0 - 1))``, the closed form. Each iteration sets ``eta <- eta_A`` for ``A =
    {z > eta}``. From ``eta <= eta*``: ``A`` holds every atom above later points, whose
    terms only lower ``psi_A`` below ``psi`` there, so ``eta <= eta_A <= eta*`` (the
    iterates rise, the active sets shrink). From ``eta > eta*``: ``psi_A(eta) = psi(eta) <
    0``, so ``eta_A < eta`` (they fall, the sets grow), or ``c2 a0 <= 1`` and the
    all-active point (``<= eta*``) follows. Hence it terminates, and exactly: once
    ``{z > eta_A} = A`` (equal counts, one comparison pass: the sets are nested), ``eta_A``
    is a stationary point of the convex ``C^1`` function, its minimiser; the closed form is
    then recomputed on ``A`` with a two-pass variance. A candidate outside the bracket of
    the derivative's signs seen so far (rounding at ``eta*``) is clipped to it;
    ``_SEARCH_ITERS`` iterations, or a set without stationary point after the all-active
    one (rounding at the max-loss boundary), hand over to :func:`_sorted_minimiser`.
    """
    n = z.size
    work = Workspace() if work is None else work
    r, wr = work.get("r", n), work.get("wr", n)
    act, above = work.get("act", n, bool), work.get("above", n, bool)
    total = 1.0 if isinstance(w, float) else float(w.sum())  # the mass of every atom
    lo, hi = -math.inf, 0.0  # derivative <= 0 at lo, > 0 at hi
    cold = eta0 is None or not -math.inf < eta0 < 0.0
    if cold or full:
        eta = _closed_form(w, z, c2, total, r)
        if _count_above(z, eta, above) == n:  # every atom active: eta*
            return eta
    if not cold:
        eta = eta0
    for _ in range(_SEARCH_ITERS):
        count, s1, s2, a0 = _active_sums(w, z, eta, r, wr, act)
        if s2 > 0.0 and c2 * s1 * s1 >= s2:
            lo = eta
        else:
            hi = eta
        if c2 * a0 > 1.0:
            m1 = s1 / a0
            root = math.sqrt(max(s2 / a0 - m1 * m1, 0.0) / (c2 * a0 - 1.0))
            nxt = min(max(eta + m1 - root, lo), hi)  # outside the bracket: rounding at eta*
            if _count_above(z, nxt, above) == count:
                # the closed form's own active set is act (nested sets: equal counts), on
                # r where eta is within _SHIFT_ROOTS roots of it (a warm start), else on z
                if m1 <= _SHIFT_ROOTS * root:
                    return _shifted_closed_form(w, r, eta, m1, c2, a0, wr, act)
                return _closed_form(w, z, c2, a0, wr, act)
            eta = nxt
        elif not cold:  # no stationary point on this set (only right of eta*)
            eta, cold = _closed_form(w, z, c2, total, r), True
            if _count_above(z, eta, above) == n:
                return eta
        else:
            break
    return _sorted_minimiser(np.full(n, w) if isinstance(w, float) else w, z, c2)


def _sorted_minimiser(w: np.ndarray, z: np.ndarray, c2: float) -> float:
    """:func:`_minimiser` by sorting: on each interval between consecutive sorted ``z`` the
    active set is fixed, and the best of the clipped closed forms is the exact minimum
    (refined by a two-pass mean and variance when interior)."""
    c = math.sqrt(c2)
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
    return eta


def _reweight(at: Atoms, m, l, amb, state) -> Reweighting:
    """``F``, ``eta*`` and ``Q*`` from the losses ``l`` (``softplus(-m)`` when ``None``; the
    module docstring). Every vector that outlives the evaluation (``l``, ``Q*``,
    ``sigmoid(-m)`` and the Hessian's curvatures) is recycled from the shared workspace
    (:meth:`.core.Workspace.fresh`: a new 8 MB vector costs its page faults, about 1.7 ms
    at n = 1e6), the Hessian's other weights are its scratch."""
    rho = amb.rho
    work = state.work if state is not None and state.work is not None else Workspace()
    if l is None:
        l = dpo_loss(m, out=work.fresh("l", m.size))
    if rho == 0.0:
        return nominal_reweighting(at, l, dual=-math.inf)._replace(losses=l)
    w = at.w
    c2 = 1.0 + rho
    c = math.sqrt(c2)
    n = l.size
    w0 = work.equal_weight(w)
    wt = w if w0 is None else w0
    top, lmax = top_atoms(at, l, positive=w0 is not None and w0 > 0)
    z = np.subtract(l, lmax, out=work.get("z", n))
    idx = np.flatnonzero(top)
    if c2 * float(w[idx] @ (z[idx] == 0.0)) >= 1.0:  # eta* = max l: F' <= 0 below it
        eta = 0.0
    else:
        eta0 = None if state is None or state.eta is None else state.eta - lmax
        eta = _minimiser(wt, z, c2, eta0, work, full=state is not None and state.full)
    r = np.subtract(z, eta, out=z)  # r = (z - eta)_+ in z's scratch vector
    full = float(r.min()) > 0.0  # every atom active (a reduction, no further vector)
    if not full:
        np.maximum(r, 0.0, out=r)
    if w0 is None:
        q = np.multiply(w, r)  # w r, then the worst case q = w r / E_P r
        er, sq = float(q.sum()), float(q @ r)
    else:  # equal weights: the sums of r alone, q = r / sum r
        er, sq = float(r.sum()) * w0, float(r @ r) * w0
    if er <= 0.0:  # eta* = max l: the max-loss atoms take all the mass
        q = np.where(top, w, 0.0)
        q = q / q.sum()
        return Reweighting(q, lmax, lmax, state=Chi2State(lmax, work), losses=l)
    nrm = math.sqrt(sq)
    q = (np.multiply(r, w0 / er, out=work.fresh("q", n)) if w0 is not None
         else np.multiply(q, 1.0 / er, out=q))
    value = lmax + eta + c * nrm

    def parts(sg):
        # Hessian of F = Schur complement of the joint Hessian of eta + c sqrt(E r^2), with
        # the per-atom loss gradients g_i = -sg_i a_i: E_{c w r / nrm} hess l + h_dd -
        # h_de h_de^T / h_ee, h_dd = c (E_P act g g^T / nrm - erg erg^T / nrm^3); from q =
        # w r / er alone (r was scratch): w r = er q, E_P r g = er grad, act = {q > 0}. So
        # curv = (c / nrm) sg (er q (1 - sg) + w act sg), and h_de = c (E_P act sg a / nrm +
        # er erg / nrm^3) = (c / nrm) (w act sg) @ a + (c er^2 / nrm^3) grad (grad = -(q sg)
        # @ a): the RowSum of w act sg (formed in the Gram's pass) moved along grad, no
        # vector of its own; equal weights w0 are folded into the scalars
        if w0 is None:
            p = np.multiply(w, sg, out=work.get("wsg", n))
            act = None if full else np.greater(q, 0.0, out=work.get("pact", n, bool))
            if not full:
                p *= act
            mass = float(w.sum()) if full else float(w @ act)  # P(act)
        else:  # every atom active: sg itself (read only)
            act = None if full else np.greater(q, 0.0, out=work.get("pact", n, bool))
            p = sg if full else np.multiply(sg, act, out=work.get("wsg", n))
            mass = w0 * (n if full else int(np.count_nonzero(act)))
        wk = 1.0 if w0 is None else w0
        curv = np.subtract(1.0, sg, out=work.fresh("curv", n))
        curv *= q
        curv *= er / wk
        curv += p
        curv *= sg
        curv *= c * wk / nrm
        h_ee = c * (mass / nrm - er**2 / nrm**3)
        low = [(-c * er**2 / nrm**3, GRADIENT)]
        if h_ee > 0:
            low.append((-1.0 / h_ee, RowSum(p, c * wk / nrm, c * er**2 / nrm**3)))
        return curv, low

    return Reweighting(q, value, lmax + eta, parts, Chi2State(lmax + eta, work, full), losses=l,
                       sigmoid=loss_sigmoid(l, work.fresh("sigmoid", n)))


def _zero_test(at: Atoms, amb) -> float | None:
    """``delta = 0`` is optimal iff ``max_{g, nu} 2 g - 1 - E_P (g + nu . a)_+^2 <= rho``;
    ``Q ∝ P (g + nu . a)_+`` at the maximiser (mixed with ``P`` into the ball if rounding left
    it outside) is the witness whose logistic regression bounds ``min F`` below. Products
    through the atoms (:meth:`.core.Atoms.matvec`): no ``n x d`` matrix."""
    w, d = at.w, at.x.shape[1]

    def hinge(y):  # (g + nu . a)_+, without the product with a at nu = 0 (the start)
        if not y[1:].any():
            return np.full(w.size, max(float(y[0]), 0.0))
        return np.maximum(y[0] + at.matvec(y[1:]), 0.0)

    def value(y):  # the value alone, for concave_max's probes: no gradient pass
        r = hinge(y)
        return 2.0 * y[0] - 1.0 - float((w * r) @ r)

    def dual_chi2(y):  # concave: 2 g - 1 - E (g + nu . a)_+^2, with y = (g, nu)
        r = hinge(y)
        wr = w * r
        grad = np.concatenate([[2.0 - 2.0 * float(wr.sum())], -2.0 * at.rmatvec(wr)])

        def hess():  # -2 E_act (1, a)(1, a)^T in blocks, without an n x (d + 1) copy
            act = w * (r > 0)
            v = at.rmatvec(act)
            return -2.0 * np.block([[np.array([[act.sum()]]), v[None, :]],
                                    [v[:, None], weighted_hess(at, act)]])

        return 2.0 * y[0] - 1.0 - float(wr @ r), grad, hess

    y0 = np.zeros(d + 1)
    y0[0] = 1.0
    found = concave_max(dual_chi2, y0, amb.rho, value=value)
    if found.above is not False:
        return None
    q = w * hinge(found.y)
    q = q / q.sum()
    pos = w > 0
    div = float(q[pos] @ (q[pos] / w[pos])) - 1.0
    if div > amb.rho:  # chi2((1 - t) Q + t P) = (1 - t)^2 chi2(Q) = rho
        t = 1.0 - math.sqrt(amb.rho / div)
        q = (1.0 - t) * q + t * w
    return logistic_gap(at, q, np.zeros(d), math.log(2.0), radius=at.max_norm())


def _descent_at_zero(at: Atoms, amb) -> np.ndarray | None:
    """The steepest descent direction of ``F`` at ``delta = 0`` (not optimal there):
    :func:`.core.min_norm_mean` over ``Q_nu ∝ P r``, ``r = (1 + nu . a)_+`` (the KKT form of
    the minimiser of ``||E_Q a||`` in the chi-square ball), with ``S = E_P r``, ``T = E_P
    r^2``: ``c = E_P r a / S``, ``chi2 = T / S^2 - 1``, ``dc / dnu = (E_P act a a^T - c (E_P
    act a)^T) / S`` (:func:`.core.weighted_hess`: no ``n x d`` temporary)."""
    w = at.w

    def family(nu):
        r = np.maximum(1.0 + at.matvec(nu), 0.0)
        wr, wact = w * r, w * (r > 0)
        big_s, big_t = float(wr.sum()), float(wr @ r)
        swr, sact = at.rmatvec(wr), at.rmatvec(wact)
        c = swr / big_s
        jac = (weighted_hess(at, wact) - np.outer(c, sact)) / big_s
        ddiv = 2.0 * swr / big_s**2 - 2.0 * big_t * sact / big_s**3
        return c, jac, big_t / big_s**2 - 1.0, ddiv

    return min_norm_mean(family, at.x.shape[1], amb.rho)


METHODS = SetMethods(
    name="chi2dpo", reweight=_reweight, losses=False, subsample_model=True,
    zero_test=_zero_test, descent_at_zero=_descent_at_zero,
    coercive=lambda amb: False, smooth=lambda amb: True,
    conic="simulator.solvers.conic: form 'chi2', eta + sqrt(1 + rho) ||sqrt(w) r||_2")
