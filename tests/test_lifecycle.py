"""Lifecycle: async streams under trio and asyncio, cancellation kills, many concurrent clients,
disconnects, detached children and re-attach, and SIGTERM to the daemon.

Async tests run each coroutine under both backends with ``anyio.run(..., backend=backend)``.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import anyio
import pytest

from zygote_client import Client, DaemonError, SandboxConfig, open_client, open_embedded
from zygote_client import _protocol as P
from conftest import (RawConn, children_of, cmdline, config_daemon, fd_count, rss_bytes, run_as, start_daemon,
                      stop_daemon, wait_for, wait_socket, write_text)

BACKENDS = pytest.mark.parametrize("backend", ["trio", "asyncio"])


def _gone(pid: int) -> bool:
    """The process is neither running nor a zombie (its parent reaped it)."""
    return not os.path.exists(f"/proc/{pid}")


def _zygote_dirs(daemon_pid: int) -> list[str]:
    return [d for d in glob.glob(f"/sys/fs/cgroup/**/zygote/d{daemon_pid}", recursive=True) if os.path.isdir(d)]


def _child_cgroups(daemon_pid: int, child_id: str) -> list[str]:
    """Children's cgroups (not the daemon's own leaf for its zygotes)."""
    return [d for d in glob.glob(f"/sys/fs/cgroup/**/zygote/d{daemon_pid}/children/{child_id}", recursive=True)
            if os.path.isdir(d) and os.path.basename(d) != "zygotes"]


def _ticker(n: int, delay: float):
    def tick():
        import sys, time
        for i in range(n):
            print(f"tick {i:04d}", flush=True)
            print(f"err {i}", file=sys.stderr, flush=True)
            time.sleep(delay)
        return n
    return tick


def _ticks(n: int) -> bytes:
    return b"".join(b"tick %04d\n" % i for i in range(n))


# ---- async streams and cancellation ---------------------------------------------------------------


@BACKENDS
def test_async_streams_stdin_stdout_stderr(backend):
    def echo():
        import sys
        for line in sys.stdin:
            sys.stdout.write(line.upper())
            sys.stdout.flush()
            print(len(line), file=sys.stderr, flush=True)
        return "done"

    async def main():
        async with await open_embedded() as client:
            child = await client.spawn_child(echo)
            async with child:
                got = []
                for word in (b"alpha\n", b"beta\n"):
                    await child.stdin.send(word)
                    got.append(await child.stdout.receive())  # streams while the child runs
                await child.stdin.aclose()
                assert got == [b"ALPHA\n", b"BETA\n"]
                assert await child.stdout.read_all() == b""
                assert await child.stderr.read_all() == b"6\n5\n"
                status = await child.wait()
            assert status.returncode == 0 and await child.result() == "done"

    anyio.run(main, backend=backend)


@BACKENDS
def test_cancelled_wait_kills_and_reaps(backend):
    async def main():
        async with await open_embedded() as client:
            child = await client.spawn_child(lambda: __import__("time").sleep(60), stdin=None)
            with anyio.move_on_after(0.3) as scope:
                await child.wait()
            assert scope.cancelled_caught
            # deliver_cancel: by the time the cancellation went on, the child was killed and reaped
            assert child.status is not None and child.returncode == -signal.SIGKILL
            assert _gone(child.pid)

    anyio.run(main, backend=backend)


@BACKENDS
def test_cancelled_async_with_block_kills(backend):
    async def main():
        async with await open_embedded() as client:
            child = await client.spawn_child(_ticker(10_000, 0.01), stdin=None)
            seen = []
            # (2 s: under a loaded full run the first tick once took longer than 0.5 s to come)
            with anyio.move_on_after(2.0):
                async with child:
                    async for chunk in child.stdout:
                        seen.append(chunk)
            assert b"".join(seen).startswith(b"tick 0000\n")
            assert child.returncode == -signal.SIGKILL and _gone(child.pid)
            # a block left normally closes the streams and waits: the child is not killed
            child = await client.spawn_child(lambda: __import__("time").sleep(0.3), stdin=None)
            async with child:
                pass
            assert child.returncode == 0 and child.status.wall_time >= 0.3

    anyio.run(main, backend=backend)


@BACKENDS
def test_a_cancelled_spawn_leaves_no_child_and_no_fds(backend):
    """Cancelled while its request is with the daemon, a spawn's answer comes later: its child
    (nobody holds it) is killed and its pipes closed, as cancelling ``call`` promises. They
    were kept until the client closed: every child ran on, each holding three fds here."""
    async def main():
        async with await open_embedded() as client:
            await client.call(lambda: 1)
            before = fd_count(os.getpid())
            cancelled = 0
            for _ in range(10):
                with anyio.move_on_after(0.001) as scope:
                    child = await client.spawn_child(lambda: __import__("time").sleep(60), stdin=None)
                    await child.kill()
                    await child.aclose()
                cancelled += scope.cancelled_caught
            with anyio.move_on_after(0.001):
                await client.call(lambda: __import__("time").sleep(60))
            assert cancelled >= 5, cancelled  # (a spawn takes milliseconds: nearly all are cut short)
            deadline = time.monotonic() + 20
            def left():  # (answers disposed of, children killed, their exit reports dropped)
                return client._pending or client._unwanted or client._early_exits
            while (left() or (await client.status()).children) and time.monotonic() < deadline:
                await anyio.sleep(0.05)
            assert not (await client.status()).children
            assert not left()
            assert fd_count(os.getpid()) == before
            assert await client.call(lambda: 2) == 2

    anyio.run(main, backend=backend)


@BACKENDS
def test_a_spawn_cancelled_while_its_frame_is_sent_leaves_the_connection_working(backend):
    """Cut short half-way, a frame's rest was never sent: the daemon read what followed as its
    continuation and the connection hung for good. A frame now goes out whole (the cancellation
    takes effect after)."""
    async def main():
        async with await open_embedded() as client:
            assert await client.call(lambda: 1) == 1
            data = b"x" * (64 << 20)
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(client.spawn_child, lambda: len(data))
                    while not client._send_lock.locked():
                        await anyio.sleep(0)
                    await anyio.sleep(0.005)
                    scope.cancel()
            with anyio.fail_after(30):
                assert await client.call(lambda: 2) == 2
                while client._pending:  # (the spawn's answer came and was disposed of)
                    await anyio.sleep(0.05)
                while (await client.status()).children or client._unwanted:  # (killed by a request
                    await anyio.sleep(0.05)                                  # of its own, then reported)

    anyio.run(main, backend=backend)


@BACKENDS
def test_a_cancelled_attach_to_an_ended_child_leaves_nothing_behind(backend):
    """The answer to a cancelled attach is dropped, and so is the exit report that follows it
    (it was kept for ever, and closing the client then failed unpacking it)."""
    async def main():
        async with await open_embedded() as client:
            child = await client.spawn_child(lambda: 7, stdin=None, detached=True)
            await child.wait()
            await child.aclose()
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(client.attach, child.id)
                    while not client._pending:
                        await anyio.sleep(0)
                    while client._send_lock.locked():
                        await anyio.sleep(0)
                    scope.cancel()
            with anyio.fail_after(10):
                while client._pending or client._early_exits or client._unwanted:
                    await anyio.sleep(0.05)

    anyio.run(main, backend=backend)


def test_a_field_of_the_wrong_type_is_a_TypeError_and_the_connection_lives():
    """The daemon cannot read such a request (a protocol error, which ends the connection and
    every child on it): the client checks first. It sent them, and from then on every call,
    a running sibling's wait() included, raised the daemon's "undecodable frame"."""
    def wait_for_stdin():
        import sys
        return sys.stdin.read()

    with Client.embedded() as c:
        sibling = c.spawn_child(wait_for_stdin)
        for bad in ({"env": {"A": 1}}, {"env": ["A"]}, {"pool": 3}, {"process_name": 5}, {"timeout": "5"}):
            with pytest.raises(TypeError, match="wrong type"):
                c.spawn_child(print, **bad)
        from zygote_client import Workspace
        for bad in ({"max_bytes": 1e6}, {"max_files": 10.0}, {"allow": [1]}):  # (the caller's own limits)
            with pytest.raises(TypeError, match="wrong type"):
                c.run(print, sandbox_config=SandboxConfig(workspace=Workspace.from_files({"a.txt": "x"}, **bad)))
        with pytest.raises(DaemonError, match="positive number of seconds below 1e9"):  # (a float, too large)
            c.spawn_child(print, timeout=1e300)
        assert c.call(lambda: 1) == 1
        sibling.stdin.write(b"still here")
        sibling.stdin.close()
        assert sibling.result() == "still here"


def test_communicate_waits_for_the_child_as_popen_does():
    """After communicate() returns, returncode is set (Popen.communicate waits): it was None
    while the exit report was still on its way. Input to a child that already ended is no
    error (Popen ignores the broken pipe). A timeout works as Popen's."""
    with Client.embedded() as c:
        child = c.spawn_child(lambda: __import__("sys").exit(3))
        assert child.communicate() == (b"", b"")
        assert child.returncode == 3
        child = c.spawn_child(lambda: None)
        child.wait()
        child.stdin.write(b"x" * 10)  # (buffered: the flush meets the broken pipe)
        assert child.communicate() == (b"", b"") and child.returncode == 0
        # timeout: the child runs on, and nothing read so far is lost (the Popen idiom)
        child = c.spawn_child(lambda: (print("early", flush=True), __import__("time").sleep(60)))
        with pytest.raises(subprocess.TimeoutExpired):
            child.communicate(b"ignored", timeout=1.0)
        assert child.returncode is None
        child.kill()
        assert child.communicate() == (b"early\n", b"") and child.returncode == -signal.SIGKILL
        assert child.communicate() == (b"early\n", b"")  # (again: the same, as Popen)


