"""The seccomp layer against the real kernel.

Every escape attempt runs in a forked child: the child loads the filter (``apply``) and makes the
call; the result comes back over a pipe as JSON. Each SECURITY test also runs the same call in a
child *without* the filter (the control), so it fails if the filter were not loaded.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import platform
import signal
import struct
import subprocess
import sys
import threading
import traceback

import pyseccomp
import pytest

from zygote.layers import SetupError
from zygote.layers import seccomp

X86_64 = platform.machine() == "x86_64"
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def nr(name: str) -> int:
    n = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
    return n if n >= 0 else seccomp._NEW_SYSCALLS[name]


def raw(name: str, *args: int) -> tuple[int, int]:
    """(return value, errno) of a raw syscall; every argument as a 64-bit register value."""
    ctypes.set_errno(0)
    ret = libc.syscall(ctypes.c_long(nr(name)), *[ctypes.c_ulong(a & ((1 << 64) - 1)) for a in args])
    return ret, (ctypes.get_errno() if ret == -1 else 0)


def in_child(fn, profile: str | dict | bytes | None = None):
    """Run ``fn()`` in a forked child, under ``profile`` if given.

    Returns ("ok", value) with fn's JSON-able result, ("error", text) if fn raised, or
    ("signal", signum) if the child was killed.
    """
    bpf = None
    if isinstance(profile, bytes):  # compiled already
        bpf = profile
    elif profile is not None:
        bpf = (seccomp.compile_profile(profile) if isinstance(profile, dict)
               else seccomp.compile_cached(profile))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(r)
            if bpf is not None:
                seccomp.apply(bpf)
            out = ("ok", fn())
        except BaseException:
            out = ("error", traceback.format_exc())
        try:
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return ("signal", os.WTERMSIG(status))
    kind, value = json.loads(data)
    return kind, value


def denied(fn, expect_errno: int = errno.EPERM):
    """Assert fn's (ret, errno) is (-1, expect_errno) under default and something else without."""
    kind, filtered = in_child(fn, "default")
    assert kind == "ok", filtered
    assert filtered == [-1, expect_errno], f"under the filter: {filtered}"
    kind, control = in_child(fn)
    assert kind == "ok", control
    assert control != [-1, expect_errno], f"without the filter the call already gives {control}"
    return control


CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_NEWUTS = 0x04000000
NS_FLAGS = {"NEWTIME": 0x80, "NEWNS": 0x20000, "NEWCGROUP": 0x02000000, "NEWUTS": 0x04000000,
            "NEWIPC": 0x08000000, "NEWUSER": 0x10000000, "NEWPID": 0x20000000, "NEWNET": 0x40000000}


def root() -> bool:
    return os.geteuid() == 0


needs_root = pytest.mark.skipif(not root(), reason="the control needs root (CAP_SYS_ADMIN)")


# ---- escape attempts under the default profile ---------------------------------------------------

@needs_root
def test_SECURITY_seccomp_default_denies_unshare():
    control = denied(lambda: raw("unshare", CLONE_NEWUSER))
    assert control == [0, 0]  # as root the new user namespace is made


@needs_root
def test_SECURITY_seccomp_default_denies_setns():
    def attempt():
        fd = os.open("/proc/self/ns/uts", os.O_RDONLY)
        return raw("setns", fd, CLONE_NEWUTS)
    assert denied(attempt) == [0, 0]  # rejoining our own namespace succeeds as root


@needs_root
def test_SECURITY_seccomp_default_denies_mount():
    # A remount of a path that does not exist: the kernel answers ENOENT after the capability
    # check, so nothing is mounted even in the control, and EPERM can only come from the filter.
    path = ctypes.c_char_p(b"/nonexistent-zygote-seccomp-test")
    attempt = lambda: raw("mount", 0, ctypes.cast(path, ctypes.c_void_p).value, 0, 32, 0)  # MS_REMOUNT
    assert denied(attempt) == [-1, errno.ENOENT]
    u = lambda: raw("umount2", ctypes.cast(path, ctypes.c_void_p).value, 0)
    assert denied(u) == [-1, errno.ENOENT]


@needs_root
def test_SECURITY_seccomp_default_denies_pivot_root():
    path = ctypes.c_char_p(b"/nonexistent-zygote-seccomp-test")
    p = ctypes.cast(path, ctypes.c_void_p).value
    assert denied(lambda: raw("pivot_root", p, p)) == [-1, errno.ENOENT]


def test_SECURITY_seccomp_default_denies_ptrace():
    PTRACE_TRACEME = 0
    assert denied(lambda: raw("ptrace", PTRACE_TRACEME, 0, 0, 0)) == [0, 0]


def test_SECURITY_seccomp_default_denies_bpf():
    # BPF_MAP_CREATE with a NULL attr: EFAULT-class errors in the control (or EPERM when
    # unprivileged bpf is off and we are not root, in which case there is no control).
    control = denied(lambda: raw("bpf", 0, 0, 0))
    assert control[0] == -1 and control[1] != errno.EPERM


