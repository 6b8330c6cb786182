"""The child: everything that runs between clone() and the payload, in one visible order.

Runs in a fresh clone of the zygote, which already imported this module (no imports happen here
before the payload's own). The clone is PID 1 of new user, pid, mount, ipc, uts, net and cgroup
namespaces. Nothing returns from ``run``: every path ends in os._exit. By default the clone
becomes the payload itself once confined; with ``plan.reaper`` it forks the payload (PID 2) and
stays as its reaper (``_reaper``).

fds on entry (moved here first thing): 0/1/2 the child's stdio, 3 the control pipe (ChildPlan +
payload, from the daemon), 4 the status pipe (Ready/Failed, and a reaper's ExitReport, to the
daemon; the payload process closes it before any payload code), 5 the result pipe (the payload's
return value or exception, to the daemon; a reaper closes its copy).
"""

from __future__ import annotations

import contextlib
import errno as _errno
import fcntl as _fcntl
import io
import json
import os
import pickle
import signal
import sys
import time
import traceback

import msgspec
from zygote_client._protocol import MAX_FRAME

from ._childproto import (JOB_FIELDS, LEN, RESULT_HEADER, ExitReport, Failed, Job, OutEnd, Ready, Started, frame,
                          job_decoder, job_problem, plan_decoder)
from .layers import SetupError, landlock, mounts, netns, privileges, rlimits, seccomp, userns, uts, workspace
from .layers import _sys

CTL_FD = 3
STATUS_FD = 4
RESULT_FD = 5
EXIT_SETUP_FAILED = 125
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
              signal.SIGUSR2, signal.SIGCONT, signal.SIGWINCH, signal.SIGALRM, signal.SIGTSTP,
              signal.SIGTTIN, signal.SIGTTOU)


def run(fds: list[int]) -> None:
    """Entry point in the clone. ``fds``: stdin, stdout, stderr, control, status, result, then the
    idmapped trees of its binds, if any (any numbers; they become 0, 1, ... in that order)."""
    try:
        # A session of its own, first: the clone is in the daemon's session and process group.
        # There it could read the terminal the daemon was started from (its /dev/tty: keys typed
        # there, passwords included), and kill(0, sig) would reach every other child in the
        # group (same host uid). A clone is never a group leader, so setsid cannot fail here.
        os.setsid()
        _arrange_fds(fds)
        plan = _read_plan()
        if plan is None:
            os._exit(EXIT_SETUP_FAILED)  # EOF without "go": abort, never run
        try:
            payload_pid = confine(plan)
        except SetupError as e:
            _report(Failed(e.step, e.errno, e.message, e.hint))
            os._exit(EXIT_SETUP_FAILED)
        _reaper(payload_pid, plan)
    except BaseException:  # never return into the zygote's loop
        try:
            _report(Failed("internal", 0, traceback.format_exc(limit=5)))
        finally:
            os._exit(EXIT_SETUP_FAILED)


