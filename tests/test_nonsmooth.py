"""The non-smooth Wasserstein duals: faces, certificates, jumps of E cost (SPEC 3.3, 3.4).

Each test compares against an independent computation: a bracketing root finder, weak
duality at random points, the same solver with an accelerator switched off, or the
convexity of the one-dimensional dual in ``lambda``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.special import expit

import simulator as sim
from simulator.solvers import core, dual, wasserstein1, wasserstein2
from simulator.solvers.inner import Atoms, evaluate_inner
from simulator.solvers.wasserstein1 import _flip_threshold, w1_lagrangian

# --- Wasserstein p = 1, finite kappa ------------------------------------------------------


@pytest.mark.parametrize("mu", [1e-1, 1e-3, 1e-6, 1e-10])
@pytest.mark.parametrize("t0", [None, -1.0, 1.0, 1.6, 3.0])
def test_flip_threshold_matches_brentq(mu, t0):
    rng = np.random.default_rng(1)
    m = rng.standard_normal(20_000)
    w = rng.random(m.size)
    w /= w.sum()
    c = 0.05
    t, p, _ = _flip_threshold(m, w, -0.5, c, mu, t0)
    assert abs(float(w @ p) - c) <= 1e-15  # the budget is met to rounding
    excess = lambda s: float(w @ expit((m - s) / mu)) - c  # noqa: E731
    # the mass is flat between atoms at small mu: compare the masses, not the roots
    root = brentq(excess, -0.5, 10.0, xtol=1e-15, rtol=1e-15)
    lo, hi = sorted((t, root))
    assert excess(lo - 1e-9) >= -1e-15 and excess(hi + 1e-9) <= 1e-15
    # threshold at t_min when the budget is not all flipped there
    t, p, _ = _flip_threshold(m, w, 2.5, c, mu, t0)
    assert t == 2.5 and float(w @ p) <= c


@pytest.mark.parametrize("seed", range(4))
def test_w1_lagrangian_is_a_lower_bound(seed, gaussian_data):
    """Weak duality: min L_q <= F(delta) for every q in Q and every delta."""
    data = gaussian_data(300, seed=seed)
    amb = sim.Wasserstein(0.1, p=1, kappa=0.7)
    at = Atoms.from_data(data, 1.0)
    rng = np.random.default_rng(seed)
    q = at.w * rng.random(at.w.size)
    q *= min(1.0, amb.rho / amb.kappa / q.sum()) * rng.random()
    lower = wasserstein1.lower_bound(at, amb, rng.standard_normal(4),
                                     wasserstein1._Masses.of(q), 1e-10, 100)
    objective = w1_lagrangian(at, q, amb.rho, amb.kappa)
    for delta in rng.standard_normal((50, 4)) * 2:
        assert evaluate_inner(at, delta, amb, worst=False).value >= lower - 1e-12
        assert objective(delta, None).value >= lower - 1e-12


@pytest.mark.parametrize("seed", range(6))
def test_w1_face_polish_equals_the_plain_homotopy(seed, monkeypatch, gaussian_data):
    """The polished face and the homotopy run down to mu = 1e-11: the same minimiser."""
    data = gaussian_data(400, seed=seed)
    amb = sim.Wasserstein(0.05 + 0.05 * seed, p=1, kappa=0.5 + 0.3 * seed)
    sol = sim.solve(data, amb)
    assert sol.info["optimality_gap"] <= 1e-13
    monkeypatch.setattr(wasserstein1, "polish_face", lambda *args, **kwargs: None)
    monkeypatch.setattr(wasserstein1, "GAP_TOL", 0.0)  # run every stage
    monkeypatch.setattr(wasserstein1, "GAP_MAX", math.inf)
    plain = sim.solve(data, amb)
    np.testing.assert_allclose(sol.theta, plain.theta, atol=1e-8)
    assert sol.value <= plain.value + 1e-13


def test_w1_face_polish_starts_from_the_atoms_nearest_the_threshold(monkeypatch,
                                                                    gaussian_data):
    """A window of 11 atoms (a face ties at most d + 1 = 5): started from those nearest the
    threshold, the polish finds the exact face (certified gap 0, the solver's minimiser);
    without that start it gives up."""
    data = gaussian_data(20_000, seed=3)
    amb = sim.Wasserstein(0.05, p=1, kappa=1.0)
    at, mu = Atoms.from_data(data, 1.0), 5e-4
    run = core.newton(lambda d, st: wasserstein1.smoothed_w1(at, d, amb.rho, amb.kappa, mu, st),
                      dual._start(at), 1e-3 * mu, 100, "test")
    share = run.state.q / at.w
    assert 5 < np.count_nonzero((share > 1e-3) & (share < 1 - 1e-3)) <= 4 * 5
    face = wasserstein1.polish_face(at, run.delta, run.state, amb.rho,
                                    amb.kappa, 1e-10)
    cert = wasserstein1._certify(at, amb, face.delta, face.masses, 1e-10, 100,
                                 wasserstein1._Logistic())
    assert cert.gap <= 1e-13
    np.testing.assert_allclose(face.delta, sim.solve(data, amb).theta, atol=1e-8)
    monkeypatch.setattr(wasserstein1, "_FACE_TRIM", 1)
    assert wasserstein1.polish_face(at, run.delta, run.state, amb.rho,
                                    amb.kappa, 1e-10) is None


def test_w1_face_polish_solves_a_face_that_ties_no_atom():
    """lambda = b with no atom at the threshold kappa b (the nearest 4e-3 away): F is smooth
    near its minimiser. From a smoothing whose window still holds a group of repeated
    atoms, the polish moves that group off the face and solves the face that ties none
    (it gave up there before): certified gap 0, the solver's minimiser."""
    env = sim.FiniteEnv.random(n_states=30, n_actions=4, dim=4, beta=1.0, seed=0,
                               theta_norm=3.0)
    data = env.sample(3000, seed=1)
    amb = sim.Wasserstein(0.05, p=1, kappa=1.0)
    at, mu = Atoms.from_data(data, 1.0), 1e-3
    run = core.newton(lambda d, st: wasserstein1.smoothed_w1(at, d, amb.rho, amb.kappa, mu, st),
                      dual._start(at), 1e-3 * mu, 100, "test")
    share = run.state.q / at.w
    assert np.any((share > 1e-3) & (share < 1 - 1e-3))
    face = wasserstein1.polish_face(at, run.delta, run.state, amb.rho,
                                    amb.kappa, 1e-10)
    assert face is not None
    q = face.masses.dense(at.w.size)
    assert np.all((q == 0.0) | (q == at.w))
    m = at.a @ face.delta
    kb = amb.kappa * at.beta * np.linalg.norm(face.delta)
    assert np.min(np.abs(m - kb)) > 1e-3  # no atom at the threshold
    cert = wasserstein1._certify(at, amb, face.delta, face.masses, 1e-10, 100,
                                 wasserstein1._Logistic())
    assert cert.gap <= 1e-13
    np.testing.assert_allclose(face.delta, sim.solve(data, amb).theta, atol=1e-8)


@pytest.mark.parametrize(("states", "dim", "n", "seed", "clamped"), [
    (200, 8, 30_000, 0, True),  # 22 atoms in 3 groups: tying all 3 took 8 rounds
    (500, 8, 50_000, 0, True),  # 47 atoms in 9 groups (> d): the atom count gave up
    (200, 4, 20_000, 1, False),  # 108 atoms in 15 groups (> d + 1): the atom count gave up
])
def test_w1_face_polish_counts_groups_of_repeated_atoms(states, dim, n, seed, clamped):
    """Repeated atoms: the window at mu = 1e-3 holds many atoms in a few groups of identical
    ones. Counted and trimmed by group (and, with lambda = b, started from the groups of
    share near 1/2 tied), the polish solves the exact face in one round: certified gap
    below 1e-13, the solver's minimiser (before, it gave up or needed 8 rounds)."""
    env = sim.FiniteEnv.random(n_states=states, n_actions=6, dim=dim, beta=1.0, seed=seed,
                               theta_norm=3.0)
    data = env.sample(n, seed=seed + 1)
    amb = sim.Wasserstein(0.05, p=1, kappa=1.0)
    at, mu = Atoms.from_data(data, 1.0), 1e-3
    run = core.newton(lambda d, st: wasserstein1.smoothed_w1(at, d, amb.rho, amb.kappa, mu, st),
                      dual._start(at), 1e-3 * mu, 100, "test")
    share = run.state.q / at.w
    window = np.flatnonzero((share > 1e-3) & (share < 1 - 1e-3))
    groups = np.unique(at.a[window], axis=0).shape[0]
    assert 3 * groups <= window.size  # several atoms per group
    assert (run.state.lam <= at.beta * np.linalg.norm(run.delta)) == clamped  # lambda = b
    face = wasserstein1.polish_face(at, run.delta, run.state, amb.rho,
                                    amb.kappa, 1e-10, rounds=1)
    assert face is not None
    cert = wasserstein1._certify(at, amb, face.delta, face.masses, 1e-10, 100,
                                 wasserstein1._Logistic())
    assert cert.gap <= 1e-13
    np.testing.assert_allclose(face.delta, sim.solve(data, amb).theta, atol=1e-8)


@pytest.mark.parametrize("seed", range(40))
def test_w1_threshold_atom_equals_a_full_sort(seed):
    """The exact flip threshold atom from a bracketed window: the same margin as sorting
    every atom above the cut (ties, zero weights, budgets above the mass, every size); the
    atoms it returns hold every atom at and above the threshold (every atom above the cut
    where there is none), with their margins and weights."""
    rng = np.random.default_rng(seed)
    n = int(rng.choice([1, 7, 300, 20_000, 150_000]))
    m = rng.standard_normal(n)
    if seed % 3 == 1:
        m = np.round(m, 1)  # ties
    elif seed % 3 == 2:
        m = rng.choice(rng.standard_normal(5), n)  # few distinct margins
    w = rng.random(n) * (rng.random(n) < 0.5 if seed % 4 == 0 else 1.0)
    w = w / w.sum() if w.sum() > 0 else np.full(n, 1.0 / n)
    rho, kappa = float(rng.choice([1e-4, 0.05, 0.5, 3.0])), float(rng.choice([0.3, 1.0, 5.0]))
    cut = float(rng.choice([0.0, 0.5, -10.0]))
    cand = np.flatnonzero(m > cut)
    order = cand[np.argsort(-m[cand], kind="stable")]
    j = int(np.searchsorted(kappa * np.cumsum(w[order]), rho, side="right"))
    above = wasserstein1._threshold_atom(m, w, cut, rho, kappa)
    k = above.k
    np.testing.assert_array_equal(above.m, m[above.sel])
    np.testing.assert_array_equal(above.w, w[above.sel])
    if j == order.size:
        assert k == -1
        np.testing.assert_array_equal(above.sel, cand)
    else:
        assert k >= 0 and m[k] == m[order[j]]
        assert np.all(np.diff(above.sel) > 0)
        assert np.isin(np.flatnonzero(m >= m[k]), above.sel).all()


def test_w1_rough_hessian_far_out_and_the_exact_one_near_the_minimiser():
    """Far from the last Hessian (or at the first) the Hessian of E l comes from every j-th
    atom, within a few percent of the exact one; it is never reused: at the same margins
    the next call builds the exact one."""
    rng = np.random.default_rng(0)
    n, d = 400_000, 4
    a = rng.standard_normal((n, d))
    at = Atoms(a, np.ones(n), rng.random(n) / n * 2.0, np.ones(n), 1.0,
               radius=float(np.sqrt(np.max(np.einsum("ij,ij->i", a, a)))))
    delta = rng.standard_normal(d)
    pt = wasserstein1._LogisticPoint(at, delta)
    exact = core.weighted_hess(at, at.w * pt.s * (1.0 - pt.s))
    cache = wasserstein1._Logistic()
    rough = cache.hess(at, pt)
    assert not np.array_equal(rough, exact)
    assert np.linalg.norm(rough - exact) <= 0.05 * np.linalg.norm(exact)
    np.testing.assert_array_equal(cache.hess(at, pt), exact)
    # reused while radius ||step|| bounds the margins' move by 1e-3
    for step in (1e-4 / at.radius, 0.9e-3 / at.radius):
        near = wasserstein1._LogisticPoint(at, delta + step * np.ones(d) / np.sqrt(d))
        np.testing.assert_array_equal(cache.hess(at, near), exact)
    far = wasserstein1._LogisticPoint(at, delta + 1.5e-3 * np.ones(d) / np.sqrt(d))
    assert 1e-3 < np.max(np.abs(far.m - pt.m)) < 1e-2  # rebuilt, from every atom
    moved = core.weighted_hess(at, at.w * far.s * (1.0 - far.s))
    np.testing.assert_allclose(cache.hess(at, far), moved, rtol=1e-13)


def test_w1_final_evaluation_reusing_the_threshold_is_the_exact_one(gaussian_data):
    """The solve's last evaluation takes the flip threshold of the certificate's: the same
    value, dual and worst case as a fresh exact evaluation at its theta."""
    data = gaussian_data(3000, seed=2)
    amb = sim.Wasserstein(0.05, p=1, kappa=1.0)
    sol = sim.solve(data, amb)
    ev = sim.robust_objective(sol.theta, data, amb)
    assert sol.value == pytest.approx(ev.value, rel=1e-14)
    assert sol.dual == pytest.approx(ev.dual, rel=1e-12)
    assert sol.primal_value == pytest.approx(ev.primal_value, rel=1e-13)
    assert sol.info["transport_cost"] == pytest.approx(ev.worst_case.transport_cost, rel=1e-12)


def test_w1_certificate_bounds_every_perturbation(gaussian_data):
    data = gaussian_data(500, seed=7)
    amb = sim.Wasserstein(0.08, p=1, kappa=0.9)
    sol = sim.solve(data, amb)
    gap = sol.info["optimality_gap"]
    assert gap <= 1e-13
    rng = np.random.default_rng(0)
    for v in rng.standard_normal((200, data.d)):
        for eps in (1e-6, 1e-3):
            val = sim.robust_objective(sol.theta + eps * v / np.linalg.norm(v), data, amb).value
            assert val >= sol.value - gap * max(1.0, sol.value) - 1e-15


def test_w1_reference_optimal_through_flips_alone(random_case):
    """theta_ref is the minimiser only because of label flips (the kappa = inf test says
    no): the flip-share zero test proves it (before it, the homotopy tended to it and its
    certificate proved it)."""
    data, amb, beta, ref = random_case(94, "wdpo1_kappa")
    at = Atoms.from_data(data, beta)
    assert not dual._zero_is_optimal(at, sim.Wasserstein(amb.rho, p=1))
    assert dual._zero_is_optimal(at, amb)
    sol = sim.solve(data, amb, beta=beta, theta_ref=ref)
    assert np.all(sol.theta == ref) and sol.value == pytest.approx(math.log(2), abs=1e-15)
    assert sol.info["optimality_gap"] <= 1e-13
    conic = sim.solve(data, amb, beta=beta, theta_ref=ref, solver="cvxpy")
    assert np.max(np.abs(conic.theta - ref)) < 1e-6


# --- Wasserstein p = 2: the search for lambda* ---------------------------------------------


def _cost(m, b, lam, kappa, w):
    return float(w @ wasserstein2._moves(m, b, lam, kappa).cost)


@pytest.mark.parametrize("kappa", [0.5, 1.0, math.inf])
@pytest.mark.parametrize("n", [2_000, 50_000])
def test_lambda_search_brackets_the_budget(kappa, n):
    """lambda* minimises the convex G: E cost >= rho^2 just below it and <= just above."""
    rng = np.random.default_rng(n)
    m = rng.standard_normal(n) * 2.0
    w = np.full(n, 1.0 / n)
    b, rho = 1.3, 0.3
    hi, lo = wasserstein2.solve_lambda(m, w, b, rho, kappa)
    lam = hi.lam
    assert lo.lam <= hi.lam <= lo.lam * (1 + 1e-12)
    assert _cost(m, b, lo.lam * (1 - 1e-12), kappa, w) >= rho**2 - 1e-14
    assert _cost(m, b, lam * (1 + 1e-12), kappa, w) <= rho**2 + 1e-14

    def G(x):  # noqa: N802
        return x * rho**2 + float(w @ wasserstein2._moves(m, b, x, kappa).value)

    for f in (1e-9, 1e-6, 1e-3):
        assert G(lam) <= min(G(lam * (1 + f)), G(lam * (1 - f))) + 1e-15


@pytest.mark.parametrize("shift", [0.0, 1e-9, 1e-6, 1e-3])
def test_lambda_search_from_a_previous_jump(shift, monkeypatch):
    """Starting from an earlier search that ended at a jump gives the same lambda*."""
    rng = np.random.default_rng(8)
    n, b, rho, kappa = 50_000, 1.3, 0.3, 0.5
    m = rng.standard_normal(n) * 2.0
    w = np.full(n, 1.0 / n)
    first = wasserstein2.solve_lambda(m, w, b, rho, kappa)
    assert first[0] is not first[1]  # ended at a jump
    moves = wasserstein2._moves
    moved = m + shift * rng.standard_normal(n)
    cold = wasserstein2.solve_lambda(moved, w, b, rho, kappa)
    calls = []
    monkeypatch.setattr(wasserstein2, "_moves", lambda *a: calls.append(1) or moves(*a))
    warm = wasserstein2.solve_lambda(moved, w, b, rho, kappa, first[0].lam, (), first)
    assert warm[0].lam == pytest.approx(cold[0].lam, rel=1e-12)
    if shift <= 1e-6:  # the same atom still switches there: both sides, nothing else
        assert len(calls) == 2
    assert _cost(moved, b, warm[1].lam * (1 - 1e-12), kappa, w) >= rho**2 - 1e-14
    assert _cost(moved, b, warm[0].lam * (1 + 1e-12), kappa, w) <= rho**2 + 1e-14


def test_switch_points_are_ties():
    """Where an atom switches branch, both branches have the same value."""
    rng = np.random.default_rng(3)
    m = np.concatenate([rng.uniform(0.5, 3.0, 40), [2.0, 2.0]])
    b, kappa = 2.0, 0.6
    lams = np.linspace(0.05, 2.0, 400)
    moves = [wasserstein2._moves(m, b, x, kappa) for x in lams]
    checked = 0
    for a, c in zip(moves, moves[1:], strict=False):
        idx = np.flatnonzero((a.flip != c.flip) | (a.right != c.right))
        if idx.size == 0 or 2 * a.lam / b**2 >= 0.25 and not (a.flip != c.flip).any():
            continue
        pts, drop = wasserstein2._switch_points(m, b, kappa, a, c, idx)
        for i, lam, dr in zip(idx, pts, drop, strict=True):
            if a.flip[i] == c.flip[i] and 2 * a.lam / b**2 >= 0.25:
                continue
            va, ca = wasserstein2._branch(m[i:i + 1], b, lam, kappa, a.flip[i:i + 1],
                                          a.right[i:i + 1])
            vb, cb = wasserstein2._branch(m[i:i + 1], b, lam, kappa, c.flip[i:i + 1],
                                          c.right[i:i + 1])
            assert a.lam <= lam <= c.lam
            assert va[0] == pytest.approx(vb[0], abs=1e-13)
            assert dr == pytest.approx(ca[0] - cb[0]) and dr > 0
            checked += 1
    assert checked >= 5


def test_w2_kink_with_three_tied_atoms():
    """An environment sample whose p = 2, finite-kappa minimiser has several atoms tied:
    the active-set KKT fallback finds it (no descent in 600 random directions)."""
    rng = np.random.default_rng(7)
    env = sim.FiniteEnv.random(int(rng.integers(3, 15)), int(rng.integers(2, 6)),
                               int(rng.integers(2, 6)), beta=float(rng.uniform(0.5, 2)), seed=7,
                               theta_norm=float(rng.uniform(0.5, 4)))
    env.population()
    data = env.sample(int(rng.integers(50, 2000)), seed=7)
    amb = sim.Wasserstein(0.2, p=2, kappa=1.0)
    sol = sim.solve(data, amb, beta=env.beta)
    assert sol.gap < 1e-12
    assert sol.worst_case.transport_cost == pytest.approx(amb.rho**2, rel=1e-12)
    directions = np.random.default_rng(1).standard_normal((200, data.d))
    for v in directions:
        for eps in (1e-7, 1e-5, 1e-3):
            moved = sol.theta + eps * v / np.linalg.norm(v)
            assert sim.robust_objective(moved, data, amb, env.beta).value >= sol.value - 1e-13


# --- the subsample warm start ---------------------------------------------------------------

SETS = [sim.KL(0.1), sim.ChiSquare(0.1), sim.Wasserstein(0.05, p=1),
        sim.Wasserstein(0.05, p=1, kappa=1.0), sim.Wasserstein(0.05, p=2),
        sim.Wasserstein(0.05, p=2, kappa=1.0)]


@pytest.mark.parametrize("amb", SETS, ids=repr)
def test_subsample_start_changes_nothing(amb, monkeypatch, gaussian_data):
    data = gaussian_data(4000, seed=11)
    plain = sim.solve(data, amb)
    monkeypatch.setattr(dual, "_SUBSAMPLE_N", 500)
    started = sim.solve(data, amb)
    np.testing.assert_allclose(started.theta, plain.theta, atol=1e-8)
    assert started.value == pytest.approx(plain.value, rel=1e-12)


@pytest.mark.parametrize("mu", [1e-1, 1e-3, 1e-6])
@pytest.mark.parametrize("scale", [0.05, 1.0])
def test_smoothed_w1_equals_the_formula_on_every_atom(mu, scale, gaussian_data):
    """F_mu, its gradient and the flip shares (kept on the atoms at and above the threshold
    only) against the formula summed over every atom at the returned lambda:
    lambda rho + E l + E mu softplus((m - lambda kappa) / mu), and the gradient from the
    shares p = sigmoid((m - lambda kappa) / mu) (plus the chain rule through lambda = b when
    the threshold is clamped, the small delta)."""
    data = gaussian_data(5000, seed=8)
    amb = sim.Wasserstein(0.05, p=1, kappa=1.0)
    at = Atoms.from_data(data, 1.0)
    delta = scale * np.random.default_rng(8).standard_normal(data.d)
    res = wasserstein1.smoothed_w1(at, delta, amb.rho, amb.kappa, mu)
    m = at.a @ delta
    t = res.dual * amb.kappa
    p = expit((m - t) / mu)
    value = (res.dual * amb.rho + float(at.w @ np.logaddexp(0.0, -m))
             + float(at.w @ (mu * np.logaddexp(0.0, (m - t) / mu))))
    assert res.value == pytest.approx(value, rel=1e-13)
    grad = -(at.w * expit(-m)) @ at.a + (at.w * p) @ at.a
    dn = float(np.linalg.norm(delta))
    if res.dual <= at.beta * dn:  # lambda = b: d/d delta of (rho - kappa E p) b
        grad = grad + (amb.rho - amb.kappa * float(at.w @ p)) * at.beta * delta / dn
    np.testing.assert_allclose(res.grad, grad, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.state.q, at.w * p, rtol=0, atol=1e-15)


def test_smoothing_gap_estimate_bounds_the_certified_gap(gaussian_data):
    """The cheap estimate is an upper bound on F(delta) - L_q(delta) (to rounding)."""
    data = gaussian_data(2000, seed=5)
    amb = sim.Wasserstein(0.05, p=1, kappa=1.0)
    at = Atoms.from_data(data, 1.0)
    run = core.newton(
        lambda d, w: wasserstein1.smoothed_w1(at, d, amb.rho, amb.kappa, 1e-3, w),
        dual._start(at), 1e-9, 100, "test")
    delta, q = run.delta, run.state.q
    estimate = wasserstein1.smoothing_gap(at, delta, run.state, amb.rho, amb.kappa)
    exact = evaluate_inner(at, delta, amb, worst=False).value
    lagrangian = w1_lagrangian(at, q, amb.rho, amb.kappa)(delta, None).value
    assert 0.0 <= exact - lagrangian <= estimate * max(1.0, lagrangian) + 1e-15


@pytest.mark.parametrize("kappa", [math.inf, 0.7, 3.0])
def test_w1_primal_value_and_lazy_worst_case_features(kappa):
    """The W1 solve's ``primal_value`` (from its margins) equals ``E_{Q*} l`` recomputed from
    the worst case's atoms, which are built only when read: the stacked features (with
    the far-moved atom) are the nominal ones plus that atom, and survive pickling."""
    import pickle

    from simulator.losses import dpo_loss, margins

    rng = np.random.default_rng(11)
    x = rng.normal(size=(3000, 4))
    y = (rng.uniform(size=3000) < expit(x @ np.array([1.0, -0.5, 0.3, 0.8]))).astype(float)
    data = sim.PreferenceData(x, y)
    sol = sim.solve(data, sim.Wasserstein(0.05, p=1, kappa=kappa), beta=0.8, merge=False)
    wc = sol.worst_case
    assert callable(wc.__dict__["x"])  # not built by the solve
    direct = float(wc.weights @ dpo_loss(margins(sol.theta, wc.x, wc.y, 0.8, np.zeros(4))))
    assert sol.primal_value == pytest.approx(direct, rel=1e-13)
    assert wc.x.shape == (wc.weights.size, 4) and wc.x is wc.x  # built once
    moved = np.any(wc.x != x[wc.source], axis=1)
    # only the far-moved atom leaves its place (kappa = inf always moves one: mu = rho)
    assert np.count_nonzero(moved) == 1 if math.isinf(kappa) else np.count_nonzero(moved) <= 1
    again = pickle.loads(pickle.dumps(wc))
    np.testing.assert_array_equal(again.x, wc.x)


@pytest.mark.parametrize("kappa", [math.inf, 1.0, 3.0])
def test_w1_solve_never_builds_the_atom_matrix(kappa, monkeypatch, gaussian_data):
    """The W1 solve (subsample start, homotopy, face polish, certificate, worst case) works
    on the caller's features through ``Atoms.matvec`` / ``rmatvec``: reading the ``n x d``
    copy ``Atoms.a`` fails here, and the answer is the one found with it (the same sums).
    (Near the collapse radius the finite-kappa zero test's p = 2 flip test still reads it.)"""
    data = gaussian_data(4000, seed=3)
    amb = sim.Wasserstein(0.05, p=1, kappa=kappa)
    monkeypatch.setattr(dual, "_SUBSAMPLE_N", 500)
    plain = sim.solve(data, amb)

    def refuse(self):
        raise AssertionError("Atoms.a was built")

    monkeypatch.setattr(core.Atoms, "a", property(refuse))
    lean = sim.solve(data, amb)
    assert lean.info["optimality_gap"] <= 1e-13
    np.testing.assert_allclose(lean.theta, plain.theta, rtol=0, atol=1e-9)
    assert lean.value == pytest.approx(plain.value, rel=1e-13)


@pytest.mark.parametrize("kappa", [math.inf, 1.0, 0.3])
def test_w1_worst_case_built_on_read_is_a_coupling_of_p(kappa, gaussian_data):
    """The solve builds none of the worst case's atoms (masses, features, labels, sources);
    read, they are a distribution reached from P by a coupling of the reported cost: masses
    >= 0 summing to 1, those from each nominal atom summing to its weight, labels kept or
    flipped, kappa (flipped mass) + E ||x - x_source|| = transport_cost = rho (the whole
    budget), and E_Q l = primal_value."""
    from simulator.losses import dpo_loss, margins

    data = gaussian_data(2000, seed=4)
    amb = sim.Wasserstein(0.05, p=1, kappa=kappa)
    sol = sim.solve(data, amb, merge=False)
    wc = sol.worst_case
    assert all(callable(wc.__dict__[k]) for k in ("weights", "x", "y", "source"))
    q, src = wc.weights, wc.source
    assert q.min() >= 0.0 and q.sum() == pytest.approx(1.0, rel=1e-13)
    np.testing.assert_allclose(np.bincount(src, q, minlength=data.n), data.weights,
                               rtol=0, atol=1e-15)
    flipped = wc.y != data.y[src]
    np.testing.assert_array_equal(wc.y[flipped], 1.0 - data.y[src][flipped])
    assert not flipped.any() or math.isfinite(kappa)
    moved = np.linalg.norm(wc.x - data.x[src], axis=1)
    cost = (kappa * float(q[flipped].sum()) if flipped.any() else 0.0) + float(q @ moved)
    assert cost == pytest.approx(wc.transport_cost, rel=1e-9)
    assert wc.transport_cost == pytest.approx(amb.rho, rel=1e-12) and wc.budget == amb.rho
    direct = float(q @ dpo_loss(margins(sol.theta, wc.x, wc.y, 1.0, np.zeros(data.d))))
    assert sol.primal_value == pytest.approx(direct, rel=1e-12)


def test_w1_homotopy_takes_the_subsample_starts_margins(monkeypatch, gaussian_data):
    """The full problem's evaluation at the subsample's minimiser (the solve's first) hands
    its margins and losses to the homotopy: no margins are computed there again, and the
    answer is the one without the hand-over."""
    data = gaussian_data(4000, seed=5)
    amb = sim.Wasserstein(0.05, p=1, kappa=1.0)
    monkeypatch.setattr(dual, "_SUBSAMPLE_N", 500)
    starts, fresh = [], []
    homotopy, init = wasserstein1._homotopy, wasserstein1._LogisticPoint.__init__

    def spy_homotopy(at, amb, delta, tol, max_iter, mu_first, cache):
        if at.w.size == data.n:
            starts.append((delta.copy(), cache.last))
        return homotopy(at, amb, delta, tol, max_iter, mu_first, cache)

    def spy_init(self, at, delta, m=None, l=None):
        if at.w.size == data.n and m is None:
            fresh.append(delta.copy())
        init(self, at, delta, m, l)

    monkeypatch.setattr(wasserstein1, "_homotopy", spy_homotopy)
    monkeypatch.setattr(wasserstein1._LogisticPoint, "__init__", spy_init)
    sol = sim.solve(data, amb)
    (delta0, point), = starts
    assert point is not None and np.array_equal(point.delta, delta0)
    assert fresh and not any(np.array_equal(d, delta0) for d in fresh)
    monkeypatch.undo()
    plain = sim.solve(data, amb)  # no subsample start at n = 4000 (_SUBSAMPLE_N = 50,000)
    np.testing.assert_allclose(sol.theta, plain.theta, rtol=0, atol=1e-8)
