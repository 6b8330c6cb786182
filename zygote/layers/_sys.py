"""Raw syscalls the child pipeline needs, through ctypes.

Raw, not glibc wrappers, where glibc would consult state the clone did not refresh: glibc's
setresuid/setresgid broadcast to every thread it believes exists (nptl "setxid"), which hangs in a
clone of a process that ever had threads. Everything here is resolved at import, in the zygote.
"""

from __future__ import annotations

import ctypes
import os
import struct

_ARCH = os.uname().machine  # (not platform: ~15 ms of imports in a fresh process)
NR = {
    "x86_64": dict(setresuid=117, setresgid=119, setgroups=116, pivot_root=155, seccomp=317,
                   landlock_create_ruleset=444, landlock_add_rule=445, landlock_restrict_self=446,
                   close_range=436, mount_setattr=442, capset=126, prctl=157, openat2=437,
                   setfsuid=122, setfsgid=123, faccessat2=439, name_to_handle_at=303, open_tree=428,
                   move_mount=429, keyctl=250),
    "aarch64": dict(setresuid=147, setresgid=149, setgroups=159, pivot_root=41, seccomp=277,
                    landlock_create_ruleset=444, landlock_add_rule=445, landlock_restrict_self=446,
                    close_range=436, mount_setattr=442, capset=91, prctl=167, openat2=437,
                    setfsuid=151, setfsgid=152, faccessat2=439, name_to_handle_at=264, open_tree=428,
                    move_mount=429, keyctl=219),
}[_ARCH]

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
libc.inotify_init1.argtypes = [ctypes.c_int]
libc.unshare.argtypes = [ctypes.c_int]
libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
libc.personality.argtypes = [ctypes.c_ulong]


libc.sigaction.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_SIGACTION_SIZE = 256  # more than glibc's struct sigaction on any architecture (152 on x86_64)


def handler_is_default(sig: int) -> bool:
    """Whether the process's handler for ``sig`` is SIG_DFL, as the kernel has it (sa_handler is
    the first member of struct sigaction; SIG_DFL is 0)."""
    buf = ctypes.create_string_buffer(_SIGACTION_SIZE)
    if libc.sigaction(sig, None, buf) != 0:
        return False
    return ctypes.c_void_p.from_buffer(buf).value is None


def signal_state(pid: int) -> tuple[int, bool] | None:
    """(the signals process ``pid`` catches, ignores or blocks, as a mask with bit N-1 for signal
    N; whether it is alive), from /proc/PID/status; None when that cannot be read (gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            fields = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
        mask = int(fields[b"SigCgt"], 16) | int(fields[b"SigIgn"], 16) | int(fields[b"SigBlk"], 16)
        return mask, fields[b"State"].split()[:1] not in ([b"Z"], [b"X"])
    except (OSError, KeyError, ValueError):
        return None


def unshare(flags: int) -> None:
    check(libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    check(libc.setns(fd, nstype), "setns")


def check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def write_once(path: str, data: str | bytes) -> None:
    """One write(2) to a kernel control file (cgroupfs, /proc/PID/uid_map, ...): each write is
    parsed as one command and its errno is the answer, so no buffering and no retry."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data.encode() if isinstance(data, str) else data)
    except OSError as e:  # (write(2)'s error names no file: a message built from it must)
        raise OSError(e.errno, e.strerror, path) from None
    finally:
        os.close(fd)


def syscall(name: str, *args: int | ctypes.c_void_p | None) -> int:
    return check(libc.syscall(NR[name], *args), name)


class _OpenHow(ctypes.Structure):  # struct open_how, openat2(2)
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH = 0x02, 0x04, 0x08
AT_FDCWD, AT_EMPTY_PATH = -100, 0x1000


def openat2(path: str, flags: int, resolve: int, dirfd: int = AT_FDCWD) -> int:
    """openat2(2) of ``path`` from ``dirfd`` (the working directory); raises OSError as os.open
    does (ENOSYS before Linux 5.6)."""
    how = _OpenHow(flags, 0, resolve)
    fd = libc.syscall(NR["openat2"], dirfd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def file_handle(fd: int) -> str:
    """The file system's handle for the file open at ``fd`` (name_to_handle_at, AT_EMPTY_PATH),
    as "type:hex". It names the inode and, where the file system keeps one, the inode's
    generation: a file given a deleted one's inode number has another handle. "" where the file
    system gives no handle."""
    buf = ctypes.create_string_buffer(8 + _MAX_HANDLE_SZ)  # struct file_handle
    struct.pack_into("I", buf, 0, _MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    if libc.syscall(NR["name_to_handle_at"], fd, b"", buf, ctypes.byref(mount_id), AT_EMPTY_PATH) != 0:
        return ""
    size, kind = struct.unpack_from("Ii", buf, 0)
    return f"{kind}:{buf.raw[8:8 + size].hex()}"


_MAX_HANDLE_SZ = 128


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def umount2(target: str, flags: int) -> None:
    check(libc.umount2(target.encode(), flags), f"umount {target}")


MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 2

PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def wait_for_path(path: str, most: float = 30.0) -> None:
    """Until ``path`` exists, ``most`` seconds at most (test hooks: a test says go on)."""
    import time
    deadline = time.monotonic() + most
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
