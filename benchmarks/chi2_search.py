"""The chi-square search for ``eta*`` against the sorted closed form, side by side in one run.

On the losses ``l = softplus(-a . delta)`` of Gaussian features (``d = 8``) it
times, per evaluation: the sorted closed form (main's inner algorithm, now the fallback),
the active-set search from a cold start, and from the ``eta*`` of a point ``1e-3`` away (the
warm start of a Newton or line-search step); it prints the times in data passes (``A @
delta``, softplus, weighted sum), the ratio sort / search, the search's iterations and
``|eta_search - eta_sorted| / (1 + |eta|)``. ``python benchmarks/chi2_search.py [--sizes
...]``: under a minute with one BLAS thread.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from threadpoolctl import threadpool_limits

import simulator as sim
from simulator.solvers import chi2

#: Repeats of each timing; the fastest is reported (the least disturbed by other jobs).
REPEATS = 5


def fastest(fun) -> float:
    best = math.inf
    for _ in range(REPEATS):
        t0 = time.process_time()
        fun()
        best = min(best, time.process_time() - t0)
    return best


def row(n: int, rho: float, d: int = 8) -> str:
    rng = np.random.default_rng(n)
    a = rng.standard_normal((n, d))
    w = np.full(n, 1.0 / n)
    delta = rng.standard_normal(d)
    near = delta * (1 + 1e-3)
    t_pass = fastest(lambda: float(w @ sim.softplus(-(a @ delta))))
    c2 = 1.0 + rho
    l, l_near = sim.softplus(-(a @ delta)), sim.softplus(-(a @ near))
    z = l - l.max()
    # eta* at the nearby point, in loss units, then relative to this point's max loss
    warm0 = chi2._minimiser(w, l_near - l_near.max(), c2, None) + l_near.max() - l.max()
    iters = []
    sums = chi2._active_sums

    def counted(*args):
        iters.append(1)
        return sums(*args)

    chi2._active_sums = counted
    try:
        t_sort = fastest(lambda: chi2._sorted_minimiser(w, z, c2))
        t_cold = fastest(lambda: chi2._minimiser(w, z, c2, None))
        iters.clear()
        eta = chi2._minimiser(w, z, c2, None)
        it_cold = len(iters)
        t_warm = fastest(lambda: chi2._minimiser(w, z, c2, warm0))
        iters.clear()
        chi2._minimiser(w, z, c2, warm0)
        it_warm = len(iters)
    finally:
        chi2._active_sums = sums
    err = abs(eta - chi2._sorted_minimiser(w, z, c2)) / (1 + abs(eta))
    return (f"{n:>9d} {rho:>6g} {t_sort / t_pass:>10.2f} {t_cold / t_pass:>10.2f} "
            f"{t_warm / t_pass:>10.2f} {t_sort / t_cold:>10.1f} {t_sort / t_warm:>10.1f} "
            f"{it_cold:>6d} {it_warm:>6d} {err:>9.1e}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--rho", type=float, nargs="+", default=[0.1, 3.0],
                   help="radii (default 0.1: every atom active here; 3: an interior eta*)")
    args = p.parse_args(argv)
    print(f"{'n':>9s} {'rho':>6s} {'sort':>10s} {'cold':>10s} {'warm':>10s} {'sort/cold':>10s} "
          f"{'sort/warm':>10s} {'it_c':>6s} {'it_w':>6s} {'eta_diff':>9s}   (times in passes)")
    with threadpool_limits(1):
        for n in args.sizes:
            for rho in args.rho:
                print(row(n, rho), flush=True)


if __name__ == "__main__":
    main()
