"""sim.asymptotic_covariance: closed forms, finite differences, Monte Carlo (SPEC 5.1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import chi2

import simulator as sim
from simulator.asymptotics import Asymptotics, w2_maximiser
from simulator.losses import sigmoid, softplus

SETS = [sim.Nominal(), sim.KL(0.05), sim.ChiSquare(0.05), sim.Wasserstein(0.05, p=1),
        sim.Wasserstein(0.05, p=1, kappa=1.5), sim.Wasserstein(0.05, p=2)]


@pytest.fixture(scope="module")
def small():
    """3 states, 3 actions, d = 2: 36 atoms."""
    return sim.FiniteEnv.random(3, 3, 2, beta=1.0, seed=1, theta_norm=1.5)


def test_dpo_realizable_is_inverse_fisher(small):
    beta = 1.7
    env = sim.FiniteEnv.random(5, 4, 3, beta=beta, seed=3, theta_norm=1.2)
    pop = env.population()
    a = sim.asymptotic_covariance(pop, sim.Nominal(), beta=beta)
    assert a.regular and a.reason == ""
    np.testing.assert_allclose(a.theta_star, env.theta_true, atol=1e-8)
    p = sigmoid(beta * pop.x @ env.theta_true)  # P(y = 1 | x) under the realizable model
    fisher = beta**2 * (pop.x * (pop.weights * p * (1 - p))[:, None]).T @ pop.x
    np.testing.assert_allclose(a.cov, np.linalg.inv(fisher), rtol=1e-7)


@pytest.mark.parametrize("amb", SETS, ids=repr)
def test_influence_function_matches_finite_differences(small, amb):
    """IF(z) = d/d eps xi*((1 - eps) P + eps delta_z), by central differences of the solver."""
    pop = small.population()
    a = sim.asymptotic_covariance(pop, amb)
    assert a.regular, a.reason
    k = a.influence.shape[1]
    eps = 1e-4
    for i in (0, 5, 17, 30):
        xi = []
        for e in (eps, -eps):
            w = (1 - e) * pop.weights
            w[i] += e
            s = sim.solve(sim.PreferenceData(pop.x, pop.y, w), amb)
            xi.append(np.r_[s.theta, [s.dual] if k > pop.d else []])
        fd = (xi[0] - xi[1]) / (2 * eps)
        np.testing.assert_allclose(a.influence[i], fd, rtol=1e-5,
                                   atol=1e-5 * np.abs(fd).max())
    # the influence function has mean zero and its covariance is the sandwich
    np.testing.assert_allclose(pop.weights @ a.influence, 0.0, atol=1e-10)
    cov = (a.influence * pop.weights[:, None]).T @ a.influence
    np.testing.assert_allclose(cov, a.joint_cov, rtol=1e-10, atol=1e-12)


def test_monte_carlo_covariance_and_wald_coverage(small):
    """1000 seeds at n = 20000: empirical covariance within 10% (relative Frobenius; the
    sampling standard deviation of that distance is about 5% here) and 95% ellipsoids
    covering theta* in 93-97% of the seeds, for every regular set."""
    n, seeds = 20000, 1000
    pop = small.population()
    for amb in SETS[:4] + SETS[5:]:
        a = sim.asymptotic_covariance(pop, amb)
        z, cover = [], []
        for seed in range(seeds):
            data = small.sample(n, np.random.default_rng([seed, n]), merged=True)
            th = sim.solve(data, amb).theta
            z.append(math.sqrt(n) * (th - a.theta_star))
            cover.append(a.in_ellipsoid(th, n))
        z = np.array(z)
        emp = z.T @ z / seeds
        assert np.linalg.norm(emp - a.cov) / np.linalg.norm(a.cov) < 0.10, amb
        assert 0.93 <= np.mean(cover) <= 0.97, amb


def test_non_regular_cases_are_named(small):
    pop = small.population()
    rho0 = sim.collapse_radius(pop, sim.Wasserstein(1.0, p=1))
    a = sim.asymptotic_covariance(pop, sim.Wasserstein(1.5 * rho0, p=1))
    assert not a.regular and "theta_ref" in a.reason and np.isnan(a.cov).all()
    assert math.isnan(a.error_quantile(0.5, n=100))
    assert not a.in_ellipsoid(a.theta_star, 100)
    off = sim.asymptotic_covariance(pop, sim.Wasserstein(0.05, p=1, kappa=0.8))
    assert not off.regular and "quantile" in off.reason


@pytest.mark.parametrize("amb", [sim.KL(1.0), sim.ChiSquare(1.0), sim.Wasserstein(1.0, p=1),
                                 sim.Wasserstein(1.0, p=2),
                                 sim.Wasserstein(1.0, p=1, kappa=1.0)], ids=repr)
def test_collapse_radius_separates_theta_ref(amb):
    """theta* != theta_ref just below rho_0, theta* = theta_ref just above (cvxpy where it
    applies, the dual solver for W2)."""
    env = sim.FiniteEnv.random(4, 3, 2, beta=1.0, seed=5, theta_norm=1.0)
    pop = env.population()
    rho0 = sim.collapse_radius(pop, amb)
    assert 0 < rho0 < math.inf
    solver = "dual" if amb.name == "wdpo2" else "cvxpy"
    for ratio, inside in ((0.9, False), (1.1, True)):
        kw = {"kappa": amb.kappa, "p": amb.p} if amb.name.startswith("wdpo") else {}
        s = sim.solve(pop, type(amb)(ratio * rho0, **kw), solver=solver)
        assert bool(np.linalg.norm(s.theta) < 1e-5) is inside, (ratio, s.theta)


def test_error_quantiles_are_chi_square_for_isotropic_covariance(small):
    pop = small.population()
    sig = pop.coverage()
    c = 0.7
    base = sim.asymptotic_covariance(pop, sim.Nominal())
    a = Asymptotics(base.ambiguity, 1.0, base.theta_star, None, c * np.eye(2), c * np.eye(2),
                    base.hessian, base.score_cov, base.influence, True, "", sig, 0.0)
    q = np.array([0.1, 0.5, 0.95])
    np.testing.assert_allclose(a.error_quantile(q, n=400), np.sqrt(c * chi2.ppf(q, 2) / 400),
                               rtol=5e-3)
    b = Asymptotics(base.ambiguity, 1.0, base.theta_star, None, c * np.linalg.inv(sig),
                    c * np.linalg.inv(sig), base.hessian, base.score_cov, base.influence, True,
                    "", sig, 0.0)
    np.testing.assert_allclose(b.error_quantile(q, norm="sigma"), np.sqrt(c * chi2.ppf(q, 2)),
                               rtol=5e-3)
    with pytest.raises(ValueError, match="norm"):
        a.error_quantile(0.5, norm="linf")


def test_w2_maximiser_is_global_in_the_non_concave_regime():
    rng = np.random.default_rng(0)
    m = rng.normal(0, 3, 300)
    for b, lam in ((4.0, 0.5), (1.0, 2.0), (6.0, 0.3)):
        t, _ = w2_maximiser(m, b, lam)
        grid = np.linspace(0, b / (2 * lam), 40001)
        brute = (softplus(b * grid[None, :] - m[:, None]) - lam * grid[None, :] ** 2).max(axis=1)
        got = softplus(b * t - m) - lam * t**2
        assert np.all(got >= brute - 1e-12)


@pytest.mark.parametrize("amb", [sim.KL(1.0), sim.ChiSquare(1.0), sim.Wasserstein(1.0, p=1),
                                 sim.Wasserstein(1.0, p=2),
                                 sim.Wasserstein(1.0, p=1, kappa=1.0)], ids=repr)
def test_collapse_influence_matches_finite_differences(amb):
    env = sim.FiniteEnv.random(4, 3, 2, beta=1.0, seed=5, theta_norm=1.0)
    pop = env.population()
    rho0, infl = sim.collapse_influence(pop, amb)
    assert rho0 == pytest.approx(sim.collapse_radius(pop, amb), rel=1e-9)
    assert abs(pop.weights @ infl) < 1e-9
    eps = 1e-5
    for i in (0, 5, 11):
        vals = []
        for e in (eps, -eps):
            w = (1 - e) * pop.weights
            w[i] += e
            vals.append(sim.collapse_radius(sim.PreferenceData(pop.x, pop.y, w), amb))
        assert (vals[0] - vals[1]) / (2 * eps) == pytest.approx(infl[i], rel=1e-5, abs=1e-7)


def test_collapse_probability_matches_the_law_of_the_sample_collapse_radius():
    """theta_hat = theta_ref iff rho_0(P_n) <= rho: the share of 2000 multinomial samples with
    rho_0(P_n) <= rho (closed form for W1, no solver) against Phi(sqrt(n)(rho - rho_0)/sd)."""
    env = sim.FiniteEnv.random(7, 4, 3, beta=1.0, seed=99, theta_norm=2.5)
    pop = env.population()
    base = sim.Wasserstein(1.0, p=1)
    rho0 = sim.collapse_radius(pop, base)
    n = 10_000
    draws = np.array([sim.collapse_radius(env.sample(n, seed, merged=True), base)
                      for seed in range(2000)])
    for ratio in (0.97, 0.99, 1.0, 1.02):
        amb = sim.Wasserstein(ratio * rho0, p=1)
        pred = sim.collapse_probability(pop, amb, n)
        assert np.mean(draws <= amb.rho) == pytest.approx(pred, abs=0.035)  # 3 binomial sd
