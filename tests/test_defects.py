"""Regression tests of the dual solver's defects of issue 9, each reproduced on the old code.

1. scale-free stopping (tiny beta, tiny or huge features): equivariance ``theta -> theta / c``;
2. a one-sample KL problem was "certified" at theta_ref although it has no minimiser;
3. KL stalled when lambda* is small (near the radius where the optimum collapses);
4. KL's root search for lambda* did not stop on large samples (its stopping rule);
6. ``d = 0`` features were accepted.
"""

from __future__ import annotations

import numpy as np
import pytest

import simulator as sim

SETS = [sim.Nominal(), sim.KL(0.1), sim.ChiSquare(0.1), sim.Wasserstein(0.05, p=1),
        sim.Wasserstein(0.05, p=1, kappa=1.0), sim.Wasserstein(0.05, p=2),
        sim.Wasserstein(0.05, p=2, kappa=1.0)]


@pytest.fixture(scope="module")
def env_sample():
    return sim.FiniteEnv.random(20, 6, 4, seed=0).sample(1000, seed=1)


def _scaled(amb, c):
    """The set that scaling the features by ``c`` maps ``amb`` to: radius ``c rho`` and flip
    price ``c^p kappa`` (the ground cost ``||x - x'||^p + kappa 1[y != y']`` scales by ``c^p``)."""
    if not isinstance(amb, sim.Wasserstein):
        return amb
    return sim.Wasserstein(amb.rho * c, p=amb.p, kappa=amb.kappa * c**amb.p)