@BACKENDS
def test_a_cancelled_block_reports_the_kill_not_the_broken_pipe(backend):
    # The child writes without pause. The block's exit must kill it before closing its stdout:
    # closed first, the child dies of EPIPE (exit 1) before the kill lands, and the status
    # would not say what ended it.
    def writer():  # ends at once on EPIPE, so a close before the kill shows every time
        import os
        try:
            while True:
                os.write(1, b"x" * 512)
        except BrokenPipeError:
            os._exit(1)

    async def main():
        async with await open_embedded() as client:
            for _ in range(5):
                child = await client.spawn_child(writer, stdin=None)
                with anyio.move_on_after(0.2):
                    async with child:
                        async for _chunk in child.stdout:
                            pass
                assert child.returncode == -signal.SIGKILL, child.status

    anyio.run(main, backend=backend)


def test_blocking_close_from_another_thread_ends_a_waiting_call():
    """A call blocked in one thread (run of a long child) returns with an error, not a hang,
    when another thread closes the client; the child is killed with the connection."""
    import threading
    from zygote_client import ZygoteError
    client = Client.embedded()
    seen: list = []
    pids: list = []

    def waiter() -> None:
        try:
            child = client.spawn_child(lambda: __import__("time").sleep(60), stdin=None)
            pids.append(child.pid)
            child.wait()
            seen.append("returned")
        except ZygoteError as e:
            seen.append(e)

    hammered: list = []

    def hammer() -> None:  # calls racing close(): each must end, with ClosedError at the latest
        try:
            while True:
                client.status()
        except ZygoteError as e:
            hammered.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    wait_for(lambda: pids, what="the child to start")
    hammers = [threading.Thread(target=hammer) for _ in range(3)]
    for h in hammers:
        h.start()
    time.sleep(0.2)
    client.close()
    t.join(timeout=15)
    assert not t.is_alive(), "the waiting call hung after close()"
    assert len(seen) == 1 and isinstance(seen[0], ZygoteError), seen
    for h in hammers:
        h.join(timeout=15)
        assert not h.is_alive(), "a call racing close() hung"
    assert len(hammered) == 3, hammered
    wait_for(lambda: _gone(pids[0]), what="the child to be killed")


_UNCLOSED_CLIENT = textwrap.dedent("""
    import sys
    from zygote_client import Client
    client = Client.embedded()
    child = client.spawn_child(lambda: __import__("time").sleep(60), stdin=None)
    print(client._aclient._proc.pid, child.pid, flush=True)
    if sys.argv[1] == "raise":
        raise RuntimeError("the script failed")
""")


@pytest.mark.parametrize("end", ["raise", "return"])
def test_a_script_that_never_closes_its_client_exits(end):
    """A script that ends (or dies of an exception) with its blocking client still open exits
    as a script would: its client is closed at exit, which ends the embedded daemon and the
    child with it. (It hung for good: at exit the client's loop thread no longer ran, and the
    portal's cleanup waited for it.)"""
    r = subprocess.run([sys.executable, "-c", _UNCLOSED_CLIENT, end], capture_output=True, text=True, timeout=60)
    assert r.returncode == (1 if end == "raise" else 0), r.stderr
    if end == "raise":
        assert "RuntimeError: the script failed" in r.stderr
    daemon, child = map(int, r.stdout.split())
    wait_for(lambda: _gone(daemon) and _gone(child), what="the daemon and its child to end")


@pytest.mark.parametrize("how", ["call", "run"])
def test_blocking_call_interrupted_kills_its_child(how):
    """Ctrl-C (KeyboardInterrupt) in the calling thread: ``call`` cancels its task on the
    client's loop, and cancellation kills the child; ``run`` kills it as subprocess.run does.
    Either way the client stays usable."""
    import threading
    with Client.embedded() as client:
        def slow():
            import time
            print("started", flush=True)
            time.sleep(60)
        # Real SIGINTs to the main thread, as Ctrl-C would send (interrupt_main only sets a flag),
        # from once the child runs until the call gave up (one could land between two waits).
        raised = threading.Event()

        def interrupt() -> None:
            for _ in range(100):
                if raised.wait(0.2):
                    return
                if client.status().running:
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

        def once(*_):  # Python's own handler, but only the first SIGINT counts
            if not raised.is_set():
                raised.set()
                raise KeyboardInterrupt

        previous = signal.signal(signal.SIGINT, once)
        sender = threading.Thread(target=interrupt)
        t0 = time.monotonic()
        sender.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                getattr(client, how)(slow)
        finally:
            raised.set()
            sender.join()
            signal.signal(signal.SIGINT, previous)
        assert time.monotonic() - t0 < 30
        wait_for(lambda: client.status().running == 0, what="the child to be killed")
        assert client.run(lambda: print("still usable")).stdout == b"still usable\n"


@BACKENDS
def test_100_concurrent_spawns_from_10_clients(socket_daemon, backend):
    def echo(token):
        print(token)
        return token

    async def one_client(k: int, results: dict) -> None:
        async with await open_client(socket_daemon) as client:
            async def one(i: int) -> None:
                token = f"client{k}-child{i}-{os.urandom(4).hex()}"
                child = await client.spawn_child(echo, (token,), stdin=None)
                async with child:
                    out = await child.stdout.read_all()
                    results[token] = (out, await child.result())
            async with anyio.create_task_group() as tg:
                for i in range(10):
                    tg.start_soon(one, i)

    async def main():
        results: dict = {}
        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for k in range(10):
                    tg.start_soon(one_client, k, results)
        assert len(results) == 100
        for token, (out, value) in results.items():
            assert out == token.encode() + b"\n" and value == token

    anyio.run(main, backend=backend)


# ---- disconnects ----------------------------------------------------------------------------------

_STREAMING_CLIENT = textwrap.dedent("""
    import sys
    from zygote_client import Client, SandboxConfig

    def stream():
        import time
        i = 0
        while True:
            print("chunk", i, flush=True)
            i += 1
            time.sleep(0.01)

    c = Client.connect(sys.argv[1])
    child = c.spawn_child(stream, stdin=None, sandbox_config=SandboxConfig(memory="128M"))
    print(child.pid, child.id, flush=True)
    while True:
        sys.stdout.buffer.write(child.stdout.readline())
        sys.stdout.flush()
""")


