"""Wasserstein p = 1, finite kappa: the gradients that correct an earlier one at the same point.

Compared against the one product with all the atoms at a fresh point (no earlier gradient),
for the flips of the homotopy's stages, the exact evaluation and ``E_P l`` alone.
"""

from __future__ import annotations

import numpy as np
import pytest

from simulator.solvers import wasserstein1
from simulator.solvers.inner import Atoms
from simulator.solvers.wasserstein1 import _flip_threshold, _LogisticPoint

#: The corrected gradients differ from the direct product by the rounding of the sums (the
#: gradient's terms are at most ``||a_i|| <= radius`` in size).
_GRAD_ROUND = 1e-13


def _stage_flips(pt, w, mu, c):
    """The flips of a smoothed stage at ``mu`` with flipped mass ``c``."""
    thr = _flip_threshold(pt.m, w, 0.0, c, mu, None)
    return wasserstein1._Flipped(thr.cut, thr.top, thr.window, w[thr.window] * thr.p_window)


def _exact_flips(pt, w, c):
    """The exact evaluation's flips: every atom above the threshold atom, which is split."""
    order = np.argsort(-pt.m)
    k = int(np.searchsorted(np.cumsum(w[order]), c))
    thr = float(pt.m[order[k]])
    above = np.flatnonzero(pt.m > thr)
    tied = np.flatnonzero(pt.m == thr)
    return wasserstein1._Flipped(thr, above, tied, np.full(tied.size, c - w[above].sum()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_corrected_gradients_equal_the_direct_product(seed, gaussian_data):
    """Each gradient at a point that already has one (the next stage's, the exact one's,
    ``E_P l``'s alone, in the homotopy's order) equals the product with every atom at a
    fresh point. The sequence takes both paths (checked when written: the product with
    every atom after mu = 1e-2, whose masses differ from the exact ones on 8-64% of the
    atoms, the correction on 1-4% of them after mu = 1e-3 and 1e-4, ``E_P l`` and the
    exact flips)."""
    data = gaussian_data(50_000, d=5, seed=seed)
    at = Atoms.from_data(data, 1.0, normalise=True)
    delta = np.random.default_rng(seed).standard_normal(5)
    w, c = at.w, 0.02
    sequence = [_exact_flips(_LogisticPoint(at, delta), w, c)]
    sequence += [_stage_flips(_LogisticPoint(at, delta), w, mu, c) for mu in (1e-2, 1e-3, 1e-4)]
    sequence += [wasserstein1._NO_FLIPS, _exact_flips(_LogisticPoint(at, delta), w, c)]
    pt = _LogisticPoint(at, delta)
    for flips in sequence:
        fresh = _LogisticPoint(at, delta).flipped_grad(flips)
        got = pt.grad if flips is wasserstein1._NO_FLIPS else pt.flipped_grad(flips)
        np.testing.assert_allclose(got, fresh, rtol=0, atol=_GRAD_ROUND)
    # E_P l's gradient at a fresh point is the product -(w s) . a itself
    np.testing.assert_allclose(_LogisticPoint(at, delta).grad,
                               -(w * _LogisticPoint(at, delta).s) @ (at.x * at.factor[:, None]),
                               rtol=0, atol=_GRAD_ROUND)


@pytest.mark.parametrize("lam_factor", [1.0, 1.3, 0.0])
def test_start_majorant_bounds_the_exact_objective(lam_factor, gaussian_data):
    """The evaluation with a subsample's lambda (:class:`~.wasserstein1.W1Start`) is the
    majorant ``U = E l + lambda rho + E (m - lambda kappa)_+ >= F`` with its gradient, at
    ``max(lambda, b)`` (0 stands for a lambda below ``b``), equal to ``F`` at ``lambda*``;
    with the worst case or ``rho = 0`` the evaluation is the exact one."""
    import simulator as sim
    from simulator.solvers.inner import evaluate_inner

    data = gaussian_data(20_000, d=5, seed=4)
    amb = sim.Wasserstein(0.05, p=1, kappa=0.8)
    at = Atoms.from_data(data, 1.0, normalise=True)
    delta = np.random.default_rng(4).standard_normal(5)
    exact = evaluate_inner(at, delta, amb, worst=False)
    start = wasserstein1.W1Start(lam_factor * exact.dual)
    res = evaluate_inner(at, delta, amb, hess=True, worst=False, state=start)
    m, b = at.matvec(delta), at.beta * float(np.linalg.norm(delta))
    lam = max(start.lam, b)
    above = m > lam * amb.kappa
    w, s = at.w, _LogisticPoint(at, delta).s
    value = float(w @ wasserstein1.dpo_loss(m)) + lam * amb.rho + float(
        w[above] @ (m[above] - lam * amb.kappa))
    assert res.value == pytest.approx(value, rel=1e-14) and res.value >= exact.value
    if lam_factor == 1.0:
        assert res.value == pytest.approx(exact.value, rel=1e-14)
    np.testing.assert_allclose(res.grad, -(w * s - w * above) @ (at.x * at.factor[:, None]),
                               rtol=0, atol=_GRAD_ROUND)
    assert isinstance(res.state, wasserstein1.W1Start) and res.state.point is not None
    for amb_, worst in ((amb, True), (sim.Wasserstein(0.0, p=1, kappa=0.8), False)):
        plain = evaluate_inner(at, delta, amb_, worst=worst)
        again = evaluate_inner(at, delta, amb_, worst=worst, state=start)
        assert again.value == plain.value
        np.testing.assert_array_equal(again.grad, plain.grad)
