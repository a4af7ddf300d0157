"""The generic grid runner: cells in parallel, written as they finish, resumable.

An experiment module (see :mod:`experiments`) lists its grid with ``cells(cfg)``;
the runner computes every cell not yet finished with ``run_cell(cell, cfg)`` and
appends its rows to ``DIR/<name>.csv`` the moment the cell finishes.

Files in ``DIR``
----------------
``<name>.csv``
    One line per result row: ``cell_id`` (a hash of the cell's parameters),
    ``status`` (``ok`` or ``error``), ``error`` (``ExceptionType: message`` for a
    cell that raised, else empty), ``cell_rows`` (how many rows the cell wrote), the
    cell's parameters, then the row's own columns.
    A cell that raised gets one ``error`` row and does not stop the others.
``<name>_config.json``
    The configuration of the run. Resuming with a different configuration is
    refused (``--restart`` discards the old results, or use another ``--out``).
``<stem>.csv``
    Each table returned by ``summarize(df, cfg)`` on the ``ok`` rows.

Resuming
--------
Each cell's rows go to disk in one ``write`` followed by ``fsync``, so a run
stopped at any moment (Ctrl-C, ``kill -9``, a crash) keeps every finished cell;
a line cut short by a kill, and any cell with fewer rows than its ``cell_rows``,
is dropped when the file is read back. Running the same
command again computes only the missing cells. Cells recorded as ``error`` are
retried by default (their error rows are removed first); ``retry_errors=False``
keeps them. Once every cell is done the file is rewritten in grid order, so the
final CSV is the same whatever ``--jobs``, backend or interruptions (given that
``run_cell`` is deterministic, e.g. seeded from the cell).
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import io
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd

from .backends import map_unordered

__all__ = ["cell_id", "execute_cell", "run_experiment", "RunReport", "ConfigMismatchError",
           "read_results"]

META = ("cell_id", "status", "error", "cell_rows")


class ConfigMismatchError(ValueError):
    """The results directory holds a run made with another configuration."""


def cell_id(cell: dict[str, Any]) -> str:
    """Stable 12-hex-digit id of a cell: SHA-1 of its sorted-key JSON."""
    blob = json.dumps(cell, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _fmt(value: Any) -> str:
    """A CSV field: floats by shortest round-trip repr, containers as JSON."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None:
        return ""
    if isinstance(value, bool | int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, list | tuple | dict):
        return json.dumps(value)
    return " | ".join(str(value).splitlines())


def execute_cell(module_name: str, cell: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one cell in a worker; exceptions become an ``error`` record.

    Returns ``{"cell_id", "status", "error", "rows"}`` with the rows already
    formatted as CSV fields (cell parameters first, row values win on a clash).
    ``KeyboardInterrupt`` is not caught.
    """
    cid = cell_id(cell)
    base = {"cell_id": cid}
    try:
        module = importlib.import_module(module_name)
        rows = module.run_cell(dict(cell), dict(cfg))
        if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
            raise TypeError(f"run_cell must return a non-empty list of dicts, got {rows!r:.80}")
        out = [{**base, "status": "ok", "error": "", "cell_rows": len(rows), **cell, **r}
               for r in rows]
        status, error = "ok", ""
    except Exception as exc:  # a failing cell must not stop the grid
        status, error = "error", f"{type(exc).__name__}: {exc}"
        out = [{**base, "status": status, "error": error, "cell_rows": 1, **cell}]
    return {"cell_id": cid, "status": status, "error": error,
            "rows": [{k: _fmt(v) for k, v in r.items()} for r in out]}


# ---------------------------------------------------------------------------- storage
def _repair_tail(path: Path) -> None:
    """Drop a last line left incomplete by a killed writer."""
    with path.open("rb+") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            fh.truncate(data.rfind(b"\n") + 1)


def read_results(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows (as strings) of a results CSV; empty when missing.

    Rows of a cell whose block was cut short (fewer than its ``cell_rows``) are left out.
    """
    if not path.exists():
        return [], []
    _repair_tail(path)
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    count = Counter(r["cell_id"] for r in rows)
    complete = [r for r in rows if str(count[r["cell_id"]]) == r.get("cell_rows")]
    return list(reader.fieldnames or []), complete


def _encode(columns: list[str], rows: list[dict[str, str]], header: bool) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", restval="")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def _rewrite(path: Path, columns: list[str], rows: list[dict[str, str]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(_encode(columns, rows, header=True))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _append(path: Path, columns: list[str], rows: list[dict[str, str]]) -> list[str]:
    """Append rows (one write + fsync); returns the possibly extended header."""
    new = [k for r in rows for k in r if k not in columns]
    if new or not path.exists():
        _, old = read_results(path)
        columns = columns + list(dict.fromkeys(new))
        _rewrite(path, columns, old + rows)
        return columns
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, _encode(columns, rows, header=False))
        os.fsync(fd)
    finally:
        os.close(fd)
    return columns