def test_disconnect_mid_stream_kills_reaps_and_cleans(socket_daemon):
    """A client killed while its child streams: the daemon kills the child, reaps it (no zombie),
    removes its cgroup, and its fd count returns to what it was."""
    with Client.connect(socket_daemon) as c:
        dpid = c.welcome.daemon_pid
        c.run(print, sandbox_config=SandboxConfig(memory="128M"))
    wait_for(lambda: not _child_cgroups(dpid, "*"), what="the warm-up child's cgroup to go")
    base = fd_count(dpid)
    proc = subprocess.Popen([sys.executable, "-c", _STREAMING_CLIENT, socket_daemon], stdout=subprocess.PIPE)
    try:
        pid_s, child_id = proc.stdout.readline().split()
        pid = int(pid_s)
        for _ in range(5):  # it streams
            assert proc.stdout.readline().startswith(b"chunk")
        assert _child_cgroups(dpid, child_id.decode()), "the child should have a cgroup (memory limit)"
        proc.kill()  # abrupt: no goodbye, the socket just closes
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    wait_for(lambda: _gone(pid), what="the child to be reaped")
    wait_for(lambda: not _child_cgroups(dpid, child_id.decode()), what="the child's cgroup to go")
    assert [p for p, state in children_of(dpid) if state == "Z"] == []
    wait_for(lambda: fd_count(dpid) <= base, what=f"daemon fds back to {base}")


def test_closing_a_connection_kills_only_its_children(socket_daemon):
    with Client.connect(socket_daemon) as keep:
        survivor = keep.spawn_child(lambda: __import__("time").sleep(60), stdin=None)
        with Client.connect(socket_daemon) as gone:
            doomed = gone.spawn_child(lambda: __import__("time").sleep(60), stdin=None)
        wait_for(lambda: _gone(doomed.pid), what="the closed connection's child to die")
        assert survivor.poll() is None and not _gone(survivor.pid)
        survivor.kill()
        assert survivor.wait().returncode == -signal.SIGKILL


# ---- detached children ----------------------------------------------------------------------------


def test_detached_child_survives_and_reattaches_with_complete_output(socket_daemon):
    n = 60
    with Client.connect(socket_daemon) as a:
        child = a.spawn_child(_ticker(n, 0.02), stdin=None, detached=True)
        cid, pid = child.id, child.pid
        assert child.stdout.readline() == b"tick 0000\n"  # the spawner reads it live, too
    # the spawner's connection is gone; the child is not
    time.sleep(0.2)
    assert not _gone(pid)
    with Client.connect(socket_daemon) as b:
        assert [c.id for c in b.status().children] == [cid]
        whole = b.attach(cid)
        late = b.attach(cid, offset=len(_ticks(10)))
        assert whole.stdout_offset == 0 and late.stdout_offset == len(_ticks(10))
        assert whole.stdout.read() == _ticks(n)  # complete from offset 0, though nobody read it
        assert late.stdout.read() == _ticks(n)[len(_ticks(10)):]  # a later offset: the suffix
        assert whole.stderr.read() == b"".join(b"err %d\n" % i for i in range(n))
        assert whole.wait().returncode == 0 and whole.result() == n
        assert late.result() == n
        # it was attached and seen to end: the record is gone
        with pytest.raises(DaemonError) as e:
            b.attach(cid)
        assert e.value.code == "unknown-child"


def test_detached_child_that_ended_is_kept_until_attached(socket_daemon):
    with Client.connect(socket_daemon) as a:
        child = a.spawn_child(_ticker(5, 0), stdin=None, detached=True)
        cid = child.id
        child.stdout.close()  # the spawner drops its streams at once
        child.stderr.close()
    time.sleep(0.5)  # it ends with nobody attached
    with Client.connect(socket_daemon) as b:
        again = b.attach(cid)
        assert again.stdout.read() == _ticks(5)
        assert again.wait().returncode == 0 and again.result() == 5
    with Client.connect(socket_daemon) as c, pytest.raises(DaemonError) as e:
        c.attach(cid)
    assert e.value.code == "unknown-child"


