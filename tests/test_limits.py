"""Limits the daemon and rlimits enforce (cgroup limits: tests/test_cgroup_limits.py)."""

from __future__ import annotations

import array
import contextlib
import os
import platform
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from zygote_client import SandboxConfig
from conftest import children_of, cmdline, daemon_pid, fd_count, rss_bytes, serve_socket
from zygote_client import Client


def test_timeout_kills_tree_with_grandchildren(client):
    def payload():
        import os, signal
        for _ in range(3):
            if os.fork() == 0:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                while True:
                    pass
        while True:
            pass

    t0 = time.monotonic()
    r = client.run(payload, sandbox_config=SandboxConfig(timeout=1))
    elapsed = time.monotonic() - t0
    assert r.status.timed_out
    assert r.returncode == -signal.SIGKILL
    assert elapsed < 1.5, elapsed
    assert [p for p, _ in children_of(daemon_pid(client))
            if b"zygote._zygote" not in cmdline(p) and os.path.exists(f"/proc/{p}")] == []


def test_timeout_grace_sends_sigterm_first(client):
    def payload():
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *a: (print("got TERM", flush=True), sys.exit(5)))
        time.sleep(60)

    r = client.run(payload, sandbox_config=SandboxConfig(timeout=0.5, timeout_grace=2))
    assert r.status.timed_out
    assert r.stdout == b"got TERM\n"
    assert r.returncode == 5


def test_cpu_time_exceeded(client):
    def spin():
        while True:
            pass

    r = client.run(spin, sandbox_config=SandboxConfig(cpu_time=1, timeout=20))
    assert r.status.cpu_time_exceeded, r.status
    assert not r.status.timed_out
    assert r.returncode in (-signal.SIGXCPU, -signal.SIGKILL)


def test_a_child_that_ended_before_its_deadline_is_not_reported_timed_out(client):
    """After a child's exit the daemon gives its status and result pipes 2 s (EOF_GRACE) to
    reach EOF; the deadline went on running meanwhile, so a child that exited at once but had
    handed a pipe's write end outside (here its result pipe, over the socket it got as stdin)
    came back timed_out with returncode 0."""
    def hands_out_its_result_pipe():
        import array, socket
        s = socket.socket(fileno=0)
        s.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [5]))])
        s.detach()

    ours, theirs = socket.socketpair()
    r, w = os.pipe()
    held = []
    try:
        child = client.spawn_child(hands_out_its_result_pipe, stdin=None, timeout=1.5,
                                   _stdio_fds=(theirs.fileno(), w, w))
        _, anc, _, _ = ours.recvmsg(1, socket.CMSG_SPACE(4))
        held = [fd for level, kind, blob in anc for fd in array.array("i", blob)]
        st = child.wait(timeout=30)
        assert held and st.returncode == 0 and not st.timed_out, st
        assert st.wall_time >= 1.5  # (the grace outlasted the deadline: the case at hand)
    finally:
        for fd in held + [r, w]:
            os.close(fd)
        ours.close()
        theirs.close()


def test_cpu_time_exceeded_is_not_claimed_for_a_signal_the_budget_did_not_send(client):
    """A SIGXCPU the payload raised itself, with 30 s of budget left, was reported as
    cpu_time_exceeded (so was any SIGKILL past 95% of the budget: an OOM kill's, a client's)."""
    def raises_sigxcpu():
        import os, signal
        os.kill(os.getpid(), signal.SIGXCPU)

    r = client.run(raises_sigxcpu, sandbox_config=SandboxConfig(cpu_time=30, reaper=True, timeout=20))
    assert r.returncode == -signal.SIGXCPU and not r.status.cpu_time_exceeded, r.status


def test_max_output_stops_a_chatty_child(client):
    r = client.run(lambda: [print("x" * 100) for _ in iter(int, 1)],
                   sandbox_config=SandboxConfig(max_output_bytes="1M", timeout=30))
    assert r.status.output_exceeded
    assert not r.status.timed_out
    assert len(r.stdout) + len(r.stderr) <= 1 << 20
    assert r.returncode == -signal.SIGKILL


def test_max_output_nobody_reading(client):
    child = client.spawn_child(lambda: [print("y" * 100) for _ in iter(int, 1)],
                               sandbox_config=SandboxConfig(max_output_bytes="1M", timeout=30))
    st = child.wait(timeout=20)  # nobody reads stdout: the daemon's counting still ends it
    assert st.output_exceeded
    child.stdout.close()
    child.stderr.close()


def test_closed_stdio_still_timed_out(client):
    def payload():
        import os, time
        os.close(1)
        os.close(2)
        time.sleep(60)

    child = client.spawn_child(payload, sandbox_config=SandboxConfig(timeout=1))
    assert child.stdout.read() == b""  # EOF at once: the child closed its end
    st = child.wait(timeout=10)
    assert st.timed_out and st.returncode == -signal.SIGKILL


def test_file_size_limit(client):
    def payload():
        import os
        with open(f"/tmp/zg-fsize-{os.getpid()}", "wb") as f:
            try:
                f.write(b"x" * 200_000)
                f.flush()
                print("wrote")
            except OSError as e:
                print("EFBIG", e.errno)

    r = client.run(payload, sandbox_config=SandboxConfig(file_size=100_000))
    assert b"EFBIG" in r.stdout, r


def test_open_files_limit(client):
    def payload():
        import os
        fds = []
        try:
            while True:
                fds.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as e:
            print(len(fds), e.errno)

    r = client.run(payload, sandbox_config=SandboxConfig(open_files=20))
    n, err = r.stdout.split()
    assert int(n) <= 17 and int(err) == 24


def test_SECURITY_a_client_that_never_reads_its_own_fds_stalls_only_its_output(socket_daemon, tmp_path):
    """stdio="fds": the daemon relays a child's output into pipes the client passed. A client
    that never reads them must not tie up the daemon's worker threads (trio's default limit is
    40: cgroup setup for every client's spawns waits on them)."""
    from zygote_client import Client

    def chatty():
        import sys
        sys.stdout.write("z" * 300_000)
        sys.stdout.flush()

    held: list[int] = []
    null = os.open(os.devnull, os.O_RDWR)
    err_r, err_w = os.pipe()  # the daemon relays only into pipes: stderr too
    held.append(null)
    try:
        with Client.connect(socket_daemon) as c:
            kids = []
            for _ in range(44):
                r, w = os.pipe()
                held += [r, w]
                kids.append(c.spawn_child(chatty, stdin=None, _stdio_fds=(null, w, err_w),
                                          sandbox_config=SandboxConfig(max_output_bytes="1M")))
                os.close(w)
                held.remove(w)
            for k in kids:
                assert k.wait(timeout=60).returncode == 0  # the daemon drained each child

            out = tmp_path / "out"
            done: list[int] = []

            def later() -> None:  # a cgroup-limited spawn (its setup runs on a worker thread)
                fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)
                try:
                    k = c.spawn_child(chatty, stdin=None, _stdio_fds=(null, fd, null),
                                      sandbox_config=SandboxConfig(memory="64M"))
                finally:
                    os.close(fd)
                done.append(k.wait(timeout=30).returncode)
                done.append(c.call(lambda: 7))

            t = threading.Thread(target=later, daemon=True)
            t.start()
            t.join(60)
            if t.is_alive():  # unstick the daemon's writers before failing
                for fd in held[1:]:
                    os.close(fd)
                del held[1:]
                t.join(60)
                pytest.fail("a spawn waited on threads stuck writing into fds nobody reads")
            assert done == [0, 7]
            deadline = time.monotonic() + 30
            while out.stat().st_size < 300_000 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert out.read_bytes() == b"z" * 300_000  # a regular file still gets all of it
            for r in held[1:]:  # what fits, in order
                data = os.read(r, 4096)
                assert data and set(data) == {ord("z")}
            assert os.get_blocking(err_w), "the daemon changed the flags of the client's own pipe"
    finally:
        for fd in held + [err_r, err_w]:
            os.close(fd)


