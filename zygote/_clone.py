"""One raw clone3() from a single-threaded CPython process, done the way os.fork() does it.

Why not os.fork(): fork cannot create namespaces, and fork + unshare + a second fork costs a second
copy of the zygote's page tables (≈5 ms for a pandas zygote). One clone3 with every namespace flag
and CLONE_PARENT gives the daemon a child that is already PID 1 of its own pid namespace.

Two things os.fork does and a bare syscall would not:
* CPython's fork hooks (PyOS_BeforeFork / PyOS_AfterFork_Child / _Parent): import lock, thread
  state, os.register_at_fork callbacks (random reseeds itself there). We call them via
  ctypes.pythonapi, which keeps the GIL held across the call exactly as os.fork does.
* glibc caches the thread id in its thread descriptor (struct pthread, field ``tid``); raise(),
  abort() and pthread_kill() use it. CLONE_CHILD_SETTID makes the kernel store the child's new tid
  (1, in its pid namespace) there, as glibc's own fork does. The field's offset is found once by
  looking for our tid in the descriptor, and checked to be unique.

Only safe in a strictly single-threaded process: the zygote checks /proc/self/task before cloning.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import struct

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_PARENT = 0x00008000
CLONE_CHILD_SETTID = 0x01000000
CLONE_INTO_CGROUP = 0x200000000

ALL_NAMESPACES = (
    CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET | CLONE_NEWCGROUP
)

_SYS_CLONE3 = 435  # same number on every architecture that has it
PR_GET_TID_ADDRESS = 40
_SYS_GETTID = {"x86_64": 186, "aarch64": 178}.get(platform.machine())

# PyDLL: the GIL stays held during the call, as os.fork holds it across fork().
_libc = ctypes.PyDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.pthread_self.restype = ctypes.c_void_p
_api = ctypes.pythonapi


class _CloneArgs(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "flags pidfd child_tid parent_tid exit_signal stack stack_size tls set_tid set_tid_size cgroup"
        ).split()
    ]


def _gettid() -> int:
    return os.gettid() if hasattr(os, "gettid") else _libc.syscall(_SYS_GETTID)


def _holding_tid(me: int, offsets) -> list[int]:
    """The offsets in the thread's descriptor at ``me`` that hold this thread's tid."""
    tid = _gettid()
    raw = ctypes.string_at(me, 4096)
    return [off for off in offsets if struct.unpack_from("i", raw, off)[0] == tid]


def _tid_field_address() -> int:
    """Address of glibc's cached tid of the calling (only) thread.

    The 4 KiB of the thread's descriptor are searched for its tid. A small tid (a process early
    in a pid namespace, or after the host's pids wrapped) also matches other fields (PID 1 of a
    namespace: five of them, a TLS key's sequence number among them): then a child of glibc's
    own fork(), which sets its cached tid to the child's new tid and leaves the rest as they
    were, says which of them changed. (Not os.fork: Python's after-fork work in the child makes
    TLS keys anew, whose numbers may then match the child's tid too.)
    """
    me = _libc.pthread_self()
    # Where the kernel clears the tid at exit (set_tid_address): glibc registers its cached tid
    # there when the process starts. Taken when it checks out; else the search below.
    where = ctypes.c_void_p()
    if _libc.prctl(PR_GET_TID_ADDRESS, ctypes.byref(where), 0, 0, 0) == 0 and where.value and \
            0 <= where.value - me < 4096 and _holding_tid(me, [where.value - me]):
        return where.value
    hits = _holding_tid(me, range(0, 4096 - 3, 4))
    if len(hits) > 1:
        hits = _changed_in_a_fork(me, hits)
    if len(hits) != 1:
        raise OSError(f"cannot locate glibc's cached tid (candidates at {hits}); refusing raw clone")
    return me + hits[0]


def _changed_in_a_fork(me: int, hits: list[int]) -> list[int]:
    r, w = os.pipe()
    # No signal runs a Python handler in the child (a Ctrl-C there would unwind a copy of us).
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        pid = _libc.fork()  # (PyDLL: the GIL stays ours, as in os.fork; this is the only thread)
        if pid < 0:
            raise OSError(ctypes.get_errno(), "fork (to find glibc's cached tid)")
        if pid == 0:  # (the same address: the child's descriptor is a copy of ours)
            try:
                os.write(w, " ".join(map(str, _holding_tid(me, hits))).encode())
            finally:
                os._exit(0)
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        os.close(w)
        w = -1
        out = b""
        while chunk := os.read(r, 4096):
            out += chunk
        os.waitpid(pid, 0)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        os.close(r)
        if w >= 0:
            os.close(w)
    return [int(x) for x in out.split()]


class Cloner:
    """Creates children with clone3; build one per process, after imports, before the loop."""

    def __init__(self) -> None:
        self._args = _CloneArgs()
        self._size = ctypes.sizeof(self._args)
        self._args_ref = ctypes.byref(self._args)
        self._tid_addr = _tid_field_address()
        self._pid = os.getpid()

    def clone(self, flags: int, cgroup_fd: int = -1, owner: int = 0) -> int:
        """clone3(flags | CLONE_CHILD_SETTID); returns 0 in the child, the child's pid in the parent.

        ``owner`` (a root zygote): the host uid the clone's new user namespace belongs to, which
        the kernel charges its per-user budgets to (see layers/userns.py). It is this process's
        effective uid during the call only; the file-system uid stays 0, so the child still opens
        its bind sources as before, and the real and saved uids stay 0 to come back with. The
        child starts with it as its effective uid, until it takes its mapped ids.

        Raises:
            OSError: with the kernel's errno when clone3 (or taking ``owner`` as euid) fails.
        """
        a = self._args
        a.flags = flags | CLONE_CHILD_SETTID | (CLONE_INTO_CGROUP if cgroup_fd >= 0 else 0)
        a.child_tid = self._tid_addr
        # With CLONE_PARENT the kernel requires exit_signal 0 and uses the zygote's own (SIGCHLD).
        a.exit_signal = 0 if flags & CLONE_PARENT else 17
        a.cgroup = cgroup_fd if cgroup_fd >= 0 else 0
        if owner:
            os.setresuid(-1, owner, -1)
            _libc.setfsuid(0)  # (allowed without a capability: 0 is the real uid)
        try:
            _api.PyOS_BeforeFork()
            pid = _libc.syscall(_SYS_CLONE3, self._args_ref, self._size)
            if pid == 0:
                _api.PyOS_AfterFork_Child()
                return 0
            err = ctypes.get_errno()
            _api.PyOS_AfterFork_Parent()
        finally:
            if owner and os.getpid() == self._pid:  # (the child keeps it)
                os.setresuid(-1, 0, -1)
        if pid < 0:
            raise OSError(err, f"clone3: {os.strerror(err)}")
        return pid


def thread_count() -> int:
    """Number of threads of this process (1 is the only safe value for Cloner.clone)."""
    return len(os.listdir("/proc/self/task"))