@pytest.mark.parametrize("beta", [1e-10, 1e-8, 1e6])
def test_defect1_tiny_beta_is_solved(env_sample, beta):
    """Issue repro: beta = 1e-10 stopped after 0 iterations at a point 9x too far out."""
    base = sim.solve(env_sample, sim.KL(0.1))
    sol = sim.solve(env_sample, sim.KL(0.1), beta=beta)
    assert sol.iterations > 0
    np.testing.assert_allclose(sol.theta * beta, base.theta, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("c", [1e-12, 1e-6, 1e3, 1e8])
@pytest.mark.parametrize("amb", SETS, ids=repr)
def test_defect1_feature_scaling_is_equivariant(env_sample, amb, c):
    """Features x c (and the Wasserstein ball with them): theta / c, the same value."""
    base = sim.solve(env_sample, amb)
    sol = sim.solve(sim.PreferenceData(env_sample.x * c, env_sample.y), _scaled(amb, c))
    np.testing.assert_allclose(sol.theta * c, base.theta, rtol=1e-9,
                               atol=1e-9 * np.max(np.abs(base.theta)))
    assert sol.value == pytest.approx(base.value, rel=1e-12)


def test_defect1_unrepresentable_scale_is_a_named_error(env_sample):
    with pytest.raises(ValueError, match="scale"):
        sim.solve(sim.PreferenceData(env_sample.x * 1e-200, env_sample.y), sim.KL(0.1))


@pytest.mark.parametrize("amb", [sim.KL(0.1), sim.ChiSquare(0.1), sim.Nominal()], ids=repr)
def test_defect2_one_sample_has_no_minimiser(amb):
    """One atom: the ball is {P}, the data are separable, and the objective decreases along
    the atom (0.054 at 10 x) below log 2; the old KL zero test certified theta_ref."""
    data = sim.PreferenceData([[0.5, -0.2]], [1])
    far = sim.robust_objective(10 * data.x[0], data, amb).value
    assert far < 0.06 < np.log(2)
    with pytest.raises(RuntimeError, match="unbounded"):
        sim.solve(data, amb)


def test_defect6_no_features_is_rejected():
    data = sim.PreferenceData(np.zeros((3, 0)), [1, 0, 1])
    for call in (lambda: sim.solve(data, sim.KL(0.1)),
                 lambda: sim.robust_objective(np.zeros(0), data, sim.KL(0.1))):
        with pytest.raises(ValueError, match="d >= 1"):
            call()


@pytest.mark.parametrize("lam", [0.3, 1.0, 4.0])
def test_kl_root_search_stops_on_rounding(lam, monkeypatch):
    """Defect 4's cause: the stopping tests of the KL root search must be reachable when
    ``KL(Q_s || P)`` is only known to its rounding (sums of 1e5+ terms), also at
    ``lambda* = 1`` (``log s = 0``). (The issue's failures on samples of a finite world did
    not reproduce here; this checks the rounding-aware stopping rule directly.)"""
    from simulator.solvers import kl as klmod

    rng = np.random.default_rng(4)
    n = 200_000
    data = sim.PreferenceData(rng.normal(size=(n, 2)), (rng.random(n) < 0.6).astype(float))
    theta = np.array([1.2, -0.8])
    m = (2 * data.y - 1) * (data.x @ theta)
    z = np.logaddexp(0, -m)
    z -= z.max()
    e = np.exp(z / lam) / n
    q = e / e.sum()
    rho = float(q @ z) / lam - np.log(e.sum())  # KL(Q_{1/lam} || P): lambda* = lam
    exact = sim.robust_objective(theta, data, sim.KL(rho))
    assert exact.dual == pytest.approx(lam, rel=1e-10)
    tilt = klmod._tilt
    noise = np.random.default_rng(0)

    calls = []

    def noisy(w, z, s, buf, *centre):  # KL known to 20 ulps at best, as for sums over
        calls.append(s)  # many atoms
        out = tilt(w, z, s, buf, *centre)
        jitter = out.noise * (noise.random() - 0.5) * 0.6
        return klmod._Tilt(out.kl + jitter, out.var, out.q, out.lse, out.noise, out.skew)

    monkeypatch.setattr(klmod, "_tilt", noisy)
    ev = sim.robust_objective(theta, data, sim.KL(rho))
    assert len(calls) <= 12  # a few safeguarded Newton steps, no bisection to rounding
    assert ev.dual == pytest.approx(lam, rel=1e-9)
    assert ev.value == pytest.approx(exact.value, rel=1e-14)


# --- distinct atoms ----------------------------------------------------------------------


def test_merged_data_are_exact():
    env = sim.FiniteEnv.random(5, 3, 3, seed=1, theta_norm=3.0)
    data = env.sample(3000, seed=2)
    merged, inverse = data.merged()
    assert merged.n < 2 * 5 * 3 * 2 + 1  # at most 2 |S| |A| (|A| - 1) distinct atoms
    np.testing.assert_array_equal(merged.x[inverse], data.x)
    np.testing.assert_array_equal(merged.y[inverse], data.y)
    np.testing.assert_allclose(np.bincount(inverse, data.weights), merged.weights, atol=1e-15)
    assert len({tuple(r) for r in np.column_stack([merged.x, merged.y])}) == merged.n


def test_merged_sign_flipped_rows_and_key_collisions():
    """Rows that differ only in their signs stay distinct (a plain sum of the bit patterns
    times odd multipliers cancels there), -0.0 and 0.0 are one feature value, and a key
    collision (every key equal: the multipliers zeroed) falls back to the exact sort with
    the same atoms."""
    from simulator import data as datamod

    x = np.array([[1.0, -2.0], [-1.0, 2.0], [0.0, 3.0], [-0.0, 3.0], [1.0, -2.0], [-1.0, 2.0]])
    y = np.array([1, 0, 1, 1, 1, 1])
    d = sim.PreferenceData(x, y)
    merged, inverse = d.merged()
    assert merged.n == 4  # (1,-2 | 1), (-1,2 | 0), (0,3 | 1), (-1,2 | 1)
    np.testing.assert_array_equal(inverse, [0, 1, 2, 2, 0, 3])
    np.testing.assert_allclose(merged.weights, [2 / 6, 1 / 6, 2 / 6, 1 / 6])
    orig = datamod._hash_multipliers
    try:
        datamod._hash_multipliers = lambda k: np.zeros(k, dtype=np.uint64)
        collided, inv2 = d.merged()
    finally:
        datamod._hash_multipliers = orig
    assert collided.n == 4
    np.testing.assert_array_equal(collided.x[inv2], merged.x[inverse])
    np.testing.assert_array_equal(collided.y[inv2], d.y)


def test_unmerged_worst_case_is_built_when_read():
    """The worst case mapped back to the caller's atoms is built on first read, and is the
    caller's atoms (a reweighting keeps them), each once."""
    env = sim.FiniteEnv.random(5, 3, 3, beta=0.9, seed=1, theta_norm=3.0)
    data = env.sample(400, seed=2)
    wc = sim.solve(data, sim.KL(0.1), beta=0.9).worst_case
    assert all(callable(wc.__dict__[f]) for f in ("weights", "x", "y", "source"))
    src = wc.source
    np.testing.assert_array_equal(wc.x, data.x[src])  # a reweighting: the caller's atoms
    np.testing.assert_array_equal(wc.y, data.y[src])
    np.testing.assert_allclose(np.bincount(src, minlength=data.n), np.ones(data.n))
    assert wc.weights.shape == (data.n,) and abs(wc.weights.sum() - 1.0) <= 1e-14
    assert not any(callable(wc.__dict__[f]) for f in ("weights", "x", "y", "source"))


@pytest.mark.parametrize("amb", SETS, ids=repr)
def test_merged_solve_equals_unmerged(amb):
    """Solving on the distinct atoms gives the same optimum, and its worst case, mapped back
    to the caller's atoms, has the same primal value and transport cost and the caller's P as
    first marginal."""
    env = sim.FiniteEnv.random(5, 3, 3, beta=0.9, seed=1, theta_norm=3.0)
    data = env.sample(400, seed=2)
    a = sim.solve(data, amb, beta=0.9)
    b = sim.solve(data, amb, beta=0.9, merge=False)
    assert a.info["distinct_atoms"] < data.n and "distinct_atoms" not in b.info
    np.testing.assert_allclose(a.theta, b.theta, atol=1e-8)
    assert a.value == pytest.approx(b.value, rel=1e-12)
    assert a.primal_value == pytest.approx(b.primal_value, rel=1e-12)
    wc = a.worst_case
    assert wc.source.max() < data.n
    if wc.budget is not None:  # a coupling: its first marginal is the caller's P
        np.testing.assert_allclose(np.bincount(wc.source, wc.weights, minlength=data.n),
                                   data.weights, atol=1e-15)
        moved = np.linalg.norm(wc.x - data.x[wc.source], axis=1) ** amb.p + np.where(
            wc.y != data.y[wc.source], amb.kappa if np.isfinite(amb.kappa) else 0.0, 0.0)
        assert wc.weights @ moved == pytest.approx(b.worst_case.transport_cost, rel=1e-6)
        assert wc.transport_cost == pytest.approx(b.worst_case.transport_cost, rel=1e-6)
    else:  # reweighting sets: the same weight on every caller's atom
        np.testing.assert_allclose(np.bincount(wc.source, wc.weights, minlength=data.n),
                                   np.bincount(b.worst_case.source, b.worst_case.weights,
                                               minlength=data.n), atol=1e-10)


# --- defect 3: KL near the collapse radius -------------------------------------------------


@pytest.fixture(scope="module")
def collapse_world():
    """The issue's world and its population's collapse radius rho_0 (bisection on the exact
    subgradient test at theta_ref)."""
    from simulator.solvers import dual
    from simulator.solvers.core import Atoms

    env = sim.FiniteEnv.random(7, 4, 3, beta=1, seed=99, theta_norm=2.5)
    pop = env.population()
    at = Atoms.from_data(pop, 1.0, normalise=True)
    lo, hi = 1e-4, 10.0
    for _ in range(50):
        mid = (lo * hi) ** 0.5
        lo, hi = (lo, mid) if dual._zero_is_optimal(at, sim.KL(mid)) else (mid, hi)
    return env, pop, hi


@pytest.mark.parametrize("frac", [0.99, 0.995, 0.999])
def test_defect3_kl_near_the_collapse_radius(collapse_world, frac):
    """lambda* -> 0 as rho -> rho_0: Newton from the nominal start was caught at the kink at
    theta_ref ('stagnated'); it now restarts along the steepest descent direction there.
    The answer is certified and agrees with cvxpy."""
    env, pop, rho0 = collapse_world
    amb = sim.KL(frac * rho0)
    sol = sim.solve(pop, amb)
    assert not sol.info["zero_kink"] and sol.info["optimality_gap"] <= 1e-12
    assert 0 < sol.dual < 0.01 and sol.value < np.log(2)
    ref = sim.solve(pop, amb, solver="cvxpy")
    assert sol.value <= ref.value + 1e-12
    assert sol.value == pytest.approx(ref.value, rel=1e-9)
    np.testing.assert_allclose(sol.theta, ref.theta, atol=1e-4 * np.max(np.abs(sol.theta)))


@pytest.mark.parametrize("seed", [0, 1])
def test_defect4_large_unmerged_samples_of_a_finite_world(collapse_world, seed):
    """Defect 4's setting: 1e5 pairs of the issue's world, every atom kept (``merge=False``),
    at half and 0.97 of the collapse radius: each answer is certified and equals the merged
    solve (at most 168 distinct atoms). The defect itself did not reproduce on the base
    commit (be4b25a solved these samples too), so this checks the unmerged path at scale;
    the failure mode it named, a root-search stop unreachable in rounding, is
    ``test_kl_root_search_stops_on_rounding``."""
    env, _, rho0 = collapse_world
    data = env.sample(100_000, seed=seed)
    for frac in (0.5, 0.97):
        full = sim.solve(data, sim.KL(frac * rho0), merge=False)
        merged = sim.solve(data, sim.KL(frac * rho0))
        assert full.info["optimality_gap"] <= 1e-12 and "distinct_atoms" not in full.info
        assert merged.info["distinct_atoms"] <= 2 * 7 * 4 * 3  # 2 |S| |A| (|A| - 1)
        np.testing.assert_allclose(full.theta, merged.theta, atol=1e-8)
        assert full.value == pytest.approx(merged.value, rel=1e-13)


def test_defect3_sample_near_the_population_collapse_radius(collapse_world):
    """The sample (seed 1) on which the old solver stalled at iteration 7."""
    env, _, rho0 = collapse_world
    data = env.sample(10_000, seed=1)
    sol = sim.solve(data, sim.KL(0.97 * rho0))
    assert sol.info["optimality_gap"] <= 1e-12 and sol.value <= np.log(2)


def test_chi2_sample_at_the_collapse_radius_is_not_left_at_theta_ref(collapse_world):
    """A sample whose own collapse radius (0.5907) exceeds the population's (rho_0 = 0.5878):
    theta_ref is not optimal, yet Newton's step test stopped *on* the kink there (main first
    returned theta_ref labelled optimal, then 'uncertified'). It now restarts along the
    steepest descent direction of the chi-square ball and agrees with cvxpy."""
    env, pop, _ = collapse_world
    rho0 = sim.collapse_radius(pop, sim.ChiSquare(1.0), beta=env.beta)
    data = env.sample(100_000, np.random.default_rng([6, 100_000]), merged=True)
    assert sim.collapse_radius(data, sim.ChiSquare(1.0), beta=env.beta) > rho0
    amb = sim.ChiSquare(rho0)
    sol = sim.solve(data, amb)
    ref = sim.solve(data, amb, solver="cvxpy")
    assert not sol.info["zero_kink"] and sol.info["optimality_gap"] <= 1e-12
    assert np.linalg.norm(sol.theta) > 1e-4 and sol.value < np.log(2)
    assert sol.value <= ref.value + 1e-12
    np.testing.assert_allclose(sol.theta, ref.theta, atol=1e-5)


def test_w1_finite_kappa_theta_ref_certified_above_the_collapse_radius(collapse_world):
    """Wasserstein p = 1, kappa = 1, just above the collapse radius: main's homotopy raised
    'gap' (the old zero test was the kappa = inf one). The flip-share test now certifies
    theta_ref; it agrees with the collapse radius computed independently (cvxpy dual), and
    below that radius it never certifies."""
    from simulator.solvers.core import Atoms
    from simulator.solvers.wasserstein1 import METHODS

    env, pop, _ = collapse_world
    data = env.sample(10_000, np.random.default_rng([0, 10_000]), merged=True)
    rho0 = sim.collapse_radius(data, sim.Wasserstein(1.0, p=1, kappa=1.0))
    sol = sim.solve(data, sim.Wasserstein(1.03 * rho0, p=1, kappa=1.0))
    assert sol.info["zero_kink"] and sol.info["optimality_gap"] == 0.0
    np.testing.assert_array_equal(sol.theta, 0.0)
    rng = np.random.default_rng(3)
    for trial in range(30):
        n = int(rng.integers(2, 12))
        x = rng.normal(size=(n, 2))
        d = sim.PreferenceData(x, rng.integers(0, 2, n), rng.dirichlet(np.ones(n)))
        kappa = float(rng.choice([0.05, 0.3, 1.0, 3.0]))
        r0 = sim.collapse_radius(d, sim.Wasserstein(1.0, p=1, kappa=kappa))
        at = Atoms.from_data(d, 1.0)
        for frac, certified in ((0.98, False), (1.02, True)):
            got = METHODS.zero_test(at, sim.Wasserstein(frac * r0, p=1, kappa=kappa))
            assert (got == 0.0) == certified, (trial, frac, r0, kappa)


def test_w1_finite_kappa_threshold_atom_at_rounding_is_split_within_the_budget():
    """One atom (three copies, merged), Wasserstein p = 1 with ``rho ~ kappa / 2``: at the
    optimum the atom's margin sits at the flip threshold ``b kappa`` to rounding, where the
    cut (``m > b kappa``) and the kink test (``m / kappa > b``) disagreed: the threshold atom
    was flipped in full, a worst case of transport cost ``kappa = 2 rho`` (over the budget)
    and ``E_Q* l`` 2e-3 off the value, with status ``optimal`` (tests/test_properties.py
    seed 331 of 600). The worst case must split the atom: cost ``rho``, ``E_Q* l`` equal to
    the value, in both the merged and the unmerged solve."""
    x = np.repeat([[0.8939179414260494, 0.025782042572284374]], 3, axis=0)
    data = sim.PreferenceData(x, np.zeros(3), [0.36206144312274025, 0.44723429002405446,
                                               0.19070426685320516])
    amb = sim.Wasserstein(0.10186358299586076, p=1, kappa=0.2041231517487304)
    for merge in (True, False):
        sol = sim.solve(data, amb, beta=0.9994180449719852, merge=merge)
        wc = sol.worst_case
        assert sol.status == "optimal" and sol.info["optimality_gap"] <= 1e-12
        assert wc.transport_cost <= amb.rho * (1 + 1e-12), (merge, wc.transport_cost)
        assert sol.gap <= 1e-12, (merge, sol.gap)
        primal = float(wc.weights @ sim.softplus(-(2 * wc.y - 1) * 0.9994180449719852
                                                 * (wc.x @ sol.theta)))
        assert primal == pytest.approx(sol.value, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("x, y, w, rho, kappa, beta", [
    ([[-0.008805821298517725, -0.012993257288596113],
      [-0.004016954234156889, -0.00658509799062046]], [1.0, 1.0],
     [0.808513320939479, 0.19148667906052114], 0.011209896994085939, 0.011327310867548988,
     0.691605282706536),
    ([[-0.03167853639776824, 0.0013975664561392145]], [0.0], [1.0], 0.010359100479924645,
     0.046544556962230955, 6.877836906017718)])
def test_w2_finite_kappa_search_where_no_atom_moves(x, y, w, rho, kappa, beta):
    """Wasserstein p = 2 with finite kappa on one or two tiny atoms: the restart's grid
    probed a lambda at which no atom moves (E cost = 0), and the unbracketed secant took
    ``log(E cost)``: ``ValueError: math domain error`` instead of an answer (2 of 1500
    random p = 2 problems of 1 to 5 atoms). Now certified, the worst case on the budget."""
    amb = sim.Wasserstein(rho, p=2, kappa=kappa)
    sol = sim.solve(sim.PreferenceData(np.array(x), np.array(y), w), amb, beta=beta)
    assert sol.status == "optimal" and sol.info["optimality_gap"] <= 1e-12
    assert sol.gap <= 1e-12
    assert sol.worst_case.transport_cost == pytest.approx(rho**2, rel=1e-12)


@pytest.mark.parametrize("x, y, amb, beta", [
    ([[-3.3210801632533493, -3.468756908919807, 0.3581221356450363],
      [4.67499714881548, -3.083037032272575, -4.3173162997728936]], [0.0, 0.0],
     sim.ChiSquare(0.7806368483149764), 3.9133979735303313),
    ([[-277.4374903999669, -215.32098903819616, 23.870164831715734],
      [371.705440669882, 336.5500976542516, -443.06477129012535],
      [-97.45002713955661, 145.28186432497347, -125.26809172609507],
      [-53.52813943567643, -266.9616614046924, 31.303752333560492]], [0.0, 1.0, 0.0, 0.0],
     sim.KL(1.4025347270105832), 41.73372576687056)])
def test_stall_on_separable_data_is_named_unbounded(x, y, amb, beta):
    """Two and four atoms in d = 3, strictly separable (cvxpy's LP says so): Newton stalled
    on its way to infinity and the dual solver raised ``line_search_failed`` (chi-square) or
    ``stagnated`` (KL) instead of ``unbounded``, the documented error of data without a
    minimiser (8 of 1200 random KL and chi-square problems of 1 to 5 atoms)."""
    data = sim.PreferenceData(np.array(x), np.array(y))
    with pytest.raises(ValueError, match="separable"):
        sim.solve(data, amb, beta=beta, solver="cvxpy")
    with pytest.raises(RuntimeError, match="status: unbounded"):
        sim.solve(data, amb, beta=beta)


def test_w1_finite_kappa_zero_test_with_collinear_active_atoms():
    """Seven atoms, two of them three times, Wasserstein p = 1 with finite kappa just above
    its collapse radius, unmerged: the zero test's smoothed Newton (``flip_shares``) met
    ``2 I + (16 / mu) G`` with ``G`` of rank one at ``1e17`` and LAPACK called it singular
    (``LinAlgError``, an unnamed error, from ``sim.solve``; the property sweep's seed 1841
    of 3000). The step now keeps the ``2 I`` on ``G``'s eigenvectors; the answer is
    certified and equals the merged solve's and cvxpy's."""
    x = ([[-0.4545350292013514, -0.5594993307071034]] * 3
         + [[-0.4329300544479602, -0.4607855586736924]] * 3
         + [[-0.2627255667218916, 0.0032981836819754094]])
    data = sim.PreferenceData(np.array(x), np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]))
    amb = sim.Wasserstein(0.009484615685925913, p=1, kappa=0.15302300019820445)
    sol = sim.solve(data, amb, merge=False)
    assert sol.status == "optimal" and sol.info["optimality_gap"] <= 1e-12
    merged = sim.solve(data, amb)
    ref = sim.solve(data, amb, solver="cvxpy")
    assert sol.value == pytest.approx(merged.value, rel=1e-12)
    assert sol.value == pytest.approx(ref.value, rel=1e-7)


