"""The ``dual`` solver: closed forms, independent minimisers, certificates, invariants (SPEC 3)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import expit, logsumexp

import simulator as sim
from simulator.solvers.dual import QUASI_NEWTON_MIN_D

BETA = 0.9


def _problem(seed=0, n=150, d=3, weights=False, scale=2.0, ref=True):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    x /= np.maximum(1.0, np.linalg.norm(x, axis=1))[:, None]
    theta_true = rng.normal(size=d)
    theta_true *= scale / np.linalg.norm(theta_true)
    y = (rng.uniform(size=n) < expit(BETA * x @ theta_true)).astype(float)
    w = rng.dirichlet(np.ones(n) * 2) if weights else None
    return sim.PreferenceData(x, y, w), (rng.normal(size=d) * 0.2 if ref else np.zeros(d))


def _scipy_min(fun_grad, x0):
    res = minimize(fun_grad, x0, jac=True, method="BFGS", options={"gtol": 1e-12, "maxiter": 5000})
    return res.x, res.fun


def _dpo_fun(data, ref, penalty=0.0):
    a = (2 * data.y - 1)[:, None] * BETA * data.x

    def f(theta):
        m = a @ (theta - ref)
        g = data.weights @ (-expit(-m)[:, None] * a)
        nrm = np.linalg.norm(theta - ref)
        return (data.weights @ np.logaddexp(0, -m) + penalty * nrm,
                g + penalty * (theta - ref) / max(nrm, 1e-300))
    return f


@pytest.mark.parametrize("amb", [sim.Nominal(), sim.KL(0.0), sim.ChiSquare(0.0),
                                 sim.Wasserstein(0.0, p=1), sim.Wasserstein(0.0, p=2),
                                 sim.Wasserstein(0.0, p=1, kappa=0.5),
                                 sim.Wasserstein(0.0, p=2, kappa=0.5)], ids=repr)
def test_zero_radius_is_dpo(amb):
    data, ref = _problem(0, weights=True)
    theta, val = _scipy_min(_dpo_fun(data, ref), ref + 0.1)
    sol = sim.solve(data, amb, beta=BETA, theta_ref=ref)
    np.testing.assert_allclose(sol.theta, theta, atol=1e-7)
    assert sol.value == pytest.approx(val, rel=1e-12) and sol.gap < 1e-12
    assert sol.solver == "dual" and sol.status == "optimal"


@pytest.mark.parametrize("rho", [0.01, 0.1])
def test_w1_infinite_kappa_is_penalised_dpo(rho):
    data, ref = _problem(1)
    theta, val = _scipy_min(_dpo_fun(data, ref, rho * BETA), ref + 0.5)
    sol = sim.solve(data, sim.Wasserstein(rho, p=1), beta=BETA, theta_ref=ref)
    np.testing.assert_allclose(sol.theta, theta, atol=1e-6)
    assert sol.value == pytest.approx(val, rel=1e-12)
    assert sol.dual == pytest.approx(BETA * np.linalg.norm(sol.theta - ref), rel=1e-12)


def test_kl_against_joint_scipy_minimisation():
    """Minimise ``lambda rho + lambda log E exp(l/lambda)`` jointly in (theta, log lambda)."""
    data, ref = _problem(2)
    rho = 0.05
    a = (2 * data.y - 1)[:, None] * BETA * data.x

    def f(z):
        theta, lam = z[:-1], math.exp(z[-1])
        l = np.logaddexp(0, -(a @ (theta - ref)))
        lse = logsumexp(l / lam, b=data.weights)
        q = data.weights * np.exp(l / lam - lse)
        g_theta = q @ (-expit(-(a @ (theta - ref)))[:, None] * a)
        g_lam = rho + lse - (q @ l) / lam
        return lam * (rho + lse), np.append(g_theta, g_lam * lam)

    z, val = _scipy_min(f, np.append(ref + 0.3, 0.0))
    sol = sim.solve(data, sim.KL(rho), beta=BETA, theta_ref=ref)
    np.testing.assert_allclose(sol.theta, z[:-1], atol=1e-6)
    assert sol.value == pytest.approx(val, rel=1e-10)
    assert sol.dual == pytest.approx(math.exp(z[-1]), rel=1e-5)


@pytest.mark.parametrize("amb", [sim.ChiSquare(0.2), sim.Wasserstein(0.05, p=2),
                                 sim.Wasserstein(0.05, p=2, kappa=0.8)], ids=repr)
def test_first_order_optimality_against_scipy(amb):
    """BFGS on the exact objective (values and Danskin gradients) lands on the same theta."""
    data, ref = _problem(3, weights=True)

    def f(theta):
        ev = sim.robust_objective(theta, data, amb, BETA, ref)
        return ev.value, ev.grad

    theta, val = _scipy_min(f, ref + 0.2)
    sol = sim.solve(data, amb, beta=BETA, theta_ref=ref)
    assert sol.value <= val + 1e-12
    assert sol.value == pytest.approx(val, rel=1e-8)
    np.testing.assert_allclose(sol.theta, theta, atol=1e-4)
    wc = sol.worst_case
    assert sol.gap < 1e-10
    if isinstance(amb, sim.Wasserstein):
        assert wc.transport_cost <= wc.budget * (1 + 1e-10)
        if amb.p == 2:
            assert wc.transport_cost == pytest.approx(amb.rho**2, rel=1e-10)


@pytest.mark.parametrize("amb", [sim.KL(2.0), sim.ChiSquare(5.0), sim.Wasserstein(3.0, p=1),
                                 sim.Wasserstein(3.0, p=2), sim.Wasserstein(3.0, p=2, kappa=1.0)],
                         ids=repr)
def test_large_radius_gives_reference_policy(amb):
    """theta_ref is certified optimal by the subdifferential test, and is a minimum."""
    data, ref = _problem(4, scale=0.5)
    sol = sim.solve(data, amb, beta=BETA, theta_ref=ref)
    np.testing.assert_array_equal(sol.theta, ref)
    assert sol.info["zero_kink"] and sol.value == pytest.approx(math.log(2), rel=1e-15)
    rng = np.random.default_rng(0)
    for v in rng.normal(size=(20, data.d)):
        for t in (1e-3, 1e-1):
            assert sim.robust_objective(ref + t * v, data, amb, BETA, ref).value >= sol.value


def test_zero_kink_test_says_no_when_a_descent_direction_exists():
    data, ref = _problem(5, scale=3.0)
    sol = sim.solve(data, sim.KL(0.05), beta=BETA, theta_ref=ref)
    assert not sol.info["zero_kink"]
    assert sol.value < math.log(2) and sol.grad_norm < 1e-8


ALL = [sim.Nominal(), sim.KL(0.05), sim.ChiSquare(0.1), sim.Wasserstein(0.05, p=1),
       sim.Wasserstein(0.03, p=1, kappa=1.0), sim.Wasserstein(0.05, p=2),
       sim.Wasserstein(0.05, p=2, kappa=1.0)]


@pytest.mark.parametrize("amb", ALL, ids=repr)
def test_population_solves_like_the_sample_it_is(amb):
    """A sample with repeated atoms and the population of its distinct atoms: same optimum."""
    env = sim.FiniteEnv.random(5, 3, 3, beta=BETA, seed=1, theta_norm=3.0)
    sample = env.sample(400, seed=2)
    key = np.column_stack([sample.states, sample.actions, sample.y])
    uniq, first, counts = np.unique(key, axis=0, return_index=True, return_counts=True)
    pop = sim.PreferenceData(sample.x[first], sample.y[first], counts / counts.sum())
    assert pop.n < sample.n
    a = sim.solve(sample, amb, beta=BETA)
    b = sim.solve(pop, amb, beta=BETA)
    np.testing.assert_allclose(a.theta, b.theta, atol=1e-8)
    assert a.value == pytest.approx(b.value, rel=1e-10)
    perm = np.random.default_rng(3).permutation(sample.n)
    c = sim.solve(sim.PreferenceData(sample.x[perm], sample.y[perm]), amb, beta=BETA)
    np.testing.assert_allclose(c.theta, a.theta, atol=1e-8)


def test_population_of_environment():
    env = sim.FiniteEnv.random(4, 3, 2, beta=1.0, seed=3, theta_norm=2.0)
    pop = env.population()
    for amb in ALL:
        sol = sim.solve(pop, amb, beta=1.0)
        assert sol.gap < 1e-10 and (sol.info["zero_kink"] or sol.grad_norm < 1e-6
                                    or sol.info.get("optimality_gap", 1.0) <= 1e-12)


def test_separable_data_raises_with_status():
    x = np.array([[1.0, 0.0], [0.5, 0.5], [-1.0, 0.2], [-0.4, -0.6]])
    y = np.array([1.0, 1.0, 0.0, 0.0])
    data = sim.PreferenceData(x, y)
    with pytest.raises(RuntimeError, match="status"):
        sim.solve(data, sim.Nominal())
    with pytest.raises(RuntimeError, match="status"):
        sim.solve(data, sim.KL(0.01))
    # a Wasserstein ball makes the problem coercive: the solution exists
    assert sim.solve(data, sim.Wasserstein(0.1, p=1)).grad_norm < 1e-8


def test_iteration_limit_raises():
    data, ref = _problem(6)
    with pytest.raises(RuntimeError, match="max_iter"):
        sim.solve(data, sim.KL(0.05), beta=BETA, theta_ref=ref, max_iter=1)


def test_bad_inputs_raise():
    data, ref = _problem(7, n=10)
    with pytest.raises(ValueError, match="solver"):
        sim.solve(data, sim.KL(0.1), solver="newton")
    with pytest.raises(ValueError, match="beta"):
        sim.solve(data, sim.KL(0.1), beta=-1.0)
    with pytest.raises(ValueError, match="theta_ref"):
        sim.solve(data, sim.KL(0.1), theta_ref=np.zeros(2))
    with pytest.raises(ValueError, match="data"):
        sim.solve(data.x, sim.KL(0.1))
    with pytest.raises(ValueError, match="tol"):
        sim.solve(data, sim.KL(0.1), tol=0.0)
    with pytest.raises(ValueError, match="ambiguity"):
        sim.solve(data, None)


def _kink_case():
    """A small, nearly separable problem whose p = 2 minimiser sits at a kink of F."""
    rng = np.random.default_rng(34)
    d, n, beta = int(rng.integers(2, 5)), int(rng.integers(20, 300)), float(rng.uniform(0.3, 2))
    th = rng.normal(size=d) * rng.uniform(1, 4)
    x = rng.normal(size=(n, d))
    x /= np.maximum(1, np.linalg.norm(x, axis=1))[:, None]
    x *= rng.uniform(0.2, 2)
    y = (rng.uniform(size=n) < expit(beta * x @ th)).astype(float)
    w = rng.dirichlet(np.ones(n) * rng.uniform(0.5, 5)) if rng.uniform() < 0.5 else None
    ref = rng.normal(size=d) * 0.3 if rng.uniform() < 0.5 else None
    rng.integers(0, 7)
    rho = float(np.exp(rng.uniform(np.log(0.005), np.log(1.0)))) / 3
    return sim.PreferenceData(x, y, w), sim.Wasserstein(rho, p=2), beta, ref


def _no_descent(sol, data, amb, beta, ref, tol=1e-12):
    rng = np.random.default_rng(1)
    for v in rng.normal(size=(100, data.d)):
        for eps in (1e-6, 1e-4, 1e-2):
            moved = sol.theta + eps * v / np.linalg.norm(v)
            assert sim.robust_objective(moved, data, amb, beta, ref).value >= sol.value - tol


def test_w2_minimiser_at_a_kink():
    """Two atoms tie at lambda*: Newton on F stalls and the KKT fallback finds the minimum."""
    data, amb, beta, ref = _kink_case()
    sol = sim.solve(data, amb, beta=beta, theta_ref=ref)
    assert sol.gap < 1e-12
    assert sol.worst_case.transport_cost == pytest.approx(amb.rho**2, rel=1e-10)
    _no_descent(sol, data, amb, beta, ref)


def test_w2_minimiser_near_the_zero_kink():
    """The minimiser lies close to theta_ref, where Newton gets caught; it restarts and finds it."""
    env = sim.FiniteEnv.random(12, 5, 3, beta=1.7426673279117961, seed=10,
                               theta_norm=1.0224874307870708)
    data = env.sample(454, seed=10)
    amb = sim.Wasserstein(0.2, p=2)
    a = (2 * data.y - 1)[:, None] * env.beta * data.x
    assert np.linalg.norm(data.weights @ a) / 2 > amb.rho * env.beta / 2  # 0 is not optimal
    sol = sim.solve(data, amb, beta=env.beta)
    assert not sol.info["zero_kink"] and sol.value < math.log(2) and sol.gap < 1e-12
    _no_descent(sol, data, amb, env.beta, None)


# --- the high-dimensional path: L-BFGS polished by Newton (method="lbfgs" / "auto") --------

_HIGH_D = QUASI_NEWTON_MIN_D + 8
_SMOOTH_SETS = [sim.Nominal(), sim.KL(0.1), sim.KL(2.0), sim.ChiSquare(0.1), sim.ChiSquare(1.5),
                sim.Wasserstein(0.05, p=1)]


@pytest.mark.parametrize("amb", _SMOOTH_SETS, ids=repr)
@pytest.mark.parametrize("seed", [0, 1])
def test_lbfgs_path_agrees_with_newton_and_is_certified(amb, seed):
    """Above the crossover ``auto`` runs L-BFGS: the same minimiser as Newton, certified."""
    data, ref = _problem(seed=seed, n=1200, d=_HIGH_D, weights=seed == 1)
    newton = sim.solve(data, amb, beta=BETA, theta_ref=ref, method="newton")
    auto = sim.solve(data, amb, beta=BETA, theta_ref=ref)
    assert newton.info["method"] == "newton" and auto.info["method"] == "lbfgs"
    assert auto.status == "optimal" and auto.info["optimality_gap"] <= 1e-9
    np.testing.assert_allclose(auto.theta, newton.theta, rtol=0,
                               atol=1e-6 * np.linalg.norm(newton.theta - ref))
    assert abs(auto.value - newton.value) <= 1e-10
    if newton.dual is not None:
        assert abs(auto.dual - newton.dual) <= 1e-6 * max(1.0, abs(newton.dual))


@pytest.mark.parametrize("amb", [sim.KL(0.1), sim.ChiSquare(0.1)], ids=repr)
def test_lbfgs_first_evaluation_replaces_the_zero_test(amb, monkeypatch):
    """On the L-BFGS path the evaluation at the start comes first: where ``F`` there lies
    below ``F(0) = log 2`` the subdifferential test at 0 is not run, and L-BFGS takes that
    evaluation as its first (no point is evaluated twice in a row); where the optimum is
    ``theta_ref`` (a radius past the collapse) the test still runs and certifies it."""
    from simulator.solvers import dual

    tests, points = [], []
    zero_test, evaluate = dual._zero_test, dual.evaluate_inner

    def counted_test(at, a):
        tests.append(a)
        return zero_test(at, a)

    def recorded(at, delta, a, **kw):
        points.append(np.array(delta, dtype=float))
        return evaluate(at, delta, a, **kw)

    monkeypatch.setattr(dual, "_zero_test", counted_test)
    monkeypatch.setattr(dual, "evaluate_inner", recorded)
    data, ref = _problem(seed=2, n=1200, d=_HIGH_D, scale=16.0)  # theta_ref not optimal
    sol = sim.solve(data, amb, beta=BETA, theta_ref=ref)
    assert sol.info["method"] == "lbfgs" and sol.status == "optimal" and not tests
    assert sol.value < math.log(2) and len(points) >= 2
    assert not any(np.array_equal(p, q) for p, q in zip(points, points[1:], strict=False))
    newton = sim.solve(data, amb, beta=BETA, theta_ref=ref, method="newton")
    np.testing.assert_allclose(sol.theta, newton.theta, rtol=0,
                               atol=1e-6 * np.linalg.norm(newton.theta - ref))
    big = type(amb)(50.0)  # radius far past the collapse: theta_ref is the minimiser
    tests.clear()
    zero = sim.solve(data, big, beta=BETA, theta_ref=ref)
    assert tests and zero.info["zero_kink"] and zero.status == "optimal"
    np.testing.assert_array_equal(zero.theta, ref)


def test_method_auto_keeps_newton_at_low_dimension_and_checks_its_argument():
    data, ref = _problem(d=QUASI_NEWTON_MIN_D)
    assert sim.solve(data, sim.KL(0.1), beta=BETA, theta_ref=ref).info["method"] == "newton"
    low = sim.solve(data, sim.KL(0.1), beta=BETA, theta_ref=ref, method="lbfgs")
    assert low.info["method"] == "lbfgs" and low.info["optimality_gap"] <= 1e-9
    # a non-smooth F (finite kappa) keeps its own minimisation whatever the method
    w1k = sim.solve(data, sim.Wasserstein(0.05, p=1, kappa=1.0), beta=BETA, method="lbfgs")
    assert w1k.info["method"] == "newton"
    with pytest.raises(ValueError, match="method must be one of"):
        sim.solve(data, sim.KL(0.1), method="bfgs")


def test_lbfgs_path_on_separable_data_raises():
    """Separable data have no minimiser: L-BFGS must not return a point as optimal."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, _HIGH_D))  # n < d: separable
    data = sim.PreferenceData(x, (rng.uniform(size=60) < 0.5).astype(float))
    for amb in (sim.Nominal(), sim.KL(0.1), sim.ChiSquare(0.1)):
        with pytest.raises(RuntimeError, match="unbounded"):
            sim.solve(data, amb, method="lbfgs")


