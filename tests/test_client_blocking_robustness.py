"""The blocking client under adverse conditions (found by a helper's review of the client):
interrupts in the middle of a spawn, a with-block left by an exception, a fork of the process,
closed streams, a connection that broke. Real daemons throughout."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
import traceback

import pytest

from zygote_client import BrokenError, Client, ClosedError, ProtocolError, RemoteError
from zygote_client import _blocking

from conftest import daemon_pid, wait_for


@pytest.fixture(scope="module")
def client():
    with Client.embedded() as c:
        yield c


def _settled(c: Client, fds: int) -> None:
    """Until no child of ours runs and this process is back to ``fds`` open fds."""
    wait_for(lambda: not c.status().children, 10, "the interrupted spawn's child to be gone")
    wait_for(lambda: len(os.listdir("/proc/self/fd")) <= fds, 10, "the interrupted spawn's fds to be closed")


def test_a_spawn_interrupted_as_its_child_arrives_leaves_nothing(client, monkeypatch):
    """Ctrl-C while spawn_child waits, just as the child is made (the loop's task has finished,
    its result not yet returned): the child went on running with nobody holding it, its three
    pipes open, until the client closed. It is killed and its pipes closed."""
    client.run(print)  # (warm: the fds the client keeps are open)
    base = len(os.listdir("/proc/self/fd"))

    class Interrupted(_blocking._Future):
        interrupted = False

        def result(self, timeout=None):
            value = super().result(timeout)  # (done: the child exists)
            if not self.interrupted:  # (the first look, the caller's)
                self.interrupted = True
                raise KeyboardInterrupt
            return value

    monkeypatch.setattr(_blocking, "_Future", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        client.spawn_child(time.sleep, (60,))
    monkeypatch.undo()
    _settled(client, base)


def test_a_spawn_interrupted_while_its_files_are_made_leaves_nothing(client, monkeypatch):
    """Ctrl-C while ChildProcess wraps the child's pipes in file objects: the child ran on and
    every pipe not yet wrapped stayed open. The child is killed, every pipe closed."""
    client.run(print)
    base = len(os.listdir("/proc/self/fd"))
    real_open = open

    def interrupted_open(fd, mode="r", *args, **kwargs):
        if mode == "rb":  # stdin is wrapped already, stdout and stderr not
            raise KeyboardInterrupt
        return real_open(fd, mode, *args, **kwargs)

    monkeypatch.setattr(_blocking, "open", interrupted_open, raising=False)
    with pytest.raises(KeyboardInterrupt):
        client.spawn_child(time.sleep, (60,))
    monkeypatch.undo()
    _settled(client, base)


def test_a_with_block_left_by_an_exception_kills_its_child(client):
    """As the async client's block (and not waiting for the child to end by itself: a 60 s child
    held the Ctrl-C'd block for 60 s)."""
    t0 = time.monotonic()
    with pytest.raises(ValueError):
        with client.spawn_child(time.sleep, (60,)) as ch:
            raise ValueError("left")
    assert time.monotonic() - t0 < 10
    assert ch.returncode == -signal.SIGKILL


def test_communicate_leaves_out_the_streams_the_caller_closed(client):
    """As Popen.communicate: a closed stdout or stdin is skipped (it raised ValueError)."""
    ch = client.spawn_child(lambda: print("err", file=__import__("sys").stderr))
    ch.stdout.close()
    assert ch.communicate() == (b"", b"err\n")
    ch = client.spawn_child(print, ("out",))
    ch.stdin.close()
    assert ch.communicate() == (b"out\n", b"")


def test_signals_to_an_ended_child_do_nothing_even_after_close():
    """Popen.kill() on a process that ended never raises; ChildProcess.kill() raised ClosedError
    once the client was closed."""
    with Client.embedded() as c:
        ch = c.spawn_child(print, stdin=None)
        ch.communicate()
        ch.wait()
    for send in (ch.kill, ch.terminate, lambda: ch.send_signal(signal.SIGUSR1)):
        send()


def test_a_close_that_leaves_an_exit_unreported_ends_poll_loops_and_signals_do_nothing():
    """Closing the client ends its children that are not detached, and their exits are never
    reported: poll() returned None for ever (a loop on it never ended), kill()/terminate()
    raised ClosedError where Popen's do nothing for a process that ended, and so did leaving a
    with-block."""
    with Client.embedded() as c:
        ch = c.spawn_child(time.sleep, (60,), stdin=None)
    with pytest.raises(ClosedError):
        ch.poll()
    assert ch.returncode is None
    for send in (ch.kill, ch.terminate, lambda: ch.send_signal(signal.SIGUSR1)):
        send()
    with ch:
        pass
    wait_for(lambda: not os.path.exists(f"/proc/{ch.pid}"), 10, "the child to be gone with its client")


