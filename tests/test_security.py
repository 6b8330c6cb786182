"""End-to-end escape attempts through the daemon: each fails if its layer is removed.

Layer-level tests with controls live in test_layers_*.py; these check the assembled pipeline.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import time

import pytest

from zygote_client import Client, DaemonError, SandboxConfig, SandboxError
from conftest import config_daemon, listen_for_host_device_events


@pytest.fixture
def secret(tmp_path):
    d = tmp_path / "secret-dir"
    d.mkdir()
    f = d / "token"
    f.write_text("hunter2")
    return str(f)


def _probe_read(paths):
    def payload():
        import os
        for p in paths:
            try:
                with open(p) as f:
                    f.read(1)
                print(p, "READ")
            except OSError as e:
                print(p, e.errno)
    return payload


def test_SECURITY_mounts_host_files_unreachable(client, secret):
    r = client.run(_probe_read(["/etc/shadow", "/root/.bash_history", "/proc/1/root/etc/shadow", secret,
                                "/sys/kernel/notes"]))
    assert r.returncode == 0, r.stderr
    assert b"READ" not in r.stdout, r.stdout


def test_SECURITY_mounts_mountinfo_and_proc(client):
    def payload():
        import os
        print(sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
        with open("/proc/self/mountinfo") as f:
            print(f.read())

    r = client.run(payload)
    first, rest = r.stdout.decode().split("\n", 1)
    assert first == "[1]"  # the payload is PID 1 of its namespace: no other process is visible
    roots = {line.split()[3] for line in rest.splitlines() if line.strip()}
    # Every mount's root is "/" (our tmpfs and proc mounts), a device node, or lies under a source
    # the root binds on purpose: system dirs, the interpreter's prefixes, this checkout's packages.
    import sys
    import zygote
    import zygote_client
    allowed = ["/usr", "/lib", "/lib64", "/etc", "/dev", sys.prefix, sys.base_prefix,
               os.path.dirname(zygote.__file__), os.path.dirname(zygote_client.__file__)]
    allowed = {os.path.realpath(a) for a in allowed}
    for root in roots:
        assert root == "/" or root in ("/null", "/zero", "/full", "/random", "/urandom", "/tty") \
            or any(root == a or root.startswith(a + "/") for a in allowed), (root, allowed)
    assert "/etc/shadow" not in rest



@pytest.mark.parametrize("source", ["/", "link"])
def test_SECURITY_a_bind_of_a_tree_holding_proc_or_sys_is_refused(client, source, tmp_path):
    """Binds are recursive (a user namespace refuses a plain bind of a tree with locked
    submounts), so binding / (or a symlink to it) brought the host's /proc and /sys into the
    child, past the rule that they are never a bind source."""
    if source == "link":
        source = str(tmp_path / "root")
        os.symlink("/", source)
    with pytest.raises(DaemonError) as ei:
        client.run(print, ("x",), sandbox_config=SandboxConfig(ro_binds={source: "/host"}))
    assert "holds /proc" in str(ei.value), ei.value

def test_SECURITY_mounts_writes_outside_tmp_fail(client, tmp_path):
    rw = tmp_path / "rw"
    rw.mkdir()
    os.chmod(rw, 0o777)

    def payload():
        import os
        for p in ("/usr/zg-x", "/etc/zg-x", "/zg-x", "/rw/ok", "/tmp/ok"):
            try:
                with open(p, "w") as f:
                    f.write("x")
                print(p, "WROTE")
            except OSError as e:
                print(p, e.errno)

    r = client.run(payload, sandbox_config=SandboxConfig(rw_binds={str(rw): "/rw"}))
    out = dict(line.rsplit(" ", 1) for line in r.stdout.decode().splitlines())
    # EROFS: the read-only mounts answer first (the child's uid and Landlock would refuse these
    # too, with EACCES: "not written" alone passed with the mounts made writable)
    assert out["/usr/zg-x"] == out["/etc/zg-x"] == out["/zg-x"] == str(errno.EROFS), out
    assert out["/rw/ok"] == "WROTE" and out["/tmp/ok"] == "WROTE"
    assert (rw / "ok").read_text() == "x"
    assert not os.path.exists("/usr/zg-x")


def test_SECURITY_mounts_tmp_fills_at_cap(client):
    def payload():
        import os
        n = 0
        try:
            with open("/tmp/fill", "wb") as f:
                while n < 64 << 20:  # (a stop: without the cap, /tmp is as large as host memory allows)
                    f.write(b"\0" * 65536)
                    f.flush()
                    n += 65536
            print(n, 0)
        except OSError as e:
            print(n, e.errno)

    r = client.run(payload, sandbox_config=SandboxConfig(tmpfs_size="2M"))
    n, err = map(int, r.stdout.split())
    assert err == 28 and n <= 2 << 20
    assert not os.path.exists("/tmp/fill")


def test_SECURITY_mounts_tmp_holds_a_bounded_number_of_files(client):
    """A tmpfs's size counts its files' bytes, not their inodes and dentries: under the kernel's
    default inode cap a child made 1.5 M empty files in a "64M" /tmp, 1.2 GiB of kernel memory
    no cap counted (a helper's red-team, a child without a memory cgroup). /tmp and /dev/shm
    now hold one inode per KiB of their size (at least 1024): 2048 for "2M". Fails without the
    cap (10000 files made in each)."""
    def payload():
        import os
        for d in ("/tmp", "/dev/shm"):
            n, err = 0, 0
            try:
                while n < 10000:
                    os.close(os.open(f"{d}/f{n}", os.O_CREAT | os.O_WRONLY, 0o600))
                    n += 1
            except OSError as e:
                err = e.errno
            print(d, n, err)

    r = client.run(payload, sandbox_config=SandboxConfig(tmpfs_size="2M"))
    made = {d: (int(n), int(err)) for d, n, err in (line.split() for line in r.stdout.decode().splitlines())}
    assert set(made) == {"/tmp", "/dev/shm"}, r
    for d, (n, err) in made.items():
        assert err == 28 and 1000 < n <= 2048, (d, n, err)


def test_SECURITY_system_v_ipc_holds_what_dev_shm_holds(client):
    """A child's IPC namespace had the kernel's System V defaults, all of memory: a child without
    a memory cgroup filled shared memory segments and detached them, 832 MiB that no process's
    memory showed (a helper's red-team). Its shared memory now holds at most its /dev/shm's size
    (2M here: two 1 MiB segments) and it has at most userns.SYSV_QUEUES message queues. Fails
    without the bound (64 segments, 100 queues)."""
    def payload():
        import ctypes
        import errno
        libc = ctypes.CDLL(None, use_errno=True)
        for name, make, most in (("shm", lambda: libc.shmget(0, 1 << 20, 0o1600), 64),
                                 ("msg", lambda: libc.msgget(0, 0o1600), 100)):
            n = err = 0
            while n < most:
                if make() < 0:
                    err = ctypes.get_errno()
                    break
                n += 1
            print(name, n, errno.errorcode.get(err, err))

    r = client.run(payload, sandbox_config=SandboxConfig(tmpfs_size="2M"))
    made = {name: (int(n), err) for name, n, err in (line.split() for line in r.stdout.decode().splitlines())}
    from zygote.layers.userns import SYSV_QUEUES
    assert made == {"shm": (2, "ENOSPC"), "msg": (SYSV_QUEUES, "ENOSPC")}, (made, r.stderr)


def test_chroot_dir_static_binary(client, tmp_path):
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy("/usr/bin/busybox", root / "bin" / "busybox")
    r = client.run(None, _argv=["/bin/busybox", "sh", "-c", "pwd; ls /; test -e /proc/self && echo PROC; true"],
                   sandbox_config=SandboxConfig(chroot_dir=str(root), seccomp_profile="default"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().split()
    assert lines[0] == "/"
    assert "proc" not in lines and "sys" not in lines and "PROC" not in lines


def test_SECURITY_privileges_dropped(client):
    def payload():
        import os
        print(os.getresuid(), os.getresgid())
        try:
            os.setuid(0)
            print("SETUID-OK")
        except PermissionError:
            print("EPERM")
        with open("/proc/self/status") as f:
            caps = [l.split()[1] for l in f if l.startswith("Cap")]
        print(set(caps))

    r = client.run(payload)
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "(65534, 65534, 65534) (65534, 65534, 65534)"
    assert lines[1] == "EPERM"
    assert lines[2] == "{'0000000000000000'}"


def test_SECURITY_setuid_binary_gains_nothing(client, tmp_path):
    d = tmp_path / "suid"
    d.mkdir()
    shutil.copy("/usr/bin/id", d / "id")
    os.chmod(d / "id", 0o4755)
    r = client.run(None, _argv=["/suid/id"], sandbox_config=SandboxConfig(ro_binds={str(d): "/suid"}))
    assert r.returncode == 0, r.stderr
    assert b"euid=0" not in r.stdout and b"uid=65534" in r.stdout

    # ... and the binds are nosuid themselves (no_new_privs and the unmapped owner refuse the
    # gain too: the result above passed with nosuid taken off the mounts)
    def options():
        with open("/proc/self/mountinfo") as f:
            return [line.split()[5] for line in f if line.split()[4] in ("/suid", "/")]
    opts = client.run(options, sandbox_config=SandboxConfig(ro_binds={str(d): "/suid"})).value
    assert len(opts) == 2 and all("nosuid" in o.split(",") for o in opts), opts


@pytest.mark.parametrize("call", ["unshare", "setns", "mount", "ptrace", "bpf", "io_uring", "userfaultfd",
                                  "keyctl", "perf_event_open", "clone_newuser", "clone3"])
def test_SECURITY_seccomp_default_end_to_end(client, call):
    def payload():
        import ctypes, errno, os
        libc = ctypes.CDLL(None, use_errno=True)
        # ptrace: PTRACE_TRACEME, and userfaultfd: UFFD_USER_MODE_ONLY, which the kernel alone
        # allows here (PTRACE_ATTACH to itself and a full userfaultfd it refuses by itself:
        # those passed with seccomp off)
        nr = {"unshare": (272, 0x10000000), "setns": (308, 0, 0), "mount": (165, 0, 0, 0, 0, 0),
              "ptrace": (101, 0, 0, 0, 0), "bpf": (321, 0, 0, 0), "io_uring": (425, 1, 0),
              "userfaultfd": (323, 1), "keyctl": (250, 0, 0), "perf_event_open": (298, 0, 0, -1, -1, 0),
              "clone_newuser": (56, 0x10000000 | 17, 0, 0, 0, 0), "clone3": (435, 0, 0)}[call]
        r = libc.syscall(*nr)
        if r == 0 and call == "clone_newuser":
            os._exit(0)
        print(r, ctypes.get_errno())

    r = client.run(payload)
    ret, err = map(int, r.stdout.split())
    assert ret == -1 and err in (1, 38), (call, ret, err)  # EPERM, or ENOSYS for clone3


def test_seccomp_default_keeps_fork_and_threads(client):
    def payload():
        import os, threading, subprocess
        t = threading.Thread(target=lambda: None)
        t.start()
        t.join()
        print(subprocess.run(["/bin/sh", "-c", "echo sub"], capture_output=True).stdout.decode().strip())

    assert client.run(payload).stdout == b"sub\n"


def test_SECURITY_landlock_alone_denies(client):
    # A secret the sandbox's host uid could read by plain file permissions (0755 dir, 0644 file).
    import tempfile
    d = tempfile.mkdtemp(prefix="zg-landlock-", dir="/var/tmp")  # /tmp has a write rule
    try:
        os.chmod(d, 0o755)
        secret = os.path.join(d, "token")
        with open(secret, "w") as f:
            f.write("hunter2")
        os.chmod(secret, 0o644)
        # control: the child's host uid (id base + 65534) passes DAC, so only Landlock can deny it
        pid = os.fork()
        if pid == 0:
            try:
                os.setgroups([])
                os.setresgid(1_000_065_534, 1_000_065_534, 1_000_065_534)
                os.setresuid(1_000_065_534, 1_000_065_534, 1_000_065_534)
                open(secret).read()
                os._exit(0)
            except BaseException:
                os._exit(1)
        assert os.waitpid(pid, 0)[1] == 0, "control: the secret should be readable without Landlock"
        # the mount layer relaxed (host tree, test-only switch): Landlock must still deny the path
        r = client.run(_probe_read([secret]), _test_relax_mounts=True)
        assert r.returncode == 0, r.stderr
        assert r.stdout == f"{secret} 13\n".encode(), r.stdout
    finally:
        shutil.rmtree(d)


def test_relaxed_mounts_refused_without_test_hooks(socket_daemon):
    with Client.connect(socket_daemon) as c:
        with pytest.raises(DaemonError):
            c.spawn_child(print, _test_relax_mounts=True)


def test_landlock_required_fails_closed(client):
    with pytest.raises(SandboxError) as ei:
        client.spawn_child(print, sandbox_config=SandboxConfig(landlock="required"), _test_landlock_abi=99)
    assert ei.value.step == "landlock"


@pytest.mark.parametrize("step", ["landlock", "privileges", "seccomp", "mounts"])
def test_each_layer_failure_is_named(client, step):
    with pytest.raises(SandboxError) as ei:
        client.spawn_child(print, _test_fail_step=step)
    assert ei.value.step == step


def test_policy_refuses_loosening(client):
    with pytest.raises(DaemonError):
        client.spawn_child(print, sandbox_config=SandboxConfig(landlock="off"))
    with pytest.raises(DaemonError):
        client.spawn_child(print, sandbox_config=SandboxConfig(seccomp_profile="unconfined"))


def test_a_requests_unset_fields_are_the_pools():
    """policy.effective, field by field: None is the pool's, a value set is the request's
    (within the ceiling); a request's own root does not take the pool's /proc or working
    directory, its workspace is its working directory; a client that predates inheritance
    (inherit=False) gets the built-in defaults; sizes compare in bytes."""
    from zygote.policy import PolicyError, effective
    from zygote_client import Workspace
    pool = SandboxConfig(seccomp_profile="strict", landlock="required", tmpfs_size="32M", uid=1000, gid=1001,
                         hostname="poolhost", dev_pts=True, reaper=True, proc=False, workdir="/srv",
                         memory="256M").with_defaults()
    e = effective(pool, SandboxConfig(memory="128M"))
    assert (e.seccomp_profile, e.landlock, e.tmpfs_size, e.uid, e.gid, e.hostname, e.dev_pts, e.reaper, e.proc,
            e.workdir, e.memory) == ("strict", "required", 32 << 20, 1000, 1001, "poolhost", True, True, False,
                                     "/srv", 128 << 20)
    assert effective(pool, SandboxConfig()) == effective(pool, None) == effective(pool, SandboxConfig(tmpfs_size=32 << 20))
    e = effective(pool, SandboxConfig(uid=5, gid=6, hostname="mine", dev_pts=False, workdir="/w", tmpfs_size="8M"))
    assert (e.uid, e.gid, e.hostname, e.dev_pts, e.workdir, e.tmpfs_size) == (5, 6, "mine", False, "/w", 8 << 20)
    for loose, what in ((SandboxConfig(landlock="auto"), "landlock"), (SandboxConfig(seccomp_profile="default"), "seccomp"),
                        (SandboxConfig(tmpfs_size="64M"), "tmpfs_size"), (SandboxConfig(proc=True), "proc"),
                        (SandboxConfig(reaper=False), None)):
        if what is None:
            assert effective(pool, loose).reaper  # (a pool's reaper holds for every child)
            continue
        with pytest.raises(PolicyError, match=what):
            effective(pool, loose)
    e = effective(pool, SandboxConfig(chroot_dir="/opt/root"))
    assert (e.proc, e.workdir) == (None, None)  # (the chroot's own defaults)
    e = effective(pool, SandboxConfig(workspace=Workspace.from_files({"a": b"x"})))
    assert e.workdir is None  # (the workspace)
    open_pool = SandboxConfig(seccomp_profile="unconfined", landlock="off").with_defaults()
    e = effective(open_pool, SandboxConfig(timeout=60))
    assert (e.seccomp_profile, e.landlock) == ("unconfined", "off")
    e = effective(open_pool, SandboxConfig(timeout=60), inherit=False)
    assert (e.seccomp_profile, e.landlock) == ("default", "auto")


def test_strict_profile_numpy_pandas():
    with Client.embedded(preload_imports=["numpy", "pandas"]) as c:
        def payload():
            import pandas as pd
            df = pd.DataFrame({"k": list("abab"), "v": [1, 2, 3, 4]})
            print(df.groupby("k")["v"].sum().to_dict())

        r = c.run(payload, sandbox_config=SandboxConfig(seccomp_profile="strict"))
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"{'a': 4, 'b': 6}\n"


@pytest.fixture
def suid_dumpable_1():
    """fs.suid_dumpable = 1 for the test (a host setting some distributions use): a process that
    changed its uid stays dumpable unless it says otherwise."""
    path = "/proc/sys/fs/suid_dumpable"
    with open(path) as f:
        old = f.read().strip()
    with open(path, "w") as f:
        f.write("1")
    try:
        yield
    finally:
        with open(path, "w") as f:
            f.write(old)


def test_SECURITY_payload_cannot_reach_its_reaper_fds(client, suid_dumpable_1):
    """PID 1 (the reaper) keeps the status pipe on which it reports the payload's exit and sends
    the export; the payload runs as the same uid. PID 1 makes itself non-dumpable, whatever the
    host's fs.suid_dumpable, so the payload cannot open PID 1's fds (nor read its memory)."""
    def payload():
        import os
        got = []
        for what in ("/proc/1/fd", "/proc/1/mem"):
            try:
                got.append(f"{what}: {os.listdir(what) if what.endswith('fd') else open(what, 'rb').read(1)}")
            except OSError as e:
                got.append(f"{what}: {e.strerror}")
        print("; ".join(got))
    r = client.run(payload, sandbox_config=SandboxConfig(reaper=True))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(b"Permission denied") == 2, r.stdout


_TERMINAL_PROBE = '''
import os, subprocess, sys, time
from zygote_client import BrokenError, Client

def probe():
    import errno, os
    try:
        os.close(os.open("/dev/tty", os.O_RDONLY | os.O_NONBLOCK))
    except OSError as e:
        return "child: " + errno.errorcode[e.errno]
    return "child: opened the terminal"

os.close(os.open("/dev/tty", os.O_RDONLY | os.O_NONBLOCK))  # control: this process has one
print("client: has a terminal", flush=True)
sock = sys.argv[1]
daemon = subprocess.Popen([sys.executable, "-m", "zygote", "serve", "--socket", sock])  # (in our session)
try:
    deadline = time.monotonic() + 60
    while True:
        try:
            with Client.connect(sock) as c:
                print(c.call(probe), flush=True)
            break
        except (OSError, BrokenError):  # (not listening yet)
            assert daemon.poll() is None and time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.05)
finally:
    daemon.terminate()
    daemon.wait()
'''


def test_SECURITY_child_cannot_read_the_terminal_the_daemon_was_started_from(tmp_path):
    """A daemon started at a terminal (``Client.embedded()`` in an interactive session, ``zygote
    serve`` in a shell): its children were in its session, so /dev/tty (bound read-only, as every
    Python expects it) opened that terminal and a payload could read what the user typed there.
    Each child now starts a session of its own: it has no controlling terminal. (The probe runs
    ``zygote serve`` in the terminal's session: an embedded daemon has had a session of its own
    since, which hid the children's own setsid, and this test passed without it.)"""
    import fcntl
    import pty
    import sys
    import termios
    script = tmp_path / "probe.py"
    script.write_text(_TERMINAL_PROBE)
    master, slave = pty.openpty()
    try:
        p = subprocess.run([sys.executable, str(script), str(tmp_path / "z.sock")], stdin=slave,
                           capture_output=True, timeout=120,
                           start_new_session=True,  # (then the pty becomes its controlling terminal)
                           preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    finally:
        os.close(slave)
        os.close(master)
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    assert p.stdout.decode().splitlines() == ["client: has a terminal", "child: ENXIO"], p.stdout


def test_SECURITY_kill_0_reaches_only_the_childs_own_processes(tmp_path):
    """``kill(0, SIGKILL)`` signals the caller's process group. Children were all in the daemon's,
    with one host uid: one client's child killed another client's. Landlock's signal scope (ABI
    6, kernel 6.12) stops that too, so this pool turns Landlock off, as every child runs on an
    older kernel: the child's own session and group alone must hold."""
    import signal
    import time

    from conftest import config_daemon
    with config_daemon(str(tmp_path), """
            [pools.default.sandbox]
            landlock = "off"
            """) as sock:
        with Client.connect(sock) as one, Client.connect(sock) as two:
            victim = one.spawn_child(time.sleep, (60,), stdin=None)
            # Its own session and group (each child's own host ids would stop this kill too,
            # with EPERM: without these two lines the test passed with no setsid at all)
            assert os.getsid(victim.pid) == victim.pid == os.getpgid(victim.pid)
            assert os.getpgid(victim.pid) != os.getpgid(one.status().daemon_pid)
            attacker = two.spawn_child(os.kill, (0, signal.SIGKILL), stdin=None)
            assert attacker.wait(timeout=30).returncode == 0  # (a PID 1 ignores its own SIGKILL)
            time.sleep(0.3)
            assert victim.poll() is None, victim.status
            victim.kill()
            assert victim.wait(timeout=30).returncode == -signal.SIGKILL




def _inotify_probes():
    """(hold: take every inotify instance, print how many and the errno, sleep; errno of one
    inotify_init1, 0 when it worked), as closures (pickled by value: a child cannot import this
    module)."""
    def hold():
        import ctypes
        import time
        libc = ctypes.CDLL(None, use_errno=True)
        n = 0
        while libc.inotify_init1(0) >= 0:
            n += 1
        print(n, ctypes.get_errno(), flush=True)
        time.sleep(60)

    def init_errno() -> int:
        import ctypes
        import os
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(0)
        if fd < 0:
            return ctypes.get_errno()
        os.close(fd)
        return 0
    return hold, init_errno


def test_SECURITY_a_child_cannot_use_up_host_roots_inotify_instances(client):
    """The kernel counts inotify instances (and queued signals, user namespaces...) per user up
    the user-namespace chain, at the top for the namespace's owner. Children's namespaces were
    owned by root: one child taking its 128 left host root's own processes (journald, systemd,
    ``tail -f``) none. The zygote now clones each with its own id range's uid as the owner."""
    import errno
    hold, init_errno = _inotify_probes()
    hog = client.spawn_child(hold, stdin=None)
    try:
        n, err = map(int, hog.stdout.readline().split())
        assert n >= 100 and err == errno.EMFILE, (n, err)  # it did reach a limit: its own
        assert init_errno() == 0, "host root has no inotify instance left"
        other = client.run(init_errno)  # nor does another child lose its own
        assert other.returncode == 0 and other.value == 0, other
    finally:
        hog.kill()
        hog.wait()


def _pipe_probes():
    """(hold: take pipes of 1 MiB until refused, print how many, sleep; the size of a new pipe)."""
    def hold():
        import fcntl
        import os
        import time
        held = 0
        try:
            while True:  # over the per-user soft budget (16384 pages) after 64 of them
                r, w = os.pipe()
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
                held += 1
        except OSError:
            pass
        print(held, flush=True)
        time.sleep(60)

    def new_pipe_size() -> int:
        import fcntl
        import os
        r, w = os.pipe()
        return fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
    return hold, new_pipe_size


def test_SECURITY_children_do_not_share_per_user_kernel_budgets(client):
    """Pipe buffer pages and epoll watches are budgets per host uid. All children had one host
    uid: a child holding big pipes left every other child's new pipes one or two pages (a review
    showed 8192 bytes instead of 65536); epoll watches the same with ENOSPC. Each live child now
    has a host id range of its own."""
    hold, new_pipe_size = _pipe_probes()
    assert client.run(new_pipe_size).value == 65536  # (alone)
    hog = client.spawn_child(hold, stdin=None)
    other = client.spawn_child(time.sleep, (60,), stdin=None)
    try:
        assert int(hog.stdout.readline()) >= 64  # its own budget is spent: set sizes now fail
        assert client.run(new_pipe_size).value == 65536
        uids = {pid: open(f"/proc/{pid}/status").read().split("\nUid:")[1].split()[0]
                for pid in (hog.pid, other.pid)}
        assert len(set(uids.values())) == 2, uids
    finally:
        for ch in (hog, other):
            ch.kill()
            ch.wait()


def _thread_probe():
    """A closure: start threads (each waits) until the kernel refuses, at most ``cap``; how many."""
    def start_threads(cap: int) -> int:
        import threading
        threading.stack_size(64 << 10)
        stop = threading.Event()
        started = []
        try:
            while len(started) < cap:
                t = threading.Thread(target=stop.wait)
                t.start()
                started.append(t)
        except RuntimeError:  # can't start new thread (EAGAIN)
            pass
        stop.set()
        for t in started:
            t.join()
        return len(started)
    return start_threads


def test_SECURITY_a_child_without_a_pids_limit_cannot_fork_bomb_the_host(client):
    """A child without ``pids`` (no cgroup) had no bound on its processes and threads: the host's
    pid_max (32768 here) is shared by everything on it. RLIMIT_NPROC, counted per user in the
    child's own user namespace, now stops it at DEFAULT_PROCESSES; a ``pids`` limit replaces it."""
    from zygote.layers.rlimits import DEFAULT_PROCESSES
    start_threads = _thread_probe()
    n = client.call(start_threads, 3 * DEFAULT_PROCESSES)  # (stops there on the old code: the test stays safe)
    assert DEFAULT_PROCESSES - 16 < n < DEFAULT_PROCESSES, n
    # with a pids limit the cgroup bounds it instead (and reports it)
    r = client.run(start_threads, (3 * DEFAULT_PROCESSES,), sandbox_config=SandboxConfig(pids=2000), timeout=120)
    assert r.value == 1999 and r.status.pids_exceeded, r.status


def test_SECURITY_two_daemons_never_give_their_children_the_same_ids():
    """Host id ranges are claimed per daemon, host-wide (flock'd blocks): two root daemons on one
    host (an embedded client beside the system's) each started at the first range, so their
    children shared per-user kernel budgets again (a review showed one daemon's child shrinking
    the other's pipes)."""
    def host_uid(pid: int) -> str:
        return open(f"/proc/{pid}/status").read().split("\nUid:")[1].split()[0]
    with Client.embedded() as a, Client.embedded() as b:
        kids = [c.spawn_child(time.sleep, (60,), stdin=None) for c in (a, b)]
        try:
            assert host_uid(kids[0].pid) != host_uid(kids[1].pid)
        finally:
            for ch in kids:
                ch.kill()
                ch.wait()


def test_SECURITY_id_ranges_are_bounded_claimed_and_reused_last(tmp_path, monkeypatch):
    """A daemon's children only ever get ids from the blocks it claimed at start (before, the
    cursor walked through every uid up to 2^32, where real accounts (SSSD, LDAP ranges) live,
    and a range's first uid owns its child's namespace); a second daemon gets other blocks; a
    range given back is taken last; a block holding a host account's id is refused."""
    from zygote.layers import userns
    locks = str(tmp_path / "ids")
    base = userns.DEFAULT_ID_BASE
    a = userns.IdSlots(base, 100, lock_dir=locks)  # two blocks of 64
    b = userns.IdSlots(base, 1, lock_dir=locks)
    try:
        assert a.count == 128 and b.count == 64
        taken = [a.take() for _ in range(128)]
        assert sorted(taken) == list(range(128))
        with pytest.raises(LookupError):
            a.take()
        a.give(5)
        a.give(3)
        assert [a.take(), a.take()] == [5, 3]  # in the order given back
        assert b.take() == 128  # the next free block
    finally:
        a.close()
        b.close()
    with pytest.raises(ValueError, match="nobody|nogroup|inside the ids"):
        userns.IdSlots(1, 1, lock_dir=locks)  # ids 1..4194304: the host's accounts are there
    # a daemon's shutdown removes its lock files, holding them; a lock on a file removed under
    # it is no lock (another daemon opened the old file before the removal: it takes a new one)
    locks = str(tmp_path / "ids2")
    c = userns.IdSlots(base, 1, lock_dir=locks)
    assert sorted(os.listdir(locks)) == [f"{base}.0"]
    stale = os.open(os.path.join(locks, f"{base}.0"), os.O_RDWR)
    c.close(unlink=True)
    assert os.listdir(locks) == []
    opened = []
    real_open = os.open

    def open_stale_first(path, flags, mode=0o777):  # as if opened just before the removal
        opened.append(path)
        return os.dup(stale) if len(opened) == 1 else real_open(path, flags, mode)
    monkeypatch.setattr(os, "open", open_stale_first)
    fd = userns._lock(os.path.join(locks, f"{base}.0"))
    monkeypatch.undo()
    try:
        assert len(opened) == 2 and os.fstat(fd).st_ino != os.fstat(stale).st_ino  # the removed file: no lock
        assert userns._lock(os.path.join(locks, f"{base}.0")) is None  # and it is held now
    finally:
        os.close(fd)
        os.close(stale)


def test_SECURITY_client_ids_lie_below_every_child_range(tmp_path):
    """A client's own host id (its children's with idmapped binds, whose copies may outlive
    them behind a handed-out fd) follows from its uid alone and lies in the ids below id_base,
    which no child's range ever covers; a child's maps take its sandbox uid there and the rest
    of its sandbox ids to its range; a host account among those ids turns client ids off."""
    from zygote.layers import userns
    base, below = userns.DEFAULT_ID_BASE, userns.CLIENT_IDS
    assert userns.client_id(base, 4001) == base - below + 4001
    assert userns.client_id(base, below - 1) == base - 1
    assert [userns.client_id(base, u) for u in (0, below, 2**31)] == [None] * 3
    assert userns.client_id(below, 4001) is None  # (no room below)
    first = base + 3 * userns.RANGE
    assert userns.own_map(first, 65534, base - 5).decode().split("\n") == [
        f"0 {first} 65534", f"65534 {base - 5} 1", f"65535 {first + 65535} 1", ""]
    assert userns.own_map(first, 0, 7).decode().split("\n")[:2] == ["0 7 1", f"1 {first + 1} 65535"]
    slots = userns.IdSlots(base, 1, lock_dir=str(tmp_path / "ids"))
    try:
        assert slots.clients_taken is None and min(slots._free) == 0
        assert slots.holds(base - below) and slots.holds(base - 1) and slots.holds(base)
        assert not slots.holds(base - below - 1)
    finally:
        slots.close()
    low = userns.IdSlots(65534 + below - 1000, 1, lock_dir=str(tmp_path / "ids2"))  # ("nobody" below)
    try:
        assert "nobody" in low.clients_taken or "nogroup" in low.clients_taken, low.clients_taken
        assert not low.holds(65534) and low.holds(low.id_base)  # (then no peer is refused for an id there)
    finally:
        low.close()
    lowest = userns.IdSlots(70000, 1, lock_dir=str(tmp_path / "ids3"))
    try:
        assert "no room" in lowest.clients_taken and not lowest.holds(1000)
    finally:
        lowest.close()


def test_SECURITY_daemons_of_other_id_bases_keep_their_ids_apart(tmp_path):
    """Lock files are named by their daemon's id_base, so two daemons whose id_bases are close
    would hand out the same ids (a child's range, or a client's own ids below id_base) without
    noticing; the later one refuses to start. A stale lock file nobody holds does not count."""
    from zygote.layers import userns
    locks = str(tmp_path / "ids")
    base, block = userns.DEFAULT_ID_BASE, userns.RANGE * userns.CHUNK
    assert userns.CLIENT_IDS == block
    first = userns.IdSlots(base, 1, lock_dir=locks)  # ids base - block .. base + block - 1
    try:
        for near in (base + userns.RANGE,  # children's ranges meet
                     base + block,  # its client ids are first's block
                     base - block,  # its block is first's client ids
                     base + 2 * block - 1):  # its client ids meet first's last id
            with pytest.raises(ValueError, match=f"id_base {base} gives"):
                userns.IdSlots(near, 1, lock_dir=locks)
        apart = userns.IdSlots(base + 2 * block, 1, lock_dir=locks)
        apart.close()
    finally:
        first.close()
    again = userns.IdSlots(base + userns.RANGE, 1, lock_dir=locks)  # (first's file stays, unheld)
    again.close()


def test_a_daemon_removes_its_id_lock_files_when_it_stops():
    from zygote.layers import userns
    with Client.embedded() as c:
        assert c.run(print, ("ok",)).stdout == b"ok\n"
        daemon = c._aclient._proc.pid
        # Its own: the lock files it holds open (other daemons on the host share the directory,
        # and one starting meanwhile may claim a block it gave back: a new file, another inode)
        mine = {}
        for fd in os.listdir(f"/proc/{daemon}/fd"):
            try:
                target = os.readlink(f"/proc/{daemon}/fd/{fd}")
                inode = os.stat(f"/proc/{daemon}/fd/{fd}").st_ino
            except OSError:
                continue
            if os.path.dirname(target) == userns.LOCK_DIR:
                mine[os.path.basename(target)] = inode
    assert mine

    def same_file(name: str) -> bool:
        try:
            return os.stat(os.path.join(userns.LOCK_DIR, name)).st_ino == mine[name]
        except FileNotFoundError:
            return False
    assert not [name for name in mine if same_file(name)]


def test_SECURITY_a_child_binds_what_the_daemon_checked_after_the_zygote_started(client, tmp_path):
    """The daemon checks a request's bind sources in its own mount namespace; the child opens
    them in a copy of the zygote's. Those must be the same tree even for mounts made after the
    zygote started (on a host whose / does not propagate mounts): a directory mounted over
    since then is seen as it is now, not as it was. (A root template tried in session 13 made
    the zygote's namespace a snapshot of the host, and this failed.)"""
    d = tmp_path / "d"
    d.mkdir()
    (d / "f").write_text("under")
    os.chmod(tmp_path, 0o755)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "zygote-test", str(d)], check=True)
    try:
        (d / "f").write_text("over")

        def payload():
            print(open("/data/f").read())
        r = client.run(payload, sandbox_config=SandboxConfig(ro_binds={str(d): "/data"}))
        assert r.returncode == 0, r.stderr.decode()
        assert r.stdout == b"over\n"
    finally:
        subprocess.run(["umount", str(d)], check=True)


def test_SECURITY_a_child_leaves_no_set_id_file_on_a_host_directory(client, tmp_path):
    """A file a child makes in a host directory bound read-write belongs to its host uid, and the
    host honours set-ID bits (the child's own bind is nosuid, the host's path is not): a local
    user running such a file would become a uid that later children of other clients get again,
    and could signal them (a helper's review, reproduced with 130 spawns). The default seccomp
    profile refuses every call that would make or mark one. Fails without those rules: both
    files end up set-ID on the host."""
    d = tmp_path / "w"
    d.mkdir()
    os.chmod(d, 0o777)

    def plant():
        import os
        out = []
        for how in ("chmod", "open"):
            path = f"/w/{how}"
            try:
                if how == "chmod":
                    open(path, "w").close()
                    os.chmod(path, 0o4755)
                else:
                    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o6755))
                out.append(f"{how}: done")
            except OSError as e:
                out.append(f"{how}: {e.strerror}")
        return out

    child = client.spawn_child(plant, stdin=None, sandbox_config=SandboxConfig(rw_binds={str(d): "/w"}))
    got = child.result()
    assert child.wait().returncode == 0
    assert got == ["chmod: Operation not permitted", "open: Operation not permitted"], got
    marked = [p.name for p in d.iterdir() if p.stat().st_mode & 0o6000]
    assert marked == [], marked