def test_chi2_zero_test_on_a_large_unmerged_sample_of_a_finite_world(monkeypatch):
    """A million pairs of a 500-state world (30,000 distinct atoms), every atom kept: the
    chi-square test whether ``theta_ref`` is optimal maximises a concave function whose
    Newton decrement stops at ``3.5e-15`` there, above the old double-precision test, so the
    ascent went on for 200 iterations of 2^-32 steps (1186 evaluations, 190 s) and ended
    undecided, and the solve stalled at the kink, where the merged atoms certified
    ``theta_ref`` in 0.1 s. The test now stops at the sums' rounding and certifies it."""
    from simulator.solvers import chi2
    from simulator.solvers.inner import prepare

    env = sim.FiniteEnv.random(n_states=500, n_actions=6, dim=8, beta=1.0, seed=1,
                               theta_norm=3.0)
    data = env.sample(1_000_000, seed=2)
    amb = sim.ChiSquare(0.3)
    at = prepare(data, amb, 1.0, None, normalise=True).atoms
    products = []
    matvec = type(at).matvec
    monkeypatch.setattr(type(at), "matvec", lambda self, v: products.append(1) or matvec(self, v))
    gap = chi2._zero_test(at, amb)
    assert gap is not None and gap <= 1e-12
    assert len(products) <= 10  # one per evaluation of the concave dual