def confine(plan) -> int:
    """The confinement pipeline. Order matters; each line says why it sits where it does."""
    global _payload_pid
    _inject(plan, "mounts")
    if plan.test_pause_sources:  # (--test-hooks: a test changes a source meanwhile)
        _sys.wait_for_path(plan.test_pause_sources)
    sources = mounts.open_sources(plan)      # before userns: walk to bind sources as the daemon's uid
    _inject(plan, "userns")
    userns.apply(plan.nested_limit_required)  # then take the mapped ids; nothing runs unmapped after
    userns.bound_sysv_ipc(min(plan.tmpfs_bytes, mounts.SHM_MAX))  # (our IPC namespace, while we hold caps)
    if plan.cgroupns:                        # the daemon attached us to our cgroup before "go":
        _cgroupns()                          # make it the root of what we can see
    mounts.apply(plan, sources)              # needs CAP_SYS_ADMIN in the userns (dropped below)
    _inject(plan, "workspace")
    workspace.apply(plan)                    # into its own tmpfs, chown to the sandbox uid: before the drop
    _inject(plan, "netns")
    if not netns_ready:                      # lo up needs CAP_NET_ADMIN, dropped below (a netns
        netns.apply()                        # the zygote made ahead has lo up, and is not ours)
    _inject(plan, "uts")
    uts.apply(plan.hostname, plan.process_name)  # sethostname needs CAP_SYS_ADMIN; comm needs /proc
    _inject(plan, "landlock")
    abi = landlock.apply(plan.landlock_ro, plan.landlock_rw, deny_tcp=plan.landlock_net,
                         mode=plan.landlock, required_abi=plan.landlock_abi) if plan.landlock != "off" else 0  # opens rule paths: before the drop
    _inject(plan, "rlimits")
    rlimits.apply(plan.rlimits)              # before the drop (raising hard limits needs a cap),
                                             # after the steps that open fds (a tight open_files)
    _inject(plan, "privileges")
    if plan.drop_privileges:
        privileges.apply(plan.uid, plan.gid)  # the last privileged step is behind us
    _set_pdeathsig()                         # after the uid change, which clears it (prctl(2))
    _inject(plan, "payload")
    if not plan.reaper:                      # the payload is PID 1 itself: no second process
        _payload_process(plan, abi)          # (see _payload_process; never returns)
    for sig in _FORWARDED:                   # PID 1's handlers, before the fork: PID 1 then touches
        signal.signal(sig, _forward)         # fewer pages of its own (less private memory per child)
    # PID 1 keeps the status pipe (the exit report, the export) from a payload of the same uid:
    # it must not be dumpable, which the uid change left to fs.suid_dumpable (with 1 there, the
    # payload could open PID 1's fds). Set before the fork; the payload gets its own value back.
    dumpable = _sys.libc.prctl(_sys.PR_GET_DUMPABLE, 0, 0, 0, 0)
    _sys.libc.prctl(_sys.PR_SET_DUMPABLE, 0, 0, 0, 0)
    try:
        pid = os.fork()                      # the payload is PID 2 under a tiny PID-1 reaper
    except OSError as e:
        raise SetupError("fork", f"cannot start the payload process: {e.strerror}", e.errno or 0) from None
    if pid == 0 and dumpable == 1:  # (a rootless daemon reads its /proc/PID/syscall: see _signal)
        _sys.libc.prctl(_sys.PR_SET_DUMPABLE, 1, 0, 0, 0)
    if pid:
        _payload_pid = pid
    # seccomp last, in both processes, after the fork (the strict profile has no fork at all):
    # the payload process reports Ready itself, only once its filter is loaded.
    if pid == 0:
        # At once, not when the payload starts: PID 1's handler (inherited here) would swallow a
        # signal PID 1 forwards meanwhile (_payload_pid is 0 in this process): a terminate()
        # right after Ready was lost, and Ctrl-Z's SIGTSTP went as itself (the payload "caught" it).
        for sig in _FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        _payload_process(plan, abi)
    if plan.deferred:
        os.close(CTL_FD)                     # the Job is the payload process's alone
    if plan.seccomp_bpf:
        try:
            seccomp.apply(plan.seccomp_bpf)
        except SetupError:
            os.kill(pid, signal.SIGKILL)
            raise
    return pid


def _payload_process(plan, abi: int) -> None:
    """The payload process (PID 2 under a reaper, or PID 1 itself): seccomp, Ready, the payload.

    Without a reaper, PID 1 is the payload. Its exit status is the daemon's own wait status of
    the clone (nothing to forge), the kernel still kills whatever it leaves in the namespace when
    it ends, and the daemon delivers signals with subprocess semantics (PID 1 would ignore a
    signal it has no handler for; see Daemon._kill). Orphans it adopts stay zombies until it ends.
    """
    try:
        _inject(plan, "seccomp")
        if plan.seccomp_bpf:
            seccomp.apply(plan.seccomp_bpf)
    except SetupError as e:
        _report(Failed(e.step, e.errno, e.message, e.hint))
        os._exit(EXIT_SETUP_FAILED)
    _report(Ready(landlock_abi=abi))
    if plan.deferred:                        # a reserve child: confined, now wait for a request
        _prepare_payload_process(reset_signals=not plan.reaper and not _zygote_signals_fresh, keep_status=True)
        if plan.prewarm:
            _prewarm(plan)
        _payload(_await_job(plan), prepared=True)
    _payload(plan)                           # never returns


