"""Where the cells of an experiment run: this machine (joblib) or a Dask cluster.

A backend maps a module-level function over a list of argument tuples and yields
the results *as they finish* (in any order), so that the runner can write each
finished cell at once. Results carry their own cell id, so order does not matter.

* ``local`` -- ``jobs == 1`` runs in this process (simplest to debug; Ctrl-C stops
  at once); ``jobs > 1`` (or ``-1`` for all cores) uses joblib's ``loky`` process pool.
* ``dask`` -- ``dask.distributed`` on the scheduler at ``--scheduler ADDRESS`` (for
  sweeps that outgrow one machine). ``dask.distributed`` is imported only then; it
  ships with the ``dask`` extra (``pip install drdpo-simulator[dask]``). Workers must
  be able to import this project.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["BACKENDS", "BackendUnavailableError", "map_unordered"]

BACKENDS = ("local", "dask")


class BackendUnavailableError(RuntimeError):
    """The chosen backend cannot run here (e.g. the ``dask`` extra is missing)."""


def _local(func: Callable, tasks: Sequence[tuple], jobs: int) -> Iterator[Any]:
    if jobs == 1 or len(tasks) <= 1:
        for args in tasks:
            yield func(*args)
        return
    from joblib import Parallel, delayed

    parallel = Parallel(n_jobs=jobs, backend="loky", return_as="generator_unordered")
    yield from parallel(delayed(func)(*args) for args in tasks)


def _dask(func: Callable, tasks: Sequence[tuple], scheduler: str | None) -> Iterator[Any]:
    try:
        from dask.distributed import Client, as_completed
    except ImportError as exc:
        raise BackendUnavailableError(
            "--backend dask needs dask.distributed, which is not installed; install the "
            "'dask' extra: pip install 'drdpo-simulator[dask]'") from exc
    if not scheduler:
        raise ValueError("--backend dask needs --scheduler ADDRESS (e.g. tcp://host:8786), "
                         f"got {scheduler!r}")
    with Client(scheduler) as client:
        futures = [client.submit(func, *args, pure=False) for args in tasks]
        try:
            for fut in as_completed(futures):
                yield fut.result()
        finally:
            client.cancel(futures)


def map_unordered(func: Callable, tasks: Sequence[tuple], *, backend: str = "local",
                  jobs: int = 1, scheduler: str | None = None) -> Iterator[Any]:
    """Yield ``func(*args)`` for every ``args`` in ``tasks``, in order of completion.

    Parameters
    ----------
    func
        A module-level (picklable) function.
    tasks
        Argument tuples.
    backend
        ``"local"`` or ``"dask"``.
    jobs
        Local worker processes (``1``: in this process; ``-1``: all cores).
    scheduler
        Dask scheduler address (``backend="dask"`` only).
    """
    if backend == "local":
        if jobs == 0 or jobs < -1:
            raise ValueError(f"jobs must be a positive integer or -1, got {jobs!r}")
        return _local(func, tasks, jobs)
    if backend == "dask":
        return _dask(func, tasks, scheduler)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