def test_detached_ring_keeps_the_newest_bytes_and_never_blocks_the_child(tmp_path):
    """A 64 KiB ring and a child writing 1 MiB that nobody reads: the child finishes (the daemon
    reads eagerly); an attach from 0 starts where the ring starts and says so."""
    sock = str(tmp_path / "z.sock")
    proc = start_daemon("--socket", sock, "--detached-buffer-bytes", "64K")
    try:
        wait_socket(sock, proc)

        def flood():
            import os
            for i in range(1024):
                os.write(1, b"%07d" % i + b"." * 1017)  # 1 KiB records, numbered
            return "flooded"

        with Client.connect(sock) as a:
            child = a.spawn_child(flood, stdin=None, detached=True)
            cid = child.id
            assert child.wait(timeout=30).returncode == 0  # though its spawner reads nothing
            again = a.attach(cid)
            data = again.stdout.read()
            # What was dropped is known: the ring's 64 KiB, and what the daemon had not yet read
            # from the pipe when the exit was reported (under load: it streams on after the ring).
            start = again.stdout_offset
            assert start % 1024 == 0 and start <= (1 << 20) - (64 << 10), start
            assert start + len(data) == 1 << 20 and data.startswith(b"%07d" % (start // 1024))
            assert again.result() == "flooded"
    finally:
        stop_daemon(proc)


def test_attach_refuses_non_detached_and_unknown(socket_daemon):
    with Client.connect(socket_daemon) as a:
        child = a.spawn_child(lambda: __import__("time").sleep(60), stdin=None)
        with Client.connect(socket_daemon) as b:
            with pytest.raises(DaemonError) as e:
                b.attach(child.id)
            assert e.value.code == "bad-request"
            with pytest.raises(DaemonError) as e:
                b.attach("no-such-child")
            assert e.value.code == "unknown-child"
        child.kill()
        child.wait()


def _as_uid(uid: int, gid: int, sock_path: str, requests: list) -> list[str]:
    """As uid/gid: connect, say hello and send each request; the reply's tag (and code, child)
    per request, Exited messages skipped."""
    def talk() -> str:
        c = RawConn(sock_path)
        c.send(P.Hello(P.VERSION))
        out = [type(c.reply()).__name__]
        for req in requests:
            c.send(req)
            m = c.reply()
            while isinstance(m, P.Exited):
                m = c.reply()
            out.append(f"{type(m).__name__}:{getattr(m, 'code', '')}:{getattr(m, 'child', '')}")
        return "\n".join(out)
    return run_as(uid, gid, talk).split("\n")


def test_SECURITY_detached_child_attachable_only_by_its_uid(shared_dir):
    """uid 4001 spawns a detached child and leaves; 4001 re-attaches from a new connection, 4002
    (allowed to use the daemon, same group) gets the answer a made-up id gets; root may attach."""
    sock = os.path.join(shared_dir, "z.sock")
    proc = start_daemon("--socket", sock, "--socket-mode", "0660", "--socket-group", "4242",
                  "--allow-uid", "4001", "--allow-uid", "4002")
    try:
        wait_socket(sock, proc)
        spawn = P.Spawn(req=1, kind="exec", argv=["/bin/sh", "-c", "echo secret-output; exec sleep 60"],
                        stdin=False, detached=True)
        out = _as_uid(4001, 4242, sock, [spawn])
        assert out[0] == "Welcome" and out[1].startswith("Spawned"), out
        cid = out[1].rsplit(":", 1)[1]
        assert _as_uid(4001, 4242, sock, [P.Attach(req=1, child=cid)]) == ["Welcome", f"Attached::{cid}"]
        assert _as_uid(4002, 4242, sock, [P.Attach(req=1, child=cid)]) == ["Welcome", "Error:unknown-child:"]
        assert _as_uid(4002, 4242, sock, [P.Attach(req=1, child="nope-1")]) == ["Welcome", "Error:unknown-child:"]
        assert _as_uid(4002, 4242, sock, [P.Signal(req=1, child=cid, signum=9)]) == ["Welcome",
                                                                                     "Error:unknown-child:"]
        with Client.connect(sock) as root:
            child = root.attach(cid)
            assert child.stdout.readline() == b"secret-output\n"
            child.kill()
            assert child.wait().returncode == -signal.SIGKILL
    finally:
        stop_daemon(proc)


# ---- SIGTERM --------------------------------------------------------------------------------------


def test_sigterm_leaves_no_child_cgroup_or_socket(tmp_path):
    sock = str(tmp_path / "z.sock")
    proc = start_daemon("--socket", sock)
    wait_socket(sock, proc)
    limits = SandboxConfig(memory="128M", pids=32)
    sleeper = lambda: __import__("time").sleep(120)  # noqa: E731
    with Client.connect(sock) as leaver:
        detached = leaver.spawn_child(sleeper, stdin=None, detached=True, sandbox_config=limits)
    c = Client.connect(sock)
    try:
        dpid = c.welcome.daemon_pid
        running = [c.spawn_child(sleeper, stdin=None, sandbox_config=limits) for _ in range(3)]
        running.append(c.spawn_child(sleeper, stdin=None))  # and one without a cgroup
        pids = [detached.pid] + [ch.pid for ch in running]
        assert all(not _gone(p) for p in pids)
        assert _zygote_dirs(dpid), "the daemon should have its cgroup directory"
        err = stop_daemon(proc)  # SIGTERM, exit 0
    finally:
        c.close()
    assert not os.path.exists(sock)
    assert [p for p in pids if not _gone(p)] == []
    assert _zygote_dirs(dpid) == []
    # the daemon reaped each one itself (one exit event per child), not init after it left
    exits = [json.loads(line) for line in err.decode().splitlines() if '"exit"' in line]
    assert sorted(e["child"] for e in exits) == sorted([detached.id] + [ch.id for ch in running])


def test_SECURITY_client_that_stops_reading_is_dropped(tmp_path):
    """A client that sends spawns whose results are large and never reads its socket must not
    grow the daemon without bound: past the per-connection queue cap it is dropped, its children
    are killed, and the daemon serves others."""
    import pickle
    import socket as _socket
    import subprocess
    import sys
    from zygote_client import _protocol as P

    sock = str(tmp_path / "z.sock")
    cfg = write_text(tmp_path / "z.toml", f'[daemon]\nsocket = "{sock}"\nmax_children = 8\n')
    proc = start_daemon("--config", cfg)
    try:
        wait_socket(sock, proc)
        s = _socket.socket(_socket.AF_UNIX)
        s.connect(sock)
        s.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVBUF, 4096)
        s.sendall(P.encode(P.Hello(P.VERSION), 0))
        payload = pickle.dumps((("x", 12_000_000), {}))  # each child returns a 12 MB string
        for i in range(1, 41):
            s.sendall(P.encode(P.Spawn(req=i, kind="target", target="builtins:str.__mul__", payload=payload,
                                       stdin=False), 0))
        # never read: 40 results of 12 MB would be 480 MB held for us. Bounded instead by
        # max_children results being read (8 x 12 MB) plus the connection's queue.
        deadline = time.monotonic() + 60
        peak = 0
        dropped = False
        while time.monotonic() < deadline:
            peak = max(peak, rss_bytes(proc.pid))
            with Client.connect(sock) as other:
                st = other.status()
            if st.running == 0 and st.counters.get("spawns_ok", 0) >= 3:
                dropped = True
                break
            time.sleep(0.2)
        assert dropped, "the silent client's children kept running"
        # the daemon gives up on us once nothing of our queue (past its cap) went for SEND_STALL
        # (a client still reading may have a burst of results waiting): seen without reading
        import select
        poll = select.poll()
        poll.register(s, select.POLLRDHUP)
        t = time.monotonic()
        assert poll.poll(20_000), "the daemon kept a client that does not read"
        assert time.monotonic() - t < 10
        # (what it holds: the results being read and the queue, up to the uid's 256 MiB; the
        # per-connection cap waits for a stall before it drops, so more than 64 MiB may be there)
        assert peak < 400 << 20, f"daemon RSS reached {peak >> 20} MiB"
        # what it had sent is readable, then EOF (not 40 x 12 MB)
        s.settimeout(30)
        got = 0
        while chunk := s.recv(1 << 20):
            got += len(chunk)
        assert got < 100 << 20, got
        with Client.connect(sock) as other:
            assert other.run(print, ("still serving",)).stdout == b"still serving\n"
        s.close()
    finally:
        stop_daemon(proc)


def _fd_targets(pid: int) -> set[tuple[int, str]]:
    """(fd, what it is) for each fd of process ``pid``."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add((int(fd), os.readlink(f"/proc/{pid}/fd/{fd}")))
        except OSError:
            pass
    return out


def test_SECURITY_clients_leaving_mid_spawn_leave_nothing(tmp_path):
    """50 clients each send a spawn and hang up ~5 ms later (while the zygote is cloning): the
    zygote is never restarted, no child is left (zombie or alive), the daemon's fds return."""
    import pickle
    import socket as _socket
    import subprocess
    import sys

    from conftest import children_of, fd_count
    from zygote_client import _protocol as P

    sock = str(tmp_path / "z.sock")
    proc = start_daemon("--socket", sock)
    try:
        wait_socket(sock, proc)
        with Client.connect(sock) as c:
            c.run(print)
        time.sleep(0.3)
        base = fd_count(proc.pid)
        base_fds = _fd_targets(proc.pid)
        payload = pickle.dumps((("x",), {}))
        for i in range(50):
            s = _socket.socket(_socket.AF_UNIX)
            s.connect(sock)
            s.sendall(P.encode(P.Hello(P.VERSION), 0))
            s.sendall(P.encode(P.Spawn(req=1, kind="target", target="builtins:print", payload=payload,
                                       stdin=False, detached=(i % 2 == 0),
                                       sandbox=None), 0))
            time.sleep(0.005 if i % 3 else 0.0)
            s.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            kids = [(p, st) for p, st in children_of(proc.pid)
                    if b"zygote._zygote" not in cmdline(p) or st == "Z"]
            held = fd_count(proc.pid)
            if not kids and held <= base:
                break
            time.sleep(0.1)
        # (counted before the connection below: the daemon closes its end of that one a moment
        # after the client, which made a final count here flaky by one)
        extra = _fd_targets(proc.pid) - base_fds if held > base else set()
        with Client.connect(sock) as c:
            st = c.status()
            assert c.run(print, ("ok",)).stdout == b"ok\n"
        assert st.pools[0].restarts == 0, "a cancelled spawn desynchronised the zygote"
        assert kids == [], kids
        assert held <= base, f"fds the daemon holds now and did not: {extra}"
    finally:
        stop_daemon(proc)


def test_SECURITY_replies_waiting_for_one_user_are_capped_over_its_connections(tmp_path):
    """Replies waiting for a client that does not read are capped per connection (64 MiB) and
    per uid over all its connections (256 MiB): six connections of 48 MB each stay under the
    first, and went past the second unchecked (the daemon held it all)."""
    import pickle
    import socket as _socket
    from zygote_client import _protocol as P

    sock = str(tmp_path / "z.sock")
    proc = start_daemon("--config", write_text(tmp_path / "z.toml", f'[daemon]\nsocket = "{sock}"\n'))
    conns = []
    try:
        wait_socket(sock, proc)
        payload = pickle.dumps((("x", 12_000_000), {}))  # each child returns a 12 MB string
        for _ in range(6):
            c = RawConn(sock)
            c.sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVBUF, 4096)
            c.send(P.Hello(P.VERSION))
            c.reply()
            for i in range(4):
                c.send(P.Spawn(req=i + 1, kind="target", target="builtins:str.__mul__", payload=payload,
                               stdin=False))
            conns.append(c)
        with Client.connect(sock) as other:
            wait_for(lambda: other.status().counters.get("spawns_ok", 0) >= 24 and not other.status().running,
                      timeout=60, what="the 24 children to end")
        time.sleep(1)
        exits, ends = [], []
        for c in conns:
            n = 0
            c.sock.settimeout(10)
            try:
                while n < 4 and (m := c.reply()) is not None:  # (one that was not dropped has four)
                    n += isinstance(m, P.Exited)
                ends.append("all" if n == 4 else "dropped")
            except TimeoutError:
                ends.append("stuck")
            except OSError:  # reset: dropped
                ends.append("dropped")
            exits.append(n)
        assert "dropped" in ends, f"no connection was dropped: {exits} reports of 12 MB waited for one user"
        assert "stuck" not in ends, (ends, exits)
        assert sum(exits) * 12 < 300, exits  # what was delivered fits the cap (plus frames in flight)
        with Client.connect(sock) as other:
            assert other.call(lambda: 1) == 1
    finally:
        for c in conns:
            c.sock.close()
        stop_daemon(proc)