@pytest.mark.parametrize("kind", ["socket", "file", "proc", "tty"])
def test_SECURITY_counted_output_is_written_into_client_pipes_only(socket_daemon, tmp_path, kind):
    """The daemon writes counted output (max_output_bytes) into the client's own stdout, as
    root, and the kernel checks some writes when they happen: a unix-socket receiver with
    SO_PASSCRED would take the child's text as the daemon's (pid, uid 0: systemd's notify socket
    believes a MAINPID= from it); /proc/self/autogroup or oom_score_adj check the writer's
    capabilities; a setuid file written by root keeps its bit. Only pipes are written to."""
    from zygote_client import DaemonError

    keep = []
    if kind == "socket":
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        keep += [ours, theirs]
        out = theirs.fileno()
    elif kind == "file":
        out = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o4755)
    elif kind == "proc":
        out = os.open("/proc/self/autogroup", os.O_WRONLY)
    else:
        master, out = os.openpty()
        keep.append(master)
    null = os.open(os.devnull, os.O_RDWR)
    err_r, err_w = os.pipe()  # stderr is fine: what is refused is stdout
    keep += [err_r, err_w]
    try:
        with Client.connect(socket_daemon) as c:
            with pytest.raises(DaemonError) as e:
                k = c.spawn_child(print, ("MAINPID=1",), stdin=None, _stdio_fds=(null, out, err_w),
                                  sandbox_config=SandboxConfig(max_output_bytes="1M"))
                k.wait(timeout=30)
            assert e.value.code == "bad-request" and "not a pipe" in str(e.value)
            assert c.call(lambda: 3) == 3
        if kind == "socket":
            keep[0].settimeout(0.5)
            with pytest.raises(TimeoutError):
                keep[0].recvmsg(100, socket.CMSG_SPACE(12))  # nothing arrived, from anyone
        if kind == "file":
            assert os.path.getsize(tmp_path / "f") == 0
    finally:
        os.close(null)
        for k in keep:
            k.close() if isinstance(k, socket.socket) else os.close(k)
        if kind != "socket":
            os.close(out)


def test_SECURITY_a_relay_whose_reader_left_ends_and_the_child_sees_it(socket_daemon):
    """The client closes a chatty child's stdout. The relay must end (not buffer the uid's whole
    allowance and then sit on it), and the child gets EPIPE as with any pipe whose reader left."""
    def flood():
        import os
        block = b"f" * (1 << 20)
        for _ in range(400):
            os.write(1, block)

    with Client.connect(socket_daemon) as c:
        k = c.spawn_child(flood, stdin=None, sandbox_config=SandboxConfig(max_output_bytes="1G"))
        k.stdout.close()
        st = k.wait(timeout=60)
        assert st.returncode != 0 and not st.output_exceeded
        assert b"BrokenPipeError" in k.stderr.read()


def test_SECURITY_one_client_s_output_is_read_at_its_rate(tmp_path):
    """The daemon reads the output of detached children (into their rings) and of children with
    max_output_bytes (to relay and count it), and read it as fast as children wrote: one
    detached child writing 64 KiB blocks took 86% of the daemon's CPU and made every other
    client's spawns 3x slower (a helper's red-team, session 32). Now one peer uid's reads share
    ``output_rate_per_client`` bytes a second (a second's worth at once), and its children wait
    on full pipes past it. Here a detached child and a relayed one of the same client, each
    writing as fast as it can for 2 s under 256 KiB/s, together get the burst and 256 KiB a
    second through (and what pipes and single reads hold): about 1 MiB; unbounded, 400 MiB. A child whose output goes straight to its client is not the daemon's work: unbounded."""
    from conftest import config_daemon

    def flood(secs):
        import os, time
        block, n = b"." * 65536, 0
        start = time.monotonic()
        while time.monotonic() < start + secs:
            n += os.write(1, block)
        return n, time.monotonic() - start  # (the last write may wait past secs for room)

    with config_daemon(tmp_path, 'output_rate_per_client = "256K"\n') as sock, Client.connect(sock) as c:
        detached = c.spawn_child(flood, (2.0,), stdin=None, detached=True)
        relayed = c.spawn_child(flood, (2.0,), stdin=None, sandbox_config=SandboxConfig(max_output_bytes="1G"))
        direct = c.spawn_child(flood, (2.0,), stdin=None)
        got_direct = []
        drain = threading.Thread(target=lambda: got_direct.append(len(direct.stdout.read())))
        drain.start()
        got_relayed = len(relayed.stdout.read())
        drain.join(timeout=60)
        (n0, t0), (n1, t1), (n2, _) = detached.result(timeout=60), relayed.result(), direct.result()
        # the burst, then the rate while they wrote (a second more: they did not start together,
        # and the reads are paid after they are made); per child a pipe and blocks in flight
        assert n0 + n1 <= (256 << 10) * (2 + max(t0, t1)) + 2 * 4 * 65536, (n0, n1, t0, t1)
        assert got_relayed == n1, (got_relayed, n1)
        assert n2 > 8 * (256 << 10) and got_direct == [n2], (n2, got_direct)


def test_a_relay_held_back_by_the_rate_still_reports_output_exceeded(tmp_path):
    """A child with max_output_bytes leaves more than its cap in its pipe and exits while its
    relay waits out the client's output budget (4 s here): the exit report must not go out
    after EOF_GRACE (2 s) without it (output_exceeded False, the output then cut at the cap):
    what the pipe holds is judged as soon as the child died, as when the relay is held back by
    the uid's unread output."""
    from conftest import config_daemon

    def writes():
        import os, time
        for n in (16 << 10, 64 << 10, 10 << 10):  # (read one by one: the second overdraws 64K)
            os.write(1, b"w" * n)
            time.sleep(0.3)

    with config_daemon(tmp_path, 'output_rate_per_client = "16K"\n') as sock, Client.connect(sock) as c:
        child = c.spawn_child(writes, stdin=None, sandbox_config=SandboxConfig(max_output_bytes=85 << 10))
        st = child.wait(timeout=60)
        assert st.output_exceeded, st
        assert len(child.stdout.read()) == 85 << 10


def _daemon_of(sock_path: str) -> int:
    with Client.connect(sock_path) as c:
        return c.status().daemon_pid


@pytest.fixture
def graced_daemon(tmp_path, monkeypatch):
    """A socket daemon whose relays outlive their closed connection by RELAY_GRACE = 1 s (5 s)."""
    monkeypatch.setenv("ZYGOTE_TEST_RELAY_GRACE", "1")
    with serve_socket(tmp_path, "--test-hooks") as path:
        yield path


def test_SECURITY_a_relay_nobody_reads_ends_after_its_connection(graced_daemon):
    """A child's counted output waits in the daemon for its reader. When the connection closes
    with a reader that never reads (its read end kept open elsewhere), the relay ends after a
    short grace: its buffer and fds go, instead of staying for the daemon's lifetime."""
    from zygote_client import Client

    socket_daemon = graced_daemon
    dpid = _daemon_of(socket_daemon)
    time.sleep(0.5)
    base = fd_count(dpid)
    keep = []
    with Client.connect(socket_daemon) as c:
        for _ in range(3):
            k = c.spawn_child(lambda: print("q" * 2_000_000), stdin=None,
                              sandbox_config=SandboxConfig(max_output_bytes="8M"))
            assert k.wait(timeout=30).returncode == 0  # all of it is in the daemon's buffer
            keep.append(os.dup(k.stdout.fileno()))  # the reader lives on, never reading
            k.stdout.close()
            k.stderr.close()
        assert fd_count(dpid) > base
    try:
        deadline = time.monotonic() + 15  # RELAY_GRACE is 1 s here
        while fd_count(dpid) > base and time.monotonic() < deadline:
            time.sleep(0.2)
        assert fd_count(dpid) <= base, "relays of a closed connection still hold their fds"
    finally:
        for fd in keep:
            os.close(fd)


