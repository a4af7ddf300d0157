"""Random tiny problems at extreme scales: every answer certified, or a named error.

``python tests/scale_sweep.py SEED COUNT`` draws ``COUNT`` problems (seeded): 1 to 5 atoms
(a third of them copies of one atom), ``d`` 1 to 3, feature scales ``1e-9`` to ``1e6``,
``beta`` ``1e-6`` to ``100``, random or equal weights, every set (Wasserstein radii in units
of the feature scale, ``kappa`` ``1e-3`` to ``10`` or infinite), and solves each with the
dual solver. An answer counts as ``ok`` when it is ``optimal`` with a certified gap of at
most ``1e-9``, a primal-dual gap of its worst case of at most ``1e-8`` and, for Wasserstein
sets, a worst case within the budget; a ``RuntimeError`` must name its status. Anything
else (an unnamed error, a ``ValueError`` on valid input, an answer failing those tests)
is printed as ``BAD``. Prints the tally per set and outcome. (The cvxpy comparisons are
``tests/test_properties.py``'s; here the scales are what is tested.)
"""

from __future__ import annotations

import collections
import sys

import numpy as np

import simulator as sim


def draw(rng: np.random.Generator) -> tuple[sim.PreferenceData, sim.AmbiguitySet, float]:
    """One random problem: data, ambiguity set and beta."""
    n, d = int(rng.integers(1, 6)), int(rng.integers(1, 4))
    x = rng.normal(size=(n, d)) * 10 ** rng.uniform(-9, 6)
    if rng.random() < 0.3:
        x = np.repeat(x[:1], n, 0)
    y = rng.integers(0, 2, n).astype(float)
    w = rng.dirichlet(np.ones(n)) if rng.random() < 0.5 else None
    beta = float(10 ** rng.uniform(-6, 2))
    kind = rng.choice(["dpo", "kl", "chi2", "w1", "w2"])
    rho = float(10 ** rng.uniform(-3, 0.5))
    kappa = float(10 ** rng.uniform(-3, 1)) if rng.random() < 0.7 else np.inf
    radius = rho * float(np.sqrt(np.mean(np.sum(x**2, 1))))  # in units of the features
    amb = {"dpo": sim.Nominal(), "kl": sim.KL(rho), "chi2": sim.ChiSquare(rho),
           "w1": sim.Wasserstein(radius, p=1, kappa=kappa),
           "w2": sim.Wasserstein(radius, p=2, kappa=kappa)}[kind]
    return sim.PreferenceData(x, y, w), amb, beta


def outcome(data: sim.PreferenceData, amb: sim.AmbiguitySet, beta: float) -> str:
    """``ok``, ``error <status>`` or ``BAD ...`` (see the module docstring)."""
    try:
        sol = sim.solve(data, amb, beta=beta)
    except RuntimeError as exc:
        msg = str(exc)
        return f"error {msg.split('status: ')[1].split(')')[0]}" if "status: " in msg else (
            f"BAD unnamed RuntimeError: {msg[:80]}")
    except Exception as exc:  # valid input: no other error is named
        return f"BAD {type(exc).__name__}: {str(exc)[:80]}"
    wc = sol.worst_case
    ok = (sol.status == "optimal" and sol.info["optimality_gap"] <= 1e-9 and sol.gap <= 1e-8
          and bool(np.all(np.isfinite(sol.theta))))
    if wc.transport_cost is not None:
        ok = ok and wc.transport_cost <= wc.budget * (1 + 1e-9)
    return "ok" if ok else (f"BAD {sol.status} gap {sol.info['optimality_gap']:.2e} "
                            f"primal-dual {sol.gap:.2e}")


def main() -> None:
    seed, count = (int(v) for v in sys.argv[1:3])
    rng = np.random.default_rng(seed)
    tally: collections.Counter = collections.Counter()
    for trial in range(count):
        data, amb, beta = draw(rng)
        out = outcome(data, amb, beta)
        tally[f"{amb.name}: {out.split(':')[0] if out.startswith('BAD') else out}"] += 1
        if out.startswith("BAD"):
            print(trial, amb, out, flush=True)
    print(f"problems tried: {count}", dict(sorted(tally.items())))


if __name__ == "__main__":
    main()