def test_SECURITY_over_a_users_reply_budget_its_slowest_connection_goes(tmp_path):
    """Past a uid's reply budget (256 MiB over its connections) the connection holding the most
    is dropped, not whichever has the next message: with 22 results of 12 MB waiting on five
    connections that never read, a healthy connection of the same user still gets its own."""
    import pickle
    import socket as _socket
    from zygote_client import _protocol as P

    sock = str(tmp_path / "z.sock")
    proc = start_daemon("--config", write_text(tmp_path / "z.toml", f'[daemon]\nsocket = "{sock}"\n'))
    conns = []
    try:
        wait_socket(sock, proc)
        payload = pickle.dumps((("x", 12_000_000), {}))
        with Client.connect(sock) as healthy:
            for n in (4, 4, 4, 5, 5):  # 264 MB in all, each under the 64 MiB of one connection
                c = RawConn(sock)
                c.sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVBUF, 4096)
                c.send(P.Hello(P.VERSION))
                c.reply()
                for i in range(n):
                    c.send(P.Spawn(req=i + 1, kind="target", target="builtins:str.__mul__", payload=payload,
                                   stdin=False))
                conns.append(c)
            wait_for(lambda: healthy.status().counters.get("spawns_ok", 0) >= 22 and not healthy.status().running,
                      timeout=60, what="the 22 children to end")
            assert len(healthy.call(str.__mul__, "y", 12_000_000)) == 12_000_000
    finally:
        for c in conns:
            c.sock.close()
        stop_daemon(proc)


def _attach_ok(c, child_id: str) -> bool:
    try:
        c.attach(child_id)
        return True
    except DaemonError as e:
        assert e.code == "limit"
        return False


def test_SECURITY_kept_detached_records_bounded_by_bytes_and_attaches_capped(tmp_path):
    """Ended detached children keep their results for a later attach, but only up to the
    daemon's byte budget (oldest dropped); and one user cannot attach without end, whatever
    number of connections it spreads the attaches over (each live one holds two pipes)."""
    sock = str(tmp_path / "z.sock")
    cfg = write_text(tmp_path / "z.toml", f"""
        [daemon]
        socket = "{sock}"
        detached_keep_bytes = "3M"
        max_attaches = 3
        """)
    proc = start_daemon("--config", cfg)
    try:
        wait_socket(sock, proc)

        def big(i):
            return str(i) * (2 << 20)  # a 2 MB result each

        ids = []
        with Client.connect(sock) as a:
            for i in range(3):  # one after another: "oldest" is the order they are kept in
                ch = a.spawn_child(big, (i,), stdin=None, detached=True)
                ids.append(ch.id)
                ch.wait(timeout=30)  # (the spawner hearing of it does not count as an attach)
        with Client.connect(sock) as b:
            # all three end with nobody attached (the daemon stops listing them as running)
            wait_for(lambda: not {c.id for c in b.status().children} & set(ids), what="the three to end")
            for cid in ids[:2]:  # 3 x 2 MB > 3M: only the newest is still kept
                with pytest.raises(DaemonError) as e:
                    b.attach(cid)
                assert e.value.code == "unknown-child"
            assert b.attach(ids[2]).result() == "2" * (2 << 20)

            def sleeper():
                import time
                time.sleep(30)
            live = b.spawn_child(sleeper, stdin=None, detached=True)  # b's feeds: one attached reader
            with Client.connect(sock) as d:
                with Client.connect(sock) as c:
                    c.attach(live.id)
                    d.attach(live.id)
                    for conn in (c, d):
                        with pytest.raises(DaemonError) as e:
                            conn.attach(live.id)
                        assert e.value.code == "limit" and "max_attaches" in str(e.value)
                    assert c.run(print, ("ok",)).stdout == b"ok\n"  # the connection still works otherwise
                wait_for(lambda: _attach_ok(d, live.id), what="c's attach to end with its connection")
    finally:
        stop_daemon(proc)


def test_an_ended_detached_child_is_attachable_while_its_spawner_is_not_reading(socket_daemon):
    """The daemon keeps an ended detached child before it tells the spawner of the exit. A
    spawner that stopped reading (its replies fill the socket) holds that report up to
    SEND_TIMEOUT; meanwhile another connection's attach must find the child. (Kept only after
    the report, it was in neither the running nor the kept children then: the suite once hit
    that window with an attach sent right after the spawner's wait returned.)"""
    import socket as socket_mod

    from conftest import RawConn
    a = RawConn(socket_daemon)
    a.send(a.P.Hello(a.P.VERSION))
    assert isinstance(a.reply(), a.P.Welcome)
    a.send(a.P.Spawn(req=1, kind="exec", argv=["/bin/sh", "-c", "echo out; sleep 0.5"], detached=True))
    spawned = a.reply()
    assert isinstance(spawned, a.P.Spawned), spawned
    a.sock.setblocking(False)  # requests until the daemon stops reading: its replies fill our socket
    status = a.P.encode(a.P.Status(2))
    sent = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            sent += a.sock.send(status)
        except (BlockingIOError, socket_mod.timeout):
            time.sleep(0.2)
            try:
                sent += a.sock.send(status)
            except (BlockingIOError, socket_mod.timeout):
                break
    time.sleep(1.5)  # the child has ended; its Exited waits behind the replies nobody reads
    with Client.connect(socket_daemon) as b:
        again = b.attach(spawned.child)
        assert again.stdout.read() == b"out\n"
        assert again.wait(timeout=30).returncode == 0
    a.sock.close()


def test_a_client_that_leaves_while_its_report_is_being_sent_does_not_crash_the_daemon(socket_daemon):
    """A child's large Exited (its result) blocks on a client that stopped reading; the client
    then shuts its side: the daemon's blocked send must end quietly (trio raises
    ClosedResourceError, not OSError, when another task closes the socket)."""
    import cloudpickle

    from conftest import RawConn
    a = RawConn(socket_daemon)
    a.send(a.P.Hello(a.P.VERSION))
    assert isinstance(a.reply(), a.P.Welcome)

    def big():
        return "x" * (8 << 20)
    a.send(a.P.Spawn(req=1, kind="callable", payload=cloudpickle.dumps((big, (), {})), stdin=False))
    assert isinstance(a.reply(), a.P.Spawned)
    time.sleep(2.0)  # it returned; its 8 MiB Exited fills our socket, which we do not read
    # Half-close: the daemon reads EOF and closes the socket itself while its send still waits
    # (a full close would wake the send with EPIPE first).
    a.sock.shutdown(__import__("socket").SHUT_WR)
    time.sleep(0.5)
    with Client.connect(socket_daemon) as b:  # the daemon is still serving
        assert b.run(print, ("alive",)).stdout == b"alive\n"
    a.sock.close()


def test_a_daemon_out_of_file_descriptors_refuses_and_recovers_without_crashing(tmp_path):
    """A local client opens connections until the daemon has no fd left. The daemon must not die
    (an accept that fails with EMFILE took it down, with every child); a request that needs fds
    meanwhile gets an error; once the connections go, it serves again: same pid, same children."""
    import resource

    path = str(tmp_path / "z.sock")
    limit = 64  # the daemon with a json zygote holds ~15; its zygote and children get the same limit
    log = __import__("tempfile").TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "zygote", "serve", "--socket", path, "--preload", "json"],
                            stderr=log, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)))
    proc.log = log
    flood: list[socket.socket] = []
    try:
        wait_socket(path, proc)
        with Client.connect(path) as a:
            held = a.spawn_child(_sleeper_payload(), detached=True, stdin=None)
            assert held.stdout.read(1) == b"r"
            base = fd_count(proc.pid)
            # The daemon accepts (one fd each) until EMFILE; the rest wait in the listen backlog.
            for _ in range(limit + 16):
                s = socket.socket(socket.AF_UNIX)
                s.setblocking(False)
                try:
                    s.connect(path)
                except BlockingIOError:  # the backlog is full too
                    s.close()
                    break
                flood.append(s)
            deadline = time.monotonic() + 20
            while fd_count(proc.pid) < limit and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # accept() has failed with EMFILE by now, several times
            assert proc.poll() is None, _log_tail(proc)
            assert fd_count(proc.pid) >= limit - 1, "the flood did not use up the daemon's fds"
            # An attach needs two pipes the daemon cannot make now: refused, and nothing leaked.
            with pytest.raises(DaemonError) as e:
                a.attach(held.id)
            assert e.value.code == "limit" and "Too many open files" in str(e.value)
            with pytest.raises(DaemonError) as e:  # so does a spawn, wherever its fds ran out
                a.run(print, ("no fds",))
            assert e.value.code == "limit" and "Too many open files" in str(e.value), e.value
            for s in flood:
                s.close()
            flood.clear()
            deadline = time.monotonic() + 20
            # (back to what it held before: a spawn needs a dozen fds, a spawn at 40 of 64 failed)
            while fd_count(proc.pid) > base + 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert proc.poll() is None, _log_tail(proc)
            with Client.connect(path) as b:  # a new connection is accepted and served
                assert b.run(print, ("alive",)).stdout == b"alive\n"
                again = b.attach(held.id)
                again.kill()
                assert again.wait(timeout=30).returncode == -signal.SIGKILL
            held.stdout.close()
            held.stderr.close()
    finally:
        for s in flood:
            s.close()
        err = stop_daemon(proc)
    assert b"cannot accept connections: Too many open files" in err


