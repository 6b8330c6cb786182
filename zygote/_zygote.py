"""The zygote: a warm, single-threaded interpreter that clones children on request.

Started by the daemon with exec (``python -m zygote._zygote FD``), never forked from the trio
process. Talks to the daemon over one SOCK_SEQPACKET socket (fd FD):

    zygote -> daemon   b"R" + msgpack(info)          ready, after preloading (info["code"]: code_digest(),
                                                      which the daemon compares with its own)
                       b"E" + text                    preload/startup failed; then exit 3
    daemon -> zygote   REQ(req_id, flags, owner) + 6 fds   clone one child with these stdio/ctl/status/result
                       fds (+ its cgroup when flags has CLONE_INTO_CGROUP: cgroup v2; then + a network
                       namespace the daemon prepared, when flags has GIVEN_NETNS: the child is born in
                       it); owner: the host uid its user namespace belongs to (0: the zygote's; see
                       layers/userns.py)
    zygote -> daemon   REP(req_id, pid, errno)        pid > 0, or errno of the failed clone (pid -2:
                       entering the given network namespace failed; nothing was cloned)

Globals, each with what it means for security (every child gets a copy of this memory):
    _sock    the daemon socket. SECURITY: closed in the child before anything else runs.
    _cloner  the clone3 wrapper (no secrets).
    _netns   the network namespace made ahead for the next child (an empty one, lo up), if any
             (layers/netns.py: Ahead; made by a zygote._nsmaker server, this process's only child
             of its own, started before the preloads); the zygote sits in it until that child is
             cloned. The server's socket is closed in every child with the rest. While
             a child is cloned into a namespace the daemon gave, it is held by an fd (Ahead._parked),
             which that clone closes with every other fd of ours before anything of its own runs.
    _digest  code_digest()'s value, once computed (public: a digest of the package's sources).
The zygote holds no secrets: no credentials, no client data beyond the request it is serving.
"""

from __future__ import annotations

import errno
import gc
import importlib
import os
import select
import signal
import socket
import struct
import sys

REQ = struct.Struct("!QQI")
REP = struct.Struct("!Qqi")
NFDS = 6  # stdin, stdout, stderr, control, status, result
GIVEN_NETNS = 1 << 62  # not a clone flag: one more fd, the network namespace to clone the child into
TREES_SHIFT = 48  # not clone flags: bits 48-55 count the idmapped trees (mounts.idmapped_tree) after the six
JOIN_FAILED = -2  # REP's pid when entering that namespace failed (nothing was cloned)

_sock: socket.socket | None = None
_cloner = None
_digest: str | None = None
_netns = None


def package_dirs() -> tuple[str, str]:
    """The directories of the ``zygote`` and ``zygote_client`` packages this interpreter imports."""
    import zygote_client
    return (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(zygote_client.__file__)))


def code_digest() -> str:
    """A digest of the Python sources (paths and contents) of this ``zygote`` package and of
    the ``zygote_client`` it imports (children use its protocol and configuration). The daemon
    runs a pool's zygote with the pool's interpreter, which imports the packages installed for
    it: another version there (an old wheel in another virtualenv) confines children with other
    code than the daemon's, or speaks another protocol to it. The daemon refuses a zygote whose
    digest is not its own (Zygote.start)."""
    global _digest
    if _digest is None:
        try:
            from _blake2 import blake2b  # (hashlib maps OpenSSL's libcrypto: +3 MiB in every zygote)
        except ImportError:
            from hashlib import blake2b
        h = blake2b(digest_size=16)
        for top in package_dirs():
            h.update(os.path.basename(top).encode() + b"\0")
            for d, dirs, files in os.walk(top):  # (not sorted(os.walk()): that walks all first, ignoring dirs[:])
                dirs[:] = sorted(x for x in dirs if x != "__pycache__")
                for name in sorted(f for f in files if f.endswith(".py")):
                    path = os.path.join(d, name)
                    rel = os.path.relpath(path, top).encode()
                    with open(path, "rb") as f:
                        data = f.read()
                    h.update(len(rel).to_bytes(4, "big") + rel + len(data).to_bytes(8, "big") + data)
        _digest = h.hexdigest()
    return _digest


def _fail(text: str) -> None:
    try:
        _sock.send(b"E" + text.encode()[:60000])  # type: ignore[union-attr]
    finally:
        os._exit(3)


