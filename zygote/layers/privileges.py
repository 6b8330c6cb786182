"""Privileges, child side: become an unprivileged uid/gid with no capabilities, for good.

Runs after the last step that needs a capability (mounts, lo up, rlimits). On entry the child is
(usually) uid 0 inside its user namespace with every capability *in that namespace*; those
capabilities mean nothing to the host, but inside they allow mount, setuid, CAP_DAC_OVERRIDE on
files the namespace's ids own, and so on. The order below is forced by capabilities(7):

1. supplementary groups, bounding set, securebits: each needs CAP_SETGID / CAP_SETPCAP, so they
   go before setresuid (which is the step that could take capabilities away).
2. setresgid before setresuid: changing gids needs CAP_SETGID, which uid 0 holds.
3. With SECBIT_NO_SETUID_FIXUP set, setresuid does not clear the capability sets (the kernel's
   "root → non-root" fixup is off), so we empty effective/permitted/inheritable explicitly.
4. no_new_privs, so neither a setuid binary nor file capabilities grant anything on execve.
5. Verify with syscalls (not /proc: Landlock, applied earlier, may not allow /proc).
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os

from . import SetupError
from . import _sys

# include/uapi/linux/securebits.h and prctl.h
SECBIT_NOROOT = 1 << 0
SECBIT_NOROOT_LOCKED = 1 << 1
SECBIT_NO_SETUID_FIXUP = 1 << 2
SECBIT_NO_SETUID_FIXUP_LOCKED = 1 << 3
SECBIT_KEEP_CAPS = 1 << 4
SECBIT_KEEP_CAPS_LOCKED = 1 << 5
SECBIT_NO_CAP_AMBIENT_RAISE = 1 << 6
SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED = 1 << 7
# KEEP_CAPS stays off and locked off; everything else on and locked.
SECUREBITS = (SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUID_FIXUP | SECBIT_NO_SETUID_FIXUP_LOCKED
              | SECBIT_KEEP_CAPS_LOCKED | SECBIT_NO_CAP_AMBIENT_RAISE | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED)

# keyctl(2): include/uapi/linux/keyctl.h
KEYCTL_JOIN_SESSION_KEYRING, KEYCTL_SETPERM, KEY_SPEC_SESSION_KEYRING, KEY_POS_VIEW = 1, 5, -3, 0x01000000


def leave_session_keyring() -> None:
    """Zygote side, once at its start: give up the session keyring inherited from whoever
    started the daemon (a login session's, a service's) for a new, empty one whose possessors
    may only see that it exists.

    Every process possesses its session keyring, and possession is what grants access to the
    keys in it: a child whose profile allows keyctl (``unconfined``) could otherwise read and
    change the keys of the daemon's session, and, through a keyring every child shares, leave
    keys for the children of other clients. Raises OSError; ENOSYS (a kernel without keys) and
    EPERM (a container's seccomp policy refusing keyctl to everything in it, children included)
    leave nothing to protect."""
    try:
        _sys.syscall("keyctl", KEYCTL_JOIN_SESSION_KEYRING, None)
        _sys.syscall("keyctl", KEYCTL_SETPERM, KEY_SPEC_SESSION_KEYRING, KEY_POS_VIEW)
    except OSError as e:
        if e.errno == _errno.EDQUOT:
            raise OSError(e.errno, f"{e.strerror}: the daemon's user is at its key quota (a new keyring "
                          "counts; raise kernel.keys.maxkeys / kernel.keys.maxbytes, or run the daemon "
                          "as root)") from None
        if e.errno not in (_errno.ENOSYS, _errno.EPERM):
            raise


def plain_persona() -> None:
    """Zygote side, once at its start: PER_LINUX, whatever persona the daemon was started with
    (``setarch -R``, a debugger: ADDR_NO_RANDOMIZE survives exec). Every child inherits it, the
    default seccomp profile refuses to change it, and answers the query with 0 itself: that
    answer is now true, and programs a child executes get address space randomisation back."""
    if _sys.libc.personality(0) == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"personality(PER_LINUX): {os.strerror(err)}")


PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_GET_SECUREBITS = 27
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_IS_SET = 1
PR_CAP_AMBIENT_CLEAR_ALL = 4

_CAP_V3 = 0x20080522  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_CapData2 = _CapData * 2  # made once in the zygote: creating the array type costs ~0.2 ms per child


# glibc's capget is a plain syscall wrapper (no cross-thread broadcast, unlike its setxid family).
_sys.libc.capget.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
_sys.libc.capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]

_HINT_CAPS = ("the child needs CAP_SETPCAP/CAP_SETUID/CAP_SETGID in its user namespace at this step; "
              "a seccomp profile or an earlier step may have removed them")


def apply(uid: int, gid: int) -> None:
    """Switch to ``uid``/``gid`` (ids inside the child's user namespace) and drop every privilege.

    Empties the effective, permitted, inheritable, bounding and ambient capability sets, clears
    supplementary groups where the namespace allows it, locks the securebits (no root semantics, no
    setuid fixup, no ambient raise) and sets no_new_privs. Irreversible for this process and all its
    descendants.

    Raises:
        SetupError("privileges", ...): a step failed or the final check found anything left.
    """
    if _sys.libc.syscall(_sys.NR["setgroups"], 0, None) < 0:
        # A user namespace whose setgroups file says "deny" (user_namespaces(7); the daemon writes
        # it so the sandbox can never shed a group that a host ACL denies) refuses setgroups with
        # EPERM for its whole life. The groups we keep were fixed by the zygote and are not ours
        # to widen either, so this is not a privilege left behind. (No exception for the usual
        # EPERM: this runs on every spawn.)
        err = ctypes.get_errno()
        if err != _errno.EPERM:
            raise SetupError("privileges", f"setgroups([]): {os.strerror(err)}", err)

    _step("clear the ambient set", _prctl_raw, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    # PR_CAPBSET_DROP needs CAP_SETPCAP, which the capset below removes: bounding set first.
    # Raw prctl calls: python-prctl refuses capability numbers newer than its build, and each of
    # its calls costs more than the syscall (this step runs on every spawn).
    # No PR_CAPBSET_READ first: a new user namespace always starts with a full bounding set, and
    # dropping a capability that is already gone succeeds.
    for cap in _all_caps():
        _step(f"drop capability {cap} from the bounding set", _prctl_raw, PR_CAPBSET_DROP, cap)
    # PR_SET_SECUREBITS needs CAP_SETPCAP too. python-prctl (1.8) only accepts bits 0-5 and we also
    # lock NO_CAP_AMBIENT_RAISE (bits 6-7), so this one is a raw prctl: one call, all bits at once.
    if _prctl_raw(PR_GET_SECUREBITS) != SECUREBITS:
        _step("lock securebits", _prctl_raw, PR_SET_SECUREBITS, SECUREBITS)

    _step(f"setresgid({gid})", _sys.syscall, "setresgid", gid, gid, gid)
    _step(f"setresuid({uid})", _sys.syscall, "setresuid", uid, uid, uid)
    # Lowering capability sets never needs a capability (capset(2)); NO_SETUID_FIXUP kept them.
    _step("empty the capability sets", _capset_empty)
    _step("set no_new_privs", _prctl_raw, PR_SET_NO_NEW_PRIVS, 1)
    _verify(uid, gid)


def _step(what: str, fn, *args) -> None:
    try:
        fn(*args)
    except OSError as e:
        hint = _HINT_CAPS if e.errno == _errno.EPERM else ""
        raise SetupError("privileges", f"{what}: {e.strerror}", e.errno or 0, hint) from None


def _prctl_raw(option: int, arg2: int = 0) -> int:
    ret = _sys.libc.prctl(option, arg2, 0, 0, 0)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _capset_empty() -> None:
    """capset(2) with every set empty: lowering needs no capability (one syscall, no libcap)."""
    hdr = _CapHeader(_CAP_V3, 0)
    data = _CapData2()
    if _sys.libc.capset(ctypes.byref(hdr), data) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _count_caps() -> int:
    cap = 0
    while cap < 64:
        if _sys.libc.prctl(PR_CAPBSET_READ, cap, 0, 0, 0) < 0 and ctypes.get_errno() == _errno.EINVAL:
            break
        cap += 1
    return cap


_N_CAPS: int | None = None


def _all_caps() -> range:
    """0..the kernel's last capability: PR_CAPBSET_READ answers EINVAL past it (no /proc needed).
    Probed once per process image (the zygote's import), so each child skips the ~40 calls."""
    global _N_CAPS
    if _N_CAPS is None:
        _N_CAPS = _count_caps()
    return range(_N_CAPS)


_all_caps()  # in the zygote, at import: the kernel's number of capabilities does not change


def _verify(uid: int, gid: int) -> None:
    left = []
    if os.getresuid() != (uid, uid, uid):
        left.append(f"uids {os.getresuid()}")
    if os.getresgid() != (gid, gid, gid):
        left.append(f"gids {os.getresgid()}")
    hdr = _CapHeader(_CAP_V3, 0)
    data = _CapData2()
    if _sys.libc.capget(ctypes.byref(hdr), data) < 0:
        left.append(f"capget: {os.strerror(ctypes.get_errno())}")
    elif any(d.effective or d.permitted or d.inheritable for d in data):
        left.append("capabilities " + ", ".join(
            f"{n}={(getattr(data[1], n) << 32) | getattr(data[0], n):#x}"
            for n in ("effective", "permitted", "inheritable")))
    bounding = [c for c in _all_caps() if _sys.libc.prctl(PR_CAPBSET_READ, c, 0, 0, 0) != 0]
    if bounding:
        left.append(f"bounding set {bounding}")
    # The ambient set is not read back cap by cap: the kernel keeps it a subset of permitted AND
    # inheritable (capabilities(7)), both checked empty above, so it is empty too.
    bits = _sys.libc.prctl(PR_GET_SECUREBITS, 0, 0, 0, 0)
    if bits != SECUREBITS:
        left.append(f"securebits {bits:#x} (want {SECUREBITS:#x})")
    if _sys.libc.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1:
        left.append("no_new_privs not set")
    if left:
        raise SetupError("privileges", "privileges left after the drop: " + "; ".join(left), _errno.EPERM)
