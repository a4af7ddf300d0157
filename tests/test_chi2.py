"""The chi-square inner minimisation over ``eta`` (SPEC 3.2): the warm-started active-set
search against exact rational arithmetic, a brute force over the breakpoints and the sorted
closed form, on few atoms, duplicates, ties, zero weights, the max-loss regime and large n."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

import simulator as sim
from simulator.solvers import chi2
from simulator.solvers.inner import Atoms, evaluate_inner

#: ``eta`` is exact to this many units of ``(1 + |eta|) / min(1, rho)`` (measured worst 5.6e-16
#: over 400 random problems: the closed form loses ``1 / ((1 + rho) P(A) - 1)`` digits).
ETA_TOL = 2e-15
#: ``F`` agrees to this fraction of the size of its terms ``|eta| + sqrt(1 + rho) ||r||``.
F_TOL = 1e-14


def _losses(rng, n, kind):
    if kind == "normal":
        return rng.normal(size=n)
    if kind == "ties":  # few distinct values: duplicates and ties everywhere
        return rng.integers(0, 3, size=n).astype(float)
    if kind == "exp":
        return rng.exponential(size=n)
    return -rng.exponential(size=n) ** 3  # a heavy left tail


def _problem(seed, n, kind, zero_weights=False):
    """``(w, z, c2)`` with ``z <= 0``, ``max z = 0`` on the positive weights, outside the
    max-loss regime (the first such draw from ``seed``)."""
    rng = np.random.default_rng(seed)
    while True:
        z = _losses(rng, n, kind)
        w = rng.dirichlet(np.ones(n))
        if zero_weights and n > 2:
            w[rng.permutation(n)[: n // 3]] = 0.0
            w /= w.sum()
        rho = float(np.exp(rng.uniform(np.log(1e-3), np.log(30.0))))
        z = z - z[w > 0].max()
        if (1.0 + rho) * w[z == 0].sum() < 1.0:
            return w, z, 1.0 + rho


def _slope_sign(w, z, c2, t) -> int:
    """Sign of ``d/d eta [eta + c sqrt(E (z - eta)_+^2)]`` at ``t``, in exact arithmetic:
    ``<= 0`` iff ``c2 S1^2 >= S2`` (``S_k = E (z - t)_+^k``)."""
    t = Fraction(t)
    s1 = s2 = Fraction(0)
    for wi, zi in zip(w.tolist(), z.tolist(), strict=True):
        d = Fraction(zi) - t
        if d > 0:
            s1 += Fraction(wi) * d
            s2 += Fraction(wi) * d * d
    psi = Fraction(c2) * s1 * s1 - s2 if s2 > 0 else Fraction(-1)
    return (psi < 0) - (psi > 0)


def _objective(w, z, c2, eta):
    return eta + math.sqrt(c2) * math.sqrt(float(w @ np.maximum(z - eta, 0.0) ** 2))


def _breakpoint_minimum(w, z, c2):
    """Brute force: on each interval between consecutive distinct ``z`` the active set is
    fixed; the minimum of ``F`` is at one of the clipped closed forms or at a breakpoint."""
    cands = list(np.unique(z))
    for v in np.unique(z):
        act = z >= v
        a0 = w[act].sum()
        if a0 > 0 and c2 * a0 > 1:
            mu = w[act] @ z[act] / a0
            var = w[act] @ (z[act] - mu) ** 2 / a0
            cands.append(mu - math.sqrt(var / (c2 * a0 - 1)))
    return min(_objective(w, z, c2, e) for e in cands)


CASES = [(seed, n, kind, zw) for seed, (n, kind, zw) in enumerate(
    [(n, kind, zw) for n in (2, 3, 4, 5, 30, 200)
     for kind in ("normal", "ties", "exp", "heavy") for zw in (False, True)])]


@pytest.mark.parametrize("seed,n,kind,zero_weights", CASES)
def test_search_brackets_the_exact_root_from_any_start(seed, n, kind, zero_weights):
    """The derivative changes sign (exactly, in rationals) within rounding of the returned
    ``eta``, from a cold start and from warm starts far left (``eta* - 100``: no digits may
    be lost to the distance), near and right of ``eta*``, with and without the hint that
    every atom was active at the last ``eta*`` (``full``: right or wrong here)."""
    w, z, c2 = _problem(seed, n, kind, zero_weights)
    ref = chi2._minimiser(w, z, c2, None)
    for eta0, full in itertools.product(
            (None, ref - 100.0, 10.0 * ref - 5.0, ref * (1 + 1e-3), ref, ref * 0.5, -1e-9,
             0.0, 3.0), (False, True)):
        eta = chi2._minimiser(w, z, c2, eta0, full=full)
        tol = ETA_TOL * (1.0 + abs(eta)) / min(1.0, c2 - 1.0)
        assert _slope_sign(w, z, c2, eta - tol) <= 0 <= _slope_sign(w, z, c2, eta + tol), eta0
        scale = abs(eta) + math.sqrt(c2) * math.sqrt(float(w @ np.maximum(z - eta, 0) ** 2))
        assert _objective(w, z, c2, eta) <= _breakpoint_minimum(w, z, c2) + F_TOL * scale


@pytest.mark.parametrize("n", [3, 7, 100])
def test_max_loss_regime_and_its_boundary(n):
    """``eta* = max l`` and ``F = max l`` once ``(1 + rho) P(argmax l) >= 1`` (the max-loss
    atoms tied, duplicated or not); just below it ``eta* < max l`` and ``F < max l``."""
    rng = np.random.default_rng(n)
    x = rng.uniform(-1.0, 1.0, size=(n, 2))
    x[:2] = [-2.0, 0.5]  # a duplicated max-loss atom: its two copies reach the threshold
    y = np.ones(n)
    theta = np.array([1.0, 0.0])
    w = np.full(n, 0.5 / (n - 2))
    w[:2] = 0.25
    w /= w.sum()
    data = sim.PreferenceData(x, y, w)
    l = np.logaddexp(0.0, -(x @ theta))
    assert l.argmax() in (0, 1) and l[0] == l[1]
    p = w[l == l.max()].sum()
    for rho in (1.0 / p - 1.0, 1.0 / p - 1.0 + 1e-3, 2.0 / p):
        ev = sim.robust_objective(theta, data, sim.ChiSquare(rho), beta=1.0)
        assert ev.value == l.max() and ev.dual == l.max()
        np.testing.assert_allclose(ev.worst_case.weights, np.where(l == l.max(), w / p, 0.0),
                                   rtol=1e-15, atol=1e-300)
    rho = (1.0 / p - 1.0) * (1 - 1e-6)
    ev = sim.robust_objective(theta, data, sim.ChiSquare(rho), beta=1.0)
    assert ev.dual < l.max() and ev.value < l.max()
    assert ev.value == pytest.approx(l.max() + _breakpoint_minimum(w, l - l.max(), 1 + rho),
                                     rel=F_TOL)


def test_one_atom_is_its_loss():
    data = sim.PreferenceData(np.array([[0.7, -0.2]]), np.array([1.0]))
    ev = sim.robust_objective(np.array([0.3, 1.0]), data, sim.ChiSquare(0.5), beta=1.0)
    assert ev.value == pytest.approx(float(np.logaddexp(0.0, -0.01)), rel=1e-15)


def _fsum_closed_form(w, z, c2, act):
    """The closed form on ``act`` from correctly rounded sums (``math.fsum``)."""
    wa, za = w[act], z[act]
    a0 = math.fsum(wa.tolist())
    mu = math.fsum((wa * za).tolist()) / a0
    var = math.fsum((wa * (za - mu) ** 2).tolist()) / a0
    return mu - math.sqrt(var / (c2 * a0 - 1.0))


@pytest.mark.parametrize("n,kind,uniform", [(10_000, "normal", False), (100_000, "exp", True),
                                            (100_000, "ties", False), (100_000, "normal", True)])
def test_large_n_exact_without_sorting(n, kind, uniform, monkeypatch):
    """At large n the search settles without the sort (which raises here): its ``eta`` is
    the closed form of its own active set computed from correctly rounded sums (that set
    reproducing itself), and ``F`` agrees with the sorted closed form (run afterwards).
    Equal weights ``1 / n`` are the case where BLAS dots drift (``1e-13`` at n = 1e6)."""
    w, z, c2 = _problem(7, n, kind)
    if uniform:
        w = np.full(n, 1.0 / n)
        c2 = min(c2, 0.5 / w[z == 0].sum() + 0.5)  # outside the max-loss regime
    sorted_minimiser = chi2._sorted_minimiser

    def refuse(*args):
        raise AssertionError("the search fell back to sorting")

    monkeypatch.setattr(chi2, "_sorted_minimiser", refuse)
    ref = sorted_minimiser(w, z, c2)
    scale = abs(ref) + math.sqrt(c2) * math.sqrt(float(w @ np.maximum(z - ref, 0) ** 2))
    for eta0 in (None, 2.0 * ref, ref * 0.9, ref * (1 - 1e-6)):
        eta = chi2._minimiser(w, z, c2, eta0)
        exact = _fsum_closed_form(w, z, c2, z > eta)
        assert np.array_equal(z > exact, z > eta) or abs(exact - eta) <= 1e-15 * abs(eta)
        assert abs(eta - exact) <= ETA_TOL * (1 + abs(exact)) / min(1.0, c2 - 1.0)
        assert _objective(w, z, c2, eta) == pytest.approx(_objective(w, z, c2, ref),
                                                          abs=F_TOL * scale)


def test_fallback_after_the_iteration_bound(monkeypatch):
    """With the search cut short, the sorted closed form returns the same ``eta*``."""
    w, z, c2 = _problem(3, 300, "normal", zero_weights=True)
    eta = chi2._minimiser(w, z, c2, None)
    for iters in (0, 1):
        monkeypatch.setattr(chi2, "_SEARCH_ITERS", iters)
        cut = chi2._minimiser(w, z, c2, None)
        assert abs(cut - eta) <= ETA_TOL * (1 + abs(eta)) / min(1.0, c2 - 1.0)


def test_warm_state_round_trip_and_few_passes(monkeypatch):
    """``Chi2State`` carries ``eta*`` (the ``dual``) in loss units; from it the search ends
    after at most two passes, and every start gives the same evaluation."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(20_000, 3))
    y = (rng.random(20_000) < 0.7).astype(float)
    at = Atoms.from_data(sim.PreferenceData(x, y), 1.0)
    delta = np.array([0.4, -0.2, 0.1])
    amb = sim.ChiSquare(0.2)
    cold = evaluate_inner(at, delta, amb, state=None)
    assert isinstance(cold.state, chi2.Chi2State) and cold.state.eta == cold.dual
    assert cold.state.transfer() == cold.state
    passes = []
    sums = chi2._active_sums

    def counted(*args):
        passes.append(1)
        return sums(*args)

    monkeypatch.setattr(chi2, "_active_sums", counted)
    for eta in (cold.dual, cold.dual - 5.0, cold.dual - 1e-4, cold.dual + 1e-4, 1e3, None):
        passes.clear()
        ev = evaluate_inner(at, delta, amb, state=chi2.Chi2State(eta))
        assert ev.dual == pytest.approx(cold.dual, rel=1e-14, abs=1e-14)
        assert ev.value == pytest.approx(cold.value, rel=1e-15)
        np.testing.assert_allclose(ev.grad, cold.grad, rtol=1e-13, atol=1e-15)
        if eta == cold.dual:
            assert len(passes) <= 2