def test_SECURITY_seccomp_default_denies_io_uring_setup():
    disabled = open("/proc/sys/kernel/io_uring_disabled").read().strip() if os.path.exists(
        "/proc/sys/kernel/io_uring_disabled") else "0"
    if disabled == "2":
        pytest.skip("io_uring is disabled host-wide (EPERM either way): no control possible")
    assert denied(lambda: raw("io_uring_setup", 1, 0)) == [-1, errno.EFAULT]
    assert in_child(lambda: [raw("io_uring_enter", 0, 0, 0, 0, 0, 0),
                             raw("io_uring_register", 0, 0, 0, 0)], "default") == \
        ("ok", [[-1, errno.EPERM], [-1, errno.EPERM]])


@needs_root
def test_SECURITY_seccomp_default_denies_userfaultfd():
    control = denied(lambda: raw("userfaultfd", os.O_CLOEXEC))
    assert control[0] >= 0  # a userfaultfd descriptor (root has CAP_SYS_PTRACE)


def test_SECURITY_seccomp_default_denies_keyctl():
    KEYCTL_GET_KEYRING_ID, KEY_SPEC_PROCESS_KEYRING = 0, -2
    control = denied(lambda: raw("keyctl", KEYCTL_GET_KEYRING_ID, KEY_SPEC_PROCESS_KEYRING, 0))
    assert control[0] == -1 and control[1] == errno.ENOKEY or control[0] > 0
    assert in_child(lambda: [raw("add_key", 0, 0, 0, 0, 0), raw("request_key", 0, 0, 0, 0)],
                    "default") == ("ok", [[-1, errno.EPERM], [-1, errno.EPERM]])


def test_SECURITY_seccomp_default_denies_perf_event_open():
    control = denied(lambda: raw("perf_event_open", 0, 0, -1, -1, 0))
    assert control == [-1, errno.EFAULT]


def test_SECURITY_seccomp_default_denies_clone3():
    # clone3(NULL, 0): EINVAL in the kernel (size below CLONE_ARGS_SIZE_VER0); ENOSYS from the
    # filter, so that glibc falls back to clone, whose flags the filter can see.
    assert denied(lambda: raw("clone3", 0, 0), errno.ENOSYS) == [-1, errno.EINVAL]


def _raw_clone(flags: int):
    ret, err = raw("clone", flags | signal.SIGCHLD, 0, 0, 0, 0)
    if ret == 0:  # the new process, fork-like (no stack given): leave at once
        os._exit(0)
    if ret > 0:
        os.waitpid(ret, 0)
        return [0, 0]
    return [ret, err]


@needs_root
@pytest.mark.parametrize("flag", ["NEWUSER", "NEWNET"])
def test_SECURITY_seccomp_default_denies_clone_namespace_flags(flag):
    assert denied(lambda: _raw_clone(NS_FLAGS[flag])) == [0, 0]


def test_SECURITY_seccomp_default_denies_every_clone_namespace_flag():
    def attempt():
        out = {name: _raw_clone(bit) for name, bit in NS_FLAGS.items()}
        out["NEWUSER|high bits"] = _raw_clone(CLONE_NEWUSER | (1 << 40))
        out["plain fork"] = _raw_clone(0)
        return out
    kind, res = in_child(attempt, "default")
    assert kind == "ok", res
    assert res.pop("plain fork") == [0, 0]
    assert res == {k: [-1, errno.EPERM] for k in res}


def test_SECURITY_seccomp_default_denies_personality():
    PER_LINUX32 = 0x0008
    control = denied(lambda: raw("personality", PER_LINUX32))
    assert control[0] >= 0
    assert in_child(lambda: [raw("personality", 0xFFFFFFFF), raw("personality", 0),
                             raw("personality", (1 << 32) | PER_LINUX32),
                             raw("personality", 0x0040000)],  # ADDR_NO_RANDOMIZE
                    "default") == ("ok", [[0, 0], [0, 0], [-1, errno.EPERM], [-1, errno.EPERM]])


def test_SECURITY_syscalls_newer_than_the_reviewed_table_are_refused():
    """The default profile is a deny-list: a syscall a later kernel adds would reach the kernel
    unread by anyone (a helper's review). Numbers above ``seccomp.NEWEST_REVIEWED`` get ENOSYS
    from the filter. This kernel has none above it, so the ceiling is lowered by two here:
    file_getattr, then one of the two newest, must get ENOSYS, and the newest one below the
    ceiling what the profile gives it. Fails with the ceiling removed."""
    profile = seccomp.load_profile("default")
    newest = seccomp.NEWEST_REVIEWED
    lowered = seccomp.compile_profile(profile, newest=newest - 2)

    def probe():  # (a null path: the kernel's own answer is EFAULT or EBADF, never ENOSYS)
        return [raw("file_getattr", -100, 0, 0, 0, 0), raw("open_tree_attr", -100, 0, 0, 0, 0)]
    kind, control = in_child(probe)
    assert kind == "ok" and errno.ENOSYS not in (control[0][1], control[1][1]), control
    assert seccomp._NEW_SYSCALLS["file_getattr"] > newest - 2 >= seccomp._NEW_SYSCALLS["open_tree_attr"]
    kind, got = in_child(probe, lowered)
    assert kind == "ok", got
    assert got[0] == [-1, errno.ENOSYS], got
    assert got[1] == in_child(probe, "default")[1][1] == [-1, errno.EPERM], got  # (the profile's own rule)
    assert in_child(lambda: raw("getpid")[0] > 0, lowered) == ("ok", True)