@pytest.mark.parametrize("amb", [sim.Nominal(), sim.KL(0.1), sim.ChiSquare(0.1),
                                 sim.Wasserstein(0.05, p=1)], ids=repr)
def test_subset_curvature_certificate_is_valid_and_looser(amb, monkeypatch):
    """The certificate from the Hessian of a subset of the atoms (below the full one) bounds
    the gap from above: at least the full-Hessian bound, and still below gap_tol."""
    from simulator.solvers import core

    data, ref = _problem(seed=4, n=1200, d=_HIGH_D)
    monkeypatch.setattr(core, "_CERT_PER_D", 10**9)  # only the _CERT_ATOMS subset
    full = sim.solve(data, amb, beta=BETA, theta_ref=ref)
    monkeypatch.setattr(core, "_CERT_ATOMS", 3 * _HIGH_D)  # every 10th atom: 120 atoms
    sub = sim.solve(data, amb, beta=BETA, theta_ref=ref)
    np.testing.assert_array_equal(sub.theta, full.theta)
    assert full.info["optimality_gap"] <= sub.info["optimality_gap"] <= 1e-13
    if amb.name in ("dpo", "chi2dpo"):  # the curvature term dominates: strictly looser
        assert sub.info["optimality_gap"] > full.info["optimality_gap"]
    # too few atoms for full rank: the full Hessian is used instead
    monkeypatch.setattr(core, "_CERT_ATOMS", _HIGH_D // 4)
    few = sim.solve(data, amb, beta=BETA, theta_ref=ref)
    assert few.info["optimality_gap"] == full.info["optimality_gap"]


def test_subset_certificate_bounds_the_true_gap(monkeypatch):
    """Away from the minimiser (true gap 1e-12 .. 1e-8) the bound from the smallest subset
    (``_CERT_PER_D d`` atoms, accepted whatever its size) is still above the true gap and
    above the full-Hessian bound: the subset's Hessian lies below the full one."""
    from simulator.solvers import core

    data, ref = _problem(seed=5, n=3000, d=_HIGH_D, ref=False)
    a = (2 * data.y - 1)[:, None] * BETA * data.x
    star = sim.solve(data, sim.Nominal(), beta=BETA, method="newton", tol=1e-13).theta
    f = _dpo_fun(data, np.zeros(_HIGH_D))
    rng = np.random.default_rng(0)
    for eps in (1e-6, 1e-5, 1e-4):
        delta = star + eps * rng.normal(size=_HIGH_D)
        true_gap = f(delta)[0] - f(star)[0]
        monkeypatch.setattr(core, "_CERT_SUBSET_OK", math.inf)
        sub = core.logistic_gap(a, data.weights, delta, f(delta)[0])
        monkeypatch.setattr(core, "_CERT_PER_D", 10**9)
        monkeypatch.setattr(core, "_CERT_ATOMS", 10**9)
        full = core.logistic_gap(a, data.weights, delta, f(delta)[0])
        monkeypatch.undo()
        assert true_gap > 0 and math.isfinite(sub)
        assert true_gap <= full * (1 + 1e-6) and full < sub


def _spd(d, lam_min, lam_max, seed):
    """A symmetric matrix with eigenvalues spread from ``lam_min`` to ``lam_max`` (known)."""
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.normal(size=(d, d)))[0]
    lam = np.geomspace(lam_min, lam_max, d)
    h = (q * lam) @ q.T
    return 0.5 * (h + h.T), lam


