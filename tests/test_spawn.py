"""The foundation: stdio, environment, fds, pid namespace, user mapping, payload kinds, failures."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from zygote_client import Client, DaemonError, SandboxConfig, SandboxError
from conftest import (NS_GET_PARENT, NS_GET_USERNS, children_of, cmdline, config_daemon, daemon_pid, fd_count,
                      in_fork, owned_by_a_maker, rss_bytes, wait_for)


def test_stdio_order_and_streams(client):
    def payload():
        import os, sys
        print("one")
        sys.__stdout__.write("two\n")
        os.write(1, b"three\n")
        print("err-one", file=sys.stderr)
        os.write(2, b"err-two\n")
        print("four")

    r = client.run(payload)
    assert r.returncode == 0
    assert r.stdout == b"one\ntwo\nthree\nfour\n"
    assert r.stderr == b"err-one\nerr-two\n"


def test_stdin_bytes_arrive(client):
    r = client.run(lambda: print(__import__("sys").stdin.read().upper(), end=""), input=b"hello\nworld\n")
    assert r.stdout == b"HELLO\nWORLD\n"


def test_ten_megabytes_without_deadlock(client):
    def payload():
        import sys
        data = sys.stdin.buffer.read()
        sys.stdout.buffer.write(data)
        sys.stderr.buffer.write(data[:1000])

    blob = os.urandom(5 << 20).hex().encode()  # 10 MB
    r = client.run(payload, input=blob)
    assert r.returncode == 0
    assert r.stdout == blob
    assert r.stderr == blob[:1000]


def test_output_before_crash_is_kept(client):
    def payload():
        import ctypes
        print("before the crash")
        ctypes.string_at(0)  # a real segfault: the kernel's SIGSEGV kills even a PID 1

    r = client.run(payload)
    assert r.stdout == b"before the crash\n"
    assert r.returncode == -signal.SIGSEGV


def test_streams_while_running(client):
    child = client.spawn_child(lambda: (print("first", flush=True), __import__("time").sleep(30)))
    try:
        assert child.stdout.readline() == b"first\n"
        assert child.poll() is None
    finally:
        child.kill()
        st = child.wait(timeout=10)
    assert st.returncode == -signal.SIGKILL


def test_environment_is_exact(client):
    env = {"A": "1", "LANG": "C.UTF-8", "ODD NAME": "x y"}
    r = client.run(lambda: print(repr(dict(__import__("os").environ))), env=env)
    assert eval(r.stdout) == env


def test_pool_environment_default(client):
    r = client.run(lambda: print(repr(dict(__import__("os").environ))))
    assert eval(r.stdout) == {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp"}


def test_children_hold_no_client_library_beyond_the_protocol(client):
    """The zygote imports the client package for its protocol and sandbox configuration only:
    its clients and executor (anyio, asyncio) are memory every clone copies the page tables of
    and unmaps at exit, and their fork hook ran in every child. The package's public names all
    still resolve, loaded on first use."""
    def modules():
        import sys
        return sorted(m for m in sys.modules if m.split(".")[0] in ("anyio", "asyncio", "sniffio")
                      or m in ("zygote_client._async", "zygote_client._blocking", "zygote_client._executor"))
    assert client.run(modules).value == []
    r = subprocess.run([sys.executable, "-c", "import sys, zygote_client; eager = 'anyio' in sys.modules; "
                        "from zygote_client import *; "
                        "print(eager, all(getattr(zygote_client, n) is globals()[n] for n in zygote_client.__all__))"],
                       capture_output=True, text=True, check=True)
    assert r.stdout == "False True\n", r.stdout + r.stderr


def test_preload_signal_handlers_and_env_caps_do_not_reach_children(tmp_path):
    """The zygote drops the thread caps it set for its preloads unless the pool's environment
    has them, and a payload gets fresh signal handlers even when a preload installed its own."""
    (tmp_path / "zg_sig_preload.py").write_text(
        "import signal\n"
        "signal.signal(signal.SIGTERM, lambda *a: None)\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n")
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "4"}

    def payload():
        import os, signal, sys
        print(repr((dict(os.environ), signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
                    signal.getsignal(signal.SIGINT) is signal.default_int_handler,
                    "zg_sig_preload" in sys.modules)), flush=True)
        sys.stdin.read()

    with Client.embedded(preload_imports=["zg_sig_preload"], environment=env) as c:
        child = c.spawn_child(payload)
        seen = eval(child.stdout.readline())
        child.terminate()
        st = child.wait(timeout=10)
    assert seen == (env, True, True, True)  # OMP_NUM_THREADS stays: the pool's environment has it
    assert st.returncode == -signal.SIGTERM


def test_preload_c_level_signal_handler_does_not_reach_children(tmp_path):
    """A handler installed below Python (faulthandler.register: signal.getsignal still says
    SIG_DFL) must not survive into a payload: it dies of SIGUSR1 as a fresh process would."""
    (tmp_path / "zg_fh_preload.py").write_text(
        "import faulthandler, signal\nfaulthandler.register(signal.SIGUSR1)\n")
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": str(tmp_path)}

    def payload():
        import sys
        print("up", flush=True)
        sys.stdin.read()

    with Client.embedded(preload_imports=["zg_fh_preload"], environment=env) as c:
        child = c.spawn_child(payload)
        assert child.stdout.readline() == b"up\n"
        child.send_signal(signal.SIGUSR1)
        st = child.wait(timeout=10)
    assert st.returncode == -signal.SIGUSR1


def test_fds_above_2_are_closed(client):
    def payload():
        import os
        open_fds = []
        for fd in range(3, 1024):
            try:
                os.fstat(fd)
                open_fds.append(fd)
            except OSError as e:
                assert e.errno == 9
        print(open_fds)
        print(sorted(os.listdir("/proc/self/fd")))

    r = client.run(payload)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    # 5 is the result pipe (the payload's return value goes back on it); nothing else is open.
    assert lines[0] == "[5]", r.stderr
    assert lines[1] == "['0', '1', '2', '3', '5']"  # 3 is the directory listdir itself holds open


@pytest.mark.parametrize("reaper", [False, True])
def test_SECURITY_pidns_cannot_see_or_signal_host(client, reaper):
    host_pid = os.getpid()

    def payload():
        import os
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        print(pids)
        try:
            os.kill(host_pid, 0)
            print("reached")
        except ProcessLookupError:
            print("ESRCH")
        print(os.getpid())

    r = client.run(payload, sandbox_config=SandboxConfig(reaper=reaper))
    lines = r.stdout.decode().splitlines()
    # the payload is PID 1 itself, or PID 2 under the reaper: nothing else is visible
    assert lines[0] == ("[1, 2]" if reaper else "[1]"), r.stdout
    assert lines[1] == "ESRCH"
    assert lines[2] == ("2" if reaper else "1")


def test_SECURITY_tree_dies_with_child(client):
    # a grandchild that ignores SIGTERM and would sleep for a minute
    def payload():
        import os, signal, time
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            os.setsid()
            time.sleep(60)
            os._exit(0)
        print(pid, flush=True)
        time.sleep(60)

    child = client.spawn_child(payload)
    child.stdout.readline()
    outer = child.pid
    with open(f"/proc/{outer}/task/{outer}/children") as f:
        (inner,) = map(int, f.read().split())  # the grandchild's host pid
    child.terminate()
    st = child.wait(timeout=10)
    assert st.returncode == -signal.SIGTERM
    # PID 1 (outer) is reaped, so every process of its namespace is gone too
    assert not os.path.exists(f"/proc/{outer}")
    assert not os.path.exists(f"/proc/{inner}"), "the grandchild outlived its child"
    for pid, state in children_of(daemon_pid(client)):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert b"zygote._zygote" in f.read(), f"stray child {pid} ({state}) of the daemon"


def test_orphans_are_reaped_inside_with_a_reaper(client):
    def payload():
        import os, time
        for _ in range(5):
            if os.fork() == 0:          # child forks a grandchild and exits at once:
                if os.fork() == 0:      # the grandchild is orphaned to PID 1 and exits
                    os._exit(0)
                os._exit(0)
        time.sleep(0.5)
        zombies = []
        for p in os.listdir("/proc"):
            if p.isdigit():
                with open(f"/proc/{p}/stat") as f:
                    if f.read().split(") ")[1].startswith("Z"):
                        zombies.append(p)
        print(zombies)

    r = client.run(payload, sandbox_config=SandboxConfig(reaper=True))
    # the direct children are the payload's own to reap (as anywhere); orphans must not linger
    zombies = eval(r.stdout)
    assert len(zombies) <= 5, zombies


def test_without_reaper_orphans_die_with_the_payload(client):
    """The payload is PID 1: orphans it adopts are its zombies (it does not reap what it did not
    start), but nothing outlives it: the kernel ends the namespace with it."""
    def payload():
        import os, time
        for _ in range(3):
            if os.fork() == 0:
                if os.fork() == 0:      # orphaned to PID 1 (the payload); this one sleeps on
                    time.sleep(60)
                    os._exit(0)
                os._exit(0)
        time.sleep(0.3)
        print(os.getpid(), sum(1 for p in os.listdir("/proc") if p.isdigit()), flush=True)

    r = client.run(payload)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == b"1"
    assert int(r.stdout.split()[1]) >= 4  # itself, 3 orphans (and zombies of their parents)
    for pid, state in children_of(daemon_pid(client)):
        assert b"zygote._zygote" in cmdline(pid), f"stray child {pid} ({state}) of the daemon"


def test_children_start_with_no_signal_blocked():
    """The signal mask is inherited through fork and exec: a daemon started from a thread that
    blocked signals must not hand that on to its children (they would not die of SIGTERM)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})
    try:
        with Client.embedded() as c:  # its portal thread, so its daemon, inherit the mask
            r = c.run(lambda: print(open("/proc/self/status").read()))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    blk = [line for line in r.stdout.decode().splitlines() if line.startswith("SigBlk:")]
    assert blk and int(blk[0].split()[1], 16) == 0, blk