def test_SECURITY_a_child_cannot_flood_the_audit_log():
    """The default profile answered personality's query through SCMP_ACT_LOG (allowed, and
    audited): a child calling it in a loop wrote an audit record per call (200000 in a second
    in a helper's review; with auditd that is its log filled and other records lost, with
    `auditctl -f 2` a panic on overflow). The filter now answers the query itself. The records
    go to the kernel log when no audit daemon listens, as here: none may appear for the calls."""
    with open("/proc/sys/kernel/seccomp/actions_logged") as f:
        if "log" not in f.read().split():
            pytest.skip("this kernel does not log SECCOMP_RET_LOG actions (kernel.seccomp.actions_logged)")
    try:
        kmsg = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        pytest.skip(f"cannot read the kernel log: {e}")
    try:
        os.lseek(kmsg, 0, os.SEEK_END)
        assert in_child(lambda: [raw("personality", 0xFFFFFFFF) for _ in range(5)], "default") == ("ok", [[0, 0]] * 5)
        records = []
        while True:
            try:
                records.append(os.read(kmsg, 8192).decode(errors="replace"))
            except BlockingIOError:
                break
            except BrokenPipeError:  # (overwritten while read: go on from the next)
                continue
    finally:
        os.close(kmsg)
    logged = [r for r in records if "type=1326" in r and " syscall=135 " in r]
    assert logged == [], logged[:2]


@needs_root
def test_SECURITY_seccomp_default_denies_ioctl_tiocsti():
    TIOCSTI = 0x5412

    def attempt(request):
        def f():
            master, slave = os.openpty()
            c = ctypes.c_char(b"x")
            return raw("ioctl", slave, request, ctypes.addressof(c))
        return f
    # As root TIOCSTI works on any tty (CAP_SYS_ADMIN), whatever dev.tty.legacy_tiocsti says.
    assert denied(attempt(TIOCSTI)) == [0, 0]
    # The kernel reads the request as 32 bits; high bits must not slip past the filter.
    assert denied(attempt((1 << 32) | TIOCSTI)) == [0, 0]
    # ordinary terminal ioctls still work
    assert in_child(lambda: os.isatty(os.openpty()[1]), "default") == ("ok", True)


def test_SECURITY_seccomp_default_denies_vsock_and_rare_socket_families():
    """AF_VSOCK is not network-namespaced: a child with no network could bind the machine's vsock
    ports and reach the hypervisor's services (a review showed a child listening on this VM's
    vsock address). Families 17 and up, and the old ones below AF_NETLINK, are refused; the
    kernel truncates the family to 32 bits, so high bits must not slip a family past."""
    AF_VSOCK, SOCK_STREAM = 40, 1
    for family in (AF_VSOCK, (1 << 32) | AF_VSOCK, (0xFFFFFFFF << 32) | AF_VSOCK):
        control = denied(lambda: raw("socket", family, SOCK_STREAM, 0), errno.EAFNOSUPPORT)
        assert control[0] >= 0, control  # this host has vsock: the control made one
    kind, res = in_child(lambda: [raw("socket", f, t, 0)[0] >= 0
                                  for f, t in ((1, 1), (2, 1), (10, 2), (16, 3))], "default")
    assert (kind, res) == ("ok", [True] * 4)  # AF_UNIX, AF_INET, AF_INET6, AF_NETLINK still work


def test_SECURITY_seccomp_default_denies_host_netlink_protocols_and_mptcp():
    """Netlink sockets other than ROUTE, SOCK_DIAG and GENERIC are refused: a second wall against
    the host's device events (KOBJECT_UEVENT), which the kernel sends to every network namespace
    the host's user namespace owns (a child's is not, since session 26: zygote/_nsmaker.py), and
    no use in a sandbox for the others (audit, netfilter's logs, ...). MPTCP (and any protocol
    number from 262 on) is refused for AF_INET/AF_INET6: Landlock's TCP rules do not cover it, so
    a child with no network could bind and connect over it where TCP is denied. The kernel reads
    the protocol as 32 bits: high bits must not slip a refused one past."""
    AF_INET, AF_INET6, AF_NETLINK, SOCK_STREAM, SOCK_DGRAM = 2, 10, 16, 1, 2
    NETLINK_KOBJECT_UEVENT, NETLINK_AUDIT, IPPROTO_MPTCP = 15, 9, 262
    for proto in (NETLINK_KOBJECT_UEVENT, NETLINK_AUDIT, (1 << 32) | NETLINK_KOBJECT_UEVENT):
        control = denied(lambda: raw("socket", AF_NETLINK, SOCK_DGRAM, proto), errno.EPROTONOSUPPORT)
        assert control[0] >= 0, control  # the control made one
    for family in (AF_INET, AF_INET6):
        for proto in (IPPROTO_MPTCP, (1 << 32) | IPPROTO_MPTCP):
            control = denied(lambda: raw("socket", family, SOCK_STREAM, proto), errno.EPROTONOSUPPORT)
            assert control[0] >= 0, control  # this kernel has MPTCP: the control made one
    ok = [(AF_NETLINK, SOCK_DGRAM, 0), (AF_NETLINK, SOCK_DGRAM, 4), (AF_NETLINK, SOCK_DGRAM, 16),
          (AF_INET, SOCK_STREAM, 0), (AF_INET, SOCK_STREAM, 6), (AF_INET, SOCK_DGRAM, 17),
          (AF_INET6, SOCK_STREAM, 6), (AF_INET6, SOCK_DGRAM, 0)]
    kind, res = in_child(lambda: [raw("socket", *a)[0] >= 0 for a in ok], "default")
    assert (kind, res) == ("ok", [True] * len(ok))  # route/diag/generic netlink, TCP and UDP still work


