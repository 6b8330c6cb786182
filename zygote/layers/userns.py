"""User namespace: the daemon writes the child's uid/gid maps; the child switches onto them.

Maps (user_namespaces(7)): written once, from outside, by a process with CAP_SETUID/CAP_SETGID in
the parent namespace. ``setgroups`` is set to "deny" first so the child can never drop supplementary
groups to escape a group-based deny on the host (the zygote has already dropped its own). Sandbox
ids 0..65535 map to an unprivileged host range starting at ``id_base`` (never host root). A non-root
daemon can only map its own ids: one line, to the sandbox's unprivileged id 65534.
"""

from __future__ import annotations

import errno as _errno
import os

from . import SetupError
from . import _sys

RANGE = 65536
DEFAULT_ID_BASE = 1_000_000_000


def map_lines(id_base: int, real_uid: int, real_gid: int) -> tuple[bytes, bytes]:
    """uid_map and gid_map contents for a child of a daemon running as real_uid/real_gid."""
    if real_uid == 0:
        if id_base <= 0 or id_base + RANGE > 0xFFFFFFFE:
            raise ValueError(f"id_base {id_base} must be > 0 and leave room for {RANGE} ids")
        line = f"0 {id_base} {RANGE}\n".encode()
        return line, line
    return f"65534 {real_uid} 1\n".encode(), f"65534 {real_gid} 1\n".encode()


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