@pytest.mark.parametrize("reaper", [False, True])
def test_blocked_signal_reaches_sigwait(client, reaper):
    """A payload that blocks SIGTERM and waits for it with sigwait gets it from terminate(), as a
    subprocess would: a blocked signal is delivered as itself, never turned into a kill."""
    def waits():
        import signal
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        print("ready", flush=True)
        print("got", signal.sigwait({signal.SIGTERM}), flush=True)

    child = client.spawn_child(waits, sandbox_config=SandboxConfig(reaper=reaper), stdin=None)
    assert child.stdout.readline() == b"ready\n"
    child.terminate()
    assert child.wait(timeout=10).returncode == 0
    assert child.stdout.read() == f"got {int(signal.SIGTERM)}\n".encode()
    child.stdout.close(), child.stderr.close()


def test_sigterm_to_self_is_minus_15_with_a_reaper(client):
    r = client.run(lambda: os.kill(os.getpid(), signal.SIGTERM), sandbox_config=SandboxConfig(reaper=True))
    assert r.returncode == -15


@pytest.mark.parametrize("reaper", [False, True])
def test_signals_from_the_client_act_as_on_a_subprocess(client, reaper):
    """terminate()/send_signal() give subprocess results whether the payload is PID 1 (which the
    kernel shields from unhandled signals: the daemon delivers them) or PID 2 under a reaper:
    default actions kill with the signal's number, handlers run, SIGINT is KeyboardInterrupt,
    SIGSTOP/SIGCONT pause and resume, default-ignored signals change nothing. An uncaught
    KeyboardInterrupt prints its traceback first, as CPython does."""
    cfg = SandboxConfig(reaper=reaper)

    def handles_usr1():
        import signal, sys, time
        signal.signal(signal.SIGUSR1, lambda *_: (print("got usr1", flush=True), sys.exit(7)))
        print("ready", flush=True)
        time.sleep(60)

    def sleeper():
        import time
        print("ready", flush=True)
        time.sleep(60)

    def counter():
        import time
        print("ready", flush=True)
        while True:
            print(time.monotonic(), flush=True)
            time.sleep(0.02)

    for sig, expect in ((signal.SIGTERM, -signal.SIGTERM), (signal.SIGHUP, -signal.SIGHUP),
                        (signal.SIGUSR2, -signal.SIGUSR2), (signal.SIGINT, -signal.SIGINT)):
        child = client.spawn_child(sleeper, sandbox_config=cfg, stdin=None)
        assert child.stdout.readline() == b"ready\n"
        child.send_signal(signal.SIGWINCH)  # default: ignored
        child.send_signal(sig)
        st = child.wait(timeout=10)
        err = child.stderr.read()
        child.stdout.close(), child.stderr.close()
        assert st.returncode == expect, (sig, st)
        # Ctrl-C's exit, as CPython's own: the traceback first (there was none), then by SIGINT.
        assert (b"KeyboardInterrupt" in err) == (sig == signal.SIGINT), err
    child = client.spawn_child(handles_usr1, sandbox_config=cfg, stdin=None)
    assert child.stdout.readline() == b"ready\n"
    child.send_signal(signal.SIGUSR1)
    assert child.wait(timeout=10).returncode == 7
    assert child.stdout.read() == b"got usr1\n"
    child.stdout.close(), child.stderr.close()
    child = client.spawn_child(counter, sandbox_config=cfg, stdin=None)
    assert child.stdout.readline() == b"ready\n"
    # Default: stop. A PID-1 payload gets SIGSTOP from the daemon; under a reaper the payload's
    # process group is orphaned, where the kernel discards a SIGTSTP with its default action
    # (signal(7)), so the reaper sends SIGSTOP instead (Ctrl-Z through `zygote run`).
    child.send_signal(signal.SIGTSTP)
    time.sleep(0.3)
    os.set_blocking(child.stdout.fileno(), False)
    child.stdout.read()  # drain what it printed before it stopped
    time.sleep(0.3)
    assert child.stdout.read() is None, "the stopped child kept printing"
    child.send_signal(signal.SIGCONT)
    time.sleep(0.3)
    assert child.stdout.read(), "the continued child printed nothing"
    child.kill()
    assert child.wait(timeout=10).returncode == -signal.SIGKILL
    child.stdout.close(), child.stderr.close()


def test_SECURITY_uid_mapped_to_unprivileged_host_id(client):
    child = client.spawn_child(lambda: (print(os.getuid(), flush=True), time.sleep(30)))
    try:
        inside = int(child.stdout.readline())
        with open(f"/proc/{child.pid}/status") as f:
            status = f.read()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        gid_line = next(line for line in status.splitlines() if line.startswith("Gid:"))
        host_ids = {int(x) for x in uid_line.split()[1:] + gid_line.split()[1:]}
        assert 0 not in host_ids, status
        assert min(host_ids) >= 100000
        assert inside in (0, 65534)
    finally:
        child.kill()
        child.wait()


def test_SECURITY_cannot_rewrite_maps(client):
    def payload():
        for name, data in (("uid_map", "0 0 1\n"), ("gid_map", "0 0 1\n"), ("setgroups", "allow")):
            try:
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(data)
                print(name, "WRITTEN")
            except OSError as e:
                print(name, e.errno)

    r = client.run(payload)
    for line in r.stdout.decode().splitlines():
        assert "WRITTEN" not in line, r.stdout


def test_SECURITY_only_loopback_and_no_host_listener(client):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    def payload():
        import os, socket
        print(sorted(name for _, name in socket.if_nameindex()))
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
            print("CONNECTED")
        except OSError as e:
            print("refused", e.errno)

    try:
        r = client.run(payload)
    finally:
        listener.close()
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "['lo']"
    assert lines[1].startswith("refused")




def _netns_owner_and_inode(pid: int) -> tuple[int, int]:
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        owner = fcntl.ioctl(fd, NS_GET_USERNS)
        try:
            return os.fstat(owner).st_ino, os.fstat(fd).st_ino
        finally:
            os.close(owner)
    finally:
        os.close(fd)