def test_SECURITY_seccomp_default_denies_misc_admin_calls():
    names = ["kexec_load", "init_module", "finit_module", "delete_module", "reboot", "swapon",
             "acct", "settimeofday", "clock_settime", "open_by_handle_at", "process_vm_readv",
             "pidfd_getfd", "fanotify_init", "syslog", "chroot", "fsopen", "open_tree",
             "move_mount", "mount_setattr", "kcmp", "memfd_secret"]
    kind, res = in_child(lambda: {n: raw(n, 0, 0, 0, 0, 0, 0)[1] for n in names}, "default")
    assert kind == "ok", res
    assert res == {n: errno.EPERM for n in names}


@pytest.mark.skipif(not X86_64, reason="x32 and int 0x80 are x86_64 ABIs")
def test_SECURITY_seccomp_x32_and_int80():
    def x32_getpid():
        ctypes.set_errno(0)
        ret = libc.syscall(ctypes.c_long(39 | 0x40000000))  # __X32_SYSCALL_BIT | getpid
        return [ret, ctypes.get_errno()]

    def int80_getpid():
        code = bytes([0xB8, 20, 0, 0, 0,  # mov eax, 20  (getpid in the i386 table)
                      0xCD, 0x80,         # int 0x80
                      0xC3])              # ret
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        page.write(code)
        fn = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
        return [fn(), os.getpid()]

    # control: int 0x80 works (IA32 emulation); x32 gives ENOSYS when the kernel lacks x32
    kind, value = in_child(int80_getpid)
    if kind == "signal":
        pytest.skip(f"no IA32 emulation on this kernel (int 0x80 raised signal {value})")
    assert kind == "ok" and value[0] == value[1], value
    kind, value = in_child(x32_getpid)
    assert kind == "ok", value  # x32 may be missing (ENOSYS), but the process lives
    # under the filter both die of SIGSYS (bad-arch action KILL_PROCESS)
    assert in_child(int80_getpid, "default") == ("signal", signal.SIGSYS)
    assert in_child(x32_getpid, "default") == ("signal", signal.SIGSYS)
    assert in_child(int80_getpid, "strict") == ("signal", signal.SIGSYS)

    # ... the whole process, not only the thread that made the call (libseccomp's own bad-arch
    # action kills the thread: a single-threaded probe cannot tell the two apart)
    def from_a_thread(call):
        def run():
            t = threading.Thread(target=call, daemon=True)
            t.start()
            t.join(5)  # (a killed thread never ends for Python: the process lives on)
            return "survived"
        return run
    assert in_child(from_a_thread(int80_getpid)) == ("ok", "survived")  # (control: no filter)
    assert in_child(from_a_thread(int80_getpid), "default") == ("signal", signal.SIGSYS)
    assert in_child(from_a_thread(x32_getpid), "default") == ("signal", signal.SIGSYS)


# ---- ordinary programs still work ---------------------------------------------------------------

def test_seccomp_default_allows_fork_threads_subprocess():
    def work():
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        _, st = os.waitpid(pid, 0)
        box = []
        t = threading.Thread(target=lambda: box.append(sum(range(1000))))
        t.start()
        t.join()
        rc = subprocess.run(["/bin/true"]).returncode
        out = subprocess.run([sys.executable, "-c", "print(6*7)"], capture_output=True).stdout
        return [os.waitstatus_to_exitcode(st), box, rc, out.decode().strip()]
    assert in_child(work, "default") == ("ok", [7, [499500], 0, "42"])


