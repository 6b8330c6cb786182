"""User namespace: the daemon writes the child's uid/gid maps; the child switches onto them.

Maps (user_namespaces(7)): written once, from outside, by a process with CAP_SETUID/CAP_SETGID in
the parent namespace. ``setgroups`` is set to "deny" first so the child can never drop supplementary
groups to escape a group-based deny on the host (the zygote has already dropped its own). Sandbox
ids 0..65535 map to an unprivileged host range of 65536 ids (never host root). A non-root daemon
can only map its own ids: one line, to the sandbox's unprivileged id 65534.

A root daemon gives every live child a range of its own (``IdSlots``: slot k starts at
``id_base + k * 65536``), and the zygote clones it with that range's first id as effective uid,
so the child's user namespace is owned by it. Why both: the kernel keeps some budgets per host
user — pipe buffer pages, epoll watches (the task's uid), and inotify instances and watches,
queued signals, user namespaces (counted up the namespace chain, at the top for the namespace's
owner). With one range for all, one child could use up what every other child gets (pipes of one
page, epoll ENOSPC); with root as the owner, what host root's own processes get (a review showed
a child taking all 128 inotify instances from root: journald, systemd and ``tail -f`` use them).
The maps of a namespace the daemon does not own can only be written with CAP_SYS_ADMIN, the
child's /proc/PID/ns/net (its veth) opened with CAP_SYS_PTRACE, and the child signalled with
CAP_KILL (the owner has every capability over the namespace; anyone else needs them for
real): a daemon without all three (the systemd unit and the container image cut it to four
capabilities) keeps root as the owner, and its children's inotify instances and queued signals
still count against root's (per-child ranges still keep the per-uid budgets apart).
"""

from __future__ import annotations

import collections
import contextlib
import errno as _errno
import fcntl
import os

from . import SetupError
from . import _sys

RANGE = 65536
DEFAULT_ID_BASE = 1_000_000_000


LAST_ID = 0xFFFFFFFE  # (uid_t)-1 is "no id"


def map_lines(id_base: int, real_uid: int, real_gid: int) -> tuple[bytes, bytes]:
    """uid_map and gid_map contents for a child of a daemon running as real_uid/real_gid
    (``id_base``: the first host id of the child's range; see IdSlots.first_id)."""
    if real_uid == 0:
        if id_base <= 0 or id_base + RANGE > LAST_ID + 1:
            raise ValueError(f"id_base {id_base} must be > 0 and leave room for {RANGE} ids")
        line = f"0 {id_base} {RANGE}\n".encode()
        return line, line
    return f"65534 {real_uid} 1\n".encode(), f"65534 {real_gid} 1\n".encode()


CLIENT_IDS = 64 * RANGE  # clients' own ids, just below id_base: client uids 1..CLIENT_IDS - 1


def client_id(id_base: int, uid: int) -> int | None:
    """The host uid, and gid, a root daemon's child runs as where it acts as its client: for a
    child with idmapped binds of the client's own paths (the daemon's ``_idmapped``), its
    sandbox uid and gid map to these, and the copies map the client's uid and primary group to
    them. None: client ``uid`` has none (CLIENT_IDS or above, or ``id_base`` too low to leave
    room).

    Why: an idmapped copy maps the client's files to the ids its child runs as, and it outlives
    the child behind any fd of it a payload hands out (SCM_RIGHTS to another local user, say).
    With ids of the child's range, a later child of another client that got the same range
    (ranges are reused) owned the first client's bound tree through such an fd. These are fixed
    by the client's uid (``id_base - CLIENT_IDS + uid``, just below every child's range, where
    no daemon of this ``id_base``, of any version, gives a child ids), as uid and as gid, so no other
    client's child ever runs as them, across daemons, restarts and upgrades, with no state to
    keep or lose. The price: one client's children with such binds share their host uid and gid
    (not their namespace owner or other ids), and with them what the kernel keeps per host user
    (pipe pages, epoll watches) and each other's files in other shared writable places (a pool's
    read-write bind); a client that needs its children apart gives them no binds of its own."""
    if 0 < uid < CLIENT_IDS and id_base > CLIENT_IDS:
        return id_base - CLIENT_IDS + uid
    return None


