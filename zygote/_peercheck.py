"""Whether a client may reach the host paths it named: the kernel's own answer, as the client.

The daemon (policy.check_peer_paths) starts this file once, as a process of its own, as root:
``python -I -S _peercheck.py <directory holding the zygote package> <fd>``, the fd being a
SOCK_SEQPACKET socket to the daemon. Each message on it carries the check's timeout (seconds, as
text) and one fd: a stream socket of the daemon's for that check. For each, this server forks a
worker, which sets its own timer to the timeout and half a second (SIGALRM left at its default action: the kernel
ends the worker, even one waiting on a file system, as it would for SIGKILL) and reads one
request from that socket up to EOF (having written its pid and a NUL first): fields ended by NUL, which no path holds: uid, gid, groups
joined by commas, then "r", "w" or "e" and a path for each path ("e": only that the client's walk
reaches it, as for a mount point inside a bind; no handle). It takes the client's file-system
ids (setgroups, setfsgid, setfsuid; then every capability set emptied, since a daemon that is
not root may carry some) and answers on the same socket "+" and, for each path, its canonical
path, st_dev, st_ino and file handle (_sys.file_handle), each ended by NUL, or four empty fields
when the client may not reach it; or "!" and why it could not check at all. (No json: its
imports alone cost ~15 ms of a fresh interpreter's start.) Each path is one kernel walk (openat2
O_PATH: symlinks followed as the client's own open would follow them, no /proc magic link), and
the question goes to faccessat2 about the very file that walk opened (mode bits, ACLs, groups);
the canonical path is the kernel's name for it.

A process rather than a thread of the daemon with the client's fsuid: a thread's borrowed ids
would be seen by the garbage collector's finalizers run in it and undone by any glibc set*id call
in the daemon, and a walk stuck on a file system that does not answer would hold the thread.
Each worker dies with its answer (its timer ends it at the latest; the kernel reaps it: SIGCHLD
is ignored here). A server that forks, rather than a fresh interpreter per check: ~1 ms a
check instead of ~20-30. The server reads nothing but the daemon's messages, and exits when the
daemon closes its end.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import stat
import sys

_AT_EACCESS = 0x200
_PATH_MAX = 4096
MAX_REQUEST = 4 << 20  # bytes of one request (256 paths of PATH_MAX, and then some)


class _CannotCheck(Exception):
    """The check cannot be made at all (the ids, a system call the kernel lacks)."""


def main() -> None:
    sys.path.insert(0, sys.argv[1])
    from zygote.layers import _sys, privileges  # (ctypes only: no platform, no re)

    ctl = socket.socket(fileno=int(sys.argv[2]))
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # (the kernel reaps the workers)
    # The workers' timers must fire whatever the daemon had: an ignored SIGALRM survives exec,
    # and so does the signal mask of the daemon's thread that started this process.
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(ctl, 64, 1)
        except OSError:
            return
        if not msg and not fds:  # the daemon closed its end, or is gone
            return
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            continue
        try:
            timeout = float(msg)
            pid = os.fork()
        except (ValueError, OSError):
            os.close(fds[0])  # (the daemon reads no answer: the check fails)
            continue
        if pid == 0:
            status = 1
            try:
                ctl.close()
                signal.setitimer(signal.ITIMER_REAL, timeout + 0.5)  # (the daemon stops waiting first)
                with socket.socket(fileno=fds[0]) as conn:
                    conn.sendall(b"%d\0" % os.getpid())  # (the daemon holds a timed-out check against its uid)
                    _work(conn, _sys, privileges)
                status = 0
            finally:
                os._exit(status)
        os.close(fds[0])


def _work(conn: socket.socket, _sys, privileges) -> None:
    data = bytearray()
    while chunk := conn.recv(1 << 16):
        data += chunk
        if len(data) > MAX_REQUEST:
            conn.sendall(b"!the request is too large")
            return
    try:
        answer = b"+" + _check(bytes(data), _sys, privileges)
    except _CannotCheck as e:
        answer = b"!" + str(e).encode(errors="replace")
    conn.sendall(answer)


def _check(request: bytes, _sys, privileges) -> bytes:
    fields = request.split(b"\0")[:-1]
    uid, gid = int(fields[0]), int(fields[1])
    groups = [int(g) for g in fields[2].split(b",") if g]
    asks = [(os.fsdecode(fields[i + 1]), fields[i].decode()) for i in range(3, len(fields) - 1, 2)]
    try:
        # The file-system ids only: real and effective ids stay root's, so the client can neither
        # signal nor trace this process, and a FUSE mount of its own (no allow_other) refuses
        # this process as it refuses the child that opens sources as root, instead of letting
        # the client's server hold it in the kernel where no signal ends it.
        os.setgroups(groups)  # (one thread: glibc's broadcast to every thread is moot)
        _sys.libc.syscall(_sys.NR["setfsgid"], gid)
        _sys.libc.syscall(_sys.NR["setfsuid"], uid)
        # (setfsuid/setfsgid answer with the previous ids, never an error: -1 asks, changing nothing)
        if _sys.libc.syscall(_sys.NR["setfsuid"], -1) != uid or _sys.libc.syscall(_sys.NR["setfsgid"], -1) != gid:
            raise OSError(0, "setfsuid/setfsgid did not take")
        privileges._capset_empty()
    except OSError as e:
        raise _CannotCheck(f"taking the client's ids: {e.strerror or e} (the daemon needs CAP_SETUID and "
                           "CAP_SETGID to check a client's binds)") from None

    def reach(path: str, kind: str):  # "r", "w", or "e" (only that the walk gets there)
        try:
            fd = _sys.openat2(path, os.O_PATH | os.O_CLOEXEC, _sys.RESOLVE_NO_MAGICLINKS)
        except OSError as e:
            if e.errno == errno.ENOSYS:
                raise _CannotCheck("checking a client's paths needs openat2 (Linux 5.6)") from None
            return None  # not there, not searchable, a loop, a magic link: out of the client's reach
        try:
            try:
                real = os.readlink(f"/proc/self/fd/{fd}")
                real.encode()  # (a name that is not UTF-8 could not travel in the child's plan)
            except (OSError, UnicodeEncodeError):
                return None
            if not real.startswith("/") or real.endswith(" (deleted)") or len(real.encode()) >= _PATH_MAX:
                return None
            st = os.fstat(fd)
            if kind == "e":
                return real, st.st_dev, st.st_ino, ""
            mode = os.R_OK | (os.W_OK if kind == "w" else 0) | (os.X_OK if stat.S_ISDIR(st.st_mode) else 0)
            if _sys.libc.syscall(_sys.NR["faccessat2"], fd, b"", mode, _AT_EACCESS | _sys.AT_EMPTY_PATH) != 0:
                err = ctypes.get_errno()
                if err in (errno.ENOSYS, errno.EINVAL):
                    raise _CannotCheck(f"checking a client's paths needs faccessat2 (Linux 5.8): {os.strerror(err)}")
                return None  # EACCES, EPERM, EROFS (a write bind on a read-only mount), ETXTBSY
            return real, st.st_dev, st.st_ino, _sys.file_handle(fd)
        finally:
            os.close(fd)

    out = bytearray()
    for path, kind in asks:
        pin = reach(path, kind)
        out += b"\0\0\0\0" if pin is None else b"%s\0%d\0%d\0%s\0" % (pin[0].encode(), pin[1], pin[2], pin[3].encode())
    return bytes(out)


if __name__ == "__main__":
    main()
