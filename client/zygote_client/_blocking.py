"""The blocking face: the async implementation driven through an anyio blocking portal.

One portal thread per Client runs an event loop; every call crosses into it with ``portal.call``.
No event loop is ever nested in the caller's thread.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import dataclasses
import inspect
import os
import selectors
import subprocess
import sys
import threading
import time
import weakref
from typing import Any, Callable

import anyio
import anyio.abc
import anyio.from_thread

from ._async import DEVNULL, PIPE, AsyncChild, AsyncClient, _encode_target, _reap_embedded, open_client, open_embedded
from ._config import ExitStatus, SandboxConfig
from ._errors import ClosedError, ZygoteError
from ._workspace import ExportError, ExportResult
from ._results import Outcome


@dataclasses.dataclass(frozen=True)
class CompletedChild:
    """What ``Client.run`` returns: like subprocess.CompletedProcess, plus the full ExitStatus
    and the payload's return value (``value``).

    ``export`` is the daemon's account of the child's export directory (files, bytes, what was
    skipped or cut), ``export_dir`` where ``run(..., export_to=...)`` wrote it.
    """

    returncode: int
    stdout: bytes
    stderr: bytes
    status: ExitStatus
    export: ExportResult | None = None
    export_dir: str | None = None
    _outcome: Outcome | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def value(self) -> Any:
        """The payload's return value (decoded on each access); raises as ``ChildProcess.result``."""
        if self._outcome is None:
            raise ValueError("this CompletedChild was not made by Client.run")
        return self._outcome.value()

    def check_returncode(self) -> None:
        if self.returncode:
            raise subprocess.CalledProcessError(self.returncode, "zygote child", self.stdout, self.stderr)


def _identity(fd: int | None) -> tuple[int, int] | None:
    try:
        st = os.fstat(fd) if fd is not None else None
    except OSError:
        return None
    return None if st is None else (st.st_dev, st.st_ino)


