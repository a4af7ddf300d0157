"""simulator.theory: constants against hand calculations, bounds against simulations."""

from __future__ import annotations

import math

import numpy as np
import pytest

import simulator as sim
from simulator import theory


def test_constants_match_hand_calculation():
    # beta = 1, B = 0.5: 4 beta B = 2
    assert theory.margin_bound(1.0, 0.5) == pytest.approx(2.0)
    assert theory.loss_bound(1.0, 0.5) == pytest.approx(math.log(1 + math.e**2), rel=1e-14)
    e2 = math.e**2
    assert theory.strong_convexity(1.0, 0.5, 0.3) == pytest.approx(0.3 * e2 / (1 + e2) ** 2,
                                                                   rel=1e-13)
    # beta = 2, B = 0.25, x_max = 1: M = 2 beta B x_max = 1
    assert theory.loss_bound(2.0, 0.25, x_max=1.0) == pytest.approx(math.log(1 + math.e))
    assert theory.strong_convexity(2.0, 0.25, 1.0, x_max=1.0) == pytest.approx(
        4 * math.e / (1 + math.e) ** 2)
    assert theory.rademacher_bound(2.0, 3.0, 100) == pytest.approx(2 * 3 * 2 / 10)


def test_constants_are_stable_for_huge_margins():
    L = theory.loss_bound(10.0, 100.0)  # 4 beta B = 4000: exp would overflow
    assert L == pytest.approx(4000.0)
    g = theory.strong_convexity(10.0, 100.0, 1.0)
    assert g >= 0 and math.isfinite(g)
    assert theory.strong_convexity(1.0, 0.0, 0.5) == pytest.approx(0.5 / 4)


def test_growth_constant_equals_direct_formula():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 3)) * 0.5
    w = rng.random(50)
    w[:5] = 0.0
    w /= w.sum()
    cov = (x[5:] * w[5:, None]).T @ x[5:]
    m = 2 * 1.5 * 0.7 * np.linalg.norm(x[5:], axis=1).max()
    want = 1.5**2 * np.linalg.eigvalsh(cov)[0] * math.exp(m) / (1 + math.exp(m)) ** 2
    assert theory.growth_constant(x, w, 1.5, 0.7) == pytest.approx(want, rel=1e-12)


def test_slow_rate_nominal_closed_form_and_scaling():
    beta, B, gamma, n, delta = 1.0, 1.0, 0.02, 400, 0.1
    L = math.log1p(math.exp(4.0))
    eps = 2 * (2 * beta * B / math.sqrt(n)) + L * math.sqrt(math.log(2 / delta) / (2 * n))
    b = theory.slow_rate(sim.Nominal(), n, delta, beta, B, gamma)
    assert b.deviation == pytest.approx(eps)
    assert b.excess_risk == pytest.approx(2 * eps)
    assert b.error == pytest.approx(2 * math.sqrt(eps / gamma))
    # Wasserstein p = 1 (kappa = inf) has the same deviation (deterministic penalty)
    w1 = theory.slow_rate(sim.Wasserstein(0.1, p=1), n, delta, beta, B, gamma)
    assert w1.deviation == pytest.approx(eps)
    # n^{-1/4} for the error
    big = theory.slow_rate(sim.Nominal(), 16 * n, delta, beta, B, gamma)
    assert big.error / b.error == pytest.approx(0.5, rel=1e-12)


def test_slow_rate_kl_and_w2_constants():
    beta, B, gamma, n, delta, rho = 1.0, 0.5, 0.05, 10_000, 0.1, 0.05
    L = theory.loss_bound(beta, B)
    lo = 0.4
    K = math.ceil(math.sqrt(n)) + 1
    R = 2 * beta * B / math.sqrt(n)
    e = math.exp(L / lo)
    want = (2 * e * R + lo * math.expm1(L / lo) * math.sqrt(math.log(2 * K / delta) / (2 * n))
            + e * max(1, L / lo) * (L / rho - lo) / (K - 1))
    kl = theory.slow_rate(sim.KL(rho), n, delta, beta, B, gamma, dual_lo=lo)
    assert kl.deviation == pytest.approx(want)
    # the KL constant grows like exp(L_max / lambda_lo)
    assert theory.slow_rate(sim.KL(rho), n, delta, beta, B, gamma, dual_lo=lo / 2).deviation \
        > e * kl.deviation / 2
    nu = (2 * beta * B) ** 2 / lo
    w2 = theory.slow_rate(sim.Wasserstein(rho, p=2), n, delta, beta, B, gamma, dual_lo=lo)
    want2 = 2 * R + (L + nu / 4) * math.sqrt(math.log(2 * K / delta) / (2 * n)) \
        + nu / 4 / (K - 1)
    assert w2.deviation == pytest.approx(want2)
    w = L + L / (2 * math.sqrt(rho))
    dev = 4 * w * R + w**2 * math.sqrt(math.log(2 * K / delta) / (2 * n)) + 2 * w * w / (K - 1)
    chi = theory.slow_rate(sim.ChiSquare(rho), n, delta, beta, B, gamma)
    assert chi.deviation == pytest.approx(math.sqrt(1 + rho) * math.sqrt(dev))