@pytest.mark.parametrize("x, y, w, rho, kappa, beta", [
    ([[2.2426945326692206e-06, -1.02078483831453e-06, -1.121270167861759e-06]], [1.0], [1.0],
     4.608718616974583e-09, np.inf, 2.084424984827412),
    ([[-2.0449199484916728e-08, 1.4108466452370786e-08]], [0.0], [1.0], 2.682073861203347e-10,
     0.30969453728907836, 1.0870362433018087e-05),
    ([[1.223353332672971e-07, -3.39313366813839e-08]] * 2, [0.0, 0.0],
     [0.045343274016927185, 0.9546567259830727], 7.315036045883444e-10, np.inf,
     1.383707301409743)])
def test_w2_one_atom_tie_hessian_keeps_its_g_ll_term(x, y, w, rho, kappa, beta):
    """Wasserstein p = 2 on one atom (one of them twice) with a radius of 2e-3 of the
    feature scale: at the minimiser the atom is split between a move of cost 1e-24 and one
    of cost 2e-12 (of the feature scale squared), and the tie Hessian's Schur complement
    came out indefinite (least eigenvalue -0.26 of the largest). Its KKT block ``[[G_ll, c],
    [c, 0]]`` (``G_ll`` 6e-30, ``c`` 2.5e-12) went through ``pinv``, whose SVD rounded the
    inverse's ``-G_ll / c^2`` entry (1e-18 of the others) to 0. Newton fell back to gradient
    steps and raised ``max_iter`` after 100 iterations (3 of 2000 problems of
    ``tests/scale_sweep.py`` seed 1). Now the Hessian Newton uses is the central differences
    of the exact gradients at the solve's first and last ties (an independent computation), the
    answer is certified, and no perturbation of theta lowers the robust objective."""
    from simulator.solvers import wasserstein2
    from simulator.solvers.dual import _objective
    from simulator.solvers.inner import prepare

    ties = []
    tie_hessian = wasserstein2._tie_hessian

    def recorded(*args):
        ties.append((args[7].copy(), tie_hessian(*args)))
        return ties[-1][1]
    data = sim.PreferenceData(np.array(x), np.array(y), w)
    amb = sim.Wasserstein(rho, p=2, kappa=kappa)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(wasserstein2, "_tie_hessian", recorded)
        sol = sim.solve(data, amb, beta=beta)
    assert sol.status == "optimal" and sol.info["optimality_gap"] <= 1e-10
    assert sol.gap <= 1e-10
    objective = _objective(prepare(data, amb, beta, None, normalise=True).atoms, amb)
    assert ties
    for delta, hess in (ties[0], ties[-1]):  # the first tie and the last (2 d solves each)
        step = 2.0**-17 * (1.0 + float(np.linalg.norm(delta)))
        fd = np.array([objective(delta + e, None).grad - objective(delta - e, None).grad
                       for e in np.eye(delta.size) * step]) / (2.0 * step)
        assert np.max(np.abs(hess - fd)) <= 1e-6 * np.max(np.abs(fd))
    value = sim.robust_objective(sol.theta, data, amb, beta=beta).value
    assert value == pytest.approx(sol.value, rel=1e-12)
    rng = np.random.default_rng(0)
    for scale in (1e-2, 1e-3):
        for _ in range(8):
            theta = sol.theta * (1.0 + scale * rng.standard_normal(sol.theta.size))
            other = sim.robust_objective(theta, data, amb, beta=beta).value
            assert other >= value * (1.0 - 1e-12)


