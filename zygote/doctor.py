"""`zygote doctor`: which confinement layers this host supports, and how to enable the missing ones.

Every answer comes from trying the real thing, never from version numbers: each kernel feature is
exercised in a forked, throwaway child (a new namespace, a tmpfs mount, a seccomp filter, a veth
pair), so whatever the probe creates disappears with that child and nothing touches the host's
namespaces. The few host-side probes (cgroup directories) create one ``zygote-doctor-<pid>``
directory and remove it at once.

The children all run at the same time and the parent collects them against one deadline, so the
whole doctor takes about as long as its slowest probe (usually importing pyroute2). A probe that
crashes, hangs or is killed (e.g. by a seccomp filter answering SIGSYS) is reported as missing;
it never takes the doctor down.

Only safe to call from a single-threaded process (it forks): the CLI is one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as E
import json
import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable

from ._clone import (
    ALL_NAMESPACES, CLONE_NEWCGROUP, CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWPID,
    CLONE_NEWUSER, CLONE_NEWUTS,
)
from .layers import _sys
from .layers import cgroups as _cg
from .layers import userns as _userns

TIMEOUT = 10.0
"""Hard cap for the whole run, in seconds: only a hung probe (or an emulated machine) reaches it;
a healthy host answers in well under two seconds."""

NAMESPACES = (  # (kind, clone flag, kernel config option)
    ("user", CLONE_NEWUSER, "CONFIG_USER_NS"),
    ("pid", CLONE_NEWPID, "CONFIG_PID_NS"),
    ("mount", CLONE_NEWNS, ""),
    ("ipc", CLONE_NEWIPC, "CONFIG_IPC_NS"),
    ("uts", CLONE_NEWUTS, "CONFIG_UTS_NS"),
    ("net", CLONE_NEWNET, "CONFIG_NET_NS"),
    ("cgroup", CLONE_NEWCGROUP, "CONFIG_CGROUPS"),
)
FLAG_NAMES = {CLONE_NEWUSER: "CLONE_NEWUSER", CLONE_NEWPID: "CLONE_NEWPID", CLONE_NEWNS: "CLONE_NEWNS",
              CLONE_NEWIPC: "CLONE_NEWIPC", CLONE_NEWUTS: "CLONE_NEWUTS", CLONE_NEWNET: "CLONE_NEWNET",
              CLONE_NEWCGROUP: "CLONE_NEWCGROUP"}

LANDLOCK_FEATURES = {1: "fs", 2: "refer", 3: "truncate", 4: "tcp", 5: "ioctl_dev", 6: "scope", 7: "audit"}

LAYER_NAMES = (
    *(f"ns-{kind}" for kind, _, _ in NAMESPACES),
    "clone3", "uid-map", "proc-mount", "tmpfs-mount", "bind-mount", "pivot-root", "cgroups", "landlock",
    "seccomp", "libseccomp", "no-new-privs", "python-prctl", "cap-net-admin", "nft", "veth", "pyroute2",
)
"""Every layer the doctor reports, in its output order."""

REQUIRED = frozenset((
    *(f"ns-{kind}" for kind, _, _ in NAMESPACES),
    "clone3", "uid-map", "proc-mount", "tmpfs-mount", "bind-mount", "pivot-root",
    "seccomp", "libseccomp", "no-new-privs", "python-prctl",
))
"""What the default SandboxConfig needs. Landlock ("auto") is skipped when missing; cgroups only
matter when limits are requested; nft, veth, CAP_NET_ADMIN and pyroute2 only for networked children."""

DOCKER_NS = ("in Docker: --security-opt seccomp=docker/seccomp-zygote.json "
             "--security-opt apparmor=unconfined (or --privileged)")
FIX_CGROUPS = ("run as root, or under systemd with Delegate=yes; in Docker: --cgroupns=private and a "
               "writable cgroup mount (/sys/fs/cgroup read-write)")

# include/uapi/linux/prctl.h, seccomp.h, filter.h
PR_SET_PDEATHSIG = 1
PR_GET_SECCOMP = 21
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
SECCOMP_SET_MODE_FILTER = 1
BPF_RET_K = 0x06
SECCOMP_RET_ALLOW = 0x7FFF0000
SYS_CLONE3 = 435
CAP_NET_ADMIN = 12

# A CDLL of our own: argtypes set here do not leak into _sys.libc's function objects.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


@dataclass
class Layer:
    name: str
    status: str     # "available", "partial" or "missing"
    detail: str
    fix: str = ""   # what to change on the host; only shown when not available
    required: bool = False


# ---------------------------------------------------------------------------------------------
# running a probe in a child


def _errname(err: int) -> str:
    return f"{E.errorcode.get(err, f'errno {err}')} ({os.strerror(err)})"


def _left(deadline: float) -> float:
    return max(0.1, deadline - time.monotonic())


def _fail(what: str, err: int | None = None) -> None:
    err = ctypes.get_errno() if err is None else err
    raise OSError(err, f"{what}: {_errname(err)}")


class _Pending:
    """A forked probe whose JSON answer waits in a pipe."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid, self.fd = pid, fd

    def result(self, deadline: float) -> dict:
        data = b""
        try:
            # Answers are small (well under a pipe buffer), so the child never blocks writing:
            # EOF or the deadline, whichever comes first, then reap, then take whatever arrived.
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                    break
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    break
                data += chunk
            status = self._reap(deadline)
            os.set_blocking(self.fd, False)  # a killed probe's grandchild may still hold the write end
            try:
                while chunk := os.read(self.fd, 65536):
                    data += chunk
            except BlockingIOError:
                pass
        finally:
            os.close(self.fd)
        if data:
            try:
                return json.loads(data)
            except ValueError:
                pass
        if status is None:
            return {"ok": False, "errno": E.ETIMEDOUT, "error": "the probe did not answer in time (killed)"}
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            why = " (a seccomp filter killed it)" if sig == signal.SIGSYS else ""
            return {"ok": False, "errno": 0, "error": f"the probe died of {signal.Signals(sig).name}{why}"}
        return {"ok": False, "errno": 0, "error": f"the probe exited {os.WEXITSTATUS(status)} without an answer"}

    def _reap(self, deadline: float) -> int | None:
        """Wait status, or None when the child had to be killed at the deadline."""
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return status
            if time.monotonic() >= deadline:
                os.kill(self.pid, signal.SIGKILL)  # our own child, by pid
                os.waitpid(self.pid, 0)
                return None
            time.sleep(0.002)


