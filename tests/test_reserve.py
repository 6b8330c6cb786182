"""The pool reserve: children confined ahead of requests, each used by exactly one request."""

from __future__ import annotations

import contextlib
import os
import time

import pytest

from zygote_client import Client, DaemonError, SandboxConfig, SandboxError

from conftest import (RawConn, config_daemon, daemon_pid, sandbox_children, start_daemon, stop_daemon, wait_socket,
                      wait_for, write_text, _log)


def _boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _start_running(c: Client, seconds: float, **spawn) -> "ChildProcess":
    """Spawn (a held child, when the client holds one) a payload that prints "running", sleeps
    ``seconds``, prints "done" and returns "done"; return the child once "running" was read."""
    def payload():
        print("running", flush=True)
        __import__("time").sleep(seconds)
        print("done")
        return "done"
    child = c.spawn_child(payload, stdin=None, **spawn)
    assert child.stdout.readline() == b"running\n"
    return child


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


def _wait_reserve(c: Client, n: int, timeout: float = 30) -> list[int]:
    """Pids of the daemon's children waiting in the reserve (not running for any client), once
    status says at least ``n`` wait and none is being made (or after ``timeout`` seconds)."""
    dpid = daemon_pid(c)
    deadline = time.monotonic() + timeout
    while True:
        st = c.status()
        waiting = sum(p.reserve_waiting for p in st.pools)
        running = {ch.pid for ch in st.children}
        kids = [p for p in sandbox_children(dpid) if p not in running]
        if (waiting >= n and len(kids) == waiting) or time.monotonic() > deadline:
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


def _replaced(c: Client, gone: int, n: int, timeout: float = 30) -> list[int]:
    """The daemon's sandbox children once ``gone`` is not among them and ``n`` are, all waiting
    in the reserve by its status (or as they are after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        kids = sandbox_children(daemon_pid(c))
        if (gone not in kids and len(kids) == n and sum(p.reserve_waiting for p in c.status().pools) == n) \
                or time.monotonic() > deadline:
            return kids
        time.sleep(0.05)


def test_a_reserve_child_that_dies_waiting_is_replaced():
    """A waiting reserve child that dies (the OOM killer's pick: children are at 1000) leaves the
    reserve, which refills without a request to notice it, and status counts only live ones.
    When it keeps happening the refills slow down (a pause that doubles), not a loop of clones."""
    import signal
    with Client.embedded(daemon_args=["--reserve", "2"]) as c:
        first = _wait_reserve(c, 2)
        assert len(first) == 2
        os.kill(first[0], signal.SIGKILL)  # ours: the daemon's child, waiting in its reserve
        kids = _replaced(c, first[0], 2)
        assert first[0] not in kids and len(kids) == 2, (first, kids)
        assert sum(p.reserve_waiting for p in c.status().pools) == 2
        t = time.monotonic()
        os.kill(kids[0], signal.SIGKILL)  # the second within 10 s: refilled after 1 s
        again = _replaced(c, kids[0], 2)
        assert kids[0] not in again and len(again) == 2 and 0.9 < time.monotonic() - t < 10, (kids, again)


def test_a_daemon_stops_without_refilling_its_reserve():
    """Stopping kills the waiting reserve children: their deaths must not refill the reserve
    (each refill killed in the next round, and so on: a stop took up to 6 s, not 0.1 s). Two
    things prevent it: the daemon's shutting_down flag, and the slower refill after repeated
    deaths (either alone keeps this test passing; without both it fails)."""
    for _ in range(3):
        c = Client.embedded(daemon_args=["--reserve", "2"])
        _wait_reserve(c, 2)
        t = time.monotonic()
        c.close()
        assert time.monotonic() - t < 1.5


def test_status_counts_a_leased_childs_age_from_its_job():
    """A held child's Started report is read when needed (daemon._park_status); status reads it
    first, so a child held for a while and then started shows the age of its Job."""
    with Client.embedded(daemon_args=["--reserve", "2"], leases=2) as c:
        _held(c, 2)
        time.sleep(1.2)
        child = _start_running(c, 0.5)
        age = next(ch.age for ch in c.status().children if ch.id == child.id)
        assert age < 0.8, age  # (from the lease: 1.2 s and more)
        child.wait()


def test_the_prewarm_callable_is_pickled_once_in_the_zygote(reserve_client):
    """A reserve child's prewarm runs a fake request whose closure the zygote pickled before its
    first clone: pickling it in every child cost ≈ 0.5 ms and 150 copy-on-write faults."""
    def probe():
        import pickle
        import zygote.child as zc
        func, args, kwargs = pickle.loads(zc._prewarm_payload)
        return func(*args, **kwargs)
    assert reserve_client.call(probe) == 0.5


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


def test_a_reserve_taken_from_twice_within_its_quiet_time_is_refilled_at_once(monkeypatch):
    """A reserve still half full is refilled in a quiet moment (RESERVE_QUIET after its last take),
    so that a clone does not compete with the child just handed out; taken from twice within that
    time (a stream of requests, which never leaves one), it is refilled at once, or it would drain
    and requests would clone on their own path."""
    monkeypatch.setenv("ZYGOTE_TEST_RESERVE_QUIET", "8")

    def wait_for_stdin():
        import sys
        sys.stdin.read()

    with Client.embedded(preload_imports=["json"], daemon_args=["--test-hooks", "--reserve", "4"]) as c:
        assert len(_wait_reserve(c, 4)) == 4
        first = c.spawn_child(wait_for_stdin)
        time.sleep(1.5)
        assert len(_wait_reserve(c, 0)) == 3  # one take: the reserve waits for its quiet moment
        second = c.spawn_child(wait_for_stdin)
        t = time.monotonic()
        assert len(_wait_reserve(c, 4)) == 4
        assert time.monotonic() - t < 5, "refilled only after the quiet time"
        for ch in (first, second):
            assert ch.poll() is None
            ch.stdin.close()
            assert ch.wait().returncode == 0


def test_reserve_children_go_with_the_daemon():
    with Client.embedded(daemon_args=["--reserve", "3"]) as c:
        kids = _wait_reserve(c, 3)
        assert len(kids) == 3
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{p}") for p in kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in kids if os.path.exists(f"/proc/{p}")]


def _aged_reserve(c: Client, n: int = 2) -> None:
    """Until ``n`` children wait in the reserve, the newest made 0.35 s ago or more (a payload
    of _pid1_started then tells a reserve child, started 0.3 s before the request, from a clone)."""
    _wait_reserve(c, n)
    time.sleep(0.35)


@pytest.mark.cgroupv2
def test_SECURITY_reserve_with_pool_limits_and_tighter_requests(tmp_path):
    with config_daemon(tmp_path, """
            [pools.default]
            reserve = 2
            [pools.default.sandbox]
            memory = "256M"
            pids = 32
            """) as sock, Client.connect(sock) as c:
        _aged_reserve(c)
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
        _aged_reserve(c)
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
        _aged_reserve(c)
        asked = _boottime()
        r = c.run(forks, sandbox_config=SandboxConfig(memory="256M", pids=4))
        started, n = r.stdout.split()
        assert float(started) < asked - 0.3, "expected a reserve child"
        assert int(n) == 3, r  # the payload itself and 3 more
        # A memory limit below what a waiting child already uses (v1 would refuse the write, v2
        # OOM-kill the child): the reserve is left alone and the request clones, which cannot
        # start in 256K either; the next request still finds the reserve.
        _aged_reserve(c)
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
            timeout = 1.2
            """) as sock, Client.connect(sock) as c:
        time.sleep(1.5)  # the reserve child is now older than the pool's timeout
        asked = _boottime()
        r = c.run(_pid1_started(then_sleep=0.7))
        started, done = r.stdout.split()
        assert float(started) < asked - 1.2  # it did come from the reserve
        assert done == b"done" and not r.status.timed_out, r.status
        assert 0.6 < r.status.wall_time < 1.2

        def spin():
            while True:
                pass
        r = c.run(spin)  # and the pool's timeout still applies to a reserve child
        assert r.status.timed_out and 1.1 < r.status.wall_time < 2.7, r.status


