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

``NetnsMaker`` is the starter's side. The server runs this file: ``python -I -S _nsmaker.py FD
PID`` (stdlib only), FD a SOCK_SEQPACKET socket to its starter, PID the starter's. Each message
asks for one namespace; the answer is b"+" with the namespace's fd, or b"!" and an errno in
decimal. Its first message, unasked, is b"R" once it is set up, or b"X" and an errno when it
could not set itself up (it exits then: the next request starts another); the zygote makes no
namespace ahead until it has read "R" (``ready``), so a slow start never holds a request. After each namespace it goes back to one of its own (it pins none it
handed out). It exits when its starter closes its end or ends (a pidfd of the starter: a process
a preload forked could hold the socket open; no PR_SET_PDEATHSIG, which fires when the starting
*thread* ends, and the daemon starts the server from a worker thread).

The server is not dumpable: a process of the host's root uid holds every capability in a user
namespace root owns, even one that dropped all of its own, and could otherwise trace the server
(or enter its namespaces) and seed the namespaces it hands out; non-dumpable, tracing it takes
CAP_SYS_PTRACE in the host's user namespace.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
_PR_SET_DUMPABLE = 4
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
NAME = b"zygote-netns"  # the server's process name (comm)
IDMAP_NAME = b"zygote-idmap"  # (the "idmap" server's: IdmapMaker)
IDMAP_REQ = struct.Struct("!IIII")
_ALL_IDS = 0xFFFFFFFF  # ids 0 .. 2**32 - 2 ((uid_t)-1 is no id)
TIMEOUT = 5.0  # seconds for one answer, by default; a server that takes longer is replaced
START_TIMEOUT = 60.0  # seconds for a server's interpreter to start (an emulated CPU is slow)


def _serve(fd: int, starter: int, kind: str = "net") -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        return  # (never) not without it
    libc.prctl(_PR_SET_NAME, NAME if kind == "net" else IDMAP_NAME, 0, 0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # (a terminal's Ctrl-C is for its starter)
    sock = socket.socket(fileno=fd)
    try:
        parent = os.pidfd_open(starter)
    except OSError:
        return  # gone already
    if os.getppid() != starter:
        return  # (that pid was another process's by then)
    if kind == "idmap":
        _serve_idmaps(libc, sock, parent)
        return
    if libc.unshare(CLONE_NEWUSER) != 0 or libc.unshare(CLONE_NEWNET) != 0:
        with contextlib.suppress(OSError):
            sock.send(b"X%d" % (ctypes.get_errno() or errno.EPERM))  # (why not; its starter starts another)
        return
    home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    for _msg in _requests(sock, parent):
        if libc.unshare(CLONE_NEWNET) != 0:
            sock.send(b"!%d" % (ctypes.get_errno() or errno.EIO))
            continue
        ns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            # Home first: once handed out, the namespace is its receiver's alone (the server
            # still in it when make() returned was a test's race, and a namespace to share).
            if libc.setns(home, CLONE_NEWNET) != 0:
                return  # (never: its own namespace) the starter then starts another
            socket.send_fds(sock, [b"+"], [ns])
        finally:
            os.close(ns)


def _requests(sock: socket.socket, parent: int):
    """Say the server is set up ("R"), then yield each request until the starter ends (its
    pidfd ``parent``) or closes its end (an OSError of the caller's ends the server: __main__)."""
    try:
        sock.send(b"R")
        waiting = select.poll()
        waiting.register(sock, select.POLLIN)
        waiting.register(parent, select.POLLIN)
        while True:
            if any(fd == parent for fd, _ in waiting.poll()):
                return  # the starter ended
            msg = sock.recv(64)
            if not msg:
                return  # the starter closed its end
            yield msg
    except OSError:
        return


def _serve_idmaps(libc, sock: socket.socket, parent: int) -> None:
    """The "idmap" server: it stays in its starter's user namespace (the host's, as root) and
    answers each request b"u" + IDMAP_REQ (a, b, c, d) with a new user namespace whose uid map
    takes id a to b and whose gid map takes c to d, one way (``one_way_map``): the maps of an
    idmapped mount (mounts.idmapped_tree). No process stays in it: its fd keeps it."""
    for msg in _requests(sock, parent):
        if len(msg) != 1 + IDMAP_REQ.size or msg[:1] != b"u":
            sock.send(b"!%d" % errno.EINVAL)
            continue
        a, b, c, d = IDMAP_REQ.unpack(msg[1:])
        try:
            ns = _userns_with_maps(libc, one_way_map(a, b), one_way_map(c, d))
        except OSError as e:
            sock.send(b"!%d" % (e.errno or errno.EIO))
            continue
        try:
            socket.send_fds(sock, [b"+"], [ns])
        finally:
            os.close(ns)


def one_way_map(a: int, b: int) -> bytes:
    """A uid_map/gid_map (user_namespaces(7)) that maps id ``a`` to ``b``, every id but ``a``
    and ``b`` to itself, and nothing to ``a`` or from ``b``.

    As an idmapped mount's: a file the disk says is ``a``'s is ``b``'s through the mount, and
    a process of id ``b`` makes files of ``a``'s; a process of id ``a`` makes none there (its id
    is no mapped one: EOVERFLOW) and owns nothing (files of ``b``'s on the disk are nobody's: no
    write reaches them). A map that swapped the two let the client, handed a directory fd of
    the mount by its child, make files of the child's sandbox id, set-ID ones too (a helper's
    review)."""
    if a == b:
        return b"0 0 %d\n" % _ALL_IDS
    lo, hi = sorted((a, b))
    lines = []
    for first, end in ((0, lo), (lo + 1, hi), (hi + 1, _ALL_IDS)):  # (every id but the two)
        if end > first:
            lines.append(b"%d %d %d" % (first, first, end - first))
    lines.append(b"%d %d 1" % (a, b))
    return b"\n".join(lines) + b"\n"


def _userns_with_maps(libc, uid_map: bytes, gid_map: bytes) -> int:
    """A new user namespace with these maps: a forked process unshares it and stops; we write
    its maps (root in the parent namespace may map any ids), open it, and kill the process. It
    dies with us (PR_SET_PDEATHSIG: killed meanwhile, we would have left it stopped, holding
    the namespace, under PID 1)."""
    server = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = errno.ESRCH
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0 and os.getppid() == server:
            code = 0 if libc.unshare(CLONE_NEWUSER) == 0 else (ctypes.get_errno() or errno.EPERM)
        if not code:
            os.kill(os.getpid(), signal.SIGSTOP)
        os._exit(code)
    try:
        _, status = os.waitpid(pid, os.WUNTRACED)
        if not os.WIFSTOPPED(status):
            pid = 0  # (reaped)
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 0
            raise OSError(code or errno.EIO, "unshare a user namespace")
        for name, text in (("uid_map", uid_map), ("gid_map", gid_map)):
            fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, text)
            finally:
                os.close(fd)
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


