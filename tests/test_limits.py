"""Limits the daemon and rlimits enforce (cgroup limits: tests/test_cgroup_limits.py)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from zygote_client import SandboxConfig
from conftest import children_of, cmdline, daemon_pid


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


@pytest.mark.parametrize("kind", ["pipe", "socket"])
def test_SECURITY_a_client_that_never_reads_its_own_fds_stalls_only_its_output(socket_daemon, tmp_path, kind):
    """stdio="fds": the daemon relays a child's output into fds the client passed. A client that
    passes pipes and sockets and never reads them must not tie up the daemon's worker threads
    (trio's default limit is 40: cgroup setup for every client's spawns waits on them)."""
    from zygote_client import Client

    def chatty():
        import sys
        sys.stdout.write("z" * 300_000)
        sys.stdout.flush()

    held: list[int] = []
    null = os.open(os.devnull, os.O_RDWR)
    held.append(null)
    try:
        with Client.connect(socket_daemon) as c:
            kids = []
            for _ in range(44):
                if kind == "pipe":
                    r, w = os.pipe()
                else:
                    a, b = socket.socketpair()
                    r, w = a.detach(), b.detach()
                held += [r, w]
                kids.append(c.spawn_child(chatty, stdin=None, _stdio_fds=(null, w, null),
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
            for r in held[1::2]:  # the pipes and sockets got what fits, in order
                data = os.read(r, 4096)
                assert data and set(data) == {ord("z")}
    finally:
        for fd in held:
            os.close(fd)