def test_SECURITY_output_buffered_for_one_user_is_bounded(tmp_path, monkeypatch):
    """Counted output waits in the daemon while its reader is slow, but only up to
    RELAYED_PER_UID (256 MiB; 32 MiB here, a test hook) per uid: past it the child blocks on its
    pipe like under any slow reader, and loses nothing."""
    from zygote_client import Client

    def flood():
        import os
        block = b"f" * (1 << 20)
        for _ in range(64):
            os.write(1, block)

    monkeypatch.setenv("ZYGOTE_TEST_RELAYED_PER_UID", str(32 << 20))
    with serve_socket(tmp_path, "--test-hooks") as path:
        dpid = _daemon_of(path)
        before = rss_bytes(dpid)
        with Client.connect(path) as c:
            k = c.spawn_child(flood, stdin=None, sandbox_config=SandboxConfig(max_output_bytes="1G"))
            time.sleep(1.5)  # nobody reads: the daemon buffers what the bound lets it
            assert k.poll() is None, "the child wrote all 64 MiB: nothing held it back"
            assert rss_bytes(dpid) - before < 48 << 20, (before, rss_bytes(dpid))
            total = 0
            while chunk := k.stdout.read(1 << 20):
                total += len(chunk)
            assert total == 64 << 20
            assert k.wait(timeout=60).returncode == 0
            k.stderr.close()


def _hold_pipe_lock(fd: int, end: str = "read"):
    """Take the mutex of the pipe ``fd`` is an end of and keep it, from a thread: splice from the
    read end into a unix socket whose buffer is already full (once a byte arrives the kernel holds
    the mutex while it waits for room), or from an empty socket into the write end (it holds the
    mutex while it waits for data). Anyone else who reads, writes, opens or finally closes that
    pipe then waits for the mutex too, however O_NONBLOCK their end is. Returns a function that
    lets go (it closes the socket's far end)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    if end == "read":
        a.setblocking(False)
        try:
            while True:
                a.send(b"x" * 65536)
        except BlockingIOError:
            pass
        a.setblocking(True)
    src, dst = (fd, a.fileno()) if end == "read" else (a.fileno(), fd)
    started = threading.Event()
    tid: list[int] = []

    def splicer() -> None:
        tid.append(threading.get_native_id())
        started.set()
        try:
            os.splice(src, dst, 1 << 16)
        except OSError:
            pass

    t = threading.Thread(target=splicer, daemon=True)
    t.start()
    started.wait()
    _until_blocked_in_splice(tid[0])  # (which takes the mutex before it waits)

    def release() -> None:
        b.close()  # EPIPE, or EOF: the splice returns and drops the mutex
        t.join(10)
        a.close()
        assert not t.is_alive()
    return release


_SPLICE = {"x86_64": 275, "aarch64": 76}.get(os.uname().machine)  # (the syscall's number)


def _until_blocked_in_splice(tid: int) -> None:
    """Until thread ``tid`` of this process sleeps in splice(2) (its /proc syscall file names
    the call while it is blocked in one): started alone, it could still be on its way under
    load, and a close the test counts on being held went through (a CI-like run failed so)."""
    deadline = time.monotonic() + 10
    while _SPLICE is not None and time.monotonic() < deadline:
        try:
            with open(f"/proc/self/task/{tid}/syscall") as f:
                if f.read().split()[0] == str(_SPLICE):
                    return
        except (OSError, IndexError):
            pass
        time.sleep(0.002)
    time.sleep(0.2)  # (another machine, or it never got there: as before)


def _send_with_fds(conn, msg, fds: list[int], declared: int | None = None, between=None) -> None:
    """``msg`` with ``fds`` attached; with ``between``, the fds go with the frame's first byte,
    ``between()`` runs, and then the rest is sent (the daemon cannot act on the frame before)."""
    frame = conn.P.encode(msg, len(fds) if declared is None else declared)
    cut = 1 if between is not None else len(frame)
    rights = array.array("i", fds).tobytes()
    conn.sock.sendmsg([frame[:cut]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
    if between is not None:
        between()
        conn.sock.sendall(frame[cut:])


def _pin_close_threads(conn, pipes: list[int], releases: list) -> None:
    """Stick every close thread (4) of ``conn``'s uid: send the daemon the last write end of
    each of 4 pipes whose lock this process holds. Read ends go into ``pipes``, the functions
    that let go into ``releases``."""
    for _ in range(4):
        r, w = os.pipe()
        pipes.append(r)
        os.write(w, b"x")
        releases.append(_hold_pipe_lock(r))
        # Ours is closed before the daemon can act on its copy, so its close is the last one,
        # which waits for the lock. (Sent whole, a quick daemon could close first, and then our
        # close, the last, waited for our own lock for ever.)
        _send_with_fds(conn, conn.P.Status(1), [w], between=lambda w=w: os.close(w))


def _unread(sock: socket.socket) -> int:
    """Bytes sent on the unix stream socket ``sock`` that its peer has not read yet (SIOCOUTQ)."""
    import fcntl
    import termios
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


def _fds_naming(pid: int, target: str) -> list[str]:
    """``pid``'s fds whose link reads ``target`` (e.g. "pipe:[1234]")."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                out.append(fd)
        except OSError:
            pass
    return out


def _answers(sock_path: str, timeout: float) -> bool:
    """Whether a new connection to the daemon gets a status reply within ``timeout``."""
    from conftest import RawConn
    from zygote_client import _protocol as P
    out: list[object] = []

    def ask() -> None:
        conn = RawConn(sock_path)
        try:
            conn.send(P.Hello(P.VERSION))
            conn.reply()
            conn.send(P.Status(1))
            out.append(conn.reply())
        finally:
            conn.sock.close()

    t = threading.Thread(target=ask, daemon=True)
    t.start()
    t.join(timeout)
    return bool(out)


@pytest.mark.parametrize("mode", ["relay", "fds", "detached", "ended"])
def test_SECURITY_a_client_holding_its_pipes_lock_stalls_only_its_output(socket_daemon, mode):
    """A client can pin a pipe's mutex (splice from it into a full socket). The daemon writes
    into the pipes a client reads (counted output, a detached child's tap), reopens a client's
    own pipe (stdio="fds" with max_output_bytes) and closes its ends of them ("ended": the child
    exits, the relay's last close of its write end waits for the mutex): done on its event loop,
    each of those would wait for that mutex, and every other client with it."""
    n = 1 if mode == "ended" else 600

    def drip():
        import sys
        import time
        for _ in range(n):
            sys.stdout.write("d" * 100 + "\n")
            sys.stdout.flush()
            time.sleep(0.01)

    cfg = SandboxConfig(max_output_bytes="1M", timeout=60)
    keep: list[int] = []
    release = None
    try:
        with Client.connect(socket_daemon) as c:
            if mode == "fds":
                null = os.open(os.devnull, os.O_RDWR)
                r, w = os.pipe()
                er, ew = os.pipe()
                keep += [null, r, w, er, ew]
                os.write(w, b"x")  # the splice takes this byte, then waits with the mutex held
                release = _hold_pipe_lock(r)
                time.sleep(0.2)
                spawned: list[object] = []
                t = threading.Thread(target=lambda: spawned.append(c.spawn_child(
                    drip, stdin=None, _stdio_fds=(null, w, ew), sandbox_config=cfg)), daemon=True)
                t.start()
                time.sleep(1)
            else:
                k = c.spawn_child(drip, stdin=None, sandbox_config=cfg, detached=mode == "detached")
                release = _hold_pipe_lock(k.stdout.fileno())
                time.sleep(1)  # more output arrives: the daemon's writes meet the held mutex
            assert _answers(socket_daemon, 10), "the daemon froze on a pipe whose lock a client held"
            release()
            release = None
            if mode == "fds":
                t.join(30)
                spawned[0].kill()
            else:
                k.kill()
            assert _answers(socket_daemon, 10)
    finally:
        if release is not None:
            release()
        for fd in keep:
            os.close(fd)


