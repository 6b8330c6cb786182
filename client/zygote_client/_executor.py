"""SandboxExecutor: a concurrent.futures.Executor that runs every task in a fresh confined child.

Drop-in where code takes an Executor (``loop.run_in_executor``, Dask workers, ``executor.map``).
Each task is one spawn through a blocking ``Client``; a small thread pool bounds how many children
run at once and gives ``submit`` its non-blocking, thread-safe queue and ``shutdown`` its
``cancel_futures``. The children never share state: a task cannot see the previous task's memory.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import Any, Callable, Iterator

from ._blocking import Client
from ._config import SandboxConfig


class SandboxExecutor(concurrent.futures.Executor):
    """Run each submitted call in its own confined child of ``client``'s daemon.

    A task's future resolves to the return value (JSON-compatible values, or anything picklable
    with ``trusted_results=True``), or raises what ``ChildProcess.result`` raises: ``RemoteError``
    with the remote traceback text when the task raised, ``ChildFailed`` when a limit killed the
    child (``err.reason == "memory"`` and ``err.status.memory_exceeded`` for a cgroup OOM kill).
    The children's stdout/stderr are copied to this process's.

    Args:
        client: a connected blocking ``Client``; the executor borrows it (shutdown leaves it open).
        pool: the daemon pool to spawn from (default: the daemon's default pool).
        sandbox_config: the confinement of every task (the pool's policy still caps it).
        max_workers: children running at once; default ``2 * os.cpu_count()``.
        trusted_results: receive return values as cloudpickles (needed for objects JSON cannot
            carry, as Dask's task results). Loading a pickle runs code: only for trusted tasks.
    """

    def __init__(self, client: Client, *, pool: str | None = None, sandbox_config: SandboxConfig | None = None,
                 max_workers: int | None = None, trusted_results: bool = False) -> None:
        if not isinstance(client, Client):
            raise TypeError(f"SandboxExecutor needs a zygote_client.Client, not {type(client).__name__}")
        if max_workers is None:
            max_workers = 2 * (os.cpu_count() or 1)
        if max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        self._client = client
        self._options = dict(pool=pool, sandbox_config=sandbox_config, trusted_results=trusted_results)
        self._max_workers = max_workers
        # Each worker thread only waits on the client's portal (no Python work of the task runs
        # here), so threads are cheap stand-ins for "one slot per running child".
        self._threads = concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix="zygote-executor")

    @property
    def max_workers(self) -> int:
        return self._max_workers

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Schedule ``fn(*args, **kwargs)`` in a new child; returns at once with its Future.

        Raises:
            RuntimeError: after shutdown.
        """
        return self._threads.submit(self._run, fn, args, kwargs)

    def _run(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        return self._client._call(functools.partial(self._client._aclient._call, fn, args, kwargs, **self._options))

    def map(self, fn: Callable[..., Any], *iterables: Any, timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        """Like ``Executor.map``: one child per item, results in input order (``chunksize`` is
        accepted for compatibility and ignored)."""
        return super().map(fn, *iterables, timeout=timeout)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; with ``cancel_futures`` cancel those not yet started. Running
        children finish (``wait`` waits for them). The client stays open."""
        self._threads.shutdown(wait=wait, cancel_futures=cancel_futures)