def _prewarm(plan) -> None:
    """Take, before the request arrives, the copy-on-write faults every payload start would take,
    by running the request path itself on a harmless Job of our own: its decoding, the pool's
    environment, unpickling a closure, printing through a text stream like the payload's stdout
    (into a pipe of its own), encoding a result. The pages become this process's own now instead
    of on the request's path; a request with the pool's environment then finds it in place."""
    _set_environ(plan.env)
    try:
        r, w = os.pipe()  # may fail (a pool's open_files limit): then this child just skips it
    except OSError:
        return
    try:
        body = msgspec.msgpack.encode(Job(kind="callable", env=plan.env,
                                          payload=_prewarm_payload or _prewarm_callable()))
        fake = _apply_job(plan, job_decoder.decode(body))
        func, args, kwargs = _load(fake)
        out = io.TextIOWrapper(io.FileIO(w, "wb", closefd=False), encoding="utf-8",
                               errors="backslashreplace", write_through=True, line_buffering=True)
        print(repr(func(*args, **kwargs)), end="", file=out, flush=True)
        _encode_result(func(*args, **kwargs), False)
    except Exception:
        pass
    finally:
        os.close(r)
        os.close(w)


def _prewarm_callable() -> bytes:
    """The prewarm's payload: a closure pickled by value, as a client sends one. Pickled once in
    the zygote (zygote_ready): pickling it in each reserve child cost ≈ 0.5 ms of CPU and 150
    copy-on-write faults of pages no request needs (a payload is unpickled, not pickled)."""
    import cloudpickle
    x = 1
    return cloudpickle.dumps((lambda: x / 2, (), {}))


_prewarm_payload: bytes | None = None


def _await_job(plan):
    """In a confined reserve child's payload process: read the one Job (from the daemon, or from
    the client that leased this child); EOF means it was discarded (shutdown, pool reload, a
    lease given up), so exit without running anything. The Job is checked before anything of it
    runs, and the daemon told it started (its kind and timeout: the deadline starts now)."""
    try:
        body = _read_frame(CTL_FD, MAX_FRAME)
    except (EOFError, ValueError) as e:
        _refuse_job(f"the Job: {e}")
    at = time.monotonic()  # (the Job's deadline runs from here: Started carries it)
    if body is None:  # nothing at all: discarded
        os._exit(0)
    os.close(CTL_FD)
    try:
        job = job_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        _refuse_job(f"not a Job: {e}")
    if job.kind == "child_main":  # the pool's (in the plan), whatever target the Job names
        job = msgspec.structs.replace(job, target=plan.target)
    problem = job_problem(job.kind, job.target, job.argv, job.timeout)
    if job.kind == "exec" and not plan.reaper:  # see daemon._needs_reaper: the daemon clones those
        problem = "an exec'd program gets a reaper in front of it, and this child has none"
    if problem:
        _refuse_job(problem)
    _report(Started(kind=job.kind, timeout=job.timeout, at=at))
    os.close(STATUS_FD)  # before anything of the Job runs
    return _apply_job(plan, job)


def _refuse_job(why: str) -> None:
    os.write(2, f"zygote: refused the request: {why}\n".encode())
    os._exit(EXIT_SETUP_FAILED)


def _apply_job(plan, job):
    if job.process_name:
        try:  # cosmetic, never worth failing for
            uts.set_process_name(job.process_name)
        except SetupError:
            pass
    fields = {k: getattr(job, k) for k in JOB_FIELDS}
    if job.env is None:  # the pool's, which the plan has
        del fields["env"]
    return msgspec.structs.replace(plan, deferred=False, **fields)


def _cgroupns() -> None:
    try:
        _sys.unshare(0x02000000)  # CLONE_NEWCGROUP
    except OSError as e:
        raise SetupError("cgroup", f"unshare(CLONE_NEWCGROUP): {e.strerror}", e.errno or 0) from None


def _inject(plan, step: str) -> None:
    # Test hook: the daemon only sets test_fail_step when started with --test-hooks.
    if plan.test_fail_step == step:
        raise SetupError(step, "failure injected by the test suite", _errno.ECANCELED)