class NetnsMaker:
    """The starter's side: ``make()`` returns the fd of a new, empty network namespace (``lo``
    down) owned by the server's user namespace. Thread-safe; the server is started at the first
    ``make()`` (or ``start()``) and again after it died, stopped answering within ``timeout``
    seconds, or could not set itself up."""

    kind = "net"
    _what = "making a network namespace in a user namespace of its own"

    def __init__(self, timeout: float = TIMEOUT) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._closed = False
        self._timeout = timeout
        self._up = False  # the server said it is set up ("R")

    def start(self) -> None:
        """Start the server now (its interpreter's start overlaps the caller's work). Raises OSError."""
        with self._lock:
            if self._proc is None:
                self._start()

    def _start(self) -> None:
        if self._closed:
            raise OSError(errno.ESHUTDOWN, f"the {self.kind} namespace maker is closed")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            with theirs:
                self._proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", os.path.abspath(__file__), str(theirs.fileno()), str(os.getpid()),
                     self.kind],
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, env={})
        except BaseException:
            ours.close()
            raise
        ours.settimeout(self._timeout)
        self._sock = ours
        self._up = False

    def _started(self, block: bool) -> bool:
        """Whether the server is set up (its first message read); ``block``: wait for it up to
        START_TIMEOUT. Raises OSError (stopped then) when it could not set itself up or ended."""
        if self._up:
            return True
        waiting = select.poll()
        waiting.register(self._sock, select.POLLIN)
        if not waiting.poll(START_TIMEOUT * 1000 if block else 0):
            if not block:
                return False
            self._stop()
            raise OSError(errno.ETIMEDOUT, f"the {self.kind} namespace maker did not start")
        try:
            msg = self._sock.recv(32)
        except OSError as e:
            self._stop()
            raise OSError(errno.EIO, f"the {self.kind} namespace maker ended: {e}") from None
        if msg == b"R":
            self._up = True
            return True
        self._stop()
        if msg[:1] == b"X" and msg[1:].isdigit():
            code = int(msg[1:])
            raise OSError(code, f"{self._what}: {os.strerror(code)}")
        raise OSError(errno.EIO, f"the namespace maker ended at its start ({msg[:32]!r})")

    def starting_fd(self) -> int | None:
        """The fd that turns readable when a server still starting is set up, else None (for a
        caller's poll: the zygote waits on it with its requests)."""
        return None if self._up or self._sock is None else self._sock.fileno()

    def ready(self) -> bool:
        """Whether a ``make()`` now would not wait for the server's start (started here if need
        be); never blocks. Raises OSError as ``make``."""
        with self._lock:
            self._running()
            return self._started(block=False)

    def _running(self) -> None:
        """(Holding the lock.) A server, started again if it ended or never was."""
        if self._proc is None or self._proc.poll() is not None:
            self._stop()
            self._start()

    def make(self) -> int:
        """A new network namespace's fd (O_CLOEXEC), ours to close. Raises OSError with the
        server's errno (EPERM: user namespaces refused here; ENOSPC: user.max_net_namespaces),
        or EIO/ETIMEDOUT when the server died or did not answer (the next call starts another)."""
        return self._ask(b"n")

    def _ask(self, request: bytes) -> int:
        with self._lock:
            for attempt in (1, 2):
                self._running()
                self._started(block=True)
                try:
                    self._sock.send(request)
                    msg, fds, _flags, _addr = socket.recv_fds(self._sock, 32, 1, socket.MSG_CMSG_CLOEXEC)
                    if not msg and not fds:
                        raise ConnectionResetError(errno.ECONNRESET, "it ended")
                except OSError as e:
                    self._stop()
                    if attempt == 2 or isinstance(e, TimeoutError):
                        raise OSError(errno.ETIMEDOUT if isinstance(e, TimeoutError) else errno.EIO,
                                      f"the {self.kind} namespace maker did not answer: {e}") from None
                    continue  # (it died since the last request: once more with a new one)
                if msg == b"+" and len(fds) == 1:
                    return fds[0]
                for fd in fds:
                    os.close(fd)
                if msg[:1] == b"!" and msg[1:].isdigit():
                    code = int(msg[1:])
                    raise OSError(code, f"{self._what}: {os.strerror(code)}")
                self._stop()
                raise OSError(errno.EIO, f"the {self.kind} namespace maker answered {msg[:32]!r}")
        raise AssertionError("unreachable")

    def _stop(self) -> None:
        proc, sock, self._proc, self._sock = self._proc, self._sock, None, None
        if sock is not None:
            sock.close()
        if proc is not None:
            if proc.poll() is None:
                proc.kill()  # (our own; it would exit at EOF, but one that stopped answering may not)
            proc.wait()

    def close(self) -> None:
        """Stop the server (it also ends with this process). No ``make()`` after this."""
        with self._lock:
            self._closed = True
            self._stop()


