"""The async client when things go wrong: a daemon that dies, a client closed under its callers,
a child that ends just as it is signalled, results that cannot be loaded, exports let go."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import threading
import time
import weakref

import anyio
import pytest

from zygote_client import (DEVNULL, BrokenError, Client, ClosedError, DaemonError, Export, ResultError, SandboxConfig,
                           ZygoteError, open_client, open_embedded)
from zygote_client import _protocol as P
from zygote_client._async import AsyncChild
from zygote_client._results import decode

from conftest import start_daemon, stop_daemon, wait_for, wait_socket

BACKENDS = ["asyncio", "trio"]


async def _until(cond, what: str, timeout: float = 15.0) -> None:
    with anyio.move_on_after(timeout):
        while not cond():
            await anyio.sleep(0.01)
        return
    raise AssertionError(f"timed out waiting for {what}")


def _tb_len(exc: BaseException) -> int:
    n, tb = 0, exc.__traceback__
    while tb is not None:
        n, tb = n + 1, tb.tb_next
    return n


# ---- A: call() raises the connection's error as itself --------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_call_raises_broken_error_itself_when_the_daemon_dies(backend):
    """The daemon dying under ``call`` is a BrokenError, not an ExceptionGroup around one (the
    wait ran inside the output forwarders' task group)."""
    async def main():
        caught: list[BaseException] = []
        async with await open_embedded() as c:
            async def call() -> None:
                try:
                    await c.call(time.sleep, 60)
                except Exception as e:  # noqa: BLE001 - checked below
                    caught.append(e)

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(call)
                    await _until(lambda: c._children, "the call's child")
                    os.kill(c._proc.pid, signal.SIGKILL)  # the daemon this test started
        assert len(caught) == 1 and type(caught[0]) is BrokenError, caught

    anyio.run(main, backend=backend)


def test_blocking_call_raises_closed_error_itself_when_the_client_closes():
    """``Client.call`` (and so SandboxExecutor) running while the client is closed: ClosedError."""
    c = Client.embedded()
    caught: list[BaseException] = []

    def call() -> None:
        try:
            c.call(time.sleep, 60)
        except Exception as e:  # noqa: BLE001 - checked below
            caught.append(e)

    t = threading.Thread(target=call)
    try:
        t.start()
        wait_for(lambda: c._aclient._children, what="the call's child")
    finally:
        c.close()
        t.join(30)
    assert not t.is_alive()
    assert len(caught) == 1 and type(caught[0]) is ClosedError, caught


# ---- B: each raise of the connection's error is a fresh exception ----------------------------------

def test_errors_after_the_connection_broke_are_fresh_and_pin_no_frames():
    """Once the connection is gone, each failing call raises its own copy of the reason (same
    type and message): re-raising the stored object grew its traceback by every raise and kept
    every failed caller's frame (their children, their pipes) alive with the client."""
    class Marker:
        pass

    async def main():
        async with await open_embedded() as c:
            child = await c.spawn_child(time.sleep, (60,), stdin=DEVNULL)
            # Requests waiting for their answers when the connection goes: each gets its copy.
            pending: list[BaseException] = []

            async def status() -> None:
                try:
                    await c.status()
                except BrokenError as e:
                    pending.append(e)

            os.kill(c._proc.pid, signal.SIGSTOP)  # (the daemon this test started)
            with anyio.fail_after(15):
                async with anyio.create_task_group() as tg:
                    for _ in range(5):
                        tg.start_soon(status)
                    await _until(lambda: len(c._pending) == 5, "the waiting requests")
                    os.kill(c._proc.pid, signal.SIGKILL)
                await c._reader_done.wait()
            stored = c._broken
            assert isinstance(stored, BrokenError)
            assert len(pending) == 5 and len({id(e) for e in pending} | {id(stored)}) == 6, pending
            assert all(str(e) == str(stored) for e in pending)
            del pending[:]
            stored_tb = _tb_len(stored)

            async def fail_once(op) -> weakref.ref:
                held = Marker()  # stands for what a caller's frame holds (a child, a pipe)
                try:
                    await op()
                except BrokenError as e:
                    assert e is not stored and str(e) == str(stored), (e, stored)
                    assert _tb_len(e) < 10, _tb_len(e)
                    assert e.__cause__ is None and e.__suppress_context__
                else:
                    pytest.fail("no BrokenError")
                return weakref.ref(held)

            refs = []
            for _ in range(50):
                refs.append(await fail_once(c.status))                              # a request
                refs.append(await fail_once(lambda: c.spawn_child(print)))           # another
                refs.append(await fail_once(child.wait))                             # a child's exit
                refs.append(await fail_once(child.result))
            assert _tb_len(stored) == stored_tb, "the stored error grew a traceback"
            gc.collect()
            assert not [r for r in refs if r() is not None], "a failed caller's frame is still held"
            await child.aclose()

    anyio.run(main)


def test_fresh_copy_keeps_type_message_and_attributes():
    from zygote_client._async import _fresh
    orig = DaemonError("refused", code="limit", retriable=True)
    try:
        raise orig
    except DaemonError:
        pass
    copy = _fresh(orig)
    assert type(copy) is DaemonError and copy is not orig
    assert (str(copy), copy.args, copy.code, copy.retriable) == ("refused", ("refused",), "limit", True)
    assert copy.__traceback__ is None and copy.__cause__ is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_after_the_client_closed_its_children_take_no_signal_and_their_blocks_say_nothing(backend):
    """As the blocking face (and Popen on a process that ended): closing the client ends its
    children that are not detached, their exits are never reported, and kill()/terminate() then
    raised ClosedError, as did leaving an ``async with`` block on one."""
    async def main():
        async with await open_embedded() as c:
            child = await c.spawn_child(time.sleep, (60,), stdin=DEVNULL)
        for how in ("kill", "terminate"):
            await getattr(child, how)()
        await child.send_signal(signal.SIGUSR1)
        async with child:
            pass
        with pytest.raises(ClosedError):
            await child.wait()  # (its exit is unknown: still said)
        await _until(lambda: not os.path.exists(f"/proc/{child.pid}"), "the child to end with its client")

    anyio.run(main, backend=backend)


# ---- C: signalling a child that has just ended ---------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_signal_to_a_child_whose_exit_report_is_on_its_way_is_a_no_op(backend):
    """The daemon forgets a child as it reports its exit, so a kill sent just then gets
    "unknown-child" before the client has read the Exited: as Popen.kill on an ended child, that
    is no error. (The client is made to read the Exited late, so the order is always the bad one.)"""
    async def main():
        async with await open_embedded() as c:
            held: list[tuple] = []
            deliver = c._deliver

            def late_exits(msg, fds):
                if isinstance(msg, P.Exited):
                    held.append((msg, fds))
                else:
                    deliver(msg, fds)

            c._deliver = late_exits
            for how in ("kill", "terminate", "send_signal"):
                child = await c.spawn_child(print, ("x",), stdin=DEVNULL)
                assert b"".join([chunk async for chunk in child.stdout]) == b"x\n"  # (to EOF)
                await _until(lambda: held, "the exit report")  # the daemon has forgotten the child

                async def release() -> None:
                    await anyio.sleep(0.3)
                    for item in held:
                        deliver(*item)
                    held.clear()

                with anyio.fail_after(15):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(release)
                        if how == "send_signal":
                            await child.send_signal(signal.SIGUSR1)
                        else:
                            await getattr(child, how)()
                assert child.returncode == 0
                await child.aclose()
            c._deliver = deliver

            # An id this connection never had: the daemon's refusal still comes out.
            stranger = AsyncChild(c, P.Spawned(0, "nope-1", 1, False), [])
            with pytest.raises(DaemonError) as ei:
                await stranger.kill()
            assert ei.value.code == "unknown-child"

    anyio.run(main, backend=backend)


# ---- D: exports let go ---------------------------------------------------------------------------

def test_close_export_lets_the_client_forget_the_child(tmp_path):
    """The client held every child that had an export (and its result) until it closed: a
    released export lets the child go. One never released is still closed with the client."""
    def job():
        with open("/out/a.txt", "w") as f:
            f.write("hello")
        return "x" * 1000

    cfg = SandboxConfig(export=Export())

    async def main():
        async with await open_embedded() as c:
            child = await c.spawn_child(job, sandbox_config=cfg, stdin=DEVNULL)
            await child.aclose()
            assert await child.result() == "x" * 1000
            assert await child.export(str(tmp_path / "o")) == ["a.txt"]
            child.close_export()
            assert not c._exported
            ref = weakref.ref(child)
            del child
            gc.collect()
            assert ref() is None, "the client still holds a child whose export was released"

            kept = await c.spawn_child(job, sandbox_config=cfg, stdin=DEVNULL)
            await kept.aclose()
            await kept.wait()
            assert kept._export_fd is not None and kept in c._exported
        assert kept._export_fd is None and not c._exported  # closed with the client

    anyio.run(main)


def test_run_with_export_to_keeps_nothing(client, tmp_path):
    before = len(client._aclient._exported)
    for i in range(3):
        done = client.run(lambda: open("/out/f", "w").write("y"), export_to=str(tmp_path / f"o{i}"),
                          sandbox_config=SandboxConfig(export=Export()))
        assert done.returncode == 0 and (tmp_path / f"o{i}" / "f").read_text() == "y"
    assert len(client._aclient._exported) == before


# ---- E: a trusted result this process cannot load --------------------------------------------------

@pytest.mark.parametrize("missing", ["module", "class"])
def test_a_trusted_pickle_undecodable_here_is_a_result_error(client, missing):
    """``trusted_results``: a pickle naming a module or class this process lacks is ResultError
    (reason "undecodable", the loader's error as its cause), as documented, not a raw
    ModuleNotFoundError/AttributeError."""
    def from_a_module_only_the_child_has():  # (local: cloudpickle sends it by value)
        import sys
        import types
        m = types.ModuleType("only_in_the_pool")
        sys.modules["only_in_the_pool"] = m
        exec("class Frame:\n    pass", m.__dict__)
        m.Frame.__module__ = "only_in_the_pool"
        return m.Frame()

    def of_a_class_this_side_lacks():
        import json

        class Gone:
            pass

        Gone.__module__, Gone.__qualname__ = "json", "NoSuchClassHere"
        json.NoSuchClassHere = Gone
        return Gone()

    payload, cause = {"module": (from_a_module_only_the_child_has, ModuleNotFoundError),
                      "class": (of_a_class_this_side_lacks, AttributeError)}[missing]
    child = client.spawn_child(payload, trusted_results=True, stdin=None)
    child.communicate(timeout=30)
    assert child.returncode == 0
    with pytest.raises(ResultError) as ei:
        child.result()
    assert ei.value.reason == "undecodable" and ei.value.status is child.status
    assert isinstance(ei.value.__cause__, cause), repr(ei.value.__cause__)
    assert "only_in_the_pool" not in sys.modules


def test_a_garbled_trusted_pickle_is_a_result_error():
    from zygote_client import ExitStatus
    status = ExitStatus(returncode=0)
    with pytest.raises(ResultError) as ei:
        decode("pickle", b"\x80\x05garbage", status, True)
    assert ei.value.reason == "undecodable"


# ---- F: closing under a request still being sent --------------------------------------------------

def test_close_during_a_large_send_leaves_asyncio_quiet(tmp_path):
    """Closing a client while a large request is still going out (the daemon reads nothing):
    the caller gets ClosedError and asyncio reports nothing (the socket was closed under the
    reader's and the sender's waits: "Exception in callback ... Bad file descriptor")."""
    path = str(tmp_path / "z.sock")
    proc = start_daemon("--socket", path)
    try:
        wait_socket(path, proc)

        async def main():
            loop = asyncio.get_running_loop()
            reported: list[dict] = []
            loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
            caught: list[BaseException] = []
            c = await open_client(path)

            async def big() -> None:
                try:
                    await c.spawn_child(len, (b"a" * (8 << 20),))
                except ZygoteError as e:
                    caught.append(e)

            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    async with c:
                        assert await c.call(len, "warm") == 4
                        os.kill(proc.pid, signal.SIGSTOP)  # the daemon this test started
                        tg.start_soon(big)
                        await _until(c._send_lock.locked, "the big send")
                        await anyio.sleep(0.3)  # parked on the full socket
                for _ in range(5):  # (the loop's callbacks for the closed socket)
                    await anyio.sleep(0.01)
            assert [type(e) for e in caught] == [ClosedError]
            assert not reported, [ctx.get("message") for ctx in reported]

        anyio.run(main, backend="asyncio")
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
        stop_daemon(proc)
