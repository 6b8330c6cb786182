"""cgroup limits end to end through the daemon (v1 here; the cgroupv2 subset also runs in the guest)."""

from __future__ import annotations

import glob
import os
import signal
import time

import pytest

from zygote_client import Client, SandboxConfig, SandboxUnavailable
from conftest import (children_of, cmdline, config_daemon, daemon_pid, fd_count, sandbox_children, stop_daemon,
                      wait_for, wait_socket)


def _zygote_dirs(pid: int) -> list[str]:
    """Children's cgroups under the daemon's directory (not its own leaf for its zygotes)."""
    return [d for d in glob.glob(f"/sys/fs/cgroup/**/zygote/d{pid}/children/*", recursive=True)
            if os.path.isdir(d) and os.path.basename(d) != "zygotes"]


@pytest.fixture(scope="module")
def cg_client():
    with Client.embedded() as c:
        yield c


@pytest.mark.cgroupv2
def test_memory_limit_kills_and_daemon_keeps_serving(cg_client):
    def hog():
        b = bytearray(200 << 20)
        for i in range(0, len(b), 4096):
            b[i] = 1
        print("survived")

    r = cg_client.run(hog, sandbox_config=SandboxConfig(memory="50M", timeout=60))
    assert r.status.memory_exceeded, r.status
    assert r.returncode == -9
    assert b"survived" not in r.stdout
    assert 40 << 20 <= r.status.peak_memory <= 52 << 20, r.status.peak_memory
    assert r.status.enforcement.get("memory", "").startswith("cgroup")
    assert cg_client.run(print, ("still serving",)).stdout == b"still serving\n"


def test_SECURITY_children_are_the_oom_killer_s_first_choice_and_stay_so(cg_client):
    """Children run at oom_score_adj 1000, whatever the daemon was started with, and cannot lower
    it. A daemon started with a negative score (systemd's OOMScoreAdjust=) handed it down; the
    OOM killer never picks a process at -1000, so such a child over its memory limit could not be
    killed, and a default child (no limit) would make the host's OOM killer take others first.
    (This machine gives root no CAP_SYS_RESOURCE: a daemon cannot be started below 0 here.)
    The zygote keeps the daemon's score: at the children's 1000 it was the OOM killer's first
    choice, its resident set being larger than an idle child's (70 vs 50 MB with pandas), so a
    child holding memory the kernel does not count in its RSS (socket buffers) had the zygote
    killed first. Fails without the daemon's write (the child reads the daemon's 0), and with
    the zygote raising its own instead, as it did (the zygote reads 1000)."""
    def score():
        with open("/proc/self/oom_score_adj") as f:
            before = f.read().strip()
        lowered = []
        for value in ("-1000", "0", "999"):
            try:
                with open("/proc/self/oom_score_adj", "w") as f:
                    f.write(value)
                lowered.append(value)
            except OSError:
                pass
        with open("/proc/self/oom_score_adj") as f:
            return before, lowered, f.read().strip()

    assert cg_client.call(score) == ["1000", [], "1000"]  # (a tuple comes back as a list)
    # the daemon's own score is untouched, and its zygote's is the daemon's: only children are raised
    daemon = daemon_pid(cg_client)
    with open(f"/proc/{daemon}/oom_score_adj") as f:
        own = int(f.read())
    assert own < 1000
    running = set(sandbox_children(daemon))
    zygotes = [p for p, _ in children_of(daemon) if b"zygote._zygote" in cmdline(p) and p not in running]
    assert zygotes
    for z in zygotes:
        with open(f"/proc/{z}/oom_score_adj") as f:
            assert int(f.read()) == own, z


@pytest.mark.parametrize("host_tree", [False, True])
def test_SECURITY_a_child_without_landlock_cannot_lower_its_oom_score(tmp_path, host_tree):
    """Landlock made /proc read-only for default children; in a pool without it, a child that
    made itself dumpable (prctl here; any exec does it) owned its /proc files and wrote its
    oom_score_adj back down to the kernel's floor, the daemon's score (under systemd's
    OOMScoreAdjust=-1000 that put it out of the OOM killer's reach: a helper's review). The
    child's /proc is mounted read-only now, in the generated root and in the host's tree (the
    test hook's mount mode, which replaces /proc alone). Fails without that (the writes
    succeed, 999)."""
    def lower():
        import ctypes
        import os
        ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
        tried = []
        for value in ("0", "999"):
            try:
                with open("/proc/self/oom_score_adj", "w") as f:
                    f.write(value)
                tried.append("written")
            except OSError as e:
                tried.append(os.strerror(e.errno))
        with open("/proc/self/oom_score_adj") as f:
            return tried, f.read().strip(), len(os.listdir("/proc/self/fd")) > 0

    with config_daemon(str(tmp_path), """
            [pools.default.sandbox]
            landlock = "off"
            """, "--test-hooks") as sock:
        with Client.connect(sock) as c:
            child = c.spawn_child(lower, stdin=None, _test_relax_mounts=host_tree)
            assert child.result(timeout=60) == [["Read-only file system"] * 2, "1000", True]