@pytest.mark.parametrize("x, y, w, rho, kappa, beta", [
    ([[0.00021990321430146554, 0.00048191470458185267],
      [0.0004586360601027186, -0.00015254530257738854]], [0.0, 0.0],
     [0.5004164615286402, 0.4995835384713599], 1.1828413419681694e-05, np.inf,
     14.617854996989667),
    ([[-2.0570162276310754e-05, -3.525416220772598e-05],
      [-9.302570933074079e-06, 3.8611856281610444e-05]], [1.0, 0.0],
     [0.4781516545157766, 0.5218483454842233], 1.1508686642131864e-05, 0.016296223881808233,
     2.6094736819441127),
    ([[1.8927301123334986e-07, 1.873695673139529e-06, -7.41942164772467e-07],
      [-1.5953744671612497e-07, 2.237248742000511e-06, 2.125673692494335e-06],
      [1.2118215154076344e-06, -3.9183566463619145e-07, 2.3988719048493226e-06]],
     [0.0, 0.0, 0.0], [0.1063674296180279, 0.8231461320934508, 0.07048643828852127],
     4.204475594812074e-08, np.inf, 2.1762365976752527e-06),
    ([[2.1227002455301637e-07, 3.700900576242086e-07],
      [7.637910434986721e-07, -8.610967138544945e-07],
      [-3.0949319791858357e-07, 6.614835882271897e-07],
      [1.2971273775010945e-06, 5.112991870120933e-07],
      [3.305151209228241e-06, -1.1828324857544727e-07]], [1.0, 1.0, 0.0, 1.0, 1.0],
     [0.42277885723275854, 0.029431814334153546, 0.02622886049664125, 0.02801611385870921,
      0.49354435407773745], 2.146379061659369e-08, 0.9647251212083469,
     4.699353791936104e-06)])