def test_SECURITY_a_client_fd_whose_pipe_lock_is_held_is_closed_off_the_loop(socket_daemon):
    """Any fd a client sends may be the last reference to a pipe's write end whose read end the
    client pins (splice into a full socket): the daemon's close of it waits for the mutex. Sent
    with a request that takes no fds, it is closed at once; that must not stop the daemon."""
    from conftest import RawConn
    from zygote_client import _protocol as P

    r, w = os.pipe()
    os.write(w, b"x")  # the splice takes it and waits for room with the mutex held
    release = _hold_pipe_lock(r)
    conn = RawConn(socket_daemon)
    try:
        conn.send(P.Hello(P.VERSION))
        conn.reply()
        _send_with_fds(conn, P.Status(1), [w], between=lambda: os.close(w))  # (see _pin_close_threads)
        w = -1
        time.sleep(0.5)
        assert _answers(socket_daemon, 10), "the daemon froze closing a client's fd"
    finally:
        release()
        conn.sock.close()
        os.close(r)
        if w >= 0:
            os.close(w)


def test_SECURITY_closes_piling_up_for_one_uid_stop_only_that_uid(shared_dir):
    """A uid that pins the locks of the pipes whose fds it sends ties up its own worker threads
    (4), and the closes behind them wait. Past 256 fds waiting, the daemon stops reading that
    uid's connections (what it sends stays in flight, on its account) instead of collecting its
    fds until the daemon runs out; other uids are served all along, and the uid again once it
    lets go, every request answered."""
    from conftest import RawConn, config_daemon, run_as
    from zygote_client import _protocol as P

    releases = []
    pipes = []
    null = os.open(os.devnull, os.O_RDONLY)
    with config_daemon(shared_dir, """
            socket_mode = "0660"
            socket_group = 4242
            allowed_uids = [4001]
            """) as sock:
        conn = RawConn(sock)
        try:
            conn.send(P.Hello(P.VERSION))
            conn.reply()
            _pin_close_threads(conn, pipes, releases)
            for i in range(66):  # 264 more fds to close, queued behind those
                dups = [os.dup(null) for _ in range(4)]
                _send_with_fds(conn, P.Status(2 + i), dups)
                for fd in dups:
                    os.close(fd)
            time.sleep(1)
            assert not _answers(sock, 2), "the daemon went on reading a uid whose closes piled up"

            def other() -> str:
                c = RawConn(sock)
                c.send(c.P.Hello(c.P.VERSION))
                c.reply()
                c.send(c.P.Status(1))
                return type(c.reply()).__name__
            assert run_as(4001, 4242, other) == "StatusReply"
            # (not just slow: its loop served the other uid, and our requests are still unread)
            assert _unread(conn.sock) > 0, "the daemon read the paused uid's requests"
            for release in releases:
                release()
            releases = []
            assert _answers(sock, 20)
            for _ in range(70):
                assert isinstance(conn.reply(), P.StatusReply)
        finally:
            for release in releases:
                release()
            conn.sock.close()
            for fd in pipes + [null]:
                os.close(fd)


@pytest.mark.parametrize("which", ["result", "counted-stdout"])
def test_SECURITY_a_payload_handing_its_pipe_to_a_client_cannot_freeze_the_daemon(graced_daemon, which):
    """A child cannot splice (seccomp), but its payload can pass its end of a pipe the daemon
    reads (the result pipe, fd 5; its stdout when the daemon counts it) over a unix socket to a
    process that can, which then holds that pipe's mutex (splice from an empty socket into it)
    and keeps it open. The child's exit is still reported (no EOF will come: what was in the
    pipe at the exit is all there is), and the daemon's last close of its end, when it gives up
    on the pipe, does not wait on its loop."""
    socket_daemon = graced_daemon

    def leak(fd):
        import os
        import socket
        import time
        socket.send_fds(socket.socket(fileno=0), [b"p"], [fd])
        time.sleep(0.5)
        os._exit(0)

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    release = None
    leaked = -1
    cfg = SandboxConfig(max_output_bytes="1M", timeout=60) if which == "counted-stdout" else None
    try:
        with Client.connect(socket_daemon) as c:
            daemon = c.welcome.daemon_pid
            k = c.spawn_child(leak, (5 if which == "result" else 1,), stdin=None,
                              _stdio_fds=(theirs.fileno(), out_w, err_w), sandbox_config=cfg)
            ours.settimeout(30)
            _, fds, _, _ = socket.recv_fds(ours, 10, 1)
            leaked = fds[0]
            pipe = f"pipe:[{os.fstat(leaked).st_ino}]"
            assert _fds_naming(daemon, pipe), "the daemon does not read that pipe (the test is moot)"
            release = _hold_pipe_lock(leaked, "write")
            assert k.wait(timeout=15).returncode == 0, "a leaked result pipe kept the exit unreported"
        # The daemon gives up on the pipe (2 s after the exit; a relay RELAY_GRACE, 1 s here, after its
        # connection closed) and closes its end while we hold the mutex: the close is the last
        # reference, so it waits, and must not wait on the loop.
        deadline = time.monotonic() + 30
        while _fds_naming(daemon, pipe) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _fds_naming(daemon, pipe), "the daemon never let go of the pipe (the test is moot)"
        assert _answers(socket_daemon, 10), "the daemon froze on a pipe a payload handed out"
    finally:
        if release is not None:
            release()
        for fd in (out_r, out_w, err_r, err_w) + ((leaked,) if leaked >= 0 else ()):
            os.close(fd)
        ours.close()
        theirs.close()


@pytest.mark.parametrize("how", ["unread-at-close", "more-than-fit"])
def test_SECURITY_fds_the_daemon_never_takes_are_released_off_the_loop(socket_daemon, how):
    """Fds a client sent that the daemon never read go when the daemon releases its socket, and
    fds beyond what the daemon's recvmsg has room for are closed by the kernel inside that call:
    either may be the last reference to a pipe whose mutex the client holds, so neither may
    happen on the loop thread. (unread-at-close: requests whose replies the client never reads
    until the daemon's sends stall, then a frame with the fd, then the client goes.)"""
    from conftest import RawConn
    from zygote_client import _protocol as P

    r, w = os.pipe()
    os.write(w, b"x")
    release = _hold_pipe_lock(r)
    conn = RawConn(socket_daemon)
    nulls = [os.open(os.devnull, os.O_RDONLY) for _ in range(6)]
    try:
        conn.send(P.Hello(P.VERSION))
        conn.reply()
        if how == "unread-at-close":
            # Far more replies than the daemon's send buffer holds, in one send (one skb per
            # 64 KiB, where a send per request would fill our own send buffer with skb overhead
            # before a slow daemon read them): its replies stall, the rest waits unread.
            conn.sock.sendall(bytes(P.encode(P.Status(1))) * 1500)
            time.sleep(0.5)
            _send_with_fds(conn, P.Status(1), [w], between=lambda: os.close(w))  # (see _pin_close_threads)
        else:  # 7 fds; a frame has at most 4
            _send_with_fds(conn, P.Status(1), nulls + [w], declared=4, between=lambda: os.close(w))
        w = -1
        if how == "unread-at-close":
            conn.sock.close()  # the daemon's stalled send fails: it ends the connection
        time.sleep(0.5)
        assert _answers(socket_daemon, 10), "the daemon froze releasing a client's fd"
    finally:
        release()
        conn.sock.close()
        for fd in [r] + nulls + ([w] if w >= 0 else []):
            os.close(fd)


