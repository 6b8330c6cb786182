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
The maps of a namespace the daemon does not own can only be written with CAP_SYS_ADMIN (the
kernel asks for it over the child's namespace, which only the owner has without it): a daemon
without it (the container image cuts its capabilities to four) keeps root as the owner, and its
children share root's budgets (per-child ranges still keep them apart from each other).
"""

from __future__ import annotations

import errno as _errno
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
        if id_base <= 0 or id_base + RANGE > LAST_ID:
            raise ValueError(f"id_base {id_base} must be > 0 and leave room for {RANGE} ids")
        line = f"0 {id_base} {RANGE}\n".encode()
        return line, line
    return f"65534 {real_uid} 1\n".encode(), f"65534 {real_gid} 1\n".encode()


def can_give_ownership() -> bool:
    """Whether this process may clone children whose user namespace another uid owns and still
    write their maps: CAP_SYS_ADMIN in its effective set (see the module's text)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> 21 & 1)  # CAP_SYS_ADMIN
    return False


class IdSlots:
    """The host id ranges a root daemon's live children hold, one each (see the module's text).

    Taken in turn from a cursor that moves on (a range just given back is the last to be taken
    again), so whatever the kernel still counts against an ended child's ids (an fd it passed
    on, files left in a writable bind) rarely meets the next holder of that range.
    """

    def __init__(self, id_base: int) -> None:
        map_lines(id_base, 0, 0)  # (validates)
        self.id_base = id_base
        self.count = (LAST_ID + 1 - id_base) // RANGE
        self._used: set[int] = set()
        self._next = 0

    def take(self) -> int:
        """A free slot. Raises LookupError when every one is held."""
        if len(self._used) >= self.count:
            raise LookupError(f"all {self.count} id ranges above id_base {self.id_base} are held by children")
        while self._next in self._used:
            self._next = (self._next + 1) % self.count
        slot = self._next
        self._used.add(slot)
        self._next = (slot + 1) % self.count
        return slot

    def give(self, slot: int) -> None:
        self._used.discard(slot)

    def first_id(self, slot: int) -> int:
        """Host uid/gid of the slot's sandbox id 0: the owner of the child's user namespace."""
        return self.id_base + slot * RANGE


def outside(pid: int, uid_map: bytes, gid_map: bytes) -> None:
    """Write setgroups=deny, gid_map, uid_map of ``pid``. Raises OSError with the kernel's errno."""
    base = f"/proc/{pid}/"
    for name, data in (("setgroups", b"deny"), ("gid_map", gid_map), ("uid_map", uid_map)):
        _sys.write_once(base + name, data)


def apply() -> None:
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