def test_SECURITY_a_child_hears_no_host_device_events(client):
    """The kernel sends the host's device events (disks, USB, hotplug, module loads) to the
    uevent sockets of every network namespace the host's user namespace owns, and a child's was
    one (made ahead by the zygote): a child read them (a helper's review). The default seccomp
    profile refuses the uevent netlink protocol. Fails with that rule removed: the child
    receives the synthetic event (see test_SECURITY_a_child_without_seccomp_hears_no_host_device_events
    for the namespace itself)."""
    first, got, _ = listen_for_host_device_events(client)
    assert first == b"refused\n", (first, got)
    assert isinstance(got, str) and got.startswith("refused"), got


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root zygote makes network namespaces ahead")
def test_SECURITY_a_child_without_seccomp_hears_no_host_device_events(tmp_path):
    """Under a pool without seccomp a child may open a uevent socket, and still hears none of
    the host's device events: the network namespace made ahead for it belongs to a user
    namespace of its own (zygote/_nsmaker.py), and the kernel sends them only to namespaces the
    host's user namespace owns. Fails with the zygote making its namespaces itself (host-owned):
    the child receives the synthetic events."""
    with config_daemon(tmp_path, """
            [pools.default.sandbox]
            seccomp_profile = "unconfined"
            """) as sock, Client.connect(sock) as c:
        time.sleep(0.3)  # idle: the zygote makes the next namespace ahead
        first, got, made_ahead = listen_for_host_device_events(c)
        assert first == b"listening\n", (first, got)
        assert got == [], got
        assert made_ahead  # (one made ahead, not the child's own CLONE_NEWNET)