def _arrange_fds(fds: list[int]) -> None:
    # Move them above their places first (the lowest free numbers: a low open-files limit is
    # fine) so dup2 onto 0..5 (and the idmapped trees onto TREE_FD and up) clobbers none of them.
    high = [_fcntl.fcntl(fd, _fcntl.F_DUPFD_CLOEXEC, len(fds)) for fd in fds]
    for i, fd in enumerate(high):
        os.dup2(fd, i, inheritable=(i < 3))  # control/status/result and the trees stay close-on-exec
    # Every other fd of the zygote (its socket to the daemon, anything a preload opened) goes.
    os.closerange(len(fds), 1 << 20)


def _read_plan():
    try:
        body = _read_frame(CTL_FD)
    except EOFError:  # the daemon went away mid-frame: as with no "go" at all
        body = None
    if body is None:
        return None
    plan = plan_decoder.decode(body)
    if not plan.deferred:
        os.close(CTL_FD)
    return plan


def _read_frame(fd: int, limit: int | None = None) -> bytes | None:
    """One frame's body; None at an EOF before it. Raises EOFError at an EOF inside it and
    ValueError when its length is over ``limit``."""
    hdr = _read_exact(fd, LEN.size)
    if hdr is None:
        return None
    (n,) = LEN.unpack(hdr)
    if limit is not None and n > limit:
        raise ValueError(f"a frame of {n} bytes (at most {limit})")
    body = _read_exact(fd, n)
    if body is None:
        raise EOFError("the frame ended early")
    return body


def _read_exact(fd: int, n: int) -> bytes | None:
    """``n`` bytes, or None at an EOF first."""
    chunks = []
    while n:
        b = os.read(fd, min(n, 1 << 20))
        if not b:
            return None
        chunks.append(b)
        n -= len(b)
    return b"".join(chunks)


def _report(msg) -> None:
    data = frame(msg)
    while data:
        data = data[os.write(STATUS_FD, data):]


