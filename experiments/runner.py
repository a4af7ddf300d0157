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

``.<name>.lock``
    Present while a run holds the directory (:mod:`experiments.lock`): a second run
    of the same experiment into the same directory is refused.

Checks before any cell
----------------------
:func:`prepare` checks the configuration (the generic rules of
:mod:`experiments.validation`, then the module's ``validate(cfg)`` if any) and
builds the grid; nothing is written when it fails.

Resuming
--------
Each cell's rows go to disk in one ``write`` followed by ``fsync``, so a run
stopped at any moment (Ctrl-C, ``kill -9``, a crash) keeps every finished cell;
a line cut short by a kill, a row whose field count differs from the header's or
whose values do not parse to their column's type, and any cell left with fewer rows
than its ``cell_rows``, are dropped when the file is read back (and recomputed). Running the same
command again computes only the missing cells. Cells recorded as ``error`` are
retried by default (their error rows are removed first); ``retry_errors=False``
keeps them. Once every cell is done the file is rewritten in grid order, so the
final CSV is the same whatever ``--jobs``, backend or interruptions (given that
``run_cell`` is deterministic, e.g. seeded from the cell; every cell runs with one
BLAS thread, see :mod:`experiments.backends`).

Failed cells in summaries
-------------------------
``summarize(df, cfg)`` receives the ``ok`` rows; ``df.attrs["failed"]`` is a
DataFrame of the failed cells (``cell_id``, ``error`` and the cell parameters,
one row per cell, empty when none). :func:`add_failed_count` adds the per-row
count ``n_failed`` to a summary table; the runner also prints a warning naming
every failed cell.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import io
import json
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd

from .backends import DASK_TIMEOUT_S, check_options, map_unordered
from .lock import ResultsLock
from .validation import check_generic

__all__ = ["cell_id", "execute_cell", "run_experiment", "RunReport", "ConfigMismatchError",
           "read_results", "prepare", "add_failed_count"]

META = ("cell_id", "status", "error", "cell_rows")
_CELL_ID = re.compile(r"[0-9a-f]{12}")
#: failed cells named one per line in the end-of-run warning; the rest are counted
MAX_LISTED_FAILURES = 20


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


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _well_formed(header: list[str], raw: list[list[str]]) -> list[dict[str, str]]:
    """Rows with the header's field count, valid runner fields and values of the column type.

    A column is numeric when at least half of its non-empty values parse as numbers;
    a row with a non-empty, non-numeric value in a numeric column is torn.
    """
    rows = [dict(zip(header, r, strict=True)) for r in raw if len(r) == len(header)]
    rows = [r for r in rows if _CELL_ID.fullmatch(r["cell_id"]) and r["status"] in ("ok", "error")
            and r["cell_rows"].isdigit() and int(r["cell_rows"]) >= 1]
    numeric = []
    for col in header[len(META):]:
        values = [r[col] for r in rows if r[col] != ""]
        if values and 2 * sum(map(_is_number, values)) >= len(values):
            numeric.append(col)
    return [r for r in rows if all(r[c] == "" or _is_number(r[c]) for c in numeric)]


def read_results(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows (as strings) of a results CSV; empty when missing.

    Torn rows (:func:`_well_formed`) are left out, and so are all rows of a cell whose
    block is then incomplete (fewer rows than its ``cell_rows``).
    """
    if not path.exists():
        return [], []
    _repair_tail(path)
    with path.open(newline="") as fh:
        raw = list(csv.reader(fh))
    if not raw:
        return [], []
    if raw[0][:len(META)] != list(META):
        raise ValueError(f"{path} is not a results file of this runner (its header starts "
                         f"{raw[0][:len(META)]}, not {list(META)}); move it away or use "
                         "--restart")
    header = raw[0]
    rows = _well_formed(header, raw[1:])
    count = Counter(r["cell_id"] for r in rows)
    complete = [r for r in rows if str(count[r["cell_id"]]) == r["cell_rows"]]
    return header, complete


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
    failed: list[str] = field(default_factory=list)


def _grid(module: ModuleType, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    cells = module.cells(dict(cfg))
    if not isinstance(cells, list) or not all(isinstance(c, dict) for c in cells):
        raise ValueError(f"{module.__name__}.cells must return a list of dicts")
    if not cells:
        raise ValueError(f"the configuration gives an empty grid ({module.__name__}.cells "
                         "returned no cell)")
    ids = [cell_id(c) for c in cells]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{module.__name__}.cells returned duplicate cells")
    return cells


def prepare(module: ModuleType, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Check ``cfg`` and return the grid; ``ValueError`` naming the key otherwise.

    Applies :func:`experiments.validation.check_generic`, then ``module.validate(cfg)``
    when the module defines it, then builds ``module.cells(cfg)``.
    """
    check_generic(cfg)
    validate = getattr(module, "validate", None)
    if validate is not None:
        validate(dict(cfg))
    return _grid(module, cfg)


def _results_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"--out {str(out)!r} cannot be used as a results directory: "
                         f"{exc.strerror or exc}") from None
    return out


def _describe(cell: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in cell.items())


def run_experiment(module: ModuleType, cfg: dict[str, Any], out_dir: str | Path, *,
                   jobs: int = 1, backend: str = "local", scheduler: str | None = None,
                   dask_timeout: float = DASK_TIMEOUT_S, restart: bool = False,
                   retry_errors: bool = True, progress: bool = True,
                   echo: Callable[[str], None] | None = print) -> RunReport:
    """Run (or resume) the grid of ``module`` and write its results and summaries.

    Parameters
    ----------
    module
        An experiment module (``NAME``, ``cells``, ``run_cell``, ``summarize``).
    cfg
        The resolved configuration (see :mod:`experiments.config`); checked by
        :func:`prepare` before anything is written.
    out_dir
        Results directory (created if needed), locked for the run
        (:class:`experiments.lock.ResultsLock`).
    jobs, backend, scheduler, dask_timeout
        See :func:`experiments.backends.map_unordered`.
    restart
        Discard earlier results and configuration of this experiment in ``out_dir``.
    retry_errors
        Recompute cells recorded as ``error`` (default) instead of keeping them.
    progress
        Show a tqdm progress bar (cells done, time left) on stderr.
    echo
        Where summary tables and notes are printed (``None``: silent).

    Raises
    ------
    ValueError
        Invalid configuration or options, or an unusable ``out_dir``.
    experiments.lock.ResultsLockedError
        Another run of this experiment holds ``out_dir``.
    ConfigMismatchError
        ``out_dir`` holds results of another configuration.
    experiments.backends.NoWorkerError
        No Dask worker for ``dask_timeout`` seconds (finished cells are saved).
    """
    cells = prepare(module, cfg)
    check_options(backend, jobs, dask_timeout)
    out = _results_dir(out_dir)
    with ResultsLock(out, module.NAME) as lock:
        if lock.stale and echo:
            echo(f"note: {lock.path} was left by a run that ended without releasing it "
                 f"(pid host: {lock.stale}); taking it over")
        return _run_locked(module, cfg, cells, out, jobs=jobs, backend=backend,
                           scheduler=scheduler, dask_timeout=dask_timeout, restart=restart,
                           retry_errors=retry_errors, progress=progress, echo=echo)


def _run_locked(module: ModuleType, cfg: dict[str, Any], cells: list[dict[str, Any]],
                out: Path, *, jobs: int, backend: str, scheduler: str | None,
                dask_timeout: float, restart: bool, retry_errors: bool, progress: bool,
                echo: Callable[[str], None] | None) -> RunReport:
    name = module.NAME
    results = out / f"{name}.csv"
    cfg_path = out / f"{name}_config.json"
    if restart:
        results.unlink(missing_ok=True)
        cfg_path.unlink(missing_ok=True)
    _check_config(cfg_path, results, name, cfg)
    cfg_path.write_text(json.dumps({"experiment": name, "config": cfg}, indent=2) + "\n")

    order = {cell_id(c): i for i, c in enumerate(cells)}
    columns, rows = read_results(results)
    if retry_errors:
        rows = [r for r in rows if r["status"] == "ok"]
    if results.exists():
        _rewrite(results, columns, rows)
    done = {r["cell_id"] for r in rows}
    pending = [c for c in cells if cell_id(c) not in done]
    report = RunReport(name, results, len(cells), len(cells) - len(pending))
    if echo and pending:
        echo(f"{name}: {len(cells)} cells, {report.n_skipped} already done (reused), "
             f"{len(pending)} to compute")

    if pending:
        from tqdm.auto import tqdm

        if not columns:
            columns = list(META) + list(dict.fromkeys(k for c in cells for k in c))
        bar = tqdm(total=len(cells), initial=report.n_skipped, desc=name, unit="cell",
                   file=sys.stderr, disable=not progress, dynamic_ncols=True)
        tasks = [(module.__name__, c, cfg) for c in pending]
        try:
            for res in map_unordered(execute_cell, tasks, backend=backend, jobs=jobs,
                                     scheduler=scheduler, dask_timeout=dask_timeout,
                                     preload=module.__name__):
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
    by_id = {cell_id(c): c for c in cells}
    report.failed = list(dict.fromkeys(r["cell_id"] for r in rows if r["status"] != "ok"))
    report.n_errors = len(report.failed)
    if echo:
        echo(f"every cell was already done ({report.n_skipped} reused, 0 computed)"
             if not pending else
             f"{name}: {report.n_skipped} cells reused, {report.n_run} computed, "
             f"{report.n_errors} failed")
    params = list(dict.fromkeys(k for c in cells for k in c))
    report.summaries = _summarize(module, cfg, params, results, out, echo)
    if report.n_errors and echo:
        errors = {r["cell_id"]: r["error"] for r in rows if r["status"] != "ok"}
        listed = [f"  {cid} ({_describe(by_id[cid])}): {errors[cid]}"
                  for cid in report.failed[:MAX_LISTED_FAILURES]]
        more = len(report.failed) - len(listed)
        echo(f"warning: {report.n_errors} of {len(cells)} cells failed (status=error in "
             f"{results}); the summaries count them in n_failed and leave them out:\n"
             + "\n".join(listed) + (f"\n  ... and {more} more" if more > 0 else "")
             + "\nrerun the same command to retry them")
    return report


def add_failed_count(table: pd.DataFrame, df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """``table`` with ``n_failed``: the number of failed cells per value of ``keys``.

    Groups that only have failed cells get a row of their own (other columns NaN).

    Parameters
    ----------
    table
        A summary table with one row per value of ``keys``.
    df
        The frame ``summarize`` received; its failed cells are ``df.attrs["failed"]``
        (none when absent).
    keys
        Cell parameters that identify a row of ``table``.
    """
    failed = df.attrs.get("failed")
    if failed is None or failed.empty:
        return table.assign(n_failed=0)
    counts = failed.groupby(keys, sort=False).size().rename("n_failed").reset_index()
    counts = counts.astype({k: table[k].dtype for k in keys})
    merged = table.merge(counts, on=keys, how="left")
    only_failed = counts.merge(table[keys], on=keys, how="left", indicator=True)
    only_failed = only_failed[only_failed["_merge"] == "left_only"].drop(columns="_merge")
    merged = pd.concat([merged, only_failed], ignore_index=True) if len(only_failed) else merged
    merged["n_failed"] = merged["n_failed"].fillna(0).astype(int)
    return merged


def _summarize(module: ModuleType, cfg: dict[str, Any], params: list[str], results: Path,
               out: Path, echo: Callable[[str], None] | None) -> dict[str, Path]:
    full = pd.read_csv(results, keep_default_na=True)
    bad = full["status"] != "ok"
    failed = full.loc[bad, ["cell_id", "error", *params]].drop_duplicates("cell_id")
    df = full[~bad].reset_index(drop=True)
    if df.empty:
        if echo:
            echo("no finished cells; nothing to summarise")
        return {}
    df.attrs["failed"] = failed.reset_index(drop=True)
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