class _TinyFuse:
    """A FUSE filesystem with one empty file, ``f``, served from a thread of the test (root
    mounts it straight through /dev/fuse: no libfuse). Enough to open the file; the daemon must
    refuse it as a child's stdio without ever asking the server anything."""

    LOOKUP, FORGET, GETATTR, OPEN, RELEASE, FLUSH, INIT, BATCH_FORGET = 1, 2, 3, 14, 18, 25, 26, 42

    def __init__(self, where: str, allow_other: bool = False, owner: int = 0) -> None:
        import ctypes
        self.mnt = where
        self.stall = threading.Event()  # set: FLUSH requests get no answer (until close)
        self.mute = threading.Event()  # set: no request gets an answer (until close)
        self.deaf = threading.Event()  # set: no request is even read (they wait in the kernel)
        self.unanswered: list[int] = []  # (answered with EIO at close)
        self.dev = os.open("/dev/fuse", os.O_RDWR)
        opts = (f"fd={self.dev},rootmode=40000,user_id={owner},group_id={owner}"
                f"{',allow_other' if allow_other else ''}").encode()
        self._libc = ctypes.CDLL(None, use_errno=True)
        if self._libc.mount(b"zg-test-fuse", where.encode(), b"fuse", 0, opts) != 0:
            os.close(self.dev)
            pytest.skip(f"cannot mount a FUSE filesystem here (errno {ctypes.get_errno()})")
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @staticmethod
    def _attr(ino: int, mode: int) -> bytes:
        return struct.pack("<6Q4I6I", ino, 0, 0, 0, 0, 0, 0, 0, 0, mode, 1, 0, 0, 0, 4096, 0)

    def _serve(self) -> None:
        import stat
        import select
        while True:
            if self.closing.is_set():
                return
            if not select.select([self.dev], [], [], 0.05)[0] or self.deaf.is_set():
                continue
            try:
                req = os.read(self.dev, 1 << 20)
            except OSError:
                return  # unmounted
            _, op, unique, node = struct.unpack_from("<IIQQ", req)
            if op in (self.FORGET, self.BATCH_FORGET):
                continue  # no reply to these
            if self.mute.is_set() or (op == self.FLUSH and self.stall.is_set()):
                self.unanswered.append(unique)  # the caller waits until close
                continue
            body, err = b"", 0
            if op == self.INIT:
                body = struct.pack("<4I2H2I2H2I", 7, 31, 0, 0, 16, 12, 65536, 1, 32, 0, 0, 0) + bytes(24)
            elif op == self.LOOKUP:
                body = struct.pack("<4Q2I", 2, 0, 1, 1, 0, 0) + self._attr(2, stat.S_IFREG | 0o644)
            elif op == self.GETATTR:
                mode = stat.S_IFDIR | 0o755 if node == 1 else stat.S_IFREG | 0o644
                body = struct.pack("<Q2I", 1, 0, 0) + self._attr(node, mode)
            elif op == self.OPEN:
                body = struct.pack("<QIi", 1, 0, 0)
            elif op not in (self.FLUSH, self.RELEASE):
                err = -38  # ENOSYS
            try:
                os.write(self.dev, struct.pack("<IiQ", 16 + len(body), err, unique) + body)
            except OSError:
                return

    def answer_unanswered(self) -> None:
        """Whoever waits gets EIO."""
        while self.unanswered:
            try:
                os.write(self.dev, struct.pack("<IiQ", 16, -5, self.unanswered.pop()))
            except OSError:
                pass

    def close(self) -> None:
        self.answer_unanswered()
        self.closing.set()
        self._libc.umount2(self.mnt.encode(), 2)  # MNT_DETACH
        self.thread.join(5)  # (then the fd closes: the thread never reads another that took its number)
        os.close(self.dev)


@pytest.mark.parametrize("named", ["plainly", "as-a-memfd"])
def test_SECURITY_a_file_on_fuse_is_refused_as_a_childs_stdio(socket_daemon, tmp_path, named):
    """Every close of a file on a FUSE mount asks its server (FLUSH), and a server that never
    answers makes the close wait for ever, SIGKILL or not. The pool's zygote closes its copies of
    a request's stdio fds: given such a file it was lost, and every user's spawns with it. The
    daemon refuses FUSE files (and files on mounts it cannot see) as stdio. "as-a-memfd": a
    file whose path reads like a memfd's ("/memfd:..."; a user makes one in a mount namespace
    of its own) was taken for one, unchecked (a helper's review held a zygote in its close)."""
    from zygote_client import DaemonError

    where = tmp_path / "fuse" if named == "plainly" else Path(f"/memfd:zg-test-{os.getpid()}")
    where.mkdir()
    try:
        fs = _TinyFuse(str(where))
    except BaseException:
        where.rmdir()
        raise
    try:
        fd = os.open(where / "f", os.O_RDONLY)
        out_r, out_w = os.pipe()
        try:
            with Client.connect(socket_daemon) as c:
                with pytest.raises(DaemonError) as e:
                    c.spawn_child(print, stdin=None, _stdio_fds=(fd, out_w, out_w))
                assert e.value.code == "bad-request" and "stdin fd is on a FUSE mount" in str(e.value)
                assert c.call(lambda: 2) == 2
        finally:
            for x in (fd, out_r, out_w):
                os.close(x)
    finally:
        fs.close()
        where.rmdir()


def test_a_zygote_held_in_the_kernel_at_its_death_is_replaced_anyway(tmp_path, monkeypatch):
    """A zygote whose exit closes a file on a file system that stopped answering (a FUSE
    server's FLUSH, an NFS server) stays in the kernel, SIGKILL or not, and the pool waited for
    it before starting another: nobody's spawns were served until the file system came back (a
    helper's review). Its replacement now starts after STUCK_ZYGOTE_WAIT, and the stuck one is
    reaped when it goes. Here the first zygote's preload keeps a FUSE file open, the FUSE server stops
    answering FLUSH, and the zygote is killed: neither its pidfd nor its socket says so (it has
    not exited, and closes its fds in order), so the daemon finds out when a clone goes
    unanswered (CLONE_REPLY_TIMEOUT; here 1 s instead of 30, and STUCK_ZYGOTE_WAIT 1 s instead of 5)."""
    from zygote_client import DaemonError
    from conftest import start_daemon, stop_daemon, wait_socket, write_text

    where = tmp_path / "fuse"
    where.mkdir()
    fs = _TinyFuse(str(where))
    try:
        once = tmp_path / "opened"  # (only the first zygote holds it: a child closes what it inherits)
        (tmp_path / "zg_holds_fuse.py").write_text(
            f"import os\nif not os.path.exists({str(once)!r}):\n"
            f"    held = open({str(where / 'f')!r})\n    open({str(once)!r}, 'w').close()\n")
        sock = str(tmp_path / "z.sock")
        cfg = write_text(tmp_path / "z.toml", f"""
            [daemon]
            socket = "{sock}"
            [pools.default]
            preload = ["zg_holds_fuse"]
            reserve = 0
            env = {{PATH = "/usr/bin:/bin", PYTHONPATH = "{tmp_path}"}}
            """)
        monkeypatch.setenv("ZYGOTE_TEST_CLONE_REPLY_TIMEOUT", "1")
        monkeypatch.setenv("ZYGOTE_TEST_STUCK_ZYGOTE_WAIT", "1")
        proc = start_daemon("--config", cfg, "--test-hooks")
        try:
            wait_socket(sock, proc)
            with Client.connect(sock) as c:
                zygotes = [p for p, _ in children_of(proc.pid) if b"zygote._zygote" in cmdline(p)]
                assert len(zygotes) == 1, zygotes
                fs.stall.set()
                os.kill(zygotes[0], signal.SIGKILL)  # (the test's own daemon's zygote)
                time.sleep(0.5)
                with open(f"/proc/{zygotes[0]}/stat") as f:
                    assert f.read().rsplit(")", 1)[1].split()[0] == "D"  # held in its FLUSH
                deadline = time.monotonic() + 20
                while True:
                    try:
                        assert c.run(print, ("served",)).stdout == b"served\n"
                        break
                    except DaemonError as e:
                        assert e.code == "retry", e
                        assert time.monotonic() < deadline, "the pool was not served while its zygote was stuck"
                        time.sleep(0.2)
                fs.stall.clear()
                fs.answer_unanswered()
                deadline = time.monotonic() + 10
                while os.path.exists(f"/proc/{zygotes[0]}") and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert not os.path.exists(f"/proc/{zygotes[0]}"), "the stuck zygote was not reaped once it went"
        finally:
            stop_daemon(proc)
    finally:
        fs.close()


