"""Landlock, child side: filesystem rules, and TCP and scope rules where the kernel's ABI has them.

Hand-written ctypes over the three syscalls of landlock(7). A ruleset "handles" a set of access
rights; once the process is restricted, every handled right is denied except beneath the paths a
rule grants it for. Rights the ruleset does not handle stay unrestricted, so we handle every right
the running ABI knows (and none it does not: create_ruleset rejects unknown bits with EINVAL).

The domain applies to the calling thread and everything it later forks or execs, can only be made
stricter, and survives privilege changes: it is independent of uids and capabilities.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import stat

from . import SetupError
from . import _sys

# include/uapi/linux/landlock.h
CREATE_RULESET_VERSION = 1 << 0
RULE_PATH_BENEATH = 1

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13      # ABI 2
FS_TRUNCATE = 1 << 14   # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5

NET_BIND_TCP = 1 << 0     # ABI 4
NET_CONNECT_TCP = 1 << 1  # ABI 4

SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1                # ABI 6

_FS_ABI1 = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
_FS_ADDED = {2: FS_REFER, 3: FS_TRUNCATE, 5: FS_IOCTL_DEV}
# A path-beneath rule on a non-directory may only grant these (landlock_add_rule(2): EINVAL else).
_FS_FILE = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
_FS_RO = FS_READ_FILE | FS_READ_DIR | FS_EXECUTE

_HINT = ("enable Landlock: a kernel built with CONFIG_SECURITY_LANDLOCK=y and booted with "
         "lsm=landlock,... (or CONFIG_LSM listing landlock); in a container, a seccomp profile that "
         "allows landlock_create_ruleset/landlock_add_rule/landlock_restrict_self")

_PR_GET_NO_NEW_PRIVS = 39


class _RulesetAttr(ctypes.Structure):
    # The kernel reads only the first `size` bytes: 8 before ABI 4, 16 before ABI 6, 24 from 6 on.
    # An older kernel rejects a larger size with non-zero tail (E2BIG), so we pass what the ABI has.
    _fields_ = [("handled_access_fs", ctypes.c_uint64),
                ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in the uapi header: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _raw(name: str, *args) -> int:
    """The syscall's result, or -errno (no exception: callers branch on errno)."""
    ret = _sys.libc.syscall(_sys.NR[name], *args)
    return -ctypes.get_errno() if ret < 0 else ret


def abi_version() -> int:
    """The kernel's Landlock ABI version, or 0 when Landlock is not built in or not enabled.

    Raises:
        OSError: any other failure (e.g. a seccomp filter answering EPERM).
    """
    ret = _raw("landlock_create_ruleset", None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION))
    if ret == -_errno.ENOSYS or ret == -_errno.EOPNOTSUPP:
        return 0
    if ret < 0:
        raise OSError(-ret, f"landlock_create_ruleset(VERSION): {os.strerror(-ret)}")
    return ret


def fs_rights(abi: int) -> int:
    """Every filesystem access right the given ABI knows."""
    rights = _FS_ABI1
    for since, bit in _FS_ADDED.items():
        if abi >= since:
            rights |= bit
    return rights


def apply(ro: list[str], rw: list[str], *, deny_tcp: bool, mode: str, scope: bool = True,
          required_abi: int = 1) -> int:
    """Restrict this process (and its future children) with Landlock.

    ``ro`` paths (and everything beneath) get read and execute, ``rw`` paths every right; all other
    paths get nothing. Paths that do not exist are skipped. With ABI >= 4 and ``deny_tcp``, TCP bind
    and connect are denied everywhere; with ABI >= 6 and ``scope``, connecting to abstract unix
    sockets and sending signals outside this Landlock domain are denied. Sets no_new_privs if it is
    not set yet (landlock_restrict_self(2) requires it without CAP_SYS_ADMIN).

    Args:
        mode: "auto" (return 0 without doing anything when the kernel has no Landlock) or
            "required" (fail when it has none, or an ABI older than ``required_abi``).

    Raises:
        SetupError("landlock", ...): Landlock is required but missing or too old, or a syscall failed.

    Returns:
        The ABI version the ruleset was built for (0: skipped).
    """
    if mode not in ("auto", "required"):
        raise SetupError("landlock", f"unknown landlock mode {mode!r}", _errno.EINVAL)
    try:
        abi = abi_version()
    except OSError as e:
        raise SetupError("landlock", str(e), e.errno or 0, _HINT) from None
    if abi == 0:
        if mode == "auto":
            return 0
        raise SetupError("landlock", "this kernel has no Landlock", _errno.EOPNOTSUPP, _HINT)
    if mode == "required" and abi < required_abi:
        raise SetupError("landlock", f"Landlock ABI {abi} is older than the required ABI {required_abi}",
                         _errno.EOPNOTSUPP, f"run a newer kernel (ABI {required_abi}), or lower the requirement")

    attr = _RulesetAttr(handled_access_fs=fs_rights(abi))
    size = 8
    if abi >= 4 and deny_tcp:
        attr.handled_access_net = NET_BIND_TCP | NET_CONNECT_TCP  # handled, no rule: denied
        size = 16
    if abi >= 6 and scope:
        attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        size = 24

    ruleset = _raw("landlock_create_ruleset", ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise SetupError("landlock", f"landlock_create_ruleset: {os.strerror(-ruleset)}", -ruleset, _HINT)
    try:
        all_fs = attr.handled_access_fs
        for path in ro:
            _add_path(ruleset, path, _FS_RO & all_fs)
        for path in rw:
            # (no device nodes, not even the 0:0 "whiteout" a user namespace may make: one left
            # in a read-write bind is the host's to trip over, and nothing a payload runs needs it)
            _add_path(ruleset, path, all_fs & ~(FS_MAKE_CHAR | FS_MAKE_BLOCK))
        _ensure_no_new_privs()
        ret = _raw("landlock_restrict_self", ctypes.c_int(ruleset), ctypes.c_uint32(0))
        if ret < 0:
            raise SetupError("landlock", f"landlock_restrict_self: {os.strerror(-ret)}", -ret, _HINT)
    finally:
        os.close(ruleset)
    return abi


def _add_path(ruleset: int, path: str, access: int) -> None:
    try:
        # O_PATH: the rule needs only a reference to the inode, not read permission on it.
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except (FileNotFoundError, PermissionError):
        # A path the sandbox cannot even reach gets no rule: skipping only denies more.
        return
    except OSError as e:
        raise SetupError("landlock", f"open {path!r} for a rule: {e.strerror}", e.errno or 0) from None
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            access &= _FS_FILE
        rule = _PathBeneathAttr(allowed_access=access, parent_fd=fd)
        ret = _raw("landlock_add_rule", ctypes.c_int(ruleset), ctypes.c_int(RULE_PATH_BENEATH),
                   ctypes.byref(rule), ctypes.c_uint32(0))
        if ret < 0:
            raise SetupError("landlock", f"landlock_add_rule {path!r}: {os.strerror(-ret)}", -ret)
    finally:
        os.close(fd)


def _ensure_no_new_privs() -> None:
    if _sys.libc.prctl(_PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1:
        return
    if _sys.libc.prctl(_sys.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0:
        err = ctypes.get_errno()
        raise SetupError("landlock", f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}", err)