def test_seccomp_strict_numpy_pandas():
    import numpy as np
    import pandas as pd  # preloaded before the filter, as the zygote does

    def work():
        import asyncio
        import tempfile
        df = pd.DataFrame({"k": np.arange(10_000) % 3, "v": np.ones(10_000)})
        total = df.groupby("k")["v"].sum().to_dict()
        a = np.arange(40_000, dtype=float).reshape(200, 200)
        dot = float((a @ a.T).trace())
        t = threading.Thread(target=lambda: None)
        t.start()
        t.join()
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "x.csv")
            df.head(5).to_csv(p)
            back = len(pd.read_csv(p))

        async def main():
            await asyncio.sleep(0)
            return "async"
        try:
            os.fork()
            forked = "forked"
        except PermissionError:
            forked = "no fork"
        return [{str(k): v for k, v in total.items()}, dot > 0, back, asyncio.run(main()), forked]

    kind, res = in_child(work, "strict")
    assert kind == "ok", res
    print(res)
    assert res == [{"0": 3334.0, "1": 3333.0, "2": 3333.0}, True, 5, "async", "no fork"]


def test_seccomp_strict_denies_namespaces_and_sockets():
    import socket

    def attempt():
        out = {n: _raw_clone(bit) for n, bit in NS_FLAGS.items()}
        out["unshare"] = list(raw("unshare", CLONE_NEWUSER))
        try:
            socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            out["socket"] = "made"
        except PermissionError:
            out["socket"] = "EPERM"
        out["thread"] = []
        t = threading.Thread(target=lambda: out["thread"].append(1))
        t.start()
        t.join()
        return out
    kind, res = in_child(attempt, "strict")
    assert kind == "ok", res
    assert res.pop("socket") == "EPERM" and res.pop("thread") == [1]
    assert res == {k: [-1, errno.EPERM] for k in res}


# ---- profiles -----------------------------------------------------------------------------------

def test_seccomp_profiles_load_and_compile():
    for name in ("default", "strict"):
        p = seccomp.load_profile(name)
        assert p["architectures"] == [seccomp._NATIVE_SCMP_ARCH]
        bpf = seccomp.compile_profile(p)
        assert len(bpf) % 8 == 0 and 0 < len(bpf) // 8 <= 4096
        assert seccomp.compile_cached(name) is seccomp.compile_cached(name)
        assert seccomp.load_profile(str(seccomp.PROFILE_DIR / f"{name}.json")) == p
        assert seccomp.normalize(p) == p  # idempotent
    assert seccomp.prepare("unconfined") == b""
    assert seccomp.prepare("default") == seccomp.compile_cached("default")


def test_the_daemon_loads_libseccomp_before_its_first_request():
    """Finding libseccomp runs ldconfig, a child process of the daemon, and compiling a profile
    takes 1-2 ms more: the daemon does both while its zygotes start, so its first spawn (~15 ms
    against ~10 with them done here) waits for neither and no helper process of the daemon's
    comes and goes during it."""
    from zygote_client import Client

    with Client.embedded() as c:
        with open(f"/proc/{c.status().daemon_pid}/maps") as f:
            assert "libseccomp" in f.read()


def test_seccomp_oci_object_accepted(tmp_path):
    sc = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
          "syscalls": [{"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EACCES}]}
    oci = {"ociVersion": "1.0.2", "process": {}, "linux": {"seccomp": sc}}
    for obj in (sc, oci):
        path = tmp_path / "p.json"
        path.write_text(json.dumps(obj))
        prof = seccomp.load_profile(str(path))
        assert in_child(lambda: [raw("getppid")[1], raw("getpid")[1]], prof) == ("ok", [errno.EACCES, 0])


def test_seccomp_kill_action_kills_the_process():
    prof = {"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["getppid"], "action": "SCMP_ACT_KILL"}]}

    def threaded():  # SCMP_ACT_KILL kills the process, not only the calling thread
        t = threading.Thread(target=lambda: raw("getppid"))
        t.start()
        t.join()
        return "survived"
    assert in_child(threaded, prof) == ("signal", signal.SIGSYS)
    prof["syscalls"][0]["action"] = "SCMP_ACT_KILL_PROCESS"
    assert in_child(lambda: raw("getppid"), prof) == ("signal", signal.SIGSYS)


def test_seccomp_unknown_syscall_names():
    deny = {"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mout"], "action": "SCMP_ACT_ERRNO"}]}
    with pytest.raises(ValueError, match="unknown syscall 'mout'") as ei:
        seccomp.compile_profile(deny)
    assert ei.value.step == "seccomp" and ei.value.hint
    allow = {"defaultAction": "SCMP_ACT_ERRNO",
             "syscalls": [{"names": ["read", "no_such_call_zg"], "action": "SCMP_ACT_ALLOW"}]}
    assert seccomp.normalize(allow)["syscalls"][0]["names"] == ["read"]
    # newer than libseccomp 2.5.4, resolved through our table; vm86 exists only on i386
    p = seccomp.normalize({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["open_tree_attr", "vm86"], "action": "SCMP_ACT_ERRNO"}]})
    assert p["syscalls"][0]["names"] == ["open_tree_attr", "vm86"]
    seccomp.compile_profile(p)