def own_map(id_base: int, inside: int, host: int) -> bytes:
    """A uid_map or gid_map like map_lines' for a root daemon's child, but with sandbox id
    ``inside`` taken to host id ``host`` (client_id) instead of to ``id_base + inside``, which
    stays unmapped. The first line maps sandbox id 0 (apply() looks for it)."""
    if not 0 <= inside < RANGE:
        raise ValueError(f"sandbox id {inside} is outside 0..{RANGE - 1}")
    map_lines(id_base, 0, 0)  # (validates)
    lines = [f"{inside} {host} 1"]
    if inside > 0:
        lines.insert(0, f"0 {id_base} {inside}")
    if inside + 1 < RANGE:
        lines.append(f"{inside + 1} {id_base + inside + 1} {RANGE - inside - 1}")
    return ("\n".join(lines) + "\n").encode()


def can_give_ownership() -> bool:
    """Whether this process may clone children whose user namespace another uid owns and still
    do what the daemon does to them from outside: CAP_SYS_ADMIN (write their maps),
    CAP_SYS_PTRACE (open /proc/PID/ns/net of a process with another uid) and CAP_KILL (signal
    it: its uids are not ours) in its effective set. The namespace's owner has every capability
    over it; anyone else needs them for real (a review found a daemon without CAP_KILL unable to
    kill such a child at its timeout: the EPERM ended the daemon, the child ran on)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                eff = int(line.split()[1], 16)
                return all(eff >> cap & 1 for cap in (21, 19, 5))  # SYS_ADMIN, SYS_PTRACE, KILL
    return False


LOCK_DIR = "/run/zygote-ids"  # a root daemon's claims on blocks of id ranges (flock, host-wide)
CHUNK = 64  # ranges per claimed block


class IdSlots:
    """The host id ranges a root daemon's live children hold, one each (see the module's text).

    A daemon claims blocks of CHUNK ranges at start, enough for ``count`` children, host-wide:
    the first blocks above ``id_base`` that no other daemon holds (an flock on
    LOCK_DIR/<id_base>.<block>, released when the daemon's process ends however it ends), so
    two daemons on one host (an embedded client beside the system's) never hand out the same
    ids. Its children then only ever have ids in those blocks (the uids from ``id_base`` up
    must belong to no host account: whoever has a range's first uid owns that child's user
    namespace). A range given back waits behind the others (least recently used first), so what
    the kernel still counts against an ended child's ids (an fd it passed on, files it left in a
    writable bind) rarely meets the next holder. The range just below ``id_base`` holds the
    clients' own ids (client_id): ``clients_taken`` says why not, when a host account has an id
    there (then no child gets client ids: binds that need them fail closed), and ``holds``
    counts it otherwise. Daemons of another ``id_base`` lock other file names: a daemon refuses
    to start when its blocks or client ids meet those of one that runs (``_check_others``).

    Raises:
        ValueError: id_base leaves no room, a host user or group has an id in the claimed blocks,
            or another id_base's running daemon has ids among this one's.
        OSError: the lock directory cannot be made or no block is free.
    """

    def __init__(self, id_base: int, count: int, lock_dir: str = LOCK_DIR) -> None:
        map_lines(id_base, 0, 0)  # (validates)
        self.id_base = id_base
        blocks = (LAST_ID + 1 - id_base) // RANGE // CHUNK
        want = -(-count // CHUNK)
        os.makedirs(lock_dir, mode=0o700, exist_ok=True)
        self._locks: list[int] = []
        self._free: collections.deque[int] = collections.deque()
        self._paths: list[str] = []
        self._blocks: set[int] = set()
        for block in range(blocks):
            if len(self._locks) == want:
                break
            path = os.path.join(lock_dir, f"{id_base}.{block}")
            fd = _lock(path)
            if fd is None:
                continue
            self._locks.append(fd)
            self._paths.append(path)
            self._blocks.add(block)
            self._free.extend(range(block * CHUNK, (block + 1) * CHUNK))
        if len(self._locks) < want:
            self.close()
            raise OSError(_errno.EAGAIN, f"no {want} free blocks of {CHUNK} id ranges above id_base {id_base} "
                                         f"(other daemons hold them: see {lock_dir})")
        self.count = len(self._free)
        accounts = _accounts()
        lo, hi = self.first_id(min(self._free)), self.first_id(max(self._free)) + RANGE
        for name, ident in accounts:
            if lo <= ident < hi:
                self.close()
                raise ValueError(f"host user or group {name!r} has id {ident}, inside the ids this daemon gives "
                                 f"its children ({lo}..{hi - 1}): it would own a child's namespace; choose "
                                 "another id_base")
        low = id_base - CLIENT_IDS
        #: None, or why no child may run as a client's own ids (client_id)
        self.clients_taken = (f"id_base {id_base} leaves no room below it for clients' own ids" if low <= 0
                              else next((f"host user or group {name!r} has id {ident}, inside the ids of clients' "
                                         f"own ({low}..{id_base - 1}); choose another id_base"
                                         for name, ident in accounts if low <= ident < id_base), None))
        self._check_others(lock_dir)

    def _check_others(self, lock_dir: str) -> None:
        """Refuse (ValueError) ids that a running daemon of another id_base gives its children or
        its clients: its lock files are named by its own id_base, so nothing else keeps two
        daemons with close id_bases apart. Once both run, the later one sees the first."""
        mine = _spans(self.id_base, self._blocks)
        for name in os.listdir(lock_dir):
            base_text, _, block_text = name.partition(".")
            if not (base_text.isdigit() and block_text.isdigit()) or int(base_text) == self.id_base:
                continue
            base, block = int(base_text), int(block_text)
            theirs = _spans(base, [block])
            if not any(a < d and c < b for a, b in mine for c, d in theirs):
                continue
            try:
                fd = os.open(os.path.join(lock_dir, name), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # (taken: nobody holds it, a stale file)
            except BlockingIOError:
                self.close()
                raise ValueError(f"a running daemon with id_base {base} gives its children or clients ids among "
                                 f"this daemon's (id_base {self.id_base}); keep every daemon's ids, from "
                                 f"id_base - {CLIENT_IDS} up, apart: choose another id_base") from None
            finally:
                os.close(fd)

    def own_id(self, uid: int) -> int:
        """client_id(uid) for this daemon's children. Raises OSError (ERANGE) saying why there is
        none: a host account among the client ids (clients_taken), or a uid out of their span."""
        if self.clients_taken:
            raise OSError(_errno.ERANGE, self.clients_taken)
        if (own := client_id(self.id_base, uid)) is None:
            raise OSError(_errno.ERANGE, f"client uid {uid} has no host id of its own in children "
                                         f"(uids 1..{CLIENT_IDS - 1} do)")
        return own

    def holds(self, ident: int) -> bool:
        """Whether host id ``ident`` lies in one of this daemon's claimed blocks (its children's
        ids) or, unless clients_taken, in the range below ``id_base`` (its clients' own ids in
        children, client_id)."""
        if self.clients_taken is None and self.id_base - CLIENT_IDS <= ident < self.id_base:  # (client_id's)
            return True
        return ident >= self.id_base and (ident - self.id_base) // (RANGE * CHUNK) in self._blocks

    def take(self) -> int:
        """A free slot. Raises LookupError when every one is held."""
        if not self._free:
            raise LookupError(f"all {self.count} id ranges of this daemon are held by children")
        return self._free.popleft()

    def give(self, slot: int) -> None:
        self._free.append(slot)

    def first_id(self, slot: int) -> int:
        """Host uid/gid of the slot's sandbox id 0: the owner of the child's user namespace."""
        return self.id_base + slot * RANGE

    def close(self, unlink: bool = False) -> None:
        """Let the blocks go; ``unlink`` (the daemon's shutdown): remove their lock files too,
        while still holding them (_lock retries on a file removed under it)."""
        for fd, path in zip(self._locks, self._paths):
            if unlink:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            os.close(fd)
        self._locks, self._paths = [], []


def _spans(base: int, blocks) -> list[tuple[int, int]]:
    """[first, end) of ``blocks`` of a daemon of ``base``, and of its client ids."""
    out = [(base + b * RANGE * CHUNK, base + (b + 1) * RANGE * CHUNK) for b in blocks]
    return out + [(base - CLIENT_IDS, base)] if base > CLIENT_IDS else out


def _accounts() -> list[tuple[str, int]]:
    """(name, id) of every host user and group."""
    import grp
    import pwd
    return [(p.pw_name, p.pw_uid) for p in pwd.getpwall()] + [(g.gr_name, g.gr_gid) for g in grp.getgrall()]


def _lock(path: str) -> int | None:
    """An fd of ``path`` (made if need be) holding its flock, or None when another holds it.
    A lock taken on a file its holder removed meanwhile (IdSlots.close) is no lock: retried."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        held = os.fstat(fd)
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            return fd
        os.close(fd)


def outside(pid: int, uid_map: bytes, gid_map: bytes) -> None:
    """Write setgroups=deny, gid_map, uid_map of ``pid``. Raises OSError with the kernel's errno."""
    base = f"/proc/{pid}/"
    for name, data in (("setgroups", b"deny"), ("gid_map", gid_map), ("uid_map", uid_map)):
        _sys.write_once(base + name, data)


def apply(nested_limit_required: bool = True) -> None:
    """Child side: fail closed if the maps are missing; take sandbox root's ids when mapped.

    A root daemon's clone still carries host uid 0 as its *real* credential until it calls
    setresuid inside; host-side DAC checks (file owner == 0) would treat it as host root.
    setres[ug]id(0) inside turns the credential into the mapped, unprivileged host id.
    """
    with open("/proc/self/uid_map", "rb") as f:
        lines = f.read().split()
    if not lines:
        raise SetupError("userns", "uid_map was not written by the daemon", _errno.EPERM)
    if lines[0] == b"0":
        try:
            _sys.syscall("setresgid", 0, 0, 0)
            _sys.syscall("setresuid", 0, 0, 0)
        except OSError as e:
            raise SetupError("userns", str(e), e.errno) from None
    if os.getuid() == 65534 and lines[0] == b"0":
        raise SetupError("userns", "still the overflow uid after setresuid", _errno.EPERM)
    try:
        no_nested_namespaces()
    except SetupError as e:
        # A read-only /proc/sys (a container's, systemd's ProtectKernelTunables=) where the
        # seccomp profile refuses new user namespaces anyway: the second wall is left out.
        if nested_limit_required or e.errno not in (_errno.EROFS, _errno.EACCES, _errno.EPERM):
            raise


MAX_USER_NAMESPACES = "/proc/sys/user/max_user_namespaces"
SYSV_QUEUES = 16  # message queues of the child's IPC namespace (the kernel's default: 32000 of 16 KiB)


def bound_sysv_ipc(shm_bytes: int) -> None:
    """Child side, while it holds its capabilities in its own user namespace, which owns its IPC
    namespace: System V shared memory there holds at most ``shm_bytes`` in all (its /dev/shm's
    size), and message queues at most SYSV_QUEUES. The kernel's defaults are all of memory: a
    child without a memory cgroup filled segments it then detached, 832 MiB of shared memory
    charged to no process (a helper's red-team). A read-only /proc/sys (a container's) leaves
    the defaults: a memory cgroup bounds them there."""
    page = os.sysconf("SC_PAGE_SIZE")
    for name, value in (("shmmax", shm_bytes), ("shmall", max(1, shm_bytes // page)), ("msgmni", SYSV_QUEUES)):
        path = f"/proc/sys/kernel/{name}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, str(value).encode())
            finally:
                os.close(fd)
        except OSError as e:
            if e.errno in (_errno.EROFS, _errno.EACCES, _errno.EPERM):
                return
            raise SetupError("userns", f"bounding System V IPC ({path}): {e.strerror}", e.errno or 0) from None


def no_nested_namespaces() -> None:
    """Child side, while it holds its capabilities in its own user namespace: no user namespace
    can be made below it. The kernel keeps this limit per user namespace (the file names the
    writer's own) and checks every level's on creation, and only a holder of CAP_SYS_RESOURCE in
    the namespace may set it, so the payload can never raise it again. A nested user namespace
    gives every capability inside it, which is how a payload reaches kernel interfaces meant for
    the host's root (nf_tables, mounting file systems), the origin of most container escapes.
    The seccomp profiles refuse unshare/clone with namespace flags too; this holds without them
    (a pool with seccomp_profile = "unconfined", a custom profile)."""
    try:
        fd = os.open(MAX_USER_NAMESPACES, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
    except OSError as e:
        raise SetupError("userns", f"limiting nested user namespaces ({MAX_USER_NAMESPACES}): {e.strerror}",
                         e.errno or 0, "the host's /proc/sys must be writable for a process's own user "
                         "namespace (in Docker: --security-opt systempaths=unconfined)") from None
