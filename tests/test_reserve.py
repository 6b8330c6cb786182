"""The pool reserve: children confined ahead of requests, each used by exactly one request."""

from __future__ import annotations

import os
import time

import pytest

from zygote_client import Client, SandboxConfig, SandboxError

from conftest import children_of, config_daemon, daemon_pid, start_daemon, stop_daemon, wait_socket, write_text


def _boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _pid1_started(then_sleep: float = 0.0):
    """Payload: print when the child's PID 1 (the clone: the payload itself, or its reaper) started, in boot-time
    seconds; then sleep ``then_sleep`` seconds and print "done"."""
    def probe():
        import os
        import time
        with open("/proc/1/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        print(int(fields[19]) / os.sysconf("SC_CLK_TCK"), flush=True)
        if then_sleep:
            time.sleep(then_sleep)
            print("done")
    return probe


@pytest.fixture(scope="module")
def reserve_client():
    with Client.embedded(preload_imports=["json"], daemon_args=["--reserve", "2"]) as c:
        yield c


def _in_own_pidns(pid: int) -> bool:
    """A child (PID 1 of its own pid namespace), not the zygote (same cmdline: children are its clones)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return len(next(line for line in f if line.startswith("NSpid:")).split()) > 2
    except OSError:  # gone since it was listed
        return False


def _wait_reserve(c: Client, n: int) -> list[int]:
    """Pids of the daemon's children waiting in the reserve (not running for any client)."""
    dpid = daemon_pid(c)
    deadline = time.monotonic() + 30
    while True:
        running = {ch.pid for ch in c.status().children}
        kids = [p for p, _ in children_of(dpid) if p not in running and _in_own_pidns(p)]
        if len(kids) >= n or time.monotonic() > deadline:
            return kids
        time.sleep(0.05)


def test_request_takes_a_child_confined_before_it(reserve_client):
    c = reserve_client
    assert len(_wait_reserve(c, 2)) == 2
    time.sleep(0.5)
    asked = _boottime()
    r = c.run(_pid1_started())
    assert r.returncode == 0, r.stderr
    started = float(r.stdout)
    # the child's PID 1 existed well before the request: it came from the reserve
    assert started < asked - 0.3, (started, asked)
    # and the reserve is refilled with new children
    assert len(_wait_reserve(c, 2)) == 2


def test_reserve_children_are_never_reused(reserve_client):
    c = reserve_client

    def leave_traces():
        import os
        print(os.path.exists("/tmp/trace"), os.environ.get("MARK"), os.getpid(), flush=True)
        open("/tmp/trace", "w").write("x")
        os.environ["MARK"] = "set"

    seen = set()
    for i in range(12):
        child = c.spawn_child(leave_traces, env={"PATH": "/usr/bin:/bin", "N": str(i)}, stdin=None)
        out = child.stdout.read()
        exists, mark, pid = out.split()
        assert (exists, mark) == (b"False", b"None"), out
        assert child.wait().returncode == 0
        seen.add(child.pid)
    assert len(seen) == 12  # a fresh clone for every request


def test_reserve_request_fields(reserve_client):
    c = reserve_client
    _wait_reserve(c, 2)

    def probe(a, b=0):
        import os
        import sys
        with open("/proc/self/comm") as f:
            comm = f.read().strip()
        print(os.environ.get("X"), comm, sys.stdin.read(), a + b)
        return {"sum": a + b}

    child = c.spawn_child(probe, (1,), {"b": 2}, env={"X": "env-ok"}, process_name="zg-named")
    out, err = child.communicate(b"from-stdin")
    assert out == b"env-ok zg-named from-stdin 3\n", err
    assert child.result() == {"sum": 3}
    # DEVNULL stdin reads EOF at once
    r = c.run(lambda: print(repr(__import__("sys").stdin.read())))
    assert r.stdout == b"''\n"
    # no env: exactly the pool's (the reserve child set it up ahead; nothing of the zygote's)
    r = c.run(lambda: print(repr(dict(__import__("os").environ))))
    assert eval(r.stdout) == {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp"}
    # an exec kind through the reserve
    child = c.spawn_child(None, _argv=["/bin/sh", "-c", "echo exec-ok"], stdin=None)
    assert child.stdout.read() == b"exec-ok\n"
    child.wait()


def test_reserve_deadline_counts_from_the_request(reserve_client):
    c = reserve_client
    _wait_reserve(c, 2)
    time.sleep(1.0)  # the reserve children are a second old: their deadline must not be

    def spin():
        while True:
            pass
    t = time.monotonic()
    r = c.run(spin, timeout=0.7)
    took = time.monotonic() - t
    assert r.status.timed_out and 0.6 < r.status.wall_time < 3, r.status
    assert took >= 0.6


def test_request_with_other_config_clones_as_usual(reserve_client):
    c = reserve_client
    _wait_reserve(c, 2)
    time.sleep(0.3)
    asked = _boottime()
    r = c.run(_pid1_started(), sandbox_config=SandboxConfig(hostname="other"))
    assert float(r.stdout) >= asked - 0.05, "a request with its own config must not take a reserve child"


def test_reserve_children_go_with_the_daemon():
    with Client.embedded(daemon_args=["--reserve", "3"]) as c:
        kids = _wait_reserve(c, 3)
        assert len(kids) == 3
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{p}") for p in kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in kids if os.path.exists(f"/proc/{p}")]


@pytest.mark.cgroupv2
def test_SECURITY_reserve_with_pool_limits_and_tighter_requests(tmp_path):
    with config_daemon(tmp_path, """
            [pools.default]
            reserve = 2
            [pools.default.sandbox]
            memory = "256M"
            pids = 32
            """) as sock, Client.connect(sock) as c:
        time.sleep(1.0)
        asked = _boottime()
        r = c.run(_pid1_started())
        assert float(r.stdout) < asked - 0.3  # from the reserve
        assert r.status.peak_memory is not None and r.status.enforcement.get("memory", "").startswith("cgroup"), r.status

        def hog():
            b = bytearray(400 << 20)
            print(len(b))
        r = c.run(hog)
        assert r.status.memory_exceeded, r.status

        # A request with tighter limits takes a reserve child too (no clone, no cgroup attach on
        # the request's path): the daemon writes its limits into the child's cgroup first.
        def tight():
            import os
            with open("/proc/1/stat") as f:
                print(int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK"), flush=True)
            b = bytearray(200 << 20)  # fits the pool's 256M, not the request's 128M
            print(len(b))
        time.sleep(1.0)
        asked = _boottime()
        r = c.run(tight, sandbox_config=SandboxConfig(memory="128M", pids=32))
        assert float(r.stdout.split()[0]) < asked - 0.3, "expected a reserve child"
        assert r.status.memory_exceeded, r.status
        # A pids-only tightening too: the payload cannot have more than 4 tasks (pool: 32).
        def forks():
            import os
            with open("/proc/1/stat") as f:
                print(int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK"), flush=True)
            kids = []
            try:
                for _ in range(8):
                    pid = os.fork()
                    if pid == 0:
                        import time
                        time.sleep(30)
                        os._exit(0)
                    kids.append(pid)
            except OSError:
                pass
            print(len(kids), flush=True)
            for pid in kids:
                os.kill(pid, 9)
        time.sleep(1.0)
        asked = _boottime()
        r = c.run(forks, sandbox_config=SandboxConfig(memory="256M", pids=4))
        started, n = r.stdout.split()
        assert float(started) < asked - 0.3, "expected a reserve child"
        assert int(n) == 3, r  # the payload itself and 3 more
        # A memory limit below what a waiting child already uses (v1 would refuse the write, v2
        # OOM-kill the child): the reserve is left alone and the request clones, which cannot
        # start in 256K either; the next request still finds the reserve.
        time.sleep(1.0)
        with pytest.raises(SandboxError):
            c.run(print, ("no",), sandbox_config=SandboxConfig(memory="256K", pids=32))
        asked = _boottime()
        r = c.run(_pid1_started())
        assert float(r.stdout) < asked - 0.3, "expected a reserve child"


def test_pool_timeout_counts_from_the_request_not_the_reserve(tmp_path):
    """A pool whose default has a timeout: a reserve child older than that timeout still gets the
    whole timeout for its request (the deadline is armed at handout, not when it was made)."""
    with config_daemon(tmp_path, """
            [pools.default]
            reserve = 1
            [pools.default.sandbox]
            timeout = 1.5
            """) as sock, Client.connect(sock) as c:
        time.sleep(2.5)  # the reserve child is now older than the pool's timeout
        asked = _boottime()
        r = c.run(_pid1_started(then_sleep=1.0))
        started, done = r.stdout.split()
        assert float(started) < asked - 1.0  # it did come from the reserve
        assert done == b"done" and not r.status.timed_out, r.status
        assert 0.9 < r.status.wall_time < 1.5

        def spin():
            while True:
                pass
        r = c.run(spin)  # and the pool's timeout still applies to a reserve child
        assert r.status.timed_out and 1.4 < r.status.wall_time < 3, r.status


def test_reload_replaces_the_reserve(tmp_path):
    """SIGHUP with a changed pool: the old reserve children go (they exit without running
    anything), the new pool fills its own reserve, requests work throughout."""
    import signal as _signal
    sock = str(tmp_path / "z.sock")
    path = tmp_path / "z.toml"
    write_text(path, f'[daemon]\nsocket = "{sock}"\n[pools.default]\nreserve = 2\n')
    proc = start_daemon("--config", str(path))
    try:
        wait_socket(sock, proc)

        def reserve_pids() -> set[int]:
            return {p for p, _ in children_of(proc.pid) if _in_own_pidns(p)}

        deadline = time.monotonic() + 20
        while len(reserve_pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        old = reserve_pids()
        assert len(old) == 2
        write_text(path, f'[daemon]\nsocket = "{sock}"\n[pools.default]\nreserve = 3\npreload = ["colorsys"]\n')
        proc.send_signal(_signal.SIGHUP)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = reserve_pids()
            if len(now) == 3 and not now & old:
                break
            time.sleep(0.05)
        assert len(now) == 3 and not now & old, (old, now)
        with Client.connect(sock) as c:
            r = c.run(lambda: print(__import__("sys").modules.get("colorsys") is not None))
            assert r.stdout == b"True\n"  # from the new pool (it preloads colorsys)
    finally:
        stop_daemon(proc)


def test_reserve_with_a_tight_open_files_limit(tmp_path):
    """A pool whose children may hold only their six fds: the reserve still serves
    (the prewarm that needs a spare pipe is skipped, not fatal to the waiting child), and
    confinement itself copes (the limit is set after the steps that open fds)."""
    with config_daemon(tmp_path, """
            [pools.default]
            reserve = 1
            [pools.default.sandbox]
            open_files = 6
            """) as sock, Client.connect(sock) as c:
        time.sleep(1.0)
        asked = _boottime()
        r = c.run(_pid1_started())
        assert r.returncode == 0, r.stderr
        assert float(r.stdout) < asked - 0.3  # from the reserve
