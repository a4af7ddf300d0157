"""Crossover dimension of the dual solver: ``method="newton"`` against ``method="lbfgs"``.

Solves each smooth set (DPO, KL, chi-square, Wasserstein p = 1 with ``kappa = inf``) on
Gaussian data (``benchmarks/solvers.py``'s ``make_data``) with both methods, side by
side in one process, and prints the process CPU seconds of each with one BLAS thread,
their ratio and the agreement of the two answers. ``simulator.solvers.dual``'s
``QUASI_NEWTON_MIN_D`` is the smallest ``d`` where L-BFGS wins.

    python benchmarks/crossover.py --n 20000 --d 16 32 64 128 256 --repeat 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from solvers import SETS, make_data  # noqa: E402

import simulator as sim  # noqa: E402

SMOOTH = ("dpo", "kldpo", "chi2dpo", "wdpo1")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--d", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument("--sets", nargs="+", choices=SMOOTH, default=list(SMOOTH))
    p.add_argument("--repeat", type=int, default=3,
                   help="solves per method; the fastest is reported (default 3)")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error(f"--repeat must be >= 1, got {args.repeat}")
    print(f"{'d':>5} {'set':>8} {'newton_s':>9} {'lbfgs_s':>9} {'ratio':>6} "
          f"{'theta_rel':>9} {'value_diff':>10} {'gap_lbfgs':>9}")
    with threadpool_limits(1):
        sim.solve(make_data(200, 4, 0, "gaussian"), sim.KL(0.1), method="lbfgs")  # warm-up
        for d in args.d:
            data = make_data(args.n, d, 0, "gaussian")
            for name in args.sets:
                amb = SETS[name]()
                out = {}
                for method in ("newton", "lbfgs"):
                    best = float("inf")
                    for _ in range(args.repeat):
                        t0 = time.process_time()
                        sol = sim.solve(data, amb, method=method)
                        best = min(best, time.process_time() - t0)
                    out[method] = (best, sol)
                (tn, sn), (tq, sq) = out["newton"], out["lbfgs"]
                rel = np.linalg.norm(sq.theta - sn.theta) / np.linalg.norm(sn.theta)
                print(f"{d:>5} {name:>8} {tn:>9.3f} {tq:>9.3f} {tn / tq:>6.2f} {rel:>9.1e} "
                      f"{abs(sq.value - sn.value):>10.1e} "
                      f"{sq.info['optimality_gap']:>9.1e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