def _sleeper_payload():
    def sleeper():
        import time as _t
        print("r", end="", flush=True)
        _t.sleep(120)
    return sleeper


def _log_tail(proc) -> str:
    proc.log.seek(0)
    return proc.log.read().decode(errors="replace")[-3000:]


def test_the_daemon_raises_its_own_open_files_limit_and_children_keep_theirs(tmp_path):
    """Started under a soft limit of 256 (hard 4096), the daemon runs at 4096 (about seven fds
    per child: 256 would end it near 35 children); a child still gets 256."""
    import resource

    path = str(tmp_path / "z.sock")
    log = __import__("tempfile").TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "zygote", "serve", "--socket", path, "--preload", "json"],
                            stderr=log, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096)))
    proc.log = log
    try:
        wait_socket(path, proc)

        def limit():
            import resource as r
            return list(r.getrlimit(r.RLIMIT_NOFILE))
        with Client.connect(path) as c:  # (served: past the raise; the socket listens before it)
            assert c.call(limit) == [256, 4096]
        with open(f"/proc/{proc.pid}/limits") as f:
            line = next(ln for ln in f if ln.startswith("Max open files"))
        assert line.split()[3:5] == ["4096", "4096"], line
    finally:
        stop_daemon(proc)


def test_a_zygote_started_while_the_daemon_holds_over_1024_fds_works(tmp_path):
    """With its raised limit the daemon may hold more than 1024 fds; a zygote started then (a
    reload adding a pool) gets its socket at a number select() cannot take. It must serve."""
    import resource

    path = str(tmp_path / "z.sock")
    cfg = tmp_path / "z.toml"
    cfg.write_text(f'[daemon]\nsocket = "{path}"\n[pools.default]\npreload = ["json"]\n')
    log = __import__("tempfile").TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "zygote", "serve", "--config", str(cfg)], stderr=log,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 4096)))
    proc.log = log
    held: list[socket.socket] = []
    try:
        wait_socket(path, proc)
        for _ in range(1100):
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            held.append(s)
        deadline = time.monotonic() + 30
        while fd_count(proc.pid) < 1100 and time.monotonic() < deadline:
            time.sleep(0.05)
        cfg.write_text(f'[daemon]\nsocket = "{path}"\n[pools.default]\npreload = ["json"]\n'
                       '[pools.extra]\npreload = ["colorsys"]\n')
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 60
        while b"reloaded" not in _log_tail(proc).encode() and time.monotonic() < deadline:
            time.sleep(0.1)
        with Client.connect(path) as c:
            k = c.spawn_child(print, ("ok",), stdin=None, pool="extra")
            assert k.stdout.read() == b"ok\n"
            assert k.wait(timeout=30).returncode == 0
            k.stderr.close()
            time.sleep(0.5)  # a zygote that dies after its first clone would show as a restart
            assert {p.name: p.restarts for p in c.status().pools} == {"default": 0, "extra": 0}
    finally:
        for s in held:
            s.close()
        stop_daemon(proc)


def test_SECURITY_kept_records_are_bounded_per_user(shared_dir):
    """detached_keep_max (and _bytes) hold per peer uid: another user leaving many ended
    detached children behind drops its own oldest records, never this user's."""
    with config_daemon(shared_dir, """
            socket_mode = "0660"
            socket_group = 4242
            allowed_uids = [4001]
            detached_keep_max = 2
            """) as sock:
        with Client.connect(sock) as c:
            mine = c.spawn_child(print, ("kept",), stdin=None, detached=True)
            mine.wait(timeout=30)

        def flood() -> str:
            conn = RawConn(sock)
            conn.send(conn.P.Hello(conn.P.VERSION))
            conn.reply()
            for i in range(3):
                conn.send(conn.P.Spawn(req=i + 1, kind="exec", argv=["/bin/true"], detached=True))
                while not isinstance(conn.reply(), conn.P.Exited):
                    pass
            return "ok"
        assert run_as(4001, 4242, flood) == "ok"
        with Client.connect(sock) as c:
            again = c.attach(mine.id)
            assert again.stdout.read() == b"kept\n"


def test_an_attach_overlapping_the_exit_hears_the_exit(socket_daemon):
    """An attach whose Attached reply waits to be sent (here behind a 3 MB report the client is
    not reading yet) while the detached child ends still gets that child's Exited, and the next
    attach finds nothing left over. (Before: the exit went to the spawner alone, a record was
    kept, and the attacher waited for ever holding the dead child in its connection's table.)"""
    import socket as _socket

    import cloudpickle
    from conftest import RawConn
    from zygote_client import _protocol as P

    def sleeper():
        import time
        time.sleep(120)

    def big():
        import time
        time.sleep(1)
        return "x" * 3_000_000

    raw = RawConn(socket_daemon)
    raw.send(P.Hello(P.VERSION))
    raw.reply()
    with Client.connect(socket_daemon) as c:
        child = c.spawn_child(sleeper, stdin=None, detached=True)
        raw.send(P.Spawn(req=1, kind="callable", payload=cloudpickle.dumps((big, (), {})), stdin=False))
        assert isinstance(raw.reply(), P.Spawned)
        time.sleep(2.5)  # that child ended: its 3 MB report fills the socket we do not read
        raw.send(P.Attach(2, child.id, 0))
        time.sleep(0.5)  # the attach looked the child up and waits to send Attached
        child.kill()
        assert child.wait().returncode == -9
        got = []
        raw.sock.settimeout(5)
        try:
            while (m := raw.reply()) is not None and len(got) < 4:
                got.append((type(m).__name__, getattr(m, "child", None)))
                if got[-1] == ("Exited", child.id):
                    break
        except _socket.timeout:
            pass
        assert ("Attached", child.id) in got and ("Exited", child.id) in got, got
        other = RawConn(socket_daemon)
        other.send(P.Hello(P.VERSION))
        other.reply()
        other.send(P.Attach(3, child.id, 0))
        assert isinstance(other.reply(), P.Error)  # no second record of the same exit
        other.sock.close()
    raw.sock.close()