@pytest.mark.parametrize("d", [5, 64, 300])
def test_shifted_cholesky_proves_the_curvature_floor(d):
    """``_shifted_factor`` succeeds just below the smallest eigenvalue and fails just above
    it (the rounding allowance is far below 1e-6 of it); ``_decrement_bound`` lies between
    ``g^T H^-1 g`` and ``g^T (H - mu I)^-1 g``, the exact value of its bound for the
    shifted solve, plus its rounding allowance (``d eps cond^2``: 2e-8 here at d = 300,
    ``cond(H - mu I) = 2000``)."""
    from simulator.solvers import core

    h, lam = _spd(d, 1e-3, 1.0, d)
    assert core._shifted_factor(h.copy(), lam[0] * (1 + 1e-6), terms=0) is None
    found = core._shifted_factor(h, lam[0] * (1 - 1e-6), terms=0)
    assert found is not None and found[1] == pytest.approx(lam[0] * (1 - 1e-6), rel=1e-15)
    np.testing.assert_array_equal(h, _spd(d, 1e-3, 1.0, d)[0])  # restored after the shift
    g = np.random.default_rng(1).normal(size=d)
    for shift in (lam[0] / 64, lam[0] / 2):
        factor, mu = core._shifted_factor(h, shift, terms=0)
        nu2 = core._decrement_bound(h, factor, g, mu)
        exact = g @ np.linalg.solve(h, g)
        shifted = g @ np.linalg.solve(h - mu * np.eye(d), g)
        assert exact <= nu2 <= shifted * (1 + 1e-6)


