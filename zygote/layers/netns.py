"""Network namespace, child side: bring ``lo`` up in the child's empty namespace.

SIOCSIFFLAGS on a throwaway socket; needs CAP_NET_ADMIN in the user namespace owning the netns,
which the child has until it drops privileges. (veths are made by the daemon: see network.py.)
"""

from __future__ import annotations

import fcntl
import socket
import struct

from . import SetupError

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