def _fork(fn: Callable[[], dict | None]) -> _Pending:
    """Run fn() in a forked child; its dict (or the OSError it raised) comes back as JSON.

    The child leaves with os._exit: it must never return into the caller's stack, flush the
    parent's stdio buffers or run atexit handlers.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            try:
                out = {"ok": True, **(fn() or {})}
            except OSError as e:
                out = {"ok": False, "errno": e.errno or 0, "error": e.strerror or str(e)}
            except BaseException as e:  # noqa: BLE001 - anything goes back to the parent as text
                out = {"ok": False, "errno": 0, "error": f"{type(e).__name__}: {e}"}
            data = json.dumps(out).encode()
            while data:
                data = data[os.write(w, data):]
        finally:
            os._exit(0)
    os.close(w)
    return _Pending(pid, r)


def _reraise(res: dict) -> dict:
    """Inside a probe: turn a grandchild's failure back into an OSError."""
    if not res.get("ok"):
        raise OSError(res.get("errno", 0), res.get("error", "failed"))
    return res


# ---------------------------------------------------------------------------------------------
# child-side steps


def _unshare(flags: int, what: str) -> None:
    if _libc.unshare(flags) != 0:
        _fail(what)


_write = _sys.write_once


def _own_userns(extra: int, what: str) -> None:
    """unshare a user namespace (plus `extra`) and map our own ids into it as root.

    user_namespaces(7): a process may write a one-line map of its own euid/egid into its own
    namespace's maps (after setgroups=deny). Without a map, files it creates (mkdir on a tmpfs)
    would fail with EOVERFLOW.
    """
    uid, gid = os.geteuid(), os.getegid()
    _unshare(CLONE_NEWUSER | extra, what)
    try:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/gid_map", f"0 {gid} 1\n")
        _write("/proc/self/uid_map", f"0 {uid} 1\n")
    except OSError as e:
        _fail("writing our own uid/gid map", e.errno or 0)


def _private_tmpfs() -> str:
    """In a fresh mount namespace: make every mount private, put a small tmpfs on the temp dir."""
    try:
        _sys.mount(None, "/", None, _sys.MS_REC | _sys.MS_PRIVATE)
    except OSError as e:
        _fail("mount --make-rprivate /", e.errno)
    top = tempfile.gettempdir()
    try:
        _sys.mount("zygote-doctor", top, "tmpfs", _sys.MS_NOSUID | _sys.MS_NODEV, "size=1m,mode=0755")
    except OSError as e:
        _fail(f"mount tmpfs on {top}", e.errno)
    return top


def _probe_ns(flag: int) -> Callable[[], dict]:
    def fn() -> dict:
        try:
            _unshare(flag, f"unshare({FLAG_NAMES[flag]})")
            return {"with_user": False}
        except OSError as e:
            # Without CAP_SYS_ADMIN only a new user namespace grants the right to make the others;
            # the zygote always creates them together, so that combination is what counts.
            if flag == CLONE_NEWUSER or e.errno != E.EPERM:
                raise
        _unshare(CLONE_NEWUSER | flag, f"unshare(CLONE_NEWUSER|{FLAG_NAMES[flag]})")
        return {"with_user": True}
    return fn