def _brute_force_gap(a, w, delta):
    """``f(delta) - min f`` for ``f = sum w softplus(-a . D)``, the minimum by Newton's method
    to machine precision (independent of the certificate's code)."""
    def f(dl):
        m = a @ dl
        return float(w @ np.logaddexp(0.0, -m))

    x = delta.copy()
    for _ in range(100):
        m = a @ x
        s = expit(-m)
        g = -(w * s) @ a
        h = (a * (w * s * (1 - s))[:, None]).T @ a
        step = np.linalg.solve(h, g)
        x = x - step
        if np.abs(step).max() < 1e-15 * (1 + np.abs(x).max()):
            break
    return f(delta) - f(x)


@pytest.mark.parametrize("d", [6, 40])
def test_newton_decrement_bound_is_above_the_true_gap_and_close_to_it(d):
    """``curvature_bound`` with a ``shift`` (the Newton-decrement bound) against a brute-force
    minimisation at points 1e-6 .. 1e-3 off the minimiser: at least the true gap, within 5%
    of it near the minimiser (where the gap is ``g^T H^-1 g / 2`` to first order), and below
    the smallest-eigenvalue bound of the same Hessian; the same from the Hessian of a third
    of the atoms (below the full one), looser but still above the true gap."""
    from simulator.solvers import core

    data, _ = _problem(seed=11 + d, n=1500, d=d, ref=False, scale=3.0)
    a = (2 * data.y - 1)[:, None] * BETA * data.x
    w = data.weights
    star = sim.solve(data, sim.Nominal(), beta=BETA, method="newton", tol=1e-14).theta
    radius = float(np.linalg.norm(a, axis=1).max())
    rng = np.random.default_rng(d)
    for eps in (1e-6, 1e-5, 1e-4, 1e-3):
        delta = star + eps * rng.normal(size=d)
        true_gap = _brute_force_gap(a, w, delta)
        m = a @ delta
        s = expit(-m)
        g = -(w * s) @ a
        c = w * s * (1 - s)
        h = (a * c[:, None]).T @ a
        lam = np.linalg.eigvalsh(h)[0]
        eig = core.curvature_bound(g, h, radius)
        dec = core.curvature_bound(g, h, radius, full_rank=True, shift=lam / 64, terms=w.size)
        assert true_gap > 0 and true_gap <= dec <= eig * (1 + 1e-6)
        if eps <= 1e-5:
            assert dec <= 1.05 * true_gap
        sub = slice(None, None, 3)
        hs = (a[sub] * c[sub, None]).T @ a[sub]
        lam_s = np.linalg.eigvalsh(hs)[0]
        dec_s = core.curvature_bound(g, hs, radius, full_rank=True, shift=lam_s / 64,
                                     terms=hs.shape[0])
        assert true_gap <= dec <= dec_s < math.inf
        # a shift above the smallest eigenvalue: no factor, no bound
        assert core.curvature_bound(g, hs, radius, full_rank=True, shift=2 * lam_s) == math.inf


