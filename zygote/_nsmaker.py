"""Network namespaces made ahead, owned by a user namespace of their own rather than the host's.

A network namespace belongs to the user namespace of the process that made it. One that the
zygote or the daemon made with unshare() belonged to the host's, and the kernel sends the host's
device events (NETLINK_KOBJECT_UEVENT: disks, USB, hotplug, module loads) to the uevent sockets
of every network namespace owned by the initial user namespace, and of no other: a child born in
one could listen to them, kept out only by its seccomp profile (the default one refuses that
netlink protocol; a pool with ``seccomp_profile = "unconfined"`` heard them).

So namespaces made ahead come from this server: a process that unshares a user namespace once,
at its start, and then makes one network namespace per request inside it and hands it over
(SCM_RIGHTS). That user namespace is a child of its starter's and is owned by the starter's uid
(root for a daemon that makes namespaces ahead): the daemon and the zygote keep every capability
over the namespaces (the owner of a user namespace, in its parent, holds all of them in it), and
a child, in a user namespace of its own beside this one, holds none, as before. The server has
no uid map (it needs none: after the unshare it holds every capability in its own namespace) and
touches nothing of the host's.

``NetnsMaker`` is the starter's side. The server runs this file: ``python -I -S _nsmaker.py FD``
(stdlib only), FD a SOCK_SEQPACKET socket to its starter. Each message asks for one namespace;
the answer is b"+" with the namespace's fd, or b"!" and an errno in decimal. After each it goes
back to a namespace of its own (so it pins none it handed out). It exits when its starter closes
its end, or ends: the starter's end is close-on-exec, and the zygote's children close it with
every other fd before anything of theirs runs. (No PR_SET_PDEATHSIG: it fires when the starting
*thread* ends, and the daemon starts the server from a worker thread.)
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import subprocess
import sys
import threading

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
_PR_SET_NAME = 15
TIMEOUT = 5.0  # seconds for one answer; a server that takes longer is replaced


def _serve(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_NAME, b"zygote-netns", 0, 0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # (a terminal's Ctrl-C is for its starter: it ends at EOF)
    sock = socket.socket(fileno=fd)
    home = -1
    failed = 0
    if libc.unshare(CLONE_NEWUSER) != 0 or libc.unshare(CLONE_NEWNET) != 0:
        failed = ctypes.get_errno() or errno.EPERM
    else:
        home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    while True:
        try:
            msg = sock.recv(16)
            if not msg:
                return  # the starter closed its end, or ended
            if failed:
                sock.send(b"!%d" % failed)
            elif libc.unshare(CLONE_NEWNET) != 0:
                sock.send(b"!%d" % (ctypes.get_errno() or errno.EIO))
            else:
                ns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    socket.send_fds(sock, [b"+"], [ns])
                finally:
                    os.close(ns)
                    if libc.setns(home, CLONE_NEWNET) != 0:
                        return  # (never: its own namespace) the starter then starts another
        except InterruptedError:
            continue
        except OSError:
            return


class NetnsMaker:
    """The starter's side: ``make()`` returns the fd of a new, empty network namespace (``lo``
    down) owned by the server's user namespace. Thread-safe; the server is started at the first
    ``make()`` (or ``start()``) and again after it died or stopped answering."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._closed = False

    def start(self) -> None:
        """Start the server now (its interpreter's start overlaps the caller's work). Raises OSError."""
        with self._lock:
            if self._proc is None:
                self._start()

    def _start(self) -> None:
        if self._closed:
            raise OSError(errno.ESHUTDOWN, "the network namespace maker is closed")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            with theirs:
                self._proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", os.path.abspath(__file__), str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, env={})
        except BaseException:
            ours.close()
            raise
        ours.settimeout(TIMEOUT)
        self._sock = ours

    def make(self) -> int:
        """A new network namespace's fd (O_CLOEXEC), ours to close. Raises OSError with the
        server's errno (EPERM: user namespaces refused here), or EIO/ETIMEDOUT when the server
        died or did not answer (the next call starts another)."""
        with self._lock:
            for attempt in (1, 2):
                if self._proc is None or self._proc.poll() is not None:
                    self._stop()
                    self._start()
                try:
                    self._sock.send(b"n")
                    msg, fds, _flags, _addr = socket.recv_fds(self._sock, 32, 1)
                except (TimeoutError, OSError) as e:
                    self._stop()
                    if attempt == 2 or isinstance(e, TimeoutError):
                        raise OSError(errno.ETIMEDOUT if isinstance(e, TimeoutError) else errno.EIO,
                                      f"the network namespace maker did not answer: {e}") from None
                    continue  # (it died since the last request: once more with a new one)
                if msg == b"+" and len(fds) == 1:
                    os.set_inheritable(fds[0], False)
                    return fds[0]
                for fd in fds:
                    os.close(fd)
                if msg[:1] == b"!" and msg[1:].isdigit():
                    code = int(msg[1:])
                    raise OSError(code, f"making a network namespace in a user namespace of its own: {os.strerror(code)}")
                self._stop()
                raise OSError(errno.EIO, f"the network namespace maker answered {msg[:32]!r}")
        raise AssertionError("unreachable")

    def _stop(self) -> None:
        proc, sock, self._proc, self._sock = self._proc, self._sock, None, None
        if sock is not None:
            sock.close()
        if proc is not None:
            if proc.poll() is None:
                try:
                    proc.wait(1.0)  # (it exits at EOF)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def close(self) -> None:
        """Stop the server (it also ends with this process). No ``make()`` after this."""
        with self._lock:
            self._closed = True
            self._stop()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