def test_w2_kink_kkt_step_keeps_the_budget_equation(x, y, w, rho, kappa, beta):
    """Wasserstein p = 2, 2 to 5 atoms at radii of 2e-3 to 2.5e-2 of the feature scale
    (``tests/scale_sweep.py`` seed 1, problems 1645, 975, 870 and 27): the minimiser sits at a
    kink of ``F`` (two atoms tied at one ``lambda*``), Newton stalled, and the KKT fallback's
    steps came from ``lstsq`` on a Jacobian whose budget row is about ``rho^2`` (1e-10) beside
    gradient rows of 1: its cut of small singular values dropped the budget equation (a step
    of 1e-18 for a residual of 2e-11), so the fallback failed and the solve raised
    ``stagnated`` or ``line_search_failed`` (12 of 22 such errors of that sweep). The step is
    now taken on the equilibrated Jacobian (``core.scaled_lstsq``): certified by weak duality,
    the worst case within the budget, and its primal value ``E_Q* l`` recomputed from its
    atoms equal to the dual value."""
    data = sim.PreferenceData(np.array(x), np.array(y), w)
    amb = sim.Wasserstein(rho, p=2, kappa=kappa)
    sol = sim.solve(data, amb, beta=beta)
    assert sol.status == "optimal" and sol.info["optimality_gap"] <= 1e-9
    wc = sol.worst_case
    assert wc.transport_cost <= wc.budget * (1.0 + 1e-9)
    primal = float(wc.weights @ sim.dpo_loss(sim.margins(sol.theta, wc.x, wc.y, beta)))
    assert primal == pytest.approx(sol.value, rel=1e-9)