def test_SECURITY_fds_one_uid_can_leave_in_the_daemon_are_bounded(socket_daemon):
    """With the uid's close threads stuck on pipe locks it holds, the fds it sends pile up in the
    daemon waiting for a close. Connections already waiting in recvmsg each took one more
    message of up to 253 fds past the pause: a hundred of them ran the daemon out of fds (and
    at EMFILE the kernel drops received fds inside recvmsg, on the loop). The daemon now holds
    at most 1024 of one uid's fds, counting room for the next message before each receive."""
    from conftest import RawConn
    from zygote_client import _protocol as P

    dpid = _daemon_of(socket_daemon)
    releases, pipes, conns = [], [], []
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        for _ in range(8):  # idle connections, waiting in recvmsg
            c = RawConn(socket_daemon)
            c.send(P.Hello(P.VERSION))
            c.reply()
            conns.append(c)
        base = fd_count(dpid)
        stuck = RawConn(socket_daemon)
        conns.append(stuck)
        stuck.send(P.Hello(P.VERSION))
        stuck.reply()
        _pin_close_threads(stuck, pipes, releases)
        time.sleep(0.5)
        for c in conns[:8]:  # 8 x 200 fds: 1600 the daemon would hold
            dups = [os.dup(null) for _ in range(200)]
            _send_with_fds(c, P.Status(1), dups, declared=4)
            for fd in dups:
                os.close(fd)
        time.sleep(1.5)
        held = fd_count(dpid) - base
        assert held <= 1024 + 16, f"the daemon holds {held} more fds for one uid"
    finally:
        for release in releases:
            release()
        for c in conns:
            c.sock.close()
        for fd in pipes + [null]:
            os.close(fd)
    deadline = time.monotonic() + 20
    while fd_count(dpid) > base + 8 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert fd_count(dpid) <= base + 8, "the fds were not let go once the locks were"


def test_SECURITY_signalling_a_child_stuck_in_exec_does_not_stop_the_daemon(socket_daemon, tmp_path):
    """Signalling a child whose payload is PID 1 reads its /proc state first, and a read of
    /proc/PID/syscall waits for the child's exec lock. An execve holds that lock while it closes
    the fds marked close-on-exec: a file on a FUSE mount (here bound into the sandbox) whose
    server does not answer the FLUSH keeps it. The read runs in a worker thread, and past a
    second the signal goes as SIGKILL; done on the loop, it stopped the daemon."""
    import signal as _signal

    where = tmp_path / "fuse"
    where.mkdir()
    fs = _TinyFuse(str(where), allow_other=True)
    closed = False
    try:
        def exec_holding_fuse():
            import os
            fd = os.open("/fz/f", os.O_RDONLY)
            os.set_inheritable(fd, False)
            print("open", flush=True)
            os.execv("/bin/true", ["/bin/true"])

        with Client.connect(socket_daemon) as c:
            fs.stall.set()
            k = c.spawn_child(exec_holding_fuse, stdin=None, sandbox_config=SandboxConfig(
                ro_binds={str(where): "/fz"}, timeout=60))
            assert k.stdout.readline() == b"open\n"
            time.sleep(0.5)  # in execve, waiting for the FLUSH
            sent = threading.Thread(target=k.send_signal, args=(_signal.SIGTERM,), daemon=True)
            sent.start()
            time.sleep(0.3)
            assert _answers(socket_daemon, 5), "the daemon froze signalling a child stuck in exec"
            sent.join(10)  # answered once the probe gave up (1 s) and SIGKILL was sent
            assert not sent.is_alive()
            fs.close()  # the FLUSH fails, and the exec ends in the SIGKILL waiting for it
            closed = True
            assert k.wait(timeout=30).returncode == -_signal.SIGTERM
    finally:
        if not closed:
            fs.close()


def test_SECURITY_a_bind_on_a_filesystem_that_never_answers_does_not_stop_the_daemon(socket_daemon, tmp_path):
    """The daemon looks at a request's bind sources on the host (exists, realpath, and for
    other users their permissions); a source on a FUSE mount whose server stopped answering
    (or a dead NFS server, an automount) makes those calls wait. They run in a worker thread
    of the client's uid; on the loop they stopped the daemon."""
    from zygote_client import DaemonError, SandboxError

    where = tmp_path / "fuse"
    where.mkdir()
    fs = _TinyFuse(str(where))
    closed = False
    try:
        with Client.connect(socket_daemon) as c:
            fs.mute.set()
            outcome: list[object] = []

            def spawn() -> None:
                try:
                    outcome.append(c.run(print, sandbox_config=SandboxConfig(ro_binds={str(where / "f"): "/x"})))
                except Exception as e:  # noqa: BLE001 - what it was is checked below
                    outcome.append(e)
            t = threading.Thread(target=spawn, daemon=True)
            t.start()
            time.sleep(0.5)
            assert _answers(socket_daemon, 5), "the daemon froze looking at a bind source"
            fs.close()
            closed = True
            t.join(30)
            assert outcome and isinstance(outcome[0], (DaemonError, SandboxError)), outcome
    finally:
        if not closed:
            fs.close()


def test_SECURITY_a_client_s_own_fuse_mount_cannot_hold_the_check_of_its_paths(shared_dir):
    """The check of a client's host paths runs as a process with the client's file-system ids
    but root's real and effective ids. With the client's real ids too, a FUSE mount of the
    client's own (no allow_other) let it in, and a server that never answers held it in the
    kernel where SIGKILL does not reach: the daemon's worker thread waited for it without end (a
    helper's review). Now FUSE refuses it at once, as it refuses the child that opens sources as
    root; the client cannot signal or trace it either."""
    from zygote import policy
    where = os.path.join(shared_dir, "fuse")
    os.mkdir(where)
    fs = _TinyFuse(where, owner=4001)
    fs.mute.set()
    outcome: list[object] = []

    def check() -> None:
        try:
            outcome.append(policy.check_peer_paths(SandboxConfig(ro_binds={os.path.join(where, "f"): "/x"}),
                                                   SandboxConfig(), 4001, 4001))
        except policy.PolicyError as e:
            outcome.append(e)
    try:
        t = threading.Thread(target=check, daemon=True)
        t.start()
        t.join(5)
        assert outcome, "the check was held by the client's file system"
        assert "uid 4001 may not read" in str(outcome[0]), outcome
    finally:
        fs.close()
        t.join(30)