def test_logistic_gap_takes_the_smallest_subset_that_certifies(monkeypatch):
    """At ``d = 40``, ``n = 4000`` near the minimiser the ``2 d``-atom subset (every 50th
    atom) already certifies the gap below ``_CERT_SUBSET_OK``, and its bound is above the
    brute-force gap; far from it every subset is skipped or too loose and the full Hessian
    decides (the eigenvalue bound, as before)."""
    from simulator.solvers import core

    d = 40
    data, _ = _problem(seed=21, n=4000, d=d, ref=False, scale=3.0)
    a = (2 * data.y - 1)[:, None] * BETA * data.x
    w = data.weights
    star = sim.solve(data, sim.Nominal(), beta=BETA, method="newton", tol=1e-14).theta
    shapes = []
    real = core.curvature_bound

    def spy(grad, hess, radius, full_rank=False, shift=None, terms=0):
        shapes.append(terms if shift is not None else "full")
        return real(grad, hess, radius, full_rank, shift, terms)

    monkeypatch.setattr(core, "curvature_bound", spy)
    rng = np.random.default_rng(0)
    near = star + 1e-8 * rng.normal(size=d)
    f_near = float(w @ np.logaddexp(0.0, -(a @ near)))
    gap = core.logistic_gap(a, w, near, f_near)
    assert shapes == [80] and _brute_force_gap(a, w, near) <= gap <= core._CERT_SUBSET_OK
    shapes.clear()
    far = star + 1e-2 * rng.normal(size=d)
    f_far = float(w @ np.logaddexp(0.0, -(a @ far)))
    gap = core.logistic_gap(a, w, far, f_far)
    assert shapes[-1] == "full" and gap >= _brute_force_gap(a, w, far)


def test_logistic_gap_skips_subsets_without_weight(monkeypatch):
    """A worst case with no weight on the sampled atoms (every ``ceil(n / k)``-th) has a zero
    subset Hessian: the subsets are skipped (no division by its zero trace) and the bound is
    the full Hessian's."""
    from simulator.solvers import core

    rng = np.random.default_rng(0)
    a = rng.normal(size=(1000, 20)) / 5
    q = np.ones(1000)
    for step in (25, 13, 7):  # ceil(n / k) for k = 2 d, 4 d, 8 d (d = 20)
        q[::step] = 0.0
    q /= q.sum()
    best = minimize(lambda x: (float(q @ np.logaddexp(0.0, -(a @ x))),
                               -(q * expit(-(a @ x))) @ a), np.zeros(20), jac=True,
                    method="BFGS", options={"gtol": 1e-12}).x
    delta = best + 1e-4 * rng.normal(size=20)
    upper = float(q @ np.logaddexp(0.0, -(a @ delta)))
    got = core.logistic_gap(a, q, delta, upper)
    monkeypatch.setattr(core, "_CERT_PER_D", 10**9)
    monkeypatch.setattr(core, "_CERT_ATOMS", 10**9)
    assert math.isfinite(got) and got == core.logistic_gap(a, q, delta, upper)


def test_quasi_newton_stops_at_the_first_evaluation_that_meets_the_test():
    """Values at rounding level no longer guide L-BFGS's line search (n = 1e6, d = 64: seven
    evaluations after one met the gradient test, its value 6e-16 above the last). Modelled
    on a quadratic whose value is raised by 1e-9 (above the line search's decrease there)
    wherever ``||grad||_inf <= tol``: ``quasi_newton`` returns the first evaluation that
    meets the test, with no further evaluation (before, scipy rejected it and the run
    stalled or took 300 evaluations)."""
    from simulator.solvers import core

    h, _ = _spd(30, 1e-2, 1.0, 5)
    b = np.random.default_rng(6).normal(size=30)
    tol = 1e-6
    seen = []

    def objective(x, state):
        g = h @ x - b
        seen.append(float(np.abs(g).max()))
        value = 0.5 * float(x @ h @ x) - float(b @ x) + (1e-9 if seen[-1] <= tol else 0.0)
        return core.InnerResult(value, None, g, lambda: h, None, hvp=lambda v: h @ v)

    run = core.quasi_newton(objective, np.zeros(30), tol, 100, "a quadratic")
    assert np.abs(h @ run.delta - b).max() <= tol
    assert len(seen) == next(i for i, g in enumerate(seen) if g <= tol) + 1


@pytest.mark.parametrize("amb", [sim.Nominal(), sim.KL(0.1), sim.ChiSquare(0.1)], ids=repr)
def test_lbfgs_takes_two_products_per_iteration(amb, monkeypatch):
    """The reweighting sets' L-BFGS searches its lines in margin space: one product ``A p``
    per direction and one ``A^T (q s)`` per accepted point, none per trial point (before,
    each of scipy's line-search trials cost both: DPO at n = 1e4, d = 512 took 36 products
    in L-BFGS for 14 iterations). Counted inside :func:`quasi_newton`, with the start's
    evaluation (2 products, computed there for DPO, handed to it for the others)."""
    from simulator.solvers import core, dual

    calls, inside = [0], [False]
    matvec, rmatvec, quasi = core.Atoms.matvec, core.Atoms.rmatvec, dual.quasi_newton

    def counted(f):
        def product(self, *v):
            calls[0] += inside[0]
            return f(self, *v)
        return product

    def watched(*args, **kw):
        inside[0] = True
        try:
            return quasi(*args, **kw)
        finally:
            inside[0] = False

    monkeypatch.setattr(core.Atoms, "matvec", counted(matvec))
    monkeypatch.setattr(core.Atoms, "rmatvec", counted(rmatvec))
    monkeypatch.setattr(dual, "quasi_newton", watched)
    monkeypatch.setattr(core, "_MARGIN_MIN_BYTES", 0)  # the margin search at this small size
    data, ref = _problem(seed=11, n=3000, d=_HIGH_D + 24, scale=8.0)
    sol = sim.solve(data, amb, beta=BETA, theta_ref=ref)
    assert sol.info["method"] == "lbfgs" and sol.info["optimality_gap"] <= 1e-9
    assert sol.iterations >= 5 and calls[0] <= 2 * sol.iterations + 2