def _check_config(cfg_path: Path, results: Path, name: str, cfg: dict[str, Any]) -> None:
    want = json.loads(json.dumps(cfg))
    if cfg_path.exists():
        saved = json.loads(cfg_path.read_text()).get("config", {})
    elif results.exists():
        raise ConfigMismatchError(
            f"{results} exists but {cfg_path.name} does not, so its configuration is "
            "unknown; rerun with --restart to discard it, or choose another --out")
    else:
        return
    if saved != want and results.exists():
        keys = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
        diff = "; ".join(f"{k}: saved {saved.get(k)!r}, now {want.get(k)!r}" for k in keys)
        raise ConfigMismatchError(
            f"{results} was produced by experiment {name!r} with another configuration "
            f"({diff}); refusing to mix results. Rerun with --restart to discard them, or "
            "choose another --out")


@dataclass
class RunReport:
    """What a call of :func:`run_experiment` did."""

    name: str
    results: Path
    n_cells: int
    n_skipped: int
    n_run: int = 0
    n_errors: int = 0
    summaries: dict[str, Path] = field(default_factory=dict)


def _grid(module: ModuleType, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    cells = module.cells(dict(cfg))
    if not isinstance(cells, list) or not cells or not all(isinstance(c, dict) for c in cells):
        raise ValueError(f"{module.__name__}.cells must return a non-empty list of dicts")
    ids = [cell_id(c) for c in cells]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{module.__name__}.cells returned duplicate cells")
    return cells


def run_experiment(module: ModuleType, cfg: dict[str, Any], out_dir: str | Path, *,
                   jobs: int = 1, backend: str = "local", scheduler: str | None = None,
                   restart: bool = False, retry_errors: bool = True, progress: bool = True,
                   echo: Callable[[str], None] | None = print) -> RunReport:
    """Run (or resume) the grid of ``module`` and write its results and summaries.

    Parameters
    ----------
    module
        An experiment module (``NAME``, ``cells``, ``run_cell``, ``summarize``).
    cfg
        The resolved configuration (see :mod:`experiments.config`).
    out_dir
        Results directory (created if needed).
    jobs, backend, scheduler
        See :func:`experiments.backends.map_unordered`.
    restart
        Discard earlier results and configuration of this experiment in ``out_dir``.
    retry_errors
        Recompute cells recorded as ``error`` (default) instead of keeping them.
    progress
        Show a tqdm progress bar (cells done, time left) on stderr.
    echo
        Where summary tables and notes are printed (``None``: silent).
    """
    name = module.NAME
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = out / f"{name}.csv"
    cfg_path = out / f"{name}_config.json"
    if restart:
        results.unlink(missing_ok=True)
        cfg_path.unlink(missing_ok=True)
    _check_config(cfg_path, results, name, cfg)
    cfg_path.write_text(json.dumps({"experiment": name, "config": cfg}, indent=2) + "\n")

    cells = _grid(module, cfg)
    order = {cell_id(c): i for i, c in enumerate(cells)}
    columns, rows = read_results(results)
    if retry_errors:
        rows = [r for r in rows if r["status"] == "ok"]
    if results.exists():
        _rewrite(results, columns, rows)
    done = {r["cell_id"] for r in rows}
    pending = [c for c in cells if cell_id(c) not in done]
    report = RunReport(name, results, len(cells), len(cells) - len(pending))

    if pending:
        from tqdm.auto import tqdm

        if not columns:
            columns = list(META) + list(dict.fromkeys(k for c in cells for k in c))
        bar = tqdm(total=len(cells), initial=report.n_skipped, desc=name, unit="cell",
                   file=sys.stderr, disable=not progress, dynamic_ncols=True)
        tasks = [(module.__name__, c, cfg) for c in pending]
        try:
            for res in map_unordered(execute_cell, tasks, backend=backend, jobs=jobs,
                                     scheduler=scheduler):
                columns = _append(results, columns, res["rows"])
                rows.extend(res["rows"])
                report.n_run += 1
                report.n_errors += res["status"] != "ok"
                bar.update(1)
                if res["status"] != "ok":
                    bar.write(f"cell {res['cell_id']} failed: {res['error']}")
        finally:
            bar.close()

    stale = {r["cell_id"] for r in rows} - set(order)
    if stale and echo:
        echo(f"note: dropping {len(stale)} cells no longer in the grid")
    rows = sorted((r for r in rows if r["cell_id"] in order), key=lambda r: order[r["cell_id"]])
    _rewrite(results, columns, rows)
    report.n_errors = len({r["cell_id"] for r in rows if r["status"] != "ok"})
    report.summaries = _summarize(module, cfg, results, out, echo)
    if report.n_errors and echo:
        echo(f"{report.n_errors} cells failed (status=error in {results}); "
             "rerun the same command to retry them")
    return report


def _summarize(module: ModuleType, cfg: dict[str, Any], results: Path, out: Path,
               echo: Callable[[str], None] | None) -> dict[str, Path]:
    df = pd.read_csv(results, keep_default_na=True)
    df = df[df["status"] == "ok"].reset_index(drop=True)
    if df.empty:
        if echo:
            echo("no finished cells; nothing to summarise")
        return {}
    paths = {}
    for stem, table in module.summarize(df, dict(cfg)).items():
        path = out / f"{stem}.csv"
        table.to_csv(path, index=False)
        paths[stem] = path
        if echo:
            with pd.option_context("display.width", 160, "display.max_columns", 30,
                                   "display.max_rows", 200):
                echo(f"\n{stem} ({path}):\n{table.to_string(index=False)}")
    return paths
