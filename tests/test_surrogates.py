"""Surrogate losses and directions (SPEC 4): gradients, identities, limits, validation."""

import numpy as np
import pytest

import simulator as sim
from simulator.surrogates import (
    SURROGATES,
    evaluate_arrays,
    get_surrogate,
    surrogate_grad,
    surrogate_loss,
    surrogate_per_sample_loss,
    surrogate_value_and_grad,
    surrogate_weights,
)

BETA = 1.5
SCALAR_CASES = [
    ("dpo", {}),
    ("wdpo-gr", {"rho": 0.3}),
    ("wdpo-gr", {"rho": 0.3, "p": np.inf}),
    ("wdpo-gr", {"rho": 0.3, "p": 3.0}),
    ("wdpo-sq", {"rho": 0.3}),
    ("wdpo-sq", {"rho": 0.3, "view": "x"}),
    ("kldpo-tau", {"tau": 0.5}),
    ("kl-var", {"rho": 0.2}),
    ("chi2-var", {"rho": 0.2}),
    ("drdpo", {"beta_prime": 0.7}),
]


@pytest.fixture(scope="module")
def problem():
    env = sim.FiniteEnv.random(6, 4, 3, seed=1)
    data = env.sample(60, seed=2)
    rng = np.random.default_rng(0)
    return data, rng.standard_normal(3), 0.3 * rng.standard_normal(3)


def per_sample(theta, data, ref):
    m = sim.margins(theta, data.x, data.y, BETA, ref)
    return sim.dpo_loss(m), sim.dpo_grad_theta(m, data.x, data.y, BETA), m


def test_registry_lists_every_surrogate():
    assert set(SURROGATES) == {"dpo", "wdpo-gr", "wdpo-sq", "kldpo-tau", "kldpo-clip",
                               "kl-var", "chi2-var", "drdpo"}
    assert [n for n, s in SURROGATES.items() if s.detached] == ["kldpo-clip"]


@pytest.mark.parametrize("name,params", SCALAR_CASES)
def test_gradient_matches_central_differences(problem, name, params):
    data, theta, ref = problem
    _, g = surrogate_value_and_grad(name, theta, data, BETA, ref, **params)
    h = 1e-6
    fd = np.array([(surrogate_loss(name, theta + e, data, BETA, ref, **params)
                    - surrogate_loss(name, theta - e, data, BETA, ref, **params)) / (2 * h)
                   for e in h * np.eye(3)])
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name,params", SCALAR_CASES + [("kldpo-clip", {"tau": 0.2})])
def test_population_weights_equal_duplicated_atoms(problem, name, params):
    # An atom of weight 2/(n+1) must act exactly like two copies of weight 1/(n+1).
    data, theta, ref = problem
    dup = sim.PreferenceData(np.vstack([data.x, data.x[:1]]), np.append(data.y, data.y[0]))
    w = np.full(data.n, 1.0 / (data.n + 1))
    w[0] *= 2
    weighted = sim.PreferenceData(data.x, data.y, w)
    f1, g1 = surrogate_value_and_grad(name, theta, dup, BETA, ref, **params)
    f2, g2 = surrogate_value_and_grad(name, theta, weighted, BETA, ref, **params)
    assert f1 == pytest.approx(f2, rel=1e-12)
    np.testing.assert_allclose(g1, g2, rtol=1e-10, atol=1e-13)


def test_wdpo_gr_uses_input_gradient_norm(problem):
    # ||grad_x l_i|| from losses.dpo_grad_x, then the SPEC 4 formulas for q = 2 and q = 1.
    data, theta, ref = problem
    l, _, m = per_sample(theta, data, ref)
    gx = np.linalg.norm(sim.dpo_grad_x(m, data.y, BETA, theta - ref), axis=1)
    w, rho = data.weights, 0.4
    assert surrogate_loss("wdpo-gr", theta, data, BETA, ref, rho=rho) == pytest.approx(
        w @ l + rho * np.sqrt(w @ gx**2), rel=1e-13)
    assert surrogate_loss("wdpo-gr", theta, data, BETA, ref, rho=rho, p=np.inf) == pytest.approx(
        w @ l + rho * (w @ gx), rel=1e-13)
    # pair view: grad wrt (phi1, phi2) is (grad_x l, -grad_x l), squared norm 2 ||grad_x l||^2
    sq = surrogate_per_sample_loss("wdpo-sq", theta, data, BETA, ref, rho=rho)
    np.testing.assert_allclose(sq, l + rho * 2 * gx**2, rtol=1e-13)
    assert surrogate_loss("wdpo-sq", theta, data, BETA, ref, rho=rho) == pytest.approx(
        surrogate_loss("wdpo-sq", theta, data, BETA, ref, rho=2 * rho, view="x"), rel=1e-13)


def test_kldpo_tau_weights_are_softmax_and_limits(problem):
    data, theta, ref = problem
    l, g, _ = per_sample(theta, data, ref)
    w = surrogate_weights("kldpo-tau", theta, data, BETA, ref, tau=0.4)
    e = np.exp((l - l.max()) / 0.4)
    np.testing.assert_allclose(w, e / e.sum(), rtol=1e-12)
    np.testing.assert_allclose(surrogate_grad("kldpo-tau", theta, data, BETA, ref, tau=0.4),
                               w @ g, rtol=1e-12)
    small = surrogate_loss("kldpo-tau", theta, data, BETA, ref, tau=1e-3)
    big = surrogate_loss("kldpo-tau", theta, data, BETA, ref, tau=1e4)
    assert small == pytest.approx(l.max(), abs=1e-3 * np.log(data.n) + 1e-12)
    assert big == pytest.approx(l.mean(), abs=1e-3)
    assert l.mean() < surrogate_loss("kldpo-tau", theta, data, BETA, ref, tau=0.4) < l.max()