@pytest.mark.parametrize("amb", [sim.Nominal(), sim.KL(0.1), sim.KL(2.0), sim.ChiSquare(0.1),
                                 sim.ChiSquare(1.5)], ids=repr)
def test_margin_line_search_matches_the_full_evaluation(amb):
    """The line search's point ``delta + t p``, evaluated from the margins ``m + t u`` alone,
    has the value and the slope ``grad F . p`` of :func:`evaluate_inner` there (to rounding),
    and meets the strong Wolfe conditions it promises."""
    from simulator.solvers import core
    from simulator.solvers.inner import evaluate_inner, prepare
    from simulator.solvers.registry import methods

    data, ref = _problem(seed=12, n=800, d=_HIGH_D, weights=True, scale=8.0)
    at = prepare(data, amb, BETA, ref, normalise=True).atoms
    mod = methods(amb)
    delta = np.random.default_rng(3).normal(size=_HIGH_D)
    cur = evaluate_inner(at, delta, amb, hess=True, worst=False)
    p = -cur.grad
    gp = float(cur.grad @ p)
    pt = core._ray_search(lambda m, l, st: mod.reweight(at, m, l, amb, st), cur,
                          at.matvec(p), gp, 1.0, math.inf, "test")
    assert pt is not None and pt.t > 0
    full = evaluate_inner(at, delta + pt.t * p, amb, hess=False, worst=False)
    assert abs(pt.rw.value - full.value) <= 1e-14 * max(1.0, abs(full.value))
    slope = float(full.grad @ p)
    assert abs(pt.slope - slope) <= 1e-12 * abs(gp)
    assert abs(slope) <= core._WOLFE * abs(gp) * (1 + 1e-9)
    assert full.value <= cur.value + core._ARMIJO * pt.t * gp + 1e-15


def test_cg_stops_once_the_residual_meets_newtons_tolerance():
    """``cg_solve`` with ``tol`` stops as soon as ``||H s - g||_inf <= _CG_ATOL tol`` (the
    next gradient to first order), in fewer products than the relative test alone."""
    from simulator.solvers import core

    h, _ = _spd(60, 1e-2, 1.0, 3)
    g = np.random.default_rng(4).normal(size=60)
    counts = []
    for tol in (0.0, 1e-3 * np.abs(g).max()):
        n = [0]

        def hvp(v, n=n):
            n[0] += 1
            return h @ v

        s = core.cg_solve(hvp, g, tol)
        counts.append(n[0])
        res = np.abs(h @ s - g).max()
        if tol:
            assert res <= core._CG_ATOL * tol
        else:
            assert np.linalg.norm(h @ s - g) <= core._CG_TOL * np.linalg.norm(g)
    assert counts[1] < counts[0]


def test_hessian_vector_products_match_the_dense_hessians():
    """``logistic_hvp``, the W1 evaluation's ``hvp`` and the forward differences of KL and
    chi-square against the dense Hessians; ``cg_solve`` solves to its relative residual."""
    from simulator.solvers import core
    from simulator.solvers.inner import evaluate_inner, prepare

    data, ref = _problem(seed=6, n=500, d=_HIGH_D)
    rng = np.random.default_rng(1)
    delta, v = rng.normal(size=_HIGH_D), rng.normal(size=_HIGH_D)
    for amb in (sim.Nominal(), sim.Wasserstein(0.05, p=1), sim.Wasserstein(0.05, p=1, kappa=1.0)):
        at = prepare(data, amb, BETA, ref, normalise=True).atoms
        res = evaluate_inner(at, delta, amb, hess=True, worst=False)
        h = res.hess()
        hv = res.hvp if res.hvp is not None else core.logistic_hvp(
            at, at.w * expit(at.a @ delta) * expit(-(at.a @ delta)))
        np.testing.assert_allclose(hv(v), h @ v, rtol=1e-12, atol=1e-14 * np.abs(h).max())
        s = core.cg_solve(hv, res.grad)
        assert np.linalg.norm(h @ s - res.grad) <= core._CG_TOL * np.linalg.norm(res.grad)
    for amb in (sim.KL(0.1), sim.ChiSquare(0.1)):  # no hvp: forward differences
        at = prepare(data, amb, BETA, ref, normalise=True).atoms

        def objective(d, st, at=at, amb=amb):
            return evaluate_inner(at, d, amb, hess=True, worst=False, state=st)

        res = objective(delta, None)
        hv = core._difference_hvp(objective, delta, res)(v)
        hd = res.hess() @ v
        assert np.linalg.norm(hv - hd) <= 1e-6 * np.linalg.norm(hd)


@pytest.mark.parametrize("amb", [sim.Nominal(), sim.KL(0.1), sim.ChiSquare(0.1),
                                 sim.Wasserstein(0.01, p=1)], ids=repr)
def test_polish_after_a_short_lbfgs_run(amb, monkeypatch):
    """L-BFGS stopped after 3 iterations: the polish (conjugate gradients on ``hvp`` for W1,
    on forward differences of the gradient otherwise) reaches the same certified minimiser
    as Newton."""
    from simulator.solvers import core

    data, ref = _problem(seed=7, n=1500, d=_HIGH_D, scale=8.0)
    newton = sim.solve(data, amb, beta=BETA, theta_ref=ref, method="newton")
    monkeypatch.setattr(core, "_QN_ITERS", 3)
    monkeypatch.setattr(core, "_MARGIN_MIN_BYTES", 0)  # the reweighting sets' margin search
    short = sim.solve(data, amb, beta=BETA, theta_ref=ref, method="lbfgs")
    assert not short.info["zero_kink"] and short.info["optimality_gap"] <= 1e-9
    assert short.iterations > 3
    np.testing.assert_allclose(short.theta, newton.theta, rtol=0,
                               atol=1e-6 * np.linalg.norm(newton.theta - ref))
    assert abs(short.value - newton.value) <= 1e-12