def test_a_zygote_forks_nothing_before_the_daemon_placed_it():
    """The daemon moves a new zygote into its cgroup (under daemon.max_tasks) after starting
    it; a process the zygote forked before that (its namespace maker, a preload's helper)
    stayed in the daemon's cgroup, outside the bound (a helper's review: a race the move
    usually won). The zygote now waits for the daemon's b"P" before anything: until then it has
    no child and says nothing; then it starts as before."""
    import select
    sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    proc = subprocess.Popen([sys.executable, "-P", "-m", "zygote._zygote", str(theirs.fileno()), "json"],
                            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
    theirs.close()
    try:
        time.sleep(1.5)  # (its imports take ~0.1 s here: long enough to start its maker)
        assert children_of(proc.pid) == [] and not select.select([sock], [], [], 0)[0]
        sock.send(b"P")
        sock.settimeout(60)
        assert sock.recv(65536)[:1] == b"R"
        if os.geteuid() == 0:  # (only a root zygote has a namespace maker)
            assert len(children_of(proc.pid)) == 1
    finally:
        left = children_of(proc.pid)
        sock.close()
        proc.kill()
        proc.wait()
        for pid, _ in left:  # (its maker: ends with it anyway, PDEATHSIG)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class _DrivenZygote:
    """A zygote driven directly over its socket, as the daemon drives it: ``send`` one clone
    request (six fds: /dev/null as stdio, fresh control/status/result pipes, plus ``extra``,
    each closed here once sent; ``None`` in ``extra`` is /dev/null), ``reply`` reads one answer.
    Every child waits on its control pipe; at the end of the ``with`` EOF there makes each exit
    unrun, and ``pids`` (CLONE_PARENT: ours) are reaped."""

    def __init__(self) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.proc = subprocess.Popen([sys.executable, "-P", "-m", "zygote._zygote", str(theirs.fileno()), "json"],
                                     pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        self.sock.send(b"P")  # (placed: as the daemon says once the zygote is in its cgroup)
        self.keep: list[int] = []
        self.pids: dict[int, int] = {}

    def __enter__(self) -> "_DrivenZygote":
        try:
            self.sock.settimeout(60)
            assert self.sock.recv(65536)[:1] == b"R"
        except BaseException:
            self.proc.kill()
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, req: int, flags: int, extra: list = ()) -> None:
        from zygote._zygote import REQ
        null = os.open(os.devnull, os.O_RDWR)
        pipes = [os.pipe() for _ in range(3)]  # control, status, result
        fds = [null, null, null, pipes[0][0], pipes[1][1], pipes[2][1]]
        socket.send_fds(self.sock, [REQ.pack(req, flags, 0)], fds + [null if fd is None else fd for fd in extra])
        for fd in [null, pipes[0][0], pipes[1][1], pipes[2][1], pipes[1][0], pipes[2][0]] + [fd for fd in extra if fd]:
            os.close(fd)
        self.keep.append(pipes[0][1])  # the control pipe's write end: the child waits on it

    def reply(self) -> tuple[int, int, int]:
        from zygote._zygote import REP
        rreq, pid, err = REP.unpack(self.sock.recv(64))
        if pid > 0:
            self.pids[rreq] = pid
        return rreq, pid, err

    def close(self) -> None:
        for fd in self.keep:
            os.close(fd)
        for pid in self.pids.values():
            os.waitpid(pid, 0)
        self.sock.close()
        self.proc.wait(timeout=30)


@pytest.mark.skipif(os.geteuid() != 0, reason="a rootless zygote cannot make namespaces ahead (CLONE_NEWNET then)")
def test_SECURITY_netns_not_owned_by_the_child(client):
    """The child's network namespace is made ahead for the zygote and owned by a user namespace
    of its own (zygote/_nsmaker.py), not the child's: not even the child's root (before the drop)
    could reconfigure it. Each child still gets its own, with lo up."""
    def payload():
        import socket, sys
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:  # (Landlock may deny TCP)
            u.bind(("127.0.0.1", 0))
            u.sendto(b"ping", u.getsockname())  # ENETUNREACH unless lo is up
            print("lo ok" if u.recv(10) == b"ping" else "lo?", flush=True)
        sys.stdin.read()

    host_user = os.stat("/proc/self/ns/user").st_ino
    host_net = os.stat("/proc/self/ns/net").st_ino
    kids, seen = [], set()
    try:
        for _ in range(3):
            time.sleep(0.2)  # the zygote makes the next namespace while it is idle
            child = client.spawn_child(payload)
            kids.append(child)
            assert child.stdout.readline() == b"lo ok\n"
            owner, net = _netns_owner_and_inode(child.pid)
            own_user = os.stat(f"/proc/{child.pid}/ns/user").st_ino
            assert owner not in (host_user, own_user) and owned_by_a_maker(child.pid)
            assert net != host_net and net not in seen
            seen.add(net)
    finally:
        for child in kids:
            child.kill()
            child.wait(timeout=10)


def test_zygote_netns_ahead_goes_home_after_each_handout():
    """The bookkeeping of netns.Ahead with recorded calls: ready only after a namespace was made,
    entered (its fd closed) and lo brought up; home after every handout; disabled for good when
    namespaces cannot be made here, or after repeated failures; a failing lo up goes home and
    disables it."""
    from zygote._clone import CLONE_NEWNET
    from zygote.layers.netns import Ahead
    calls: list = []

    def make():
        calls.append("make")
        return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)

    def setns(fd, nstype):
        calls.append(("setns", nstype))

    fds_before = len(os.listdir("/proc/self/fd"))
    ns = Ahead(make, lambda: calls.append("lo"), setns)
    assert ns.enabled and calls == [("setns", CLONE_NEWNET)]  # the way home is tried first
    assert not Ahead(None, lambda: None, setns).enabled  # (nothing to make them with)
    fds_before += 2  # (each Ahead holds its way home)
    calls.clear()
    ns.prepare()
    assert ns.ready and calls == ["make", ("setns", CLONE_NEWNET), "lo"]
    assert len(os.listdir("/proc/self/fd")) == fds_before  # the namespace's fd: entered, closed
    calls.clear()
    ns.go_home()
    assert not ns.ready and calls == [("setns", CLONE_NEWNET)]
    # A given namespace (join) keeps the one made ahead for the next clone: back into it after,
    # ready again, its fd closed; without one made ahead, home.
    ns.prepare()
    calls.clear()
    ns.join(99)
    assert not ns.ready and ns._parked >= 0 and calls == [("setns", CLONE_NEWNET)]
    ns.go_home()
    assert ns.ready and ns._parked == -1 and len(os.listdir("/proc/self/fd")) == fds_before
    ns.go_home()
    ns.join(99)
    assert ns._parked == -1
    ns.go_home()
    assert not ns.ready

    def refuse():
        raise OSError(errno.EPERM, "no")
    ns = Ahead(refuse, lambda: None, setns)
    ns.prepare()
    assert not ns.enabled and not ns.ready

    def flaky():
        raise OSError(errno.EIO, "the server died")
    ns = Ahead(flaky, lambda: None, setns)
    for _ in range(Ahead.FAILS - 1):
        ns.prepare()
        assert ns.enabled and not ns.ready  # (tried again when idle)
    ns.prepare()
    assert not ns.enabled

    def bad_lo():
        raise OSError(errno.EPERM, "no")
    calls.clear()
    ns = Ahead(make, bad_lo, setns)
    ns.prepare()
    assert not ns.enabled and not ns.ready and calls[-1] == ("setns", CLONE_NEWNET)


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root daemon makes idmapped binds")
def test_idmap_maker_maps_one_id_one_way_and_every_other_to_itself():
    """zygote._nsmaker.IdmapMaker: a user namespace (a child of the host's) whose uid map takes
    the first uid asked for to the second and whose gid map the first gid to the second, every
    other id to itself, and nothing to the first or from the second (the first version swapped
    them: see test_SECURITY_a_client_handed_its_child_s_idmapped_mount_makes_nothing_through_it);
    at the ends of the id space too; a bad request gets EINVAL, and the server goes on."""
    from zygote._nsmaker import IdmapMaker, _ALL_IDS, one_way_map

    def maps(fd: int) -> str:
        def inside() -> str:  # (in a fork: one thread, as setns into a user namespace needs)
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, 0x10000000) != 0:  # CLONE_NEWUSER
                return f"setns: {os.strerror(ctypes.get_errno())}"
            return open("/proc/self/uid_map").read() + "|" + open("/proc/self/gid_map").read()
        return in_fork(inside)

    def table(text: bytes) -> list[tuple[int, int, int]]:
        return sorted(tuple(map(int, line.split())) for line in text.decode().splitlines() if line.strip())

    assert one_way_map(7, 7) == b"0 0 %d\n" % _ALL_IDS
    assert table(one_way_map(_ALL_IDS - 1, 0)) == [(1, 1, _ALL_IDS - 2), (_ALL_IDS - 1, 0, 1)]
    maker = IdmapMaker()
    try:
        fd = maker.make(4001, 1_000_065_534, 4242, 1_000_065_533)
        try:
            got = maps(fd)
        finally:
            os.close(fd)
        uid_map, gid_map = (table(part.encode()) for part in got.split("|"))
        assert uid_map == [(0, 0, 4001), (4001, 1_000_065_534, 1), (4002, 4002, 1_000_065_534 - 4002),
                           (1_000_065_535, 1_000_065_535, _ALL_IDS - 1_000_065_535)], got
        assert (4242, 1_000_065_533, 1) in gid_map and not any(
            first <= 1_000_065_533 < first + n or low <= 4242 < low + n for first, low, n in gid_map if first != 4242), got
        with pytest.raises(OSError) as ei:
            maker._ask(b"u")
        assert ei.value.errno == errno.EINVAL
        os.close(maker.make(1, 2, 3, 4))  # (still answering)
    finally:
        maker.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root daemon makes idmapped binds")
