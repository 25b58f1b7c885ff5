"""The cluster a parallel run uses: a local one of single-threaded worker processes (--jobs N), or an existing one
(--scheduler ADDRESS, or DASK_SCHEDULER_ADDRESS as Dask's own tools read it)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from iotscan.errors import CaptureError, InputError

INSTALL = "pip install 'iotscan[cluster]'"
CONNECT_TIMEOUT_S = 30
WORKERS_TIMEOUT_S = 60  # an existing cluster without workers: how long to wait for one
# Dask's settings for this client and, through it, a local cluster's processes (an existing cluster keeps its own:
# docs/scale.md says which help).
DASK_CONFIG = {
    # Dask keeps the last 1,000 messages of each connection for its developers (and the local scheduler, which runs
    # in this process, its last 1,000 transitions): with them every task's arguments and results, so the client's
    # memory grew with the first thousands of captures (30 MiB over 2,000 small ones). A few will do.
    "distributed.admin.low-level-log-length": 16,
    # A worker's sampling profiler (every 10 ms) and system monitor (every 0.5 s) took about a tenth of its CPU
    # (py-spy, on the nDPI corpus); nobody looks at them here
    "distributed.worker.profile.enabled": False,
    "distributed.admin.system-monitor.interval": "5s",
}


def require_dask(what: str) -> None:
    """One line and exit 2 when Dask's distributed scheduler is not installed."""
    try:
        import distributed  # noqa: F401
    except ImportError as exc:
        raise InputError(f"{what} needs Dask's distributed scheduler: {INSTALL} (without it, --jobs 1 runs here)") \
            from exc


def local_workers(jobs: int) -> int:
    """Worker processes of a local cluster: ``jobs``, or one per core this process may run on (0)."""
    return jobs or len(os.sched_getaffinity(0))


@contextlib.contextmanager
def cluster_client(jobs: int | None, scheduler: str | None) -> Iterator[tuple[Any, bool]]:
    """A Dask client, and whether its workers may be on other machines: of the cluster at ``scheduler``, or of a
    local cluster of ``jobs`` worker processes of one thread each, on loopback (closed at the end)."""
    import dask

    with dask.config.set(DASK_CONFIG):
        yield from _cluster_client(jobs, scheduler)


def _cluster_client(jobs: int | None, scheduler: str | None) -> Iterator[tuple[Any, bool]]:
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout=CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError, ValueError) as exc:
            raise CaptureError(f"cannot reach the Dask scheduler at {scheduler}: {' '.join(str(exc).split())}") \
                from exc
        try:
            if not client.nthreads():
                try:
                    client.wait_for_workers(1, timeout=WORKERS_TIMEOUT_S)
                except TimeoutError as exc:
                    raise CaptureError(f"the Dask scheduler at {scheduler} has no workers (waited "
                                       f"{WORKERS_TIMEOUT_S} s): start some with `dask worker {scheduler}`") from exc
            yield client, True
        finally:
            client.close()
        return
    # Worker processes of one thread: a capture keeps its worker's main loop and its meter processes busy.
    # No memory limit: its monitor polls every worker ten times a second, and a worker's memory is bounded by
    # iotscan's own caps (--max-flows, the side passes' tables), as one process's is.
    local = LocalCluster(n_workers=local_workers(jobs or 0), threads_per_worker=1, processes=True, host="127.0.0.1",
                         dashboard_address=None, silence_logs=logging.ERROR, memory_limit=0)
    try:
        client = Client(local)
        try:
            yield client, False
        finally:
            client.close()
    finally:
        local.close()