def test_kldpo_clip_is_detached_and_clipped(problem):
    data, theta, ref = problem
    l, g, _ = per_sample(theta, data, ref)
    tau, clip = 0.05, 10.0
    w = np.minimum(np.exp((l - l.mean()) / tau), clip)
    assert (w == clip).any() and (w < clip).any()
    f, direction = surrogate_value_and_grad("kldpo-clip", theta, data, BETA, ref, tau=tau)
    assert f == pytest.approx(np.mean(w * l), rel=1e-12)
    np.testing.assert_allclose(direction, (w[:, None] * g).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(surrogate_weights("kldpo-clip", theta, data, BETA, ref, tau=tau),
                               w / data.n, rtol=1e-12)
    # detached: the direction is not the gradient of the scalar E[w l]
    h = 1e-6
    fd = np.array([(surrogate_loss("kldpo-clip", theta + e, data, BETA, ref, tau=tau)
                    - surrogate_loss("kldpo-clip", theta - e, data, BETA, ref, tau=tau)) / (2 * h)
                   for e in h * np.eye(3)])
    assert np.linalg.norm(fd - direction) > 0.1 * np.linalg.norm(direction)


def test_variance_expansions_closed_form(problem):
    data, theta, ref = problem
    l, _, _ = per_sample(theta, data, ref)
    for name, k in (("kl-var", 2.0), ("chi2-var", 1.0)):
        assert surrogate_loss(name, theta, data, BETA, ref, rho=0.3) == pytest.approx(
            l.mean() + np.sqrt(k * 0.3 * l.var()), rel=1e-13)


def test_drdpo_tends_to_dpo_like_one_over_beta_prime(problem):
    # Cumulant expansion: E l - (-b log E exp(-l / b)) = Var(l) / (2 b) - k3 / (6 b^2) + O(b^-3).
    data, theta, ref = problem
    l, _, _ = per_sample(theta, data, ref)
    var, k3 = l.var(), np.mean((l - l.mean()) ** 3)
    bps = np.array([10.0, 30.0, 100.0, 300.0, 1000.0])
    gaps = np.array([l.mean() - surrogate_loss("drdpo", theta, data, BETA, ref, beta_prime=b)
                     for b in bps])
    assert np.polyfit(np.log(bps), np.log(gaps), 1)[0] == pytest.approx(-1.0, abs=0.02)
    np.testing.assert_allclose((gaps * bps - var / 2) * bps, -k3 / 6, rtol=0.1, atol=0)


def test_stacked_batches_match_one_by_one(problem):
    data, theta, ref = problem
    sur = get_surrogate("kl-var")
    prm = sur.params({"rho": 0.2})
    idx = np.arange(60).reshape(5, 12)
    wb = np.full((5, 12), 1 / 12)
    loss, grad, _ = evaluate_arrays(sur, prm, theta, data.x[idx], data.y[idx], wb, BETA, ref)
    for k in range(5):
        f, g = surrogate_value_and_grad("kl-var", theta, data.subset(idx[k]), BETA, ref, rho=0.2)
        assert loss[k] == pytest.approx(f, rel=1e-13)
        np.testing.assert_allclose(grad[k], g, rtol=1e-12)


@pytest.mark.parametrize("name,params,match", [
    ("nope", {}, "surrogate must be one of"),
    ("kldpo-tau", {}, "needs parameter 'tau'"),
    ("kldpo-tau", {"tau": 0.0}, "tau must be"),
    ("kldpo-tau", {"tau": 1.0, "rho": 1.0}, "unknown"),
    ("wdpo-gr", {"rho": -0.1}, "rho must be"),
    ("wdpo-gr", {"rho": 0.1, "p": 1.0}, "p must be in"),
    ("wdpo-sq", {"rho": 0.1, "view": "y"}, "view must be"),
    ("kl-var", {"rho": np.nan}, "rho must be"),
    ("drdpo", {"beta_prime": -1.0}, "beta_prime must be"),
    ("kldpo-clip", {"tau": 1.0, "clip": 0.0}, "clip must be"),
])
def test_bad_parameters_raise(problem, name, params, match):
    data, theta, _ = problem
    with pytest.raises(ValueError, match=match):
        surrogate_loss(name, theta, data, **params)


def test_bad_inputs_raise(problem):
    data, theta, _ = problem
    with pytest.raises(ValueError, match="theta must have length 3"):
        surrogate_loss("dpo", theta[:2], data)
    with pytest.raises(ValueError, match="theta must be finite"):
        surrogate_loss("dpo", np.array([np.nan, 0, 0]), data)
    with pytest.raises(ValueError, match="beta must be"):
        surrogate_loss("dpo", theta, data, beta=0.0)
    with pytest.raises(ValueError, match="data must be a PreferenceData"):
        surrogate_loss("dpo", theta, (data.x, data.y))
    with pytest.raises(ValueError, match="no per-sample weight form"):
        surrogate_weights("wdpo-gr", theta, data, rho=0.1)
    with pytest.raises(ValueError, match="not a mean of per-sample losses"):
        surrogate_per_sample_loss("kl-var", theta, data, rho=0.1)