class ChildProcess:
    """A confined child, Popen-shaped. Made only by ``Client.spawn_child``.

    ``stdin`` is a writable binary file, ``stdout``/``stderr`` readable binary files: the pipes
    themselves, so output streams while the child runs.

    As a context manager it closes the pipes and waits for the child, as Popen; a block left by
    an exception (Ctrl-C included) kills a child that is not detached first, rather than waiting
    for it to end by itself. ``wait()`` returns an ExitStatus (its ``returncode`` is Popen's).
    """

    def __init__(self, client: "Client", achild: AsyncChild) -> None:
        self._client = client
        self._achild = achild
        self.id = achild.id
        self.pid = achild.pid
        raw = achild._detach_stdio()
        pipes = [_identity(fd) for fd in raw]
        files: list = []
        try:
            for fd, mode in zip(raw, ("wb", "rb", "rb")):
                files.append(open(fd, mode) if fd is not None else None)
        except BaseException:  # (Ctrl-C): what was wrapped is closed, and what was not yet
            for f in files:
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()
            for fd, pipe in zip(raw[len(files):], pipes[len(files):]):
                # The one being wrapped when it came may have its file object made, and closed
                # with it as the exception unwound: closed here only if still that pipe.
                if fd is not None and _identity(fd) == pipe:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            raise
        self.stdin, self.stdout, self.stderr = files
        self.stdout_offset = achild.stdout_offset
        self.stderr_offset = achild.stderr_offset
        self.detached = achild.detached
        # Set from the loop's thread when the exit arrives: wait() sleeps on it in the calling
        # thread, without a round trip through the event loop. Registered first, checked second:
        # an exit that raced the registration is seen either way.
        self._ended = threading.Event()
        self._communication: _Communication | None = None  # (communicate's progress)
        achild._exit_callbacks.append(self._ended.set)
        if achild._exited.is_set():
            self._ended.set()

    def __repr__(self) -> str:
        return f"<ChildProcess id={self.id} pid={self.pid} returncode={self.returncode}>"

    @property
    def returncode(self) -> int | None:
        return self._achild.returncode

    @property
    def status(self) -> ExitStatus | None:
        return self._achild.status

    def poll(self) -> int | None:
        """The return code once the child ended, else None. Raises ClosedError or BrokenError
        once its exit can no longer be reported (the client closed or the connection lost
        first; the daemon ends a child that is not detached with its connection): a loop on
        ``poll() is None`` ends instead of waiting for ever."""
        if self._achild.status is None and self._ended.is_set():
            raise self._unreported()
        return self._achild.returncode

    def wait(self, timeout: float | None = None) -> ExitStatus:
        """Wait until the child ends. Raises subprocess.TimeoutExpired after ``timeout`` seconds
        (the child keeps running, as with Popen.wait)."""
        if self._achild.status is not None:
            return self._achild.status
        if not self._ended.wait(timeout):  # a timeout leaves the child running
            raise subprocess.TimeoutExpired(f"zygote child {self.id}", timeout)
        if self._achild.status is None:  # woken because the connection is gone
            raise self._unreported()
        return self._achild.status

    def _unreported(self) -> ZygoteError:
        """Why this child's exit will never be reported (its connection is gone)."""
        if self._client._closed:
            return ClosedError("the client was closed before the child's exit was reported")
        return self._client._aclient._lost()  # (a copy of the connection's error each time)

    def _signalable(self) -> bool:
        """False once the child has ended, or its connection has gone and it is not detached:
        the daemon ends such a child with its connection, so a signal has nothing to do (as
        Popen's on an ended process). A detached child outlives the client: signalling it then
        needs a new client (ClosedError from this one)."""
        return self._achild.status is None and not self._achild._ended_with_connection()

    @property
    def export_result(self) -> ExportResult | None:
        return self._achild.export_result

    def export(self, dest: str | os.PathLike) -> list[str]:
        """Wait for the child, then write its export directory into ``dest`` (see AsyncChild.export)."""
        return self._client._call(self._achild.export, dest)

    def close_export(self) -> None:
        """Release the export archive (see AsyncChild.close_export); ``export`` fails afterwards."""
        self._achild.close_export()

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the child (as ``wait``), then return its payload's return value.

        Read stdout/stderr first (or use ``communicate``) if the child writes more than a pipe
        holds, as with Popen.wait.

        Raises:
            RemoteError: the payload raised; ``str(err)`` shows the remote traceback.
            ChildFailed: the child ended without returning (a limit, a signal, sys.exit).
            ResultError: the value could not be sent back, or an exec/script child.
            subprocess.TimeoutExpired: still running after ``timeout`` seconds.
        """
        self.wait(timeout)
        assert self._achild._outcome is not None
        return self._achild._outcome.value()

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the child; nothing once it has ended (as Popen: even after the
        client was closed)."""
        if self._signalable():
            self._client._call(self._achild.send_signal, signum)

    def terminate(self) -> None:
        if self._signalable():
            self._client._call(self._achild.terminate)

    def kill(self) -> None:
        if self._signalable():
            self._client._call(self._achild.kill)

    def __enter__(self) -> "ChildProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[1] is not None and not self.detached:
            # Left by an exception (Ctrl-C included): the child is killed, as AsyncChild's block
            # does, rather than waited for until it ends by itself.
            with contextlib.suppress(ZygoteError):
                self.kill()
        for f in (self.stdin, self.stdout, self.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        try:
            self.wait()
        except ClosedError:
            # The client closed first. That ended a child that is not detached: nothing to say;
            # a detached one runs on, its exit unknown here.
            if exc[1] is None and self.detached:
                raise
        except ZygoteError:
            if exc[1] is None:
                raise  # (else the block's own exception goes on)

    def communicate(self, input: bytes | None = None, timeout: float | None = None) -> tuple[bytes, bytes]:
        """Feed ``input`` to stdin, read stdout and stderr to EOF without deadlock, then wait for
        the child to end (as Popen.communicate: ``returncode`` is set when it returns).

        Past ``timeout`` seconds it raises subprocess.TimeoutExpired and the child keeps
        running; nothing read is lost: call it again (e.g. after ``kill()``) for all of it."""
        if self._communication is None:
            self._communication = _Communication(self.stdin, self.stdout, self.stderr, input or b"")
        elif input:
            raise ValueError("Cannot send input after starting communication")
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._communication.run(deadline)
            self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            # (as Popen's: what was read so far, None for a stream that gave nothing yet)
            out, err = self._communication.result()
            raise subprocess.TimeoutExpired(f"zygote child {self.id}", timeout, output=out or None,
                                            stderr=err or None) from None
        return self._communication.result()


# subprocess's keywords a caller may try here, and what this API does instead.
_POPEN_WORDS = ("stdout", "stderr", "capture_output", "text", "universal_newlines", "encoding", "errors",
                "check", "shell", "cwd", "bufsize")


def _known_only(name: str, private: dict[str, Any]) -> None:
    """TypeError in the caller's thread for a keyword this API does not take (the underscored
    ones are the test suite's): it failed later, inside the event loop, under another name."""
    for key in private:
        if not key.startswith("_"):
            why = (": stdout and stderr are always pipes of bytes (run() collects both), a non-zero exit "
                   "never raises (CompletedChild.check_returncode()), and the working directory is "
                   "SandboxConfig.workdir") if key in _POPEN_WORDS else ""
            raise TypeError(f"{name}() got an unexpected keyword argument {key!r}{why}")


_Future = concurrent.futures.Future  # (what _call waits on; a test interrupts its result())


# Clients not closed yet. At interpreter exit their loop threads (daemon threads) stop running,
# and a client closed only then (by the portal's own cleanup, when it is collected) would wait for
# them forever: a script that never called close(), or ended with an exception, hung at exit.
_open_clients: "weakref.WeakSet[Client]" = weakref.WeakSet()


@atexit.register  # atexit runs while daemon threads still run (after non-daemon threads ended)
def _close_at_exit() -> None:
    for client in list(_open_clients):
        with contextlib.suppress(Exception):
            client.close()


def _reap_collected(proc) -> None:
    """(A collected embedded client's finalizer) wait for its daemon in a thread of its own:
    reaped once it ends, as close() would have done."""
    if proc.poll() is None:  # (in a fork, not our child: poll() says it ended)
        threading.Thread(target=_reap_embedded, args=(proc,), name="zygote-reap", daemon=True).start()


def _forked() -> None:
    """In a forked child: no client's loop thread came along. Each portal is marked stopped (anyio
    then skips the hand-over to its thread when the portal is finalized: it waited for it for
    ever, at exit too), and the clients act as closed here (see Client.close)."""
    for client in list(_open_clients):
        with contextlib.suppress(Exception):
            client._portal._event_loop_thread_id = None  # (anyio's own test of a running portal)


os.register_at_fork(after_in_child=_forked)


class Client:
    """A blocking client. ``Client.connect(path)`` or ``Client.embedded(...)``; a context manager.

    Close it (``close()`` or a ``with`` block) to end its connection and, for an embedded one,
    its daemon. A client still open when the interpreter exits is closed then: its children
    that are not detached are killed with the connection, as they would be when the process
    itself ended."""

    def __init__(self, factory: Callable[[], Any], leases: int = 0) -> None:
        self._portal_cm = anyio.from_thread.start_blocking_portal("asyncio")
        self._portal = self._portal_cm.__enter__()
        try:
            self._session_cm = self._portal.wrap_async_context_manager(_session(factory))
            self._aclient: AsyncClient = self._session_cm.__enter__()
        except BaseException:
            self._portal_cm.__exit__(*sys.exc_info())
            raise
        self._loop: asyncio.AbstractEventLoop = self._portal.call(asyncio.get_running_loop)
        self._loop_thread: int = self._portal.call(threading.get_ident)
        self._tasks: set[asyncio.Task] = set()  # _call's tasks (touched only on the loop's thread)
        self._stopping = False  # set on the loop's thread once close() cancelled the calls
        self._calls: set[concurrent.futures.Future] = set()  # their callers' futures, any thread
        self._calls_lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()  # (a fork has no loop thread: it may only let go of its copy)
        _open_clients.add(self)
        if self._aclient._proc is not None:
            # An embedded client collected without close(): its daemon ends with the connection,
            # and was left a zombie of this process until the next subprocess started.
            weakref.finalize(self, _reap_collected, self._aclient._proc).atexit = False
        if leases:
            try:
                self._portal.call(self._aclient.keep_leased, leases)
            except BaseException:
                self.close()
                raise

    def _forget_call(self, done: concurrent.futures.Future) -> None:
        with self._calls_lock:
            self._calls.discard(done)

    async def _cancel_calls(self) -> None:
        self._stopping = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @classmethod
    def connect(cls, path: str, *, leases: int = 0) -> "Client":
        """Connect to the daemon listening on ``path``. ``leases``: hold that many of the
        default pool's reserve children, so a spawn with the pool's defaults is written straight
        to one from the calling thread (see AsyncClient.keep_leased)."""
        return cls(lambda: open_client(path), leases)

    @classmethod
    def embedded(cls, preload_imports: tuple[str, ...] | list[str] = (), environment: dict[str, str] | None = None,
                 child_main: str | None = None, executable: str = sys.executable, leases: int = 0,
                 **kwargs: Any) -> "Client":
        """Start a private daemon + zygote (the ``zygote`` distribution must be installed) and
        connect to it over a socketpair. Works for any user that can create user namespaces.
        The daemon has a session of its own (a terminal's Ctrl-C or Ctrl-Z reaches the caller
        only; forward what the child should get with ``send_signal``) and ends when the client
        is closed or its process dies.

        Args:
            preload_imports: modules imported once in the zygote (every child starts with them).
            environment: the exact environment of children (default: PATH, LANG, HOME=/tmp).
            child_main: "module:function" run when spawn_child gets no target.
            executable: the zygote's interpreter.
            forbid_secret_env: refuse requests whose ``env`` has secret-looking names
                (``GITHUB_TOKEN``, ``AWS_*``, ...); ``allow_env`` names exceptions.
            leases: as for ``connect`` (with ``daemon_args=["--reserve", "N"]``).
        """
        return cls(lambda: open_embedded(preload_imports=tuple(preload_imports), environment=environment,
                                         child_main=child_main, executable=executable, **kwargs), leases)

    @property
    def welcome(self):
        return self._aclient.welcome

    def _call(self, fn: Callable[..., Any], *args: Any, discard: Callable[[Any], None] | None = None) -> Any:
        """Run ``fn(*args)`` (a coroutine function) on the portal's event loop and wait for it.

        A plain task started with ``call_soon_threadsafe`` rather than ``portal.call``: the same
        thread hop at well under half the cost (anyio's portal makes a task group entry and a
        cancel scope per call; that is ~0.1 ms on every spawn). If this thread is interrupted
        (KeyboardInterrupt) while waiting, the task is cancelled and waited for, so nothing it
        started (a child, a pending request) is left half-done behind the caller's back; a result
        that arrived all the same (the task ended before the cancel reached it) goes to
        ``discard`` (a child nobody will hold: killed).
        """
        loop = self._loop
        if self._loop_thread == threading.get_ident():
            raise RuntimeError("a blocking Client cannot be called from its own event loop's thread")
        self._check_process()
        done: concurrent.futures.Future = _Future()
        tasks: list[asyncio.Task] = []
        with self._calls_lock:  # registered under the lock close() takes: none slips past it
            if self._closed:
                raise ClosedError("the client is closed")
            self._calls.add(done)
        done.add_done_callback(self._forget_call)

        def fail(exc: BaseException) -> None:
            if not done.done():
                done.set_exception(exc)

        def settle(task: asyncio.Task) -> None:
            self._tasks.discard(task)
            if task.cancelled():  # by close() or by an interrupted caller
                fail(ClosedError("the call was cancelled (client closed or caller interrupted)"))
            elif task.exception() is not None:
                fail(task.exception())
            elif not done.done():
                done.set_result(task.result())

        def start() -> None:
            if not done.set_running_or_notify_cancel():
                return
            if self._stopping:  # close() already cancelled the calls: start nothing new
                fail(ClosedError("the client is closed"))
                return
            try:
                task = loop.create_task(fn(*args))
            except BaseException as e:  # noqa: BLE001 - the caller must hear of it, not hang
                fail(e)
                return
            tasks.append(task)
            self._tasks.add(task)
            task.add_done_callback(settle)

        try:
            try:  # (inside: an interrupt while it is handed over cancels it too)
                loop.call_soon_threadsafe(start)
            except RuntimeError:  # the loop is closed: the client was closed by another thread
                fail(ClosedError("the client is closed"))
            return done.result()
        except concurrent.futures.CancelledError:
            raise ClosedError("the client was closed during the call") from None
        except BaseException:
            if not done.done():  # interrupted here (KeyboardInterrupt): cancel it, wait for it
                with contextlib.suppress(RuntimeError):  # unless the loop is already gone
                    loop.call_soon_threadsafe(lambda: tasks[0].cancel() if tasks else done.cancel())
                    with contextlib.suppress(BaseException):
                        concurrent.futures.wait([done])
            if discard is not None and done.done() and not done.cancelled() and done.exception() is None:
                with contextlib.suppress(BaseException):
                    discard(done.result())
            raise

    def _check_process(self) -> None:
        if self._pid != os.getpid():
            raise ClosedError("this client belongs to the process that made it (this is a fork of it)")

    def _abandon(self, achild: AsyncChild, kill: bool = True) -> None:
        """Let go of a child started for a caller who was interrupted before holding it: it is
        killed (detached or not: its id never reached anyone; not one that was being attached)
        and its stdio closed, on the loop."""
        async def let_go() -> None:
            if kill:
                await self._aclient._kill_unwanted(achild.id)
            with contextlib.suppress(Exception):
                await achild.aclose()

        def start() -> None:
            task = self._loop.create_task(let_go())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        with contextlib.suppress(RuntimeError):  # the loop is gone: the connection, and the child, with it
            self._loop.call_soon_threadsafe(start)

    def _adopt(self, achild: AsyncChild, kill: bool = True) -> ChildProcess:
        try:
            return ChildProcess(self, achild)
        except BaseException:  # (Ctrl-C while its files were made)
            self._abandon(achild, kill)
            raise

    def status(self):
        """The daemon's pools, counters and this peer's running children (a StatusReply)."""
        return self._call(self._aclient.status)

    def spawn_child(self, target: Callable[..., Any] | str | None = None, args: tuple = (),
                    kwargs: dict | None = None, *, process_name: str | None = None,
                    sandbox_config: SandboxConfig | None = None, stdin: Any = PIPE,
                    env: dict[str, str] | None = None, timeout: float | None = None,
                    pool: str | None = None, trusted_results: bool = False, detached: bool = False,
                    **private: Any) -> ChildProcess:
        """Start a confined child; returns once it reported "ready" (see AsyncClient.spawn_child).
        With a held reserve child (``leases``) and the pool's defaults, it is started from this
        thread by one write to it, and returns at once."""
        _known_only("spawn_child", private)
        ac = self._aclient
        self._check_process()  # (a held child is written to from this thread, not through _call)
        if ac._leases and sandbox_config is None and pool is None and not detached and not private:
            if stdin not in (PIPE, DEVNULL, None):
                raise ValueError("stdin must be PIPE, DEVNULL or None")
            kind, payload, tgt, py = _encode_target(target, args, kwargs, None, None)
            # The refill task is woken once this thread is done: woken at the write, the loop's
            # thread would take the GIL each time the file objects below release it (fstat,
            # isatty), and this spawn would wait for its turn (~1 ms back to back).
            took: list[bool] = []
            leased = ac._start_leased(kind, payload, tgt, py, None, env, process_name, stdin, timeout, trusted_results,
                                      lambda: took.append(True))
            try:
                if leased is not None:
                    return self._adopt(leased)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is gone: the client is closing
                    if leased is not None and timeout is not None:  # (its deadline: see P.Begun)
                        if not ac._begun_now(leased.id, timeout):  # (sent from this thread, as a rule)
                            self._portal.start_task_soon(ac._begun, leased.id, timeout)
                    if took:
                        self._loop.call_soon_threadsafe(lambda: ac._lease_wake.set())

        async def go() -> AsyncChild:
            return await self._aclient.spawn_child(target, args, kwargs, process_name=process_name,
                                                   sandbox_config=sandbox_config, stdin=stdin, env=env,
                                                   timeout=timeout, pool=pool, trusted_results=trusted_results,
                                                   detached=detached, **private)
        return self._adopt(self._call(go, discard=self._abandon))

    def attach(self, child_id: str, offset: int = 0, *, trusted_results: bool = False) -> ChildProcess:
        """Follow a detached child from this connection (see AsyncClient.attach)."""
        async def go() -> AsyncChild:
            return await self._aclient.attach(child_id, offset, trusted_results=trusted_results)
        return self._adopt(self._call(go, discard=lambda c: self._abandon(c, kill=False)), kill=False)

    def run(self, target: Callable[..., Any] | str | None = None, args: tuple = (), *, kwargs: dict | None = None,
            input: bytes = b"", timeout: float | None = None, sandbox_config: SandboxConfig | None = None,
            env: dict[str, str] | None = None, export_to: str | os.PathLike | None = None,
            trusted_results: bool = False, **private: Any) -> CompletedChild:
        """Run a child to completion, feeding ``input`` and collecting both streams.

        ``timeout`` is enforced by the daemon (SIGKILL of the whole tree); the result then has
        ``status.timed_out`` set and returncode -9 — it does not raise. Neither does a payload
        that raised: ``.value`` does, when read.

        ``export_to``: write the child's export directory (``SandboxConfig.export``, "/out" by
        default when this is given) there; it must not exist or be empty.

        Raises:
            ExportError: the export was refused or could not be written (``err.completed`` holds
                the CompletedChild; ``export_to`` is untouched).
        """
        _known_only("run", {k: v for k, v in private.items() if k not in _SPAWN_PARAMS})  # (passed on to it)
        if export_to is not None and (sandbox_config is None or sandbox_config.export is None):
            import msgspec
            from ._workspace import Export
            sandbox_config = msgspec.structs.replace(sandbox_config or SandboxConfig(), export=Export())
        child = self.spawn_child(target, args, kwargs, sandbox_config=sandbox_config, env=env,
                                 timeout=timeout, trusted_results=trusted_results, **private)
        try:
            out, err = child.communicate(input)
            status = child.wait()
        except BaseException:  # as subprocess.run: an interrupted run (Ctrl-C) kills its child
            with contextlib.suppress(Exception):
                child.kill()
            for f in (child.stdin, child.stdout, child.stderr):
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()
            raise
        done = CompletedChild(status.returncode, out, err, status, export=child.export_result,
                              _outcome=child._achild._outcome)
        if export_to is None:
            return done
        try:
            child.export(export_to)
        except ExportError as e:
            e.completed = done
            raise
        finally:
            child._achild.close_export()
        return dataclasses.replace(done, export_dir=os.path.abspath(export_to))

    def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` in a fresh confined child; return its value or raise
        ``RemoteError`` (see AsyncClient.call: output goes to this process's stdout/stderr)."""
        return self._call(self._aclient._call, fn, args, kwargs)

    def close(self) -> None:
        with self._calls_lock:
            if self._closed:
                return
            self._closed = True
        _open_clients.discard(self)
        if self._pid != os.getpid():
            # A fork of the process that made this client: its loop thread did not come along
            # (close() waited for it for ever, at exit too). Only this process's copy of the
            # connection goes; the client goes on working in the original process.
            with contextlib.suppress(Exception):
                self._aclient._stream.extra(anyio.abc.SocketAttribute.raw_socket).close()
            return
        try:
            self._session_cm.__exit__(None, None, None)
        finally:
            try:
                self._portal.call(self._cancel_calls)  # calls still running in other threads
            finally:
                self._portal_cm.__exit__(None, None, None)
                with self._calls_lock:
                    left = list(self._calls)
                for done in left:  # queued but never finished: the loop is gone
                    with contextlib.suppress(concurrent.futures.InvalidStateError):
                        done.set_exception(ClosedError("the client was closed during the call"))

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.asynccontextmanager
async def _session(factory: Callable[[], Any]):
    client = await factory()
    async with client:
        yield client


# What run() passes on to spawn_child besides its own parameters (process_name, pool, ...).
_SPAWN_PARAMS = frozenset(inspect.signature(Client.spawn_child).parameters)


class _Communication:
    """What ``ChildProcess.communicate`` has done so far: input left to write, output read, the
    streams not at EOF yet. A call cut short by its timeout leaves it to the next call, which
    loses nothing (as Popen's)."""

    def __init__(self, stdin, stdout, stderr, data: bytes) -> None:
        # Streams the caller closed already are left out (as Popen.communicate): b"" for them.
        stdin, stdout, stderr = (f if f is not None and not f.closed else None for f in (stdin, stdout, stderr))
        self.stdin = stdin
        self.streams = {f.fileno(): f for f in (stdout, stderr) if f is not None}  # (by fd: kept after close)
        self.out: dict[int, list[bytes]] = {fd: [] for fd in self.streams}
        self.names = [f.fileno() if f is not None else None for f in (stdout, stderr)]
        self.view = memoryview(data or b"")
        if stdin is not None:
            try:
                stdin.flush()
            except BrokenPipeError:  # the child ended or closed its stdin: as Popen, no error
                self.view = self.view[:0]
            if self.view:
                os.set_blocking(stdin.fileno(), False)
            else:
                self._close_stdin()

    def _close_stdin(self) -> None:
        with contextlib.suppress(BrokenPipeError):  # (unwritten buffered bytes raise again)
            self.stdin.close()

    def run(self, deadline: float | None) -> None:
        """Write and read until the input is written and both streams are at EOF. Raises
        subprocess.TimeoutExpired at ``deadline`` (time.monotonic), the rest left for later."""
        stdin = self.stdin
        sel = selectors.DefaultSelector()
        try:
            if stdin is not None and not stdin.closed:
                sel.register(stdin.fileno(), selectors.EVENT_WRITE)
            for fd, f in self.streams.items():
                if not f.closed:
                    sel.register(fd, selectors.EVENT_READ)
            while sel.get_map():
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    raise subprocess.TimeoutExpired("zygote child", 0)
                for key, _ in sel.select(wait):
                    fd = key.fd
                    if stdin is not None and not stdin.closed and fd == stdin.fileno():
                        try:
                            n = os.write(fd, self.view[:65536])
                            self.view = self.view[n:]
                        except BlockingIOError:
                            continue
                        except BrokenPipeError:
                            self.view = self.view[:0]
                        if not self.view:
                            sel.unregister(fd)
                            self._close_stdin()
                    else:
                        chunk = os.read(fd, 1 << 16)
                        if chunk:
                            self.out[fd].append(chunk)
                        else:
                            sel.unregister(fd)
                            self.streams[fd].close()
        finally:
            sel.close()

    def result(self) -> tuple[bytes, bytes]:
        out, err = (b"".join(self.out[fd]) if fd is not None else b"" for fd in self.names)
        return out, err