def main(argv: list[str]) -> None:
    global _sock, _cloner, _netns
    from zygote import _clone
    _clone.watch_fork_hooks()  # first: every fork hook registered from here on is seen (see Cloner)
    # No Python handler for SIGINT: one caught just before a clone would run again in the child
    # (a KeyboardInterrupt unwinding the zygote's loop there). The daemon stops its zygotes; a
    # child sets its own handler before its payload runs.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    fd = int(argv[0])
    preload = [m for m in argv[1:] if m]
    _sock = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    # Children inherit the signal mask: whatever started the daemon may have blocked signals
    # (threads often do), and a child must be interruptible like any fresh process.
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    # The daemon raised its open-files limit for itself; children get the one it was started with.
    nofile = os.environ.pop("ZYGOTE_OPEN_FILES", "")
    if nofile.isdigit():
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (int(nofile), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    # The zygote keeps the daemon's oom_score_adj: the daemon raises each child's to 1000 before
    # its "go" (Daemon._setup_outside). Raised here instead, as it was, the zygote, whose
    # resident set is larger than any idle child's, was the host OOM killer's first choice.
    try:
        # Supplementary groups survive setgroups=deny in the child: drop the host's here.
        if os.geteuid() == 0:
            os.setgroups([])
        import msgspec  # noqa: F401  (child protocol)
        import cloudpickle  # noqa: F401  (so payload unpickling never imports it per child)
        from zygote import child
        from zygote._childproto import MAX_TREES
        from zygote.layers import netns, privileges
        privileges.leave_session_keyring()  # (before the preloads: nothing of ours runs with it)
        privileges.plain_persona()
        from zygote._clone import ALL_NAMESPACES, CLONE_INTO_CGROUP, CLONE_NEWNET, CLONE_PARENT, Cloner, thread_count
    except BaseException as e:  # noqa: BLE001
        _fail(f"zygote startup failed: {type(e).__name__}: {e}")
    # Namespaces made ahead come from a server of their own (its start overlaps the preloads),
    # only where the zygote can come back from one (root): see zygote/_nsmaker.py.
    # Nothing forks before the daemon moved us into the zygotes' cgroup (b"P"): a process forked
    # earlier stays where we started, outside daemon.max_tasks.
    try:
        placed = _sock.recv(1)
    except OSError:
        placed = b""
    if placed != b"P":
        os._exit(0)  # the daemon went away (or could not place us: it stops us)
    _netns = netns.Ahead()
    maker = None
    if _netns.can_join:
        from zygote._nsmaker import NetnsMaker
        maker = NetnsMaker(timeout=1.0)  # (a request may be waiting behind a prepare)
        try:
            maker.start()
            _netns.use(maker.make, maker.ready)
        except OSError:
            maker = None  # (every clone makes its own)
    for mod in preload:
        try:
            importlib.import_module(mod)
        except BaseException as e:  # noqa: BLE001
            import traceback
            _fail(f"preload of {mod!r} failed: {type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}")
    n = thread_count()
    if n != 1:
        _fail(f"the preloads left {n - 1} extra thread(s) running; a zygote must be single-threaded "
              "(set OMP_NUM_THREADS=1/OPENBLAS_NUM_THREADS=1 in the pool's environment, or stop the "
              "module from starting threads at import)")
    lean, not_lean = _clone.lean_hooks()
    try:
        _cloner = Cloner(lean)
    except OSError as e:
        _fail(str(e))
    # What a preload printed goes out now, once: the loop below never writes to stdout/stderr,
    # so a clone never inherits unflushed output.
    sys.stdout.flush()
    sys.stderr.flush()
    unset = os.environ.pop("ZYGOTE_UNSET_AFTER_PRELOAD", "")
    child.zygote_ready([name for name in unset.split(",") if name])
    digest = code_digest()
    gc.collect()
    gc.freeze()  # keep the preloaded heap out of the collector's reach: children stay copy-on-write
    import msgspec
    info = {"pid": os.getpid(), "executable": sys.executable, "prefix": sys.prefix,
            "base_prefix": sys.base_prefix, "version": list(sys.version_info[:3]), "path": sys.path,
            "preloaded": preload, "given_netns": _netns.can_join,
            "fork_hooks": "lean" if lean is not None else f"all (not lean: {not_lean})",
            "code": digest, **dict(zip(("package", "client_package"), package_dirs()))}
    try:
        _sock.send(b"R" + msgspec.msgpack.encode(info))
    except OSError:
        os._exit(0)  # the daemon went away while we preloaded (its user's stderr needs no traceback)
    flags_allowed = ALL_NAMESPACES | CLONE_PARENT
    owner_back = os.geteuid()
    waiting = select.poll()  # (not select(): the daemon may have handed us an fd number >= 1024)
    waiting.register(_sock, select.POLLIN)
    while True:
        if _netns.enabled and not _netns.ready and not waiting.poll(0):
            _netns.prepare()  # only when no request is waiting (one arriving meanwhile waits for it)
        if _netns.enabled and not _netns.ready and maker is not None and (start := maker.starting_fd()) is not None:
            # Its server still starting: wait for a request or for the server, whichever comes first.
            either = select.poll()
            either.register(_sock, select.POLLIN)
            either.register(start, select.POLLIN)
            try:
                if all(fd != _sock.fileno() for fd, _ in either.poll()):
                    continue  # (the server is up: make the namespace now)
            except InterruptedError:
                continue
        try:
            msg, fds, msg_flags, _addr = socket.recv_fds(_sock, REQ.size, NFDS + 2 + MAX_TREES)
        except InterruptedError:
            continue
        except OSError:  # ECONNRESET: the daemon went away with a request unread
            os._exit(0)
        if not msg:
            os._exit(0)  # the daemon went away
        req, flags, owner = REQ.unpack(msg) if len(msg) == REQ.size else (0, 0, 0)
        # CLONE_INTO_CGROUP (cgroup v2): a seventh fd, the child's cgroup, which it is born in.
        into = bool(flags & CLONE_INTO_CGROUP)
        given = bool(flags & GIVEN_NETNS)
        trees = flags >> TREES_SHIFT & 0xFF  # idmapped trees of its binds, after the six
        if (len(msg) != REQ.size or len(fds) != NFDS + trees + into + given or trees > MAX_TREES
                or msg_flags & socket.MSG_CTRUNC):
            for f in fds:
                os.close(f)
            os._exit(4)  # the daemon never sends this: treat as corruption
        netns_fd = fds.pop() if given else -1
        cgroup_fd = fds.pop() if into else -1
        flags &= flags_allowed
        if _netns.ready and not given and not flags & CLONE_NEWNET:
            _netns.go_home()  # (the daemon always asks for one) a clone sharing ours gets ours
        ahead = _netns.ready
        err = 0
        pid = -1
        if given:
            # A namespace the daemon made and configured for this child (network.prepare): born
            # in it, as in one made ahead here; each is given for one child and closed below.
            try:
                _netns.join(netns_fd)
                flags &= ~CLONE_NEWNET
            except OSError as e:
                pid, err = JOIN_FAILED, e.errno or errno.EIO  # (never cloned: no namespace of its own)
        elif ahead:
            flags &= ~CLONE_NEWNET
        child.netns_ready = ahead or given  # the clone skips its own lo up
        if not err:
            try:
                pid = _cloner.clone(flags, cgroup_fd, owner)
            except OSError as e:
                pid, err = -1, e.errno or 0
        if pid != 0 and os.geteuid() != owner_back:
            _fail("the zygote could not take back its own uid after a clone")  # never clone as another
        if (ahead or given) and pid not in (0, JOIN_FAILED):  # (a failed join is back already)
            _netns.go_home()  # that namespace is the child's alone now (or was never used); after
                              # a given one, back to ours made ahead (join kept it), if any
        if pid == 0:
            try:
                _sock.close()
                child.run(fds)  # closes every fd but its six, the cgroup fd included
            finally:
                os._exit(125)
        if cgroup_fd >= 0:
            os.close(cgroup_fd)
        if netns_fd >= 0:
            os.close(netns_fd)
        for f in fds:
            os.close(f)
        try:
            _sock.send(REP.pack(req, pid, err))
        except OSError:  # the daemon went away (the child, CLONE_PARENT, was the daemon's: it
            os._exit(0)  # ends with it, its pipes to the daemon closed)


if __name__ == "__main__":
    main(sys.argv[1:])
