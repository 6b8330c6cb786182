"""SandboxExecutor: a concurrent.futures.Executor over confined children, alone and under Dask."""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time

import pytest

from zygote_client import ChildFailed, RemoteError, SandboxConfig, SandboxExecutor


def test_map_fifty_inputs_in_order(client):
    with SandboxExecutor(client) as ex:
        assert ex.max_workers == 2 * os.cpu_count()
        assert list(ex.map(lambda x: {"x": x, "sq": x * x}, range(50))) == [{"x": x, "sq": x * x} for x in range(50)]


def test_each_task_is_a_fresh_confined_child(client):
    def probe(_):
        import os
        first = not os.path.exists("/tmp/zg-was-here")  # each child has its own /tmp
        open("/tmp/zg-was-here", "w").close()
        return [os.getpid(), first, os.path.exists("/etc/shadow")]

    with SandboxExecutor(client, max_workers=2) as ex:
        rows = list(ex.map(probe, range(6)))
    assert all(r == [1, True, False] for r in rows), rows  # PID 1 of its own namespace, no state kept


def test_task_exception_is_remote_error_with_traceback(client):
    def parse_record(text):
        return int(text)

    with SandboxExecutor(client) as ex:
        fut = ex.submit(parse_record, "not a number")
        with pytest.raises(RemoteError) as ei:
            fut.result(timeout=60)
    assert ei.value.type_name == "ValueError"
    assert "parse_record" in ei.value.traceback_text
    assert "invalid literal for int()" in ei.value.message


def test_task_killed_for_memory_is_a_clear_error(client):
    def hog():
        b = bytearray(500 << 20)
        for i in range(0, len(b), 4096):
            b[i] = 1
        return "survived"

    with SandboxExecutor(client, sandbox_config=SandboxConfig(memory="64M", timeout=60)) as ex:
        fut = ex.submit(hog)
        with pytest.raises(ChildFailed) as ei:
            fut.result(timeout=90)
        assert ex.submit(lambda: "next").result(timeout=60) == "next"  # the executor goes on
    err = ei.value
    assert err.reason == "memory" and err.status.memory_exceeded, err.status
    assert "memory limit" in str(err)


def test_shutdown_cancel_futures_cancels_pending(client):
    ex = SandboxExecutor(client, max_workers=1)
    started = ex.submit(lambda: __import__("time").sleep(1.5) or "first")
    time.sleep(0.3)  # let the first one start
    pending = [ex.submit(lambda i=i: i) for i in range(5)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert started.result() == "first"
    assert all(f.cancelled() for f in pending)
    with pytest.raises(RuntimeError):
        ex.submit(lambda: 1)


def test_submit_does_not_block_and_concurrency_is_bounded(client):
    def slow(_):
        import time
        t = time.time()
        time.sleep(0.5)
        return [t, time.time()]

    with SandboxExecutor(client, max_workers=2) as ex:
        t0 = time.monotonic()
        futs = [ex.submit(slow, i) for i in range(6)]
        assert time.monotonic() - t0 < 0.2  # submit queues; nothing waits for a child
        spans = [f.result(timeout=60) for f in futs]
    # at no instant were more than 2 tasks running
    for t, _ in spans:
        assert sum(1 for a, b in spans if a <= t < b) <= 2


def test_submit_from_many_threads(client):
    with SandboxExecutor(client, max_workers=4) as ex:
        results: dict[int, concurrent.futures.Future] = {}
        lock = threading.Lock()

        def producer(base):
            for i in range(base, base + 5):
                f = ex.submit(lambda x: x + 1000, i)
                with lock:
                    results[i] = f

        threads = [threading.Thread(target=producer, args=(b,)) for b in range(0, 20, 5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert {i: f.result(timeout=60) for i, f in results.items()} == {i: i + 1000 for i in range(20)}


def test_trusted_results_executor_returns_objects(client):
    class Box:
        def __init__(self, v):
            self.v = v

    with SandboxExecutor(client, trusted_results=True) as ex:
        assert [b.v for b in ex.map(lambda x: Box(x), range(3))] == [0, 1, 2]


def test_executor_needs_a_blocking_client():
    with pytest.raises(TypeError):
        SandboxExecutor(object())  # type: ignore[arg-type]


def test_dask_worker_runs_tasks_in_the_sandbox():
    """A Dask worker with a SandboxExecutor among its executors (``Worker(executor=...)``, here
    through LocalCluster's worker arguments): annotated tasks run confined, others do not."""
    import dask
    from distributed import Client as DaskClient, LocalCluster

    from zygote_client import Client

    with Client.embedded(preload_imports=["distributed"]) as zc, \
            SandboxExecutor(zc, trusted_results=True, max_workers=2) as sandbox, \
            LocalCluster(n_workers=1, threads_per_worker=2, processes=False, executor={"sandbox": sandbox},
                         dashboard_address=None) as cluster, \
            DaskClient(cluster) as dc:

        def where(x):
            import os
            return [x * 10, os.getpid()]

        def fails(_):
            raise KeyError("inside the sandbox")

        with dask.annotate(executor="sandbox"):
            confined = dc.gather(dc.map(where, range(10)))
            bad = dc.submit(fails, 1)
        plain = dc.gather(dc.map(where, range(100, 102)))
        assert confined == [[x * 10, 1] for x in range(10)]  # PID 1: each in its own pid namespace
        assert plain == [[x * 10, os.getpid()] for x in range(100, 102)]
        with pytest.raises(KeyError, match="inside the sandbox"):
            bad.result(timeout=60)
