"""Randomised property tests of the dual solver (issue 9): tiny problems of every kind.

Problems: 1 to 5 distinct atoms (some repeated), ``d`` from 1 to 4, random or separable or
almost separable labels, random weights, every set, radii from 1e-3 to 1 and at and around
the radius ``rho_0`` where the optimum collapses to ``theta_ref``, ``kappa`` from 1e-3 to
inf. Each answer must be certified (``optimality_gap <= 1e-9``) and match an independent
evaluation: the cvxpy reference where it applies (objective within ``1e-7``), otherwise
(Wasserstein p = 2, or cvxpy failing) no lower objective among random perturbations of
``theta``; or the solver raises a named error (``ValueError`` / ``RuntimeError`` naming a
status). Run more problems outside the suite with
``python tests/test_properties.py COUNT [all]`` (prints the counts per set; ``all`` adds
Wasserstein p = 2).
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from scipy.optimize import linprog

import simulator as sim
from simulator.solvers import dual
from simulator.solvers.conic import ConicSolveError
from simulator.solvers.core import Atoms

#: Problems checked in the test suite (about 0.1 s each, most of it cvxpy).
SUITE_COUNT = 60


def _collapse_radius(data, amb_of, beta):
    """The smallest radius at which theta_ref is optimal (bisection on the subgradient test)."""
    at = Atoms.from_data(data, beta, normalise=True)
    lo, hi = 1e-6, 50.0
    if not dual._zero_is_optimal(at, amb_of(hi)):
        return None
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if dual._zero_is_optimal(at, amb_of(mid)) else (mid, hi)
    return hi


def _separable(data) -> bool:
    """Whether some ``theta`` gives every atom a positive margin (a linear program)."""
    a = (2.0 * data.y - 1.0)[:, None] * data.x
    res = linprog(np.zeros(data.d), A_ub=-a, b_ub=-np.ones(data.n), bounds=(None, None))
    return res.status == 0


#: The sets of the suite's problems. Wasserstein p = 2 is left to its own module's tests
#: (``python tests/test_properties.py COUNT all`` includes it).
SUITE_SETS = ("dpo", "kldpo", "chi2dpo", "wdpo1")


def make_problem(seed: int, names=SUITE_SETS):
    rng = np.random.default_rng(seed)
    k, d = int(rng.integers(1, 6)), int(rng.integers(1, 5))
    x = rng.normal(size=(k, d)) * rng.uniform(0.3, 2.0)
    theta = rng.normal(size=d) * 2.0
    kind = rng.choice(["random", "separable", "almost"])
    if kind == "random":
        y = (rng.random(k) < 0.5).astype(float)
    else:
        y = (x @ theta > 0).astype(float)
        if kind == "almost":
            y[int(rng.integers(k))] = 1.0 - y[int(rng.integers(k))]
    reps = rng.integers(1, 4, size=k)
    x, y = np.repeat(x, reps, axis=0), np.repeat(y, reps)
    w = rng.dirichlet(np.ones(x.shape[0])) if rng.random() < 0.5 else None
    data = sim.PreferenceData(x, y, w)
    beta = float(rng.uniform(0.3, 3.0))
    name = str(rng.choice(list(names)))
    kappa = math.inf if rng.random() < 0.4 else float(10.0 ** rng.uniform(-3, 1))
    opts = {"kappa": kappa} if name.startswith("wdpo") else {}

    def amb_of(rho):
        return sim.AmbiguitySet.from_name(name, rho, **opts)

    if name == "dpo":
        return data, amb_of(0.0), beta
    rho = float(10.0 ** rng.uniform(-3, 0))
    if rng.random() < 0.4:
        rho0 = _collapse_radius(data, amb_of, beta)
        if rho0 is not None:
            rho = rho0 * float(rng.choice([0.9, 0.99, 0.999, 1.0, 1.001, 1.1]))
    return data, amb_of(rho), beta


def check_problem(seed: int, names=SUITE_SETS) -> str:
    """``"certified"``, ``"error"`` (a named error) or ``"wrong: ..."``."""
    data, amb, beta = make_problem(seed, names)
    try:
        sol = sim.solve(data, amb, beta=beta)
    except RuntimeError as exc:
        if "status" not in str(exc):
            return f"wrong: unnamed error {exc}"
        if "unbounded" in str(exc) and not _separable(data):
            return f"wrong: unbounded on non-separable data: {exc}"
        return "error"
    except ValueError as exc:  # only argument errors are named ("x must ...")
        return "error" if " must " in str(exc) else f"wrong: unnamed error {exc}"
    gap = sol.info["optimality_gap"]
    if not (sol.status == "optimal" and gap <= 1e-9 and sol.gap < 1e-8):
        return f"wrong: not certified (gap {gap})"
    try:
        ref = None if amb.name == "wdpo2" else sim.solve(data, amb, beta=beta, solver="cvxpy")
    except (ConicSolveError, ValueError):
        ref = None
    if ref is not None:
        if sol.value > ref.value + 1e-7 * max(1.0, abs(ref.value)):
            return f"wrong: value {sol.value} > cvxpy {ref.value}"
        return "certified"
    rng = np.random.default_rng(seed)
    for v in rng.normal(size=(30, data.d)):
        for eps in (1e-6, 1e-3, 1e-1):
            moved = sol.theta + eps * v / np.linalg.norm(v) * max(1.0, np.linalg.norm(sol.theta))
            val = sim.robust_objective(moved, data, amb, beta).value
            if val < sol.value - 1e-9 * max(1.0, abs(sol.value)):
                return f"wrong: perturbation lowers {sol.value} to {val}"
    return "certified"


@pytest.mark.parametrize("block", range(2))
def test_random_tiny_problems_are_certified_or_named_errors(block):
    per = SUITE_COUNT // 2
    outcomes = [check_problem(seed) for seed in range(block * per, (block + 1) * per)]
    wrong = [(block * per + i, o) for i, o in enumerate(outcomes) if o.startswith("wrong")]
    assert not wrong
    assert outcomes.count("certified") >= per // 4  # tiny samples are often separable


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    names = sim.ambiguity.METHOD_NAMES if sys.argv[2:] == ["all"] else SUITE_SETS
    tally: dict[str, int] = {}
    for seed in range(count):
        out = check_problem(seed, names)
        key = (make_problem(seed, names)[1].name + ": "
               + (out if not out.startswith("wrong") else "wrong"))
        tally[key] = tally.get(key, 0) + 1
        if out.startswith("wrong"):
            print(seed, out, flush=True)
    print(f"problems tried: {count}", tally)
