"""Network namespace: ``lo`` up in a child's empty namespace, and namespaces made ahead.

``apply``: SIOCSIFFLAGS on a throwaway socket; needs CAP_NET_ADMIN in the user namespace owning
the netns, which the child has until it drops privileges, when its clone made the namespace.
``Ahead``: the zygote's namespace for its next child, made while it waits (see its doc).
(veths are made by the daemon: see network.py.)
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

from .._clone import CLONE_NEWNET
from . import SetupError, _sys

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def apply() -> None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            ifr = struct.pack("16sH14x", b"lo", 0)
            flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, ifr))[1]
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
    except OSError as e:
        raise SetupError("netns", f"cannot bring lo up: {e.strerror}", e.errno or 0) from None


class Ahead:
    """A fresh network namespace for the next child, made while the zygote waits for requests.

    CLONE_NEWNET costs ~0.4 ms inside clone3 and the child then brings ``lo`` up itself; made
    ahead of time, both leave the request path. The namespace comes from ``make`` (in the zygote,
    a ``zygote._nsmaker`` server: owned by a user namespace of its own, so neither the host's
    device events reach it nor the child holds any capability over it, not even before it drops
    privileges); the zygote enters it, brings ``lo`` up, and the next clone inherits it instead
    of asking for CLONE_NEWNET. Right after that clone the zygote setns()es back to its own
    namespace: each prepared namespace serves one child. Without the privilege to come back
    (a rootless daemon), or when namespaces cannot be made so, every clone keeps CLONE_NEWNET.
    """

    FAILS = 3  # the maker's server died or hung this many times in a row: stop trying

    def __init__(self, make=None, lo_up=None, setns=_sys.setns) -> None:
        """``make``: a new network namespace's fd, ours to close (None: nothing is made ahead);
        ``lo_up``, ``setns``: this module's ``apply`` and the syscall (tests record them)."""
        self._make, self._lo_up, self._setns = make, lo_up or apply, setns
        self._ready = None
        self.ready = False
        self._fails = 0
        try:
            self._home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            # The way back must work before we ever leave: setns into the namespace we are in
            # needs the same privilege (and seccomp's leave) as the return trip after a clone.
            self._setns(self._home, CLONE_NEWNET)
            self.can_join = True
        except OSError:
            self.can_join = False
        self.enabled = self.can_join and make is not None  # (a failed prepare turns off only this)
        self._parked = -1  # the namespace made ahead, held while a given clone is made (join)

    def use(self, make, ready=None) -> None:
        """Make namespaces ahead with ``make`` from now on (see ``__init__``); ``ready()``, if
        given, says (without waiting) whether ``make`` would answer now."""
        self._make, self._ready = make, ready
        self.enabled = self.can_join

    def prepare(self) -> None:
        try:
            if self._ready is not None and not self._ready():
                return  # (its server is still starting: clones make their own meanwhile)
            fd = self._make()
        except OSError as e:
            if e.errno in (errno.EPERM, errno.EINVAL, errno.ENOSYS, errno.ESHUTDOWN):
                self.enabled = False  # not here: clones make their own from now on
            elif e.errno in (errno.EIO, errno.ETIMEDOUT):
                self._fails += 1  # (a server that died or hung: it is replaced at the next try)
                self.enabled = self._fails < self.FAILS
            return  # otherwise (ENOSPC: user.max_net_namespaces, ENOMEM) try again when idle
        try:
            self._setns(fd, CLONE_NEWNET)
        except OSError:
            self.enabled = False
            return
        finally:
            os.close(fd)
        try:
            self._lo_up()
        except Exception:  # noqa: BLE001 - the clone-made namespace is the fallback
            self.enabled = False
            self.go_home()
            return
        self._fails = 0
        self.ready = True

    def join(self, fd: int) -> None:
        """Enter the namespace ``fd`` for the next clone (one the daemon made for that child);
        ``go_home`` after the clone. A namespace made ahead here is kept for the clone after
        (held by an fd meanwhile: unmade, it would cost the next child its lo up or the zygote a
        new one). Raises OSError (the zygote is back where it was then)."""
        if not self.can_join:
            self.ready = False
            raise OSError(errno.EPERM, "this zygote cannot setns() (no way back to its namespace)")
        if self.ready:
            try:
                self._parked = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self.go_home()  # (out of fds: let it go)
        self.ready = False
        try:
            self._setns(fd, CLONE_NEWNET)
        except OSError:
            self.go_home()
            raise

    def go_home(self) -> None:
        """Leave the namespace just handed to a child (or one that failed to set up): for the
        one made ahead that ``join`` kept, if any (ready again), else home."""
        self.ready = False
        if not self.can_join:
            return  # (never left: without a way back nothing here enters another namespace)
        parked, self._parked = self._parked, -1
        if parked >= 0:
            try:
                self._setns(parked, CLONE_NEWNET)
                self.ready = True
                return
            except OSError:
                pass  # home, then; a new one is made when idle
            finally:
                os.close(parked)
        try:
            self._setns(self._home, CLONE_NEWNET)
        except OSError:
            os._exit(5)  # never serve another child from a namespace that is not ours: restart
