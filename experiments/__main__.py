"""Command line: ``python -m experiments <experiment> [options]`` (also ``drdpo``).

``python -m experiments --help`` lists the experiments; ``python -m experiments
<experiment> --help`` lists every option of one, including one flag per key of its
default configuration (``experiments/configs/<experiment>.toml``) with its default.
The experiment may also be given as a dotted module path (``mypkg.my_experiment``)
of a module that follows the convention of :mod:`experiments`.

The configuration is checked before anything runs or is written
(:func:`experiments.runner.prepare`); ``--dry-run`` prints the grid size and the
checked configuration and stops there.

Exit status: 0 success, 1 some cells failed (recorded as ``status=error``),
2 bad usage or configuration (also: the results directory is in use by another run),
3 no Dask worker left for ``--dask-timeout`` seconds, 130 interrupted (for 3 and 130
the finished cells are saved: rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from types import ModuleType

from .backends import BACKENDS, DASK_TIMEOUT_S, BackendUnavailableError, NoWorkerError
from .config import add_config_flags, load_defaults, resolve_config
from .lock import ResultsLockedError
from .runner import ConfigMismatchError, prepare, run_experiment

__all__ = ["EXPERIMENTS", "load_experiment", "build_parser", "main", "EXIT_NO_WORKER"]

#: exit status when no Dask worker was connected for --dask-timeout seconds (resumable)
EXIT_NO_WORKER = 3

#: name -> (module, optional extra that the module needs, one-line description)
EXPERIMENTS: dict[str, tuple[str, str | None, str]] = {
    "rates": ("experiments.rates", None,
              "sample complexity: error of the empirical robust optimum against n (SPEC 5)"),
    "shift": ("experiments.shift", None,
              "train on one preference mixture, evaluate on shifted mixtures (SPEC 2, 6)"),
    "approx": ("experiments.approx", None,
               "scalable approximations against the exact robust optima (SPEC 4)"),
    "llm": ("experiments.llm", "torch",
            "the torch backend on a small causal language model (SPEC 7)"),
    "regimes": ("experiments.regimes", None,
                "where the sqrt(n) Gaussian limit fails: radius swept through rho_0 (SPEC 5.1)"),
    "constants": ("experiments.constants", None,
                  "how the sqrt(n) error constant and the bound constants scale (SPEC 5)"),
}


def _prog() -> str:
    return "python -m experiments" if os.path.basename(sys.argv[0]) == "__main__.py" else "drdpo"


def load_experiment(name: str) -> ModuleType:
    """Import a registered experiment (or a dotted module path) with a clear error."""
    if name in EXPERIMENTS:
        module_name, extra, _ = EXPERIMENTS[name]
    elif "." in name:
        module_name, extra = name, None
    else:
        raise ValueError(f"unknown experiment {name!r}; choose one of {sorted(EXPERIMENTS)} "
                         "or give a dotted module path")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise ValueError(f"experiment {name!r} is not available: module {module_name} "
                             "is not installed in this checkout") from exc
        hint = (f"; install the '{extra}' extra: pip install 'drdpo-simulator[{extra}]'"
                if extra else "")
        raise ValueError(f"experiment {name!r} needs a package that is not installed "
                         f"({exc}){hint}") from exc
    missing = [a for a in ("NAME", "cells", "run_cell", "summarize") if not hasattr(module, a)]
    if missing:
        raise ValueError(f"{module_name} is not an experiment module: it lacks {missing}")
    return module


def _top_parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {k:<8} {v[2]}" for k, v in EXPERIMENTS.items())
    parser = argparse.ArgumentParser(
        prog=_prog(), formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run an experiment of the distributionally robust DPO simulator.",
        epilog=f"experiments:\n{listing}\n\n'{_prog()} EXPERIMENT --help' lists its options.")
    parser.add_argument("experiment", nargs="?", help="experiment name (see below)")
    return parser


def build_parser(module: ModuleType) -> argparse.ArgumentParser:
    """The full parser of one experiment: common options, config flags, its own flags."""
    defaults, quick = load_defaults(module)
    parser = argparse.ArgumentParser(
        prog=f"{_prog()} {module.NAME}",
        description=getattr(module, "DESCRIPTION", ""),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run = parser.add_argument_group("running")
    run.add_argument("--quick", action="store_true",
                     help="apply the [quick] overrides: a small grid for CI and smoke tests")
    run.add_argument("--config", metavar="FILE", default=None,
                     help="TOML file of overrides (flat keys; below flags in precedence)")
    run.add_argument("--out", metavar="DIR", default="results",
                     help="results directory (<name>.csv, <name>_config.json, summaries)")
    run.add_argument("--jobs", type=int, default=1,
                     help="parallel worker processes for the local backend (-1: all cores)")
    run.add_argument("--backend", choices=BACKENDS, default="local",
                     help="local (joblib processes) or dask (needs --scheduler)")
    run.add_argument("--scheduler", metavar="ADDRESS", default=None,
                     help="Dask scheduler address, e.g. tcp://10.0.0.1:8786 (--backend dask)")
    run.add_argument("--dask-timeout", metavar="SECONDS", type=float, default=DASK_TIMEOUT_S,
                     help="with --backend dask: how long to wait while no worker is connected "
                          "before stopping (finished cells are saved; rerun to resume)")
    run.add_argument("--dry-run", action="store_true",
                     help="check the configuration, print the grid size and the configuration, "
                          "compute nothing")
    run.add_argument("--restart", action="store_true",
                     help="discard earlier results of this experiment in --out and start over")
    run.add_argument("--keep-errors", action="store_true",
                     help="on resume, keep cells recorded as errors instead of retrying them")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    source = (f"{module.__name__}.DEFAULT_CONFIG" if hasattr(module, "DEFAULT_CONFIG")
              else f"experiments/configs/{module.NAME}.toml")
    add_config_flags(parser, defaults, quick, source)
    if hasattr(module, "add_arguments"):
        module.add_arguments(parser)
    parser.set_defaults(_defaults=defaults, _quick=quick)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``drdpo`` and ``python -m experiments``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        top = _top_parser()
        top.parse_args(argv)
        top.print_help(sys.stderr)
        return 2
    try:
        module = load_experiment(argv[0])
        parser = build_parser(module)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv[1:])
    if args.backend == "dask" and not args.scheduler:
        parser.error("--backend dask needs --scheduler ADDRESS")
    flags = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_")}
    try:
        cfg = resolve_config(args._defaults, args._quick, use_quick=args.quick,
                             config_file=args.config, flags=flags)
        cells = prepare(module, cfg)
        if args.dry_run:
            print(f"{module.NAME}: {len(cells)} cells; configuration (checked):\n"
                  + json.dumps(cfg, indent=2))
            return 0
        if hasattr(module, "run_special") and module.run_special(args, cfg):
            return 0
        report = run_experiment(module, cfg, args.out, jobs=args.jobs, backend=args.backend,
                                scheduler=args.scheduler, dask_timeout=args.dask_timeout,
                                restart=args.restart, retry_errors=not args.keep_errors,
                                progress=not args.no_progress)
    except (ValueError, ConfigMismatchError, BackendUnavailableError,
            ResultsLockedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NoWorkerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_WORKER
    except KeyboardInterrupt:
        print("\ninterrupted: finished cells are saved; rerun the same command to resume",
              file=sys.stderr)
        return 130
    return 1 if report.n_errors else 0


if __name__ == "__main__":
    sys.exit(main())