def _set_pdeathsig() -> None:
    _sys.libc.prctl(_sys.PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


# ---- PID 1 -------------------------------------------------------------------------------------

_payload_pid = 0  # in PID 1, once the payload process exists


def _forward(signum, _frame) -> None:
    """PID 1's handler: pass the signal on to the payload (PID 2 resets its own to the defaults
    right after the fork; _payload_pid is 0 there, and nothing is sent: kill(0) would mean the
    process group)."""
    if _payload_pid > 0:
        if signum in _STOPS and not _catches(_payload_pid, signum):
            # The payload's process group is orphaned (its only outside parent, PID 1's, is in
            # another session), and there the kernel drops a SIGTSTP, SIGTTIN or SIGTTOU with
            # its default action: stop the payload as that action would (Ctrl-Z via zygote run).
            signum = signal.SIGSTOP
        try:
            os.kill(_payload_pid, signum)
        except ProcessLookupError:
            pass


_STOPS = frozenset({signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` catches, ignores or blocks ``signum``; unreadable (gone): yes, the
    signal goes as it is."""
    state = _sys.signal_state(pid)
    return state is None or bool(state[0] & 1 << (signum - 1))


def _reaper(payload_pid: int, plan) -> None:
    """Forward signals to the payload, reap every orphan, report the payload's status, exit.

    PID 1 of a pid namespace ignores signals it has no handler for (even from the daemon), so a
    payload that is PID 2 gets subprocess-like signal semantics. When PID 1 exits, the kernel
    SIGKILLs everything left in the namespace: nothing the payload started outlives it. With an
    export, PID 1 kills the rest itself first, so nothing changes the directory while it is packed.
    """
    for fd in (0, 1, 2, RESULT_FD):  # the result pipe is the payload's alone
        os.close(fd)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(EXIT_SETUP_FAILED)
        if pid == payload_pid:
            if plan.export_path is not None:
                _export(plan)
            _report(ExitReport(status))
            os._exit(0)


def _export(plan) -> None:
    for sig in _FORWARDED:
        signal.signal(sig, signal.SIG_IGN)
    try:
        os.kill(-1, signal.SIGKILL)  # every process of the namespace but PID 1 (kill(2))
    except ProcessLookupError:
        pass
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    try:
        workspace.pack(plan, _report)
    except Exception as e:  # PID 1 must still report the payload's status
        _report(OutEnd(f"packing the export failed: {type(e).__name__}"))


# ---- the payload process (PID 1 itself, or PID 2 under a reaper) --------------------------------

# Set in the zygote before each clone: the clone was given a network namespace the zygote made
# ahead of time, lo already up (see layers/netns.py: Ahead), instead of CLONE_NEWNET.
netns_ready = False
# Set in the zygote by zygote_ready(), so every clone inherits them:
_environ_is: dict[str, str] | None = None  # what os.environ holds, as we last made it (None: unknown)
_zygote_signals_fresh = False  # its handlers of _FORWARDED are a fresh interpreter's
_zygote_mp_children: frozenset = frozenset()  # multiprocessing Processes a preload started (not a payload's)


def zygote_ready(unset: list[str]) -> None:
    """In the zygote, after its preloads and before its first clone: drop the environment
    variables that only capped the preloads' thread pools (``unset``), then note what a clone
    inherits, so a payload process that already has the right environment and signal handlers
    does not set them again (each setting costs copy-on-write page faults in every child)."""
    global _environ_is, _zygote_signals_fresh, _prewarm_payload, _zygote_mp_children
    for name in unset:
        os.environ.pop(name, None)
    _environ_is = dict(os.environ)
    mp = sys.modules.get("multiprocessing.process")
    _zygote_mp_children = frozenset(getattr(mp, "_children", None) or ())
    try:
        _prewarm_payload = _prewarm_callable()
    except Exception:  # noqa: BLE001 - (a preload that broke pickling) each reserve child tries again in its prewarm
        _prewarm_payload = None
    # The kernel's view, not Python's: a preload may have installed a handler from C
    # (faulthandler.register, an extension's sigaction) that signal.getsignal does not show.
    _zygote_signals_fresh = all(_sys.handler_is_default(sig) for sig in _FORWARDED if sig != signal.SIGINT)


def _prepare_payload_process(reset_signals: bool = True, keep_status: bool = False) -> None:
    """What every payload process does first, whatever the request: default signals, no status
    pipe (the payload must never write a status message), Python's stdio on fds 0/1/2.
    ``reset_signals`` False: the handlers are already the defaults (the zygote's, or reset by a
    PID 2 right after its fork: see confine).
    ``keep_status``: a reserve child closes it itself once it reported its Job Started."""
    if reset_signals:
        for sig in _FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # always: Ctrl-C is KeyboardInterrupt
    if not keep_status:
        os.close(STATUS_FD)
    _reopen_stdio()


def _set_environ(env: dict[str, str]) -> None:
    """Make os.environ exactly ``env``, touching only what differs; nothing at all when it is
    what we last made it (a plain dict comparison: comparing os.environ itself decodes every
    entry, ~0.2 ms in a fresh child)."""
    global _environ_is
    if env == _environ_is:
        return
    _environ_is = None  # unknown until done
    cur = os.environ
    for name in [name for name in cur if name not in env]:
        del cur[name]
    for name, value in env.items():
        if cur.get(name) != value:
            cur[name] = value
    _environ_is = dict(env)


def _payload(plan, prepared: bool = False) -> None:
    code = 1
    try:
        if not prepared:
            _prepare_payload_process(reset_signals=not plan.reaper and not _zygote_signals_fresh)
        _set_environ(plan.env)  # usually the zygote's own (the pool's), or a reserve child's already
        if plan.cwd:
            os.chdir(plan.cwd)
        code = _run_payload(plan)
    except SystemExit as e:
        code = _exit_code(e)
    except KeyboardInterrupt as e:
        with contextlib.suppress(BaseException):  # (as CPython's own exit by Ctrl-C: the traceback first,
            traceback.print_exception(type(e), e, _payload_frames(e))  # then its threads, then the signal)
        _end_as_python(plan.kind == "script")
        _flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)  # ends PID 2 "by SIGINT"; PID 1 ignores its own signal:
        code = 128 + signal.SIGINT           # it exits 130, which the daemon reports as -SIGINT
    except BaseException as e:
        tb = _payload_frames(e)
        # The error record first, on its own: printing can fail (the caller closed stderr, or
        # the payload replaced sys.stderr), and the client must still learn what was raised.
        if plan.kind in _RESULT_KINDS:
            with contextlib.suppress(BaseException):
                _send_error(e, tb)
        with contextlib.suppress(BaseException):
            traceback.print_exception(type(e), e, tb)
        code = 1
    _end_as_python(plan.kind == "script")
    _flush()
    os._exit(code)


def _end_as_python(script: bool) -> None:
    """What the interpreter does at exit before the payload process leaves by os._exit: wait
    for the threads that are not daemon threads, and run threading's exit hooks (which finish
    concurrent.futures' queued work), as ``python prog.py`` and a multiprocessing Process
    (its _bootstrap) do; for a script also its atexit handlers, as ``python prog.py``. Without
    this a payload's executor or worker thread was cut off when it returned, its queued work
    lost. Failures here are the payload's own to print; the exit code stays the payload's."""
    threading = sys.modules.get("threading")  # (not imported: no thread to wait for)
    # Only with another thread alive: _shutdown's first run in a child costs ~40 copy-on-write
    # faults and ~0.15 ms (its hooks, only concurrent.futures' in the stdlib, stop threads; with
    # none there is nothing for them to do); counting costs ~5 faults.
    try:  # (the gate too: a payload may have broken threading; the exit code stays its own)
        if threading is not None and threading.active_count() > 1:
            threading._shutdown()
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    # multiprocessing's own exit (its atexit hook at a normal exit, called by a Process when
    # its target returns): terminate daemonic children, join the others, run its finalizers.
    # Without it a Process the payload started and did not join was killed with the pid
    # namespace when the payload ended. Only with children of its own to wait for (its
    # finalizers would otherwise run in every child, the zygote's included).
    # Processes a preload started in the zygote are not this process's children (join asserts,
    # terminate signals a pid of another namespace): dropped first, for a script's atexit too.
    try:
        process = sys.modules.get("multiprocessing.process")
        util = sys.modules.get("multiprocessing.util")
        children = getattr(process, "_children", None)
        if children and _zygote_mp_children:
            children.difference_update(_zygote_mp_children)
        if not script and util is not None and children:
            util._exit_function()
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    if script:
        import atexit
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()  # (prints what a handler raised, as at a normal exit)


def _payload_frames(e: BaseException):
    """The traceback of ``e`` from the payload's first frame on (our own frames left out)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return tb


def _reopen_stdio() -> None:
    # Unbuffered binary + write-through text: print(), sys.__stdout__.write and os.write(1, ...)
    # reach the pipe in the order they were called, and nothing is lost if the payload crashes.
    def text(fd: int, mode: str):
        raw = io.FileIO(fd, mode, closefd=False)
        if mode == "rb":
            return io.TextIOWrapper(io.BufferedReader(raw), encoding="utf-8", errors="strict")
        return io.TextIOWrapper(raw, encoding="utf-8", errors="backslashreplace", write_through=True,
                                line_buffering=True)

    sys.stdin = sys.__stdin__ = text(0, "rb")
    sys.stdout = sys.__stdout__ = text(1, "wb")
    sys.stderr = sys.__stderr__ = text(2, "wb")


def _flush() -> None:
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except BaseException:
            pass


def _exit_code(e: SystemExit) -> int:
    c = e.code
    if c is None:
        return 0
    if isinstance(c, int):
        return c & 0xFF
    try:
        print(c, file=sys.stderr)
    except BaseException:
        pass
    return 1


def _run_payload(plan) -> int:
    kind = plan.kind
    if kind == "exec":
        argv = plan.argv or []
        # Python ignores SIGPIPE and SIGXFSZ; a program we exec must get the defaults back.
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        try:
            os.execvpe(argv[0], argv, dict(plan.env))
        except FileNotFoundError:
            print(f"zygote: {argv[0]}: command not found", file=sys.stderr)
            return 127
        except PermissionError as e:
            print(f"zygote: {argv[0]}: {e.strerror}", file=sys.stderr)
            return 126
        except OSError as e:
            print(f"zygote: {argv[0]}: {e.strerror}", file=sys.stderr)
            return 126
    if kind == "script":
        import __main__ as _main  # noqa: F401
        sys.argv = list(plan.argv or ["-"])
        code = compile(plan.payload, sys.argv[0], "exec")
        globs = {"__name__": "__main__", "__file__": sys.argv[0], "__builtins__": __builtins__}
        exec(code, globs)
        return 0
    if kind not in _RESULT_KINDS:
        print(f"zygote: unknown payload kind {kind!r}", file=sys.stderr)
        return 1
    func, args, kwargs = _load(plan)
    _send_result(func(*args, **kwargs), plan.result_pickle)
    return 0


def _load(plan):
    """The callable of a callable/target/child_main plan, with its arguments."""
    import importlib
    import pickle

    if plan.kind == "callable":
        here = "%d.%d" % sys.version_info[:2]
        if plan.py and plan.py != here:  # (a leased child's Job comes from the client: the daemon never saw it)
            raise RuntimeError(f"the callable was pickled by Python {plan.py} and this zygote runs Python "
                               f"{here}: a function sent by value is bytecode only its own Python runs")
        return pickle.loads(plan.payload)
    modname, _, qual = (plan.target or "").partition(":")
    obj = importlib.import_module(modname)
    for part in qual.split("."):
        obj = getattr(obj, part)
    if not plan.payload:
        return obj, (), {}
    if plan.data_args:  # a pool that runs only its own code: plain data from the client, no objects
        import pickletools
        for op, _, _ in pickletools.genops(plan.payload):  # (the opcodes pickle.loads will run)
            if op.name in _CODE_OPCODES:
                raise pickle.UnpicklingError(f"this pool takes plain data as arguments, not a pickle using {op.name}")
    args, kwargs = pickle.loads(plan.payload)
    if plan.data_args and not (isinstance(args, (tuple, list)) and isinstance(kwargs, dict)):
        raise TypeError("the arguments must be a tuple and a dict")
    return obj, args, kwargs


# Every opcode that names a class or function (EXT codes too: one already in copyreg's cache
# skips find_class), calls one or builds an object: without them a pickle is plain data only
# (None, bools, numbers, str, bytes, and lists, tuples, dicts and sets of them).
_CODE_OPCODES = frozenset(("GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "REDUCE", "BUILD",
                           "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID"))


# ---- the result pipe (the payload process only) ------------------------------------------------

_RESULT_KINDS = ("callable", "target", "child_main")  # exec and script have no return value


def _send_result(value, use_pickle: bool) -> None:
    _write_result(*_encode_result(value, use_pickle))


def _encode_result(value, use_pickle: bool) -> tuple[bytes, bytes]:
    """Encode the return value: JSON unless the client trusts pickles (trusted_results)."""
    try:
        if use_pickle:
            import cloudpickle  # already imported by the zygote, so this costs nothing
            kind, body = b"p", cloudpickle.dumps(value)
        else:
            kind, body = b"j", json.dumps(value, ensure_ascii=False).encode()
    except BaseException as e:  # noqa: BLE001 - an unencodable value is a result, not a crash
        kind, body = b"u", _describe(type(value), f"the return value could not be encoded "
                                     f"({'cloudpickle' if use_pickle else 'JSON'}): {_text(e)}")
    return kind, body


def _send_error(exc: BaseException, tb) -> None:
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    _write_result(b"e", _describe(type(exc), _text(exc), text))


def _describe(cls: type, message: str, tb_text: str | None = None) -> bytes:
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    doc = {"type": name, "message": message}
    if tb_text is not None:
        doc["traceback"] = tb_text
    return json.dumps(doc).encode()


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:  # noqa: BLE001 - a hostile __str__ must not lose the result
        return f"<{type(exc).__name__} with an unprintable message>"


def _write_result(kind: bytes, body: bytes) -> None:
    # EPIPE means the daemon stopped reading (the result exceeded its cap): the daemon already
    # knows, and the payload's exit code stays its own. Python ignores SIGPIPE, so this raises.
    try:
        for chunk in (RESULT_HEADER.pack(kind, len(body)), body):
            view = memoryview(chunk)
            while view:
                view = view[os.write(RESULT_FD, view):]
        os.close(RESULT_FD)
    except OSError:
        pass