@pytest.mark.cgroupv2
def test_pids_limit_stops_fork_bomb(cg_client):
    def bomb():
        import os, time
        n = 0
        while True:
            try:
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                n += 1
            except OSError:
                print(n, flush=True)
                break
        time.sleep(0.2)

    child = cg_client.spawn_child(bomb, sandbox_config=SandboxConfig(pids=32, timeout=60))
    n = int(child.stdout.readline())
    st = child.wait(timeout=60)
    assert n <= 31  # 32 tasks: the payload (PID 1) + 31 forks
    assert st.pids_exceeded, st
    assert [p for p, _ in children_of(daemon_pid(cg_client))
            if b"zygote._zygote" not in cmdline(p) and os.path.exists(f"/proc/{p}")] == []


@pytest.mark.cgroupv2
def test_SECURITY_cpu_time_bounds_all_processes_of_a_child(cg_client):
    """cpu_time bounds the CPU of the whole child, not of each process. It was RLIMIT_CPU alone
    (per process): a payload whose forks each burned less than the limit used 12 CPU-seconds
    under cpu_time=2 and exited 0, cpu_time_exceeded=False. The daemon now counts the child's
    cgroup and kills it (SIGKILL, the whole pid namespace) once that reaches cpu_time. Here
    generations of parallel forks burn 0.8 s each (under the per-process limit), 14.4 s in all."""
    r = cg_client.run(_burners(6, 3, 0.8), sandbox_config=SandboxConfig(cpu_time=2, timeout=120))
    used = r.status.cpu_user + r.status.cpu_system  # the cgroup's: every process of the child
    assert r.status.cpu_time_exceeded, r.status
    assert r.returncode == -signal.SIGKILL, r.status
    assert not r.status.timed_out, r.status
    assert b"done" not in r.stdout, r.stdout
    assert 2.0 <= used <= 2.6, r.status  # killed near the budget, not after 14 s of CPU
    assert r.status.enforcement.get("cpu_time", "").startswith("cgroup"), r.status
    assert cg_client.run(print, ("still serving",)).stdout == b"still serving\n"


def _burners(generations=6, width=3, each=0.8):
    """Payload: `generations` rounds of `width` parallel forks burning `each` CPU-seconds apiece
    (each fork under a per-process limit of 1 s or more), each round's number printed, then
    "done" printed and returned. (A closure: a module-level function would be pickled by
    reference, and the child cannot import tests.)"""
    def burners():
        import os, time
        for g in range(generations):
            pids = []
            for _ in range(width):
                pid = os.fork()
                if pid == 0:
                    t = time.process_time()
                    while time.process_time() - t < each:
                        pass
                    os._exit(0)
                pids.append(pid)
            for pid in pids:
                os.waitpid(pid, 0)
            print(g, flush=True)
        print("done", flush=True)
        return "done"
    return burners


@pytest.mark.cgroupv2
def test_SECURITY_cpu_time_bounds_reserve_and_leased_children(tmp_path):
    """A pool whose default has cpu_time keeps reserve children with a cgroup; a request that takes
    one (through the daemon, or a leased child the client starts itself) is held to cpu_time over
    all its processes from its Job on, as a fresh clone is."""
    with config_daemon(tmp_path, """
            [pools.default]
            reserve = 2
            [pools.default.sandbox]
            cpu_time = 1.5
            """) as sock:
        for leases in (0, 2):
            with Client.connect(sock, leases=leases) as c:
                wait_for(lambda: len(c._aclient._leases) >= leases and sum(p.reserve_waiting for p in c.status().pools),
                         60, "the reserve (and the leases) filled")
                assert len(c._aclient._leases) == leases  # (the run below takes a held child)
                r = c.run(_burners())
                used = r.status.cpu_user + r.status.cpu_system
                assert r.status.cpu_time_exceeded and r.returncode == -signal.SIGKILL, (leases, r.status)
                assert 1.5 <= used <= 2.1, (leases, r.status)
                assert r.status.enforcement.get("cpu_time", "").startswith("cgroup"), (leases, r.status)
                assert c.call(sum, [1, 2]) == 3  # a short one is not killed


