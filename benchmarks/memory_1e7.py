"""Peak memory and CPU time of one dual solve per set at n = 1e7, d = 8.

Gaussian features (every atom distinct, so merging does not help), labels from a random
logistic model. Peak memory is tracemalloc's peak during the solve, divided by the size of
the feature array (issue 9's target: at most 4x). ``python benchmarks/memory_1e7.py``:
about 4 minutes with one BLAS thread, about 8 GB of RAM at the peak. ``--sets wdpo2
wdpo2_kappa`` solves only those sets, ``--n 2000000`` a smaller sample (the same ratio).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
from threadpoolctl import threadpool_limits

import simulator as sim

N, D = 10**7, 8
SETS = {"dpo": sim.Nominal(), "kldpo": sim.KL(0.1), "chi2dpo": sim.ChiSquare(0.1),
        "wdpo1": sim.Wasserstein(0.05, p=1), "wdpo1_kappa": sim.Wasserstein(0.05, p=1, kappa=1.0),
        "wdpo2": sim.Wasserstein(0.05, p=2), "wdpo2_kappa": sim.Wasserstein(0.05, p=2, kappa=1.0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    p.add_argument("--n", type=int, default=N, help="atoms (default 1e7)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.n, D)) / np.sqrt(D)
    theta = rng.normal(size=D)
    y = (rng.random(args.n) < 1.0 / (1.0 + np.exp(-x @ theta))).astype(int)
    data = sim.PreferenceData(x, y)
    print(f"{'set':12s} {'cpu_s':>7s} {'peak/data':>9s}  status")
    with threadpool_limits(1):
        for name in args.sets:
            amb = SETS[name]
            tracemalloc.start()
            t0 = time.process_time()
            try:
                sol = sim.solve(data, amb)
                status = f"optimal, gap {sol.info['optimality_gap']:.1e}"
            except (RuntimeError, ValueError) as exc:
                status = f"{type(exc).__name__}: {str(exc)[:80]}"
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            print(f"{name:12s} {time.process_time() - t0:7.1f} {peak / x.nbytes:9.2f}  {status}",
                  flush=True)


if __name__ == "__main__":
    main()