def _probe_clone3() -> dict:
    # clone3(NULL, 0): the kernel checks the size first (EINVAL, "exists"); ENOSYS when the kernel
    # or a seccomp filter (Docker's default profile) hides it. Nothing is ever created.
    ret = _libc.syscall(SYS_CLONE3, None, ctypes.c_size_t(0))
    clone3 = ctypes.get_errno() if ret < 0 else 0
    try:
        _unshare(ALL_NAMESPACES, "unshare(all 7 namespaces)")
        all_ns = ""
    except OSError as e:
        all_ns = e.strerror or str(e)
    return {"clone3_errno": clone3, "all_ns_error": all_ns}


def _probe_proc(deadline: float) -> dict:
    _own_userns(CLONE_NEWNS | CLONE_NEWPID, "unshare(CLONE_NEWUSER|CLONE_NEWNS|CLONE_NEWPID)")

    def pid1() -> dict:
        # proc is mounted for the mounter's *active* pid namespace, which only a child of the
        # unshare() caller has: that child is PID 1 of the new namespace.
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        try:
            _sys.mount(None, "/", None, _sys.MS_REC | _sys.MS_PRIVATE)
        except OSError as e:
            _fail("mount --make-rprivate /", e.errno)
        try:
            _sys.mount("proc", "/proc", "proc", _sys.MS_NOSUID | _sys.MS_NODEV | _sys.MS_NOEXEC)
        except OSError as e:
            _fail("mount -t proc proc /proc", e.errno)
        return {"self": os.readlink("/proc/self")}

    # a little before the parent's deadline, so our answer still reaches it
    return _reraise(_fork(pid1).result(deadline - 0.2))


def _probe_tmpfs() -> dict:
    _own_userns(CLONE_NEWNS, "unshare(CLONE_NEWUSER|CLONE_NEWNS)")
    top = _private_tmpfs()
    with open(os.path.join(top, "probe"), "w") as f:
        f.write("x")
    return {}


def _probe_bind() -> dict:
    _own_userns(CLONE_NEWNS, "unshare(CLONE_NEWUSER|CLONE_NEWNS)")
    top = _private_tmpfs()
    src = "/usr" if os.path.isdir("/usr") else "/"
    dst = os.path.join(top, "bind")
    os.mkdir(dst)
    try:
        _sys.mount(src, dst, None, _sys.MS_BIND | _sys.MS_REC)
    except OSError as e:
        _fail(f"bind-mount {src}", e.errno)
    # read-only, as the sandbox's binds of the interpreter are: a bind remount adding MS_RDONLY
    try:
        _sys.mount(None, dst, None, _sys.MS_REMOUNT | _sys.MS_BIND | _sys.MS_RDONLY)
    except OSError as e:
        _fail(f"remount the bind of {src} read-only", e.errno)
    if sorted(os.listdir(dst)) != sorted(os.listdir(src)):
        raise OSError(0, f"the bind of {src} does not show its contents")
    return {"source": src}


def _probe_pivot() -> dict:
    _own_userns(CLONE_NEWNS, "unshare(CLONE_NEWUSER|CLONE_NEWNS)")
    top = _private_tmpfs()
    new = os.path.join(top, "root")
    os.mkdir(new)
    try:  # pivot_root(2): new_root must be a mount point
        _sys.mount("zygote-doctor-root", new, "tmpfs", _sys.MS_NOSUID | _sys.MS_NODEV, "size=1m")
    except OSError as e:
        _fail("mount tmpfs for the new root", e.errno)
    os.mkdir(os.path.join(new, "old"))
    os.chdir(new)
    if _libc.syscall(_sys.NR["pivot_root"], b".", b"old") != 0:
        _fail("pivot_root")
    os.chdir("/")
    try:
        _sys.umount2("/old", _sys.MNT_DETACH)
    except OSError as e:
        _fail("detach the old root", e.errno)
    os.rmdir("/old")
    if os.listdir("/"):
        raise OSError(0, "the new root is not empty after pivot_root")
    return {}