def test_SECURITY_cpu_time_without_cgroups_fails_closed(tmp_path):
    """cpu_time is counted in the child's cgroup: a daemon without usable cgroups refuses a
    request with cpu_time (step "cgroup", the fix in the hint) rather than run it held to a
    per-process rlimit only. Here the daemon runs in a mount namespace without /sys/fs/cgroup."""
    import subprocess
    import sys

    sock = str(tmp_path / "z.sock")
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                             f'umount -R /sys/fs/cgroup && exec "$0" -m zygote serve --socket {sock}',
                             sys.executable], stderr=subprocess.DEVNULL)
    try:
        wait_socket(sock, proc)
        with Client.connect(sock) as c:
            assert c.run(print, ("plain",)).stdout == b"plain\n"  # no limits: no cgroup needed
            with pytest.raises(SandboxUnavailable) as ei:
                c.run(_burners(), sandbox_config=SandboxConfig(cpu_time=1))
            assert ei.value.step == "cgroup" and "cpu_time" in str(ei.value), ei.value
    finally:
        stop_daemon(proc)


def test_cpu_quota(cg_client):
    def busy():
        import time
        end = time.monotonic() + 2
        while time.monotonic() < end:
            pass

    r = cg_client.run(busy, sandbox_config=SandboxConfig(cpu=0.5, timeout=30))
    used = r.status.cpu_user + r.status.cpu_system
    assert 0.75 <= used <= 1.25, r.status


@pytest.mark.cgroupv2
def test_timeout_with_limits(cg_client):
    t0 = time.monotonic()
    def spin():
        while True:
            pass

    r = cg_client.run(spin, sandbox_config=SandboxConfig(timeout=1, memory="100M"))
    assert r.status.timed_out and time.monotonic() - t0 < 3


def test_many_spawns_with_limits_leave_nothing(cg_client):
    dpid = daemon_pid(cg_client)
    cfg = SandboxConfig(memory="64M", pids=16)
    def settle():  # the daemon removes a cgroup after reporting the exit: wait for that to end
        deadline = time.monotonic() + 10
        while _zygote_dirs(dpid) and time.monotonic() < deadline:
            time.sleep(0.1)

    cg_client.run(print, sandbox_config=cfg)
    settle()
    base = fd_count(dpid)
    for i in range(200):
        r = cg_client.run(print, (i,), sandbox_config=cfg)
        assert r.returncode == 0
    settle()
    assert _zygote_dirs(dpid) == []
    assert [p for p, s in children_of(dpid) if s == "Z"] == []
    assert fd_count(dpid) == base


def test_SECURITY_a_child_killed_during_its_v1_attach_keeps_its_pid_until_the_write():
    """On cgroup v1 the daemon moves a child into its cgroup by pid number (cgroup.procs), from
    a worker thread. A child killed meanwhile (its client left, say) must stay unreaped until that
    write is done: once reaped, its number is free for any new process, which the write put into
    the child's cgroup, and the cgroup's removal then killed it (seen before the fix: a process of
    ours that took the number was killed by the daemon). Here the attach is slowed (test hook),
    the child killed, and a process started with the child's number if it is free."""
    import signal
    import threading

    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        pytest.skip("cgroup v2: children are born in their cgroup (CLONE_INTO_CGROUP), no attach by pid")
    with Client.embedded(test_hooks=True) as c:
        daemon = daemon_pid(c)
        before = set(sandbox_children(daemon))
        outcome: list[object] = []

        def spawn() -> None:
            try:
                outcome.append(c.spawn_child(print, sandbox_config=SandboxConfig(memory="64M"),
                                             _test_fail_step="cgroup-attach-delay"))
            except Exception as e:  # noqa: BLE001 - the spawn fails: its child was killed
                outcome.append(e)

        t = threading.Thread(target=spawn)
        t.start()
        deadline = time.monotonic() + 10
        new: list[int] = []
        while not new and time.monotonic() < deadline:
            new = [p for p in sandbox_children(daemon) if p not in before]
            time.sleep(0.01)
        assert len(new) == 1, new
        pid = new[0]
        os.kill(pid, signal.SIGKILL)  # (ours: the test's own daemon's child, by pid)
        time.sleep(0.3)  # the attach write is 1 s away
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        assert state == "Z", "the child was reaped while its attach by pid was still to come"
        # Take the number if it is free: the next pid the kernel hands out is ns_last_pid + 1.
        r, w = os.pipe()
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        squatter = os.fork()
        if squatter == 0:
            os.close(r)
            os.write(w, b"x")
            time.sleep(30)
            os._exit(0)
        os.close(w)
        try:
            os.read(r, 1)
            t.join(30)
            assert not t.is_alive()
            assert os.waitpid(squatter, os.WNOHANG) == (0, 0), "the daemon killed a process that took the child's number"
            with open(f"/proc/{squatter}/cgroup") as f:
                assert "zygote" not in f.read(), "a process that took the child's number was put in its cgroup"
        finally:
            os.close(r)
            os.kill(squatter, signal.SIGKILL)
            try:
                os.waitpid(squatter, 0)
            except ChildProcessError:  # (reaped above: the daemon killed it)
                pass
        assert outcome and isinstance(outcome[0], Exception), outcome  # its child is gone
        assert c.run(print, ("still serving",)).stdout == b"still serving\n"


