"""The ``llm`` miniature in float32 against float64: time per cell and reward difference.

Runs :func:`experiments.llm.run_cell` of the default configuration (or ``--quick``)
for every configured method and seed in both dtypes, interleaved (float32 then
float64 for each cell, one torch thread), and prints the median time ratio
``float64 / float32`` per cell and the difference of the mean mixture reward at
``alpha_test = 0.75`` between the dtypes (max and mean over cells).

Usage::

    python benchmarks/llm_dtype.py [--seeds 2] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from experiments import llm
from experiments.config import load_defaults

ALPHA = 0.75  # the in-distribution point of the docs' table (alpha_train = 0.7)


def main() -> None:
    """Measure and print the table (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2, help="seeds per method")
    parser.add_argument("--quick", action="store_true", help="the [quick] configuration")
    args = parser.parse_args()
    defaults, quick = load_defaults(llm)
    cfg = dict(defaults, **(quick if args.quick else {}))
    if ALPHA not in cfg["alpha_test"]:
        cfg["alpha_test"] = sorted(set(cfg["alpha_test"]) | {ALPHA})
    ratios, diffs = [], []
    print("| method | seed | float32 s | float64 s | ratio | reward f32 | reward f64 |")
    print("|---|---|---|---|---|---|---|")
    for method in cfg["methods"]:
        for seed in range(args.seeds):
            times, rewards = {}, {}
            for dtype in ("float32", "float64"):
                t0 = time.perf_counter()
                rows = llm.run_cell({"method": method, "seed": seed}, dict(cfg, dtype=dtype))
                times[dtype] = time.perf_counter() - t0
                rewards[dtype] = next(r["reward"] for r in rows if r["alpha_test"] == ALPHA)
            ratios.append(times["float64"] / times["float32"])
            diffs.append(abs(rewards["float64"] - rewards["float32"]))
            print(f"| {method} | {seed} | {times['float32']:.2f} | {times['float64']:.2f} | "
                  f"{ratios[-1]:.2f} | {rewards['float32']:.4f} | {rewards['float64']:.4f} |")
    print(f"\nmedian time ratio float64 / float32 per cell: {statistics.median(ratios):.2f}x "
          f"({len(ratios)} cells)")
    print(f"|reward(float32) - reward(float64)| at alpha = {ALPHA}: max {max(diffs):.2e}, "
          f"mean {np.mean(diffs):.2e}")


if __name__ == "__main__":
    main()