def _checker_workers(server: int) -> list[int]:
    try:
        with open(f"/proc/{server}/task/{server}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def test_SECURITY_a_check_held_by_a_file_system_ends_and_the_checks_go_on(shared_dir, monkeypatch):
    """The check of a client's paths runs in a worker forked by one long-lived server per
    daemon process. A worker waiting on a file system (a FUSE mount with allow_other: the
    worker's fs ids may enter) is ended by its own timer: SIGALRM at its default action is as
    fatal as SIGKILL while the request waits in the kernel, whatever the daemon's thread that
    started the server had blocked or ignored. One whose request the FUSE server took and never
    answers cannot be ended by any signal: meanwhile the check server goes on answering other
    checks, the uid's checks are refused once MAX_HELD_CHECKS of its own are held (no pile of
    root processes), and the worker goes once the file system does. A server that died is
    started again; one that stopped forking is replaced."""
    from zygote import policy
    where = os.path.join(shared_dir, "fuse")
    os.mkdir(where)
    fs = _TinyFuse(where, allow_other=True)
    monkeypatch.setattr(policy, "CHECK_TIMEOUT", 1.5)
    monkeypatch.setattr(policy, "MAX_HELD_CHECKS", 1)
    plain = SandboxConfig(ro_binds={shared_dir: "/x"})

    def on_fuse(name: str) -> SandboxConfig:  # (a new name each time: the kernel caches a lookup for 1 s)
        return SandboxConfig(ro_binds={os.path.join(where, name): "/x"})

    def workers_gone(within: float) -> bool:
        deadline = time.monotonic() + within
        while _checker_workers(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        return not _checker_workers(server)
    policy.stop_checker()
    ignored = signal.signal(signal.SIGALRM, signal.SIG_IGN)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    try:
        assert policy.check_peer_paths(on_fuse("f"), SandboxConfig(), 4001, 4001)  # (it answers; the server starts)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        signal.signal(signal.SIGALRM, ignored)
    server = policy._checker[0].pid
    try:
        for stop in (fs.deaf, fs.mute):
            stop.set()
            t0 = time.monotonic()
            with pytest.raises(policy.PolicyError, match="took over 1.5 s"):
                policy.check_peer_paths(on_fuse("deaf" if stop is fs.deaf else "mute"), SandboxConfig(), 4001, 4001)
            assert time.monotonic() - t0 < 5
            if stop is fs.deaf:  # the request still waits in the kernel: the timer ends the worker
                assert workers_gone(5), "the worker waiting on the file system is still there"
                fs.deaf.clear()
            else:  # the FUSE server holds the request: the worker waits, the checks go on
                assert _checker_workers(server)
                assert shared_dir in policy.check_peer_paths(plain, SandboxConfig(), 4002, 4002)
                with pytest.raises(policy.PolicyError, match="still held by a file system"):
                    policy.check_peer_paths(plain, SandboxConfig(), 4001, 4001)
                assert policy._checker[0].pid == server
    finally:
        fs.close()
    assert workers_gone(10), "the worker is still there after its file system went"
    assert shared_dir in policy.check_peer_paths(plain, SandboxConfig(), 4001, 4001)
    os.kill(server, signal.SIGKILL)
    policy._checker[0].wait(10)
    assert shared_dir in policy.check_peer_paths(plain, SandboxConfig(), 4001, 4001)
    assert policy._checker[0].pid != server
    server = policy._checker[0].pid
    monkeypatch.setattr(policy, "SERVER_TIMEOUT", 0.5)
    os.kill(server, signal.SIGSTOP)
    with pytest.raises(policy.PolicyError, match="no answer from its server, which was replaced"):
        policy.check_peer_paths(plain, SandboxConfig(), 4001, 4001)
    assert shared_dir in policy.check_peer_paths(plain, SandboxConfig(), 4001, 4001)
    assert policy._checker[0].pid != server
    policy.stop_checker()
    assert policy._checker is None


def test_SECURITY_a_held_check_counts_even_where_pidfd_open_is_refused(monkeypatch):
    """A timed-out check's worker counts against its uid while it lives. Where pidfd_open is
    refused (a seccomp profile older than it), it counted as gone, and the cap on held checks
    was off; now its pid and start time stand in."""
    from zygote import policy
    monkeypatch.setattr(policy, "MAX_HELD_CHECKS", 1)

    def refused(pid):
        raise PermissionError(1, "Operation not permitted")
    proc = subprocess.Popen(["sleep", "60"])
    try:
        monkeypatch.setattr(policy.os, "pidfd_open", refused)
        policy._hold(4011, proc.pid)
        monkeypatch.undo()
        monkeypatch.setattr(policy, "MAX_HELD_CHECKS", 1)
        with pytest.raises(policy.PolicyError, match="still held by a file system"):
            policy._check_held(4011)
        policy._check_held(4012)  # (another uid's checks go on)
    finally:
        proc.kill()
        proc.wait()
    policy._check_held(4011)
    assert 4011 not in policy._held


def test_host_paths_too_long_or_checked_after_the_final_stop_are_refused_plainly(monkeypatch, shared_dir):
    """A path of PATH_MAX bytes or more (1500 characters of 3 bytes pass the config's count of
    characters) is refused before any walk, with its reason (a request
    of 256 such paths overran the worker's request size and came back as "Broken pipe"); after
    the daemon's final stop_checker no check starts a new server."""
    from zygote import policy
    with pytest.raises(policy.PolicyError, match="4096 bytes long or longer"):
        policy.check_peer_paths(SandboxConfig(ro_binds={"/" + "\u20ac" * 1500: "/x"}), SandboxConfig(), 4001, 4001)
    monkeypatch.setattr(policy, "_closed", False)  # (restored after the test: other tests check paths)
    policy.stop_checker(final=True)
    with pytest.raises(policy.PolicyError, match="shutting down"):
        policy.check_peer_paths(SandboxConfig(ro_binds={shared_dir: "/x"}), SandboxConfig(), 4001, 4001)
    assert policy._checker is None


def test_a_request_naming_too_many_host_paths_is_refused_before_any_walk():
    from zygote import policy
    cfg = SandboxConfig(ro_binds={f"/nonexistent/{i}": f"/x{i}" for i in range(policy.MAX_HOST_PATHS + 1)})
    with pytest.raises(policy.PolicyError, match="at most 256 host paths"):
        policy.check_peer_paths(cfg, SandboxConfig(), 4001, 4001)


def test_SECURITY_a_uid_paused_for_its_fds_is_served_again_once_its_connections_go(socket_daemon):
    """fds in frames a client never finishes count as held for its uid. A uid paused for them
    stayed paused for ever: every paused connection waited to read again, and only reading sees
    the EOF that frees what it holds. A paused connection whose peer went ends now, and the
    uid is served again."""
    from zygote_client import _protocol as P

    null = os.open(os.devnull, os.O_RDONLY)
    conns = []
    try:
        frame = bytes(P.encode(P.Status(1), 4))
        for _ in range(100):  # 8 fds each in an unfinished frame: 800 held
            s = socket.socket(socket.AF_UNIX)
            s.connect(socket_daemon)
            conns.append(s)
            s.sendall(bytes(P.encode(P.Hello(P.VERSION))))
            s.settimeout(2)
            try:
                if not s.recv(1 << 16):
                    break
            except TimeoutError:  # paused already
                break
            dups = [os.dup(null) for _ in range(8)]
            s.sendmsg([frame[:5]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", dups).tobytes())])
            for fd in dups:
                os.close(fd)
        time.sleep(0.5)
        for s in conns:
            s.close()
        conns = []
        assert _answers(socket_daemon, 10), "the uid stayed paused after its connections went"
    finally:
        for s in conns:
            s.close()
        os.close(null)


def test_SECURITY_a_hostile_workspace_does_not_hold_up_the_daemon(socket_daemon):
    """A workspace built by hand skips the client's checks; the daemon's own may take a while on
    up to 100000 entries of up to 64 components (16 MiB of names), in a worker thread: every
    other client is served meanwhile. (On the loop, with the checks quadratic in a path's depth,
    a 4 MB request held every client for 90 s.) The workspace: 63 nested directories and 99936
    files in the deepest, whose check takes ~3 s here (an earlier version's was refused by a
    budget after 0.03 s, and the test passed with the check on the loop: a helper's audit)."""
    from zygote_client import Workspace, WorkspaceError
    from zygote_client._workspace import Entry

    entries = [Entry("/".join(["d"] * k), "dir") for k in range(1, 64)]
    deepest = "/".join(["d"] * 63)
    entries += [Entry(f"{deepest}/f{i:05d}", "file", 0o644, b"") for i in range(99_999 - 64)]
    entries.append(Entry(".env", "file", 0o644, b"T=1"))  # refused last: no child is made
    done: list[object] = []

    def attacker() -> None:
        with Client.connect(socket_daemon) as c:
            try:
                c.run(print, sandbox_config=SandboxConfig(workspace=Workspace(entries=tuple(entries),
                                                                              max_files=100_000)))
            except Exception as e:  # noqa: BLE001
                done.append(e)
    t = threading.Thread(target=attacker)
    t.start()
    try:
        time.sleep(0.8)  # its frame arrived; the checks are under way
        assert _answers(socket_daemon, 1.5), "the daemon stopped serving others while checking a workspace"
    finally:
        t.join(120)
    assert len(done) == 1 and isinstance(done[0], WorkspaceError), done  # (a budget, or the .env)


@pytest.mark.parametrize("detached", [False, True])
def test_SECURITY_relays_of_single_byte_writes_are_paced(client, detached):
    """The daemon relays a child's output itself when it counts it (max_output_bytes) or keeps
    it (detached): one read through a worker thread and one write per chunk, on CPU nobody's
    cgroup pays for. A child writing single bytes made a chunk of each (six such children at
    cpu=0.2 took a whole core of the daemon). After a short read a relay now waits detach.PACE:
    the small chunks the reader sees are at most about (seconds it read) / PACE. (A relay that
    fell behind on a busy host reads 4 KiB or more at a time and does not wait: those are not
    counted.)"""
    from zygote.detach import PACE
    seconds = 1.5

    def dribble(seconds: float) -> None:
        import os
        import time
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            os.write(1, b"x")
    child = client.spawn_child(dribble, (seconds,), stdin=None, detached=detached,
                               sandbox_config=SandboxConfig(max_output_bytes="64M", timeout=30))
    fd = child.stdout.fileno()
    chunks = small = size = 0
    t0 = time.monotonic()
    while True:
        data = os.read(fd, 1 << 20)  # (a reader faster than the relay: one read per chunk it wrote)
        if not data:
            break
        chunks += 1
        small += len(data) < 4096  # (detach.PACE_BELOW)
        size += len(data)
    took = time.monotonic() - t0
    assert child.wait(timeout=30).returncode == 0
    assert size > 20 * chunks, (size, chunks)  # many bytes per chunk: the child wrote them one by one
    assert small <= took / PACE * 1.2 + 20, (small, chunks, size, took)


def test_output_past_the_limit_is_flagged_when_the_exit_comes_first(monkeypatch):
    """max_output_bytes is counted by the daemon's relay as it reads. A relay held back (the
    uid's unread output at RELAYED_PER_UID: another child of its client nobody reads) had not
    read what the payload wrote past the limit into a pipe it had made large, when the exit was
    reported: output_exceeded came back False, and the output was cut later, unflagged (a
    helper's review). The exit report now waits (within EOF_GRACE) until each relay has counted
    all, or judged from what its pipe still holds."""
    from zygote_client import SandboxConfig
    monkeypatch.setenv("ZYGOTE_TEST_RELAYED_PER_UID", str(1 << 20))

    def burst(n, bigpipe):
        import fcntl
        import os
        if bigpipe:
            fcntl.fcntl(1, 1031, 1 << 20)  # F_SETPIPE_SZ
        v = memoryview(b"A" * n)
        while v:
            v = v[os.write(1, v):]
        return "done"
    with Client.embedded(test_hooks=True) as c:
        unread = c.spawn_child(burst, (4 << 20, False), sandbox_config=SandboxConfig(max_output_bytes=100 << 20),
                               stdin=None)
        try:
            time.sleep(1)  # (its relay holds the uid's 1 MiB)
            # Not read until its exit is reported: its relay stops at the uid's budget.
            child = c.spawn_child(burst, (1 << 20, True), sandbox_config=SandboxConfig(max_output_bytes=300_000),
                                  stdin=None)
            status = child.wait(timeout=30)
            out = child.stdout.read()
            assert status.output_exceeded and len(out) == 300_000, (status, len(out))
        finally:
            unread.kill()
            unread.wait()


def _threads_writing(pid: int) -> set[int]:
    """Threads of process ``pid`` inside write(2)/writev(2) (x86_64 numbers) or asleep in a pipe's write."""
    found = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                wchan = f.read()
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                nr = f.read().split()[0]
        except (OSError, IndexError):
            continue
        if "pipe_write" in wchan or nr in ("1", "20"):
            found.add(int(tid))
    return found


def test_SECURITY_no_daemon_thread_sleeps_writing_into_a_pipe_nobody_reads(socket_daemon):
    """The relays into a client's own pipes (stdio="fds") write without blocking and wait for room
    on the event loop: a thread asleep in such a write is a thread every other spawn may wait for.
    Three relays whose pipes nobody reads: no thread of the daemon stays in write(2) for a second.
    (test_SECURITY_a_client_that_never_reads_its_own_fds_stalls_only_its_output hangs instead
    of failing when the writes block: a helper's mutation audit.) Fails with the relay's end
    made blocking."""
    if platform.machine() != "x86_64":
        pytest.skip("x86_64 syscall numbers")

    def chatty():
        import sys
        sys.stdout.write("z" * 300_000)
        sys.stdout.flush()

    null = os.open(os.devnull, os.O_RDWR)
    err_r, err_w = os.pipe()
    readers: list[int] = []
    try:
        with Client.connect(socket_daemon) as c:
            pid = c.status().daemon_pid
            kids = []
            for _ in range(3):  # (fewer than a uid's worker threads: the spawns themselves go on)
                r, w = os.pipe()
                readers.append(r)
                kids.append(c.spawn_child(chatty, stdin=None, _stdio_fds=(null, w, err_w),
                                          sandbox_config=SandboxConfig(max_output_bytes="1M")))
                os.close(w)
            time.sleep(1.0)  # (each pipe is full by now)
            asleep = _threads_writing(pid)
            for _ in range(5):  # the same threads there for a second: asleep in the write
                time.sleep(0.2)
                asleep &= _threads_writing(pid)
            if asleep:  # (their writes end with EPIPE once nobody can read: the teardown goes on)
                for r in readers:
                    os.close(r)
                readers.clear()
            assert not asleep, f"daemon threads {sorted(asleep)} sleep writing into a pipe nobody reads"
            for r in readers:
                os.set_blocking(r, False)
            deadline = time.monotonic() + 30
            while any(k.poll() is None for k in kids) and time.monotonic() < deadline:
                for r in readers:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(r, 1 << 16):
                            pass
                time.sleep(0.05)
            assert [k.wait(timeout=10).returncode for k in kids] == [0, 0, 0]
    finally:
        for fd in readers + [null, err_r, err_w]:
            os.close(fd)


def test_relays_held_back_by_the_rate_are_judged_together(tmp_path):
    """stdout and stderr share max_output_bytes: a child that dies while both its relays wait out
    the client's output budget, each pipe under the cap but both together over it, is flagged
    (each relay judged its own pipe alone: False, and the output cut at the cap unflagged)."""
    from conftest import config_daemon

    def writes():
        import os, time
        os.write(1, b"a" * (20 << 10))  # past the 16K burst: the stdout relay waits
        time.sleep(0.05)
        os.write(2, b"b")  # the stderr relay reads it and waits too
        time.sleep(0.05)
        os.write(1, b"c" * (40 << 10))
        os.write(2, b"d" * (40 << 10))  # 100K + 1 in all, cap 85K

    with config_daemon(tmp_path, 'output_rate_per_client = "16K"\n') as sock, Client.connect(sock) as c:
        child = c.spawn_child(writes, stdin=None, sandbox_config=SandboxConfig(max_output_bytes=85 << 10))
        got = []
        drain = threading.Thread(target=lambda: got.append(len(child.stderr.read())))
        drain.start()
        n = len(child.stdout.read())
        drain.join(timeout=60)
        assert child.wait(timeout=60).output_exceeded
        assert n + got[0] == 85 << 10


def test_a_detached_child_held_back_by_the_rate_still_reports_output_exceeded(tmp_path):
    """As test_a_relay_held_back_by_the_rate_still_reports_output_exceeded, for a detached
    child's pumps: the report must not go out before what its pipes hold is judged."""
    from conftest import config_daemon

    def writes():
        import os, time
        for n in (16 << 10, 64 << 10, 10 << 10):
            os.write(1, b"w" * n)
            time.sleep(0.3)

    with config_daemon(tmp_path, 'output_rate_per_client = "16K"\n') as sock, Client.connect(sock) as c:
        child = c.spawn_child(writes, stdin=None, detached=True,
                              sandbox_config=SandboxConfig(max_output_bytes=85 << 10))
        assert child.wait(timeout=60).output_exceeded