def test_SECURITY_mptcp_does_not_get_past_landlocks_tcp_rules(client):
    """Landlock denies a child without network TCP binds and connects; MPTCP sockets are not
    TCP sockets to Landlock, so a child could bind, listen and connect over them (a helper's
    review). Only its network namespace kept it in. Fails with the seccomp rule removed."""
    def probe():
        import socket
        out = {}
        for name, proto in (("tcp", 0), ("mptcp", 262)):
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto) as s:
                    s.bind(("127.0.0.1", 0))
                    s.listen(1)
                out[name] = "bound"
            except OSError as e:
                out[name] = e.strerror
        return out

    got = client.call(probe)
    assert got["tcp"] != "bound", got  # (Landlock: the layer MPTCP would get past)
    assert got["mptcp"] != "bound", got



_KEYED = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
assert libc.syscall(250, 1, None) > 0  # keyctl(JOIN_SESSION_KEYRING, NULL): a session of the test's own
key = libc.syscall(248, b"user", b"zg-test-secret", b"hunter2", 7, -3)  # add_key(..., session keyring)
assert key > 0, ctypes.get_errno()
with open(sys.argv[1], "w") as f:
    f.write(str(key))
os.execv(sys.argv[2], sys.argv[2:])
"""


@pytest.fixture(scope="module")
def unconfined_probe(tmp_path_factory):
    """The probe's answers in a child of an unconfined pool (no seccomp) of a daemon started in
    a session keyring holding a key of its starter's."""
    import sys
    from conftest import start_daemon, stop_daemon, wait_socket, write_text

    def probe(key_id: int) -> dict:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long

        def call(*args):
            ret = libc.syscall(*args)
            return ret if ret >= 0 else -ctypes.get_errno()
        buf = ctypes.create_string_buffer(64)
        return {
            "search": call(250, 10, -3, b"user", b"zg-test-secret", 0),  # keyctl(SEARCH, session keyring)
            "read": call(250, 11, key_id, buf, 64),                     # keyctl(READ) of the daemon's key
            "add": call(248, b"user", b"zg-from-a-child", b"x", 1, -3),  # add_key into the session keyring
            "unshare_user": call(272, 0x10000000),                      # unshare(CLONE_NEWUSER)
        }

    d = tmp_path_factory.mktemp("keyed")
    sock = str(d / "z.sock")
    cfg = write_text(d / "z.toml", f'[daemon]\nsocket = "{sock}"\n[pools.default.sandbox]\nseccomp_profile = "unconfined"\n')
    proc = start_daemon("--config", cfg, wrapper=(sys.executable, "-c", _KEYED, str(d / "key")))
    try:
        wait_socket(sock, proc)
        key_id = int((d / "key").read_text())
        with Client.connect(sock) as c:
            yield c.call(probe, key_id)
    finally:
        stop_daemon(proc)


