"""The one client implementation, on anyio (so it runs under trio and asyncio).

``AsyncClient`` owns one connection: a reader task decodes frames, completes pending requests by
``req`` id, and records exit events on the children. The blocking face (``_blocking.py``) drives this
same code through an anyio blocking portal.
"""

from __future__ import annotations

import collections
import contextlib
import io
import itertools
import os
import socket
import subprocess
import sys
import threading
import types
import weakref
from typing import Any, Callable

import anyio
import cloudpickle
import pickle
from anyio.abc import UNIXSocketStream

from . import _protocol as P
from ._config import ExitStatus, SandboxConfig
from ._errors import (BrokenError, ClosedError, DaemonError, ProtocolError, SandboxError,
                      SandboxUnavailable, ZygoteError)
from ._workspace import ExportError, ExportResult, WorkspaceError, unpack_archive
from ._results import Outcome
from ._streams import PipeReceiveStream, PipeSendStream

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
LEASE_QUIET = 0.025  # seconds after a held child was used before another is leased (unless none is left)
# A larger Job goes through the daemon: a held child's is written with a blocking write (from the
# caller's thread, or the event loop's), which a pipe's 64 KiB takes at once.
LEASE_JOB_MAX = 1 << 16


LEASE_RECHECK = 60.0  # seconds, at most, between leases asked of a pool that does not lease
SEND_WHOLE = 30.0  # seconds a request's frame may take to go out (see AsyncClient._request)
# Seconds the loop waits, at most, for a thread's direct send (AsyncClient._send_now), which holds
# the lock for microseconds: longer only if that thread's signal handler waits for the loop (a
# hang, ended this way), or if the host stalled the thread (swapping): long enough for the latter.
WIRE_WAIT = 5.0
_WIRE_HELD = ("another thread held this client's socket for over {:g} s (a signal handler that calls the "
              "client, run while that thread was sending?): the connection is closed")


def _fresh(exc: BaseException) -> BaseException:
    """A new exception like ``exc`` (type, args, attributes), with no traceback and no chain.

    For a stored error raised to many callers (the connection's, once it is gone): the one
    object raised again grew its ``__traceback__`` by each raise and kept every failed caller's
    frames (their children, their open pipes) alive as long as the client. Each raise gets its
    own copy instead; ``raise _fresh(err) from None``."""
    cls = type(exc)
    new = cls.__new__(cls, *exc.args)  # (no __init__: args and attributes are copied as they are)
    new.args = exc.args
    new.__dict__.update(exc.__dict__)
    new.__suppress_context__ = True
    return new


class _Pending:
    def __init__(self) -> None:
        self.event = anyio.Event()
        self.msg: Any = None
        self.fds: list[int] = []
        self.error: BaseException | None = None
        self.abandoned = False  # its caller was cancelled: the reader disposes of the answer


