"""Wall time of the default ``rates`` run: two source trees side by side, alternated.

Usage::

    python benchmarks/rates_wall.py OLD_TREE NEW_TREE [--repeats 2] [-- extra flags]

Runs ``python -m experiments rates --out TMP --no-progress [extra]`` with
``PYTHONPATH=OLD_TREE`` and ``PYTHONPATH=NEW_TREE`` in turn (``old, new, new, old,
...`` so that a drift of the machine's load hits both alike), each into a fresh
directory, and prints every wall time with the 1-minute load average before it,
then the median of each tree and their ratio. Used for issue 10 (one BLAS thread
per cell, :mod:`experiments.backends`): ``OLD_TREE`` is a checkout of main.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _run(tree: str, extra: list[str]) -> float:
    env = dict(os.environ, PYTHONPATH=tree)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "experiments", "rates", "--out", out,
                        "--no-progress", *extra], cwd=tree, env=env, check=True,
                       stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("extra", nargs="*")
    args = parser.parse_args()
    times: dict[str, list[float]] = {"old": [], "new": []}
    for i in range(args.repeats):
        for which in (("old", "new") if i % 2 == 0 else ("new", "old")):
            load = os.getloadavg()[0]
            wall = _run(getattr(args, which), args.extra)
            times[which].append(wall)
            print(f"{which}: {wall:6.1f} s   (load average before: {load:.2f}, "
                  f"{os.cpu_count()} cores)", flush=True)
    old, new = statistics.median(times["old"]), statistics.median(times["new"])
    print(f"median old {old:.1f} s, new {new:.1f} s, old / new = {old / new:.2f}")


if __name__ == "__main__":
    main()