def test_SECURITY_children_cannot_reach_the_keys_of_the_daemons_session(unconfined_probe):
    """Every process possesses its session keyring, and possession grants access to its keys:
    a child whose profile allows keyctl (unconfined) read and changed the keys of the session
    that started the daemon (a login's, a service's: a helper's review), and could leave keys
    for other clients' children in it. The zygote now leaves it for an empty keyring its
    possessors may only see. Fails with the zygote keeping its inherited keyring: the search
    finds the key and the read returns its 7 bytes."""
    got = unconfined_probe
    assert got["search"] < 0 and got["read"] < 0, got
    assert got["add"] < 0, got


def test_SECURITY_children_cannot_make_nested_user_namespaces(unconfined_probe):
    """A user namespace made inside the child gives every capability in it, and with them
    kernel interfaces meant for the host's root (nf_tables: most container escapes go through
    one). The seccomp profiles refuse it; without them (unconfined) a child made one (a helper's
    review). Each child now sets its user namespace's max_user_namespaces to 0 while it holds
    CAP_SYS_RESOURCE there. Fails without that write: unshare returns 0."""
    import errno
    assert unconfined_probe["unshare_user"] == -errno.ENOSPC, unconfined_probe


def test_SECURITY_a_read_only_proc_sys_keeps_out_only_children_seccomp_also_walls_in(tmp_path):
    """Containers (and systemd's ProtectKernelTunables=) mount /proc/sys read-only, where the
    nested user namespace limit cannot be written. A child whose profile refuses new user
    namespaces itself (default, strict) goes on without that second wall, as before it
    existed (every spawn failed there: a helper's second review); one under "unconfined" fails
    at step userns, naming the file: nothing else would keep it from making one."""
    from conftest import start_daemon, stop_daemon, wait_socket, write_text
    sock = str(tmp_path / "z.sock")
    # (proc = false: a fresh /proc cannot be mounted over a /proc with a mount on it either)
    cfg = write_text(tmp_path / "z.toml", f'[daemon]\nsocket = "{sock}"\n[pools.default]\nreserve = 0\n'
                     '[pools.default.sandbox]\nproc = false\n[pools.open]\nreserve = 0\n'
                     '[pools.open.sandbox]\nproc = false\nseccomp_profile = "unconfined"\n')
    read_only = ("unshare", "-m", "--propagation", "private", "sh", "-c",
                 'mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec "$@"', "sh")
    proc = start_daemon("--config", cfg, wrapper=read_only)
    try:
        wait_socket(sock, proc)
        with Client.connect(sock) as c:
            assert c.run(print, ("walled",)).stdout == b"walled\n"
            with pytest.raises(SandboxError) as e:
                c.run(print, ("open",), pool="open")
            assert e.value.step == "userns" and "max_user_namespaces" in str(e.value), e.value
    finally:
        stop_daemon(proc)