class AsyncChild:
    """A running child (no public constructor). Popen-like: ``returncode`` is None until it ends,
    negative -N when signal N ended it.

    ``stdout``/``stderr`` are anyio byte receive streams (``async for chunk in child.stdout``),
    ``stdin`` a byte send stream (``aclose`` it for EOF); each is None when not piped.
    ``stdout_offset``/``stderr_offset``: the position in the child's whole output of the first
    byte the stream delivers: 0 for a spawn; for ``attach(..., offset=N)`` at least N, more when
    the daemon's ring buffer had already dropped bytes (those ``offset - N`` bytes were missed).

    ``async with child:`` closes the streams on exit and waits for the child; leaving the block
    by an exception or a cancellation kills it first (see ``wait``).
    """

    def __init__(self, client: "AsyncClient", msg: P.Spawned | P.Attached, fds: list[int], *, trusted: bool = False,
                 has_result: bool = False, detached: bool = False) -> None:
        self._client = client
        self._trusted = trusted
        self._has_result = has_result
        self._outcome: Outcome | None = None
        self.id: str = msg.child
        self.pid: int = msg.pid
        self.detached = detached
        fds = list(fds)
        has_stdin = isinstance(msg, P.Spawned) and msg.has_stdin
        self.stdin: PipeSendStream | None = PipeSendStream(fds.pop(0)) if has_stdin else None
        self.stdout: PipeReceiveStream | None = PipeReceiveStream(fds.pop(0)) if fds else None
        self.stderr: PipeReceiveStream | None = PipeReceiveStream(fds.pop(0)) if fds else None
        self.stdout_offset = getattr(msg, "stdout_offset", 0)
        self.stderr_offset = getattr(msg, "stderr_offset", 0)
        self.status: ExitStatus | None = None
        self.export_result: ExportResult | None = None
        self._export_fd: int | None = None
        self._export_release: weakref.finalize | None = None  # closes it if this object is dropped
        self._held = False  # leased, not started yet (AsyncClient.keep_leased)
        self._refill_at_exit = False  # started from a held child while others were still held
        self._exited = anyio.Event()
        self._exit_callbacks: list[Callable[[], None]] = []  # the blocking face's thread wake-up

    def _mark_exited(self) -> None:
        """The exit is known (or the connection is gone): wake every waiter, on any thread."""
        self._exited.set()
        for cb in self._exit_callbacks:
            cb()

    def _detach_stdio(self) -> tuple[int | None, int | None, int | None]:
        """Hand the raw (blocking) fds to the blocking face; the streams are gone afterwards."""
        fds = tuple(s.detach() if s is not None else None for s in (self.stdin, self.stdout, self.stderr))
        self.stdin = self.stdout = self.stderr = None
        return fds

    async def aclose(self) -> None:
        """Close this side's ends of the child's stdio (the child sees EOF / EPIPE)."""
        for s in (self.stdin, self.stdout, self.stderr):
            if s is not None:
                await s.aclose()

    async def __aenter__(self) -> "AsyncChild":
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is not None:  # the block's exception (or cancellation) goes on once the child is reaped
            with anyio.CancelScope(shield=True):
                # The kill goes out before the streams close: closed first, a child that writes
                # could die of EPIPE in between and report exit 1 instead of the kill.
                killed = not self.detached and await self._send_kill()
                await self.aclose()
                if killed:
                    await self._exited.wait()  # set on the exit, or when the connection breaks
            return
        await self.aclose()
        try:
            await self.wait()
        except ClosedError:
            # The client closed first. That ended a child that is not detached: nothing to say;
            # a detached one runs on, its exit unknown here.
            if self.detached:
                raise

    def _ended_with_connection(self) -> bool:
        """Its exit unreported and the connection gone: the daemon ends such a child (not
        detached) with its connection, so there is nothing left to signal."""
        return (self.status is None and not self.detached
                and (self._client._closed or self._client._broken is not None))

    @property
    def returncode(self) -> int | None:
        return None if self.status is None else self.status.returncode

    def _set_exit(self, msg: P.Exited, fds: list[int] = ()) -> None:
        self.status = msg.status
        self._outcome = Outcome(msg.result_kind, msg.result, msg.status, self._trusted, self._has_result)
        self.export_result = msg.export
        fds = list(fds)
        if msg.export is not None and msg.export.error is None and len(fds) == 1:
            self._export_fd = fd = fds.pop()
            # The archive is memory the daemon wrote: released with this object if nobody calls
            # close_export (it stayed until the client closed: 641 MiB after 20 exports).
            self._export_release = weakref.finalize(self, os.close, fd)
            # (before the wake-up: a woken thread may call close_export at once)
            self._client._exported.add(self)
        for fd in fds:
            os.close(fd)
        self._mark_exited()

    async def export(self, dest: str | os.PathLike) -> list[str]:
        """Wait for the child to end, then write its export directory into ``dest``.

        ``dest`` must not exist (or be an empty directory); it is written as a temporary sibling
        and renamed into place, so it is either complete or untouched. May be called again (to
        another destination) until ``close_export``.

        Returns the relative paths of the files written.

        Raises:
            ExportError: the child had no ``SandboxConfig.export``, the daemon refused the export
                (``err.path`` names the offending entry), or ``dest`` could not be written.
        """
        await self.wait()
        res = self.export_result
        if res is None:
            raise ExportError("this child has no export directory (set SandboxConfig.export)")
        if res.error is not None:
            raise ExportError(f"the export was refused: {res.error}", path=res.error_path)
        fd = self._export_fd
        try:
            # Our own fd of it: a close_export from another thread meanwhile must not close (and
            # free for reuse) the number the unpacking reads.
            fd = os.dup(fd) if fd is not None else None
        except OSError as e:
            raise ExportError(f"cannot read the export: {e.strerror}") from None
        if fd is None:
            raise ExportError("the export was released (close_export)")
        try:
            return await anyio.to_thread.run_sync(unpack_archive, fd, dest)
        finally:
            os.close(fd)

    def close_export(self) -> None:
        """Release the export archive (a memfd held by this process; it is also released when
        this object is garbage-collected, and when the client closes)."""
        self._export_fd = None
        self._client._exported.discard(self)
        release = self._export_release
        if release is not None:
            release()  # (once, from any thread: a finalizer runs at most once)

    async def wait(self) -> ExitStatus:
        """Wait for the child to end and be reaped; returns its ExitStatus.

        Cancelling the caller kills the child (SIGKILL of its whole tree) and waits, shielded,
        until the daemon has reaped it, as trio's ``run_process`` does; then the cancellation
        goes on. A ``detached`` child is left running instead.
        """
        try:
            await self._wait_quietly()
        except anyio.get_cancelled_exc_class():
            if not self.detached:
                with anyio.CancelScope(shield=True):
                    await self._kill_and_reap()
            raise
        assert self.status is not None
        return self.status

    async def _wait_quietly(self) -> None:
        """Wait for the exit; a cancellation leaves the child alone (Popen.wait(timeout))."""
        if self.status is None:
            await self._client._wait_exit(self)

    async def _send_kill(self) -> bool:
        """SIGKILL the child; False when it has ended or the connection is gone (the daemon
        kills a non-detached child of a closed connection itself)."""
        if self.status is not None or self._client._closed or self._client._broken is not None:
            return False
        try:
            await self.kill()
        except ZygoteError:
            return False
        return True

    async def _kill_and_reap(self) -> None:
        if await self._send_kill():
            await self._exited.wait()

    async def result(self) -> Any:
        """Wait for the child to end; return what its payload returned.

        The value comes back as JSON (so: dict, list, str, int, float, bool, None; tuples arrive
        as lists), or as a cloudpickle loaded here when the spawn said ``trusted_results=True``.

        Raises:
            RemoteError: the payload raised (type name, message and the remote traceback).
            ChildFailed: the child ended without returning: a limit killed it (``reason`` says
                which, e.g. ``"memory"``), a signal, or the payload called sys.exit/os._exit.
            ResultError: the value could not be sent back (not JSON-compatible, too large) or
                loaded here (``reason="undecodable"``: a trusted pickle naming a module or class
                this process lacks), or the child was an exec/script child, which has no return value.
        """
        await self.wait()
        assert self._outcome is not None
        return self._outcome.value()

    async def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the child (the daemon delivers it); nothing once it has ended, and
        nothing for 0, as ``Popen.send_signal`` (whose 0 checks a process that cannot be gone)."""
        if self.status is not None or signum == 0 or self._ended_with_connection():
            return
        try:
            await self._client._signal(self.id, signum)
        except DaemonError as e:
            if e.code != "unknown-child":
                raise
            # The daemon forgets a child as it reports its exit, so its answer can come before
            # that report does. A child this connection follows has its Exited on the way (or
            # the connection breaks): wait for it. An id it never had: the error stands.
            if self.status is None and any(c is self for c in self._client._children.get(self.id, ())):
                await self._exited.wait()
                if self.status is None:
                    raise self._client._lost() from None
            if self.status is None:
                raise

    async def terminate(self) -> None:
        import signal
        await self.send_signal(signal.SIGTERM)

    async def kill(self) -> None:
        import signal
        await self.send_signal(signal.SIGKILL)


class AsyncClient:
    """A connection to a zygote daemon. Use ``open_client`` / ``open_embedded`` to make one."""

    def __init__(self, stream: UNIXSocketStream, welcome: P.Welcome, proc: subprocess.Popen | None) -> None:
        self._stream = stream
        self.welcome = welcome
        self._proc = proc
        self._decoder = P.client_decoder()
        self._pending: dict[int, _Pending] = {}
        self._children: dict[str, list[AsyncChild]] = {}  # by id: a spawn and attaches may share one
        self._early_exits: dict[str, tuple[P.Exited, list[int]]] = {}
        self._unwanted: set[str] = set()  # children whose spawn was cancelled: killed, exits dropped
        # Children whose export archive this client holds (closed with it); close_export
        # takes a child out, possibly from another thread (the blocking face's caller). Weak:
        # a child its caller dropped releases its archive then (AsyncChild._export_release).
        self._exported: weakref.WeakSet[AsyncChild] = weakref.WeakSet()
        self._req = itertools.count(1)
        self._send_lock = anyio.Lock()
        # A small frame may go out from another thread without waking the loop's (_send_now):
        # only while no frame of the loop's is going out and the stream is open. These say so;
        # the lock is never held across an await, only around the flags and that thread's send.
        self._wire = threading.Lock()
        self._wire_busy = False    # a frame of the loop's is going out
        self._wire_shut = False    # the stream is closing or closed
        self._broken: BaseException | None = None
        self._closed = False
        self._tg: Any = None
        self._reader_done = anyio.Event()
        self._reader_scope = anyio.CancelScope()  # (entered by the reader: see __aexit__)
        # Reserve children this connection holds (keep_leased): (child, write end of its control
        # pipe). Taken with popleft from any thread (the blocking face's callers); refilled by
        # one task on the loop.
        self._leases: collections.deque[tuple[AsyncChild, int]] = collections.deque()
        self._lease_want = 0
        self._leasing = False
        self._lease_wake = anyio.Event()

    # ---- construction --------------------------------------------------------------------------

    @classmethod
    async def _from_socket(cls, sock: socket.socket, proc: subprocess.Popen | None = None) -> "AsyncClient":
        stream = await UNIXSocketStream.from_socket(sock)
        decoder = P.client_decoder()
        try:
            try:
                await stream.send(P.encode(P.Hello(P.VERSION, P.CLIENT)))
                while True:
                    data, fds = await stream.receive_fds(1 << 16, P.MAX_FDS + 1)
                    decoder.feed(data, fds)
                    item = decoder.next()
                    if item is not None:
                        break
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                if proc is not None:  # an embedded daemon that failed to start: say how it ended
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        await anyio.to_thread.run_sync(proc.wait, 5)
                raise BrokenError(_proc_reason(proc) or "the daemon closed the connection during the handshake") from None
        except BaseException:
            await stream.aclose()
            raise
        msg, fds = item
        for fd in fds:
            os.close(fd)
        if isinstance(msg, P.Error):
            await stream.aclose()
            raise DaemonError(msg.message, code=msg.code)
        if not isinstance(msg, P.Welcome):
            await stream.aclose()
            raise ProtocolError(f"expected welcome, got {type(msg).__name__}")
        self = cls(stream, msg, proc)
        self._decoder = decoder
        return self

    async def __aenter__(self) -> "AsyncClient":
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._reader)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closed = True
        # The reader stops before the socket closes: closed under a receive still waiting (and
        # a large request's send waiting beside it), asyncio's selector was left with a closed
        # fd and printed "Exception in callback ... Bad file descriptor" tracebacks. A send
        # still waiting fails on the close (ClosedError), as before.
        self._reader_scope.cancel()
        with anyio.CancelScope(shield=True):
            await self._reader_done.wait()
        await self._close_stream()
        if self._tg is not None:
            tg, self._tg = self._tg, None
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
        await self._finish()

    async def aclose(self) -> None:
        """Close the connection: the daemon kills this connection's (non-detached) children."""
        if self._tg is not None:
            raise RuntimeError("use 'async with' to close a client that was entered with 'async with'")
        self._closed = True
        await self._close_stream()
        await self._finish()

    async def _finish(self) -> None:
        with anyio.CancelScope(shield=True):
            self._decoder.close_fds()
            self._lease_want = 0
            while self._leases:  # the daemon kills the children themselves with the connection
                child, ctl = self._leases.popleft()
                os.close(ctl)
                await child.aclose()
            while True:  # (popped one by one: a user thread's close_export may take one out meanwhile,
                try:     # and iterating a WeakSet that changes raises)
                    child = self._exported.pop()
                except KeyError:
                    break
                child.close_export()
            for _, fds in self._early_exits.values():
                for fd in fds:
                    os.close(fd)
            self._early_exits.clear()
            if self._proc is not None:
                proc, self._proc = self._proc, None
                await anyio.to_thread.run_sync(_reap_embedded, proc)

    # ---- the reader ----------------------------------------------------------------------------

    async def _reader(self) -> None:
        with self._reader_scope:
            await self._read()

    async def _read(self) -> None:
        try:
            while True:
                try:
                    data, fds = await self._stream.receive_fds(1 << 18, P.MAX_FDS + 1)
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError) as e:
                    if self._closed:  # (we closed the stream: no daemon went away)
                        raise ClosedError("the client was closed") from e
                    raise BrokenError(_proc_reason(self._proc) or "the daemon closed the connection") from e
                self._decoder.feed(data, fds)
                while (item := self._decoder.next()) is not None:
                    self._deliver(*item)
        except BaseException as e:  # noqa: BLE001 - every waiter must learn why
            if isinstance(e, ZygoteError):
                self._broken = e
            elif self._closed:  # (stopped by __aexit__)
                self._broken = ClosedError("the client was closed")
            else:
                self._broken = BrokenError(str(e) or type(e).__name__)
            if not self._closed and not isinstance(e, anyio.get_cancelled_exc_class()):
                # Nothing more can be read here (a frame this client cannot decode, the daemon
                # gone): the connection closes, so the daemon ends its children, which nobody
                # here could follow or signal any more, instead of keeping them running.
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await self._close_stream()
            for p in self._pending.values():
                p.error = self._broken
                p.event.set()
            for same in self._children.values():
                for c in same:
                    c._mark_exited()
            self._reader_done.set()
            if not isinstance(e, (ZygoteError, anyio.get_cancelled_exc_class())):
                raise

    def _deliver(self, msg: Any, fds: list[int]) -> None:
        if isinstance(msg, P.Exited):
            same = self._children.pop(msg.child, None)
            unwanted = msg.child in self._unwanted
            self._unwanted.discard(msg.child)
            if same is None and unwanted:
                for fd in fds:
                    os.close(fd)
            elif same is None:
                self._early_exits[msg.child] = (msg, fds)
            else:
                for extra in same[1:]:  # each gets its own copy of the export fd
                    self._exit(extra, msg, [os.dup(fd) for fd in fds])
                self._exit(same[0], msg, fds)
            return
        req = getattr(msg, "req", 0)
        p = self._pending.pop(req, None)
        if p is None:
            for fd in fds:
                os.close(fd)
            if isinstance(msg, P.Error) and req == 0:
                raise DaemonError(msg.message, code=msg.code)
            return
        if p.abandoned:
            self._dispose(msg, fds)
            return
        p.msg, p.fds = msg, fds
        p.event.set()

    def _dispose(self, msg: Any, fds: list[int]) -> None:
        """The answer to a request whose caller was cancelled: its fds are closed, a child it
        started (nobody holds it) is killed, and the exit report of the child it names is
        dropped (here if it came first, else when it comes). A held (leased) child reads EOF on
        its control pipe and exits by itself; an attached one runs on (detached)."""
        for fd in fds:
            os.close(fd)
        child = getattr(msg, "child", None) if isinstance(msg, (P.Spawned, P.Attached, P.Leased)) else None
        if child is None:
            return
        early = self._early_exits.pop(child, None)
        if early is not None:  # it has ended already
            for fd in early[1]:
                os.close(fd)
            return
        if child in self._children:  # (another handle of this client follows it: its report)
            return
        self._unwanted.add(child)
        if isinstance(msg, P.Spawned) and self._tg is not None and self._broken is None and not self._closed:
            self._tg.start_soon(self._kill_unwanted, child)

    async def _signal(self, child_id: str, signum: int) -> None:
        await self._request(lambda req: P.Signal(req, child_id, int(signum)))

    async def _kill_unwanted(self, child_id: str) -> None:
        import signal
        with contextlib.suppress(ZygoteError):  # (it may have ended meanwhile)
            await self._signal(child_id, signal.SIGKILL)

    async def status(self) -> "P.StatusReply":
        """The daemon's pools, counters and this peer's running children."""
        msg, fds = await self._request(lambda req: P.Status(req))
        for fd in fds:
            os.close(fd)
        if isinstance(msg, P.Error):
            raise DaemonError(msg.message, code=msg.code)
        return msg

    async def _request(self, make: Callable[[int], Any], fds: list[int] = ()) -> tuple[Any, list[int]]:
        if self._closed:
            raise ClosedError("the client is closed")
        if self._broken is not None:
            raise _fresh(self._broken) from None
        req = next(self._req)
        msg = make(req)
        P.check(msg)  # (sent, a field the daemon cannot decode would end the connection)
        data = P.encode(msg, len(fds))
        p = _Pending()
        self._pending[req] = p
        sent = [False]
        try:
            await self._send_whole(data, fds, sent)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as e:
            self._pending.pop(req, None)
            if self._closed:
                raise ClosedError("the client was closed") from None
            raise BrokenError(f"cannot send to the daemon: {e}") from None
        except BaseException:  # cancelled before the send (nothing will come) or right after it
            if sent[0]:
                p.abandoned = True  # (an answer will come: the reader disposes of it)
            else:
                self._pending.pop(req, None)
            raise
        try:
            await p.event.wait()
        except BaseException:  # cancelled: whatever the answer is, nobody takes it
            if p.event.is_set():
                if p.error is None:
                    self._dispose(p.msg, p.fds)
            else:
                p.abandoned = True
            raise
        if p.error is not None:  # (the connection's error, shared by every waiter: a copy each)
            raise _fresh(p.error) from None
        if isinstance(p.msg, P.Error):
            raise DaemonError(p.msg.message, code=p.msg.code)
        return p.msg, p.fds

    async def _send_whole(self, data: bytes, fds: list[int] = (), sent: list[bool] | None = None) -> None:
        """Send one encoded frame (``sent[0]`` is set once it is out)."""
        async with self._send_lock:
            # A frame goes out whole: cut short by a cancellation, the rest of the stream
            # would be read as its continuation and the connection would hang for good.
            # The cancellation takes effect once it is out (SEND_WHOLE at most; a daemon
            # that reads nothing for that long costs the connection).
            with anyio.CancelScope(shield=True):
                if not self._wire_flags(busy=True):
                    await self._close_stream()
                    raise BrokenError(_WIRE_HELD.format(WIRE_WAIT))
                whole = False
                try:
                    with anyio.move_on_after(SEND_WHOLE) as stuck:
                        view = memoryview(data)  # a payload may be many MiB: no copies of it
                        if fds:
                            await self._stream.send_fds(bytes(view[:P.HEADER.size]), fds)
                            view = view[P.HEADER.size:]
                        await self._stream.send(view)
                        whole = True
                        if sent is not None:
                            sent[0] = True
                finally:
                    # (not whole: maybe part of a frame on the wire: nothing may follow it from
                    # another thread before the close below)
                    self._wire_flags(busy=False, **({} if whole else {"shut": True}))
                if stuck.cancelled_caught:
                    await self._close_stream()  # (the reader wakes every waiter with the reason)
                    raise BrokenError(f"a request could not be sent in {SEND_WHOLE:g} s: the connection is closed")

    async def _close_stream(self) -> None:
        self._wire_flags(shut=True)  # (no other thread's _send_now is then under way, nor starts)
        await self._stream.aclose()

    def _wire_flags(self, busy: bool | None = None, shut: bool | None = None) -> bool:
        """Set the flags _send_now reads, under its lock (the loop's side). False if the lock
        could not be had within WIRE_WAIT: the thread holding it is stuck in a signal handler
        of its own that waits for this loop (a handler runs between any two steps of that
        thread's code), and waiting on would hang both; the flags are set all the same (the
        caller closes the connection: that thread's send, if it comes, fails on the closed socket)."""
        got = self._wire.acquire(timeout=WIRE_WAIT)
        try:
            if busy is not None:
                self._wire_busy = busy
            if shut is not None:
                self._wire_shut = shut
        finally:
            if got:
                self._wire.release()
        return got

    def _send_now(self, data: bytes) -> bool:
        """Send one small frame from this thread (any thread) if the connection is free: no frame
        of the loop's going out, the stream open. True once it is out (or the connection is gone:
        the reader reports that); False to send it through the loop instead."""
        # A blocking acquire in a with statement: the loop holds the lock only for a flag flip, and
        # `with` leaves no point between a successful acquire and the release on exit where an
        # exception (KeyboardInterrupt) can land; acquire() followed by try/finally has one.
        sock = self._stream.extra(anyio.abc.SocketAttribute.raw_socket)
        with self._wire:
            if self._wire_busy or self._wire_shut:
                return False
            try:
                n = sock.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return False  # (the socket is full: the loop waits for room)
            except (BrokenPipeError, ConnectionResetError):
                return True  # (the connection is gone: the reader reports that)
            except OSError:
                return False  # (e.g. ENOBUFS: the connection lives; the loop sends it, or learns why not)
            if n != len(data):  # (a unix stream socket takes a small frame whole or not at all)
                self._wire_shut = True  # half a frame: as a send that got stuck (_send_whole)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            return True

    async def _begun(self, child_id: str, timeout: float) -> None:
        """Tell the daemon a held child's Job is written and has ``timeout`` (P.Begun), so that
        it reads the child's Started report by then. No answer comes; a connection that is gone
        took the child with it."""
        if (frame := self._begun_frame(child_id, timeout)) is not None:
            with contextlib.suppress(ZygoteError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                await self._send_whole(frame)

    def _begun_now(self, child_id: str, timeout: float) -> bool:
        """_begun from this thread, when the connection is free (see _send_now); False when
        it must go through the loop."""
        frame = self._begun_frame(child_id, timeout)
        return frame is None or self._send_now(frame)

    def _begun_frame(self, child_id: str, timeout: float) -> bytes | None:
        """P.Begun's frame; None when there is nobody to tell (closed, broken, or a daemon that
        does not take Begun)."""
        if self._closed or self._broken is not None or not self.welcome.begun:
            return None
        return P.encode(P.Begun(child_id, float(timeout)), 0)

    def _exit(self, child: AsyncChild, msg: P.Exited, fds: list[int]) -> None:
        child._set_exit(msg, fds)
        if child._held or child._refill_at_exit:  # a held child ended unused (killed), or one
            self._lease_wake.set()                # started from the hand: lease another

    async def _wait_exit(self, child: AsyncChild) -> None:
        await child._exited.wait()
        if child.status is None:
            raise self._lost() from None

    def _lost(self) -> BaseException:
        """Why a child's exit will not be reported: a fresh copy of the connection's error."""
        if self._broken is not None:
            return _fresh(self._broken)
        return BrokenError("connection lost before the child's exit was reported")

    # ---- the API -------------------------------------------------------------------------------

    async def spawn_child(self, target: Callable[..., Any] | str | None = None, args: tuple = (),
                          kwargs: dict | None = None, *, process_name: str | None = None,
                          sandbox_config: SandboxConfig | None = None, stdin: Any = PIPE,
                          env: dict[str, str] | None = None, pool: str | None = None,
                          timeout: float | None = None, trusted_results: bool = False,
                          detached: bool = False, _argv: list[str] | None = None, _script: bytes | None = None,
                          _stdio_fds: tuple[int, int, int] | None = None,
                          _test_fail_step: str | None = None, _test_relax_mounts: bool = False,
                          _test_landlock_abi: int = 0) -> AsyncChild:
        """Start a confined child running ``target(*args, **kwargs)``; returns once it is ready.

        ``target``: a callable (sent with cloudpickle; closures and lambdas work), a
        ``"module:function"`` string, or None for the pool's child_main. Its return value is
        available from ``child.result()``: JSON by default; with ``trusted_results=True`` the
        child cloudpickles it and this process unpickles it, so only set that when you trust
        the code that ran there as much as your own (a pickle can run anything when loaded).

        ``stdin``: PIPE (a writable ``child.stdin``), DEVNULL, or None, which is DEVNULL too: a
        sandboxed child never inherits this process's stdin. stdout and stderr are always pipes.

        ``detached=True``: the child outlives this connection (otherwise closing the client kills
        it). The daemon keeps its stdout/stderr in a bounded ring buffer; ``attach(child.id)``
        from any connection of the same user follows it again. Cancelling ``wait()`` leaves a
        detached child running.

        Raises:
            SandboxError: a confinement step failed (``err.step`` names it); nothing ran.
            DaemonError: the request was refused (bad input, limits); ``retriable`` if worth retrying.
        """
        kind, payload, tgt, py = _encode_target(target, args, kwargs, _argv, _script)
        if stdin not in (PIPE, DEVNULL, None):
            raise ValueError("stdin must be PIPE, DEVNULL or None")
        fds = list(_stdio_fds) if _stdio_fds else []
        if (self._leases and sandbox_config is None and pool is None and not detached and not fds
                and _test_fail_step is None and not _test_relax_mounts and not _test_landlock_abi):
            leased = self._start_leased(kind, payload, tgt, py, _argv, env, process_name, stdin, timeout,
                                        trusted_results, self._lease_wake.set)
            if leased is not None:
                if timeout is not None:  # (its deadline: see P.Begun)
                    if not self._begun_now(leased.id, timeout):
                        self._tg.start_soon(self._begun, leased.id, timeout)
                return leased

        def make(req: int) -> P.Spawn:
            return P.Spawn(req=req, kind=kind, payload=payload, target=tgt, argv=_argv, pool=pool,
                           process_name=process_name, env=env, sandbox=sandbox_config,
                           stdin=stdin == PIPE, stdio="fds" if fds else "pipe", timeout=timeout,
                           trusted_results=bool(trusted_results), detached=bool(detached),
                           test_fail_step=_test_fail_step, test_relax_mounts=_test_relax_mounts,
                           test_landlock_abi=_test_landlock_abi, py=py)

        msg, rfds = await self._request(make, fds)
        if isinstance(msg, P.SpawnFailed):
            for fd in rfds:
                os.close(fd)
            if msg.code == "workspace":
                raise WorkspaceError(msg.message, path=msg.path)
            if msg.code in ("sandbox", "unavailable"):
                cls = SandboxUnavailable if msg.code == "unavailable" else SandboxError
                raise cls(msg.step or "spawn", msg.message, errno=msg.errno, hint=msg.hint)
            raise DaemonError(msg.message, code=msg.code, retriable=msg.code == "retry")
        if not isinstance(msg, P.Spawned):
            for fd in rfds:
                os.close(fd)
            raise ProtocolError(f"unexpected reply {type(msg).__name__} to spawn")
        child = AsyncChild(self, msg, rfds, trusted=bool(trusted_results), has_result=kind not in ("exec", "script"),
                           detached=bool(detached))
        return self._track(child)

    # ---- leased reserve children -------------------------------------------------------------

    def keep_leased(self, n: int) -> None:
        """Hold up to ``n`` of the default pool's reserve children (a daemon started with
        ``--reserve``) in this connection's hands. A ``spawn_child`` that asks for the pool's
        defaults (no sandbox_config, pool, detached or stdio fds) then starts one by writing its
        request straight to the child's control pipe: no round trip through the daemon (the child
        checks the request and tells the daemon, which arms the deadline). Held children count
        against this connection's child limits and die with it; ``n`` 0 stops refilling. Pools
        that refuse callables or screen environments do not lease: spawns then simply go through
        the daemon (the client asks again every minute at most: a reload may change that). Needs
        ``async with client``."""
        if self._tg is None:
            raise RuntimeError("keep_leased needs the client entered with 'async with'")
        if not self.welcome.leases:  # an older daemon would take a Lease for a protocol error
            return
        self._lease_want = max(0, int(n))
        if self._lease_want and not self._leasing:
            self._leasing = True
            self._tg.start_soon(self._keep_leases)
        self._lease_wake.set()

    async def _keep_leases(self) -> None:
        pause = 0.0
        fails = refusals = 0
        try:
            while self._lease_want and not self._closed and self._broken is None:
                for _ in range(len(self._leases)):  # drop held children that ended unused
                    try:
                        child, ctl = self._leases.popleft()  # (a caller may take one meanwhile)
                    except IndexError:
                        break
                    if child.status is None:
                        self._leases.append((child, ctl))
                    else:
                        os.close(ctl)
                        await child.aclose()
                if len(self._leases) >= self._lease_want or pause:
                    self._lease_wake = anyio.Event()
                    with anyio.move_on_after(pause or None):
                        await self._lease_wake.wait()
                    # One was just taken: its child is starting now. Unless none is left, take
                    # the next in a quiet moment rather than compete with it for the CPU (the
                    # daemon refills its reserve behind each lease).
                    pause = 0.0 if pause or not self._leases else LEASE_QUIET
                    continue
                try:
                    msg, fds = await self._request(lambda req: P.Lease(req))
                except ZygoteError:
                    return  # an Error reply (a daemon that predates leases) or the connection is gone
                if isinstance(msg, P.Leased) and len(fds) == 4:
                    os.set_blocking(fds[3], True)
                    child = AsyncChild(self, P.Spawned(msg.req, msg.child, msg.pid, True), fds[:3])
                    child._held = True
                    self._leases.append((self._track(child), fds[3]))
                    refusals = 0
                    continue
                for fd in fds:
                    os.close(fd)
                if not isinstance(msg, P.SpawnFailed):
                    return
                if msg.code == "bad-request":  # this pool does not lease (no reserve, or it checks
                    refusals += 1  # requests): spawns go through the daemon; a reload may change
                    pause = min(LEASE_RECHECK, 2.0 ** refusals)  # that, so ask again, seldom
                    continue
                # None waiting (the reserve refills), at the limit, or a passing failure: again
                # soon, later after each failure of another kind.
                refusals = 0
                fails = 0 if msg.code in ("empty", "limit") else fails + 1
                pause = min(5.0, 0.03 * 2 ** fails)
        finally:
            self._leasing = False

    def _start_leased(self, kind: str, payload: bytes, target: str | None, py: str | None, argv: list[str] | None,
                      env: dict[str, str] | None, process_name: str | None, stdin: Any,
                      timeout: float | None, trusted: bool, wake: Callable[[], None]) -> AsyncChild | None:
        """Start a held child with this request (any thread): None when none is held, the Job is
        too large for one write, or the kind needs the daemon (child_main: the pool's target;
        exec: a child with a reaper in front)."""
        if kind in ("child_main", "exec"):
            return None
        job = P.Job(kind=kind, payload=payload, target=target, argv=argv, env=env, process_name=process_name,
                    result_pickle=bool(trusted), timeout=timeout, py=py)
        P.check(job)  # (the held child would only exit 125 on a field it cannot read)
        job = P.job_frame(job)
        if len(job) > LEASE_JOB_MAX:
            return None
        while not (self._closed or self._broken):
            try:
                child, ctl = self._leases.popleft()
            except IndexError:
                break
            child._trusted, child._has_result = bool(trusted), kind not in ("exec", "script")
            # The refill task leases another; woken now only when none is left. Otherwise when
            # this child's exit arrives (the loop's thread wakes for that anyway): woken at once,
            # it would compete with this child's start for the CPU, and in the blocking face its
            # thread for the GIL (~1-3 ms on a 2-core machine). (Set before the Job is written:
            # the exit may be handled on the loop's thread before this thread goes on.)
            others = bool(self._leases)
            child._refill_at_exit = others
            child._held = False
            if stdin != PIPE and child.stdin is not None:  # the child reads EOF, as from /dev/null;
                os.close(child.stdin.detach())             # closed before the Job, as the daemon
                child.stdin = None                         # does (no payload code has run yet)
            try:
                view = memoryview(job)
                while view:  # the pipe is empty and a Job is small: one write, as a rule
                    view = view[os.write(ctl, view):]
            except OSError:  # the child ended while held (its exit is reported): the next one
                for stream in (child.stdin, child.stdout, child.stderr):
                    if stream is not None:
                        os.close(stream.detach())
                continue
            finally:
                os.close(ctl)
                if not others:
                    with contextlib.suppress(RuntimeError):  # the loop is gone: the client is closing
                        wake()
            return child

    def _track(self, child: AsyncChild) -> AsyncChild:
        early = self._early_exits.pop(child.id, None)
        if early is not None:
            self._exit(child, *early)
        else:
            self._children.setdefault(child.id, []).append(child)
            if self._broken is not None:  # the reader ended after the reply: no exit will come
                child._mark_exited()
        return child

    async def attach(self, child_id: str, offset: int = 0, *, trusted_results: bool = False) -> AsyncChild:
        """Follow a child spawned with ``detached=True`` (by this user, from any connection).

        The returned child's ``stdout``/``stderr`` stream the child's output from byte ``offset``
        of each stream, as far as the daemon's ring buffer still holds it: ``child.stdout_offset``
        says where the stream really starts (``stdout_offset - offset`` bytes were dropped). It has
        no stdin. ``wait()``/``result()`` report the exit, also for a child that ended before the
        attach (the daemon keeps that for a while). ``trusted_results``: as for ``spawn_child``.

        Raises:
            DaemonError: ``code="unknown-child"`` for an id that is not (or no longer) there or
                that belongs to another user; ``"bad-request"`` for a child that is not detached.
        """
        msg, fds = await self._request(lambda req: P.Attach(req, str(child_id), int(offset)))
        if not isinstance(msg, P.Attached) or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            raise ProtocolError(f"unexpected reply {type(msg).__name__} to attach")
        child = AsyncChild(self, msg, fds, trusted=bool(trusted_results), has_result=msg.has_result, detached=True)
        return self._track(child)


    async def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` in a fresh confined child and return its (JSON) value.

        The child's stdout and stderr are copied to this process's. Cancelling the call kills the
        child. For a sandbox config, a pool or ``trusted_results``, use ``spawn_child`` and
        ``result()``.

        Raises:
            RemoteError: ``fn`` raised; see AsyncChild.result for the others.
        """
        return await self._call(fn, args, kwargs)

    async def _call(self, fn: Callable[..., Any], args: tuple, kwargs: dict, **options: Any) -> Any:
        child = await self.spawn_child(fn, args, kwargs, stdin=DEVNULL, **options)
        async with child:  # an exception or a cancellation here kills the child
            failed: Exception | None = None
            async with anyio.create_task_group() as tg:
                for stream, name in ((child.stdout, "stdout"), (child.stderr, "stderr")):
                    if stream is not None:
                        tg.start_soon(_forward, stream, name)
                try:
                    await child.wait()  # not result(): its exception would cancel the forwarders early
                except Exception as e:  # (the connection is gone) raised past the group, as itself:
                    failed = e          # from inside, it came out wrapped in an ExceptionGroup
                    tg.cancel_scope.cancel()
            if failed is not None:
                try:
                    raise failed
                finally:
                    del failed  # (no cycle: this frame, the error, its traceback, this frame)
        return await child.result()


_PY = "%d.%d" % sys.version_info[:2]


class _Pickler(cloudpickle.Pickler):
    """cloudpickle's, noting whether it wrote a code object. cloudpickle sends a function defined
    by value (a lambda, one from __main__ or a notebook) as its bytecode, which only this Python
    version runs: another one's ran it as garbage (a child killed by SIGSEGV, or worse).
    Functions sent by name (print, a module's) run anywhere. (Looking for the bytes "CodeType"
    in the pickle instead refused an argument that held them.)"""

    holds_code = False

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is types.CodeType:
            self.holds_code = True
        return super().reducer_override(obj)


def _encode_target(target: Any, args: tuple, kwargs: dict | None, argv: list[str] | None,
                   script: bytes | None) -> tuple[str, bytes, str | None, str | None]:
    """A spawn's (kind, payload, target, py): what the child runs, pickled for it, and this
    Python's version when that holds bytecode (only this version can run it), else None."""
    kwargs = dict(kwargs or {})
    if argv is not None:
        return ("exec" if script is None else "script"), script or b"", None, None
    if target is None:
        return "child_main", pickle.dumps((tuple(args), kwargs), protocol=pickle.HIGHEST_PROTOCOL), None, None
    if isinstance(target, str):
        return "target", pickle.dumps((tuple(args), kwargs), protocol=pickle.HIGHEST_PROTOCOL), target, None
    if callable(target):
        with io.BytesIO() as f:
            pickler = _Pickler(f, protocol=pickle.HIGHEST_PROTOCOL)
            pickler.dump((target, tuple(args), kwargs))
            return "callable", f.getvalue(), None, _PY if pickler.holds_code else None
    raise TypeError(f"target must be a callable, 'module:function' or None, not {type(target).__name__}")


async def _forward(stream: PipeReceiveStream, name: str) -> None:
    """Copy a child's output stream to this process's sys.stdout/sys.stderr until EOF."""
    import codecs
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    async for chunk in stream:
        text = dec.decode(chunk)
        if text:
            out = getattr(sys, name)
            out.write(text)
            out.flush()


def _proc_reason(proc: subprocess.Popen | None) -> str:
    if proc is None or proc.poll() is None:
        return ""
    return f"the embedded daemon exited with status {proc.returncode}"


def _reap_embedded(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def embedded_command(*, preload_imports=(), child_main=None, executable=None, test_hooks=False,
                     forbid_secret_env=False, allow_env=(), daemon_args=()) -> list[str]:
    """``daemon_args``: more ``zygote serve`` flags, e.g. ``["--network"]``."""
    cmd = [sys.executable, "-m", "zygote", "serve", "--python", executable or sys.executable, *daemon_args]
    if forbid_secret_env:
        cmd += ["--forbid-secret-env"]
    for name in allow_env:
        cmd += ["--allow-env", name]
    for m in preload_imports:
        cmd += ["--preload", m]
    if child_main:
        cmd += ["--child-main", child_main]
    if test_hooks:
        cmd += ["--test-hooks"]
    return cmd


def start_embedded(*, preload_imports=(), environment=None, child_main=None, executable=None,
                   test_hooks=False, forbid_secret_env=False, allow_env=(),
                   daemon_args=()) -> tuple[socket.socket, subprocess.Popen]:
    """Start a private daemon (+ zygote) connected by a socketpair. Needs the ``zygote`` package."""
    import json
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    env_r, env_w = os.pipe2(os.O_CLOEXEC)
    cmd = embedded_command(preload_imports=preload_imports, child_main=child_main, executable=executable,
                           test_hooks=test_hooks, forbid_secret_env=forbid_secret_env, allow_env=allow_env,
                           daemon_args=daemon_args)
    cmd += ["--inherit-fd", str(theirs.fileno())]
    if environment is not None:
        cmd += ["--env-fd", str(env_r)]
    try:
        # A session of its own: the daemon and its zygotes are not the caller's program, and a
        # terminal's signals (Ctrl-C, Ctrl-Z, a hangup) are not theirs; the caller forwards what
        # its children should get (`zygote run` does). It ends when the socketpair closes (the
        # caller closed the client or died), not with the caller's process group.
        proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno(), env_r], stdin=subprocess.DEVNULL,
                                start_new_session=True)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
        os.close(env_r)
    with os.fdopen(env_w, "w") as f:
        if environment is not None:
            json.dump(dict(environment), f)
    return ours, proc


async def open_client(path: str) -> AsyncClient:
    """Connect to a daemon's socket. Use as ``async with await open_client(path) as client``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        await anyio.to_thread.run_sync(sock.connect, path)
    except OSError as e:
        sock.close()
        raise BrokenError(f"cannot connect to {path}: {e.strerror}") from None
    return await AsyncClient._from_socket(sock)


async def open_embedded(**kwargs: Any) -> AsyncClient:
    """Start a private daemon + zygote and connect to it (see ``Client.embedded``)."""
    sock, proc = start_embedded(**kwargs)
    try:
        return await AsyncClient._from_socket(sock, proc)
    except BaseException:
        # Failed or cancelled: the daemon goes now (closed, its socket would end it only once its
        # pools had started: seconds with pandas), waited for in a thread, not on the loop.
        proc.terminate()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_reap_embedded, proc)
        raise
