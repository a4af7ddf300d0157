"""``python -m figures``: redraw every figure from saved results, without recomputing."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from experiments.__main__ import EXPERIMENTS

__all__ = ["FIGURE_MODULES", "main", "plot_all"]

#: experiment -> figure modules drawn from its results (default: ``figures.<name>``).
#: Kept here rather than in ``figures/__init__.py`` so that an output folder named
#: ``figures/`` in the working directory cannot hide it.
FIGURE_MODULES: dict[str, tuple[str, ...]] = {
    "rates": ("figures.rates", "figures.coverage"),
    "regimes": ("figures.regimes",),
    "constants": ("figures.constants",),
}


def plot_all(results_dir: Path, out_dir: Path, only: list[str] | None = None,
             echo=print) -> list[Path]:
    """Draw the figures of every experiment whose ``<name>.csv`` is in ``results_dir``."""
    written: list[Path] = []
    for name in only or list(EXPERIMENTS):
        if not (results_dir / f"{name}.csv").exists():
            if only:
                raise ValueError(f"no results for {name!r}: {results_dir / (name + '.csv')} "
                                 "does not exist")
            continue
        for module_name in FIGURE_MODULES.get(name, (f"figures.{name}",)):
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name != module_name:
                    raise
                echo(f"skipping {name}: no figure module {module_name}")
                continue
            paths = module.plot(results_dir, out_dir)
            written.extend(paths)
            for p in paths:
                echo(f"wrote {p}")
    return written


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 when nothing could be drawn)."""
    parser = argparse.ArgumentParser(
        prog="python -m figures", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Draw the PNG figures of every experiment whose results exist "
                    "(rates.png, coverage.png, shift.png, regimes.png, constants.png, and those of "
                    "approx and llm), "
                    "from the saved CSV files only.")
    parser.add_argument("--results", metavar="DIR", default="results",
                        help="results directory written by the experiments")
    parser.add_argument("--out", metavar="DIR", default="figures",
                        help="where the PNG files are written")
    parser.add_argument("--only", metavar="NAME", nargs="+", default=None,
                        choices=sorted(EXPERIMENTS), help="draw only these experiments")
    args = parser.parse_args(argv)
    try:
        paths = plot_all(Path(args.results), Path(args.out), args.only)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not paths:
        print(f"error: no results found in {args.results}; run an experiment first "
              "(e.g. drdpo rates)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