@pytest.mark.parametrize("profile, message", [
    ([], "expected a JSON object"),
    ({}, "missing defaultAction"),
    ({"defaultAction": "SCMP_ACT_NOPE"}, "unknown action 'SCMP_ACT_NOPE'"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_TRACE"}]},
     "SCMP_ACT_TRACE is not supported"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_NOTIFY"}]},
     "SCMP_ACT_NOTIFY is not supported"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_Z80"]}, "unknown architecture"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO",
      "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_LIKE"}]}]}, "unknown operator"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO",
      "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]}]}, "index: expected an integer in 0..5"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO",
      "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_GE"},
               {"index": 0, "value": 9, "op": "SCMP_CMP_LE"}]}]}, "second condition on argument 0"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": [], "action": "SCMP_ACT_ERRNO"}]},
     "non-empty 'names'"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/x.sock"}, "listenerPath"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "bogus": 1}, "unknown top-level keys"),
    ({"linux": {}}, "linux.seccomp"),
])
def test_seccomp_bad_profiles(profile, message):
    with pytest.raises(ValueError, match=message):
        seccomp.compile_profile(profile)


def test_seccomp_load_profile_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown seccomp profile 'nope'.*default"):
        seccomp.load_profile("nope")
    with pytest.raises(ValueError, match="absolute path"):
        seccomp.load_profile("../etc/passwd")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        seccomp.load_profile(str(bad))
    with pytest.raises(ValueError, match="cannot read"):
        seccomp.load_profile(str(tmp_path / "missing.json"))


def test_seccomp_docker_includes_excludes():
    prof = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
        {"names": ["getpid"], "action": "SCMP_ACT_ERRNO", "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
        {"names": ["gettid"], "action": "SCMP_ACT_ERRNO", "includes": {"arches": ["s390x"]}},
    ]}
    assert [r["names"] for r in seccomp.normalize(prof)["syscalls"]] == [["getpid"]]


def test_seccomp_apply_rejects_malformed_programs():
    def attempt(bpf):
        def f():
            try:
                seccomp.apply(bpf)
            except SetupError as e:
                return [e.step, e.errno, bool(e.hint)]
            return "loaded"
        return f
    assert in_child(attempt(b"")) == ("ok", ["seccomp", errno.EINVAL, True])
    assert in_child(attempt(b"\0" * 12)) == ("ok", ["seccomp", errno.EINVAL, True])
    # a well-formed length the kernel's verifier rejects (BPF_RET must end the program)
    assert in_child(attempt(struct.pack("HBBI", 0x20, 0, 0, 0))) == ("ok", ["seccomp", errno.EINVAL, True])


def test_seccomp_apply_sets_no_new_privs():
    def f():
        before = libc.prctl(39, 0, 0, 0, 0)
        seccomp.apply(seccomp.compile_cached("default"))
        return [before, libc.prctl(39, 0, 0, 0, 0)]
    assert in_child(f) == ("ok", [0, 1])


def test_SECURITY_seccomp_apply_filters_existing_threads():
    # SECCOMP_FILTER_FLAG_TSYNC: a thread that existed before the load is filtered too. Without
    # TSYNC it would stay unfiltered and its unshare would fail with EINVAL instead (the kernel
    # refuses CLONE_NEWUSER in a threaded process), so EPERM shows the filter reached it.
    def g():
        box = []
        ev = threading.Event()
        t = threading.Thread(target=lambda: (ev.wait(), box.append(raw("unshare", CLONE_NEWUSER))))
        t.start()
        seccomp.apply(seccomp.compile_cached("default"))
        ev.set()
        t.join()
        return box
    assert in_child(g) == ("ok", [[-1, errno.EPERM]])


def test_seccomp_docker_style_allow_list():
    """The constructs of Docker's own default profile: archMap, includes/excludes, caps,
    minKernel, MASKED_EQ without valueTwo, several EQ rules on one argument, clone3 -> ENOSYS."""
    import socket
    basics = ["read", "write", "close", "openat", "newfstatat", "fstat", "lseek", "mmap", "munmap",
              "mprotect", "brk", "futex", "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "exit",
              "exit_group", "getpid", "gettid", "wait4", "set_robust_list", "rseq", "madvise",
              "clock_gettime", "getrandom", "ioctl", "fcntl", "sched_yield", "set_tid_address",
              "mremap", "sigaltstack", "no_such_call_in_this_kernel", "_llseek", "getppid"]
    prof = {
        "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
        "archMap": [{"architecture": "SCMP_ARCH_X86_64",
                     "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
                    {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]},
                    {"architecture": "SCMP_ARCH_RISCV64", "subArchitectures": None}],
        "syscalls": [
            {"names": basics, "action": "SCMP_ACT_ALLOW"},
            {"names": ["ptrace"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "99.0"}},
            {"names": ["socket"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 40, "op": "SCMP_CMP_NE"}]},
            *({"names": ["personality"], "action": "SCMP_ACT_ALLOW",
               "args": [{"index": 0, "value": v, "op": "SCMP_CMP_EQ"}]} for v in (0, 8)),
            {"names": ["unshare", "mount"], "action": "SCMP_ACT_ALLOW",
             "includes": {"caps": ["CAP_SYS_ADMIN"]}},
            {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 2114060288, "op": "SCMP_CMP_MASKED_EQ"}],
             "excludes": {"caps": ["CAP_SYS_ADMIN"], "arches": ["s390", "s390x"]}},
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38,
             "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
        ]}

    def work():
        out = {"unshare": raw("unshare", CLONE_NEWUSER)[1], "ptrace": raw("ptrace", 0, 0, 0, 0)[1],
               "personality 8": raw("personality", 8)[0],
               "personality 0x20000": raw("personality", 0x20000)[1],
               "clone NEWNET": _raw_clone(CLONE_NEWNET), "fork": _raw_clone(0)}
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.close()
        try:
            socket.socket(40, socket.SOCK_STREAM)  # AF_VSOCK
            out["vsock"] = "made"
        except OSError as e:
            out["vsock"] = e.errno
        t = threading.Thread(target=lambda: None)
        t.start()
        t.join()
        return out
    assert in_child(work, prof) == ("ok", {
        "unshare": errno.EPERM, "ptrace": errno.EPERM, "personality 8": 0,
        "personality 0x20000": errno.EPERM, "clone NEWNET": [-1, errno.EPERM], "fork": [0, 0],
        "vsock": errno.EPERM})


