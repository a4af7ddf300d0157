"""Experiments of the distributionally robust DPO simulator (SPEC section 6).

Run one with ``python -m experiments <name> [options]`` or ``drdpo <name>``; see
``docs/experiments.md``. Every experiment is a grid of *cells* run by the generic
runner (:mod:`experiments.runner`), which writes each finished cell at once and
resumes an interrupted run without recomputing finished cells.

Writing an experiment
---------------------
An experiment is a module ``experiments/<name>.py``, registered in
``experiments.__main__.EXPERIMENTS``, with a default configuration
``experiments/configs/<name>.toml`` (flat keys; a ``[quick]`` table of overrides
for ``--quick``). Every top-level key becomes a flag ``--<key-with-dashes>``, typed
from its default (lists are comma-separated on the command line). The module defines::

    NAME: str                                    # the experiment's name
    DESCRIPTION: str                             # one paragraph for --help
    def cells(cfg: dict) -> list[dict]           # the grid: JSON-serialisable dicts,
                                                 # one per cell, with a 'seed' if random
    def run_cell(cell: dict, cfg: dict) -> list[dict]
        # result rows of one cell; module-level, deterministic given (cell, cfg)
    def summarize(df: pandas.DataFrame, cfg: dict) -> dict[str, pandas.DataFrame]
        # df: all rows with status 'ok'; each table is written to DIR/<key>.csv;
        # df.attrs["failed"]: the failed cells (cell_id, error, cell parameters);
        # experiments.runner.add_failed_count(table, df, keys) adds their count n_failed

and optionally::

    def validate(cfg: dict) -> None              # raise ValueError naming the bad key;
                                                 # run before any cell or file (see
                                                 # experiments.validation.check)
    def add_arguments(parser) -> None            # extra (non-config) flags
    def run_special(args, cfg) -> bool           # a mode that bypasses the grid
                                                 # runner when it returns True

The runner adds the columns ``cell_id``, ``status``, ``error`` and the cell's own
parameters to every row. ``run_cell`` is called in worker processes, so it must
not rely on state set up in the parent; raise an exception for a failed cell (it
is recorded with ``status=error`` and retried on the next run). A figure module
``figures/<name>.py`` exposing ``plot(results_dir, out_dir) -> list[Path]`` draws
the results (see :mod:`figures`).
"""
