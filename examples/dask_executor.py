"""Dask tasks in zygote sandboxes: a SandboxExecutor as a Dask worker's executor.

A Dask worker runs each task through one of its executors (``distributed.Worker(executor=...)``:
one Executor as the default, or a dict of named ones that tasks pick with
``dask.annotate(executor=NAME)``). Giving it a ``zygote_client.SandboxExecutor`` runs every such
task in a fresh confined child cloned from a warm zygote: untrusted task code cannot touch the
worker, the host's files or network, or the previous task's memory.

Here the worker lives in this process (``LocalCluster(processes=False)``), because the executor
holds a connection to the daemon. Only tasks annotated ``executor="sandbox"`` are confined; Dask's
own bookkeeping tasks keep using the worker's thread pool.

The worker receives each task's whole result record (a dict holding the value, its type, timings),
which JSON cannot carry, so the executor uses ``trusted_results=True``: the children's pickles are
loaded here. Use that only for task code you trust as much as the worker itself; for untrusted code
return JSON-compatible values through ``SandboxExecutor.submit`` directly.

Run: ``.venv/bin/python examples/dask_executor.py`` (needs ``dask[distributed]``, the test extra).
"""

from __future__ import annotations

import os

import dask
from distributed import Client as DaskClient, LocalCluster

from zygote_client import Client, SandboxConfig, SandboxExecutor


def main() -> None:
    # The zygote preloads distributed so that children do not import it per task.
    with Client.embedded(preload_imports=["distributed"]) as zc, \
            SandboxExecutor(zc, sandbox_config=SandboxConfig(memory="512M", timeout=60),
                            trusted_results=True, max_workers=4) as sandbox, \
            LocalCluster(n_workers=1, threads_per_worker=4, processes=False,
                         executor={"sandbox": sandbox}, dashboard_address=None) as cluster, \
            DaskClient(cluster) as dask_client:

        def where_am_i(x: int) -> tuple[int, int, bool]:
            import os
            return x * x, os.getpid(), os.path.exists("/etc/shadow")

        with dask.annotate(executor="sandbox"):
            confined = dask_client.gather(dask_client.map(where_am_i, range(8)))
        plain = dask_client.gather(dask_client.map(where_am_i, range(8, 10)))

        print(f"this process: pid {os.getpid()}")
        for label, rows in (("sandboxed", confined), ("thread pool", plain)):
            for value, pid, shadow in rows:
                print(f"  {label:11}  value={value:3}  pid={pid:<7} /etc/shadow visible: {shadow}")


if __name__ == "__main__":
    main()
