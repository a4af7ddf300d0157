"""Monte Carlo check of ``sim.asymptotic_covariance`` (issue 11, part 1; SPEC 5.1).

For each set: ``seeds`` samples of ``n`` pairs (multinomial counts over the population
atoms, ``FiniteEnv.sample(..., merged=True)``), ``theta_hat`` solved on each, and

* ``frob``: relative Frobenius distance between the empirical covariance of
  ``sqrt(n) (theta_hat - theta*)`` and the predicted ``cov``;
* ``cover``: share of seeds whose 95% Wald ellipsoid (predicted ``cov``) holds theta*;
* ``med_ratio``: measured / predicted median of ``sqrt(n) ||theta_hat - theta*||``;
* ``frob_sd``: the standard deviation of ``frob`` expected from sampling alone,
  ``sqrt((tr(C)^2 + tr(C^2)) / seeds) / ||C||_F`` (Gaussian Wishart moments).

Usage: ``python benchmarks/asymptotics_mc.py [--seeds 400] [--n 20000] [--world rates|small]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import simulator as sim

SETS = {
    "dpo": sim.Nominal(),
    "kldpo": sim.KL(0.03),
    "chi2dpo": sim.ChiSquare(0.03),
    "wdpo1": sim.Wasserstein(0.03, p=1),
    "wdpo2": sim.Wasserstein(0.03, p=2),
}


def world(name: str) -> sim.FiniteEnv:
    """``rates``: the default world of the rates experiment; ``small``: 3 x 3, d = 2."""
    if name == "rates":
        return sim.FiniteEnv.random(20, 6, 4, 1.0, seed=0, theta_norm=2.0)
    return sim.FiniteEnv.random(3, 3, 2, 1.0, seed=1, theta_norm=1.5)


def monte_carlo(env: sim.FiniteEnv, amb: sim.AmbiguitySet, n: int, seeds: int) -> dict:
    """Measured against predicted law of ``sqrt(n)(theta_hat - theta*)`` over ``seeds``."""
    pop = env.population()
    asym = sim.asymptotic_covariance(pop, amb, beta=env.beta, theta_ref=env.theta_ref)
    z, cover, failed = [], [], 0
    for seed in range(seeds):
        data = env.sample(n, np.random.default_rng([seed, n]), merged=True)
        try:
            th = sim.solve(data, amb, beta=env.beta, theta_ref=env.theta_ref).theta
        except RuntimeError:
            failed += 1
            continue
        z.append(np.sqrt(n) * (th - asym.theta_star))
        cover.append(asym.in_ellipsoid(th, n))
    z = np.array(z)
    emp = z.T @ z / z.shape[0]
    c = asym.cov
    frob = np.linalg.norm(emp - c) / np.linalg.norm(c)
    sd = np.sqrt((np.trace(c) ** 2 + np.trace(c @ c)) / z.shape[0]) / np.linalg.norm(c)
    med = np.median(np.linalg.norm(z, axis=1)) / asym.error_quantile(0.5)
    return {"regular": asym.regular, "frob": frob, "frob_sd": sd, "cover": np.mean(cover),
            "med_ratio": med, "failed": failed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=400)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--world", choices=("rates", "small"), default="rates")
    args = ap.parse_args()
    env = world(args.world)
    print(f"world {args.world}: {env.population().n} atoms; n = {args.n}, {args.seeds} seeds")
    print(f"{'set':8} {'frob':>7} {'frob_sd':>7} {'cover95':>7} {'med_ratio':>9} {'failed':>6}"
          f" {'time_s':>6}")
    for name, amb in SETS.items():
        t0 = time.perf_counter()
        r = monte_carlo(env, amb, args.n, args.seeds)
        print(f"{name:8} {r['frob']:7.3f} {r['frob_sd']:7.3f} {r['cover']:7.3f} "
              f"{r['med_ratio']:9.3f} {r['failed']:6d} {time.perf_counter() - t0:6.1f}")


if __name__ == "__main__":
    main()