@pytest.mark.parametrize("margin", [False, True], ids=["scipy", "margin"])
@pytest.mark.parametrize("amb", _SMOOTH_SETS, ids=repr)
@pytest.mark.parametrize("d", [40, 100])
def test_lbfgs_and_newton_agree_at_high_dimension(amb, d, margin, monkeypatch):
    """Randomised problems at d = 40 and 100 (d = 100 above n / 20): both paths to
    ``tol = 1e-12`` give theta within 1e-8 (relative) and values to rounding; L-BFGS with
    scipy's line search and (the reweighting sets) with the margin-space one."""
    from simulator.solvers import core

    if margin:
        monkeypatch.setattr(core, "_MARGIN_MIN_BYTES", 0)
    data, ref = _problem(seed=d, n=2500, d=d, weights=True)
    newton = sim.solve(data, amb, beta=BETA, theta_ref=ref, method="newton", tol=1e-12)
    lbfgs = sim.solve(data, amb, beta=BETA, theta_ref=ref, method="lbfgs", tol=1e-12)
    assert lbfgs.info["method"] == "lbfgs" and lbfgs.info["optimality_gap"] <= 1e-9
    np.testing.assert_allclose(lbfgs.theta, newton.theta, rtol=0,
                               atol=1e-8 * np.linalg.norm(newton.theta - ref))
    assert abs(lbfgs.value - newton.value) <= 1e-14 * max(1.0, abs(newton.value))


def test_merge_probe_decides_like_the_count_of_distinct_atoms():
    """``_worth_merging`` against the count of distinct ``(x, y)`` among the probed rows
    (``_MERGE_PROBE`` evenly spaced ones): continuous features (the first-feature shortcut),
    a finite world's repeats, and rows that repeat their first feature but differ in the
    others (the shortcut must not decide those)."""
    from simulator.solvers import dual

    rng = np.random.default_rng(0)
    k, n = dual._MERGE_PROBE, 3 * dual._MERGE_PROBE

    def distinct(data):
        rows = np.linspace(0, data.n - 1, k).astype(int)
        return np.unique(np.column_stack([data.x[rows], data.y[rows]]), axis=0).shape[0]

    cont = sim.PreferenceData(rng.normal(size=(n, 3)), rng.random(n) < 0.5)
    world = rng.normal(size=(500, 3))
    pick = rng.integers(0, 500, n)
    finite = sim.PreferenceData(world[pick], rng.random(n) < 0.5)
    col = rng.normal(size=(n, 3))
    col[:, 0] = np.round(col[:, 0])  # few distinct first features, every row distinct
    cases = [cont, finite, sim.PreferenceData(col, rng.random(n) < 0.5)]
    for data in cases:
        assert dual._worth_merging(data) == (2 * distinct(data) <= k)
    assert [dual._worth_merging(c) for c in cases] == [False, True, False]


@pytest.mark.parametrize("atoms, merge", [(5_000, True), (60_000, False)])
def test_merge_probe_birthday_estimate(atoms, merge):
    """Few repeats among the probed rows (most of them distinct) still merge when they show
    that the distinct atoms are few against ``n``: n = 2e5 draws of 5,000 equally likely
    atoms (about 1,600 repeats in the probe: an estimate of about 5,000 <= n / 16) merge;
    of 60,000 atoms (about 140 repeats: about 60,000 > n / 16) they do not, and the merged
    data have the number of distinct atoms a set count gives."""
    from simulator.solvers import dual

    rng = np.random.default_rng(1)
    n = 200_000
    world = rng.normal(size=(atoms, 4))
    pick = rng.integers(0, atoms, n)
    data = sim.PreferenceData(world[pick], pick % 2)
    probe = np.linspace(0, n - 1, dual._MERGE_PROBE).astype(int)
    assert np.unique(pick[probe]).size > dual._MERGE_PROBE // 2  # the old rule: no merge
    assert dual._worth_merging(data) is merge
    merged, inverse = data.merged()
    assert merged.n == np.unique(pick).size
    np.testing.assert_array_equal(merged.x[inverse], data.x)


def test_quasi_start_is_the_newton_step_along_the_mean():
    """L-BFGS's start on at most ``_START_ATOMS`` atoms (all of them used) against the closed
    form, the minimiser of ``E_P l``'s quadratic model at 0 along ``v = E_P a``, ``2 ||v||^2
    v / E_P (a . v)^2``; on more atoms (a strided subset) within 15% of it."""
    from simulator.solvers import dual
    from simulator.solvers.core import Atoms

    for n in (dual._START_ATOMS, 20 * dual._START_ATOMS):
        data, _ = _problem(seed=3, n=n, d=5, weights=True)
        at = Atoms.from_data(data, BETA, normalise=True)
        a, w = at.a, at.w
        v = w @ a
        rel = 1e-12 if n == dual._START_ATOMS else 0.15
        want = 2 * (v @ v) / (w @ (a @ v) ** 2) * v
        np.testing.assert_allclose(dual._start(at, quasi=True), want, rtol=rel)


@pytest.mark.parametrize("amb", [sim.KL(0.1), sim.Nominal(), sim.Wasserstein(0.05, p=1)],
                         ids=["kldpo", "dpo", "wdpo1"])
def test_subsample_model_saves_a_full_product_at_the_same_minimiser(monkeypatch, amb):
    """KL, DPO and W1 with ``kappa = inf`` (Newton on a smooth ``F``) correct their full-data
    steps by the subsample's problem: at n = 260,000 (a subsample of 12,500 = 1/20.8 of the
    atoms) the same certified optimum in fewer products with all the atoms than the
    uncorrected run."""
    from simulator.solvers import core, registry

    rng = np.random.default_rng(11)
    n = 260_000
    x = rng.normal(size=(n, 4))
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-x @ np.array([1.5, -1.0, 0.5, 0.8])))).astype(
        float)
    data = sim.PreferenceData(x, y)
    products = []
    matvec = core.Atoms.matvec

    def counted(self, v):
        if self.w.size == n:
            products.append(1)
        return matvec(self, v)

    monkeypatch.setattr(core.Atoms, "matvec", counted)
    shipped = sim.solve(data, amb)  # the set as the registry holds it: with the model
    n_shipped = len(products)
    runs = {}
    for model in (True, False):
        methods = copy.copy(registry.SETS[amb.name])
        object.__setattr__(methods, "subsample_model", model)
        monkeypatch.setitem(registry.SETS, amb.name, methods)
        products.clear()
        sol = sim.solve(data, amb)
        runs[model] = (sol, len(products))
    (with_model, n_model), (without, n_plain) = runs[True], runs[False]
    assert n_model < n_plain
    assert n_shipped == n_model
    np.testing.assert_array_equal(shipped.theta, with_model.theta)
    np.testing.assert_allclose(with_model.theta, without.theta, rtol=0, atol=1e-8)
    assert with_model.info["optimality_gap"] <= 1e-12
    assert with_model.value == pytest.approx(without.value, rel=1e-13)


