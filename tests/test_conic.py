"""The cvxpy reference solver against closed forms and independent scipy solutions (SPEC 3)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize, minimize_scalar
from scipy.special import expit, logsumexp

import simulator as sim
from simulator.solvers.conic import ConicSolveError, solve_cvxpy

BETA = 0.7
THETA_REF = np.array([0.3, -0.2, 0.1])


@pytest.fixture(scope="module")
def data() -> sim.PreferenceData:
    env = sim.FiniteEnv.random(8, 4, 3, beta=BETA, seed=3, theta_norm=3.0)
    return env.sample(200, seed=11)


def _loss_and_grad(theta, data, beta=BETA, theta_ref=THETA_REF):
    """Independent per-atom DPO loss and gradient (logistic regression on beta ytil x)."""
    a = (2 * data.y - 1)[:, None] * beta * data.x
    m = a @ (theta - theta_ref)
    return np.logaddexp(0.0, -m), -expit(-m)[:, None] * a


def _dpo_scipy(data, penalty=0.0):
    """argmin E l + penalty * ||theta - theta_ref|| by BFGS with exact gradients."""
    def f(theta):
        l, g = _loss_and_grad(theta, data)
        dlt = theta - THETA_REF
        nrm = np.linalg.norm(dlt)
        return (data.weights @ l + penalty * nrm,
                data.weights @ g + penalty * dlt / max(nrm, 1e-300))
    res = minimize(f, THETA_REF + 0.1, jac=True, method="BFGS", options={"gtol": 1e-11})
    return res.x, res.fun


def _check_certificate(sol, data, tol=1e-6):
    """Recompute E_Q* l from the worst case and check it is a valid coupling of P."""
    wc = sol.worst_case
    assert wc.weights.min() >= 0 and wc.weights.sum() == pytest.approx(1.0, abs=1e-12)
    if wc.budget is not None:  # Wasserstein: a coupling whose first marginal is P
        np.testing.assert_allclose(np.bincount(wc.source, wc.weights, minlength=data.n),
                                   data.weights, atol=1e-12)
    m = (2 * wc.y - 1) * sol.beta * (wc.x @ (sol.theta - sol.theta_ref))
    primal = wc.weights @ np.logaddexp(0.0, -m)
    assert primal == pytest.approx(sol.primal_value, abs=1e-12)
    assert abs(primal - sol.value) <= tol * max(1.0, abs(sol.value))
    assert sol.gap <= tol and sol.status == "optimal" and sol.solver.startswith("cvxpy:")


@pytest.mark.parametrize("amb", [sim.KL(0.0), sim.ChiSquare(0.0), sim.Wasserstein(0.0, p=1),
                                 sim.Wasserstein(0.0, p=1, kappa=1.0), sim.Nominal()])
def test_zero_radius_is_dpo(data, amb):
    theta_dpo, val_dpo = _dpo_scipy(data)
    sol = solve_cvxpy(data, amb, beta=BETA, theta_ref=THETA_REF)
    np.testing.assert_allclose(sol.theta, theta_dpo, atol=1e-5)
    assert sol.value == pytest.approx(val_dpo, rel=1e-7)
    _check_certificate(sol, data)
    assert sol.grad_norm < 1e-5


@pytest.mark.parametrize("rho", [0.05, 0.15])
def test_wasserstein1_is_norm_penalised_dpo(data, rho):
    theta_pen, val_pen = _dpo_scipy(data, penalty=rho * BETA)
    sol = solve_cvxpy(data, sim.Wasserstein(rho, p=1), beta=BETA, theta_ref=THETA_REF)
    np.testing.assert_allclose(sol.theta, theta_pen, atol=1e-5)
    assert sol.value == pytest.approx(val_pen, rel=1e-7)
    assert sol.dual == pytest.approx(BETA * np.linalg.norm(sol.theta - THETA_REF), rel=1e-9)
    _check_certificate(sol, data, tol=1e-8)
    wc = sol.worst_case
    assert wc.budget == rho and wc.transport_cost == pytest.approx(rho, rel=1e-9)
    moved = np.linalg.norm(wc.x - data.x[wc.source], axis=1)
    assert wc.weights @ moved == pytest.approx(wc.transport_cost, rel=1e-9)
    assert np.all(wc.y == data.y[wc.source])  # kappa = inf: no label changes
    assert sol.grad_norm < 1e-5


def test_wasserstein1_large_radius_stops_at_reference(data):
    # theta_ref is optimal iff ||E grad l(theta_ref)|| <= rho beta (subgradient of the norm)
    _, g = _loss_and_grad(THETA_REF, data)
    rho_min = np.linalg.norm(data.weights @ g) / BETA
    above = solve_cvxpy(data, sim.Wasserstein(1.05 * rho_min, p=1), beta=BETA,
                        theta_ref=THETA_REF)
    below = solve_cvxpy(data, sim.Wasserstein(0.95 * rho_min, p=1), beta=BETA,
                        theta_ref=THETA_REF)
    np.testing.assert_allclose(above.theta, THETA_REF, atol=1e-7)
    assert above.value == pytest.approx(np.log(2.0), abs=1e-9)
    assert np.linalg.norm(below.theta - THETA_REF) > 1e-3 and below.value < np.log(2.0)
    _check_certificate(above, data)
    assert above.grad_norm < 1e-6


def _w1_kappa_value(theta, data, rho, kappa):
    """sup over the p = 1 ball at fixed theta: a fractional knapsack of label flips.

    Flipping mass of atom i gains m_i per unit mass at cost kappa; moving gains b per
    unit of budget; so flip atoms by decreasing margin while m_i > b kappa.
    """
    l, _ = _loss_and_grad(theta, data)
    m = (2 * data.y - 1) * BETA * (data.x @ (theta - THETA_REF))
    b = BETA * np.linalg.norm(theta - THETA_REF)
    value, budget = data.weights @ l, rho
    for i in np.argsort(-m):
        if m[i] <= b * kappa or budget <= 0:
            break
        mass = min(data.weights[i], budget / kappa)
        value += mass * m[i]
        budget -= mass * kappa
    return value + b * budget


@pytest.mark.parametrize("rho,kappa", [(0.05, 1.0), (0.1, 0.5), (0.2, 4.0)])
def test_wasserstein1_finite_kappa(data, rho, kappa):
    sol = solve_cvxpy(data, sim.Wasserstein(rho, p=1, kappa=kappa), beta=BETA,
                      theta_ref=THETA_REF)
    assert sol.value == pytest.approx(_w1_kappa_value(sol.theta, data, rho, kappa), rel=1e-7)
    _check_certificate(sol, data)
    wc = sol.worst_case
    cost = wc.weights @ (np.linalg.norm(wc.x - data.x[wc.source], axis=1)
                         + kappa * (wc.y != data.y[wc.source]))
    assert cost == pytest.approx(wc.transport_cost, rel=1e-9)
    assert cost <= rho * (1 + 1e-9)
    # the minimiser: no small step lowers the (independently evaluated) objective
    base = _w1_kappa_value(sol.theta, data, rho, kappa)
    for step in 1e-3 * np.vstack([np.eye(3), -np.eye(3)]):
        assert _w1_kappa_value(sol.theta + step, data, rho, kappa) >= base - 1e-9
    assert sol.grad_norm < 1e-4


def test_finite_kappa_large_is_kappa_inf(data):
    inf = solve_cvxpy(data, sim.Wasserstein(0.1, p=1), beta=BETA, theta_ref=THETA_REF)
    big = solve_cvxpy(data, sim.Wasserstein(0.1, p=1, kappa=1e3), beta=BETA,
                      theta_ref=THETA_REF)
    np.testing.assert_allclose(big.theta, inf.theta, atol=1e-5)
    assert big.value == pytest.approx(inf.value, rel=1e-7)
    assert big.info["flipped_mass"] < 1e-8


def _kl_scipy(data, rho):
    """argmin over (theta, log lambda) of lambda rho + lambda log E exp(l / lambda)."""
    def f(z):
        theta, lam = z[:-1], np.exp(z[-1])
        l, g = _loss_and_grad(theta, data)
        lse = logsumexp(l / lam, b=data.weights)
        q = data.weights * np.exp(l / lam - lse)
        val = lam * rho + lam * lse
        return val, np.append(q @ g, lam * (rho + lse - q @ l / lam))
    res = minimize(f, np.append(THETA_REF, 0.0), jac=True, method="BFGS",
                   options={"gtol": 1e-11})
    return res.x[:-1], np.exp(res.x[-1]), res.fun


@pytest.mark.parametrize("rho", [0.02, 0.1])
def test_kl_against_scipy_dual(data, rho):
    theta, lam, val = _kl_scipy(data, rho)
    sol = solve_cvxpy(data, sim.KL(rho), beta=BETA, theta_ref=THETA_REF)
    np.testing.assert_allclose(sol.theta, theta, atol=1e-5)
    assert sol.dual == pytest.approx(lam, rel=1e-4)
    assert sol.value == pytest.approx(val, rel=1e-7)
    _check_certificate(sol, data)
    q, w = sol.worst_case.weights, data.weights
    assert np.sum(q * np.log(q / w)) == pytest.approx(rho, abs=1e-6)
    assert sol.info["divergence"] <= rho + 1e-6


def test_kl_large_radius_is_min_max_loss(data):
    # Non-separable data: min_theta max_i l_i = log 2 at theta = theta_ref, and once
    # rho >= -log P(argmax) = 0 there, lambda* = 0 and L = max l.
    lp = minimize_scalar(lambda lam: lam * 5.0 + lam * logsumexp(
        _loss_and_grad(THETA_REF + 0.3, data)[0] / lam, b=data.weights), bounds=(1e-6, 50),
        method="bounded")
    sol = solve_cvxpy(data, sim.KL(5.0), beta=BETA, theta_ref=THETA_REF)
    l, _ = _loss_and_grad(sol.theta, data)
    assert sol.value == pytest.approx(np.log(2.0), abs=1e-7)
    assert l.max() == pytest.approx(sol.value, abs=1e-7)
    np.testing.assert_allclose(sol.theta, THETA_REF, atol=1e-6)
    assert sol.dual < 1e-6 and lp.fun > sol.value  # any other theta is worse
    _check_certificate(sol, data)
    assert sol.info["divergence"] <= 5.0


def test_kl_value_increases_with_radius(data):
    vals = [solve_cvxpy(data, sim.KL(r), beta=BETA, theta_ref=THETA_REF).value
            for r in (0.0, 0.01, 0.1, 1.0)]
    assert np.all(np.diff(vals) > 0) and vals[-1] <= np.log(2.0) + 1e-7


def test_chi_square_small_radius_is_variance_expansion(data):
    rho = 0.01

    def surrogate(theta):
        l, _ = _loss_and_grad(theta, data)
        mean = data.weights @ l
        return mean + np.sqrt(rho * (data.weights @ (l - mean) ** 2))

    sol = solve_cvxpy(data, sim.ChiSquare(rho), beta=BETA, theta_ref=THETA_REF)
    l, _ = _loss_and_grad(sol.theta, data)
    mean, sd = data.weights @ l, np.sqrt(data.weights @ (l - data.weights @ l) ** 2)
    assert np.all(1 + np.sqrt(rho) * (l - mean) / sd >= 0)  # the closed-form regime
    assert sol.value == pytest.approx(surrogate(sol.theta), rel=1e-7)
    res = minimize(surrogate, sol.theta + 0.05, method="Nelder-Mead",
                   options={"xatol": 1e-9, "fatol": 1e-13, "maxiter": 20000})
    np.testing.assert_allclose(sol.theta, res.x, atol=1e-4)
    assert sol.value <= res.fun + 1e-10
    _check_certificate(sol, data)
    assert sol.info["divergence"] == pytest.approx(rho, abs=1e-6)
    assert sol.grad_norm < 1e-5


def test_chi_square_large_radius_hits_max_loss(data):
    sol = solve_cvxpy(data, sim.ChiSquare(50.0), beta=BETA, theta_ref=THETA_REF)
    assert sol.value == pytest.approx(np.log(2.0), abs=1e-7)
    _check_certificate(sol, data)
    assert sol.info["divergence"] <= 50.0


def test_population_weights_equal_replicated_sample():
    env = sim.FiniteEnv.random(3, 3, 2, seed=5)
    pop = env.population()
    counts = np.random.default_rng(0).integers(1, 4, pop.n)
    weighted = sim.PreferenceData(pop.x, pop.y, counts / counts.sum())
    idx = np.repeat(np.arange(pop.n), counts)
    replicated = sim.PreferenceData(pop.x[idx], pop.y[idx])
    for amb in (sim.KL(0.1), sim.ChiSquare(0.1), sim.Wasserstein(0.1, p=1, kappa=2.0)):
        a, b = solve_cvxpy(weighted, amb), solve_cvxpy(replicated, amb)
        np.testing.assert_allclose(a.theta, b.theta, atol=1e-5)
        assert a.value == pytest.approx(b.value, rel=1e-7)


def test_zero_weight_atoms_change_nothing(data):
    # an atom of weight zero far away with the opposite label must not move the optimum
    x = np.vstack([data.x, 5 * data.x[:1]])
    y = np.append(data.y, 1 - data.y[0])
    padded = sim.PreferenceData(x, y, np.append(data.weights, 0.0))
    for amb in (sim.KL(5.0), sim.KL(0.1), sim.ChiSquare(0.2), sim.Wasserstein(0.1, p=1, kappa=1.0)):
        a = solve_cvxpy(data, amb, beta=BETA, theta_ref=THETA_REF)
        b = solve_cvxpy(padded, amb, beta=BETA, theta_ref=THETA_REF)
        np.testing.assert_allclose(a.theta, b.theta, atol=1e-5)
        assert a.value == pytest.approx(b.value, rel=1e-7)
        assert b.worst_case.weights[b.worst_case.source == data.n].sum() == 0.0
        _check_certificate(b, padded)


def test_fallback_after_clarabel_failure(data):
    ref = solve_cvxpy(data, sim.KL(0.1), beta=BETA, theta_ref=THETA_REF)
    scs = ("SCS", {"eps_abs": 1e-9, "eps_rel": 1e-9, "max_iters": 200_000})
    sol = solve_cvxpy(data, sim.KL(0.1), beta=BETA, theta_ref=THETA_REF,
                      solvers=["NOSUCH", ("CLARABEL", {"max_iter": 2}), scs])
    assert sol.solver == "cvxpy:SCS"
    statuses = [(a["solver"], a["status"]) for a in sol.info["attempts"]]
    assert statuses[:2] == [("NOSUCH", "not installed"), ("CLARABEL", "user_limit")]
    np.testing.assert_allclose(sol.theta, ref.theta, atol=1e-5)
    assert sol.value == pytest.approx(ref.value, rel=1e-7)
    _check_certificate(sol, data)


def test_all_solvers_fail_names_statuses(data):
    with pytest.raises(ValueError, match="CLARABEL \\(rescaled\\): user_limit.*SCS.*CLARABEL: "):
        solve_cvxpy(data, sim.KL(0.1), solvers=[("CLARABEL", {"max_iter": 2}),
                                                ("SCS", {"max_iters": 3})])
    with pytest.raises(ConicSolveError) as err:
        solve_cvxpy(data, sim.Nominal(), solvers=[("CLARABEL", {"max_iter": 1})])
    assert [a["rescaled"] for a in err.value.attempts] == [True, False]


def test_budget_per_attempt_is_passed_and_named(data):
    # defect 7: each attempt runs under a time and iteration budget given in the solver's
    # own option names, and the error says which budget ran out
    with pytest.raises(ConicSolveError, match=r"CLARABEL \(rescaled\): user_limit \(time limit "
                       r"1e-06 s ran out\).*raise time_limit / max_iter") as err:
        solve_cvxpy(data, sim.KL(0.1), solvers=["CLARABEL", "SCS"], time_limit=1e-6)
    clarabel, scs = err.value.attempts[:2]
    assert clarabel["options"] == {"time_limit": 1e-6, "max_iter": 500}
    assert scs["options"] == {"time_limit_secs": 1e-6, "max_iters": 200_000}
    assert scs["budget"] == "time limit 1e-06 s"
    with pytest.raises(ConicSolveError, match=r"\(iteration limit 2 ran out\)") as err:
        solve_cvxpy(data, sim.KL(0.1), solvers=["CLARABEL"], max_iter=2)
    assert [a["budget"] for a in err.value.attempts] == ["iteration limit 2"] * 2
    # options given in the chain override the budget
    sol = solve_cvxpy(data, sim.KL(0.1), solvers=[("CLARABEL", {"max_iter": 200})], max_iter=2)
    assert sol.info["attempts"][0]["options"]["max_iter"] == 200


def _strictly_separable(n=200, d=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    return x, (x @ rng.standard_normal(d) > 0).astype(float)


@pytest.mark.parametrize("scale", [1.0, 1e-12, 1e8])
def test_separable_data_raise_before_any_conic_solve(scale):
    # defect 7: separable KL data (n = 200) ran every solver of the chain for 543 s and
    # raised ConicSolveError; the separability check now runs first and is scale-free,
    # so a chain that cannot solve anything is never reached
    x, y = _strictly_separable()
    data = sim.PreferenceData(scale * x, y)
    for amb in (sim.Nominal(), sim.KL(0.1), sim.KL(5.0), sim.ChiSquare(0.3)):
        with pytest.raises(ValueError, match="data are linearly separable"):
            solve_cvxpy(data, amb, solvers=[("CLARABEL", {"max_iter": 1})])


def test_weakly_separable_data_depend_on_the_worst_case():
    # e = (1, 0) keeps every margin >= 0 and the first one > 0, but no direction makes all
    # three positive: DPO has no minimiser, nor have KL / chi-square when Q* charges atom 0;
    # at a large radius Q* sits on the tied atoms 1, 2, whose losses l(t) and l(-t) give
    # L >= max(l(t), l(-t)) >= log 2 = L(theta_ref): a minimiser exists
    data = sim.PreferenceData(np.array([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]), [1, 1, 1])
    for amb in (sim.Nominal(), sim.KL(0.1), sim.ChiSquare(0.1)):
        with pytest.raises(ValueError, match="data are linearly separable along theta - "
                           r"theta_ref = t \* array\(\[ 1\., -?0\.\]\)"):
            solve_cvxpy(data, amb)
    for amb in (sim.KL(5.0), sim.ChiSquare(5.0)):
        sol = solve_cvxpy(data, amb)
        assert sol.value == pytest.approx(np.log(2.0), rel=1e-9)
        np.testing.assert_allclose(sol.worst_case.weights, [0.0, 0.5, 0.5], atol=1e-7)


@pytest.mark.parametrize("scale", [1e-12, 1e8])
@pytest.mark.parametrize("amb", [sim.KL(0.1), sim.ChiSquare(0.2), sim.Wasserstein(0.1, p=1),
                                 sim.Wasserstein(0.05, p=1, kappa=1.0)])
def test_feature_scale_equivariance(data, amb, scale):
    # defect 7: features x 1e-12 were called "linearly separable" and features x 1e8 ran
    # for 1104 s; scaling the features (and rho, kappa of Wasserstein) by c maps theta - theta_ref
    # to (theta - theta_ref) / c, and the equilibrated problem (tried first) solves it
    ref = solve_cvxpy(data, amb, beta=BETA, theta_ref=THETA_REF)
    scaled = sim.PreferenceData(scale * data.x, data.y)
    amb_c = sim.Wasserstein(scale * amb.rho, p=1, kappa=scale * amb.kappa) if isinstance(
        amb, sim.Wasserstein) else amb
    sol = solve_cvxpy(scaled, amb_c, beta=BETA, theta_ref=THETA_REF / scale)
    assert sol.info["rescaled"]
    np.testing.assert_allclose(scale * sol.theta, scale * sol.theta_ref + ref.theta - THETA_REF,
                               atol=1e-5)
    assert sol.value == pytest.approx(ref.value, rel=1e-7)
    if isinstance(amb, sim.Wasserstein):  # lambda is loss per unit of transport
        assert scale * sol.dual == pytest.approx(ref.dual, rel=1e-5, abs=1e-8)
    _check_certificate(sol, scaled)


@pytest.mark.parametrize("amb", [sim.KL(0.1), sim.ChiSquare(0.2), sim.Wasserstein(0.1, p=1),
                                 sim.Wasserstein(0.1, p=1, kappa=1.0)])
def test_rescaled_problem_has_same_optimum(data, amb):
    plain, scaled = (solve_cvxpy(data, amb, beta=BETA, theta_ref=THETA_REF, rescale=r)
                     for r in (False, True))
    assert not plain.info["rescaled"] and scaled.info["rescaled"]
    assert all(a["rescaled"] for a in scaled.info["attempts"])
    np.testing.assert_allclose(plain.theta, scaled.theta, atol=1e-5)
    assert plain.value == pytest.approx(scaled.value, rel=1e-7)
    _check_certificate(scaled, data)


def test_separable_data_has_no_minimiser():
    # every margin can be made positive: DPO, KL and chi-square have no minimiser, and
    # the solver must say so instead of returning the large theta where it stopped
    data = sim.PreferenceData(np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [1.0, -0.2]]),
                              [1, 1, 1, 0])
    for amb in (sim.Nominal(), sim.KL(0.1), sim.KL(5.0), sim.ChiSquare(0.3),
                sim.Wasserstein(0.0, p=1, kappa=1.0)):
        with pytest.raises(ValueError, match="data are linearly separable"):
            solve_cvxpy(data, amb)
    # the Wasserstein norm term keeps theta bounded: DPO + rho beta ||theta||
    sol = solve_cvxpy(data, sim.Wasserstein(0.1, p=1))
    a = data.ytil[:, None] * data.x
    res = minimize(lambda t: data.weights @ np.logaddexp(0, -a @ t) + 0.1 * np.linalg.norm(t),
                   np.ones(2), method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-14})
    np.testing.assert_allclose(sol.theta, res.x, atol=1e-5)


def test_bad_input(data):
    with pytest.raises(ValueError, match="solver='dual'"):
        solve_cvxpy(data, sim.Wasserstein(0.1, p=2))
    with pytest.raises(ValueError, match="beta"):
        solve_cvxpy(data, sim.KL(0.1), beta=-1.0)
    with pytest.raises(ValueError, match="theta_ref"):
        solve_cvxpy(data, sim.KL(0.1), theta_ref=np.zeros(5))
    with pytest.raises(ValueError, match="data"):
        solve_cvxpy((data.x, data.y), sim.KL(0.1))
    with pytest.raises(ValueError, match="ambiguity"):
        solve_cvxpy(data, "kl")
    with pytest.raises(ValueError, match="solvers"):
        solve_cvxpy(data, sim.KL(0.1), solvers="CLARABEL")
    with pytest.raises(ValueError, match="solvers"):
        solve_cvxpy(data, sim.KL(0.1), solvers=[("CLARABEL", {}, 1)])
    with pytest.raises(ValueError, match="solvers"):
        solve_cvxpy(data, sim.KL(0.1), solvers=("CLARABEL", {}))
    with pytest.raises(ValueError, match="rescale"):
        solve_cvxpy(data, sim.KL(0.1), rescale="yes")
    with pytest.raises(ValueError, match="time_limit"):
        solve_cvxpy(data, sim.KL(0.1), time_limit=0.0)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="max_iter must be a positive integer"):
            solve_cvxpy(data, sim.KL(0.1), max_iter=bad)