def test_idmap_maker_gives_a_kept_namespace_again_for_the_same_ids_only():
    """The idmap maker keeps its last namespaces (IdmapMaker.KEEP) and gives the same one, as a
    new fd, for the same four ids; other ids get another; the oldest goes past KEEP; close()
    lets every kept one go."""
    from zygote._nsmaker import IdmapMaker

    def ino(fd: int) -> int:
        try:
            return os.fstat(fd).st_ino
        finally:
            os.close(fd)
    maker = IdmapMaker()
    maker.KEEP = 2
    try:
        a = maker.make(4001, 1_000_004_001, 4242, 1_000_004_001)
        b = maker.make(4001, 1_000_004_001, 4242, 1_000_004_001)
        assert a != b
        first = ino(a)
        assert ino(b) == first  # (a new fd of the same namespace)
        other = ino(maker.make(4002, 1_000_004_002, 4242, 1_000_004_002))
        assert other != first
        group = ino(maker.make(4001, 1_000_004_001, 4243, 1_000_004_001))  # (the first one goes)
        assert group not in (first, other)
        assert list(maker._kept) == [(4002, 1_000_004_002, 4242, 1_000_004_002),
                                     (4001, 1_000_004_001, 4243, 1_000_004_001)]
        assert ino(maker.make(4001, 1_000_004_001, 4243, 1_000_004_001)) == group
        kept = list(maker._kept.values())
    finally:
        maker.close()
    assert not maker._kept
    for fd in kept:
        with pytest.raises(OSError):
            os.fstat(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root daemon makes idmapped binds")
def test_idmap_maker_s_helper_dies_with_a_server_killed_mid_request():
    """The idmap server forks a helper per namespace, which stops itself until the server has
    written its maps. A server killed meanwhile (its 5 s answer timeout, the OOM killer) left
    the helper stopped under PID 1, holding a user namespace, when the server led a session of
    its own (a helper's review): the helper now dies with it (PR_SET_PDEATHSIG). The server
    here is a fork that stalls at the map write."""
    from zygote import _nsmaker
    r, w = os.pipe()
    server = os.fork()
    if server == 0:
        try:
            os.close(r)
            os.setsid()  # (as a service's would: no orphaned-group SIGHUP to clean up after it)
            real_open = os.open

            def stall(path, *args, **kwargs):
                if str(path).endswith("/uid_map"):
                    os.write(w, str(path).split("/")[2].encode())
                    time.sleep(60)
                return real_open(path, *args, **kwargs)

            os.open = stall
            _nsmaker._userns_with_maps(ctypes.CDLL(None, use_errno=True), b"0 0 1\n", b"0 0 1\n")
        finally:
            os._exit(0)
    os.close(w)
    try:
        helper = int(os.read(r, 16))
    finally:
        os.close(r)
    assert "T" in _proc_state(helper)  # (stopped, waiting for its maps)
    os.kill(server, signal.SIGKILL)  # (our own fork, by pid)
    os.waitpid(server, 0)
    try:
        wait_for(lambda: _proc_state(helper) in ("", "Z"), 5, "the helper to die with its server")
    finally:
        if _proc_state(helper) not in ("", "Z"):
            os.kill(helper, signal.SIGKILL)  # (a stray of this test's own server)


def _proc_state(pid: int) -> str:
    """The State letter of /proc/PID/status; "" when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(line.split()[1] for line in f if line.startswith("State:"))
    except (OSError, StopIteration):
        return ""


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root daemon makes network namespaces ahead")
def test_netns_maker_hands_out_namespaces_of_its_own_and_ends_with_its_starter():
    """zygote._nsmaker: each namespace is new, owned by the server's user namespace (a child of
    the host's, not the host's: the host's device events never reach it), and not held by the
    server once handed out; a server that died is replaced at the next request; close() ends it,
    and so does the end of the process that started it (nothing left behind)."""
    from zygote._nsmaker import NetnsMaker
    host_user = os.stat("/proc/self/ns/user").st_ino
    maker = NetnsMaker()
    fds = []
    try:
        for _ in range(2):
            fds.append(maker.make())
        owner = fcntl.ioctl(fds[0], NS_GET_USERNS)
        try:
            parent = fcntl.ioctl(owner, NS_GET_PARENT)
            assert os.fstat(owner).st_ino != host_user and os.fstat(parent).st_ino == host_user
            os.close(parent)
            other = fcntl.ioctl(fds[1], NS_GET_USERNS)
            assert os.fstat(other).st_ino == os.fstat(owner).st_ino  # (one user namespace, once)
            os.close(other)
        finally:
            os.close(owner)
        inodes = {os.fstat(fd).st_ino for fd in fds}
        server = maker._proc
        assert len(inodes) == 2 and os.stat(f"/proc/{server.pid}/ns/net").st_ino not in inodes
        server.kill()  # (our own process, by pid)
        server.wait()
        fds.append(maker.make())
        assert maker._proc is not server and os.fstat(fds[-1]).st_ino not in inodes
        maker.close()
        assert maker._proc is None
        with pytest.raises(OSError):
            maker.make()
    finally:
        maker.close()
        for fd in fds:
            os.close(fd)
    # A starter that ends without closing: its server reads EOF and ends too.
    starter = subprocess.Popen([sys.executable, "-c", "import time; from zygote._nsmaker import NetnsMaker; "
                                "m = NetnsMaker(); m.make(); print(m._proc.pid, flush=True); time.sleep(60)"],
                               stdout=subprocess.PIPE)
    try:
        server_pid = int(starter.stdout.readline())
        assert "_nsmaker.py" in open(f"/proc/{server_pid}/cmdline").read()
    finally:
        starter.kill()  # (our own process, by pid)
        starter.wait()
        starter.stdout.close()
    wait_for(lambda: not os.path.exists(f"/proc/{server_pid}"), what="the orphaned server to end")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_SECURITY_a_root_process_without_capabilities_cannot_reach_the_namespace_maker():
    """A process of the host's root uid holds every capability in a user namespace root owns,
    even with none of its own: it could trace the namespace maker's server (or enter its
    namespaces) and seed every namespace it hands out (a helper's review). The server is not
    dumpable, so that takes CAP_SYS_PTRACE in the host's user namespace. Fails with the server
    dumpable: the capability-less process opens its user namespace. (Control: the same process
    opens that of a capability-less process of ours.)"""
    from zygote._nsmaker import NetnsMaker
    maker = NetnsMaker()
    control = subprocess.Popen(["setpriv", "--inh-caps=-all", "--bounding-set=-all", "sleep", "60"])
    try:
        os.close(maker.make())
        probe = ("import os, sys\n"
                 "for pid in sys.argv[1:]:\n"
                 "    try:\n"
                 "        os.close(os.open(f'/proc/{pid}/ns/user', os.O_RDONLY)); print('opened')\n"
                 "    except OSError as e:\n"
                 "        print(e.strerror)\n")
        wait_for(lambda: b"sleep" in cmdline(control.pid), what="the control to exec")
        r = subprocess.run(["setpriv", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-c", probe,
                            str(control.pid), str(maker._proc.pid)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split("\n")[:2] == ["opened", "Permission denied"], r.stdout
    finally:
        control.kill()  # (our own process, by pid)
        control.wait()
        maker.close()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_a_namespace_maker_that_could_not_set_itself_up_is_replaced():
    """A server whose own namespaces could not be made at its start (here: user.max_net_namespaces
    at 0 in a user namespace of the test's) says so and ends; once namespaces can be made again,
    the next request gets one from a new server. (Before, the first server stayed and refused
    every request until its starter ended: a helper's review.)"""
    script = textwrap.dedent("""
        import errno, os
        from zygote._nsmaker import NetnsMaker
        def limit(n):
            with open("/proc/sys/user/max_net_namespaces", "w") as f:
                f.write(str(n))
        m = NetnsMaker()
        limit(0)
        try:
            os.close(m.make())
            print("made")
        except OSError as e:
            print("refused", errno.errorcode.get(e.errno))
        limit(1000)
        os.close(m.make())
        print("made")
        m.close()
        """)
    r = subprocess.run(["unshare", "-U", "-r", sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["refused", "ENOSPC", "made"], r.stdout


def test_the_daemon_sends_a_clone_request_with_every_fd_a_child_may_get():
    """A networked spawn with limits on cgroup v2 hands the zygote eight fds (stdio, control,
    status, result, its cgroup, its prepared network namespace), and idmapped binds one more
    each (up to MAX_TREES); the daemon's side packs them (it refused more than seven, so such a
    spawn failed with an internal error; then more than eight, so a spawn with a client's bind
    did)."""
    from zygote._childproto import MAX_TREES
    from zygote._pool import _fd_array
    assert len(_fd_array(list(range(8)))) == 8 * 4
    assert len(_fd_array(list(range(8 + MAX_TREES)))) == (8 + MAX_TREES) * 4
    with pytest.raises(AssertionError):
        _fd_array(list(range(9 + MAX_TREES)))


@pytest.mark.skipif(os.geteuid() != 0, reason="a rootless zygote cannot make namespaces ahead (CLONE_NEWNET then)")
def test_zygote_netns_ahead_and_fallback():
    """Driven directly: a clone after an idle moment gets the namespace made ahead (owned by the
    zygote's namespace maker); a request already waiting behind another gets CLONE_NEWNET (owned
    by the child's user namespace) rather than waiting for one to be made; the zygote leaves each
    handed-on one."""
    from zygote._clone import ALL_NAMESPACES, CLONE_PARENT
    with _DrivenZygote() as z:
        time.sleep(0.3)  # idle: the zygote makes a namespace ahead
        # Both requests queued before the zygote reads the first (stopped meanwhile: a test
        # preempted between the two sends on a loaded host let it make the next one ahead, and
        # the second request took that one; seen once in a CI-like run).
        os.kill(z.proc.pid, signal.SIGSTOP)  # (our own zygote process, by pid)
        try:
            for req in (1, 2):
                z.send(req, ALL_NAMESPACES | CLONE_PARENT)
        finally:
            os.kill(z.proc.pid, signal.SIGCONT)
        for req in (1, 2):
            rreq, pid, err = z.reply()
            assert (rreq, err) == (req, 0) and pid > 0
        host_user = os.stat("/proc/self/ns/user").st_ino
        (owner1, net1), (owner2, net2) = (_netns_owner_and_inode(z.pids[r]) for r in (1, 2))
        assert owner1 != host_user and owned_by_a_maker(z.pids[1])  # made ahead
        assert owner2 == os.stat(f"/proc/{z.pids[2]}/ns/user").st_ino  # CLONE_NEWNET: no waiting
        assert net1 != net2
        assert os.stat(f"/proc/{z.proc.pid}/ns/net").st_ino not in (net1, net2)


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root daemon prepares network namespaces")
def test_zygote_keeps_its_netns_made_ahead_across_a_given_one():
    """Driven directly: a clone into a namespace the daemon gave does not cost the zygote the one
    it made ahead while idle. A request queued right behind (no idle moment in between) gets that
    one (owned by the zygote's namespace maker, lo up), not a CLONE_NEWNET of its own. (Before, the
    zygote let it go at every given clone and made another when idle.)"""
    from zygote._zygote import GIVEN_NETNS
    from zygote._clone import ALL_NAMESPACES, CLONE_PARENT
    from zygote._nsmaker import NetnsMaker
    from zygote.layers.network import _new_netns
    with _DrivenZygote() as z:
        time.sleep(0.3)  # idle: the zygote makes a namespace ahead
        zygote_ns = os.readlink(f"/proc/{z.proc.pid}/ns/net")
        assert zygote_ns != os.readlink("/proc/self/ns/net")  # it sits in the one made ahead
        maker = NetnsMaker()
        try:
            nsfd, sock = _new_netns(maker)
        finally:
            maker.close()
        sock.close()
        given = os.fstat(nsfd).st_ino
        base = ALL_NAMESPACES | CLONE_PARENT
        z.send(1, base | GIVEN_NETNS, [nsfd])
        z.send(2, base)  # waiting already when request 1 is done
        for req in (1, 2):
            rreq, pid, err = z.reply()
            assert (rreq, err) == (req, 0) and pid > 0
        assert _netns_owner_and_inode(z.pids[1])[1] == given
        owner, net = _netns_owner_and_inode(z.pids[2])
        assert owned_by_a_maker(z.pids[2]), "a CLONE_NEWNET of its own: the namespace made ahead was let go"
        assert f"net:[{net}]" == zygote_ns
        assert z.proc.poll() is None


@pytest.mark.cgroupv2
@pytest.mark.skipif(os.geteuid() != 0, reason="only a root daemon prepares network namespaces")
def test_zygote_clones_into_a_given_netns_and_goes_home():
    """Driven directly: a request carrying a network namespace (GIVEN_NETNS, as the daemon sends
    for a networked spawn) clones the child into it, and the zygote is not left in it: a request
    queued right behind (no idle moment to make a namespace of its own) that shares the zygote's
    namespace gets the zygote's home, not that child's. One that carries a cgroup fd too (a
    networked spawn with limits on cgroup v2: eight fds) is answered, not taken for corruption
    (the zygote read at most seven and exited); its cgroup fd is not a cgroup here, so that clone
    fails with an errno and the zygote goes on serving. An fd that is not a network namespace is
    answered apart (pid -2: the daemon then gives that zygote none and retries)."""
    from zygote._zygote import GIVEN_NETNS
    from zygote._clone import ALL_NAMESPACES, CLONE_INTO_CGROUP, CLONE_NEWNET, CLONE_PARENT
    from zygote._nsmaker import NetnsMaker
    from zygote.layers.network import _new_netns
    given = []
    maker = NetnsMaker()
    # A cgroup v2 directory to clone into, where there is a v2 hierarchy (the guest's; on a hybrid
    # host its near-empty "unified" one): under a "zygote" directory, as everything the project makes.
    root = next((r for r in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified") if os.path.exists(f"{r}/cgroup.procs")
                 and os.path.exists(f"{r}/cgroup.controllers")), None)
    cgroup = f"{root}/zygote/test-given-netns-{os.getpid()}" if root else None
    if cgroup is not None:
        os.makedirs(cgroup)
    try:
        with _DrivenZygote() as z:

            def netns() -> int:
                nsfd, sock = _new_netns(maker)
                sock.close()
                given.append(os.fstat(nsfd).st_ino)
                return nsfd

            base = ALL_NAMESPACES | CLONE_PARENT
            z.send(0, base | GIVEN_NETNS, [None])  # not a namespace: nothing cloned, said so apart (-2)
            assert z.reply() == (0, -2, errno.EINVAL)
            z.send(1, base | GIVEN_NETNS | CLONE_INTO_CGROUP, [None, netns()])  # (None: /dev/null as the cgroup)
            rreq, pid, err = z.reply()
            assert rreq == 1 and pid == -1 and err != 0
            if cgroup is not None:  # a real one (cgroup v2): born in it and in the given namespace
                z.send(4, base | GIVEN_NETNS | CLONE_INTO_CGROUP,
                       [os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY), netns()])
                rreq, pid, err = z.reply()
                assert (rreq, err) == (4, 0) and pid > 0
                assert _netns_owner_and_inode(pid)[1] == given[-1]
                with open(f"/proc/{pid}/cgroup") as f:
                    assert any(line.startswith("0::") and cgroup.endswith(line.strip()[3:]) for line in f), cgroup
            z.send(2, base | GIVEN_NETNS, [netns()])
            given_2 = given[-1]
            z.send(3, base & ~CLONE_NEWNET)  # waiting already when request 2 is done
            for req in (2, 3):
                rreq, pid, err = z.reply()
                assert (rreq, err) == (req, 0) and pid > 0
            assert _netns_owner_and_inode(z.pids[2])[1] == given_2  # born in the given one
            assert owned_by_a_maker(z.pids[2])
            assert _netns_owner_and_inode(z.pids[3])[1] == os.stat("/proc/self/ns/net").st_ino  # the zygote's home
            assert z.proc.poll() is None
    finally:
        maker.close()
        if cgroup is not None:
            os.rmdir(cgroup)
            with contextlib.suppress(OSError):  # (another run's may be in it)
                os.rmdir(os.path.dirname(cgroup))


def test_closure_runs(client):
    secret = [1, 2, 3]
    factor = 7
    r = client.run(lambda: print(sum(secret) * factor))
    assert r.stdout == b"42\n"


def test_module_function_with_args(client):
    r = client.run("builtins:print", ("a", "b"), kwargs={"sep": "-"})
    assert r.stdout == b"a-b\n"


def test_payload_exception_traceback(client):
    def payload():
        raise ValueError("bad thing")

    r = client.run(payload)
    assert r.returncode == 1
    err = r.stderr.decode()
    assert "Traceback" in err and "ValueError: bad thing" in err
    assert "zygote/child.py" not in err


def test_sys_exit_code(client):
    assert client.run(sys.exit, (7,)).returncode == 7
    assert client.run(lambda: sys.exit()).returncode == 0


def test_preloaded_modules_present(client):
    r = client.run(lambda: print("colorsys" in sys.modules, "json" in sys.modules))
    assert r.stdout == b"True True\n"


@pytest.mark.parametrize("step", ["userns", "oom_score_adj", "mounts", "netns", "rlimits", "uts", "payload"])
def test_injected_setup_failure_names_step(client, step, shared_dir):
    # (the host's tree, and a directory the child's uid may write: the marker would be made
    # if the payload ran; tmp_path was neither, so the check below could not fail)
    os.chmod(shared_dir, 0o777)
    marker = os.path.join(shared_dir, "ran")
    with pytest.raises(SandboxError) as ei:
        client.spawn_child(lambda: open(marker, "w").close(), _test_fail_step=step, _test_relax_mounts=True)
    assert ei.value.step == step
    assert not os.path.exists(marker)
    client.run(lambda: open(marker, "w").close(), _test_relax_mounts=True)  # (control)
    assert os.path.exists(marker)


def test_test_hooks_refused_without_flag(socket_daemon):
    from zygote_client import DaemonError
    with Client.connect(socket_daemon) as c:
        with pytest.raises(DaemonError):
            c.spawn_child(print, _test_fail_step="mounts")


def test_many_spawns_no_leaks(client):
    dpid = daemon_pid(client)
    client.run(print)
    base_fds = fd_count(dpid)

    def rss() -> int:  # KiB
        return rss_bytes(dpid) >> 10

    for _ in range(20):
        client.run(print)
    base_rss = rss()
    for i in range(300):
        r = client.run(print, (i,))
        assert r.stdout == f"{i}\n".encode()
    time.sleep(0.2)
    zombies = [p for p, state in children_of(dpid) if state == "Z"]
    assert zombies == []
    assert fd_count(dpid) == base_fds
    assert rss() - base_rss < 8 * 1024, "daemon RSS grew by more than 8 MiB over 300 spawns"


def test_two_clients_concurrently(socket_daemon):
    results: dict[int, list[bytes]] = {}

    def worker(n: int) -> None:
        with Client.connect(socket_daemon) as c:
            results[n] = [c.run(print, (f"client{n}-{i}",)).stdout for i in range(20)]

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for n in range(2):
        assert results[n] == [f"client{n}-{i}\n".encode() for i in range(20)]


def test_child_main_pool():
    with Client.embedded(child_main="builtins:print") as c:
        assert c.run(None, ("via", "child_main")).stdout == b"via child_main\n"


def test_preload_failure_is_clear():
    from zygote_client import ZygoteError
    with pytest.raises(ZygoteError) as ei:
        Client.embedded(preload_imports=["no_such_module_zz"])
    assert "no_such_module_zz" in str(ei.value)


def test_process_name(client):
    r = client.run(lambda: print(open("/proc/self/comm").read().strip()), process_name="my-worker")
    assert r.stdout == b"my-worker\n", r.stderr


def test_zygote_killed_during_burst_retriable_and_recovers():
    """kill -9 of the zygote while 4 threads spawn: the failures are retriable DaemonErrors, the
    pool restarts its zygote, later spawns work, and the daemon has no more fds than before."""
    import signal
    import threading

    with Client.embedded(preload_imports=["json"]) as c:
        dpid = daemon_pid(c)
        c.run(print)
        time.sleep(0.3)
        base = fd_count(dpid)
        zygotes = [p for p, _ in children_of(dpid) if b"zygote._zygote" in cmdline(p)]
        assert len(zygotes) == 1
        errors: list[BaseException] = []
        ok = [0]
        stop = threading.Event()

        def burst():
            while not stop.is_set():
                try:
                    r = c.run(print, ("x",))
                    assert r.stdout == b"x\n"
                    ok[0] += 1
                except DaemonError as e:
                    errors.append(e)

        threads = [threading.Thread(target=burst) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        # Stop it first so the burst's next clone requests are surely in flight, then kill it.
        os.kill(zygotes[0], signal.SIGSTOP)
        time.sleep(0.3)
        os.kill(zygotes[0], signal.SIGKILL)
        time.sleep(1.5)
        stop.set()
        for t in threads:
            t.join(60)
        assert errors, "no spawn saw the zygote die"
        assert all(e.retriable and e.code == "retry" for e in errors), errors
        assert c.run(print, ("after",)).stdout == b"after\n"
        new = [p for p, _ in children_of(dpid) if b"zygote._zygote" in cmdline(p)]
        assert len(new) == 1 and new != zygotes
        deadline = time.monotonic() + 10
        while fd_count(dpid) > base and time.monotonic() < deadline:
            time.sleep(0.1)
        assert fd_count(dpid) <= base
        while [p for p, s in children_of(dpid) if s == "Z"] and time.monotonic() < deadline:
            time.sleep(0.1)  # the killed zygote and the last children are reaped asynchronously
        assert [p for p, s in children_of(dpid) if s == "Z"] == []


def test_the_raw_clone_works_with_a_small_tid():
    """The zygote's raw clone needs the address of glibc's cached tid. It was found by the tid's
    value in the thread's descriptor only: as PID 1 of a pid namespace (a container's
    entrypoint, or early after a pid wrap) other fields hold the same small number, and the
    zygote refused to clone ("cannot locate glibc's cached tid"; the suite hit it once after the
    host's pids wrapped). Now the kernel's tid address (PR_GET_TID_ADDRESS) comes first, and
    the search, where that is missing, settles a tie with a fork: both are checked here."""
    code = (
        "import os\n"
        "from zygote._clone import Cloner\n"
        "assert os.getpid() == 1\n"
        "c = Cloner()\n"
        # the search the prctl spares: its fork settles on the same field
        "from zygote._clone import _libc, _holding_tid, _changed_in_a_fork\n"
        "me = _libc.pthread_self()\n"
        "hits = _holding_tid(me, range(0, 4096 - 3, 4))\n"
        "assert len(hits) > 1 and _changed_in_a_fork(me, hits) == [c._tid_addr - me], hits\n"
        "pid = c.clone(0)\n"
        "if pid == 0:\n"  # raise() signals the cached tid: right only if the clone set it
        "    import signal\n"
        "    signal.signal(signal.SIGUSR1, lambda *a: os._exit(7))\n"
        "    signal.raise_signal(signal.SIGUSR1)\n"
        "    os._exit(1)\n"
        "print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n"
    )
    r = subprocess.run(["unshare", "--pid", "--fork", sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert (r.returncode, r.stdout) == (0, "7\n"), r.stderr


# ---- CPython's fork hooks: the lean clone (zygote/_clone.py) ----------------------------------------

_DRAWS = textwrap.dedent("""
    import multiprocessing, random, numpy
    numpy.random.standard_normal()  # an odd number of normals: numpy caches the second
    random.random()
""")

_CHILD_STATE = """
    def child_state():
        import concurrent.futures, logging, random, sys, threading, numpy
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # threads, locks, logging: as after os.fork
            assert sorted(pool.map(abs, [-1, -2])) == [1, 2]
        logging.getLogger("zg").warning("logged")
        assert threading.current_thread() is threading.main_thread() and threading.active_count() == 1
        preload = next(m for name, m in sys.modules.items() if name.startswith("zg_"))
        normal = float(numpy.random.standard_normal())
        own = getattr(preload, "rng", None)
        return {"random": random.random(), "numpy": float(numpy.random.rand()), "normal": normal,
                "authkey": __import__("multiprocessing").current_process().authkey.hex(),
                "lean": sys.modules["__main__"]._cloner.lean is not None,
                "hook_ran": getattr(preload, "forked", None), "own": own.random() if own else None}
"""


def _pool_toml(tmp_path, name: str, module: str, body: str, reserve: int = 0) -> str:
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(body))
    return (f'[pools.{name}]\npreload = ["{module}"]\nreserve = {reserve}\n'
            f'env = {{PATH = "/usr/bin:/bin", PYTHONPATH = "{tmp_path}"}}\n')


def _child_states(sock: str, pool: str, n: int) -> list[dict]:
    ns: dict = {}
    exec(textwrap.dedent(_CHILD_STATE), ns)
    out = []
    with Client.connect(sock) as c:
        for _ in range(n):
            r = c.run(ns["child_state"], pool=pool)
            assert r.returncode == 0 and r.stderr == b"logged\n", r.stderr
            out.append(r.value)
    return out


def test_SECURITY_each_child_draws_its_own_random_numbers(tmp_path):
    """Every child is a copy of its zygote's memory, random generators included. random reseeds
    itself through a fork hook, which the lean clone runs (it leaves the lock-only ones out);
    numpy's global generator has no hook at all: every child of a numpy zygote drew the same
    numbers (np.random.rand() was 0.9496... in each child), other clients' children included.
    The clone now fills that generator's state with fresh entropy, and the zygote drops the
    normal deviate numpy caches (a preload that drew one left it for every child to draw).
    Both kinds of clone are checked: lean (the default pool) and with all of CPython's fork
    work (a preload whose fork hook pairs the lean clone does not know), reserve children too."""
    unknown_pair = _DRAWS + textwrap.dedent("""
        import os
        os.register_at_fork(before=lambda: None, after_in_parent=lambda: None)
    """)
    # numpy's global generator made another kind (numpy.random.seed() in each clone), with a
    # cached normal: the zygote drops it whatever the kind (a helper's review: it was shared)
    other_kind = textwrap.dedent("""
        import multiprocessing, numpy
        numpy.random.set_bit_generator(numpy.random.PCG64())
        numpy.random.standard_normal()
    """)
    toml = (_pool_toml(tmp_path, "default", "zg_draws", _DRAWS)
            + _pool_toml(tmp_path, "reserved", "zg_draws", _DRAWS, reserve=2)
            + _pool_toml(tmp_path, "full", "zg_pair", unknown_pair)
            + _pool_toml(tmp_path, "pcg", "zg_pcg", other_kind))
    with config_daemon(tmp_path, toml) as sock:
        for pool, lean in (("default", True), ("reserved", True), ("full", False), ("pcg", True)):
            states = _child_states(sock, pool, 4)
            assert all(s["lean"] is lean for s in states), (pool, states)
            for key in ("random", "numpy", "normal", "authkey"):
                assert len({s[key] for s in states}) == 4, (pool, key, states)


def test_a_preload_s_fork_hooks_run_in_every_child_and_a_python_signal_handler_means_no_lean_clone(tmp_path):
    """The lean clone runs the after-fork hooks it does not know to be lock-only (a preload's
    own here, one registered through posix.register_at_fork: a helper's review found that name
    unwatched, the hook dropped and the preload's generator the same in every child), and is not
    taken where a Python-level signal handler exists in the zygote (a signal caught just before
    the clone would be handled again in the child): there the child gets all of CPython's fork
    work, the hooks included. The zygote itself catches no SIGINT."""
    hooks = _DRAWS + textwrap.dedent("""
        import os, posix
        forked = False
        def _mark():
            global forked
            forked = True
        os.register_at_fork(after_in_child=_mark)
        rng = random.Random()  # a preload's own generator, reseeded by its own hook
        posix.register_at_fork(after_in_child=rng.seed)  # (the same function, by its module's name)
    """)
    handler = hooks + textwrap.dedent("""
        import signal
        signal.signal(signal.SIGUSR2, lambda *a: None)
    """)
    toml = _pool_toml(tmp_path, "default", "zg_hooks", hooks) + _pool_toml(tmp_path, "handler", "zg_hooks_h", handler)
    with config_daemon(tmp_path, toml) as sock:
        for pool, lean in (("default", True), ("handler", False)):
            states = _child_states(sock, pool, 3)
            assert [(s["lean"], s["hook_ran"]) for s in states] == [(lean, True)] * 3, (pool, states)
            assert len({s["own"] for s in states}) == 3, (pool, states)
        with Client.connect(sock) as c:
            zygotes = [p for p, _ in children_of(daemon_pid(c)) if b"zygote._zygote" in cmdline(p)]
        for pid in zygotes:  # (no Python handler for SIGINT: a signal caught just before a clone
            with open(f"/proc/{pid}/status") as f:  # would run again in the child)
                caught = int(next(line for line in f if line.startswith("SigCgt:")).split()[1], 16)
            assert not caught & 1 << (signal.SIGINT - 1), pid


def test_a_pth_file_that_runs_code_makes_the_clone_not_lean(tmp_path, monkeypatch):
    """A .pth line beginning with "import" runs at every interpreter's start, before the zygote
    watches for fork hooks, and may register one leaving no module behind (a helper's review):
    such lines, other than the known ones of setuptools, virtualenv and editable installs, keep
    the clone from being lean."""
    import posix
    import site
    from zygote import _clone
    (tmp_path / "known.pth").write_text("import _virtualenv\n/some/dir\n"
                                        "import os; var = 'SETUPTOOLS_USE_DISTUTILS'; enabled = 1\n")
    (tmp_path / "zz.pth").write_text("# a comment\nimport os; os.register_at_fork(after_in_child=print)\n")
    monkeypatch.setattr(site, "getsitepackages", lambda: [str(tmp_path)])
    monkeypatch.setattr(site, "getusersitepackages", lambda: str(tmp_path / "none"))
    # the watch itself, as the zygote starts it (its state and wrappers put back afterwards)
    monkeypatch.setattr(_clone, "_hooks", None)
    monkeypatch.setattr(_clone, "_unseen", [])
    monkeypatch.setattr(os, "register_at_fork", os.register_at_fork)
    monkeypatch.setattr(posix, "register_at_fork", posix.register_at_fork)
    _clone.watch_fork_hooks()
    found = [why for why in _clone._unseen if ".pth" in why]
    assert len(found) == 1 and "zz.pth" in found[0] and "register_at_fork" in found[0], found
    assert _clone.lean_hooks()[0] is None


def test_a_fork_hook_registered_after_the_lean_decision_brings_back_all_of_cpython_s_fork_work():
    """Cloner takes its lean hooks once; a hook registered after that (a late import in the
    zygote) turns the lean clone off for good, so the hook runs in every later child."""
    code = (
        "import os, signal, sys\n"
        "from zygote import _clone\n"
        "_clone.watch_fork_hooks()\n"
        "signal.signal(signal.SIGINT, signal.SIG_DFL)\n"
        "lean, why = _clone.lean_hooks()\n"
        "assert lean is not None, why\n"
        "c = _clone.Cloner(lean)\n"
        "ran = []\n"
        "os.register_at_fork(after_in_child=lambda: ran.append(1))\n"
        "pid = c.clone(0)\n"
        "if pid == 0:\n"
        "    os._exit(7 if ran else 1)\n"
        "print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), c.lean)\n"
    )
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, "7 None\n"), r.stderr


@pytest.mark.parametrize("cgroup", [False, True])
def test_a_payload_ends_as_python_does_waiting_for_its_threads(client, cgroup):
    """A callable that left a non-daemon thread and queued executor work was cut off when it
    returned (os._exit): their output never came. Now the payload process ends as the
    interpreter and a multiprocessing Process do: non-daemon threads joined, threading's exit
    hooks run (concurrent.futures finishes its queue), atexit handlers not (a Process does not
    run them either; a script does: below). The result still comes when the function returns."""
    def leaves_work_behind():
        import concurrent.futures, threading, time
        threading.Thread(target=lambda: (time.sleep(0.3), print("thread done", flush=True))).start()
        pool = concurrent.futures.ThreadPoolExecutor(1)
        for i in range(3):  # queued behind each other: the last ends ~0.6 s after the return
            pool.submit(lambda i=i: (time.sleep(0.2), print(f"job {i}", flush=True)))
        import atexit
        atexit.register(print, "atexit ran")  # (a callable ends as a multiprocessing Process: not run)
        return "returned"

    cfg = SandboxConfig(memory="256M") if cgroup else None
    child = client.spawn_child(leaves_work_behind, stdin=None, sandbox_config=cfg)
    assert child.result(timeout=30) == "returned"
    out = child.stdout.read().decode()
    assert child.wait(timeout=30).returncode == 0
    assert sorted(out.split("\n")) == ["", "job 0", "job 1", "job 2", "thread done"], out


def test_a_payload_ends_as_a_process_waiting_for_its_multiprocessing_children(client):
    """A callable that started a multiprocessing Process and returned without joining it: the
    Process was killed with the pid namespace when the payload ended. A multiprocessing
    Process (and python at exit) joins its non-daemonic children first (multiprocessing's own
    exit function); so does a payload now."""
    def starts_a_process():
        import multiprocessing, os, time
        ctx = multiprocessing.get_context("fork")
        ctx.Process(target=lambda: (time.sleep(0.3), os.write(1, b"process done\n"))).start()
        return "returned"

    child = client.spawn_child(starts_a_process, stdin=None)
    assert child.result(timeout=30) == "returned"
    assert child.stdout.read() == b"process done\n"
    assert child.wait().returncode == 0


def test_a_payload_ended_by_keyboardinterrupt_waits_for_its_threads_first(client):
    """As CPython on Ctrl-C: the traceback, then the non-daemon threads, then the end by
    SIGINT (a helper's review: the threads were cut off on this path)."""
    def interrupted():
        import threading, time
        threading.Thread(target=lambda: (time.sleep(0.3), print("thread", flush=True))).start()
        raise KeyboardInterrupt

    # (with a reaper the payload is PID 2, which the SIGINT ends; PID 1 ignores its own)
    child = client.spawn_child(interrupted, stdin=None, sandbox_config=SandboxConfig(reaper=True))
    out, err = child.stdout.read().decode(), child.stderr.read().decode()
    assert child.wait(timeout=30).returncode == -signal.SIGINT
    assert out == "thread\n" and "KeyboardInterrupt" in err, (out, err)


def test_a_script_runs_its_atexit_handlers_after_its_threads(client):
    """A script payload ends as ``python prog.py``: its non-daemon threads first, then its
    atexit handlers; an exception there is printed, its exit code stays the script's."""
    script = textwrap.dedent("""
        import atexit, sys, threading, time
        atexit.register(lambda: print("atexit", flush=True))
        atexit.register(lambda: 1 / 0)
        threading.Thread(target=lambda: (time.sleep(0.2), print("thread", flush=True))).start()
        sys.exit(3)
    """).encode()
    child = client.spawn_child(None, _argv=["-"], _script=script, stdin=None)
    out, err = child.stdout.read().decode(), child.stderr.read().decode()
    assert child.wait(timeout=30).returncode == 3
    assert out == "thread\natexit\n", (out, err)
    assert "ZeroDivisionError" in err, err


def test_a_zygote_that_failed_before_it_was_placed_says_why(tmp_path):
    """The daemon's b"P" can meet a zygote that already failed at its start (an import it
    needs is broken) and exited: the send's EPIPE propagated as OSError out of Zygote.start,
    where its "E" message (the reason) still waited unread: the pool failed without saying why.
    Here the placement returns only once the zygote has exited, so the send meets a closed
    socket every time."""
    import dataclasses
    import trio
    from zygote._pool import PoolConfig, PoolStartError, Zygote

    (tmp_path / "cloudpickle.py").write_text("raise ImportError('broken on purpose')\n")
    base = PoolConfig()
    pc = dataclasses.replace(base, python=sys.executable, env={**base.env, "PYTHONPATH": str(tmp_path)})

    async def place(pid: int) -> None:  # (a zombie until Popen reaps it: 'Z' in its stat)
        while open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            await trio.sleep(0.01)

    z = Zygote(pc, 0, place)
    with pytest.raises(PoolStartError, match="broken on purpose"):
        trio.run(z.start)
    trio.run(z.stop)


def _broken_start_pool(tmp_path, body: str):
    import dataclasses
    from zygote._pool import PoolConfig
    (tmp_path / "cloudpickle.py").write_text(body)
    base = PoolConfig()
    return dataclasses.replace(base, python=sys.executable, env={**base.env, "PYTHONPATH": str(tmp_path)})


def _restart_loop(monkeypatch, start, n: int) -> tuple[list[float], list[tuple[str, dict]]]:
    """Pool._watch's restart loop on trio's MockClock (its sleeps take no time) after a zygote
    died, each new zygote's ``start(z, k)`` (k: its number) playing the part; stops the pool at
    the n-th start. Returns the starts' times and what was logged."""
    import subprocess as sp
    import trio
    import trio.testing
    import zygote._pool as pool_mod

    starts: list[float] = []
    logged: list[tuple[str, dict]] = []

    class Played(pool_mod.Zygote):
        async def start(self, timeout: float = 300.0) -> None:
            starts.append(trio.current_time())
            if len(starts) >= n:
                pool.stopping = True
            start(self, len(starts))

    class Log:
        def error(self, event, **kw):
            logged.append((event, kw))
        warning = error

    pool = pool_mod.Pool(pool_mod.PoolConfig())
    pool.log = Log()
    dead = pool_mod.Zygote(pool.config, 0)
    dead.proc = sp.Popen(["true"])
    dead.proc.wait()
    dead.dead.set()
    pool.zygotes.append(dead)
    monkeypatch.setattr(pool_mod, "Zygote", Played)

    async def main() -> None:
        async with trio.open_nursery() as n:
            await pool._watch(0, n)
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return starts, logged


def test_a_pool_whose_zygote_never_starts_again_backs_off_for_ever(monkeypatch):
    """A zygote whose every start fails (a preload broken under a running daemon): the
    attempts come 1, 2, 4, 8, 16 s apart, then every 16 s, each logged with its reason. The
    count of failures grew without bound and 2.0 ** 1024 overflowed after 1025 attempts (about
    4.5 h): the OverflowError ended the daemon (a helper's review). Before, a failed start was
    retried every second, silently."""
    import zygote._pool as pool_mod

    def fail(z, k):
        raise pool_mod.PoolStartError("broken on purpose" + ("" if k < 500 else ", otherwise"))
    starts, logged = _restart_loop(monkeypatch, fail, 1100)
    gaps = [round(b - a, 3) for a, b in zip(starts, starts[1:])]
    assert len(starts) == 1100 and gaps[:6] == [1, 2, 4, 8, 16, 16] and set(gaps[5:]) == {16}, gaps[:8]
    assert logged[0] == ("zygote died", {"pool": "default", "zygote": 0, "pid": logged[0][1]["pid"],
                                         "how": "exited with status 0", "quick": False, "retry_in": 0.0}), logged[0]
    failed = [kw for event, kw in logged[1:] if event == "zygote restart failed"]
    assert len(failed) == 1100 and all(kw["retry_in"] <= 16 for kw in failed)
    # The message (a preload's traceback, in the field) whole only when it changed: every 16 s
    # for as long as the pool stays broken was the log's volume.
    whole = [n for n, kw in enumerate(failed) if kw["message"] != "the same as the last attempt's"]
    assert whole == [0, 499] and failed[499]["message"] == "broken on purpose, otherwise", whole


def test_a_zygote_that_keeps_dying_at_once_is_restarted_less_and_less(monkeypatch):
    """A zygote that dies soon after it is ready (in the field: a zygote of another version,
    dying at its first request) was restarted at once, for ever. The first such death restarts
    it at once, the next ones after 1, 2, 4 ... 16 s; one that lived longer than QUICK_DEATH
    resets the count. Each death is logged with how it ended."""
    import subprocess as sp
    import time
    import zygote._pool as pool_mod

    def ready_then_killed(z, k):
        z.proc = sp.Popen(["sleep", "60"])
        z.proc.kill()
        z.proc.wait()
        z.ready_at = time.monotonic() - (60 if k == 8 else 0)  # the 8th lived a minute
    starts, logged = _restart_loop(monkeypatch, ready_then_killed, 12)
    gaps = [round(b - a, 3) for a, b in zip(starts, starts[1:])]
    assert gaps == [0, 1, 2, 4, 8, 16, 16, 0, 0, 1, 2], gaps
    deaths = [kw for event, kw in logged if event == "zygote died"]
    assert [kw["quick"] for kw in deaths] == [False] + [True] * 7 + [False] + [True] * 3, deaths
    assert all(kw["how"] == "killed by SIGKILL" for kw in deaths[1:]), deaths


def test_a_zygote_of_another_zygote_version_is_refused_with_the_fix(tmp_path):
    """The pool's interpreter imports the zygote package installed for it: another version of
    it (an old wheel in that virtualenv) started, then died with status 4 at its first clone
    request (the protocol had changed), and the pool restarted it for ever, the log silent,
    every spawn answered "restarting". A copy with one file changed is refused at its start,
    the message naming both packages; an unchanged copy elsewhere starts."""
    import dataclasses
    import shutil
    import trio
    import zygote
    from zygote._pool import PoolConfig, PoolStartError, Zygote

    def pool_importing(copy):
        shutil.copytree(os.path.dirname(zygote.__file__), copy / "zygote",
                        ignore=shutil.ignore_patterns("__pycache__"))
        base = PoolConfig()
        return dataclasses.replace(base, python=sys.executable, env={**base.env, "PYTHONPATH": str(copy)})

    same = pool_importing(tmp_path / "same")
    z = Zygote(same, 0, None)
    trio.run(z.start)
    assert z.info["package"] == str(tmp_path / "same" / "zygote")
    trio.run(z.stop)

    other = pool_importing(tmp_path / "other")
    with open(tmp_path / "other" / "zygote" / "layers" / "uts.py", "a") as f:
        f.write("# another version\n")
    z = Zygote(other, 0, None)
    with pytest.raises(PoolStartError, match="imports another version of the zygote packages") as info:
        trio.run(z.start)
    import zygote_client
    assert str(tmp_path / "other" / "zygote") in str(info.value) and os.path.dirname(zygote_client.__file__) in str(info.value)
    assert "install the daemon's version of zygote and zygote-client" in str(info.value)
    trio.run(z.stop)
    assert z.proc.poll() is not None


def test_a_zygote_after_an_upgrade_in_place_is_refused_saying_restart_the_daemon(monkeypatch):
    """The daemon's own packages replaced on disk (pip install -U in its virtualenv) while it
    runs: its digest is of the code it started with, so its next zygotes are refused, and the
    fix is a restart, not an install (the same paths on both sides). Here the daemon's digest
    is made to differ."""
    import trio
    import zygote._pool as pool_mod
    monkeypatch.setattr(pool_mod, "code_digest", lambda: "the code this daemon started with")
    z = pool_mod.Zygote(pool_mod.PoolConfig(), 0, None)
    with pytest.raises(pool_mod.PoolStartError, match="changed on disk since this daemon started .*restart the daemon"):
        trio.run(z.start)
    trio.run(z.stop)


def test_a_zygote_maps_nothing_a_child_does_not_need():
    """Every clone copies the zygote's page tables and unmaps them at its exit, so the zygote
    imports only what a child needs: its version digest used hashlib, which maps OpenSSL's
    libcrypto (3 MiB) into every zygote (a helper's review); the client package's anyio and
    asyncio load on first use only."""
    def loaded():
        import sys
        return sorted(m for m in ("_hashlib", "anyio", "asyncio") if m in sys.modules)
    with Client.embedded() as c:
        assert c.spawn_child(loaded, stdin=None).result(timeout=30) == []


def test_a_zygote_killed_before_it_read_the_b_p_fails_its_start(tmp_path):
    """A zygote that ends with the daemon's b"P" unread (killed at its start: the OOM killer)
    leaves ECONNRESET on the daemon's socket: the recv raised it out of Zygote.start, past
    Pool._watch's PoolStartError, and ended the daemon (its supervise task)."""
    import trio
    from zygote._pool import PoolStartError, Zygote
    pc = _broken_start_pool(tmp_path, "import os, signal, time\ntime.sleep(0.3)\nos.kill(os.getpid(), signal.SIGKILL)\n")
    z = Zygote(pc, 0, None)
    with pytest.raises(PoolStartError, match="exited during startup"):
        trio.run(z.start)
    trio.run(z.stop)


def test_a_zygote_that_failed_with_the_b_p_unread_says_why(tmp_path):
    """Its "E" queued behind that ECONNRESET (the daemon's loop busy while it failed and
    exited): the reason is still read."""
    import time
    import trio
    from zygote._pool import PoolStartError, Zygote
    pc = _broken_start_pool(tmp_path, "raise ImportError('broken on purpose')\n")
    z = Zygote(pc, 0, None)

    async def main():
        async def busy():
            await trio.sleep(0.05)  # (the start sent its b"P" and waits)
            time.sleep(3)           # the loop held while the zygote fails and exits
        async with trio.open_nursery() as n:
            n.start_soon(busy)
            await z.start()
    with pytest.raises(BaseException) as info:
        trio.run(main)
    e = info.value.exceptions[0] if isinstance(info.value, BaseExceptionGroup) else info.value
    assert isinstance(e, PoolStartError) and "broken on purpose" in str(e), repr(e)
    trio.run(z.stop)


def test_a_preloads_multiprocessing_process_is_not_a_payloads(tmp_path):
    """A preload that started a multiprocessing Process in the zygote: every payload inherited
    it in multiprocessing's children, and its end joined it ("can only join a child process",
    printed in every child) before its own, which were then killed with the namespace."""
    (tmp_path / "mp_preload.py").write_text(
        "import multiprocessing, time\n"
        "_p = multiprocessing.get_context('fork').Process(target=time.sleep, args=(3600,), daemon=True)\n"
        "_p.start()\n")
    exe = tmp_path / "py"
    exe.write_text(f"#!/bin/sh\nPYTHONPATH={tmp_path}:{os.environ.get('PYTHONPATH', '')} exec {sys.executable} \"$@\"\n")
    exe.chmod(0o755)

    def starts_a_process():
        import multiprocessing, os, time
        multiprocessing.get_context("fork").Process(target=lambda: (time.sleep(0.3), os.write(1, b"process done\n"))).start()
        return "returned"
    with Client.embedded(preload_imports=["mp_preload"], executable=str(exe)) as c:
        child = c.spawn_child(starts_a_process, stdin=None)
        assert child.result(timeout=30) == "returned"
        assert child.wait(timeout=30).returncode == 0
        assert child.stdout.read() == b"process done\n"
        assert child.stderr.read() == b""
        script = c.spawn_child(None, _argv=["-"], _script=b"print('ran')\n", stdin=None)
        assert script.wait(timeout=30).returncode == 0
        assert script.stderr.read() == b"", "the preload's Process joined by the script's atexit"
