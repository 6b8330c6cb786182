"""UTS namespace and process identity, child side: hostname and process name."""

from __future__ import annotations

from . import SetupError
from . import _sys


def apply(hostname: str, process_name: str | None) -> None:
    name = hostname.encode()
    try:
        _sys.check(_sys.libc.sethostname(name, len(name)), "sethostname")
    except OSError as e:
        raise SetupError("uts", str(e), e.errno or 0) from None
    if process_name:
        set_process_name(process_name)


def set_process_name(name: str) -> None:
    """What ps, top and /proc/PID/comm show (the kernel keeps 15 bytes; PR_SET_NAME semantics)."""
    try:
        with open("/proc/self/comm", "wb", buffering=0) as f:
            f.write(name.encode()[:15])
    except OSError as e:
        raise SetupError("uts", f"cannot set the process name: {e.strerror}", e.errno or 0) from None