def test_a_zygote_that_stops_answering_is_replaced(tmp_path, monkeypatch):
    """A zygote that takes a clone request and never answers (here: stopped) fails that spawn
    with a retriable error after CLONE_REPLY_TIMEOUT (30 s; 1 s under test hooks); it is killed
    and a new one serves the next spawn."""
    import signal as _signal

    monkeypatch.setenv("ZYGOTE_TEST_CLONE_REPLY_TIMEOUT", "1")
    path = str(tmp_path / "z.sock")
    proc = start_daemon("--socket", path, "--preload", "json", "--test-hooks")
    try:
        wait_socket(path, proc)
        with Client.connect(path) as c:
            assert c.call(lambda: 1) == 1
            zygotes = [pid for pid, _ in children_of(proc.pid)
                       if b"zygote._zygote" in open(f"/proc/{pid}/cmdline", "rb").read()]
            assert len(zygotes) == 1, zygotes
            os.kill(zygotes[0], _signal.SIGSTOP)
            t = time.monotonic()
            with pytest.raises(DaemonError) as e:
                c.call(lambda: 2)
            assert e.value.retriable and "stopped answering" in str(e.value), e.value
            assert time.monotonic() - t < 20
            wait_for(lambda: not os.path.exists(f"/proc/{zygotes[0]}"), timeout=30, what="the stuck zygote to go")
            wait_for(lambda: c.status().pools[0].restarts == 1 and c.status().pools[0].zygotes_running == 1,
                      timeout=60, what="a new zygote")
            assert c.call(lambda: 3) == 3
    finally:
        stop_daemon(proc)


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root zygote runs a namespace maker")
def test_a_dead_zygotes_namespace_maker_is_reaped_by_a_daemon_that_inherits_it(tmp_path):
    """A root zygote runs a namespace maker (zygote/_nsmaker.py); when the zygote dies the maker
    ends too, and where the daemon is its new parent (a subreaper here; a container's PID 1),
    the daemon reaps it: no zombie left per zygote restart (a helper's review)."""
    import ctypes
    import tempfile

    def subreaper() -> None:  # (in the daemon's process, before its exec; kept across exec)
        ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER

    path = str(tmp_path / "z.sock")
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "zygote", "serve", "--socket", path, "--preload", "json"],
                            stderr=log, preexec_fn=subreaper)
    proc.log = log
    try:
        wait_socket(path, proc)
        with Client.connect(path) as c:
            assert c.call(lambda: 1) == 1
            (zygote,) = [pid for pid, _ in children_of(proc.pid) if b"zygote._zygote" in cmdline(pid)]
            (maker,) = [pid for pid, _ in children_of(zygote) if b"_nsmaker.py" in cmdline(pid)]
            os.kill(zygote, signal.SIGKILL)  # (our daemon's zygote)
            wait_for(lambda: not os.path.exists(f"/proc/{maker}"), timeout=15,
                     what="the dead zygote's namespace maker to end and be reaped")
            wait_for(lambda: c.status().pools[0].zygotes_running == 1, timeout=60, what="a new zygote")
            assert c.call(lambda: 2) == 2
    finally:
        stop_daemon(proc)


def _daemon_with(tmp_path, settings: str, *args: str):
    """A daemon of its own on tmp_path/z.sock with these [daemon] TOML lines: (socket, process)."""
    sock = str(tmp_path / "z.sock")
    lines = "".join(f"        {line.strip()}\n" for line in settings.strip().splitlines())
    cfg = write_text(tmp_path / "z.toml", f"""
        [daemon]
        socket = "{sock}"
{lines}        """)
    return sock, start_daemon("--config", cfg, *args)


def test_SECURITY_a_spawner_not_reading_its_detached_childrens_output_is_capped(tmp_path, monkeypatch):
    """The spawner's feeds of a detached child's output (two pipes, two tasks, the child's rings)
    count against max_attaches like any attached reader's, and end RELAY_LINGER after the child
    (1 s here under test hooks). Before, a client keeping those pipes unread pinned ~2 MiB and
    two fds of the daemon per finished child, without bound (the record's own limits do not
    cover them)."""
    monkeypatch.setenv("ZYGOTE_TEST_TAP_LINGER", "1")
    sock, proc = _daemon_with(tmp_path, "max_attaches = 2", "--test-hooks")

    def chatty():
        import sys
        sys.stdout.write("o" * 300_000)  # more than a pipe holds: its feed waits for the reader

    try:
        wait_socket(sock, proc)
        with Client.connect(sock) as a:
            kids = [a.spawn_child(chatty, stdin=None, detached=True) for _ in range(2)]
            for k in kids:
                assert k.wait(timeout=30).returncode == 0
            with pytest.raises(DaemonError) as e:  # two feeds nobody reads, past the child's end
                a.spawn_child(chatty, stdin=None, detached=True)
            assert e.value.code == "limit" and "max_attaches" in str(e.value)
            time.sleep(2)  # RELAY_LINGER (1 s) after the children: their feeds end
            out = kids[0].stdout.read()
            assert 0 < len(out) < 300_000  # what the pipe held, then EOF: the rest was let go
            k = a.spawn_child(chatty, stdin=None, detached=True)  # the count was given back
            assert len(k.stdout.read()) == 300_000  # a reader that reads gets it all
            assert k.wait(timeout=30).returncode == 0
    finally:
        stop_daemon(proc)


def test_SECURITY_a_quiet_child_s_feed_lets_go_of_a_reader_that_closed(tmp_path):
    """A detached child's feed to a reader that closed its pipes ends within READER_CHECK (2 s)
    even while the child writes nothing: it found out only at its next write, so a quiet child
    kept the closed reader's place in max_attaches until it ended (here 120 s)."""
    sock, proc = _daemon_with(tmp_path, "max_attaches = 1")

    def quiet():
        import time as _t
        _t.sleep(120)

    try:
        wait_socket(sock, proc)
        with Client.connect(sock) as a:
            first = a.spawn_child(quiet, stdin=None, detached=True)  # its feed takes the one place
            with pytest.raises(DaemonError) as e:
                a.spawn_child(quiet, stdin=None, detached=True)
            assert e.value.code == "limit" and "max_attaches" in str(e.value)
            first.stdout.close()
            first.stderr.close()
            deadline = time.monotonic() + 10
            while True:
                try:
                    second = a.spawn_child(quiet, stdin=None, detached=True)
                    break
                except DaemonError as e:
                    assert e.code == "limit" and time.monotonic() < deadline, "the closed feed kept its place"
                    time.sleep(0.5)
            for k in (first, second):
                k.kill()
                k.wait(timeout=30)
    finally:
        stop_daemon(proc)


