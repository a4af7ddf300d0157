"""Core objects against direct formulas: environments, data, policies, losses, validation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.stats import chi2

import simulator as sim


@pytest.fixture(scope="module")
def env() -> sim.FiniteEnv:
    return sim.FiniteEnv.random(5, 4, 3, beta=1.5, seed=7, theta_norm=2.0)


def _direct_sigmoid(t):
    return 1.0 / (1.0 + np.exp(-t))


# ---------------------------------------------------------------------------- environment
def test_population_is_a_distribution_matching_bradley_terry(env):
    pop = env.population()
    assert pop.weights.sum() == pytest.approx(1.0, abs=1e-12) and pop.weights.min() > 0
    s, a1, a2 = pop.states, pop.actions[:, 0], pop.actions[:, 1]
    np.testing.assert_allclose(pop.x, env.features[s, a1] - env.features[s, a2])
    # uniform pair sampler over ordered distinct pairs, uniform states
    A = env.n_actions
    pair_mass = 1.0 / (env.n_states * A * (A - 1))
    p1 = _direct_sigmoid(env.reward[s, a1] - env.reward[s, a2])
    np.testing.assert_allclose(pop.weights, pair_mass * np.where(pop.y == 1, p1, 1 - p1))
    assert np.all(a1 != a2) and pop.n == 2 * env.n_states * A * (A - 1)


def test_sample_frequencies_match_population(env):
    pop = env.population()
    n = 200_000
    smp = env.sample(n, seed=1)
    A = env.n_actions

    def key(d):
        return ((d.states * A + d.actions[:, 0]) * A + d.actions[:, 1]) * 2 + d.y.astype(int)

    size = env.n_states * A * A * 2
    observed = np.bincount(key(smp), minlength=size)
    expected = np.bincount(key(pop), pop.weights, minlength=size) * n
    assert observed[expected == 0].sum() == 0
    stat = np.sum((observed - expected)[expected > 0] ** 2 / expected[expected > 0])
    assert stat < chi2.ppf(1 - 1e-4, df=pop.n - 1)
    np.testing.assert_allclose(smp.weights, 1.0 / n)
    assert env.sample(50, seed=3).x.tolist() == env.sample(50, seed=3).x.tolist()


def test_realizable_reward_and_population_dpo_optimum(env):
    # r = beta (theta_true - theta_ref) . phi, so the population DPO optimum is theta_true
    np.testing.assert_allclose(env.reward, env.beta * env.features @ env.theta_true)
    pop = env.population()
    p = _direct_sigmoid(env.beta * pop.x @ env.theta_true)
    np.testing.assert_allclose(p, env.preference_prob()[pop.states, *pop.actions.T])
    sol = sim.solve_cvxpy(pop, sim.Nominal(), beta=env.beta)
    np.testing.assert_allclose(sol.theta, env.theta_true, atol=1e-5)
    ref = np.array([0.2, -0.1, 0.3])
    shifted = sim.FiniteEnv.from_parameter(env.features, env.theta_true, beta=0.5, theta_ref=ref)
    np.testing.assert_allclose(shifted.reward, 0.5 * env.features @ (env.theta_true - ref))


def test_label_noise(env):
    eta = 0.2
    noisy = env.with_label_noise(eta)
    p = _direct_sigmoid(env.reward[:, :, None] - env.reward[:, None, :])
    np.testing.assert_allclose(noisy.preference_prob(), (1 - eta) * p + eta * (1 - p))
    np.testing.assert_allclose(env.with_label_noise(0.5).preference_prob(), 0.5)
    # pure noise: the population DPO optimum is theta_ref
    sol = sim.solve_cvxpy(env.with_label_noise(0.5).population(), sim.Nominal(), beta=env.beta)
    np.testing.assert_allclose(sol.theta, 0.0, atol=1e-5)
    assert sol.value == pytest.approx(np.log(2.0), abs=1e-10)
    assert noisy.label_noise == eta and env.label_noise == 0.0  # the original is unchanged


def test_reward_mixture(env):
    other = np.random.default_rng(0).normal(size=env.reward.shape)
    mix = env.reward_mixture(other, 0.3)
    np.testing.assert_allclose(mix.reward, 0.3 * env.reward + 0.7 * other)
    np.testing.assert_allclose(env.reward_mixture(other, 1.0).reward, env.reward)
    assert mix.theta_true is None  # misspecified in general
    np.testing.assert_allclose(env.with_reward(other).preference_prob(),
                               _direct_sigmoid(other[:, :, None] - other[:, None, :]))
    with pytest.raises(ValueError, match="alpha"):
        env.reward_mixture(other, 1.5)


def test_state_and_pair_sampler_shifts(env):
    mu = np.array([0.5, 0.2, 0.1, 0.1, 0.1])
    pop = env.with_state_dist(mu).population()
    np.testing.assert_allclose(np.bincount(pop.states, pop.weights), mu, atol=1e-12)
    table = np.random.default_rng(1).random((env.n_states, env.n_actions, env.n_actions))
    table /= table.sum(axis=(1, 2), keepdims=True)
    pop = env.with_pair_sampler(table).population()
    A = env.n_actions
    pair = np.bincount((pop.states * A + pop.actions[:, 0]) * A + pop.actions[:, 1],
                       pop.weights, minlength=table.size)
    np.testing.assert_allclose(pair.reshape(table.shape), table / env.n_states, atol=1e-12)
    # 'ref' pairs: two independent draws from pi_ref (uniform when theta_ref = 0)
    ref = env.with_pair_sampler("ref")
    np.testing.assert_allclose(ref.pair_sampler, 1.0 / A**2)


def test_lambda_min_against_eigvalsh(env):
    phi, mu, q = env.features, env.state_dist, env.pair_sampler
    x = phi[:, :, None, :] - phi[:, None, :, :]  # (S, A, A, d)
    sigma = np.einsum("s,sab,sabi,sabj->ij", mu, q, x, x)
    assert env.lambda_min() == pytest.approx(np.linalg.eigvalsh(sigma)[0], rel=1e-10)
    pop = env.population()
    assert pop.lambda_min() == pytest.approx(env.lambda_min(), rel=1e-10)
    np.testing.assert_allclose(pop.coverage(), sigma, atol=1e-14)


def test_features_bounded_and_expected_reward(env):
    assert np.linalg.norm(env.features, axis=2).max() <= 1.0 + 1e-12
    theta = np.array([1.0, -2.0, 0.5])
    logits = env.features @ theta
    pi = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    direct = float(np.sum(env.state_dist[:, None] * pi * env.reward))
    assert env.expected_reward(theta) == pytest.approx(direct, rel=1e-12)
    other = np.ones_like(env.reward)
    assert env.expected_reward(theta, other) == pytest.approx(1.0, rel=1e-12)


# ---------------------------------------------------------------------------- policy
def test_log_linear_policy(env):
    theta = np.array([0.4, -1.0, 2.0])
    pol = env.policy(theta)
    logits = env.features @ theta
    direct = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(pol.probs(), direct, rtol=1e-12)
    np.testing.assert_allclose(pol.probs().sum(axis=1), 1.0, rtol=1e-12)
    huge = env.policy(1e6 * theta)
    p, lp = huge.probs(), huge.log_probs()
    assert np.all(np.isfinite(p)) and np.all(np.isfinite(lp)) and np.all(lp <= 0)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(p.argmax(axis=1), logits.argmax(axis=1))
    assert p.max(axis=1).min() > 1 - 1e-12
    # the implicit reward difference: log-ratio of two actions of a state is (theta - ref) . x
    ref = np.array([0.1, 0.2, -0.3])
    h = (pol.log_probs() - env.policy(ref).log_probs())
    np.testing.assert_allclose(h[:, 0] - h[:, 1],
                               (env.features[:, 0] - env.features[:, 1]) @ (theta - ref))


# ---------------------------------------------------------------------------- losses
def test_scalar_functions_against_direct_formulas():
    t = np.linspace(-30, 30, 121)
    np.testing.assert_allclose(sim.softplus(t), np.log1p(np.exp(t)), rtol=1e-12)
    np.testing.assert_allclose(sim.sigmoid(t), _direct_sigmoid(t), rtol=1e-12)
    np.testing.assert_allclose(sim.log_sigmoid(t), -np.log1p(np.exp(-t)), rtol=1e-12)
    big = np.array([-1e4, 1e4])
    np.testing.assert_allclose(sim.softplus(big), [0.0, 1e4], atol=1e-300)
    np.testing.assert_allclose(sim.dpo_loss(big), [1e4, 0.0], atol=1e-300)
    np.testing.assert_allclose(sim.log_sigmoid(big), [-1e4, 0.0], atol=1e-300)
    np.testing.assert_allclose(sim.sigmoid(big), [0.0, 1.0], atol=1e-300)
    assert np.all(np.isfinite(sim.dpo_loss(big)))


@pytest.mark.parametrize("n", [1, 8192, 3 * 8192 + 5])
def test_vector_losses_equal_the_scalar_formula_in_every_block(n):
    """The vector forms work in blocks of 8192 without a temporary: every element, across
    block edges, for strided and 2-D inputs, equals the scalar path bit for bit."""
    t = np.random.default_rng(n).normal(0.0, 5.0, 2 * n)
    t[:2] = [0.0, -0.0]
    for v in (t[:n], t[::2], t[:n - n % 2].reshape(-1, 2 if n > 1 else 1).T):
        flat = v.ravel()
        scalar_sp = np.array([sim.softplus(e) for e in flat]).reshape(v.shape)
        scalar_dpo = np.array([sim.softplus(-e) for e in flat]).reshape(v.shape)
        assert np.array_equal(sim.softplus(v), scalar_sp)
        assert np.array_equal(sim.dpo_loss(v), scalar_dpo)


def test_dpo_loss_derivatives_by_finite_differences():
    rng = np.random.default_rng(2)
    n, d, beta = 6, 4, 0.8
    x, y = rng.normal(size=(n, d)), rng.integers(0, 2, n).astype(float)
    theta, ref = rng.normal(size=d), rng.normal(size=d)
    m = sim.margins(theta, x, y, beta, ref)
    np.testing.assert_allclose(m, (2 * y - 1) * beta * (x @ (theta - ref)))
    h = -y * np.log(_direct_sigmoid(beta * x @ (theta - ref))) - (1 - y) * np.log(
        _direct_sigmoid(-beta * x @ (theta - ref)))
    np.testing.assert_allclose(sim.dpo_loss(m), h, rtol=1e-12)
    eps = 1e-6
    eye = np.eye(d)

    def loss(th=theta, xx=x):
        return sim.dpo_loss(sim.margins(th, xx, y, beta, ref))

    fd_theta = np.stack([(loss(th=theta + eps * e) - loss(th=theta - eps * e)) / (2 * eps)
                         for e in eye], axis=1)
    np.testing.assert_allclose(sim.dpo_grad_theta(m, x, y, beta), fd_theta, atol=1e-8)
    fd_x = np.stack([(loss(xx=x + eps * e) - loss(xx=x - eps * e)) / (2 * eps) for e in eye],
                    axis=1)
    np.testing.assert_allclose(sim.dpo_grad_x(m, y, beta, theta - ref), fd_x, atol=1e-8)
    w = rng.dirichlet(np.ones(n))

    def grad(th):
        return w @ sim.dpo_grad_theta(sim.margins(th, x, y, beta, ref), x, y, beta)

    fd_h = np.stack([(grad(theta + eps * e) - grad(theta - eps * e)) / (2 * eps) for e in eye])
    np.testing.assert_allclose(sim.dpo_hessian_theta(m, x, beta, w), fd_h, atol=1e-8)
    np.testing.assert_allclose(sim.dpo_hessian_theta(m, x, beta),
                               sum(beta**2 * _direct_sigmoid(mi) * _direct_sigmoid(-mi)
                                   * np.outer(xi, xi) for mi, xi in zip(m, x, strict=True)))


def test_dpo_is_logistic_regression():
    # the DPO optimum equals the logistic-regression optimum on (beta x, ytil)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(80, 3))
    y = (rng.random(80) < _direct_sigmoid(x @ [1.0, -0.5, 0.2])).astype(float)
    beta = 2.0
    res = minimize(lambda th: np.mean(np.log1p(np.exp(-(2 * y - 1) * ((beta * x) @ th)))),
                   np.zeros(3), method="BFGS", options={"gtol": 1e-10})
    sol = sim.solve_cvxpy(sim.PreferenceData(x, y), sim.Nominal(), beta=beta)
    np.testing.assert_allclose(sol.theta, res.x, atol=1e-5)


# ---------------------------------------------------------------------------- data
def test_preference_data_operations():
    x = np.arange(12.0).reshape(4, 3) / 12
    data = sim.PreferenceData(x, [1, 0, 1, 1], [0.1, 0.2, 0.3, 0.4])
    np.testing.assert_array_equal(data.ytil, [1, -1, 1, 1])
    np.testing.assert_array_equal(data.flipped().y, [0, 1, 0, 0])
    sub = data.subset([1, 3])
    np.testing.assert_allclose(sub.weights, [1 / 3, 2 / 3])
    mix = sim.PreferenceData.concatenate([data, sub], [0.25, 0.75])
    np.testing.assert_allclose(mix.weights, np.r_[0.25 * data.weights, 0.75 * sub.weights])
    np.testing.assert_allclose(sim.PreferenceData(x, [1, 0, 1, 1]).weights, 0.25)


# ---------------------------------------------------------------------------- validation
X = np.zeros((3, 2))
Y = np.array([1, 0, 1])


@pytest.mark.parametrize("kwargs,name", [
    (dict(x=np.array([[np.nan, 0], [0, 0], [0, 0]]), y=Y), "x"),
    (dict(x=np.array([[np.inf, 0], [0, 0], [0, 0]]), y=Y), "x"),
    (dict(x=np.zeros(3), y=Y), "x"),
    (dict(x=X, y=[1, 2, 0]), "y"),
    (dict(x=X, y=[1, 0]), "y"),
    (dict(x=X, y=Y, weights=[0.5, 0.6, -0.1]), "weights"),
    (dict(x=X, y=Y, weights=[0.3, 0.3, 0.3]), "weights"),
    (dict(x=X, y=Y, weights=[0.5, 0.5]), "weights"),
    (dict(x=X, y=Y, weights=[np.nan, 0.5, 0.5]), "weights"),
    (dict(x=X, y=Y, states=[0, 1]), "states"),
])
def test_bad_preference_data(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sim.PreferenceData(**kwargs)


@pytest.mark.parametrize("make,name", [
    (lambda: sim.KL(-0.1), "rho"),
    (lambda: sim.KL(np.nan), "rho"),
    (lambda: sim.ChiSquare(-1.0), "rho"),
    (lambda: sim.Wasserstein(-0.1), "rho"),
    (lambda: sim.Wasserstein(0.1, p=3), "p"),
    (lambda: sim.Wasserstein(0.1, kappa=0.0), "kappa"),
    (lambda: sim.Nominal(0.1), "rho"),
])
def test_bad_ambiguity(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_bad_environment_input(env):
    phi = env.features
    with pytest.raises(ValueError, match="features"):
        sim.FiniteEnv(2 * phi, env.reward)
    with pytest.raises(ValueError, match="features"):
        sim.FiniteEnv(np.where(phi > 0.5, np.nan, phi), env.reward)
    with pytest.raises(ValueError, match="reward"):
        sim.FiniteEnv(phi, env.reward[:, :2])
    with pytest.raises(ValueError, match="state_dist"):
        env.with_state_dist([1.5, -0.5, 0, 0, 0])
    with pytest.raises(ValueError, match="state_dist"):
        env.with_state_dist([0.5, 0.1, 0, 0, 0])
    with pytest.raises(ValueError, match="beta"):
        sim.FiniteEnv(phi, env.reward, beta=0.0)
    with pytest.raises(ValueError, match="label_noise"):
        env.with_label_noise(0.7)
    with pytest.raises(ValueError, match="pair_sampler"):
        env.with_pair_sampler("bogus")
    with pytest.raises(ValueError, match="theta"):
        env.policy(np.zeros(5))
    with pytest.raises(ValueError, match="theta"):
        env.policy(np.array([np.inf, 0, 0]))
    with pytest.raises(ValueError, match="n"):
        env.sample(0)
    with pytest.raises(ValueError, match="theta_ref"):
        sim.FiniteEnv.from_parameter(phi, np.zeros(3), theta_ref=np.zeros(2))


def test_loss_sigmoid_matches_expit_to_an_ulp_of_one():
    """``sigmoid(-m)`` from the losses (one ``exp``) against scipy's ``expit``, over margins
    from -800 to 800: absolute error within an ulp of 1, relative error within 1e-13 where
    the value is above 1e-3."""
    from scipy.special import expit

    from simulator.losses import dpo_loss
    from simulator.solvers.core import loss_sigmoid

    m = np.concatenate([np.linspace(-800, 800, 20001), np.geomspace(1e-300, 1e3, 2000),
                        -np.geomspace(1e-300, 1e3, 2000), [0.0]])
    s, ref = loss_sigmoid(dpo_loss(m)), expit(-m)
    assert np.max(np.abs(s - ref)) <= 2.0**-52
    big = ref > 1e-3
    assert np.max(np.abs(s[big] - ref[big]) / ref[big]) <= 1e-13


@pytest.mark.parametrize("amb", [sim.Nominal(), sim.KL(0.1), sim.ChiSquare(0.1)], ids=repr)
def test_reweighting_hvp_is_the_dense_hessian_times_v(amb, gaussian_data):
    """The Hessian-vector product of the reweighting sets against the dense Hessian (both from
    the same parts), at a random point, to rounding."""
    from simulator.solvers.core import Atoms
    from simulator.solvers.inner import evaluate_inner

    at = Atoms.from_data(gaussian_data(3000, seed=4), 1.0, normalise=True)
    rng = np.random.default_rng(0)
    res = evaluate_inner(at, rng.normal(size=at.a.shape[1]), amb, hess=True)
    for _ in range(3):
        v = rng.normal(size=at.a.shape[1])
        np.testing.assert_allclose(res.hvp(v), res.hess() @ v, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("d", [1, 3, 8, 16, 40])
def test_weighted_hess_is_the_weighted_sum_of_outer_products(d):
    """Both of ``weighted_hess``'s forms (the product below 16 columns, the rank-k update
    from there), over several chunks, against ``einsum`` in long double precision."""
    from simulator.solvers.core import weighted_hess

    rng = np.random.default_rng(d)
    a = rng.standard_normal((9000, d))
    c = rng.random(9000) * (rng.random(9000) > 0.2)
    exact = np.einsum("i,ij,ik->jk", c.astype(np.longdouble), a.astype(np.longdouble), a)
    h = weighted_hess(a, c)
    assert np.array_equal(h, h.T)
    np.testing.assert_allclose(h, exact.astype(float), rtol=0, atol=1e-12 * np.abs(exact).max())


@pytest.mark.parametrize("d", [1, 4, 30])
def test_psd_solve_solves_definite_systems_and_descends_on_singular_ones(d):
    """``psd_solve`` (LAPACK's Cholesky factor) against ``numpy.linalg.solve`` on a positive
    definite matrix, and on a singular PSD one (rank 1) the regularised step is still a
    descent direction (``g . s > 0``) and solves the system for ``g`` in its range; the
    inputs are left as they were."""
    from simulator.solvers.core import psd_solve

    rng = np.random.default_rng(d)
    b = rng.standard_normal((3 * d, d))
    h, g = b.T @ b, rng.standard_normal(d)
    h0, g0 = h.copy(), g.copy()
    s = psd_solve(h, g)
    np.testing.assert_allclose(s, np.linalg.solve(h, g), rtol=1e-10 * np.linalg.cond(h))
    assert np.array_equal(h, h0) and np.array_equal(g, g0)
    u = b[0] / np.linalg.norm(b[0])
    singular = np.outer(u, u) * 3.0
    g1 = u * 2.0 + (0.0 if d == 1 else 1e-3 * np.linalg.svd(np.eye(d) - np.outer(u, u))[0][:, 0])
    s1 = psd_solve(singular, g1)
    assert np.all(np.isfinite(s1)) and g1 @ s1 > 0
    np.testing.assert_allclose(singular @ psd_solve(singular, 2.0 * u), 2.0 * u, atol=1e-9)


@pytest.mark.parametrize("d", [7, 20])
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_atoms_products_match_the_explicit_matrix(weights, stream, d, monkeypatch):
    """``Atoms`` keeps ``x`` and the factor ``ytil beta / scale``: its products (by BLAS and,
    with the size threshold at 0, by einsum; before and after its matrix is read), Hessian
    sums, matrix, mean, radius and scale against ``a = ytil beta x / scale`` built directly
    in long double precision (``d = 7``: the moments' squared blocks, below
    ``_MOMENT_EINSUM_D``; ``d = 20``: their einsum)."""
    from simulator.solvers import core

    monkeypatch.setattr(core, "_STREAM_MIN_BYTES", 0 if stream else 2**62)
    monkeypatch.setattr(core, "_STREAM_MIN_D", 1 if stream else 2**62)
    monkeypatch.setattr(core, "_slow_dgemv", lambda: stream)
    monkeypatch.setattr(core, "_MOMENT_BLOCK", 512)  # several blocks in _row_moments
    rng = np.random.default_rng(3)
    n, beta = 3001, 0.7
    assert (d < core._MOMENT_EINSUM_D) == (d == 7)
    x = rng.standard_normal((n, d)) * rng.uniform(0.1, 3.0, size=(n, 1))
    y = (rng.random(n) < 0.4).astype(float)
    w = rng.dirichlet(np.ones(n)) if weights else None
    data = sim.PreferenceData(x, y, w)
    at = core.Atoms.from_data(data, beta, normalise=True)
    xl = x.astype(np.longdouble)
    wl = data.weights.astype(np.longdouble)
    raw = (2 * y - 1)[:, None] * beta * xl
    rms = np.sqrt(wl @ np.einsum("ij,ij->i", raw, raw))
    a = raw / rms
    assert at.scale == pytest.approx(float(rms), rel=1e-14)
    assert at.beta == pytest.approx(beta / float(rms), rel=1e-14)
    top = float(np.sqrt(np.einsum("ij,ij->i", a, a).max()))
    assert top <= at.max_norm() <= top * (1 + 1e-11)
    np.testing.assert_allclose(at.mean_a, (wl @ a).astype(float), rtol=0, atol=1e-15)
    v, u = rng.standard_normal(d), rng.standard_normal(n)
    c = rng.random(n)
    hess = np.einsum("i,ij,ik->jk", c, a, a).astype(float)
    assert at.built() is None
    for _ in range(2):  # from x and the factor, then (a read) from a itself
        np.testing.assert_allclose(at.matvec(v), (a @ v).astype(float), rtol=1e-13,
                                   atol=1e-14)
        np.testing.assert_allclose(at.rmatvec(u), (u @ a).astype(float), rtol=0, atol=1e-12)
        np.testing.assert_allclose(at.rmatvec(u, c), ((u * c) @ a).astype(float), rtol=0,
                                   atol=1e-12)
        np.testing.assert_allclose(core.weighted_hess(at, c), hess, rtol=0,
                                   atol=1e-13 * np.abs(hess).max())
        np.testing.assert_allclose(at.a, a.astype(float), rtol=1e-15)
    assert at.built() is at.a
    sub = at.subset(slice(None, None, 3))
    np.testing.assert_allclose(sub.matvec(v), at.matvec(v)[::3], rtol=1e-13, atol=1e-14)
    assert core._streams(x) == stream and not core._streams(np.asfortranarray(x))


@pytest.mark.parametrize("c", [1e-160, 1e160])
def test_atoms_scale_where_the_squares_of_x_leave_double_precision(c):
    """Features whose squares underflow (1e-320) or overflow (1e320), with ``beta = 1 / c``:
    the scale comes from ``x / max |x|``, and scale, atoms, mean and radius are those of the
    unscaled features with ``beta = 1``."""
    from simulator.solvers.core import Atoms

    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 4))
    y = (rng.random(500) < 0.5).astype(float)
    base = Atoms.from_data(sim.PreferenceData(x, y), 1.0, normalise=True)
    far = Atoms.from_data(sim.PreferenceData(x * c, y), 1.0 / c, normalise=True)
    assert far.scale == pytest.approx(base.scale, rel=1e-13)
    np.testing.assert_allclose(far.a, base.a, rtol=1e-13)
    np.testing.assert_allclose(far.mean_a, base.mean_a, rtol=1e-12)
    assert far.max_norm() == pytest.approx(base.max_norm(), rel=1e-12)


def test_atoms_of_zero_features_and_of_subnormal_ones():
    """Every atom 0: scale 1 and a zero mean; features whose root mean square has no finite
    inverse (the factor of the normalised atoms): a ValueError naming them."""
    from simulator.solvers.core import Atoms

    zero = Atoms.from_data(sim.PreferenceData(np.zeros((4, 2)), [1, 0, 1, 1]), 2.0, True)
    assert zero.scale == 1.0 and not zero.mean_a.any() and not zero.a.any()
    tiny = sim.PreferenceData(np.full((3, 2), 1e-310), [1, 0, 1])
    with pytest.raises(ValueError, match="root mean square"):
        Atoms.from_data(tiny, 1e200, normalise=True)


def test_newton_takes_a_fresh_hessian_where_only_it_can_end_the_run():
    """``f(x) = e^(x - 1) - x`` from ``x = 1.1`` (``g = e^(x - 1) - 1``, minimiser 1):
    Newton's steps square the error (``e+ ~ e^2 / 2``), a chord step on the Hessian at ``x_k``
    multiplies it by about ``e_k``. After the cuts ``0.1 -> 4.8e-3 -> 1.2e-5`` the chord step
    would reach ``5.7e-8`` (two more to ``tol = 1e-10``), a fresh Hessian ``6.8e-11``: Newton
    takes it, 4 evaluations and 3 Hessians instead of the chord rule's 6 and 2
    (``core._keeps_hessian``)."""
    from simulator.solvers import core

    evals, hessians = [], []

    def objective(x, state):
        evals.append(1)

        def hess():
            hessians.append(1)
            return np.exp(x - 1.0)[:, None]

        return core.InnerResult(float(np.exp(x[0] - 1.0) - x[0]), None, np.expm1(x - 1.0),
                                hess, None)

    run = core.newton(objective, np.array([1.1]), 1e-10, 50, "exp")
    assert abs(float(np.expm1(run.delta[0] - 1.0))) <= 1e-10
    assert (len(evals), len(hessians)) == (4, 3)
    # where the chord step's prediction meets tol, the Hessian is kept (the 1e-2 cut rule)
    assert core._keeps_hessian(5.3e-8, 7.8e-4, 2 * 7.8e-4, 11.5, 1e-10)
    assert not core._keeps_hessian(2.5e-7, 1.8e-3, 2 * 1.8e-3, 12.8, 1e-10)
    assert not core._keeps_hessian(1e-6, 0.02, 0.04, None, 1e-10)


def test_workspace_recycles_only_vectors_nothing_references():
    """``Workspace.fresh`` hands out a pooled vector again only once no result, view or
    name outside the pool holds it; otherwise a new one (never the same memory twice)."""
    from simulator.solvers.core import Workspace

    ws = Workspace()
    a = ws.fresh("v", 10)
    b = ws.fresh("v", 10)
    assert not np.shares_memory(a, b)
    a[:] = 1.0
    keep = a[2:]  # a view keeps its base alive
    del a
    c = ws.fresh("v", 10)
    assert not np.shares_memory(c, keep) and not np.shares_memory(c, b)
    base = keep.base
    del keep, base, c
    d = ws.fresh("v", 10)  # the first vector, referenced by the pool alone again
    e = ws.fresh("v", 10)
    assert not np.shares_memory(d, e) and not np.shares_memory(d, b)
    assert not np.shares_memory(e, b)
    assert ws.fresh("v", 7).shape == (7,)  # another size: a new vector


def test_atoms_products_reuse_no_vector_still_in_use():
    """``Atoms.matvec`` recycles its output vectors (:meth:`Workspace.fresh`): every product
    kept stays intact while new ones are made, and equals ``a @ v``."""
    from simulator.solvers.core import Atoms

    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 4))
    at = Atoms.from_data(sim.PreferenceData(x, (rng.random(500) < 0.5).astype(float)), 1.0,
                         normalise=True)
    vs = [rng.normal(size=4) for _ in range(6)]
    kept = []
    for i, v in enumerate(vs):
        out = at.matvec(v)
        if i % 2 == 0:
            kept.append((v, out))
        del out
    for v, out in kept:
        np.testing.assert_array_equal(out, at.factor * (x @ v))


@pytest.mark.parametrize("built", [False, True])
@pytest.mark.parametrize("d", [3, 20])
def test_weighted_hess_forms_row_sums_in_its_pass(d, built):
    """``weighted_hess(at, c, vectors)`` returns the Hessian alone would and ``v @ a`` for
    each vector, to rounding (atoms with and without their matrix built; below 16 columns
    the vectors are further rows of each chunk's product, whose summation order BLAS may
    choose by the rows' count)."""
    from simulator.solvers.core import Atoms, weighted_hess

    rng = np.random.default_rng(d)
    n = 9000
    data = sim.PreferenceData(rng.normal(size=(n, d)), (rng.random(n) < 0.5).astype(float))
    at = Atoms.from_data(data, 1.3, normalise=True)
    if built:
        at.a  # noqa: B018 - builds the matrix
    c, u, v = rng.random(n), rng.normal(size=n), rng.normal(size=n)
    h, (su, sv) = weighted_hess(at, c, (u, v))
    np.testing.assert_allclose(h, weighted_hess(at, c), rtol=1e-14, atol=1e-14 * np.abs(h).max())
    np.testing.assert_allclose(su, u @ at.a, rtol=1e-12, atol=1e-12 * np.abs(u @ at.a).max())
    np.testing.assert_allclose(sv, v @ at.a, rtol=1e-12, atol=1e-12 * np.abs(v @ at.a).max())


def _exp_objective(x, state=None):
    """``f(x) = e^(x - 1) - x`` (minimiser 1) as an :class:`InnerResult` with its Hessian."""
    from simulator.solvers import core

    return core.InnerResult(float(np.exp(x[0] - 1.0) - x[0]), None, np.expm1(x - 1.0),
                            lambda: np.exp(x - 1.0)[:, None], None)


def test_model_step_with_the_exact_model_lands_near_the_minimiser():
    """With the objective itself as the model, the corrected step is the chord iteration on
    ``f`` from Newton's step: from ``x = 1.1`` Newton leaves ``f'(x+) = 4.8e-3``, the
    corrected step ``f'`` below ``1e-3`` of that (each chord iteration cuts by about ``1 -
    e^-0.1 = 0.095``); a model whose gradient is not finite leaves Newton's step."""
    from simulator.solvers import core

    x = np.array([1.1])
    cur = _exp_objective(x)
    h = cur.hess()
    newton = -core.psd_solve(h, cur.grad)
    after_newton = abs(float(_exp_objective(x + newton).grad[0]))
    assert after_newton == pytest.approx(4.8e-3, rel=0.05)
    step = core._model_step(lambda p: _exp_objective(p), x, cur.grad, h, newton, 1e-10)
    assert abs(float(_exp_objective(x + step).grad[0])) <= 1e-3 * after_newton

    def broken(p):
        res = _exp_objective(p)
        return res if np.array_equal(p, x) else core.replace(res, grad=np.array([np.nan]))

    np.testing.assert_array_equal(core._model_step(broken, x, cur.grad, h, newton, 1e-10),
                                  newton)


def test_newton_with_a_model_needs_fewer_evaluations_to_the_same_minimiser():
    """Damped Newton on ``f(x) = e^(x - 1) - x`` from ``x = 1.1`` to ``tol = 1e-10``: 4
    evaluations alone (the cuts ``0.1 -> 4.8e-3 -> 1.2e-5 -> 6.8e-11``), 3 with the exact
    model correcting each step; the same minimiser."""
    from simulator.solvers import core

    counts = {}
    for model in (None, lambda p: _exp_objective(p)):
        evals = []

        def objective(x, state, evals=evals):
            evals.append(1)
            return _exp_objective(x)

        run = core.newton(objective, np.array([1.1]), 1e-10, 50, "exp", model=model)
        assert abs(run.delta[0] - 1.0) <= 1e-10
        counts[model is None] = len(evals)
    assert counts == {True: 4, False: 3}


@pytest.mark.parametrize("d, size", [(1, 3), (7, 4), (64, 20)])
def test_lbfgs_memory_gives_the_two_loop_direction(d, size):
    """The compact L-BFGS memory (``core._Memory``) gives the direction of the two-loop
    recursion (Nocedal and Wright Alg. 7.4, ``H_0 = (s . y / y . y) I`` of the newest pair) to
    rounding, as it fills, once it drops its oldest pairs, and after a clear."""
    from simulator.solvers import core

    def two_loop(g, pairs):
        r, alphas = -g, []
        for s, y, sy in reversed(pairs):
            alphas.append(float(s @ r) / sy)
            r = r - alphas[-1] * y
        if pairs:
            s, y, sy = pairs[-1]
            r = r * (sy / float(y @ y))
        for (s, y, sy), alpha in zip(pairs, reversed(alphas), strict=True):
            r = r + (alpha - float(y @ r) / sy) * s
        return r

    rng = np.random.default_rng(d)
    m = rng.standard_normal((d, d))
    hess = m @ m.T / d + 0.1 * np.eye(d)
    mem, pairs = core._Memory(d, size), []
    for it in range(3 * size):
        if it == 2 * size:
            mem.clear()
            pairs = []
        g = rng.standard_normal(d)
        ref = two_loop(g, pairs)
        np.testing.assert_allclose(mem.direction(g), ref, rtol=0, atol=1e-12 * np.abs(ref).max())
        s = rng.standard_normal(d)
        y = hess @ s
        mem.add(s, y, float(s @ y))
        pairs = (pairs + [(s, y, float(s @ y))])[-size:]
        assert len(mem) == len(pairs)


@pytest.mark.parametrize("amb", [sim.KL(0.1), sim.ChiSquare(0.1), sim.ChiSquare(5.0)])
def test_fused_evaluation_has_the_gradient_and_hessian_of_the_lazy_one(amb):
    """``hess=FUSED`` (the Hessian at once, the gradient's product in its pass) gives the
    gradient, Hessian and Hessian-vector product of ``hess=True`` to rounding, on equal and
    unequal weights (with chi-square's active set all atoms and part of them)."""
    from simulator.solvers.core import FUSED, Atoms
    from simulator.solvers.inner import evaluate_inner

    rng = np.random.default_rng(3)
    n, d = 5000, 5
    for weights in (None, (u := rng.random(n)) / u.sum()):
        data = sim.PreferenceData(rng.normal(size=(n, d)), (rng.random(n) < 0.5).astype(float),
                                  weights)
        at = Atoms.from_data(data, 1.0, normalise=True)
        delta = rng.normal(size=d)
        lazy = evaluate_inner(at, delta, amb, hess=True, worst=False)
        fused = evaluate_inner(at, delta, amb, hess=FUSED, worst=False)
        np.testing.assert_allclose(fused.grad, lazy.grad, rtol=1e-13,
                                   atol=1e-14 * np.abs(lazy.grad).max())
        h = lazy.hess()
        np.testing.assert_allclose(fused.hess(), h, rtol=1e-13, atol=1e-14 * np.abs(h).max())
        v = rng.normal(size=d)
        np.testing.assert_allclose(fused.hvp(v), lazy.hvp(v), rtol=1e-12,
                                   atol=1e-13 * np.abs(h @ v).max())


def test_fresh_hessians_are_guessed_only_where_every_rate_takes_one():
    """:func:`core._takes_fresh`: a gradient of a few 1e-3 (the subsample start's) leaves
    one to take for every quadratic rate; one whose step converges, or where the chord
    rule may keep the Hessian, is not guessed."""
    from simulator.solvers.core import _takes_fresh

    assert _takes_fresh(2e-3, 1e-10)
    assert not _takes_fresh(1e-5, 1e-10)  # K gn^2 <= 1e-9: the chord step ends the run
    assert not _takes_fresh(1e-7, 1e-10)  # converged after the step


def test_scaled_lstsq_solves_a_system_whose_rows_and_columns_span_30_decades():
    """:func:`core.scaled_lstsq` on ``R M C x = b`` (``M`` well conditioned, row and column
    scales from ``1e-15`` to ``1e15``): the solution to ``1e-10`` in every component, where
    plain ``lstsq``'s cut of small singular values drops the small-scale equations."""
    from simulator.solvers.core import scaled_lstsq

    rng = np.random.default_rng(4)
    m = np.eye(6) + 0.3 * rng.standard_normal((6, 6))
    rows, cols = 10.0 ** rng.uniform(-15, 15, 6), 10.0 ** rng.uniform(-15, 15, 6)
    a = rows[:, None] * m * cols
    x = rng.standard_normal(6) / cols
    b = a @ x
    assert np.max(np.abs(scaled_lstsq(a, b) / x - 1.0)) <= 1e-10
    plain = np.linalg.lstsq(a, b, rcond=None)[0]
    assert np.max(np.abs(plain / x - 1.0)) > 1e-3  # the test's system defeats the plain one


@pytest.mark.parametrize(("libs", "slow"), [
    ([{"internal_api": "openblas", "architecture": "Zen"}], True),
    ([{"internal_api": "openblas", "architecture": "SkylakeX"}], False),
    ([{"internal_api": "mkl", "architecture": "Zen"}], False),  # not an OpenBLAS kernel
    ([], False),
])
def test_einsum_products_only_on_the_measured_blas_kernels(libs, slow, monkeypatch):
    """``_slow_dgemv`` reads OpenBLAS's kernel from threadpoolctl: einsum's products are
    taken on the Zen kernels only (measured slower there, faster elsewhere)."""
    import threadpoolctl

    from simulator.solvers import core

    monkeypatch.setattr(threadpoolctl, "threadpool_info", lambda: libs)
    core._slow_dgemv.cache_clear()
    try:
        assert core._slow_dgemv() is slow
        x = np.zeros((core._STREAM_MIN_BYTES // (8 * 64) + 1, 64))
        assert core._streams(x) is slow
    finally:
        core._slow_dgemv.cache_clear()
