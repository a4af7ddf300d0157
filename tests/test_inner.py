"""Exact inner suprema at fixed theta against closed forms and independent computations (SPEC 3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

import simulator as sim
from simulator.solvers.inner import Atoms, evaluate_inner
from simulator.solvers.wasserstein2 import best_move

BETA = 0.8


def _problem(seed=0, n=120, d=3, weights=False, scale=1.5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    x /= np.maximum(1.0, np.linalg.norm(x, axis=1))[:, None]
    theta_true = rng.normal(size=d) * scale
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-BETA * x @ theta_true))).astype(float)
    w = rng.dirichlet(np.ones(n)) if weights else None
    theta = theta_true + rng.normal(size=d) * 0.3
    ref = rng.normal(size=d) * 0.2
    return sim.PreferenceData(x, y, w), theta, ref


def _losses(data, theta, ref, beta=BETA):
    m = (2 * data.y - 1) * beta * (data.x @ (theta - ref))
    return np.logaddexp(0.0, -m), m


ALL_SETS = [sim.Nominal(), sim.KL(0.2), sim.ChiSquare(0.3), sim.Wasserstein(0.1, p=1),
            sim.Wasserstein(0.1, p=1, kappa=0.7), sim.Wasserstein(0.1, p=2),
            sim.Wasserstein(0.1, p=2, kappa=0.7)]


@pytest.mark.parametrize("amb", [sim.KL(0.0), sim.ChiSquare(0.0), sim.Wasserstein(0.0, p=1),
                                 sim.Wasserstein(0.0, p=2), sim.Wasserstein(0.0, p=2, kappa=1.0),
                                 sim.Wasserstein(0.0, p=1, kappa=1.0), sim.Nominal()])
def test_zero_radius_is_dpo(amb):
    data, theta, ref = _problem(weights=True)
    l, m = _losses(data, theta, ref)
    ev = sim.robust_objective(theta, data, amb, beta=BETA, theta_ref=ref)
    assert ev.value == pytest.approx(data.weights @ l, rel=1e-13)
    grad = data.weights @ sim.dpo_grad_theta(m, data.x, data.y, BETA)
    np.testing.assert_allclose(ev.grad, grad, atol=1e-13)


def test_w1_infinite_kappa_is_norm_penalty():
    data, theta, ref = _problem(1, weights=True)
    l, _ = _losses(data, theta, ref)
    for rho in (0.01, 0.3, 2.0):
        ev = sim.robust_objective(theta, data, sim.Wasserstein(rho, p=1), BETA, ref)
        assert ev.value == pytest.approx(data.weights @ l + rho * BETA
                                         * np.linalg.norm(theta - ref), rel=1e-14)
        assert ev.gap < 1e-12 and ev.worst_case.transport_cost <= rho * (1 + 1e-12)


def _kl_dual_scipy(l, w, rho):
    f = lambda u: math.exp(u) * (rho + logsumexp(l / math.exp(u), b=w))  # noqa: E731
    res = minimize_scalar(f, bounds=(-25, 8), method="bounded", options={"xatol": 1e-13})
    return min(res.fun, l.max())


@pytest.mark.parametrize("rho", [0.01, 0.2, 1.0])
def test_kl_value_against_scalar_dual(rho):
    data, theta, ref = _problem(2, weights=True)
    l, _ = _losses(data, theta, ref)
    ev = sim.robust_objective(theta, data, sim.KL(rho), BETA, ref)
    assert ev.value == pytest.approx(_kl_dual_scipy(l, data.weights, rho), rel=1e-9)
    q = ev.worst_case.weights
    kl = float(np.sum(q[q > 0] * np.log(q[q > 0] / data.weights[q > 0])))
    assert kl == pytest.approx(rho, rel=1e-9) and ev.gap < 1e-12 and ev.dual > 0


def test_kl_max_loss_regime():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.5], [0.3, -0.2]])
    y = np.array([1.0, 1.0, 1.0, 0.0])
    w = np.array([0.4, 0.3, 0.2, 0.1])
    data = sim.PreferenceData(x, y, w)
    theta = np.array([1.0, 0.5])
    l, _ = _losses(data, theta, np.zeros(2), beta=1.0)
    top = int(np.argmax(l))
    threshold = -math.log(w[top])
    above = sim.robust_objective(theta, data, sim.KL(threshold + 1e-3), beta=1.0)
    assert above.value == pytest.approx(l.max(), rel=1e-14) and above.dual == 0.0
    np.testing.assert_allclose(above.worst_case.weights, np.eye(4)[top], atol=1e-15)
    below = sim.robust_objective(theta, data, sim.KL(threshold - 1e-3), beta=1.0)
    assert below.dual > 0 and below.value < l.max()
    assert below.value == pytest.approx(_kl_dual_scipy(l, w, threshold - 1e-3), rel=1e-9)


def test_chi2_small_radius_closed_form_and_general_dual():
    data, theta, ref = _problem(3)
    l, _ = _losses(data, theta, ref)
    w = data.weights
    mean, sd = w @ l, math.sqrt(w @ (l - w @ l) ** 2)
    rho_ok = (sd / (mean - l.min())) ** 2 * 0.9  # weights 1 + sqrt(rho)(l - El)/sd stay >= 0
    ev = sim.robust_objective(theta, data, sim.ChiSquare(rho_ok), BETA, ref)
    assert ev.value == pytest.approx(mean + math.sqrt(rho_ok) * sd, rel=1e-13)
    for rho in (rho_ok * 5, 1.0, 10.0):  # beyond the closed form: the general dual
        def f(eta, rho=rho):
            return eta + math.sqrt(1 + rho) * math.sqrt(w @ np.maximum(l - eta, 0) ** 2)
        res = minimize_scalar(f, bounds=(-50, l.max()), method="bounded",
                              options={"xatol": 1e-13})
        ev = sim.robust_objective(theta, data, sim.ChiSquare(rho), BETA, ref)
        assert ev.value == pytest.approx(min(res.fun, l.max()), rel=1e-10)
        q = ev.worst_case.weights
        assert np.sum(w * (q / w - 1) ** 2) <= rho * (1 + 1e-10) and ev.gap < 1e-12


def test_chi2_max_loss_regime():
    data, theta, ref = _problem(4, n=10)
    l, _ = _losses(data, theta, ref)
    ev = sim.robust_objective(theta, data, sim.ChiSquare(1 / 0.1 - 1 + 1e-6), BETA, ref)
    assert ev.value == pytest.approx(l.max(), rel=1e-13)


@pytest.mark.parametrize("kappa", [0.3, 1.0, 3.0])
@pytest.mark.parametrize("rho", [0.02, 0.2])
def test_w1_finite_kappa_against_breakpoints(kappa, rho):
    """The SA dual is piecewise linear in lambda: its minimum sits at a breakpoint."""
    data, theta, ref = _problem(5, weights=True)
    l, m = _losses(data, theta, ref)
    w = data.weights
    b = BETA * np.linalg.norm(theta - ref)
    lams = np.concatenate([[b], m[m / kappa > b] / kappa])
    vals = [lam * rho + w @ np.maximum(l, np.logaddexp(0, m) - lam * kappa) for lam in lams]
    ev = sim.robust_objective(theta, data, sim.Wasserstein(rho, p=1, kappa=kappa), BETA, ref)
    assert ev.value == pytest.approx(min(vals), rel=1e-13)
    wc = ev.worst_case
    assert ev.gap < 1e-12 and wc.transport_cost <= rho * (1 + 1e-12)
    np.testing.assert_allclose(np.bincount(wc.source, wc.weights, minlength=data.n), w,
                               atol=1e-15)


@pytest.mark.parametrize(("tilt", "kappa", "rho"), [(0.0, 0.3, 0.05), (0.0, 0.2, 0.05),
                                                     (4.0, 0.2, 2e-5), (4.0, 0.2, 8e-5)])
def test_w1_finite_kappa_against_all_breakpoints_many_atoms(tilt, kappa, rho):
    """Every breakpoint of the piecewise-linear dual at once (one sort, cumulative sums),
    at sizes where the evaluation partitions off the largest margins; ``tilt`` puts little
    weight on the large margins, so that the first partition carries too little mass
    (grown 4-fold: to part of the candidates, and to all of them)."""
    data, theta, ref = _problem(6, n=20_000)
    l, m = _losses(data, theta, ref)
    w = np.exp(-tilt * m)
    w /= w.sum()
    data = sim.PreferenceData(data.x, data.y, w)
    b = BETA * np.linalg.norm(theta - ref)
    order = np.argsort(-m)
    ms, cw, cwm = m[order], np.cumsum(w[order]), np.cumsum(w[order] * m[order])
    lam = np.concatenate([[b], ms[ms / kappa > b] / kappa])
    # sum_i w_i (m_i - lam kappa)_+ over the margins above lam kappa, for every lam
    above = np.searchsorted(-ms, -lam * kappa, side="left")
    idx = np.maximum(above - 1, 0)
    tail = np.where(above > 0, cwm[idx] - lam * kappa * cw[idx], 0.0)
    expected = float(np.min(lam * rho + tail)) + float(w @ l)
    ev = sim.robust_objective(theta, data, sim.Wasserstein(rho, p=1, kappa=kappa), BETA, ref)
    assert ev.value == pytest.approx(expected, rel=1e-13)
    assert ev.gap < 1e-12 and ev.worst_case.transport_cost <= rho * (1 + 1e-12)


def test_best_move_is_global_against_dense_grid():
    rng = np.random.default_rng(6)
    m = rng.normal(0, 5, 120)
    for k in (1e-3, 0.02, 0.1, 0.2, 0.249, 0.3, 2.0):
        tau, val, _, _, _ = best_move(m, k)
        grid = np.linspace(0, 1, 40_001) / k
        f = np.logaddexp(0, grid[None, :] - m[:, None]) - 0.5 * k * grid[None, :] ** 2
        assert np.all(val >= f.max(axis=1) - 1e-12)
        assert np.all(np.abs(val - (np.logaddexp(0, tau - m) - 0.5 * k * tau**2)) < 1e-14)


@pytest.mark.parametrize("kappa", [math.inf, 0.5])
@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_w2_worst_case_is_a_coupling_within_budget(rho, kappa):
    """(The value against an independent brute force, to 1e-14: tests/test_w2.py.)"""
    data, theta, ref = _problem(7, n=25, weights=True)
    ev = sim.robust_objective(theta, data, sim.Wasserstein(rho, p=2, kappa=kappa), BETA, ref)
    wc = ev.worst_case
    assert wc.transport_cost == pytest.approx(rho**2, rel=1e-10)
    # the coupling's cost recomputed from the atoms, and its first marginal is P
    moved = np.sum((wc.x - data.x[wc.source]) ** 2, axis=1) + np.where(
        wc.y != data.y[wc.source], kappa, 0.0)
    assert wc.weights @ moved == pytest.approx(rho**2, rel=1e-10)
    np.testing.assert_allclose(np.bincount(wc.source, wc.weights, minlength=data.n),
                               data.weights, atol=1e-15)
    assert ev.gap < 1e-12


def _tie_problem():
    """One atom (m = 5, b = 2.5) and a radius at which its maximiser jumps at lambda*."""
    m, b = 5.0, 2.5
    lo, hi = 0.05, 0.7  # two local maxima over this range; the global one switches inside
    for _ in range(200):  # bisection on which of the two is the global one
        mid = 0.5 * (lo + hi)
        tau, _, alt, _, _ = best_move(np.array([m]), 2 * mid / b**2)
        if tau[0] > alt[0]:
            lo = mid
        else:
            hi = mid
    tau_lo, val, alt_lo, val_alt, _ = best_move(np.array([m]), 2 * lo / b**2)
    t_big, t_small = tau_lo[0] / b, alt_lo[0] / b
    assert t_big > 2 * t_small > 0 and abs(val[0] - val_alt[0]) < 1e-12
    rho = math.sqrt(0.5 * (t_big**2 + t_small**2))
    data = sim.PreferenceData(np.array([[2.0]]), np.array([1.0]))  # theta = 2.5: m = 5
    return data, np.array([2.5]), rho, lo


def test_w2_tie_splits_an_atom_to_meet_the_budget():
    """One atom whose inner problem has two maximisers at lambda*: the worst case mixes them."""
    data, theta, rho, lam_tie = _tie_problem()
    ev = sim.robust_objective(theta, data, sim.Wasserstein(rho, p=2), beta=1.0)
    wc = ev.worst_case
    assert wc.weights.size == 2 and np.all(wc.weights > 0.4)
    assert wc.transport_cost == pytest.approx(rho**2, rel=1e-9)
    assert ev.gap < 1e-10 and ev.dual == pytest.approx(lam_tie, rel=1e-9)


def test_w2_hessian_at_a_tie_against_finite_differences():
    """Near the tie, lambda* keeps the atom tied: the Newton Hessian is the KKT Schur complement."""
    data, theta, rho, _ = _tie_problem()
    at, amb, h = Atoms.from_data(data, 1.0), sim.Wasserstein(rho, p=2), 1e-5
    hess = evaluate_inner(at, theta, amb, hess=True).hess()
    grads = [evaluate_inner(at, theta + s * h, amb).grad for s in (1.0, -1.0)]
    fd = (grads[0] - grads[1]) / (2 * h)
    np.testing.assert_allclose(hess[0], fd, rtol=1e-6)


@pytest.mark.parametrize("amb", ALL_SETS, ids=lambda a: repr(a))
def test_danskin_gradient_against_finite_differences(amb):
    data, theta, ref = _problem(8, weights=True)
    ev = sim.robust_objective(theta, data, amb, BETA, ref)
    h = 1e-6
    fd = np.array([(sim.robust_objective(theta + h * e, data, amb, BETA, ref).value
                    - sim.robust_objective(theta - h * e, data, amb, BETA, ref).value) / (2 * h)
                   for e in np.eye(data.d)])
    np.testing.assert_allclose(ev.grad, fd, atol=1e-7)


@pytest.mark.parametrize("amb", ALL_SETS, ids=lambda a: repr(a))
def test_certificate_and_invariants(amb):
    data, theta, ref = _problem(9, weights=True)
    ev = sim.robust_objective(theta, data, amb, BETA, ref)
    wc = ev.worst_case
    assert ev.gap < 1e-12 and wc.weights.min() >= 0
    assert wc.weights.sum() == pytest.approx(1.0, abs=1e-12)
    if wc.budget is not None:
        assert wc.transport_cost <= wc.budget * (1 + 1e-12)
    perm = np.random.default_rng(0).permutation(data.n)
    shuffled = sim.PreferenceData(data.x[perm], data.y[perm], data.weights[perm])
    assert sim.robust_objective(theta, shuffled, amb, BETA, ref).value == pytest.approx(
        ev.value, rel=1e-12)
    # duplicating atom 0 into two halves changes nothing
    dup = sim.PreferenceData(np.vstack([data.x, data.x[:1]]), np.append(data.y, data.y[0]),
                             np.append(data.weights, 0.0) + np.append(
                                 -0.5 * data.weights[0] * np.eye(data.n)[0],
                                 0.5 * data.weights[0]))
    ev_dup = sim.robust_objective(theta, dup, amb, BETA, ref)
    assert ev_dup.value == pytest.approx(ev.value, rel=1e-12)
    np.testing.assert_allclose(ev_dup.grad, ev.grad, atol=1e-12)


def test_bad_inputs_raise():
    data, theta, ref = _problem(10, n=10)
    with pytest.raises(ValueError, match="beta"):
        sim.robust_objective(theta, data, sim.KL(0.1), beta=0.0)
    with pytest.raises(ValueError, match="theta_ref"):
        sim.robust_objective(theta, data, sim.KL(0.1), theta_ref=np.zeros(5))
    with pytest.raises(ValueError, match="theta"):
        sim.robust_objective(np.array([np.nan, 0, 0]), data, sim.KL(0.1))
    with pytest.raises(ValueError, match="data"):
        sim.robust_objective(theta, (data.x, data.y), sim.KL(0.1))
    with pytest.raises(ValueError, match="ambiguity"):
        sim.robust_objective(theta, data, "kl")


# --- the workspace shared along a minimisation (KL, chi-square) ---------------------------


def _shared_state_problem(weights):
    """Atoms of 3000 pairs with equal (``weights=False``) or random weights, and three
    nearby points."""
    data, theta, ref = _problem(seed=5, n=3000, d=3, weights=weights)
    at = Atoms.from_data(data, BETA, normalise=True)
    delta = (theta - ref) * at.scale
    return at, [delta, delta * 1.01, delta * 0.98 + 0.01]


@pytest.mark.parametrize("weights", [False, True], ids=["equal", "random"])
@pytest.mark.parametrize("amb", [sim.KL(0.2), sim.ChiSquare(0.3)], ids=repr)
def test_shared_workspace_leaves_every_result_intact(amb, weights):
    """Evaluations chained through their states share scratch vectors: each result (value,
    dual, gradient, worst case and the Hessian, built only after the later evaluations
    overwrote the scratch) equals a fresh evaluation at its point."""
    at, deltas = _shared_state_problem(weights)
    chained, state = [], None
    for d in deltas:
        res = evaluate_inner(at, d, amb, hess=True, worst=True, state=state)
        chained.append(res)
        state = res.state
    for d, res in zip(deltas, chained, strict=True):
        fresh = evaluate_inner(at, d, amb, hess=True, worst=True)
        assert res.value == pytest.approx(fresh.value, rel=1e-15)
        assert res.dual == pytest.approx(fresh.dual, rel=1e-12)
        np.testing.assert_allclose(res.grad, fresh.grad, rtol=1e-11, atol=1e-15)
        np.testing.assert_allclose(res.worst_case.weights, fresh.worst_case.weights,
                                   rtol=1e-11, atol=1e-18)
        np.testing.assert_allclose(res.hess(), fresh.hess(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("amb", [sim.KL(0.2), sim.ChiSquare(0.3)], ids=repr)
def test_equal_weight_shortcut_matches_the_weighted_passes(amb, monkeypatch):
    """With equal weights the sets leave out their products with the weights; the general
    weighted passes (the shortcut switched off) give the same evaluation."""
    from simulator.solvers import core

    at, deltas = _shared_state_problem(weights=False)
    short = evaluate_inner(at, deltas[0], amb, hess=True, worst=True)
    monkeypatch.setattr(core.Workspace, "equal_weight", lambda self, w: None)
    full = evaluate_inner(at, deltas[0], amb, hess=True, worst=True)
    assert short.value == pytest.approx(full.value, rel=1e-15)
    assert short.dual == pytest.approx(full.dual, rel=1e-12)
    np.testing.assert_allclose(short.grad, full.grad, rtol=1e-11, atol=1e-15)
    np.testing.assert_allclose(short.hess(), full.hess(), rtol=1e-10, atol=1e-14)