_ONE_LINE = [  # (atom, labels, weights, beta, radius, kappa): tests/scale_sweep.py seed 1
    ([0.38001458404147287, 0.04609992973804792], [0, 0, 0, 1], [0.25] * 4,
     5.675010097660358e-05, 0.028603634911857415, 1.5013633385077938),
    ([0.0003572646689625453, -0.00031917652493239514], [0, 1, 0],
     [0.32254187637767207, 0.17823197046736072, 0.49922615315496716], 5.445241398379566,
     6.084798207213532e-06, 0.009367709681338383),
    ([-2.1891414794208082e-07, -2.105354056117934e-07], [0, 0, 1, 1],
     [0.118924711427764, 0.24641080528409962, 0.06022721001850913, 0.5744372732696273],
     0.0006988817493953074, 3.484960732867727e-09, 0.08093247739653661),
    ([-4.710112902759927e-06, 1.2999060497664126e-06], [1, 0, 1, 1, 1], [0.2] * 5,
     0.019921133410216642, 8.091354298605866e-07, 0.01196195953892091),
    ([-7.940909175489192e-05, 0.00010499185200876482, -1.148080061137122e-05], [0, 0],
     [0.5080577086432647, 0.49194229135673534], 6.823916687686841e-05,
     1.3595839429772853e-05, 0.21322051839916017),
]