class IdmapMaker(NetnsMaker):
    """The starter's side of the "idmap" server (``_serve_idmaps``): ``make(a, b, c, d)``
    returns the fd of a user namespace whose uid map takes ``a`` to ``b`` and whose gid map
    ``c`` to ``d`` (``one_way_map``). Its starter must be able to write such maps (root).

    The last KEEP namespaces are kept and given again (as a new fd) for the same four ids: a
    namespace is only ever the maps of idmapped mounts, the same maps for the same ids, and a
    client's ids in its children never change (userns.client_id), so its next spawn with binds
    of its own needs no new one (≈ 1.7 ms: a fork in the server and two map writes)."""

    kind = "idmap"
    _what = "making a user namespace for an idmapped mount"
    KEEP = 64

    def __init__(self, timeout: float = TIMEOUT) -> None:
        super().__init__(timeout)
        self._kept: collections.OrderedDict[tuple[int, int, int, int], int] = collections.OrderedDict()
        self._kept_lock = threading.Lock()

    def make(self, a: int, b: int, c: int, d: int) -> int:  # type: ignore[override]
        key = (a, b, c, d)
        with self._kept_lock:
            if (kept := self._kept.get(key)) is not None:
                self._kept.move_to_end(key)
                return os.dup(kept)
        fd = self._ask(b"u" + IDMAP_REQ.pack(*key))
        with self._kept_lock:
            if key not in self._kept and not self._closed:
                with contextlib.suppress(OSError):  # (out of fds: it is not kept)
                    self._kept[key] = os.dup(fd)
                while len(self._kept) > self.KEEP:
                    os.close(self._kept.popitem(last=False)[1])
        return fd

    def close(self) -> None:
        super().close()
        with self._kept_lock:
            for fd in self._kept.values():
                os.close(fd)
            self._kept.clear()


if __name__ == "__main__":
    with contextlib.suppress(OSError):  # (a failed send or open ends it: its starter starts another)
        _serve(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "net")