def test_seccomp_module_import_does_not_load_libseccomp():
    # The zygote imports the child pipeline (and so this module); only the daemon compiles.
    code = "import sys, zygote.layers.seccomp; print('pyseccomp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("call", ["splice", "sendfile"])
def test_SECURITY_a_child_cannot_freeze_the_daemon_through_a_pipe_lock(socket_daemon, call):
    """splice/sendfile from an empty socket into a pipe wait for data holding the pipe's lock,
    and the pipe's reader waits for the lock uninterruptibly. The daemon reads the child's
    result pipe: a payload doing this into fd 5 froze the whole daemon. The default profile
    refuses both (EPERM) and the daemon serves on."""
    import threading

    from conftest import sandbox_children
    from zygote_client import Client

    def payload(call=call):
        import os
        import socket
        a, b = socket.socketpair()
        try:
            if call == "splice":
                os.splice(a.fileno(), 5, 16)
            else:
                os.sendfile(5, a.fileno(), None, 16)
        except OSError as e:
            return e.errno
        return "moved"

    out: list = []
    with Client.connect(socket_daemon) as c:
        dpid = c.status().daemon_pid
        t = threading.Thread(target=lambda: out.append(c.call(payload)), daemon=True)
        t.start()
        t.join(20)
        if t.is_alive():  # the daemon is stuck: free it by killing the child we started
            for pid in sandbox_children(dpid):
                os.kill(pid, signal.SIGKILL)
            t.join(20)
            pytest.fail(f"{call} into the result pipe froze the daemon")
        assert out == [errno.EPERM]
        assert c.call(lambda: 4) == 4


@pytest.mark.parametrize("profile", ["default", "strict"])
def test_SECURITY_no_set_id_file_is_made_or_marked(tmp_path, profile):
    """Under the default and the strict profile no call gives a file its set-user-ID or
    set-group-ID bit: a file a child leaves on a host directory bound read-write belongs to its
    host uid, the host honours those bits, and a local user running it would get a uid that later
    children of other clients get again (a helper's review). Every way in: chmod, fchmod,
    fchmodat, fchmodat2, open/openat/creat with O_CREAT, mknod/mknodat; openat2 (its mode out of
    seccomp's reach) is ENOSYS. The same calls without those bits still work. Fails without the
    rules: the control (no filter) marks every file set-ID."""
    AT_FDCWD = -100
    O_CREAT_W = os.O_CREAT | os.O_WRONLY
    arch = platform.machine()

    def attempts(base: str) -> dict:
        out = {}
        for bit in (0o4000, 0o2000, 0):
            mode = 0o755 | bit
            for way in ("chmod", "fchmod", "fchmodat", "fchmodat2", "openat", "open", "creat", "mknod", "mknodat"):
                if way in ("open", "creat", "mknod") and arch != "x86_64":
                    continue  # (aarch64 has only the *at calls)
                path = f"{base}/{way}-{bit:o}".encode()
                p = ctypes.c_char_p(path)
                if way.startswith(("chmod", "fchmod")):
                    os.close(os.open(path, O_CREAT_W, 0o644))
                if way == "chmod":
                    r = raw("chmod", ctypes.cast(p, ctypes.c_void_p).value, mode)
                elif way == "fchmod":
                    fd = os.open(path, os.O_RDONLY)
                    r = raw("fchmod", fd, mode)
                    os.close(fd)
                elif way in ("fchmodat", "fchmodat2"):
                    args = (AT_FDCWD, ctypes.cast(p, ctypes.c_void_p).value, mode) + ((0,) if way == "fchmodat2" else ())
                    r = raw(way, *args)
                    if way == "fchmodat2" and r == (-1, errno.ENOSYS):
                        continue  # (a kernel before 6.6)
                elif way == "openat":
                    r = raw("openat", AT_FDCWD, ctypes.cast(p, ctypes.c_void_p).value, O_CREAT_W, mode)
                elif way == "open":
                    r = raw("open", ctypes.cast(p, ctypes.c_void_p).value, O_CREAT_W, mode)
                elif way == "creat":
                    r = raw("creat", ctypes.cast(p, ctypes.c_void_p).value, mode)
                elif way == "mknod":
                    r = raw("mknod", ctypes.cast(p, ctypes.c_void_p).value, 0o100000 | mode, 0)
                else:
                    r = raw("mknodat", AT_FDCWD, ctypes.cast(p, ctypes.c_void_p).value, 0o100000 | mode, 0)
                if r[0] >= 0 and way in ("openat", "open", "creat"):
                    os.close(r[0])
                st = os.stat(path) if os.path.exists(path) else None
                out[f"{way} {bit:o}"] = [r[1], bool(st and st.st_mode & 0o6000)]
        how = ctypes.create_string_buffer(struct.pack("QQQ", O_CREAT_W, 0o4755, 0), 24)
        path = f"{base}/openat2".encode()
        out["openat2"] = list(raw("openat2", AT_FDCWD, ctypes.cast(ctypes.c_char_p(path), ctypes.c_void_p).value,
                                   ctypes.addressof(how), 24))
        return out

    # (the umask must not hide what the calls ask for)
    old = os.umask(0)
    try:
        (tmp_path / "f").mkdir()
        (tmp_path / "c").mkdir()
        kind, filtered = in_child(lambda: attempts(str(tmp_path / "f")), profile)
        kind2, control = in_child(lambda: attempts(str(tmp_path / "c")))
    finally:
        os.umask(old)
    assert (kind, kind2) == ("ok", "ok"), (filtered, control)
    never = ("creat", "mknod", "mknodat") if profile == "strict" else ()  # (the strict list has no use for them)
    for name, value in filtered.items():
        if name == "openat2":
            assert value[1] == (errno.ENOSYS if profile == "default" else errno.EPERM), value
            continue
        err, set_id = value
        if name.endswith(" 0"):
            assert err == (errno.EPERM if name.split()[0] in never else 0) and not set_id, (name, value)  # (works)
        else:
            assert err == errno.EPERM and not set_id, (name, value)
            assert control[name] == [0, True], (name, control[name])  # (the control marks it)