def test_a_reader_that_fails_on_its_own_side_ends_the_connection_and_its_children():
    """A frame this client cannot decode ends its reader, and nothing more can be read: the
    connection stayed open, so the daemon kept its children running while kill() (which takes
    the daemon for gone) returned quietly. Now the connection closes and they end with it."""
    with Client.embedded() as c:
        a = c.spawn_child(time.sleep, (60,), stdin=None)
        b = c.spawn_child(time.sleep, (0.2,), stdin=None)

        def undecodable(data, fds):
            raise ProtocolError("a frame this client cannot decode (the test's)")

        c._aclient._decoder.feed = undecodable
        with pytest.raises(ProtocolError):
            b.wait(30)  # (its Exited is the frame)
        a.kill()
        wait_for(lambda: not os.path.exists(f"/proc/{a.pid}"), 10, "the child to end with its connection")


def test_communicate_s_timeout_carries_what_was_read(client):
    """As Popen's: TimeoutExpired.output and .stderr hold what was read before the timeout, None
    for a stream that gave nothing (both were None), and a later call still returns all of it."""
    def prints_then_sleeps():
        import time
        print("out", flush=True)
        time.sleep(60)

    ch = client.spawn_child(prints_then_sleeps, stdin=None)
    assert select.select([ch.stdout], [], [], 30)[0]  # (the line is in the pipe: nothing read yet)
    with pytest.raises(subprocess.TimeoutExpired) as e:
        ch.communicate(timeout=0.2)
    assert (e.value.output, e.value.stderr) == (b"out\n", None)
    ch.kill()
    assert ch.communicate() == (b"out\n", b"")


def test_a_payload_s_exception_reaches_the_client_when_its_stderr_is_closed(client):
    """The child printed the traceback before writing the error record, in one try: with the
    caller's end of stderr closed the print raised and the record was never written, so
    result() said the payload exited without returning."""
    def fails():
        import sys
        sys.stdin.read()
        raise ValueError("the real error")

    ch = client.spawn_child(fails)
    ch.stderr.close()
    ch.stdin.close()
    with pytest.raises(RemoteError, match="the real error"):
        ch.result(timeout=30)
    ch.stdout.close()


def test_a_keyword_this_api_does_not_take_is_refused_at_the_call(client):
    """run(check=True) or spawn_child(stderr=STDOUT) failed inside the event loop with a
    TypeError naming AsyncClient.spawn_child; now the call itself refuses, saying what to do
    instead of subprocess's keywords."""
    before = {ch.id for ch in client.status().children}
    with pytest.raises(TypeError, match=r"run\(\) got an unexpected keyword argument 'check': .*check_returncode"):
        client.run(print, check=True)
    with pytest.raises(TypeError, match=r"spawn_child\(\) got an unexpected keyword argument 'stderr'"):
        client.spawn_child(print, stderr=subprocess.STDOUT)
    with pytest.raises(TypeError, match=r"spawn_child\(\) got an unexpected keyword argument 'nope'$"):
        client.spawn_child(print, nope=1)
    assert {ch.id for ch in client.status().children} == before  # (nothing was started)


def test_a_broken_connection_raises_a_fresh_error_each_time():
    """Once the daemon is gone, each wait() raised the one stored BrokenError: its traceback
    grew by every raise (18000 entries after 2000 calls) and held every caller's frames."""
    with Client.embedded() as c:
        ch = c.spawn_child(time.sleep, (60,), stdin=None)
        os.kill(daemon_pid(c), signal.SIGKILL)
        seen = []
        for _ in range(30):
            with pytest.raises(BrokenError) as e:
                ch.wait()
            seen.append(e.value)
        assert len({id(x) for x in seen}) == len(seen)
        assert len(traceback.extract_tb(seen[-1].__traceback__)) < 10


_FORKS = """
import os, sys, time
from zygote_client import Client, ClosedError
c = Client.embedded()
assert c.run(print, ("parent",)).stdout == b"parent\\n"
pid = os.fork()
if pid == 0:
    try:
        c.run(print, ("child",))
        print("child: the parent's client ran a child", flush=True)
    except ClosedError as e:
        print("child: ClosedError", e, flush=True)
    sys.exit(0)  # (atexit closes the clients still open)
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    if os.waitpid(pid, os.WNOHANG)[0]:
        break
    time.sleep(0.05)
else:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    print("parent: the fork hung at its exit", flush=True)
print("parent:", c.run(print, ("again",)).stdout, flush=True)
c.close()
"""