def test_an_attach_failing_half_way_reports_its_own_error_and_leaves_nothing():
    """On cgroup v1 a child is moved into its cgroup one hierarchy at a time. A write that
    failed after the first left the child, alive and waiting for its plan, in the first
    hierarchy's directory: the removal then waited 2 s on it and its "still busy" error
    replaced the attach's (and the directory stayed until the daemon stopped). Now the child is
    killed first: the client gets the attach error, and no directory is left."""
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        pytest.skip("cgroup v2: one hierarchy, and children are born in their cgroup (no attach)")
    with Client.embedded(test_hooks=True) as c:
        daemon = daemon_pid(c)
        with pytest.raises(SandboxUnavailable) as e:
            c.spawn_child(print, sandbox_config=SandboxConfig(memory="64M", pids=16),
                          _test_fail_step="cgroup-attach-half")
        assert "attaching pid" in str(e.value) and "still busy" not in str(e.value), e.value
        deadline = time.monotonic() + 5
        while _zygote_dirs(daemon) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _zygote_dirs(daemon) == []
        assert c.run(print, ("still serving",), sandbox_config=SandboxConfig(memory="64M")).stdout == b"still serving\n"


@pytest.mark.cgroupv2
def test_a_request_refused_for_its_fds_leaves_no_cgroup(socket_daemon):
    """On cgroup v2 a child's cgroup (and an fd of it, for CLONE_INTO_CGROUP) is made before
    its clone. A request refused for the fds it carried (stdio='pipe' with fds, stdio='fds' with
    other than 3) was refused after that, on a path that did not remove it: any client could
    leave a cgroup and a daemon fd per request until the daemon stopped. (On v1 the cgroup
    comes after the clone: this holds there either way.)"""
    import array
    import socket
    from conftest import RawConn
    from zygote_client import _protocol as P

    def child_dirs() -> set[str]:
        return {d for d in glob.glob("/sys/fs/cgroup/**/zygote/d*/children/*", recursive=True)
                if os.path.isdir(d) and not d.endswith("/zygotes")}

    before = child_dirs()
    conn = RawConn(socket_daemon)
    r, w = os.pipe()
    try:
        conn.send(P.Hello(P.VERSION))
        assert isinstance(conn.reply(), P.Welcome)
        for req, (stdio, fds) in enumerate([("pipe", [r])] * 3 + [("fds", [r, w])] * 3, 1):
            msg = P.Spawn(req=req, kind="target", target="os:getcwd", stdio=stdio,
                          sandbox=SandboxConfig(memory="64M", pids=16))
            conn.sock.sendmsg([P.encode(msg, len(fds))],
                              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
            answer = conn.reply()
            assert isinstance(answer, P.SpawnFailed) and answer.code == "bad-request", answer
        assert child_dirs() == before
    finally:
        conn.sock.close()
        os.close(r)
        os.close(w)


@pytest.mark.cgroupv2
def test_SECURITY_all_children_share_one_bound_on_tasks(tmp_path):
    """RLIMIT_NPROC (1024) bounds one child, a child's own ``pids`` limit bounds that child; their
    sum was bounded by nothing: a client's 256 children could hold 262144 tasks, past the host's
    pid_max (32768 here; a helper's red-team, session 32: +4093 host tasks from 4 children).
    Everything the daemon starts now lives under zygote/d<pid>/children with pids.max =
    daemon.max_tasks: the zygotes and the children without a cgroup in its ``zygotes`` leaf
    (session 33), children with cgroups of their own beside it (until then counted apart).
    Here, under max_tasks = 200, a child with its own cgroup (pids = 400) takes 150 threads and
    one without a cgroup, then one with a memory limit, each try for 150: the sum stays below
    200 and the later ones fall short; with the bound full, spawns of either kind fail, step
    "clone", the hint naming max_tasks; the first child's tasks come back once it ends. Fails
    without the bound, or with it on the zygotes' leaf only (450 threads either way)."""
    def threads(n):
        import sys, threading
        stop = threading.Event()
        got = 0
        try:
            for _ in range(n):
                threading.Thread(target=stop.wait, daemon=True).start()
                got += 1
        except RuntimeError:  # "can't start new thread" (the clone's EAGAIN)
            pass
        print(got, flush=True)
        sys.stdin.read()  # hold them until the test lets go
        stop.set()

    with config_daemon(tmp_path, "max_tasks = 200\n") as sock, Client.connect(sock) as c:
        zygotes = [p for p, _ in children_of(daemon_pid(c)) if b"zygote._zygote" in cmdline(p)]  # (no child yet)
        own = c.spawn_child(threads, (150,), sandbox_config=SandboxConfig(pids=400))
        assert int(own.stdout.readline()) == 150
        plain = c.spawn_child(threads, (150,))
        limited = c.spawn_child(threads, (150,), sandbox_config=SandboxConfig(memory="256M"))
        got = [150, int(plain.stdout.readline()), int(limited.stdout.readline())]
        assert sum(got) < 200 and got[1] < 150 and got[2] < 150, got
        [work] = glob.glob(f"/sys/fs/cgroup/pids/**/zygote/d{daemon_pid(c)}/children", recursive=True) or \
            glob.glob(f"/sys/fs/cgroup/**/zygote/d{daemon_pid(c)}/children", recursive=True)
        with open(os.path.join(work, "pids.max")) as f:
            assert f.read().strip() == "200"
        with open(os.path.join(work, "zygotes", "cgroup.procs")) as f:
            assert set(zygotes) <= {int(x) for x in f.read().split()}, zygotes
        for cfg in (None, SandboxConfig(pids=10), SandboxConfig(memory="256M")):  # (the bound is full)
            with pytest.raises(SandboxUnavailable) as full:
                c.spawn_child(threads, (1,), sandbox_config=cfg)
            assert full.value.step == "clone" and "max_tasks" in full.value.hint, (cfg, full.value)
        for ch in (own, plain):
            ch.stdin.close()
            assert ch.wait().returncode == 0
        again = c.spawn_child(threads, (100,), sandbox_config=SandboxConfig(memory="256M"))
        assert int(again.stdout.readline()) == 100  # (the first child's tasks were given back)
        for ch in (limited, again):
            ch.stdin.close()
            st = ch.wait()
            # (its cgroup counts the forks the parent's bound refused, but it had no pids limit:
            # not "pids_exceeded", a helper's review)
            assert st.returncode == 0 and not st.pids_exceeded, st


@pytest.mark.cgroupv2
def test_a_reaper_s_fork_out_of_tasks_is_reported_as_the_bound(tmp_path):
    """With one task left in the zygotes' cgroup the clone takes it and the reaper's fork of the
    payload fails: that was reported as a confinement failure (SandboxError, step fork, no
    hint; a helper's review). It is the same shortage as a clone's: "unavailable", the hint
    naming max_tasks."""
    def fill():
        import sys, threading
        stop = threading.Event()
        ts = []
        try:
            while True:
                t = threading.Thread(target=stop.wait, daemon=True)
                t.start()
                ts.append(t)
        except RuntimeError:
            pass
        print(len(ts), flush=True)
        sys.stdin.read()
        stop.set()

    with config_daemon(tmp_path, "max_tasks = 40\n") as sock, Client.connect(sock) as c:
        small = c.spawn_child(input)  # one task, until it reads a line: then exactly that one is free
        hog = c.spawn_child(fill)
        assert int(hog.stdout.readline()) > 10
        small.stdin.write(b"\n")
        small.stdin.close()
        assert small.wait().returncode == 0  # its one task free again
        with pytest.raises(SandboxUnavailable) as short:
            c.spawn_child(print, sandbox_config=SandboxConfig(reaper=True))
        assert short.value.step == "fork" and "max_tasks" in short.value.hint, short.value
        hog.stdin.close()
        assert hog.wait().returncode == 0