def test_slow_rate_rejects_bad_input():
    with pytest.raises(ValueError, match="dual_lo"):
        theory.slow_rate(sim.KL(0.1), 100, 0.1, 1.0, 1.0, 0.1)
    with pytest.raises(ValueError, match="delta"):
        theory.slow_rate(sim.Nominal(), 100, 1.5, 1.0, 1.0, 0.1)
    with pytest.raises(ValueError, match="n must"):
        theory.slow_rate(sim.Nominal(), 0, 0.1, 1.0, 1.0, 0.1)
    with pytest.raises(ValueError, match="kappa|no slow-rate"):
        theory.slow_rate(sim.Wasserstein(0.1, p=1, kappa=1.0), 100, 0.1, 1.0, 1.0, 0.1)
    with pytest.raises(ValueError, match="gamma"):
        theory.slow_rate(sim.Nominal(), 100, 0.1, 1.0, 1.0, float("nan"))
    assert theory.fast_rate(0.3, 0.0) == math.inf
    assert theory.fast_rate(0.3, 0.2) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="grad_norm"):
        theory.fast_rate(-1.0, 0.2)


METHODS = [sim.Nominal(), sim.KL(0.03), sim.ChiSquare(0.03), sim.Wasserstein(0.03, p=1),
           sim.Wasserstein(0.03, p=2)]


@pytest.fixture(scope="module")
def world():
    env = sim.FiniteEnv.random(8, 4, 3, beta=1.0, seed=3, theta_norm=2.0)
    return env, env.population()


@pytest.mark.parametrize("amb", METHODS, ids=lambda a: a.name)
def test_growth_of_robust_objective_around_optimum(world, amb):
    """L_U(theta) - L_U(theta*) >= gamma/2 ||theta - theta*||^2 on the ball (docs/theory.md)."""
    env, pop = world
    star = sim.solve(pop, amb, beta=env.beta)
    rng = np.random.default_rng(1)
    thetas = star.theta + rng.standard_normal((12, env.dim)) * rng.uniform(0.05, 1.5, (12, 1))
    B = max(np.linalg.norm(thetas, axis=1).max(), np.linalg.norm(star.theta))
    gamma = theory.robust_growth(amb, pop, star.worst_case, env.beta, B)
    assert gamma > 0
    for th in thetas:
        gain = sim.robust_objective(th, pop, amb, beta=env.beta).value - star.value
        assert gain >= gamma / 2 * np.sum((th - star.theta) ** 2) - 1e-7


def test_growth_at_theta_ref_uses_the_zero_gradient_mixture():
    """At the chi-square collapse radius theta* = theta_ref and the solver's worst case has
    a non-zero gradient there: its growth constant overstated the growth (the inequality
    failed with ratio 0.90); the zero-gradient mixture Q0 gives a constant that holds."""
    env = sim.FiniteEnv.random(20, 6, 4, beta=1.0, seed=0, theta_norm=2.0)
    pop = env.population()
    amb = sim.ChiSquare(sim.collapse_radius(pop, sim.ChiSquare(1.0)) * (1 + 1e-6))
    star = sim.solve(pop, amb)
    assert np.linalg.norm(star.theta) == 0.0
    rng = np.random.default_rng(0)
    u = rng.standard_normal((1000, env.dim))
    thetas = 0.01 * u / np.linalg.norm(u, axis=1, keepdims=True)
    gamma = theory.robust_growth(amb, pop, star.worst_case, env.beta, 0.01, theta=star.theta)
    gains = np.array([sim.robust_objective(t, pop, amb).value - star.value for t in thetas])
    ratio = gains / (gamma / 2 * np.sum(thetas**2, axis=1))
    assert ratio.min() >= 1.0
    # Wasserstein p = 2 at theta_ref: no valid constant is computed
    w2 = sim.Wasserstein(2 * sim.collapse_radius(pop, sim.Wasserstein(1.0, p=2)), p=2)
    s2 = sim.solve(pop, w2)
    assert math.isnan(theory.robust_growth(w2, pop, s2.worst_case, 1.0, 1.0, theta=s2.theta))


