"""The pool's policy ceiling: a request may tighten what its pool allows, never loosen it.

``effective(pool, request)`` merges a request's SandboxConfig into the pool's default, refusing
(``PolicyError``) anything looser: a larger limit, a layer turned down or off, network where the
pool has none, an allow-list wider than the pool's. Turning a layer off is a pool-level decision.
A field the request leaves unset (None) is the pool's; the result has every field resolved.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import fnmatch
import ipaddress
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time

import msgspec

from zygote_client import SandboxConfig
from zygote_client._workspace import PATH_MAX, Export
from zygote_client._config import parse_allow
from zygote_client._errors import quoted

from zygote._nft import DENY4
from zygote.layers import _sys

LIMITS = ("memory", "pids", "cpu", "cpu_time", "timeout", "timeout_grace", "file_size", "open_files",
          "max_output_bytes", "tmpfs_size")
_SIZES = {"memory", "file_size", "max_output_bytes", "tmpfs_size"}
_LANDLOCK_RANK = {"off": 0, "auto": 1, "required": 2}
SECCOMP_RANK = {"unconfined": 0, "default": 1, "strict": 2}
_DENY4 = tuple(ipaddress.ip_network(n) for n in DENY4)  # what the egress rules refuse without a list
# The ceiling on a request's Export where the pool's SandboxConfig has none.
EXPORT_CEILING = Export(max_files=100_000, max_bytes=1 << 30)
# Environment names that look like credentials (matched case-insensitively); a pool with
# forbid_secret_env refuses requests carrying one unless its env_allow names it.
SECRET_ENV = ("*_TOKEN", "TOKEN", "*_TOKEN_*", "*SECRET*", "*PASSWORD*", "*PASSWD*", "AWS_*", "*_API_KEY",
              "API_KEY", "*_APIKEY", "*_ACCESS_KEY*", "*_PRIVATE_KEY*", "*CREDENTIAL*", "AZURE_*_KEY",
              "*_AUTH_TOKEN", "*_SESSION_KEY", "DATABASE_URL", "*_DSN")


class PolicyError(Exception):
    """The request asks for more than its pool allows; the message names the field."""


def _num(cfg: SandboxConfig, name: str):
    v = getattr(cfg, name)
    if v is None:
        return None
    if name in _SIZES:
        from zygote_client._config import parse_size
        return parse_size(v, name)
    return v


# Fields a request may set to anything (None: the pool's); proc only where the pool allows it.
_FREE = ("workdir", "uid", "gid", "hostname", "proc")


def _sizes_in_bytes(cfg: SandboxConfig) -> SandboxConfig:
    sized = {k: _num(cfg, k) for k in _SIZES if isinstance(getattr(cfg, k), str)}
    return msgspec.structs.replace(cfg, **sized) if sized else cfg


def effective(pool: SandboxConfig, req: SandboxConfig | None, inherit: bool = True) -> SandboxConfig:
    """The config a child of ``pool`` gets for request ``req``, every field resolved; sizes in
    bytes (so "32M" and 33554432 are one config). ``inherit`` False: a client that predates
    inheritance (no "sandbox-inherits" in its P.Hello), whose unset fields mean the built-in defaults."""
    pool = pool.with_defaults()  # (the daemon's pools are resolved already: then this is pool)
    if req is None:
        # A pool's network is a ceiling, not a default: a child has network only when it asks.
        pool = _sizes_in_bytes(pool)
        return msgspec.structs.replace(pool, network=None) if pool.network is not None else pool
    if not inherit:
        req = req.with_defaults()
    changes: dict = {}
    for name in LIMITS:
        p, r = _num(pool, name), _num(req, name)
        if r is None:
            changes[name] = p if name in _SIZES else getattr(pool, name)
        elif p is not None and r > p:
            raise PolicyError(f"{name}={quoted(getattr(req, name))} exceeds the pool's ceiling {getattr(pool, name)!r}")
        elif name in _SIZES:
            changes[name] = r
    own_root = req.chroot_dir is not None and pool.chroot_dir is None
    for name in _FREE:
        if getattr(req, name) is not None:
            continue
        if name in ("proc", "workdir") and own_root:
            continue  # (the pool's /proc and working directory are for the pool's root)
        if name == "workdir" and req.workspace is not None:
            continue  # (a request's workspace is its working directory)
        changes[name] = getattr(pool, name)
    if req.proc and pool.proc is False:
        raise PolicyError("proc=True is not allowed by the pool")
    if req.landlock is None:
        changes["landlock"] = pool.landlock
    elif _LANDLOCK_RANK[req.landlock] < _LANDLOCK_RANK[pool.landlock]:
        raise PolicyError(f"landlock={req.landlock!r} is looser than the pool's {pool.landlock!r} "
                          "(turning a layer down is a pool-level decision)")
    if req.seccomp_profile is None:
        changes["seccomp_profile"] = pool.seccomp_profile
    elif req.seccomp_profile != pool.seccomp_profile:
        pr, rr = SECCOMP_RANK.get(pool.seccomp_profile), SECCOMP_RANK.get(req.seccomp_profile)
        if pr is None or rr is None or rr < pr:
            raise PolicyError(f"seccomp_profile={quoted(req.seccomp_profile)} is not allowed under the pool's "
                              f"{pool.seccomp_profile!r} (custom or looser profiles are set per pool)")
    if req.reaper is None or (pool.reaper and not req.reaper):
        changes["reaper"] = pool.reaper  # a pool that wants its orphans reaped wants it for every child
    if req.dev_pts is None:
        changes["dev_pts"] = pool.dev_pts
    if req.dev_pts and not pool.dev_pts:
        raise PolicyError("dev_pts=True is not allowed by the pool")
    if req.network is not None:
        if pool.network is None:
            raise PolicyError("network access is not allowed by the pool")
        if pool.network.allow and req.network.allow:
            for item in req.network.allow:
                if not _allow_covered(item, pool.network.allow):
                    raise PolicyError(f"network.allow: {quoted(item)} is not within the pool's allow-list "
                                      f"{list(pool.network.allow)!r} (a request may only narrow it)")
        if not pool.network.allow:
            # A pool without a list lets its children reach public addresses only: a request's
            # list may narrow that, never add private or special ranges (the egress rules admit
            # what a list names before they refuse those ranges).
            for item in req.network.allow:
                net, _ = parse_allow(item)
                if any(net.overlaps(d) for d in _DENY4 if net.version == d.version):
                    raise PolicyError(f"network.allow: {quoted(item)} reaches private or special addresses, "
                                      "which a pool without an allow-list keeps its children from (a request "
                                      "may only narrow what its pool allows; name them in the pool's list)")
        if pool.network.allow and not req.network.allow:
            changes["network"] = pool.network
    if req.export is None:
        changes["export"] = pool.export
    else:
        top = pool.export or EXPORT_CEILING
        for name, r, p in (("max_files", req.export.max_files, top.max_files),
                           ("max_bytes", req.export.max_bytes, top.max_bytes),
                           ("max_file_bytes", req.export.file_bytes, top.file_bytes)):
            if r > p:
                raise PolicyError(f"export.{name}={r} exceeds the pool's ceiling {p}")
    if req.chroot_dir is None and pool.chroot_dir is not None:
        changes["chroot_dir"] = pool.chroot_dir
    elif req.chroot_dir is not None and pool.chroot_dir is not None and req.chroot_dir != pool.chroot_dir:
        raise PolicyError("chroot_dir differs from the pool's")
    for field, src in [("ro_binds", src) for src in req.ro_binds] + [("chroot_dir", req.chroot_dir)]:
        if src in pool.rw_binds:
            # (a non-root client's source is checked, and its bind idmapped, for what the request
            # asks, by path: a read check would have stood for the pool's read-write bind of it too)
            raise PolicyError(f"{field}: {quoted(src)} is a source the pool binds read-write"
                              + ("; name it in rw_binds to give it another target" if field == "ro_binds" else ""))
    ro = dict(pool.ro_binds)
    ro.update(req.ro_binds)
    rw = dict(pool.rw_binds)
    rw.update(req.rw_binds)
    changes["ro_binds"], changes["rw_binds"] = ro, rw
    return msgspec.structs.replace(req, **changes)


def check_env(env: dict[str, str], allow: tuple[str, ...] = ()) -> None:
    """Refuse a request environment holding a secret-looking name (SECRET_ENV) not in ``allow``.

    Children run untrusted code; a token passed in by habit (a CI job's GITHUB_TOKEN) is a token
    handed to it. The pool decides which names are expected.
    """
    for name in env:
        if name in allow:
            continue
        up = name.upper()
        for pat in SECRET_ENV:
            if fnmatch.fnmatchcase(up, pat):
                raise PolicyError(f"environment variable {quoted(name)} looks like a secret (matches {pat!r}); "
                                  "the pool forbids those (allow it by name with --allow-env)")


def _allow_covered(item: str, pool_allow: tuple[str, ...]) -> bool:
    """Whether every destination ``item`` admits is admitted by one entry of the pool's list."""
    net, port = parse_allow(item)
    for p in pool_allow:
        pnet, pport = parse_allow(p)
        if net.version == pnet.version and net.subnet_of(pnet) and (pport is None or pport == port):
            return True
    return False


def names_host_paths(cfg: SandboxConfig, pool: SandboxConfig) -> bool:
    """Whether a request names host paths of its own (binds, chroot_dir) that the daemon will
    look at: it does so in a worker thread then, since a stat of a path on an automount or a
    FUSE mount can wait for long."""
    return (any(src not in pool.ro_binds for src in cfg.ro_binds)
            or any(src not in pool.rw_binds for src in cfg.rw_binds)
            or bool(cfg.chroot_dir and cfg.chroot_dir != pool.chroot_dir))


def check_peer_paths(cfg: SandboxConfig, pool: SandboxConfig, uid: int, gid: int,
                     groups: tuple[int, ...] | None = ()) -> dict[str, tuple[str, int, int, str]]:
    """Refuse binds/chroot the connecting user could not reach on the host themselves.

    The child opens bind sources while it still carries the daemon's host credentials, so without
    this a client could bind any file the daemon can read. Root and the daemon's own uid pass.
    The kernel answers, for the peer's ids (``uid``, ``gid`` and its supplementary ``groups``;
    None: unknown, so nothing passes), in a process of its own that takes them: _peercheck.

    Returns the sources checked, as given, -> (canonical path, st_dev, st_ino, file handle) of
    what was checked: the child binds those files or none (mounts.MountSpec.pin), whatever the paths
    lead to by then.
    """
    pins: dict[str, tuple[str, int, int, str]] = {}
    if uid == 0 or uid == os.getuid():
        return pins
    asks = [(field, src, write) for field, write in (("ro_binds", False), ("rw_binds", True))
            for src in getattr(cfg, field) if src not in getattr(pool, field)]
    if cfg.chroot_dir and cfg.chroot_dir != pool.chroot_dir:
        asks.append(("chroot_dir", cfg.chroot_dir, False))
    # A bind target inside another bind must exist there already (mounts._user_binds): the
    # client must be able to see that it does, or the daemon's answer (it looks as root) would
    # tell it whether names exist in directories it may not search (a helper's review).
    nested = _nested_targets(cfg, pool)
    asks += [("target", host, "e") for host in nested]
    if not asks:
        return pins
    if groups is None:  # (a file may deny a group its "other" bits allow: unknown groups pass nothing)
        raise PolicyError(f"the daemon could not learn uid {uid}'s supplementary groups (SO_PEERGROUPS), "
                          "so it cannot check the host paths this request names")
    found = _as_peer(uid, gid, groups, [(src, write) for _, src, write in asks])
    for (field, src, write), pin in zip(asks, found):
        if field == "target":
            if pin is None:  # (missing or out of the client's reach: one answer for both)
                t, parent = nested[src]
                raise PolicyError(f"bind target {quoted(t)}: the target lies inside the bind of {quoted(parent)}, "
                                  f"where {quoted(src)} must already exist, reachable by uid {uid}")
            continue
        if pin is None:
            raise PolicyError(f"{field}: uid {uid} may not {'write' if write else 'read'} {quoted(src)} on the host")
        _pin(pins, src, pin)
    return pins


def _nested_targets(cfg: SandboxConfig, pool: SandboxConfig) -> dict[str, tuple[str, str]]:
    """Host path -> (target, enclosing target) for each bind target the request names (not its
    pool) that lies inside another layer: a bind's target, or the root of a chroot_dir the
    request names (where, on the host, the mount point must already exist; mounts._user_binds)."""
    binds = [(src, os.path.normpath(t)) for field in ("ro_binds", "rw_binds") for src, t in getattr(cfg, field).items()]
    theirs = [os.path.normpath(t) for field in ("ro_binds", "rw_binds") for src, t in getattr(cfg, field).items()
              if getattr(pool, field).get(src) != t]
    layers = list(binds)
    if cfg.chroot_dir and cfg.chroot_dir != pool.chroot_dir:
        layers.append((cfg.chroot_dir, "/"))
    out: dict[str, tuple[str, str]] = {}
    for t in theirs:
        enclosing = [(pt, src) for src, pt in layers if pt != t and t.startswith(pt.rstrip("/") + "/")]
        if enclosing:
            pt, src = max(enclosing, key=lambda e: len(e[0]))
            out[os.path.normpath(src + t[len(pt.rstrip("/")):])] = (t, pt)
    return out


def _pin(pins: dict, src: str, pin: tuple[str, int, int, str]) -> None:
    """One pin per path: the same path named twice (a read bind, a write bind, chroot_dir) must
    have led to the same file each time it was checked, or a read check could stand for a
    write one."""
    if pins.setdefault(src, pin) != pin:
        raise PolicyError(f"{quoted(src)} changed while the request was checked")


CHECK_TIMEOUT = 8.0  # seconds for one check by _peercheck (within the daemon's PATHS_TIMEOUT, 10 s)
SERVER_TIMEOUT = 2.0  # seconds for _peercheck's server to fork a check's worker, or it is replaced
MAX_HOST_PATHS = 256  # host paths one request may name for the check (each is a walk as the client)
MAX_HELD_CHECKS = 4  # a uid's checks timed out and still held by a file system, before its next are refused
_CHECKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_peercheck.py")
_checker_lock = threading.Lock()
_checker: tuple[subprocess.Popen, socket.socket] | None = None  # the check server and our end
_held_lock = threading.Lock()
_held: dict[int, list] = {}  # uid -> its timed-out checks' workers: pidfds (or (pid, start time))
_closed = False  # stop_checker(final=True): no server is started again


def _as_peer(uid: int, gid: int, groups: tuple[int, ...], asks: list[tuple[str, bool | str]]) -> list:
    """For each (path, write): (canonical path, st_dev, st_ino, file handle) if the peer may reach it, else
    None (``write`` may also be "e": only that the peer's walk gets there; no handle then);
    None; answered by a worker of _peercheck's server, a process that takes the peer's ids.
    Raises PolicyError if it cannot take them (it needs CAP_SETUID and CAP_SETGID: see
    systemd/zygote.service), takes too long, or answers nonsense: nothing is bound then."""
    if len(asks) > MAX_HOST_PATHS:
        raise PolicyError(f"a request may name at most {MAX_HOST_PATHS} host paths (binds and chroot_dir), "
                          f"this one names {len(asks)}")
    paths = [os.fsencode(path) for path, _ in asks]
    if any(b"\0" in path for path in paths):  # (no path holds one; the request is NUL-separated)
        raise PolicyError("a host path holds a NUL byte")
    if any(len(path) >= PATH_MAX for path in paths):  # (the kernel's ENAMETOOLONG, said here)
        raise PolicyError(f"a host path is {PATH_MAX} bytes long or longer")
    fields = [str(uid).encode(), str(gid).encode(), ",".join(map(str, groups)).encode()]
    fields += [x for path, (_, kind) in zip(paths, asks)
               for x in (kind.encode() if isinstance(kind, str) else b"w" if kind else b"r", path)]
    req = b"\0".join(fields) + b"\0"
    deadline = time.monotonic() + CHECK_TIMEOUT
    _check_held(uid)
    pid = 0
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours:
        try:
            with theirs:
                server = _to_checker(b"%r" % CHECK_TIMEOUT, theirs.fileno(), deadline)
            pid = _worker_pid(ours, server, deadline)
            _time_left(ours, deadline)
            ours.sendall(req, socket.MSG_NOSIGNAL)
            ours.shutdown(socket.SHUT_WR)
            out = bytearray()
            while _time_left(ours, deadline) and (chunk := ours.recv(1 << 16)):
                out += chunk
        except TimeoutError:  # (the worker's own timer ends it, where a signal can)
            if pid:
                _hold(uid, pid)
            raise PolicyError(f"checking uid {uid}'s host paths took over {CHECK_TIMEOUT:g} s "
                              "(a file system that does not answer?)") from None
        except OSError as e:
            raise PolicyError(f"could not check uid {uid}'s host paths: {e}") from None
    if out[:1] == b"!":
        raise PolicyError(f"the daemon cannot check host paths as uid {uid}: "
                          f"{quoted(out[1:].decode(errors='replace'), 300)}")
    fields = bytes(out[1:]).split(b"\0")
    if out[:1] != b"+" or len(fields) != 4 * len(asks) + 1 or fields[-1]:
        raise PolicyError(f"the check of uid {uid}'s host paths answered nonsense" if out else
                          f"the check of uid {uid}'s host paths ended without an answer")
    try:
        return [None if not fields[i] else (fields[i].decode(), int(fields[i + 1]), int(fields[i + 2]),
                                            fields[i + 3].decode())
                for i in range(0, 4 * len(asks), 4)]
    except ValueError:  # (UnicodeDecodeError included)
        raise PolicyError(f"the check of uid {uid}'s host paths answered nonsense") from None


def _time_left(sock: socket.socket, deadline: float) -> bool:
    """Set ``sock``'s timeout to what is left until ``deadline``; TimeoutError when nothing is."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    sock.settimeout(left)
    return True


def _worker_pid(sock: socket.socket, server: subprocess.Popen, deadline: float) -> int:
    """The pid a check's worker writes first, once forked. A server that forks none within
    SERVER_TIMEOUT (stopped, or stuck) is replaced, and the check fails: a live server whose
    queue still had room went on taking checks that could only time out."""
    got = b""
    try:
        _time_left(sock, min(deadline, time.monotonic() + SERVER_TIMEOUT))
        while not got.endswith(b"\0") and len(got) < 16:
            chunk = sock.recv(16 - len(got))  # (no more than the pid: the answer comes after it)
            if not chunk:
                break
            got += chunk
    except TimeoutError:
        if time.monotonic() < deadline:
            _replace(server)
            raise PolicyError("the check of host paths got no answer from its server, which was replaced; "
                              "try again") from None
        raise
    if not got.endswith(b"\0") or not got[:-1].isdigit():
        raise PolicyError("the check of host paths ended without an answer")
    return int(got[:-1])


def _hold(uid: int, pid: int) -> None:
    """Count a timed-out check's worker against ``uid`` while it lives (see _check_held): by a
    pidfd, or (pidfd_open refused: a seccomp profile older than it) by its pid and start time."""
    try:
        held: int | tuple[int, str] = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # gone already
    except OSError:
        held = (pid, _start_time(pid))
        if not held[1]:
            return
    with _held_lock:
        _held.setdefault(uid, []).append(held)


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return ""


def _ended(held: int | tuple[int, str]) -> bool:
    if isinstance(held, tuple):
        return _start_time(held[0]) != held[1]
    p = select.poll()
    p.register(held, select.POLLIN)
    if p.poll(0):
        os.close(held)
        return True
    return False


def _check_held(uid: int) -> None:
    """Refuse ``uid``'s checks while MAX_HELD_CHECKS of its earlier ones are held by a file
    system that never answered (a FUSE request its server took: no signal ends that wait).
    Without a bound, a client's own allow_other FUSE mount could pile up root processes, two
    per 8 s, until the service's task limit stopped every user's spawns."""
    with _held_lock:
        for who in list(_held):  # (every uid's: the ended ones' pidfds go)
            _held[who] = [held for held in _held[who] if not _ended(held)]
            if not _held[who]:
                del _held[who]
        n = len(_held.get(uid, ()))
    if n >= MAX_HELD_CHECKS:
        raise PolicyError(f"{n} earlier checks of uid {uid}'s host paths are still held by a file system "
                          "that does not answer; new ones are refused until those end")


def _to_checker(timeout: bytes, fd: int, deadline: float) -> subprocess.Popen:
    """Hand one check's socket to _peercheck's server, started (again) if it is not running;
    returns the server."""
    if not _checker_lock.acquire(timeout=max(deadline - time.monotonic(), 0.001)):
        raise PolicyError("the check of host paths waited too long for its server (too many checks at once)")
    try:
        for attempt in (1, 2):
            if _closed:
                raise PolicyError("the daemon is shutting down")
            if _checker is None or _checker[0].poll() is not None:
                _start_checker()
            proc, sock = _checker
            _time_left(sock, deadline)  # (out of time before the send: the server is not at fault)
            left = sock.gettimeout()
            try:
                socket.send_fds(sock, [timeout], [fd], socket.MSG_NOSIGNAL)
                return proc
            except TimeoutError:
                if left >= SERVER_TIMEOUT:
                    _stop_checker()  # it read nothing for that long: the next check gets a new one
                raise
            except OSError:
                if attempt == 2:
                    raise
                _stop_checker()  # (it died meanwhile: once more with a new one)
    finally:
        _checker_lock.release()


def _start_checker() -> None:
    global _checker
    if _checker is not None:
        _stop_checker()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        with theirs:
            proc = subprocess.Popen([sys.executable, "-I", "-S", _CHECKER, os.path.dirname(os.path.dirname(_CHECKER)),
                                     str(theirs.fileno())], pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={})
    except OSError as e:
        ours.close()
        raise PolicyError(f"could not start the check of host paths: {e}") from None
    _checker = (proc, ours)


def _replace(server: subprocess.Popen) -> None:
    """Kill ``server`` if it is still the check server (its checks in flight fail; the next
    check starts a new one)."""
    with _checker_lock:
        if _checker is not None and _checker[0] is server:
            _stop_checker()


def _stop_checker(grace: float = 0.0) -> None:
    """(Holding _checker_lock.) Close our end of the server's socket: it exits once it has
    read what is queued; killed past ``grace`` seconds."""
    global _checker
    if _checker is None:
        return
    (proc, sock), _checker = _checker, None
    sock.close()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.wait(2.0)
        except subprocess.TimeoutExpired:
            pass  # (held in the kernel: subprocess reaps it later)


def stop_checker(final: bool = False) -> None:
    """End _peercheck's server (at the daemon's shutdown, ``final``: no check starts another;
    it also ends on its own when this process does). Checks in flight finish in their workers;
    after a stop that is not final, a later check starts a new server."""
    global _closed
    with _checker_lock:
        _closed = _closed or final
        _stop_checker(grace=2.0)
    if final:
        with _held_lock:
            for held in (h for hs in _held.values() for h in hs if isinstance(h, int)):
                os.close(held)
            _held.clear()


def peer_groups(sock) -> tuple[int, ...] | None:
    """The supplementary groups of a Unix socket's peer as at its connect (SO_PEERGROUPS, Linux
    4.13); None if the kernel cannot say (check_peer_paths then lets no path through)."""
    fd = sock.fileno()
    size = ctypes.c_uint(4 * 64)
    for _ in range(3):  # too small: the kernel says how much it needs (ERANGE)
        buf = ctypes.create_string_buffer(size.value)
        if _sys.libc.getsockopt(fd, socket.SOL_SOCKET, _SO_PEERGROUPS, buf, ctypes.byref(size)) == 0:
            return struct.unpack(f"{size.value // 4}I", buf.raw[:size.value - size.value % 4])
        if ctypes.get_errno() != errno.ERANGE:
            break
    return None


_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_sys.libc.getsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                 ctypes.POINTER(ctypes.c_uint)]


def on_a_mount(fd: int) -> bool:
    """Whether ``fd`` is a file on a mount at all: not a pipe, socket, anonymous inode or memfd
    (the kernel's internal mounts, in no mount table). Raises OSError for a closed fd.

    A link's text tells the first three apart (a file's path always starts with '/'), but not a
    memfd ("/memfd:NAME"): a file at "/memfd:x/f" of a mount namespace of the client's own reads
    the same (a helper's review: with a FUSE file there, the check below was skipped and the
    zygote was stuck in its close). A memfd is confirmed by F_GET_SEALS, which only shmem and
    hugetlbfs files answer, from the inode, asking no file system server."""
    link = os.readlink(f"/proc/self/fd/{fd}")
    if link.startswith(("pipe:[", "socket:[", "anon_inode:")):
        return False
    if link.startswith("/memfd:"):
        try:
            fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            return False
        except OSError:
            pass  # (EINVAL: no memfd, whatever its name)
    return True


def stdio_problem(fds, peer_pid: int) -> str | None:
    """Why these stdio fds (stdin, stdout, stderr) cannot be a child's, or None (see on_fuse).
    Reads mount tables, which a user can make large: run it in a worker thread."""
    for name, fd in zip(("stdin", "stdout", "stderr"), fds):
        try:
            fuse = on_fuse(fd, peer_pid)
        except OSError as e:
            return f"the {name} fd cannot be looked at: {e.strerror}"
        if fuse:
            return f"the {name} fd is on a FUSE mount (closing it asks the FUSE server, which may never answer)"
        if fuse is None:
            return f"the {name} fd is on a mount neither the daemon nor its client can see"
    return None


def on_fuse(fd: int, peer_pid: int) -> bool | None:
    """Whether ``fd`` is a file on a FUSE mount, found from its mount id (/proc fdinfo) in our
    mount table or the peer's, without asking any filesystem; None when neither has that mount.

    Every close of such a file asks its FUSE server (FLUSH), and one that never answers makes
    the close wait for ever, SIGKILL or not: the pool's zygote, which closes its copies of a
    request's stdio fds, would be lost to every user. Pipes, sockets and anonymous inodes are
    not on any mount. Raises OSError for a closed fd."""
    if not on_a_mount(fd):
        return False
    with open(f"/proc/self/fdinfo/{fd}") as f:
        mnt = next((ln.split()[1] for ln in f if ln.startswith("mnt_id:")), None)
    for table in ("/proc/self/mountinfo", f"/proc/{peer_pid}/mountinfo"):
        try:
            with open(table) as f:
                for line in f:
                    if line.split(" ", 1)[0] == mnt:
                        fstype = line.split(" - ", 1)[1].split()[0]
                        return fstype in ("fuse", "fuseblk") or fstype.startswith("fuse.")
        except (OSError, IndexError):
            continue
    return None


def is_pipe(fd: int) -> bool:
    """Whether ``fd`` is an anonymous pipe, from its /proc link ("pipe:[ino]"): no filesystem is
    asked (an fstat on a FUSE file waits for its server). Raises OSError for a closed fd."""
    return os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:[")
