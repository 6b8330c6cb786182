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
    here ahead of time, both leave the request path. The namespace is made by unshare() in the
    zygote (so it is owned by the zygote's user namespace, not the child's: the child holds no
    capability over it at any point, not even before it drops privileges), ``lo`` is brought up,
    and the next clone inherits it instead of asking for CLONE_NEWNET. Right after that clone
    the zygote setns()es back to its own namespace: each prepared namespace serves one child.
    Without the privilege to unshare (a rootless daemon) every clone keeps CLONE_NEWNET.
    """

    def __init__(self, lo_up=None, unshare=_sys.unshare, setns=_sys.setns) -> None:
        """``lo_up``, ``unshare``, ``setns``: this module's ``apply`` and the syscalls (tests record them)."""
        self._lo_up, self._unshare, self._setns = lo_up or apply, unshare, setns
        self.ready = False
        try:
            self._home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            # The way back must work before we ever leave: setns into the namespace we are in
            # needs the same privilege (and seccomp's leave) as the return trip after a clone.
            self._setns(self._home, CLONE_NEWNET)
            self.enabled = True
        except OSError:
            self.enabled = False
        self.can_join = self.enabled  # (stays: a failed prepare turns off only our own namespaces)
        self._parked = -1  # the namespace made ahead, held while a given clone is made (join)

    def prepare(self) -> None:
        try:
            self._unshare(CLONE_NEWNET)
        except OSError as e:
            if e.errno in (errno.EPERM, errno.EINVAL, errno.ENOSYS):
                self.enabled = False  # no privilege for it here: clones make their own from now on
            return  # otherwise (ENOSPC: user.max_net_namespaces, ENOMEM) try again when idle
        try:
            self._lo_up()
        except Exception:  # noqa: BLE001 - the clone-made namespace is the fallback
            self.enabled = False
            self.go_home()
            return
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