@pytest.mark.parametrize("amb", METHODS, ids=lambda a: a.name)
def test_fast_bound_and_excess_risk_decomposition_hold_in_every_seed(world, amb):
    """Deterministic steps of the bounds, per seed (docs/theory.md sections 5-6): the
    excess risk is at most the two deviations it is split into, and ``err <= 2 ||g|| /
    gamma_n``. Both fail if the growth constant or a gradient is wrong. (The coverage of the
    slow-rate bound is not tested: it is hundreds of times the error, so it cannot fail; the
    sharp checks are the sandwich Monte Carlo tests of test_asymptotics.py.)"""
    env, pop = world
    n = 200
    star = sim.solve(pop, amb, beta=env.beta)
    for seed in range(15):
        data = env.sample(n, seed)
        sol = sim.solve(data, amb, beta=env.beta)
        at_hat = sim.robust_objective(sol.theta, pop, amb, beta=env.beta)
        at_star = sim.robust_objective(star.theta, data, amb, beta=env.beta)
        dev_hat = abs(at_hat.value - sol.value)
        dev_star = abs(at_star.value - star.value)
        assert at_hat.value - star.value <= dev_hat + dev_star + 1e-10
        B = max(np.linalg.norm(star.theta), np.linalg.norm(sol.theta))
        gamma_n = theory.robust_growth(amb, data, sol.worst_case, env.beta, B, theta=sol.theta)
        err = np.linalg.norm(sol.theta - star.theta)
        assert err <= theory.fast_rate(np.linalg.norm(at_star.grad), gamma_n) * (1 + 1e-6) + 1e-6


def test_uniform_slow_rate_is_the_slow_rate_at_the_grid_point_with_its_share_of_delta():
    amb, n, delta, beta = sim.KL(0.1), 1000, 0.1, 1.0
    z = math.pi**2 / 3 - 1
    calls = []

    def gamma_at(b):
        calls.append(b)
        return 0.01 / b

    got = theory.uniform_slow_rate(amb, n, delta, beta, 1.5, gamma_at, dual_lo=0.3)
    # B = 1.5 -> B_1 = 2 (weight 1 / (4 Z)); lambda_lo = 0.3 -> 2^-2 (weight 1 / (9 Z))
    want = theory.slow_rate(amb, n, delta / (4 * z) / (9 * z), beta, 2.0, 0.005, dual_lo=0.25)
    assert calls == [2.0]
    assert got.error == pytest.approx(want.error, rel=1e-14)
    plain = theory.slow_rate(amb, n, delta, beta, 1.5, 0.01 / 1.5, dual_lo=0.3)
    assert got.error > plain.error  # the price of uniformity
    # the shares of all grid pairs sum to at most 1
    k = np.arange(-2000, 2001)
    share = 1 / (z * (np.abs(k) + 1) ** 2)
    assert share.sum() <= 1 and share.sum() > 1 - 1e-3
    # B = 0 (both estimates at theta_ref = 0): the unit ball B_0 = 1 with its weight 1 / Z
    calls.clear()
    zero = theory.uniform_slow_rate(amb, n, delta, beta, 0.0, gamma_at, dual_lo=0.3)
    assert calls == [1.0]
    want = theory.slow_rate(amb, n, delta / z / (9 * z), beta, 1.0, 0.01, dual_lo=0.25)
    assert zero.error == pytest.approx(want.error, rel=1e-14)
    with pytest.raises(ValueError, match="B"):
        theory.uniform_slow_rate(amb, n, delta, beta, -1.0, gamma_at, dual_lo=0.3)