def test_SECURITY_children_get_the_plain_linux_persona(tmp_path):
    """A persona is inherited: a daemon started under `setarch -R` (or a debugger) handed
    ADDR_NO_RANDOMIZE to every child, which survives exec (programs a child runs had no address
    space randomisation), while the default profile answers personality's query with 0 (a
    helper's second review). The zygote sets PER_LINUX at its start. Fails without it: the
    child's is 00040000."""
    from conftest import start_daemon, stop_daemon, wait_socket
    sock = str(tmp_path / "z.sock")
    proc = start_daemon("--socket", sock, wrapper=("setarch", os.uname().machine, "-R"))
    try:
        wait_socket(sock, proc)
        with open(f"/proc/{proc.pid}/personality") as f:
            assert f.read().strip() == "00040000"  # (the daemon's own: what the zygote was started with)
        with Client.connect(sock) as c:
            child = c.spawn_child(time.sleep, (30,), stdin=None)
            try:
                with open(f"/proc/{child.pid}/personality") as f:
                    assert f.read().strip() == "00000000"
            finally:
                child.kill()
                child.wait()
    finally:
        stop_daemon(proc)


@pytest.mark.parametrize("reaper", [False, True])
def test_SECURITY_a_crashing_child_never_starts_the_hosts_crash_handler(client, tmp_path, reaper):
    """Where kernel.core_pattern pipes cores to a handler (systemd-coredump, apport: the default
    on many distributions) the kernel runs it as root, outside every namespace and cgroup of the
    crashed process, with its memory on stdin, and it ignores RLIMIT_CORE = 0 for a pipe. A
    payload that made itself dumpable (PR_SET_DUMPABLE 1) and crashed ran it, once per crash
    (a helper's review). RLIMIT_CORE is 1 byte now, which the kernel refuses a pipe dump at.
    Here a handler script of the test's, for the test's duration (the old pattern put back)."""
    import stat
    marker, handler = tmp_path / "ran", tmp_path / "zg-core-handler"
    handler.write_text(f"#!/bin/sh\necho \"$1\" >> {marker}\ncat > /dev/null\n")
    handler.chmod(stat.S_IRWXU)
    path = "/proc/sys/kernel/core_pattern"
    with open(path) as f:
        old = f.read().rstrip("\n")

    def crash():
        import ctypes
        ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: its own call, allowed
        ctypes.string_at(0)  # SIGSEGV
    try:
        with open(path, "w") as f:
            f.write(f"|{handler} %u")
        r = client.run(crash, sandbox_config=SandboxConfig(reaper=reaper))
        assert r.returncode == -11, r
        time.sleep(0.5)  # (the handler runs while the process is being dumped: before its exit)
    finally:
        with open(path, "w") as f:
            f.write(old)
    ran = marker.read_text().split() if marker.exists() else []
    assert not [uid for uid in ran if int(uid) >= 1_000_000], ran  # (a child's host uid)


def test_SECURITY_a_child_makes_no_device_node_in_a_read_write_bind(client, tmp_path):
    """In its own user namespace a child may make a 0:0 character device (an overlayfs
    "whiteout"), and one made in a read-write bind stays on the host (a helper's red-team). The
    read-write paths' Landlock rules leave out device nodes; a fifo still works."""
    import stat as _stat
    rw = tmp_path / "rw"
    rw.mkdir()
    os.chmod(rw, 0o777)

    def payload():
        import errno
        import os
        import stat
        out = {}
        for name, mode in (("chr", stat.S_IFCHR), ("fifo", stat.S_IFIFO)):
            try:
                os.mknod(f"/rw/{name}", mode | 0o600, os.makedev(0, 0))
                out[name] = "made"
            except OSError as e:
                out[name] = errno.errorcode[e.errno]
        return out

    out = client.run(payload, sandbox_config=SandboxConfig(rw_binds={str(rw): "/rw"})).value
    assert out == {"chr": "EACCES", "fifo": "made"}, out
    assert not (rw / "chr").exists() and _stat.S_ISFIFO(os.lstat(rw / "fifo").st_mode)