# Calls the default profile refuses that no other test makes: each with arguments it does no
# harm with when allowed (the control runs it unfiltered, as root, in a forked child), and that
# the kernel answers with something other than EPERM there. (x86_64 numbers.)
_REST = {
    "fsconfig": (431, -1, 0, 0, 0, 0), "fsmount": (432, -1, 0, 0), "fspick": (433, -1, 0, 0),
    "tee": (276, -1, -1, 0, 0), "vmsplice": (278, -1, 0, 0, 0),
    "process_vm_writev": (311, -1, 0, 0, 0, 0, 0), "process_madvise": (440, -1, 0, 0, 0, 0),
    "process_mrelease": (448, -1, 0), "swapoff": (168, 0), "quotactl": (179, 0, 0, 0, 0),
    "quotactl_fd": (443, -1, 0, 0, 0), "clock_adjtime": (305, 0, 0), "adjtimex": (159, 0),
    "iopl": (172, 0), "ioperm": (173, 0, 0, 0), "modify_ldt": (154, 0, 0, 0),
    "name_to_handle_at": (303, -100, 0, 0, 0, 0), "mbind": (237, 0, 0, 0, 0, 0, 0),
    "set_mempolicy": (238, 0, 0, 0), "migrate_pages": (256, 0, 0, 0, 0), "move_pages": (279, 0, 0, 0, 0, 0, 0),
}


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86_64 syscall numbers")
@needs_root
@pytest.mark.parametrize("name", sorted(_REST))
def test_SECURITY_seccomp_default_refuses_the_rest(name):
    """Each name of the default profile's deny rules that no other test calls (a helper's audit
    found ~20): refused with EPERM under the filter, answered otherwise without it."""
    def call():
        ctypes.set_errno(0)
        ret = libc.syscall(*(ctypes.c_long(a) for a in _REST[name]))
        return [ret, ctypes.get_errno()]
    denied(call)


def test_a_wheel_installs_the_named_profiles_where_the_daemon_looks():
    """A daemon installed from its wheel (not from a checkout) had no profiles: the wheel did not
    carry them, so every spawn failed "unknown seccomp profile 'default'" (the Docker image
    copied them in by hand). pyproject.toml's data-files must put every profile of the source
    tree where seccomp.py looks under sys.prefix. (Checked by hand: `pip wheel .`, installed
    into Python 3.12 and 3.13 virtualenvs, children ran with the default profile.)"""
    import glob
    import tomllib
    from conftest import REPO
    from zygote.layers import seccomp
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        data_files = tomllib.load(f)["tool"]["setuptools"]["data-files"]
    shipped = {os.path.relpath(p, REPO) for pattern in data_files.get(seccomp.INSTALLED_PROFILES, ())
               for p in glob.glob(os.path.join(REPO, pattern))}
    profiles = {os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "seccomp-profiles", "*"))}
    assert profiles and shipped == profiles, (data_files, profiles)