def test_SECURITY_detached_spawns_in_a_burst_cannot_pass_max_attaches_together(tmp_path):
    """The spawner's feeds count against max_attaches from the spawn's check on: counted only
    once the child was set up, eight detached spawns sent together all passed a cap of two."""
    import threading

    sock, proc = _daemon_with(tmp_path, "max_attaches = 2")

    def sleeper():
        import time
        time.sleep(60)

    outcomes: list[str] = []
    try:
        wait_socket(sock, proc)
        with Client.connect(sock) as c:
            kids = []

            def one() -> None:
                try:
                    kids.append(c.spawn_child(sleeper, stdin=None, detached=True))
                    outcomes.append("spawned")
                except DaemonError as e:
                    outcomes.append(e.code)
            threads = [threading.Thread(target=one) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for k in kids:
                k.kill()
            assert sorted(outcomes) == ["limit"] * 6 + ["spawned"] * 2, outcomes
    finally:
        stop_daemon(proc)


def test_signal_0_checks_nothing_and_is_no_error_as_with_popen(client):
    """Popen.send_signal(0) is a no-op for its child, alive or ended; it raised DaemonError."""
    child = client.spawn_child(time.sleep, (30,), stdin=None)
    child.send_signal(0)
    assert child.poll() is None
    child.kill()
    assert child.wait().returncode == -signal.SIGKILL
    child.send_signal(0)


def test_a_cancelled_embedded_start_stops_its_daemon_without_holding_the_loop():
    """open_embedded cancelled while its daemon preloads pandas: the daemon goes at once and the
    event loop runs on meanwhile (it waited for the daemon with a blocking proc.wait(), which
    returned only once the daemon had started its pools and seen its socket closed)."""
    def embedded_daemons() -> list[int]:
        return [pid for pid, _ in children_of(os.getpid()) if b"--inherit-fd" in cmdline(pid)]

    async def main() -> float:
        ticks = [time.monotonic()]

        async def ticker() -> None:
            while True:
                await anyio.sleep(0.01)
                ticks.append(time.monotonic())
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            with anyio.move_on_after(0.05) as scope:
                await open_embedded(preload_imports=["pandas"])
            assert scope.cancelled_caught
            await anyio.sleep(0.05)  # (the ticker's tick after a stall, if there was one)
            tg.cancel_scope.cancel()
        return max(b - a for a, b in zip(ticks, ticks[1:]))

    before = set(embedded_daemons())  # (the module's client's)
    gap = anyio.run(main)
    assert gap < 0.4, f"the event loop stood still for {gap:.2f} s"  # (0.5-0.65 s with proc.wait())
    assert set(embedded_daemons()) <= before


def test_threads_using_a_client_that_is_closed_get_closed_error():
    """Threads in run() while the client is closed get ClosedError (closed by this side), not
    BrokenError ("the daemon closed the connection", which 5 of 8 got: the reader took its own
    stream's close for the daemon's)."""
    import threading

    from zygote_client import ClosedError, ZygoteError
    c = Client.embedded()
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            try:
                c.run(time.sleep, (0.01,))
            except ZygoteError as e:
                errors.append(e)
                return
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    c.close()
    for t in threads:
        t.join(30)
    assert len(errors) == 8 and all(isinstance(e, ClosedError) for e in errors), [repr(e) for e in errors]


def test_a_zygote_whose_daemon_went_away_ends_quietly():
    """A daemon killed with the zygote's message unread: the zygote's next receive fails with
    ECONNRESET, and its traceback went to the stderr it shares with the daemon's user (an
    embedded client's terminal). It ends with status 0 and says nothing."""
    import select
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    p = subprocess.Popen([sys.executable, "-P", "-m", "zygote._zygote", str(child.fileno())],
                         pass_fds=[child.fileno()], stderr=subprocess.PIPE)
    child.close()
    parent.send(b"P")  # (placed in its cgroup: it may start)
    try:
        assert select.select([parent], [], [], 60)[0], "the zygote never said it was ready"
        parent.close()  # its "ready" unread
        assert p.wait(30) == 0
        assert p.stderr.read() == b""
    finally:
        parent.close()
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stderr.close()


def test_a_detached_child_whose_spawn_was_cut_short_does_not_run_on_unseen(tmp_path, monkeypatch):
    """A spawn cancelled after its child was registered and told to go (its connection closed
    while the child confined itself) left the child to the connection's cleanup, which kills
    only children that are not detached: a detached one ran its payload, its id never told to
    anyone, with no ring for its output (nothing could attach), holding a place of its uid's
    max_detached_per_client until the daemon stopped (a helper's review, by reading). A test
    hook holds the child before its mounts until the test has closed the connection."""
    import pickle
    from conftest import sandbox_children

    path, go_on = str(tmp_path / "zygote.sock"), str(tmp_path / "go-on")
    monkeypatch.setenv("ZYGOTE_TEST_PAUSE_BEFORE_SOURCES", go_on)
    proc = start_daemon("--socket", path, "--preload", "json", "--test-hooks")
    try:
        wait_socket(path, proc)
        conn = RawConn(path)
        conn.send(P.Hello(P.VERSION))
        assert isinstance(conn.reply(), P.Welcome)
        conn.send(P.Spawn(req=1, kind="target", target="time:sleep", payload=pickle.dumps(((60,), {})),
                          detached=True, stdin=False))
        new: list[int] = []
        wait_for(lambda: new.extend(sandbox_children(proc.pid)) or new, 10, "the clone")
        time.sleep(0.3)  # (the daemon has said go: the child waits for the hook's path)
        conn.sock.close()
        time.sleep(0.3)  # (the connection's cleanup has run)
        with open(go_on, "w"):
            pass
        wait_for(lambda: not os.path.exists(f"/proc/{new[0]}"), 10, "the unseen detached child to be killed")
    finally:
        stop_daemon(proc)


def test_a_child_held_in_its_setup_fails_its_spawn_in_time(tmp_path, monkeypatch):
    """A child that never finishes its setup (a bind source on a file system that stopped
    answering holds its open) kept its request waiting for ever, and its place under
    max_children. The spawn now fails after SETUP_TIMEOUT (60 s; 1 s here) and the child is
    killed. A test hook holds the child before it opens its bind sources."""
    from conftest import sandbox_children
    from zygote_client import SandboxError

    path, never = str(tmp_path / "zygote.sock"), str(tmp_path / "never")
    monkeypatch.setenv("ZYGOTE_TEST_PAUSE_BEFORE_SOURCES", never)
    monkeypatch.setenv("ZYGOTE_TEST_SETUP_TIMEOUT", "1")
    proc = start_daemon("--socket", path, "--preload", "json", "--test-hooks", "--reserve", "0")
    try:
        wait_socket(path, proc)
        with Client.connect(path) as c:
            with pytest.raises(SandboxError) as e:
                c.run(print, ("never",))
            assert e.value.step == "setup" and "did not finish its setup in 1 s" in str(e.value), e.value
            wait_for(lambda: not sandbox_children(proc.pid), 10, "the held child to be killed")
            assert c.status().running == 0
    finally:
        stop_daemon(proc)


def test_a_daemon_stopped_while_it_starts_leaves_nothing(tmp_path):
    """A daemon listens before it is ready (its pools still starting): one stopped then (a
    SIGTERM right after its socket accepted) exited 0 and left its cgroup directories and its
    host id lock files behind (a helper noticed them after a test that does just that)."""
    def held() -> set[str]:
        try:
            return set(os.listdir("/run/zygote-ids"))
        except FileNotFoundError:
            return set()
    before = held()
    sock = str(tmp_path / "z.sock")
    proc = start_daemon("--socket", sock)
    wait_socket(sock, proc)
    stop_daemon(proc)
    left = subprocess.run(["find", "/sys/fs/cgroup", "-maxdepth", "5", "-type", "d", "-name", f"d{proc.pid}"],
                          capture_output=True, text=True).stdout.split()
    assert left == [], left
    assert held() <= before, held() - before


def test_SECURITY_an_attach_s_replay_is_paid_from_the_output_budget(tmp_path):
    """Every attach replays a detached child's rings (up to twice detached_buffer_bytes) into a
    new pipe: the daemon writes it again. Unpaid, one client attaching in a loop to one child
    had the daemon move ~300 MiB/s past its 8 MiB/s output_rate_per_client (82% of a core).
    Here 4 replays of 128 KiB under 128 KiB/s take seconds, not a blink."""
    from conftest import config_daemon

    def fill():
        import os, time
        os.write(1, b"o" * (128 << 10))
        time.sleep(30)

    with config_daemon(tmp_path, 'output_rate_per_client = "128K"\n') as sock, Client.connect(sock) as c:
        child = c.spawn_child(fill, stdin=None, detached=True, timeout=60)
        assert len(child.stdout.read(128 << 10)) == 128 << 10
        t = time.monotonic()
        for _ in range(4):
            a = c.attach(child.id)
            assert len(a.stdout.read(128 << 10)) == 128 << 10
            a.stdout.close()
            a.stderr.close()
        assert time.monotonic() - t > 2.0
        child.kill()


@pytest.mark.parametrize("how", ["fresh", "leased", "counted"])  # (a reserve child's pipes: made as a leased one's)
def test_a_payload_opens_its_stdio_again_by_name(tmp_path, how):
    """/dev/stdout, /dev/stderr, /dev/stdin and /proc/self/fd/N work as in any process: the
    daemon gives the child's ends of the pipes it made to the ids the payload runs as (made as
    root's, mode 0600, they could only be used as inherited: EACCES). A shell redirection too."""
    from zygote_client import SandboxConfig

    def _reopen_stdio():
        # (by name, as scripts do: print(..., file=open("/dev/stderr", "w")))
        import os
        seen = {}
        for path, mode in (("/dev/stdout", "w"), ("/dev/stderr", "w"), ("/proc/self/fd/1", "w"), ("/dev/stdin", "r")):
            try:
                with open(path, mode) as f:
                    if mode == "w":
                        f.write(f"via {path}\n")
                    else:
                        seen["stdin read"] = f.read()
                seen[path] = "ok"
            except OSError as e:
                seen[path] = e.strerror
        st = os.fstat(1)
        seen["owner"] = [st.st_uid == os.getuid(), st.st_gid == os.getgid()]
        return seen

    args = ["--reserve", "1"] if how == "leased" else []
    cfg = SandboxConfig(max_output_bytes=1 << 20) if how == "counted" else None  # (through the daemon's relays)
    with Client.embedded(daemon_args=args, leases=1 if how == "leased" else 0) as c:
        if args:  # (the run below takes the held child)
            wait_for(lambda: c._aclient._leases, 30, "a held child")
        r = c.run(_reopen_stdio, input=b"in", sandbox_config=cfg)
        assert r.value == {"/dev/stdout": "ok", "/dev/stderr": "ok", "/proc/self/fd/1": "ok", "/dev/stdin": "ok",
                           "stdin read": "in", "owner": [True, True]}, (r.value, r.stderr)
        assert r.stdout == b"via /dev/stdout\nvia /proc/self/fd/1\n" and r.stderr == b"via /dev/stderr\n", r
        if how == "fresh":
            child = c.spawn_child(None, _argv=["/bin/sh", "-c", "echo out > /dev/stdout; echo err > /dev/stderr"],
                                  stdin=None)
            out, err = child.communicate()
            assert (child.returncode, out, err) == (0, b"out\n", b"err\n"), (out, err)