def test_ray_minimiser_is_the_minimiser_of_the_quadratic():
    """Against the closed form ``-b / (2 a)`` of ``c + b t + a t^2`` (convex), and the
    halving where the quadratic through the three data is not convex."""
    from simulator.solvers.dual import _ray_minimiser

    rng = np.random.default_rng(5)
    for _ in range(200):
        a, b, c = 10.0 ** rng.uniform(-3, 2), rng.normal() * 3, rng.normal()
        got = _ray_minimiser(c, c + b + a, b + 2 * a)
        assert got == pytest.approx(-b / (2 * a), rel=1e-9, abs=1e-12)
    assert _ray_minimiser(0.0, -1.0, -2.0) == 0.5  # concave: a = -1


@pytest.mark.parametrize("amb", [sim.KL(0.1), sim.KL(2.0), sim.ChiSquare(0.1),
                                 sim.Wasserstein(0.05, p=1), sim.Wasserstein(0.05, p=2)],
                         ids=["kldpo", "kldpo-collapsed", "chi2dpo", "wdpo1", "wdpo2"])
def test_shrunk_start_lowers_F_and_stops_only_where_it_may(amb):
    """The shrunk start's trial points lie on the ray of the first step, each a factor ``t``
    of the last accepted one with ``t`` the quadratic model's minimiser (at least a sixteenth,
    below 0.75); each accepted point lowers ``F``, the shrinkage stays within ``2^-8``, and
    each stop has its reason, checked by independent evaluations: a rejected trial did not
    lower ``F``; ``g . delta <= 0`` (``F(t delta) >= F(delta)`` for ``t`` of 0.5 and 0.9, the
    convexity bound); the model's minimiser above 0.75; or the floor ``2^-8``."""
    from simulator.solvers import dual
    from simulator.solvers.core import Atoms
    from simulator.solvers.inner import evaluate_inner

    stops = []
    for seed in range(6):
        data, _ = _problem(seed=seed, n=400, d=4, scale=0.5 + seed)
        at = Atoms.from_data(data, BETA, normalise=True)
        objective = dual._objective(at, amb)
        calls = []

        def counted(d, st, calls=calls, objective=objective):
            calls.append((d.copy(), objective(d, st)))
            return calls[-1][1]

        def f(d, at=at):
            return evaluate_inner(at, d, amb, worst=False).value

        delta0 = dual._start(at)
        delta, start = dual._shrunk_start(counted, delta0)
        cur, shrink = calls[0][1], 1.0
        kept = calls[0][0]
        for point, res in calls[1:]:
            t = float(point @ kept) / float(kept @ kept)
            np.testing.assert_allclose(point, t * kept, rtol=0, atol=1e-15 * np.abs(kept).max())
            model = dual._ray_minimiser(math.log(2.0), cur.value, float(cur.grad @ kept))
            assert t == pytest.approx(max(model, 1 / 16, 2.0**-8 / shrink), rel=1e-12)
            assert t < 0.75
            if res.value < cur.value:
                kept, cur, shrink = point, res, shrink * t
                assert f(point) < f(calls[0][0]) or shrink == 1
        assert np.array_equal(delta, kept) and start[0] is cur
        assert shrink >= 2.0**-8 * (1 - 1e-12)
        slope = float(cur.grad @ delta)
        if not np.array_equal(calls[-1][0], kept):
            stops.append("rejected")
            assert f(calls[-1][0]) >= f(delta) * (1 - 1e-15)
        elif not slope > 0:
            stops.append("gradient")
            assert min(f(0.5 * delta), f(0.9 * delta)) >= f(delta) * (1 - 1e-15)
        elif shrink <= 2.0**-8 * (1 + 1e-12) or 2.0**-8 / shrink >= 0.75:
            stops.append("floor")
        else:
            stops.append("model")
            assert dual._ray_minimiser(math.log(2.0), cur.value, slope) >= 0.75
    if amb.rho == 2.0:  # the minimiser is theta_ref: the floor in 3 evaluations (9 halvings)
        assert set(stops) == {"floor"} and len(calls) <= 4
    else:
        assert len(set(stops)) >= 2


@pytest.mark.parametrize("kappa", [math.inf, 0.5])
def test_worst_case_reuses_the_margins_of_newtons_last_evaluation(monkeypatch, kappa):
    """``evaluate_inner`` given the margins and losses of an earlier evaluation at the same
    ``delta`` returns bit for bit what it computes without them; the W1 solve with ``kappa =
    inf`` then builds its worst case without a product with the atoms (one product fewer than
    evaluations), and for every kappa the solution is the same as from the fresh evaluation."""
    from simulator.solvers import core, dual
    from simulator.solvers.core import Atoms
    from simulator.solvers.inner import evaluate_inner

    data, _ = _problem(seed=4, n=300, d=3)
    amb = sim.Wasserstein(0.05, p=1, kappa=kappa)
    at = Atoms.from_data(data, BETA, normalise=True)
    delta = np.array([0.7, -0.4, 1.1])
    fresh = evaluate_inner(at, delta, amb, worst=True)
    m = at.matvec(delta)
    again = evaluate_inner(at, delta, amb, worst=True, margins=m, losses=sim.dpo_loss(m))
    assert again.value == fresh.value and again.dual == fresh.dual
    np.testing.assert_array_equal(again.grad, fresh.grad)
    np.testing.assert_array_equal(again.worst_case.weights, fresh.worst_case.weights)
    np.testing.assert_array_equal(again.worst_case.x, fresh.worst_case.x)

    products, evaluations = [], []
    matvec, inner = core.Atoms.matvec, dual.evaluate_inner
    monkeypatch.setattr(core.Atoms, "matvec", lambda self, v: products.append(1)
                        or matvec(self, v))
    monkeypatch.setattr(dual, "evaluate_inner", lambda *a, **k: evaluations.append(
        k.get("margins") is None) or inner(*a, **k))
    sol = sim.solve(data, amb, beta=BETA)
    if math.isinf(kappa):
        assert evaluations and not evaluations[-1]  # the worst case: margins reused
    ref = sim.robust_objective(sol.theta, data, amb, beta=BETA)
    assert sol.value == pytest.approx(ref.value, rel=1e-14)
    assert sol.primal_value == pytest.approx(ref.primal_value, rel=1e-12)
    assert sol.info["optimality_gap"] <= 1e-10