@pytest.mark.parametrize("atom, y, w, beta, radius, kappa", _ONE_LINE)
def test_w1_finite_kappa_certified_on_atoms_that_span_one_line(atom, y, w, beta, radius,
                                                               kappa):
    """W1 with finite ``kappa`` on 2 to 5 copies of one atom in d = 2, 3 raised ``gap``
    (the duality gap ``inf``): the Lagrangian bound linearises ``nu ||delta'||`` at Newton's
    stopping point, whose part off the atoms' line (the size of Newton's tolerance, 1e-10)
    became a linear direction that no atom sees, so the bound was ``-inf`` (5 of 2000
    problems of ``tests/scale_sweep.py`` seed 1). The bound is now taken at the point's
    projection onto the atoms' span: certified, and the value and theta agree with cvxpy's
    (an interior-point solve of the primal)."""
    data = sim.PreferenceData(np.array([atom] * len(y)), np.array(y, float), w)
    amb = sim.Wasserstein(radius, p=1, kappa=kappa)
    sol = sim.solve(data, amb, beta=beta)
    assert sol.status == "optimal" and sol.info["optimality_gap"] <= 1e-9
    ref = sim.solve(data, amb, beta=beta, solver="cvxpy")
    assert sol.value == pytest.approx(ref.value, rel=1e-10)
    assert sim.robust_objective(sol.theta, data, amb, beta=beta).value == pytest.approx(
        sol.value, rel=1e-13)
    # theta in the features' units: beta theta . x is the margin
    assert beta * np.max(np.abs(sol.theta - ref.theta)) * np.max(np.abs(atom)) <= 1e-6


def test_w1_homotopy_stall_at_theta_ref_certified_by_its_flip_masses():
    """One atom, W1 with ``kappa`` (0.0029) below twice the radius (0.0015): flipping half
    the atom costs ``kappa / 2 < rho``, so ``F >= log 2 = F(0)`` and ``theta_ref`` is a
    minimiser. The zero test's grid of ``s`` stops 6 octaves below ``2 rho``, above the
    interval that certifies it, and the homotopy's stage ``mu = 0.01`` stalled at ``delta =
    1e-10`` (``stagnated``; problem 1899 of ``tests/scale_sweep.py`` seed 1). The stall's flip
    masses (every ``q = w / 2``) now certify ``theta_ref``; cvxpy's primal reaches the same
    value, and no theta nearby or far does better."""
    data = sim.PreferenceData(np.array([[0.0018024008457792047, -0.004957335124981001]]),
                              [1.0])
    amb = sim.Wasserstein(0.0014677681823072064, p=1, kappa=0.0029281789077436216)
    beta = 7.01625671087913e-06
    sol = sim.solve(data, amb, beta=beta)
    assert sol.status == "optimal" and sol.info["optimality_gap"] <= 1e-9
    assert sol.value == pytest.approx(np.log(2.0), rel=1e-15)
    ref = sim.solve(data, amb, beta=beta, solver="cvxpy")
    assert ref.value == pytest.approx(sol.value, rel=1e-9)
    rng = np.random.default_rng(0)
    for scale in (1e2, 1e5, 1e8):
        for theta in scale * rng.standard_normal((8, 2)):
            other = sim.robust_objective(theta, data, amb, beta=beta).value
            assert other >= np.log(2.0) * (1.0 - 1e-15)
