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


# A private handle: _sys.libc.prctl carries integer argtypes; PR_SET_NAME takes a string.
_prctl = _sys.ctypes.CDLL(None, use_errno=True).prctl
_prctl.argtypes = [_sys.ctypes.c_int, _sys.ctypes.c_char_p, _sys.ctypes.c_ulong, _sys.ctypes.c_ulong,
                   _sys.ctypes.c_ulong]


def set_process_name(name: str) -> None:
    """What ps, top and /proc/PID/comm show (the kernel keeps 15 bytes).

    PR_SET_NAME, not a write to /proc/self/comm: after the uid change the process is not dumpable,
    so its /proc files belong to (host) root and the write is refused.
    """
    if _prctl(_sys.PR_SET_NAME, name.encode()[:15], 0, 0, 0) != 0:
        err = _sys.ctypes.get_errno()
        raise SetupError("uts", f"cannot set the process name: {_sys.os.strerror(err)}", err)
