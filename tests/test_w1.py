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