def test_a_fork_of_a_process_with_an_open_client_exits_and_is_told_the_client_is_not_its_own():
    """The fork has no loop thread: its exit hung for ever (atexit closed the client through the
    missing thread), and so did any use of the client. There it raises ClosedError, and the
    fork exits at once; the parent's client goes on working."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_FORKS)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "child: ClosedError this client belongs to the process that made it" in r.stdout, r.stdout + r.stderr
    assert "hung" not in r.stdout and "parent: b'again\\n'" in r.stdout, r.stdout + r.stderr


def test_an_embedded_client_collected_without_close_leaves_no_zombie():
    """An embedded client dropped without close(): its daemon ends with the connection and is
    reaped (by a finalizer's thread), not left a zombie of this process until the next
    subprocess starts (Python's subprocess reaps stray Popens only then)."""
    import gc

    c = Client.embedded()
    pid = c._aclient._proc.pid  # (tests only)
    assert c.call(lambda: 1) == 1
    del c
    gc.collect()

    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=15,  # (a zombie keeps its /proc entry)
             what="the collected client's daemon to be reaped")


class _Raised(Exception):
    pass


def test_an_exception_from_a_signal_handler_never_leaves_the_direct_send_s_lock_held():
    """A thread's direct send of a small frame (AsyncClient._send_now, a held child's Begun) takes
    a lock the event loop also takes. An exception raised by a signal handler (KeyboardInterrupt
    at Ctrl-C) can land between any two steps of the thread's code: taken by acquire() outside
    the try that releases it, the lock stayed held once in a few interrupts, and the loop's next
    request hung on it for good (a helper's review). Here a handler raises into a loop of such
    sends thousands of times a second; the lock is never left held."""
    import threading
    import types

    from zygote_client._async import AsyncClient

    def raise_(signum, frame):
        if not stop.is_set():
            raise _Raised()
    fake = types.SimpleNamespace(_wire=threading.Lock(), _wire_busy=True, _wire_shut=False,
                                 _stream=types.SimpleNamespace(extra=lambda attr: None))
    main, go, stop = threading.main_thread().ident, threading.Event(), threading.Event()

    def pester() -> None:
        go.wait()
        while not stop.is_set():
            signal.pthread_kill(main, signal.SIGUSR1)
            time.sleep(0.00005)
    old = signal.signal(signal.SIGUSR1, raise_)
    interrupts = leaks = 0
    try:
        t = threading.Thread(target=pester, daemon=True)
        t.start()
        end = time.monotonic() + 1.5
        go.set()
        while True:
            try:  # (one may land anywhere in this loop's own bookkeeping too)
                while time.monotonic() < end:
                    try:
                        assert AsyncClient._send_now(fake, b"x") is False  # (busy: it only looks)
                    except _Raised:
                        interrupts += 1
                        if fake._wire.locked():
                            leaks += 1
                            fake._wire.release()
                stop.set()  # (from here the handler raises nothing)
                break
            except _Raised:
                pass
        t.join()
    finally:
        stop.set()
        signal.signal(signal.SIGUSR1, old)
    assert interrupts > 50 and leaks == 0, (interrupts, leaks)


def test_a_signal_handler_calling_the_client_during_a_direct_send_does_not_hang_it():
    """A signal handler runs in the main thread between two steps of whatever it was doing: here
    inside a held child's direct Begun send, which holds the lock the loop takes to send the
    handler's own request. The loop waits for that lock at most WIRE_WAIT (5 s; 0.5 here), then
    gives the connection up: the handler's call fails with BrokenError instead of both waiting on
    each other for ever (a helper's review found that hang)."""
    script = textwrap.dedent("""
        import os, signal, time
        from zygote_client import BrokenError, Client, _async
        _async.WIRE_WAIT = 0.5
        c = Client.embedded(daemon_args=["--reserve", "2"], leases=2)
        end = time.monotonic() + 30
        while len(c._aclient._leases) < 2 and time.monotonic() < end:
            time.sleep(0.02)
        def handler(signum, frame):
            try:
                c.status()
                print("handler: status answered", flush=True)
            except BrokenError:
                print("handler: BrokenError", flush=True)
        signal.signal(signal.SIGUSR1, handler)
        stream = c._aclient._stream
        real_extra = stream.extra
        class Sock:  # the signal comes while the send holds the lock
            def __init__(self, sock):
                self.sock = sock
            def send(self, data, flags):
                os.kill(os.getpid(), signal.SIGUSR1)
                return self.sock.send(data, flags)
        stream.extra = lambda attr, *default: Sock(real_extra(attr, *default))
        child = c.spawn_child(print, args=("x",), stdin=None, timeout=30)
        print("spawn returned", flush=True)
        c.close()
        print("closed", flush=True)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert p.stdout.splitlines() == ["handler: BrokenError", "spawn returned", "closed"], (p.stdout, p.stderr[-2000:])