@contextlib.contextmanager
def _reloadable(tmp_path, toml: str):
    """A daemon run from a TOML file (``[daemon] socket = ...`` and then ``toml``): yields (its
    socket, its process, reload) where reload(toml) rewrites the file so and sends SIGHUP."""
    import signal as _signal
    sock = str(tmp_path / "z.sock")
    path = tmp_path / "z.toml"
    write_text(path, f'[daemon]\nsocket = "{sock}"\n{toml}')

    def reload(toml: str) -> None:
        write_text(path, f'[daemon]\nsocket = "{sock}"\n{toml}')
        proc.send_signal(_signal.SIGHUP)

    proc = start_daemon("--config", str(path))
    try:
        wait_socket(sock, proc)
        yield sock, proc, reload
    finally:
        stop_daemon(proc)


def test_reload_replaces_the_reserve(tmp_path):
    """SIGHUP with a changed pool: the old reserve children go (they exit without running
    anything), the new pool fills its own reserve, requests work throughout."""
    with _reloadable(tmp_path, "[pools.default]\nreserve = 2\n") as (sock, proc, reload):
        def reserve_pids() -> set[int]:
            return set(sandbox_children(proc.pid))

        deadline = time.monotonic() + 20
        while len(reserve_pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        old = reserve_pids()
        assert len(old) == 2
        reload('[pools.default]\nreserve = 3\npreload = ["colorsys"]\n')
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


def test_a_reload_raising_max_children_stays_within_the_claimed_id_ranges(tmp_path):
    """A root daemon claims its children's host id ranges at start, for max_children then (blocks
    of 64 ranges, 64 spare). A reload that raised max_children past the claim left its reserve,
    which may use only the ranges beyond max_children, never refilled again (and spawns past the
    claim would fail for want of a range). The reload keeps max_children within the claim and
    says so in its log line; the reserve refills after takes."""
    with _reloadable(tmp_path, "max_children = 2\n[pools.default]\nreserve = 2\n") as (sock, proc, reload):
        wait_for(lambda: len(sandbox_children(proc.pid)) == 2, what="the reserve")
        reload("max_children = 500\n[pools.default]\nreserve = 2\n")
        wait_for(lambda: b"reloaded" in _log(proc), what="the reload's log line")
        # 2 + 64 spare -> two blocks of 64 claimed: 128 ranges, of which max_children may have 64
        assert b"max_children 500: 64 until the daemon restarts" in _log(proc), _log(proc)[-2000:]
        with Client.connect(sock) as c:
            for i in range(4):  # takes, and (in turn) clones while the reserve refills
                assert c.run(print, (i,)).stdout == f"{i}\n".encode()
        wait_for(lambda: len(sandbox_children(proc.pid)) == 2, what="the reserve refilled after the reload")


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


# ---- leased reserve children (Client(..., leases=N)): the client writes the Job itself --------


def _held(c: Client, n: int) -> None:
    deadline = time.monotonic() + 30
    while len(c._aclient._leases) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(c._aclient._leases) >= n


def test_a_held_child_is_never_sent_a_field_of_the_wrong_type():
    """A spawn started on a held child is checked as one sent to the daemon: a TypeError, not
    a child that exits 125 on a Job it cannot read."""
    with Client.embedded(daemon_args=["--reserve", "2"], leases=1) as c:
        _held(c, 1)
        for bad in ({"env": {"A": 1}}, {"process_name": 5}, {"timeout": "5"}):
            with pytest.raises(TypeError, match="wrong type"):
                c.spawn_child(print, **bad)
        assert c._aclient._leases  # (not used up)
        assert c.call(lambda: 1) == 1


def _take_lease(c: Client):
    """A held child and its control pipe, taken out of the client's hands (as a client that
    does not use this library would hold it)."""
    _held(c, 1)
    child, ctl = c._aclient._leases.popleft()
    c._loop.call_soon_threadsafe(lambda: c._aclient._lease_wake.set())  # as a spawn would: refill
    return child, ctl


def test_leased_children_run_requests_written_straight_to_them():
    with Client.embedded(preload_imports=["json"], daemon_args=["--reserve", "2"], leases=2) as c:
        _held(c, 2)
        time.sleep(0.5)
        held = {child.id for child, _ in c._aclient._leases}
        assert {ch.id for ch in c.status().children} == held  # they are this client's (and counted)
        asked = _boottime()
        r = c.run(_pid1_started())
        assert r.returncode == 0, r.stderr
        assert float(r.stdout) < asked - 0.3  # confined before the request
        assert r.status.wall_time < 5

        def probe(a, b=0):
            import os
            import sys
            with open("/proc/self/comm") as f:
                comm = f.read().strip()
            print(os.environ.get("X"), comm, sys.stdin.read(), a + b)
            return {"sum": a + b}

        seen = set()
        for _ in range(3):
            _held(c, 1)
            child = c.spawn_child(probe, (1,), {"b": 2}, env={"X": "env-ok"}, process_name="zg-named")
            assert child.id in held or child.id not in seen
            seen.add(child.id)
            out, err = child.communicate(b"from-stdin")
            assert out == b"env-ok zg-named from-stdin 3\n", err
            assert child.result() == {"sum": 3}
        assert len(seen) == 3  # one request each
        _held(c, 1)
        r = c.run(lambda: print(repr(dict(__import__("os").environ)), repr(__import__("sys").stdin.read())))
        env, stdin = r.stdout.decode().rsplit(" ", 1)
        assert eval(env) == {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp"}
        assert stdin.strip() == "''"
        _held(c, 1)
        r = c.run("json:dumps", ([1, 2],))  # a module:function target
        assert r.value == "[1, 2]"
        _held(c, 1)
        child = c.spawn_child(None, _argv=["/bin/sh", "-c", "echo exec-ok"], stdin=None)
        assert child.stdout.read() == b"exec-ok\n"  # through the daemon: a clone with a reaper
        assert child.wait().returncode == 0 and child.id not in held
        _held(c, 1)

        def raises():
            raise ValueError("from the payload")
        r = c.run(raises)
        assert r.returncode == 1 and b"from the payload" in r.stderr
        pids = [child.pid for child, _ in c._aclient._leases]
    deadline = time.monotonic() + 10  # held children die with the connection
    while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")]


def test_held_children_are_refilled_at_the_exit_or_at_once_when_none_is_left():
    """A spawn that leaves others held leases the next one when its child's exit arrives (not
    while the child starts); one that takes the last held child leases again at once, so
    long-running children never leave the client without any."""
    with Client.embedded(daemon_args=["--reserve", "3"], leases=2) as c:
        _held(c, 2)

        def wait_for_stdin():
            import sys
            sys.stdin.read()

        first = c.spawn_child(wait_for_stdin)
        time.sleep(0.6)  # well past the refill task's pause: it was not woken
        assert len(c._aclient._leases) == 1
        first.stdin.close()
        first.wait()
        _held(c, 2)  # the exit woke it
        a = c.spawn_child(wait_for_stdin)
        b = c.spawn_child(wait_for_stdin)  # the last held one: refilled while both still run
        _held(c, 1)
        assert a.poll() is None and b.poll() is None
        for ch in (a, b):
            ch.stdin.close()
            ch.wait()


def test_leased_child_deadline_counts_from_its_job():
    with Client.embedded(daemon_args=["--reserve", "2"], leases=1) as c:
        _held(c, 1)
        time.sleep(1.2)  # held for longer than the timeout below

        def spin():  # (for 15 s at most: a deadline never armed fails the test, not the suite)
            import time
            end = time.monotonic() + 15
            while time.monotonic() < end:
                pass
        r = c.run(spin, timeout=0.7)
        assert r.status.timed_out and 0.6 < r.status.wall_time < 1.3, r.status  # (read at its Job's timeout)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_async_leased_child_deadline_counts_from_its_job(backend):
    """The async face starts a held child itself too, and says Begun for a Job with a timeout."""
    import anyio

    from zygote_client import open_embedded

    def sleeper():
        __import__("time").sleep(15)

    async def main():
        async with await open_embedded(daemon_args=["--reserve", "2"]) as c:
            c.keep_leased(1)
            with anyio.fail_after(30):
                while not c._leases:
                    await anyio.sleep(0.02)
            held = c._leases[0][0].id
            child = await c.spawn_child(sleeper, timeout=0.7)
            assert child.id == held  # (started from the hand)
            status = await child.wait()
            assert status.timed_out and 0.6 < status.wall_time < 1.3, status

    anyio.run(main, backend=backend)


def _loop_switches(pid: int, tid: int | None = None) -> int:
    """Context switches of a thread (by default a process's main thread: the daemon's event
    loop): each wake-up is one."""
    with open(f"/proc/{pid}/task/{tid or pid}/status") as f:
        return sum(int(line.split()[1]) for line in f
                   if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")))


def test_a_leased_child_starts_without_waking_the_daemon():
    """A held child reports Started when its Job comes, but the daemon reads that report when it
    needs it, not at once: its wake-up would compete with the child's start for the CPU
    (daemon._park_status). With a timeout the client says Begun: that message wakes the daemon.
    The blocking client's own loop thread is not woken either way: Begun goes out from the
    calling thread (AsyncClient._send_now)."""
    import threading
    with Client.embedded(daemon_args=["--reserve", "2"], leases=2) as c:
        dpid = daemon_pid(c)
        loop_tid = c._portal.call(threading.get_native_id)
        woke, client_woke = {}, {}
        for timeout in (30.0, None):
            _held(c, 2)
            _wait_reserve(c, 2)  # (the refills behind the last spawn are done)
            time.sleep(0.3)
            before = _loop_switches(dpid), _loop_switches(os.getpid(), loop_tid)
            child = _start_running(c, 0.6, timeout=timeout)
            time.sleep(0.2)
            woke[timeout] = _loop_switches(dpid) - before[0]
            client_woke[timeout] = _loop_switches(os.getpid(), loop_tid) - before[1]
            assert child.result() == "done" and child.returncode == 0
        assert woke[None] == 0 and woke[30.0] > 0, woke
        assert client_woke == {30.0: 0, None: 0}, client_woke


def test_a_begun_from_the_calling_thread_never_lands_inside_another_frame():
    """Begun goes out from the calling thread only while the loop sends nothing (_send_now):
    here the loop keeps sending large requests (too large for a held child: through the
    daemon, many writes each) while this thread starts held children with a timeout. A Begun
    written between two writes of a request would make the rest of the stream garbage to the
    daemon, which would drop the connection."""
    import threading
    with Client.embedded(daemon_args=["--reserve", "2"], leases=2) as c:
        _held(c, 2)
        big = b"x" * (32 << 20)
        sizes: list[int] = []
        done = threading.Event()

        def send_large() -> None:
            try:
                for _ in range(6):
                    sizes.append(c.call(len, big))
            finally:
                done.set()
        t = threading.Thread(target=send_large)
        t.start()
        started = 0
        try:
            while not done.is_set():
                child = c.spawn_child(print, args=("x",), stdin=None, timeout=30)
                assert child.stdout.read() == b"x\n" and child.wait().returncode == 0
                started += 1
        finally:
            t.join()
        assert sizes == [len(big)] * 6 and started > 5, (sizes, started)


def test_a_report_read_late_arms_the_deadline_from_the_job(tmp_path):
    """The deadline runs from when the child read its Job (Started.at), however late the daemon
    reads the report: here a Job with no timeout of its own, written 1 s after the lease, in a
    pool whose timeout is 2 s; the daemon reads the report at the lease's expiry (1 s after the
    Job) and kills the child 2 s after the Job, not 2 s after reading."""
    from zygote_client import _protocol as P
    with config_daemon(tmp_path, "[pools.default]\nreserve = 1\n[pools.default.sandbox]\ntimeout = 2\n") as sock, \
            Client.connect(sock, leases=1) as c:
        _held(c, 1)
        child, ctl = _take_lease(c)  # (held since just now: the lease's clock runs)
        time.sleep(1.0)
        t = time.monotonic()
        os.write(ctl, P.job_frame(P.Job(kind="callable", payload=__import__("cloudpickle").dumps(
            (lambda: __import__("time").sleep(20), (), {})))))
        os.close(ctl)
        st = c._call(child.wait)
        took = time.monotonic() - t
        assert st.timed_out and 1.8 < took < 2.6 and 1.8 < st.wall_time < 2.6, (took, st)


def test_a_client_that_does_not_say_begun_has_its_leased_childs_report_read_at_once(tmp_path):
    """A client whose Hello does not name "begun" (an older one, or one of its own) never sends
    Begun: the daemon reads its held children's Started reports as they come, so a Job's own
    timeout holds without it."""
    from zygote_client import _protocol as P
    with config_daemon(tmp_path, "[pools.default]\nreserve = 2\n") as sock, _greeted(sock) as (conn, held):
        _lease(conn, 1, held)
        job = P.Job(kind="callable", timeout=1.0, payload=__import__("cloudpickle").dumps(
            (lambda: __import__("time").sleep(20), (), {})))
        t = time.monotonic()
        os.write(held[3], P.job_frame(job))
        reply = conn.reply()
        assert isinstance(reply, P.Exited) and reply.status.timed_out, reply
        assert time.monotonic() - t < 5


def test_a_leased_child_of_an_exporting_pool_sends_its_export(tmp_path):
    """A pool whose default exports a directory: PID 1 sends the export on the status pipe at
    the end, more than the pipe holds here, so a held child's pipe is read as it comes (not
    parked until the exit, which would then never come)."""
    with config_daemon(tmp_path, "[pools.default]\nreserve = 2\n[pools.default.sandbox.export]\n"
                       "max_bytes = 8388608\n") as sock, Client.connect(sock, leases=1) as c:
        _held(c, 1)
        held = c._aclient._leases[0][0].id

        def fill():
            with open("/out/blob", "wb") as f:
                f.write(__import__("os").urandom(1 << 20))
        child = c.spawn_child(fill, stdin=None)
        assert child.id == held
        assert child.wait(timeout=30).returncode == 0
        child.export(tmp_path / "got")
        assert (tmp_path / "got" / "blob").stat().st_size == 1 << 20


_POOL = "[pools.default]\nreserve = 2\n"
_POOL_CHANGED = _POOL + '[pools.default.sandbox]\nhostname = "reloaded"\n'


def test_a_leased_child_started_before_a_reload_runs_on(tmp_path):
    """A reload retires the pool: its held children that have not read a Job are killed, but one
    whose Job came before the reload runs to its end, though the daemon had not read its report
    yet (a Job without a timeout: read when needed, here at the reload)."""
    with _reloadable(tmp_path, _POOL) as (sock, _, reload), Client.connect(sock, leases=2) as c:
        _held(c, 2)
        child = _start_running(c, 1.5)
        (unstarted, _), = list(c._aclient._leases)
        reload(_POOL_CHANGED)
        assert child.stdout.read() == b"done\n"
        st = child.wait()
        assert st.returncode == 0 and not st.pool_reloaded, st
        deadline = time.monotonic() + 30
        while unstarted.status is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert unstarted.status is not None and unstarted.status.pool_reloaded, unstarted.status


def test_SECURITY_leased_child_checks_its_job_and_the_pool_caps_its_timeout(tmp_path):
    """A client that writes its own Job (not this library): the pool's timeout still holds, a
    malformed Job runs nothing."""
    from zygote_client import _protocol as P
    with config_daemon(tmp_path, """
            [pools.default]
            reserve = 2
            [pools.default.sandbox]
            timeout = 1
            """) as sock, Client.connect(sock, leases=2) as c:
        child, ctl = _take_lease(c)
        job = P.Job(kind="callable", timeout=1000.0, payload=__import__("cloudpickle").dumps(
            (lambda: __import__("time").sleep(60), (), {})))
        t = time.monotonic()
        os.write(ctl, P.job_frame(job))
        os.close(ctl)
        st = c._call(child.wait)
        assert st.timed_out and 0.8 < st.wall_time < 5 and time.monotonic() - t < 10, st
        for bad in (P.job_frame(P.Job(kind="nonsense")), P.job_frame(P.Job(kind="exec")),
                    P.job_frame(P.Job(kind="exec", argv=["/bin/sh", "-c", "echo ran"])),  # needs a reaper
                    b"\x00\x00\x00\x03abc"):
            child, ctl = _take_lease(c)
            os.write(ctl, bad)
            os.close(ctl)
            st = c._call(child.wait)
            err = os.read(child.stderr.detach(), 1000)
            assert st.returncode == 125 and b"refused the request" in err, (st, err)


def test_SECURITY_a_leased_child_main_job_runs_the_pools_child_main(tmp_path):
    """A Job of kind child_main that a client writes itself runs the pool's child_main, not a
    target of the client's naming (the daemon path replaces it the same way)."""
    import pickle

    from zygote_client import _protocol as P
    with config_daemon(tmp_path, """
            [pools.default]
            reserve = 2
            child_main = "builtins:print"
            """) as sock, Client.connect(sock, leases=1) as c:
        child, ctl = _take_lease(c)
        os.write(ctl, P.job_frame(P.Job(kind="child_main", target="os:abort",
                                        payload=pickle.dumps((("child_main ran",), {})))))
        os.close(ctl)
        st = c._call(child.wait)
        out = os.read(child.stdout.detach(), 1000)
        assert st.returncode == 0 and out == b"child_main ran\n", (st, out)
        r = c.run(None, ("through the daemon",))  # (no held child is taken for child_main)
        assert r.returncode == 0 and r.stdout == b"through the daemon\n", r


def test_a_pool_that_does_not_lease_serves_a_leasing_client_through_the_daemon(tmp_path):
    from zygote_client import DaemonError
    with config_daemon(tmp_path, "[pools.default]\nreserve = 2\nallow_callables = false\n"
                                 "allowed_targets = [\"json:dumps\"]\n") as sock, \
            Client.connect(sock, leases=2) as c:
        time.sleep(0.5)
        assert not c._aclient._leases
        with pytest.raises(DaemonError, match="callables"):
            c.run(print)
        assert c.run("json:dumps", ([1],)).value == "[1]"


@contextlib.contextmanager
def _greeted(sock: str):
    """A bare connection past its Hello, and the list of fds it holds (leases), closed after."""
    conn = RawConn(sock)
    conn.send(conn.P.Hello(conn.P.VERSION))
    conn.reply()
    held: list[int] = []
    try:
        yield conn, held
    finally:
        for fd in held:
            os.close(fd)


def _lease(conn: RawConn, req: int, held: list[int]) -> None:
    """Lease a child, asking again while the reserve has none ready (for up to 30 s); its fds go
    to ``held`` (closing them would give the lease up)."""
    deadline = time.monotonic() + 30
    while True:
        conn.send(conn.P.Lease(req))
        reply = conn.reply(held)
        if isinstance(reply, conn.P.Leased) or time.monotonic() > deadline or reply.code != "empty":
            break
        time.sleep(0.1)
    assert isinstance(reply, conn.P.Leased), reply


def test_SECURITY_held_children_count_against_the_per_client_limit(tmp_path):
    with config_daemon(tmp_path, """
            max_children_per_client = 2
            [pools.default]
            reserve = 3
            """) as sock:
        with _greeted(sock) as (conn, held):
            for req in (1, 2):
                _lease(conn, req, held)
            conn.send(conn.P.Lease(3))
            reply = conn.reply()
            assert isinstance(reply, conn.P.SpawnFailed) and reply.code == "limit", reply
            conn.send(conn.P.Spawn(req=4, kind="exec", argv=["/bin/true"], sandbox=SandboxConfig(hostname="x")))
            reply = conn.reply()
            assert isinstance(reply, conn.P.SpawnFailed) and reply.code == "limit", reply
            # (the user runs nothing: the message says what holds the place)
            assert "2 of them held unstarted for its leases" in reply.message, reply


def test_a_limit_message_counts_a_started_leased_child_as_running(tmp_path):
    """The per-client limit's message says how many of the client's children are held unstarted;
    one started from a lease, whose report the daemon had not read yet, is not among them."""
    with config_daemon(tmp_path, "max_children_per_client = 2\n[pools.default]\nreserve = 2\n") as sock, \
            Client.connect(sock, leases=2) as c:
        _held(c, 2)
        child = _start_running(c, 30)
        with pytest.raises(DaemonError) as ei:
            c.run(print, sandbox_config=SandboxConfig(hostname="x"))  # (through the daemon)
        assert "1 of them held unstarted" in str(ei.value), ei.value
        child.kill()
        child.wait()


def test_a_held_child_that_dies_is_replaced():
    import signal
    with Client.embedded(daemon_args=["--reserve", "2"], leases=1) as c:
        _held(c, 1)
        (child, _), = list(c._aclient._leases)
        os.kill(child.pid, signal.SIGKILL)  # ours: the daemon's child, leased to this client
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
                ch.id != child.id and ch.status is None for ch, _ in list(c._aclient._leases)):
            time.sleep(0.02)
        assert [ch.id for ch, _ in c._aclient._leases] != [child.id]
        r = c.run(print, ("after",))
        assert r.stdout == b"after\n" and r.returncode == 0


@pytest.mark.parametrize("reaper", [False, True])
def test_SECURITY_reserve_payloads_hold_no_status_pipe(tmp_path, reaper):
    """A reserve child keeps its status pipe until it reported its Job started (Started); the
    payload, whether the daemon or a client holding the child wrote the Job, never has it: it
    could otherwise forge the daemon's messages (an ExitReport under a reaper)."""
    def payload():
        import os
        with open("/proc/1/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        open_fds = []
        for fd in range(3, 1024):
            try:
                os.fstat(fd)
                open_fds.append(fd)
            except OSError:
                pass
        print(started, open_fds)

    sandbox = "[pools.default.sandbox]\nreaper = true\n" if reaper else ""
    with config_daemon(tmp_path, "[pools.default]\nreserve = 2\n" + sandbox) as sock:
        for leases in (0, 1):
            with Client.connect(sock, leases=leases) as c:
                time.sleep(1.0)
                if leases:
                    _held(c, 1)
                asked = _boottime()
                r = c.run(payload)
                assert r.returncode == 0, r.stderr
                started, fds = r.stdout.decode().split(" ", 1)
                assert float(started) < asked - 0.3, "expected a reserve child"
                assert fds.strip() == "[5]", r.stdout  # the result pipe only


def test_SECURITY_held_children_of_a_reloaded_pool_are_revoked(tmp_path):
    """A reload that changes the pool kills the children clients hold unstarted (they were
    confined by the old configuration), their status saying so (pool_reloaded: a client that had
    just written its Job learns why); the clients lease new ones."""
    with _reloadable(tmp_path, _POOL) as (sock, _, reload):
        with Client.connect(sock, leases=1) as c:
            _held(c, 1)
            (old, _), = list(c._aclient._leases)
            reload(_POOL_CHANGED)
            deadline = time.monotonic() + 30
            while old.status is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert old.status is not None and old.status.returncode == -9, old.status
            assert old.status.pool_reloaded, old.status  # (what a Job written just then would report)
            r = c.run(lambda: print(__import__("socket").gethostname()))
            assert not r.status.pool_reloaded
            assert r.stdout == b"reloaded\n", r


@pytest.mark.parametrize("pool", ["allow_callables = false", "forbid_secret_env = true"])
def test_SECURITY_pools_that_check_requests_do_not_lease(tmp_path, pool):
    """Pools whose daemon-side request checks a child does not repeat (callables refused,
    secret-looking environments screened) never hand a child's control pipe to a client."""
    with config_daemon(tmp_path, f"[pools.default]\nreserve = 2\n{pool}\n") as sock:
        conn = RawConn(sock)
        conn.send(conn.P.Hello(conn.P.VERSION))
        assert isinstance(conn.reply(), conn.P.Welcome)
        time.sleep(1.0)
        conn.send(conn.P.Lease(1))
        reply = conn.reply()
        assert isinstance(reply, conn.P.SpawnFailed) and reply.code == "bad-request", reply


def test_SECURITY_a_held_child_goes_after_the_pools_timeout_unless_started(tmp_path):
    """A leased child nobody starts holds what a running child holds: no longer than the pool's
    timeout. One started before that runs its own full time (its clock starts at Started)."""
    with config_daemon(tmp_path, "[pools.default]\nreserve = 2\n[pools.default.sandbox]\ntimeout = 1.5\n") as sock, \
            Client.connect(sock, leases=1) as c:
        _held(c, 1)
        time.sleep(1.0)
        r = c.run(lambda: __import__("time").sleep(1.0))  # started at ~1.0 s, ends at ~2.0 s
        assert r.returncode == 0, r.status
        _held(c, 1)
        held, _ = c._aclient._leases[0]
        deadline = time.monotonic() + 10  # nobody starts this one
        while held.status is None and time.monotonic() < deadline:
            time.sleep(0.05)
        st = held.status
        assert st is not None, "a held child outlived the pool's timeout"
        assert st.returncode == -9 and 1.2 < st.wall_time < 5, st
        _held(c, 1)  # the client leased another
        assert c.run(print, ("after",)).stdout == b"after\n"


def test_SECURITY_a_job_without_a_timeout_gets_the_pools(tmp_path):
    from zygote_client import _protocol as P
    with config_daemon(tmp_path, "[pools.default]\nreserve = 1\n[pools.default.sandbox]\ntimeout = 1\n") as sock, \
            Client.connect(sock, leases=1) as c:
        child, ctl = _take_lease(c)
        os.write(ctl, P.job_frame(P.Job(kind="callable", payload=__import__("cloudpickle").dumps(
            (lambda: __import__("time").sleep(60), (), {})))))
        os.close(ctl)
        st = c._call(child.wait)
        assert st.timed_out and 0.8 < st.wall_time < 5, st


def test_a_reserve_child_with_counted_output_keeps_it_while_it_waits(tmp_path, monkeypatch):
    """A pool with max_output_bytes: its reserve children's output goes through relays made
    with them. Those must wait as long as the child does (they belong to no connection yet),
    and deliver once a request takes it."""
    monkeypatch.setenv("ZYGOTE_TEST_RELAY_GRACE", "1")  # (a relay outlives a closed connection by 1 s)
    with config_daemon(tmp_path, """
            [pools.default]
            reserve = 1
            [pools.default.sandbox]
            max_output_bytes = "1M"
            """, "--test-hooks") as sock, Client.connect(sock) as c:
        time.sleep(2.5)  # longer than a relay outlives a closed connection
        asked = _boottime()
        r = c.run(_pid1_started())
        assert r.returncode == 0, r
        assert float(r.stdout) < asked - 2  # the reserve child, waiting since before the sleep


def test_SECURITY_a_request_cancelled_while_its_reserve_child_is_fitted_leaves_no_child(tmp_path, monkeypatch):
    """Taking a reserve child for a request with its own limits writes them into the child's
    cgroup (a worker thread) first. A client that goes away meanwhile cancelled the request
    with the child out of the reserve and owned by nobody: it lived on until shutdown, counting
    against max_children, so repeating it filled the daemon. A test hook holds each fitting
    for 0.5 s, so that the client's going lands there (without it the race was rarely hit)."""
    import socket

    from zygote_client import _protocol as P

    monkeypatch.setenv("ZYGOTE_TEST_FIT_PAUSE", "0.5")
    with config_daemon(tmp_path, """
            max_children = 3
            [pools.default]
            reserve = 2
            [pools.default.sandbox]
            memory = "512M"
            """, "--test-hooks") as sock, Client.connect(sock) as c:
        for _ in range(2):
            _wait_reserve(c, 2, timeout=5)
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock)
            s.sendall(P.encode(P.Hello(P.VERSION)) + P.encode(P.Spawn(
                req=1, kind="callable", payload=b"x", sandbox=SandboxConfig(memory="256M"))))
            time.sleep(0.2)  # (the daemon is fitting a reserve child to it)
            s.close()  # gone: the request is cancelled mid-way
        kids = _wait_reserve(c, 2, timeout=5)
        assert len(kids) == 2, kids  # the reserve's two, and no child owned by nobody
        assert c.call(lambda: 5) == 5


def test_a_request_above_the_default_process_cap_skips_a_reserve_child_without_pids(tmp_path):
    """Reserve children built without a pids limit have RLIMIT_NPROC DEFAULT_PROCESSES; a request
    with pids above it (allowed: the pool has none) must get a fresh clone, not a child capped
    lower than it asked."""
    from test_security import _thread_probe
    from zygote.layers.rlimits import DEFAULT_PROCESSES
    cfg = tmp_path / "z.toml"
    cfg.write_text('[pools.default]\nreserve = 1\n[pools.default.sandbox]\nmemory = "1G"\n')
    start_threads = _thread_probe()
    with Client.embedded(daemon_args=["--config", str(cfg)]) as c:
        assert len(_wait_reserve(c, 1)) == 1
        r = c.run(start_threads, (DEFAULT_PROCESSES + 200,), sandbox_config=SandboxConfig(pids=3000), timeout=120)
        assert r.value == DEFAULT_PROCESSES + 200, r.status


def test_waiting_reserve_children_leave_clients_all_of_max_children():
    """max_children bounds what clients run: waiting reserve children counted, a reserve as large
    as max_children refused every request, and any reserve lowered what clients could run. A
    reserve refills only while the daemon holds fewer than max_children in all."""
    from zygote_client import DaemonError

    def wait_for_stdin():
        import sys
        sys.stdin.read()

    with Client.embedded(daemon_args=["--reserve", "2", "--max-children", "2"]) as c:
        dpid = daemon_pid(c)
        assert len(_wait_reserve(c, 2)) == 2
        taken = c.spawn_child(wait_for_stdin)  # the pool's default: a reserve child
        cloned = c.spawn_child(wait_for_stdin, sandbox_config=SandboxConfig(hostname="own"))  # a clone
        try:
            with pytest.raises(DaemonError, match="runs 2 children, its maximum"):
                c.run(print)
            time.sleep(1.0)  # no refill: one child still waits, and two run
            assert len(sandbox_children(dpid)) == 3
        finally:
            for ch in (taken, cloned):
                ch.stdin.close()
                assert ch.wait().returncode == 0
        assert c.run(print, ("again",)).stdout == b"again\n"


@pytest.mark.skipif(os.path.exists("/sys/fs/cgroup/cgroup.controllers"),
                    reason="cgroup v2: children are born in their cgroup, no attach to slow down")
@pytest.mark.parametrize("limits", [["--max-children", "2"],
                                    ["--max-children", "8", "--max-children-per-client", "2"]],
                         ids=["max_children", "per_client"])
def test_a_spawn_in_its_last_steps_counts_once(limits):
    """A spawn counts against max_children (and the per-client maximum) from its checks until its
    child exists, then as that child: it counted twice from the clone to its reply, so with one
    spawn in its cgroup attach (slowed down, test hook) a daemon at max_children 2 refused a
    second request ("runs 2 children") while one child existed."""
    import threading

    with Client.embedded(test_hooks=True, daemon_args=limits) as c:
        dpid = daemon_pid(c)
        outcome: list[object] = []

        def slow() -> None:
            try:
                outcome.append(c.run(print, ("slow",), sandbox_config=SandboxConfig(memory="64M"),
                                     _test_fail_step="cgroup-attach-delay", timeout=30))
            except Exception as e:  # noqa: BLE001 - reported below
                outcome.append(e)

        t = threading.Thread(target=slow)
        t.start()
        try:
            wait_for(lambda: sandbox_children(dpid), what="the slow spawn's clone")
            assert c.run(print, ("second",)).stdout == b"second\n"
            assert not outcome, "the slow spawn was over before the second request: no overlap tested"
        finally:
            t.join(30)
        assert outcome and outcome[0].stdout == b"slow\n", outcome


def test_SECURITY_a_lease_counts_against_max_children(tmp_path):
    """A leased child is the client's from the lease on: a lease past max_children is refused,
    as a request is, even with a reserve child waiting."""
    with config_daemon(tmp_path, """
            max_children = 2
            [pools.default]
            reserve = 2
            """) as sock:
        with _greeted(sock) as (conn, held):
            _lease(conn, 1, held)
            # a clone (not the default): the second child of this client; one reserve child waits
            conn.send(conn.P.Spawn(req=2, kind="exec", argv=["/bin/sleep", "30"], sandbox=SandboxConfig(hostname="x")))
            assert isinstance(conn.reply(), conn.P.Spawned)
            conn.send(conn.P.Lease(3))
            reply = conn.reply()
            assert isinstance(reply, conn.P.SpawnFailed) and reply.code == "limit", reply
            assert "its maximum" in reply.message, reply


@pytest.mark.skipif(os.geteuid() != 0, reason="host id ranges are a root daemon's")
def test_a_large_reserve_leaves_the_host_id_ranges_clients_need():
    """A root daemon claims host id ranges for max_children + ID_SLACK children (whole blocks),
    one per live child. Reserve children are not counted against max_children, so a reserve
    stops short of the ranges clients may need (here max_children 64 and 128 ranges: 32 reserve
    children, not the 100 asked for); then clients can still start max_children clones."""
    from zygote_client import DaemonError
    from zygote.daemon import ID_SLACK
    from zygote.layers.userns import CHUNK
    most = 64
    bound = -(-(most + ID_SLACK) // CHUNK) * CHUNK - most - ID_SLACK // 2
    assert bound < 100 and bound < most  # (the bound under test is what stops the reserve)

    def wait_for_stdin():
        import sys
        sys.stdin.read()

    with Client.embedded(daemon_args=["--max-children", str(most), "--reserve", "100"]) as c:
        assert len(_wait_reserve(c, bound)) == bound
        time.sleep(1.5)  # it stays there
        assert len(_wait_reserve(c, 0)) == bound
        kids = []
        try:
            for i in range(most):  # not the pool's default (a hostname): each one a clone
                kids.append(c.spawn_child(wait_for_stdin, sandbox_config=SandboxConfig(hostname=f"h{i}")))
            with pytest.raises(DaemonError, match="its maximum"):
                c.run(print)
        finally:
            for ch in kids:
                ch.stdin.close()
            for ch in kids:
                assert ch.wait().returncode == 0


def test_a_reserve_that_waited_for_room_refills_when_children_end():
    """A reserve that found the daemon full (max_children in all) waited 5 s before looking
    again: it is woken when a child leaves."""
    def nap():
        import time
        time.sleep(1)

    with Client.embedded(daemon_args=["--reserve", "2", "--max-children", "2"]) as c:
        assert len(_wait_reserve(c, 2)) == 2
        kids = [c.spawn_child(nap, stdin=None) for _ in range(2)]  # both from the reserve: now full
        for ch in kids:
            ch.wait()
        ended = time.monotonic()
        assert len(_wait_reserve(c, 2)) == 2
        assert time.monotonic() - ended < 3, "refilled only after the 5 s wait"


def test_a_client_leases_again_after_a_reload_brings_the_reserve_back(tmp_path):
    """A pool without a reserve refuses leases; the client used to stop asking for good, so a
    reload that gave the pool a reserve again never reached it."""
    import signal

    sock = str(tmp_path / "z.sock")
    head = f'[daemon]\nsocket = "{sock}"\n[pools.default]\n'
    cfg = write_text(tmp_path / "z.toml", head + "reserve = 2\n")
    proc = start_daemon("--config", cfg)
    try:
        wait_socket(sock, proc)
        with Client.connect(sock, leases=1) as c:
            _held(c, 1)
            for n, reserve in enumerate((0, 2), 1):
                write_text(tmp_path / "z.toml", head + f"reserve = {reserve}\n")
                proc.send_signal(signal.SIGHUP)
                wait_for(lambda: _log(proc).count(b"reloaded") == n, 15, f"reload {n}")
                if not reserve:  # (the held child goes with the old pool; a lease is refused meanwhile)
                    wait_for(lambda: not c._aclient._leases, 15, "the held child to go")
                    time.sleep(0.3)
            _held(c, 1)
            assert c.call(lambda: 3) == 3
    finally:
        stop_daemon(proc)


def test_a_request_that_names_only_a_limit_keeps_the_pools_other_fields(tmp_path):
    """A request's unset fields are the pool's: SandboxConfig(memory=...) under a pool with its
    own hostname, uid, tmpfs size and Landlock "required" is neither refused as looser nor given
    the built-in defaults, and it takes a reserve child (found by a helper: it was refused with
    "landlock='auto' is looser than the pool's 'required'", and with landlock restated it got
    hostname "zygote" and cloned)."""
    with config_daemon(tmp_path, """
            [pools.default]
            reserve = 1
            [pools.default.sandbox]
            memory = "256M"
            hostname = "poolhost"
            uid = 1000
            gid = 1001
            tmpfs_size = "32M"
            landlock = "required"
            """) as sock, Client.connect(sock) as c:
        def probe():
            import os
            import socket
            with open("/proc/1/stat") as f:
                print(int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK"))
            st = os.statvfs("/tmp")
            print(socket.gethostname(), os.getuid(), os.getgid(), st.f_blocks * st.f_frsize >> 20, flush=True)
        time.sleep(1.0)
        asked = _boottime()
        r = c.run(probe, sandbox_config=SandboxConfig(memory="128M"))
        assert r.returncode == 0, r.stderr
        started, rest = r.stdout.decode().split("\n", 1)
        assert rest.split() == ["poolhost", "1000", "1001", "32"], r.stdout
        assert float(started) < asked - 0.3, "expected a reserve child"
        assert r.status.enforcement.get("memory", "").startswith("cgroup"), r.status
        # What a request does set still counts, within the ceiling: its own hostname and uid; a
        # larger /tmp or Landlock turned down are refused as before.
        r = c.run(probe, sandbox_config=SandboxConfig(hostname="mine", uid=2000, gid=2000))
        assert r.stdout.decode().split("\n", 1)[1].split() == ["mine", "2000", "2000", "32"], r.stdout
        for loose in (SandboxConfig(tmpfs_size="64M"), SandboxConfig(landlock="auto")):
            with pytest.raises(DaemonError, match="tmpfs_size|landlock"):
                c.run(probe, sandbox_config=loose)


@pytest.mark.parametrize("asked,seccomp", [(None, "0"), ("default", "2")])
def test_SECURITY_a_profile_named_by_the_request_is_told_apart_from_one_left_unset(tmp_path, asked, seccomp):
    """Under a pool that turns seccomp off, a request that leaves the profile unset gets the
    pool's (none), and one that names "default" (the built-in default's own value) gets that
    profile: an unset field, not a field equal to the default, is the pool's."""
    with config_daemon(tmp_path, """
            [pools.default.sandbox]
            seccomp_profile = "unconfined"
            """) as sock, Client.connect(sock) as c:
        def mode():
            for line in open("/proc/self/status"):
                if line.startswith("Seccomp:"):
                    print(line.split()[1])
        cfg = SandboxConfig(timeout=60) if asked is None else SandboxConfig(timeout=60, seccomp_profile=asked)
        r = c.run(mode, sandbox_config=cfg)
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().strip() == seccomp


def test_SECURITY_a_client_that_predates_inheritance_keeps_the_built_in_defaults(tmp_path):
    """A client from before session 23 leaves out a field equal to the built-in default (its
    explicit seccomp_profile="default" looks unset on the wire): without "sandbox-inherits" in
    its Hello its requests keep the built-in defaults, seccomp included, under a pool that turns seccomp off
    (found by a helper's review: such a client lost the profile it asked for)."""
    with config_daemon(tmp_path, """
            [pools.default.sandbox]
            seccomp_profile = "unconfined"
            """) as sock:
        def mode(inherits: bool) -> bytes:
            conn = RawConn(sock)
            conn.send(conn.P.Hello(conn.P.VERSION, conn.P.CLIENT if inherits else "zygote_client"))
            conn.reply()
            conn.send(conn.P.Spawn(req=1, kind="exec", argv=["/bin/grep", "^Seccomp:", "/proc/self/status"],
                                   stdin=False, sandbox=SandboxConfig(timeout=60)))
            fds: list[int] = []
            reply = conn.reply(fds)
            assert isinstance(reply, conn.P.Spawned), reply
            try:
                with os.fdopen(os.dup(fds[0]), "rb") as out:
                    return out.read()
            finally:
                for fd in fds:
                    os.close(fd)
                conn.sock.close()
        assert mode(False).split() == [b"Seccomp:", b"2"]
        assert mode(True).split() == [b"Seccomp:", b"0"]  # (the pool's, as a current client means it)
