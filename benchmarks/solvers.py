"""Benchmark: the ``dual`` solver against cvxpy/Clarabel, side by side in one run.

For each sample size ``n`` and ambiguity set it times ``sim.solve(..., solver="dual")``
and, where ``n <= --cvxpy-max-n`` (and the set has a conic form), ``solver="cvxpy"``
on the same data, and prints their ratio, the agreement of the two optima
(``|theta_dual - theta_cvxpy|_inf`` and the relative objective gap) and the peak
memory of the dual solver (``tracemalloc``). Rows are printed as they finish and, with
``--csv``, appended to a CSV file.

Usage::

    python benchmarks/solvers.py                       # the full table (minutes)
    python benchmarks/solvers.py --sizes 1000 10000 --sets kldpo wdpo2
    python benchmarks/solvers.py --quick               # n = 1000 only, every set
"""

from __future__ import annotations

import argparse
import csv
import math
import pathlib
import sys
import time
import tracemalloc

import numpy as np

import simulator as sim

SETS = {
    "dpo": lambda: sim.Nominal(),
    "kldpo": lambda: sim.KL(0.1),
    "chi2dpo": lambda: sim.ChiSquare(0.1),
    "wdpo1": lambda: sim.Wasserstein(0.05, p=1),
    "wdpo1_kappa": lambda: sim.Wasserstein(0.05, p=1, kappa=1.0),
    "wdpo2": lambda: sim.Wasserstein(0.05, p=2),
    "wdpo2_kappa": lambda: sim.Wasserstein(0.05, p=2, kappa=1.0),
}
COLUMNS = ["data", "n", "set", "dual_s", "dual_iters", "dual_peak_mb", "dual_gap", "opt_gap",
           "cvxpy_s",
           "cvxpy_status", "speedup", "theta_diff_inf", "value_rel_diff"]


def make_data(n: int, d: int, seed: int, kind: str = "env") -> sim.PreferenceData:
    """``n`` preference pairs with ``d`` features.

    ``kind="env"``: a sample of a random realizable environment (500 states, 6 actions:
    at most 30,000 distinct atoms, as in every experiment of this project);
    ``kind="gaussian"``: ``x ~ N(0, I_d)`` and Bradley-Terry labels with a random
    ``theta*`` (every atom distinct: the hardest case for the finite-kappa sets, whose
    flip thresholds then fall between atoms ``1/n`` apart).
    """
    if kind == "gaussian":
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((n, d))
        theta = rng.standard_normal(d)
        y = (rng.random(n) < 1.0 / (1.0 + np.exp(-x @ theta))).astype(float)
        return sim.PreferenceData(x, y)
    env = sim.FiniteEnv.random(n_states=500, n_actions=6, dim=d, beta=1.0, seed=seed,
                               theta_norm=3.0)
    return env.sample(n, seed=seed + 1)


def time_dual(data, amb, beta):
    tracemalloc.start()
    t0 = time.perf_counter()
    sol = sim.solve(data, amb, beta=beta, solver="dual")
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return sol, elapsed, peak


def time_cvxpy(data, amb, beta):
    t0 = time.perf_counter()
    try:
        sol = sim.solve(data, amb, beta=beta, solver="cvxpy")
    except ValueError as exc:
        return None, time.perf_counter() - t0, f"failed: {str(exc)[:80]}"
    return sol, time.perf_counter() - t0, "optimal"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000, 1_000_000])
    p.add_argument("--sets", nargs="+", choices=sorted(SETS), default=list(SETS))
    p.add_argument("--d", type=int, default=8, help="feature dimension (default 8)")
    p.add_argument("--data", choices=["env", "gaussian"], default="env",
                   help="environment sample (default) or Gaussian features (see make_data)")
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cvxpy-max-n", type=int, default=10_000,
                   help="run cvxpy only up to this n (default 1e4)")
    p.add_argument("--quick", action="store_true", help="n = 1000 only")
    p.add_argument("--csv", type=pathlib.Path, help="append the rows to this CSV file")
    args = p.parse_args(argv)
    sizes = [1000] if args.quick else args.sizes
    writer = None
    if args.csv is not None:
        new = not args.csv.exists()
        fh = args.csv.open("a", newline="")
        writer = csv.DictWriter(fh, COLUMNS)
        if new:
            writer.writeheader()
    print(" ".join(f"{c:>14}" for c in COLUMNS))
    for n in sizes:
        data = make_data(n, args.d, args.seed, args.data)
        sim.solve(data, sim.Nominal(), beta=args.beta)  # untimed: first-touch of the arrays
        for name in args.sets:
            amb = SETS[name]()
            sol, t_dual, peak = time_dual(data, amb, args.beta)
            row = {"data": args.data, "n": n, "set": name, "dual_s": t_dual,
                   "dual_iters": sol.iterations, "dual_peak_mb": peak, "dual_gap": sol.gap,
                   "opt_gap": sol.info.get("optimality_gap", math.nan), "cvxpy_s": math.nan,
                   "cvxpy_status": "skipped (n > cap)", "speedup": math.nan,
                   "theta_diff_inf": math.nan, "value_rel_diff": math.nan}
            if isinstance(amb, sim.Wasserstein) and amb.p == 2:
                row["cvxpy_status"] = "no conic form"
            elif n <= args.cvxpy_max_n:
                ref, t_cvx, status = time_cvxpy(data, amb, args.beta)
                row.update(cvxpy_s=t_cvx, cvxpy_status=status, speedup=t_cvx / t_dual)
                if ref is not None:
                    row["theta_diff_inf"] = float(np.max(np.abs(ref.theta - sol.theta)))
                    row["value_rel_diff"] = abs(ref.value - sol.value) / max(1.0, abs(ref.value))
            print(" ".join(f"{v:>14.4g}" if isinstance(v, float) else f"{v!s:>14}"
                           for v in row.values()), flush=True)
            if writer is not None:
                writer.writerow(row)
                fh.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
