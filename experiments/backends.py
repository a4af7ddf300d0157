"""Where the cells of an experiment run: this machine (joblib) or a Dask cluster.

A backend maps a module-level function over a list of argument tuples and yields
the results *as they finish* (in any order), so that the runner can write each
finished cell at once. Results carry their own cell id, so order does not matter.

* ``local`` -- ``jobs == 1`` runs in this process (simplest to debug; Ctrl-C stops
  at once); ``jobs > 1`` (or ``-1`` for all cores) uses joblib's ``loky`` process pool.
  Every worker watches the pid of the run that started it and exits when that run
  is gone (e.g. after ``kill -9``), so no worker outlives its run.
* ``dask`` -- ``dask.distributed`` on the scheduler at ``--scheduler ADDRESS`` (for
  sweeps that outgrow one machine). ``dask.distributed`` is imported only then; it
  ships with the ``dask`` extra (``pip install drdpo-simulator[dask]``). Workers must
  be able to import this project. An unreachable scheduler is reported after
  :data:`CONNECT_TIMEOUT_S`; when no worker is connected the run says so and waits
  ``dask_timeout`` seconds for one, then raises :class:`NoWorkerError` (the cells
  finished so far are already saved).

Every call of ``func`` runs with one BLAS/OpenMP thread (``threadpoolctl``), in
every backend and with ``jobs == 1``: results then do not depend on the thread
count (BLAS reductions in another order differ in the last bits), and parallel
cells do not oversubscribe the cores.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["BACKENDS", "BackendUnavailableError", "NoWorkerError", "map_unordered",
           "check_options", "CONNECT_TIMEOUT_S", "DASK_TIMEOUT_S"]

BACKENDS = ("local", "dask")
#: seconds to reach a Dask scheduler before giving up (a live one answers in well under 1 s)
CONNECT_TIMEOUT_S = 5.0
#: default seconds a Dask run waits with no worker connected (time for a worker to restart)
DASK_TIMEOUT_S = 180.0
#: seconds between checks of the parent (local workers) and of the Dask worker count
POLL_S = 0.5


class BackendUnavailableError(RuntimeError):
    """The chosen backend cannot run here (e.g. the ``dask`` extra is missing)."""


class NoWorkerError(RuntimeError):
    """No Dask worker was connected for longer than the timeout; the run can be resumed."""


#: the parent pid this worker process watches (set by its first cell)
_watched: list[int] = []


def _watch_parent(parent: int) -> None:
    """Exit this worker process as soon as ``parent`` is no longer its parent."""
    while os.getppid() == parent:
        time.sleep(POLL_S)
    os._exit(1)


def _in_worker(func: Callable, args: tuple, parent: int | None, in_process: bool,
               preload: str | None) -> Any:
    """``func(*args)`` with one BLAS/OpenMP thread.

    ``preload`` is imported first, so that the limit reaches the libraries it loads.
    In a worker process (``in_process=False``) the limit stays on afterwards (worker
    threads may share it) and a local worker starts, once, the watch of its
    ``parent`` pid. In the run's own process the limit is lifted after the call.
    """
    from threadpoolctl import threadpool_limits

    if preload:
        importlib.import_module(preload)
    if in_process:
        with threadpool_limits(limits=1):
            return func(*args)
    if parent is not None and not _watched:
        _watched.append(parent)
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True,
                         name="drdpo-parent-watch").start()
    threadpool_limits(limits=1)
    return func(*args)


def _local(func: Callable, tasks: Sequence[tuple], jobs: int, preload: str | None
           ) -> Iterator[Any]:
    if jobs == 1 or len(tasks) <= 1:
        for args in tasks:
            yield _in_worker(func, args, None, True, preload)
        return
    from joblib import Parallel, delayed

    parallel = Parallel(n_jobs=jobs, backend="loky", return_as="generator_unordered",
                        inner_max_num_threads=1)
    parent = os.getpid()
    yield from parallel(delayed(_in_worker)(func, args, parent, False, preload) for args in tasks)


def _connect(scheduler: str):
    from dask.distributed import Client

    try:
        return Client(scheduler, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise BackendUnavailableError(
            f"cannot reach the Dask scheduler at --scheduler {scheduler} within "
            f"{CONNECT_TIMEOUT_S:g} s ({reason:.200})") from None


def _dask(func: Callable, tasks: Sequence[tuple], scheduler: str | None,
          timeout: float, preload: str | None) -> Iterator[Any]:
    try:
        from dask.distributed import wait
    except ImportError as exc:
        raise BackendUnavailableError(
            "--backend dask needs dask.distributed, which is not installed; install the "
            "'dask' extra: pip install 'drdpo-simulator[dask]'") from exc
    if not scheduler:
        raise ValueError("--backend dask needs --scheduler ADDRESS (e.g. tcp://host:8786), "
                         f"got {scheduler!r}")
    with _connect(scheduler) as client:
        futures = [client.submit(_in_worker, func, args, None, False, preload,
                                 pure=False) for args in tasks]
        pending, alone_since = set(futures), None
        try:
            while pending:
                try:
                    done, pending = wait(pending, timeout=POLL_S, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    done = set()
                got = False
                for fut in done:
                    try:
                        # a result held by a worker that has just left cannot be fetched
                        # (the scheduler recomputes it once a worker joins): that cell is
                        # pending again, not a wait without end
                        result = fut.result(timeout=POLL_S)
                    except TimeoutError:
                        pending.add(fut)
                        continue
                    got = True
                    yield result
                if got or client.scheduler_info().get("workers"):
                    alone_since = None
                    continue
                now = time.monotonic()
                if alone_since is None:
                    alone_since = now
                    print(f"warning: no Dask worker is connected to {scheduler}; waiting up "
                          f"to {timeout:g} s (--dask-timeout) for one", file=sys.stderr)
                elif now - alone_since > timeout:
                    raise NoWorkerError(
                        f"no Dask worker connected to {scheduler} for {timeout:g} s "
                        f"(--dask-timeout); {len(pending)} of {len(tasks)} cells not done. "
                        "Finished cells are saved: rerun the same command to resume")
        finally:
            client.cancel(futures)


def check_options(backend: str, jobs: int, dask_timeout: float) -> None:
    """Raise ``ValueError`` naming the option when a backend setting is invalid."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "local" and (jobs == 0 or jobs < -1):
        raise ValueError(f"--jobs must be a positive integer or -1, got {jobs!r}")
    if backend == "dask" and not (dask_timeout > 0 and math.isfinite(dask_timeout)):
        raise ValueError(f"--dask-timeout must be a finite number of seconds > 0, "
                         f"got {dask_timeout!r}")


def map_unordered(func: Callable, tasks: Sequence[tuple], *, backend: str = "local",
                  jobs: int = 1, scheduler: str | None = None,
                  dask_timeout: float = DASK_TIMEOUT_S, preload: str | None = None
                  ) -> Iterator[Any]:
    """Yield ``func(*args)`` for every ``args`` in ``tasks``, in order of completion.

    Parameters
    ----------
    func
        A module-level (picklable) function; it runs with one BLAS/OpenMP thread.
    tasks
        Argument tuples.
    backend
        ``"local"`` or ``"dask"``.
    jobs
        Local worker processes (``1``: in this process; ``-1``: all cores).
    scheduler
        Dask scheduler address (``backend="dask"`` only).
    dask_timeout
        Seconds to wait while no Dask worker is connected before :class:`NoWorkerError`.
    preload
        A module imported in the worker before the thread limit applies (the module
        that ``func`` runs), so that the BLAS libraries it loads are limited too.
    """
    check_options(backend, jobs, dask_timeout)
    if backend == "local":
        return _local(func, tasks, jobs, preload)
    return _dask(func, tasks, scheduler, dask_timeout, preload)