def _probe_uidmap_child(ready_w: int, go_r: int, parents: tuple[int, int], deadline: float
                        ) -> Callable[[], dict]:
    def fn() -> dict:
        for fd in parents:  # the parent's ends: holding go's write end ourselves would hide its EOF
            os.close(fd)
        _unshare(CLONE_NEWUSER, "unshare(CLONE_NEWUSER)")
        os.write(ready_w, b"r")
        if not select.select([go_r], [], [], _left(deadline))[0] or os.read(go_r, 1) != b"g":
            raise OSError(0, "the parent could not write our maps")
        with open("/proc/self/uid_map") as f:
            uid_map = " ".join(f.read().split())
        if not uid_map:
            raise OSError(0, "uid_map is still empty")
        if uid_map.split()[0] == "0":  # become the namespace's root, as userns.apply does
            if _libc.syscall(_sys.NR["setresgid"], 0, 0, 0) != 0:
                _fail("setresgid(0) inside")
            if _libc.syscall(_sys.NR["setresuid"], 0, 0, 0) != 0:
                _fail("setresuid(0) inside")
        return {"uid_map": uid_map, "uid": os.getuid()}
    return fn


def _probe_landlock() -> dict:
    ret = _libc.syscall(_sys.NR["landlock_create_ruleset"], None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if ret < 0:
        _fail("landlock_create_ruleset(LANDLOCK_CREATE_RULESET_VERSION)")
    return {"abi": ret}


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def _probe_seccomp() -> dict:
    # seccomp(2): an unprivileged filter load needs no_new_privs first, as the sandbox does it.
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        _fail("prctl(PR_SET_NO_NEW_PRIVS)")
    allow = (_SockFilter * 1)(_SockFilter(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    prog = _SockFprog(1, allow)
    if _libc.syscall(_sys.NR["seccomp"], SECCOMP_SET_MODE_FILTER, 0, ctypes.byref(prog)) != 0:
        _fail("seccomp(SECCOMP_SET_MODE_FILTER)")
    mode = _libc.prctl(PR_GET_SECCOMP, 0, 0, 0, 0)
    if mode != 2:
        raise OSError(0, f"PR_GET_SECCOMP says mode {mode} after loading a filter")
    return {}


def _probe_nnp() -> dict:
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        _fail("prctl(PR_SET_NO_NEW_PRIVS)")
    if _libc.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1:
        raise OSError(0, "PR_GET_NO_NEW_PRIVS does not read back 1")
    return {}


def _probe_import(name: str) -> Callable[[], dict]:
    def fn() -> dict:
        mod = __import__(name)
        return {"version": str(getattr(mod, "__version__", "") or ""), "file": getattr(mod, "__file__", "")}
    return fn


def _probe_libseccomp() -> dict:
    lib = ctypes.util.find_library("seccomp")
    if not lib:
        raise OSError(E.ENOENT, "libseccomp not found (ctypes.util.find_library)")
    import pyseccomp  # noqa: F401 - the daemon compiles profiles through it
    return {"lib": lib}


def _throwaway_netns() -> None:
    """This (forked probe) process into a network namespace of its own (through a user namespace
    of its own when not root): what it makes there goes with it."""
    if os.geteuid() == 0:
        _unshare(CLONE_NEWNET, "unshare(CLONE_NEWNET)")
    else:
        _own_userns(CLONE_NEWNET, "unshare(CLONE_NEWUSER|CLONE_NEWNET)")


def _probe_veth(ifname: str, deadline: float) -> Callable[[], dict]:
    def fn() -> dict:
        _throwaway_netns()  # (the pair dies with this child even if deleting it fails)
        a, b = ifname + "a", ifname + "b"
        ip = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.path.exists(p)), None)
        if ip:
            r = subprocess.run([ip, "link", "add", a, "type", "veth", "peer", "name", b],
                               capture_output=True, text=True, timeout=_left(deadline))
            if r.returncode:
                raise OSError(0, f"ip link add {a} type veth: {r.stderr.strip() or r.returncode}")
            subprocess.run([ip, "link", "del", a], capture_output=True, timeout=_left(deadline))
            return {"tool": "ip"}
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            ipr.link("add", ifname=a, kind="veth", peer=b)
            ipr.link("del", index=ipr.link_lookup(ifname=a)[0])
        return {"tool": "pyroute2"}
    return fn


def _probe_nft_ruleset() -> dict:
    """The daemon's egress table (its flow budgets and conntrack timeout policies included) loads,
    in a throwaway network namespace: nf_tables alone is not enough (nft_connlimit, nft_limit,
    conntrack timeouts)."""
    _throwaway_netns()
    from . import _nft
    # A libnftables context this process made before (the doctor run from a program that uses
    # it: the tests) holds a netlink socket of the namespace it was made in: a new one here.
    _nft._library.cache_clear()
    try:
        _nft.apply(_nft.ruleset("zygote-doctor"))
        _nft.apply(_nft.timeouts("zygote-doctor"))
    except _nft.NftError as e:
        raise OSError(0, str(e).strip().splitlines()[0] if str(e).strip() else "nft refused the table") from None
    return {}


# ---------------------------------------------------------------------------------------------
# judging the answers


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _status_field(name: str) -> str | None:
    for line in (_read("/proc/self/status") or "").splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return None


def _userns_fix(err: int = E.EPERM) -> str:
    """What to change when a new user namespace is refused with errno `err`."""
    fixes = []
    max_userns = _read("/proc/sys/user/max_user_namespaces")
    if err == E.ENOSPC or max_userns == "0":  # the per-user limit; 0 turns user namespaces off
        fixes.append("sysctl -w user.max_user_namespaces=15000")
    if err == E.EPERM:
        if os.geteuid() != 0 and _read("/proc/sys/kernel/unprivileged_userns_clone") == "0":
            fixes.append("sysctl -w kernel.unprivileged_userns_clone=1 (Debian/Ubuntu kernels)")
        if _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
            fixes.append("sysctl -w kernel.apparmor_restrict_unprivileged_userns=0 (Ubuntu 23.10+), or an "
                         "AppArmor profile granting userns")
    if err == E.EINVAL:
        fixes.append("a kernel built with CONFIG_USER_NS=y")
    # Nothing on the host explains it: most likely a container's seccomp profile or LSM.
    fixes.append(DOCKER_NS)
    return "; ".join(fixes)


def _ns_layer(kind: str, flag: int, config: str, res: dict) -> Layer:
    name = f"ns-{kind}"
    if res.get("ok"):
        how = " (inside a new user namespace, as the zygote makes it)" if res.get("with_user") else ""
        return Layer(name, "available", f"unshare({FLAG_NAMES[flag]}) works{how}")
    err = res.get("errno", 0)
    if kind == "user":
        fix = _userns_fix(err)
    elif err == E.EINVAL and config:
        fix = f"a kernel built with {config}=y"
    elif err == E.ENOSPC:
        fix = f"sysctl -w user.max_{kind}_namespaces=15000"
    else:
        fix = "run as root, or enable unprivileged user namespaces; " + DOCKER_NS
    return Layer(name, "missing", res.get("error", "failed"), fix)


def _clone3_layer(res: dict) -> Layer:
    if not res.get("ok"):
        return Layer("clone3", "missing", res.get("error", "failed"), DOCKER_NS)
    c3 = res["clone3_errno"]
    have = c3 in (E.EINVAL, E.EFAULT, 0)
    parts = ["clone3 present" if have else f"clone3: {_errname(c3)}"]
    parts.append(f"all 7 namespaces at once: {res['all_ns_error'] or 'works'}")
    fixes = []
    if not have:
        fixes.append("a kernel >= 5.3; in Docker the default seccomp profile hides clone3: "
                     "--security-opt seccomp=docker/seccomp-zygote.json")
    if res["all_ns_error"]:
        fixes.append("see the ns-* lines")
    status = "available" if not fixes else ("partial" if have or not res["all_ns_error"] else "missing")
    return Layer("clone3", status, "; ".join(parts), "; ".join(fixes))


def _uidmap(deadline: float) -> Layer:
    """The daemon's part: write a new user namespace's maps from outside, as userns.outside does."""
    uid, gid = os.geteuid(), os.getegid()
    uid_map, gid_map = _userns.map_lines(_userns.DEFAULT_ID_BASE, uid, gid)
    fix = ("run the daemon as root (CAP_SETUID and CAP_SETGID) for the 65536-id range; an unprivileged "
           "daemon can map only its own uid; " + DOCKER_NS)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    try:
        p = _fork(_probe_uidmap_child(ready_w, go_r, (ready_r, go_w), deadline))
    except OSError:
        os.close(ready_r)
        os.close(go_w)
        raise
    finally:
        os.close(ready_w)
        os.close(go_r)
    problem = ""
    try:
        left = max(0.0, deadline - time.monotonic())
        if select.select([ready_r], [], [], left)[0] and os.read(ready_r, 1) == b"r":
            try:
                _userns.outside(p.pid, uid_map, gid_map)
                os.write(go_w, b"g")
            except OSError as e:
                problem = f"writing /proc/{p.pid}/uid_map: {_errname(e.errno or 0)}"
    finally:
        os.close(ready_r)
        os.close(go_w)  # EOF releases the child whatever happened
        res = p.result(deadline)  # always reaped, even when the code above raised
    if problem:
        return Layer("uid-map", "missing", problem, fix)
    if not res.get("ok"):
        return Layer("uid-map", "missing", res.get("error", "failed"), fix)
    return Layer("uid-map", "available", f"wrote \"{uid_map.decode().strip()}\" for a child; it sees uid "
                 f"{res['uid']} inside")


def _mount_layer(name: str, res: dict, what: str, fix: str) -> Layer:
    if res.get("ok"):
        return Layer(name, "available", what)
    if "own uid/gid map" in res.get("error", ""):
        # e.g. uid 0 without CAP_SETFCAP may not map host root (user_namespaces(7), since 5.12)
        fix = "run as root with the default capabilities, or as an ordinary user; " + DOCKER_NS
    return Layer(name, "missing", res.get("error", "failed"), fix)


def _cgroups() -> Layer:
    """Per controller the sandbox uses: where it lives and whether we may create a cgroup there."""
    mounts = _cg._mounts()
    own = _cg._own_cgroups()
    v1 = [m for m in mounts if m[0] == "cgroup"]
    v2 = [m for m in mounts if m[0] == "cgroup2"]
    kind = "hybrid" if v1 and v2 else "v1" if v1 else "v2" if v2 else "none"
    if kind == "none":
        return Layer("cgroups", "missing", "no cgroup filesystem is mounted", FIX_CGROUPS)
    v2dir, v2ctrls, v2sub = None, set(), set()
    if "" in own:
        for _, root, mnt, _ in v2:
            try:
                d = _cg._under(mnt, root, own[""])
                v2ctrls = set((_read(os.path.join(d, "cgroup.controllers")) or "").split())
            except Exception:  # noqa: BLE001 - a cgroup outside our namespace: try the next mount
                continue
            v2dir = d
            v2sub = set((_read(os.path.join(d, "cgroup.subtree_control")) or "").split())
            break
    parts, good = [], 0
    for c in _cg.CONTROLLERS:
        if v2dir and c in v2ctrls:
            where, ver = v2dir, "v2"
        else:
            found = next(((mnt, root) for fs, root, mnt, opts in v1 if c in opts), None)
            if not found or c not in own:
                parts.append(f"{c}: not mounted")
                continue
            try:
                where, ver = _cg._under(found[0], found[1], own[c]), "v1"
            except Exception as e:  # noqa: BLE001
                parts.append(f"{c}: {e}")
                continue
        probe = os.path.join(where, f"zygote-doctor-{os.getpid()}")
        try:
            os.mkdir(probe)
        except OSError as e:
            parts.append(f"{c}: {ver} at {where}, not writable: {_errname(e.errno or 0)}")
            continue
        try:
            _rmdir(probe)
        except OSError as e:
            parts.append(f"{c}: {ver} at {where}, could not remove {probe}: {_errname(e.errno or 0)}")
            continue
        note = ""
        if ver == "v2" and c not in v2sub:
            if os.access(os.path.join(where, "cgroup.subtree_control"), os.W_OK):
                note = " (not yet in subtree_control; the daemon enables it)"
            else:
                note = " (not delegated: subtree_control is not writable)"
        if not note.startswith(" (not delegated"):
            good += 1
        parts.append(f"{c}: {ver} at {where}, writable{note}")
    status = "available" if good == len(_cg.CONTROLLERS) else "partial" if good else "missing"
    return Layer("cgroups", status, f"{kind}; " + "; ".join(parts),
                 "" if status == "available" else FIX_CGROUPS)


def _rmdir(path: str) -> None:
    deadline = time.monotonic() + 1.0
    while True:
        try:
            os.rmdir(path)
            return
        except OSError as e:
            if e.errno != E.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _landlock_layer(res: dict) -> Layer:
    fix = ("a kernel with CONFIG_SECURITY_LANDLOCK=y and landlock in its LSM list "
           "(lsm=landlock,... on the kernel command line)")
    if not res.get("ok"):
        err = res.get("errno", 0)
        why = {E.ENOSYS: "not built into this kernel", E.EOPNOTSUPP: "built in but not enabled at boot"}
        detail = res.get("error", "failed")
        if err in why:
            detail += f": {why[err]}"
        return Layer("landlock", "missing", detail + "; landlock=\"auto\" runs without it", fix)
    abi = res["abi"]
    brings = [LANDLOCK_FEATURES[i] for i in sorted(LANDLOCK_FEATURES) if i <= abi]
    if abi > max(LANDLOCK_FEATURES):
        brings.append("and newer")
    return Layer("landlock", "available", f"ABI {abi}: " + ", ".join(brings))


def _seccomp_layer(res: dict) -> Layer:
    mode = _status_field("Seccomp")
    here = {"0": "", "1": "; this process runs in strict mode", "2": "; this process already runs under a "
            "seccomp filter (filters stack)"}.get(mode or "", "")
    if mode is None:
        return Layer("seccomp", "missing", "no Seccomp field in /proc/self/status",
                     "a kernel with CONFIG_SECCOMP=y and CONFIG_SECCOMP_FILTER=y")
    if res.get("ok"):
        return Layer("seccomp", "available", "a filter loads in a child with no_new_privs" + here)
    return Layer("seccomp", "missing", res.get("error", "failed") + here,
                 "a kernel with CONFIG_SECCOMP_FILTER=y; " + DOCKER_NS)


def _libseccomp_layer(res: dict) -> Layer:
    if res.get("ok"):
        return Layer("libseccomp", "available", f"{res['lib']}; pyseccomp importable")
    return Layer("libseccomp", "missing", res.get("error", "failed"),
                 "apt-get install libseccomp2 && pip install pyseccomp")


def _import_layer(name: str, res: dict, fix: str) -> Layer:
    if res.get("ok"):
        v = f" {res['version']}" if res.get("version") else ""
        return Layer(name, "available", f"importable{v} ({res.get('file', '')})")
    return Layer(name, "missing", res.get("error", "failed"), fix)


def _cap_net_admin() -> Layer:
    cap = _status_field("CapEff")
    fix = "run the daemon as root, or in Docker --cap-add NET_ADMIN (needed only for networked children)"
    if cap is None:
        return Layer("cap-net-admin", "missing", "no CapEff in /proc/self/status", fix)
    if int(cap, 16) >> CAP_NET_ADMIN & 1:
        return Layer("cap-net-admin", "available", "CAP_NET_ADMIN is effective in this network namespace")
    return Layer("cap-net-admin", "missing", f"CAP_NET_ADMIN is not effective (CapEff {cap})", fix)


def _nft(deadline: float, ruleset: dict) -> Layer:
    layer = _nft_tool(deadline)
    if layer.status == "available" and not ruleset.get("ok"):
        return Layer("nft", "partial", f"{layer.detail}, but the daemon's egress table does not load: "
                     f"{ruleset.get('error', 'failed')}",
                     "a kernel with nft_connlimit, nft_limit and conntrack timeout policies "
                     "(CONFIG_NFT_CONNLIMIT, CONFIG_NFT_LIMIT, CONFIG_NF_CONNTRACK_TIMEOUT)")
    if layer.status == "available":
        return Layer("nft", "available", f"{layer.detail}; the daemon's egress table loads (in a throwaway netns)")
    return layer


def _nft_tool(deadline: float) -> Layer:
    from . import _nft as nftlib
    nft = shutil.which("nft") or next((p for p in ("/usr/sbin/nft", "/sbin/nft") if os.path.exists(p)), None)
    if not nft:
        if nftlib._library() is not None:  # what the daemon uses first anyway
            return Layer("nft", "available", "libnftables (the nft tool itself is not installed)")
        return Layer("nft", "missing", "neither the nft tool nor libnftables is usable", "apt-get install nftables")
    try:
        r = subprocess.run([nft, "list", "tables"], capture_output=True, text=True, timeout=_left(deadline))
    except (OSError, subprocess.TimeoutExpired) as e:
        return Layer("nft", "partial", f"{nft} found but failed: {e}", "apt-get install nftables")
    if r.returncode:
        msg = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        return Layer("nft", "partial", f"{nft} found; `nft list tables` failed: {msg}",
                     "nft needs CAP_NET_ADMIN and nf_tables: run as root or --cap-add NET_ADMIN; modprobe nf_tables")
    return Layer("nft", "available", f"{nft}; `nft list tables` works")


def _veth_layer(res: dict) -> Layer:
    if res.get("ok"):
        return Layer("veth", "available", f"a veth pair can be made (in a throwaway netns, with {res['tool']})")
    return Layer("veth", "missing", res.get("error", "failed"),
                 "a kernel with CONFIG_VETH (modprobe veth) and network namespaces; " + DOCKER_NS)


# ---------------------------------------------------------------------------------------------
# public


def probe(timeout: float | None = None) -> list[dict]:
    """Probe every layer; one dict per layer, in LAYER_NAMES order.

    Each dict has ``name``, ``status`` ("available", "partial" or "missing"), ``detail``, ``fix``
    (empty when available) and ``required`` (the default configuration needs it). Never raises for
    a failing probe: the failure is the answer. A probe still running after ``timeout`` seconds
    (counted from the start; default TIMEOUT) is killed and reported missing.
    """
    deadline = time.monotonic() + (TIMEOUT if timeout is None else timeout)
    pending: dict[str, _Pending] = {}
    troubles: dict[str, str] = {}

    def spawn(key: str, fn: Callable[[], dict | None]) -> None:
        try:
            pending[key] = _fork(fn)
        except OSError as e:
            troubles[key] = f"could not fork the probe: {_errname(e.errno or 0)}"

    # Slowest first (imports), so they overlap everything else.
    spawn("pyroute2", _probe_import("pyroute2"))
    spawn("libseccomp", _probe_libseccomp)
    spawn("python-prctl", _probe_import("prctl"))
    for kind, flag, _ in NAMESPACES:
        spawn(f"ns-{kind}", _probe_ns(flag))
    spawn("clone3", _probe_clone3)
    spawn("proc-mount", lambda: _probe_proc(deadline))
    spawn("tmpfs-mount", _probe_tmpfs)
    spawn("bind-mount", _probe_bind)
    spawn("pivot-root", _probe_pivot)
    spawn("landlock", _probe_landlock)
    spawn("seccomp", _probe_seccomp)
    spawn("no-new-privs", _probe_nnp)
    spawn("veth", _probe_veth(f"zgdoc{os.getpid()}", deadline))
    spawn("nft-ruleset", _probe_nft_ruleset)

    def res(key: str) -> dict:
        if key in troubles:
            return {"ok": False, "errno": 0, "error": troubles[key]}
        return pending.pop(key).result(deadline)  # collected (and reaped) exactly once

    judges: dict[str, Callable[[], Layer]] = {
        **{f"ns-{kind}": (lambda kind=kind, flag=flag, cfg=cfg: _ns_layer(kind, flag, cfg, res(f"ns-{kind}")))
           for kind, flag, cfg in NAMESPACES},
        "clone3": lambda: _clone3_layer(res("clone3")),
        "uid-map": lambda: _uidmap(deadline),
        "proc-mount": lambda: _mount_layer(
            "proc-mount", res("proc-mount"), "a fresh proc mounts in a new user+mount+pid namespace",
            "the host's /proc must be fully visible (no masked or over-mounted paths); in Docker: "
            "--security-opt systempaths=unconfined"),
        "tmpfs-mount": lambda: _mount_layer(
            "tmpfs-mount", res("tmpfs-mount"), "tmpfs mounts in a new user+mount namespace", DOCKER_NS),
        "bind-mount": lambda: _mount_layer(
            "bind-mount", res("bind-mount"), "read-only bind mounts work in a new user+mount namespace",
            DOCKER_NS),
        "pivot-root": lambda: _mount_layer(
            "pivot-root", res("pivot-root"), "pivot_root into a tmpfs and detaching the old root work",
            DOCKER_NS),
        "cgroups": _cgroups,
        "landlock": lambda: _landlock_layer(res("landlock")),
        "seccomp": lambda: _seccomp_layer(res("seccomp")),
        "libseccomp": lambda: _libseccomp_layer(res("libseccomp")),
        "no-new-privs": lambda: _mount_layer(
            "no-new-privs", res("no-new-privs"), "PR_SET_NO_NEW_PRIVS sets and reads back", "a kernel >= 3.5"),
        "python-prctl": lambda: _import_layer(
            "python-prctl", res("python-prctl"), "apt-get install libcap-dev && pip install python-prctl"),
        "cap-net-admin": _cap_net_admin,
        "nft": lambda: _nft(deadline, res("nft-ruleset")),
        "veth": lambda: _veth_layer(res("veth")),
        "pyroute2": lambda: _import_layer("pyroute2", res("pyroute2"), "pip install pyroute2"),
    }
    layers: list[Layer] = []
    try:
        for name in LAYER_NAMES:
            try:
                layer = judges[name]()
            except Exception as e:  # noqa: BLE001 - a broken probe is reported, never fatal
                layer = Layer(name, "missing", f"the probe failed: {type(e).__name__}: {e}")
            layer.required = name in REQUIRED
            layers.append(layer)
    finally:
        for p in pending.values():  # never collected (an exception above), so never reaped: our child still
            try:
                os.kill(p.pid, signal.SIGKILL)
                os.waitpid(p.pid, 0)
            except OSError:
                pass
            try:
                os.close(p.fd)
            except OSError:
                pass
    return [asdict(layer) for layer in layers]


def main(json_out: bool = False) -> int:
    """Print one line per layer (or, with json_out, one JSON object); 0 when the default
    configuration can run on this host, 1 otherwise."""
    started = time.monotonic()
    layers = probe()
    missing = [la["name"] for la in layers if la["required"] and la["status"] != "available"]
    ok = not missing
    if json_out:
        print(json.dumps({"ok": ok, "layers": layers}, indent=2))
        return 0 if ok else 1
    who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    print(f"zygote doctor: {platform.system()} {platform.release()} {platform.machine()}, as {who} "
          f"({time.monotonic() - started:.2f} s)")
    width = max(len(la["name"]) for la in layers)
    for la in layers:
        mark = "*" if la["required"] else " "
        line = f"{mark} {la['name']:<{width}}  {la['status']:<9}  {la['detail']}"
        if la["status"] != "available" and la["fix"]:
            line += f"  -- fix: {la['fix']}"
        print(line)
    print("(* = needed by the default configuration)")
    if ok:
        print("ok: the default configuration can run here")
    else:
        print(f"NOT ok: the default configuration needs {', '.join(missing)}")
    return 0 if ok else 1
