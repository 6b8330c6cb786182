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

A lean clone (``lean_hooks``) leaves CPython's fork hooks out where, in such a process, they have
nothing to do: a clone taken from the zygote's own loop, with one thread and no Python-level
signal handler, finds every lock free, every thread record but its own gone, no signal pending for
Python, and its thread ident unchanged (the same descriptor). What the hooks put right after a
fork in a threaded process is then already right, and running them costs each child ~250
copy-on-write faults and ~0.7 ms of CPU (a third of the faults a child takes before its payload).
The hooks that do something in any process (random reseeding itself, asyncio and trio dropping
their per-process state, any a preload registered) still run in the child, in CPython's order.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import struct
import sys
from typing import Callable

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


# ---- CPython's fork hooks: which a clone of a single-threaded process may leave out ---------------

_LEAN_PYTHONS = ((3, 11), (3, 12), (3, 13))  # PyOS_AfterFork_Child read for each: see the module's doc
_HOOK_KINDS = ("before", "after_in_child", "after_in_parent")
# Modules that register fork hooks when imported. Imported before watch_fork_hooks started, their
# hooks were registered unseen: the clone cannot be lean then.
_HOOKING_MODULES = ("threading", "random", "logging", "concurrent.futures.thread", "asyncio.events")
# Loaded at every interpreter's start by site (a setuptools .pth, virtualenv's, editable
# installs): no hooks. Also the .pth lines that import them (any other executable line may
# register one without leaving a module behind).
_STARTUP_EXTRAS = ("__main__", "_distutils_hack", "_virtualenv")
_KNOWN_PTH_IMPORTS = ("import _distutils_hack", "import _virtualenv", "import __editable__",
                      "import os; var = 'SETUPTOOLS_USE_DISTUTILS';")  # (setuptools' distutils-precedence.pth)
_hooks: list[tuple[str, Callable]] | None = None  # (kind, hook) registered since watch_fork_hooks
_unseen: list[str] = []  # why hooks may have been registered before we looked


def watch_fork_hooks() -> None:
    """Record every ``os.register_at_fork`` from now on: the zygote's first step, before any
    import that may register one. ``lean_hooks`` decides from this record."""
    global _hooks
    if _hooks is not None:
        return
    _hooks = []
    for name in sys.modules:
        top = name.partition(".")[0]
        known = (top in sys.stdlib_module_names or top == "zygote" or name in _STARTUP_EXTRAS
                 or name.startswith("__editable__"))
        if name in _HOOKING_MODULES or not known:
            _unseen.append(f"{name} was imported before the zygote watched for fork hooks")
    _unseen.extend(_executable_pth_lines())
    real = os.register_at_fork
    record = _hooks

    def register_at_fork(**hooks: Callable) -> None:
        real(**hooks)  # (the checks are its own: nothing is recorded for a call it refused)
        record.extend((kind, hooks[kind]) for kind in _HOOK_KINDS if hooks.get(kind) is not None)

    register_at_fork.__doc__ = real.__doc__
    os.register_at_fork = register_at_fork
    import posix  # (the same function under its own module's name: posix.register_at_fork)
    posix.register_at_fork = register_at_fork


def _executable_pth_lines() -> list[str]:
    """The .pth lines site ran at this interpreter's start (those beginning with "import") that
    are not known to register no fork hook: such a line may have registered one before we
    looked, leaving no module behind to tell."""
    out = []
    try:
        import site
        dirs = [*site.getsitepackages(), site.getusersitepackages()] if hasattr(site, "getsitepackages") else []
    except Exception:  # noqa: BLE001 - (a site without these) nothing ran from .pth files
        return out
    for d in dict.fromkeys(dirs):
        try:
            names = sorted(n for n in os.listdir(d) if n.endswith(".pth"))
        except OSError:
            continue
        for name in names:
            try:
                with open(os.path.join(d, name), encoding="utf-8", errors="replace") as f:
                    lines = f.read().splitlines()
            except OSError:
                continue
            for line in lines:
                if line.startswith(("import ", "import\t")) and not line.startswith(_KNOWN_PTH_IMPORTS):
                    out.append(f"{os.path.join(d, name)} runs code at every start ({line[:60]!r})")
    return out


def _only_fixes_locks(fn: Callable) -> bool:
    """Whether ``fn`` is a standard library hook that only takes, frees or renews locks and
    thread records (threading, logging, concurrent.futures): nothing to do in a clone of a
    single-threaded process that held none of them."""
    threading = sys.modules.get("threading")
    if threading is not None and fn is getattr(threading, "_after_fork", None):
        return True
    logging = sys.modules.get("logging")
    if logging is not None and any(fn is getattr(logging, name, None) for name in (
            "_acquireLock", "_releaseLock", "_prepareFork", "_afterFork", "_after_at_fork_child_reinit_locks")):
        return True
    futures = sys.modules.get("concurrent.futures.thread")
    lock = getattr(futures, "_global_shutdown_lock", None) if futures is not None else None
    return lock is not None and getattr(fn, "__self__", None) is lock


def lean_hooks() -> tuple[list[Callable] | None, str]:
    """The fork hooks a lean clone runs in the child (None: a lean clone is not safe here), and
    why not. Call after the preloads, in the one thread, once nothing more will be imported.

    Lean only where every condition of the module's doc is known to hold: a CPython whose fork
    work was read (with the GIL), every hook seen being registered, the before/after-in-parent
    hooks all lock-only ones (an unknown pair may hand state across the fork), no Python-level
    signal handler (a signal caught just before the clone would be handled again in the child:
    PyOS_AfterFork_Child clears that; the zygote sets SIGINT's to the default action first)."""
    if sys.implementation.name != "cpython" or sys.version_info[:2] not in _LEAN_PYTHONS:
        return None, f"{sys.implementation.name} {sys.version_info[0]}.{sys.version_info[1]}: not one the lean clone was checked against"
    import sysconfig
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        return None, "a free-threaded build"
    if _hooks is None:
        return None, "fork hooks were not watched from the start"
    if _unseen:
        return None, _unseen[0]
    for kind, fn in _hooks:
        if kind != "after_in_child" and not _only_fixes_locks(fn):
            return None, f"a fork hook {kind} ({getattr(fn, '__qualname__', fn)!r}) the lean clone does not know"
    for sig in signal.valid_signals():
        handler = signal.getsignal(sig)
        if handler not in (signal.SIG_DFL, signal.SIG_IGN, None):
            return None, f"a Python handler for signal {sig}"
    return [fn for kind, fn in _hooks if kind == "after_in_child" and not _only_fixes_locks(fn)], ""


_MT_KEY_BYTES = 624 * 4  # numpy's mt19937_state: uint32_t key[624], then int pos
_MT_ALL_USED = (624).to_bytes(4, sys.byteorder)  # pos 624: the next draw regenerates from the key


def _numpy_global_state() -> memoryview | None:
    """numpy's global generator (np.random.rand, shuffle, ...) is seeded once, at its import, and
    no fork hook reseeds it: every child of a zygote that imported it would draw the same numbers
    (another client's children's among them). In the zygote: that generator's MT19937 state, as
    writable memory each clone fills with fresh entropy (``_reseed_numpy``: no ctypes call in the
    child, whose objects would cost it ~50 copy-on-write faults). Its cached normal deviate, if
    any, is dropped here once (the zygote draws nothing after its preloads). None where
    numpy.random is not loaded or its global generator is not MT19937 (a clone then calls
    numpy.random.seed(): ~0.6 ms more)."""
    nprandom = sys.modules.get("numpy.random")
    if nprandom is None:
        return None
    try:
        legacy = nprandom.mtrand._rand
        full = legacy.get_state(legacy=False)
        if full.get("has_gauss"):  # (whatever the generator: a reseed keeps it otherwise)
            legacy.set_state({**full, "has_gauss": 0, "gauss": 0.0})
        if full.get("bit_generator") != "MT19937":
            return None
        raw = (ctypes.c_char * (_MT_KEY_BYTES + 4)).from_address(int(legacy._bit_generator.ctypes.state_address))
        view = memoryview(raw).cast("B")
        if bytes(view[:_MT_KEY_BYTES]) != full["state"]["key"].tobytes():
            return None  # (not the layout we know)
        return view
    except Exception:  # noqa: BLE001 - (a numpy without these) seed() in each clone
        return None


def _fresh_secrets(state: memoryview | None) -> None:
    """In each clone: what every process of the zygote would otherwise share with every other
    child (other clients' included): numpy's global generator (see _numpy_global_state), and
    multiprocessing's authkey (made once per process tree, at its import: a child's Manager or
    Listener would take any sibling's connection)."""
    _reseed_numpy(state)
    mp = sys.modules.get("multiprocessing.process")
    current = getattr(mp, "current_process", None)
    if current is not None:
        current().authkey = os.urandom(32)


def _reseed_numpy(state: memoryview | None) -> None:
    if state is not None:
        state[:_MT_KEY_BYTES] = os.urandom(_MT_KEY_BYTES)
        state[_MT_KEY_BYTES:] = _MT_ALL_USED
        return
    nprandom = sys.modules.get("numpy.random")
    seed = getattr(nprandom, "seed", None)
    if seed is not None:
        seed()


class Cloner:
    """Creates children with clone3; build one per process, after imports, before the loop.
    ``lean``: the fork hooks to run in the child instead of CPython's fork work (lean_hooks), or
    None for all of it (PyOS_BeforeFork and friends, as os.fork)."""

    def __init__(self, lean: list[Callable] | None = None) -> None:
        self._args = _CloneArgs()
        self._size = ctypes.sizeof(self._args)
        self._args_ref = ctypes.byref(self._args)
        self._tid_addr = _tid_field_address()
        self._pid = os.getpid()
        self.lean = lean
        self._hooks_seen = len(_hooks) if _hooks is not None else 0
        self._numpy_state = _numpy_global_state()

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
        lean = self.lean
        if lean is not None and _hooks is not None and len(_hooks) != self._hooks_seen:
            lean = self.lean = None  # a hook registered after lean_hooks decided: all of it from now on
        try:
            if lean is None:
                _api.PyOS_BeforeFork()
            pid = _libc.syscall(_SYS_CLONE3, self._args_ref, self._size)
            if pid == 0:
                if lean is None:
                    _api.PyOS_AfterFork_Child()
                else:
                    for hook in lean:  # (as CPython does: a hook that fails is reported, the rest run)
                        try:
                            hook()
                        except BaseException as e:  # noqa: BLE001 - never unwind into the zygote's loop
                            try:
                                print(f"Exception ignored in fork hook {hook!r}: {e!r}", file=sys.stderr)
                            except BaseException:  # noqa: BLE001
                                pass
                try:
                    _fresh_secrets(self._numpy_state)
                except BaseException:  # noqa: BLE001 - never run on numbers other children drew too
                    os._exit(125)
                return 0
            err = ctypes.get_errno()
            if lean is None:
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
