"""Pipes others can reach: the daemon's syscalls that take a pipe's lock run in worker threads.

Linux serialises everyone who reads, writes, opens or finally closes a pipe on one mutex, and
whoever holds an end can keep it as long as they like: splice() from a pipe into a socket whose
buffer is full holds it while waiting for room, splice() from an empty socket into a pipe holds it
while waiting for data. O_NONBLOCK does not help, since waiting for the mutex is not waiting for
data. A client doing that to a pipe the daemon writes into (counted output, a detached child's
tap), to its own pipe the daemon reopens (stdio="fds" with max_output_bytes), or to a pipe whose
last reference the daemon drops (any fd a client sent, any fd the daemon sent it) would stop the
daemon's one event-loop thread, and every other client with it. A child cannot splice (seccomp),
but its payload can hand its end of a pipe the daemon reads (its result pipe, its stdout when the
daemon counts it) to a process that can, over any unix socket it reaches.

So those syscalls run in worker threads, at most THREADS_PER_UID at a time for one client uid: a
uid that pins its pipes stalls its own output, and the threads it pins stay counted against it.
A thread stuck in a syscall is never left with a descriptor the loop might close and reuse under
it: ``PipeEnd.close`` during a read or write leaves the close to that thread. Closes waiting for a
thread are counted per uid (``closing``) so the daemon can stop taking work and fds from a uid that
piles them up, rather than collect its descriptors until the process runs out.

Not covered: the status pipe, read on the loop thread (it is on every spawn's path). Its write end
is the payload process's only until just before the payload runs, and PID 1's (our reaper) after.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Callable

import trio

THREADS_PER_UID = 4  # worker threads one client uid may have in pipe syscalls at once ...
LANE_THREADS_PER_UID = 2  # ... and, apart, for reading its children's results, for looking at
# the host paths its requests name, and for the /proc reads before a signal (lanes, see limiter)
CLOSING_PER_UID = 256  # a uid's descriptors waiting to be closed before the daemon stops for it
HELD_PER_UID = 1024  # fds a uid sent that the daemon holds (or may be about to receive), at most
SCM_MAX_FD = 253  # the most fds the kernel passes in one message
RETRY = 0.1  # seconds before retrying when no thread could be started (out of tasks or memory)


def close_now(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class PipeHands:
    """Worker threads, per client uid, for the syscalls a client can make wait: on pipe locks,
    and stats of the paths it names (an automount, a FUSE mount)."""

    def __init__(self) -> None:
        self._limiters: dict[tuple[int, str], trio.CapacityLimiter] = {}
        self.closing: dict[int, int] = {}  # uid -> descriptors queued or being closed for it
        self.held: dict[int, int] = {}  # uid -> fds it sent, not yet closed (+ receives in progress)
        self._settled: dict[int, trio.Event] = {}  # uid -> set when one of those counts drops

    def limiter(self, uid: int, lane: str = "io") -> trio.CapacityLimiter:
        """``uid``'s threads for ``lane``: "io" (pipe writes, reads, closes), "result" (its
        children's result pipes), "paths" (the host paths its requests name), "probe" (/proc
        reads before a signal). Apart, so that threads one kind of wait pins (a client splicing
        its output into a slow socket, a dead FUSE server) leave the others their own."""
        lim = self._limiters.get((uid, lane))
        if lim is None:
            size = THREADS_PER_UID if lane == "io" else LANE_THREADS_PER_UID
            lim = self._limiters[(uid, lane)] = trio.CapacityLimiter(size)
        return lim

    def stuck(self, uid: int) -> bool:
        """Whether the daemon must take nothing more from ``uid`` now: too many of its fds wait
        for a close (threads stuck on locks its processes hold), or it would hold more of its fds
        than HELD_PER_UID once the next message (up to SCM_MAX_FD fds) is in."""
        return (self.closing.get(uid, 0) > CLOSING_PER_UID
                or self.held.get(uid, 0) + SCM_MAX_FD > HELD_PER_UID)

    async def settle(self, uid: int) -> None:
        """Return once ``uid`` is not stuck (see ``stuck``)."""
        while self.stuck(uid):
            await self._settled.setdefault(uid, trio.Event()).wait()

    def hold(self, uid: int, n: int) -> None:
        """Count ``n`` fds (negative: let go) as held for ``uid``."""
        left = self.held.get(uid, 0) + n
        if left > 0:
            self.held[uid] = left
        else:
            self.held.pop(uid, None)
        if n < 0 and uid in self._settled and not self.stuck(uid):
            self._settled.pop(uid).set()

    def drop_received(self, uid: int, fds) -> None:
        """Close fds ``uid`` sent (counted with ``hold``): they stop counting once closed."""
        self.close(uid, fds, held=True)

    async def run(self, uid: int, fn: Callable, *args, lane: str = "io"):
        """``fn(*args)`` in a worker thread of ``uid``'s (abandoned if cancelled). A thread that
        cannot be started (out of tasks or memory) is retried, not turned into an error."""
        while True:
            try:
                return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter(uid, lane),
                                                     abandon_on_cancel=True)
            except RuntimeError as e:
                if "thread" not in str(e):
                    raise
            await trio.sleep(RETRY)

    def close(self, uid: int, fds, *, held: bool = False) -> None:
        """Close ``fds`` in a worker thread of ``uid``'s, soon. From the loop's thread, cleanup
        included: it never waits. ``held``: they were counted with ``hold``."""
        fds = [fd for fd in fds if fd is not None and fd >= 0]
        if not fds:
            return
        try:
            trio.lowlevel.spawn_system_task(self._close, uid, fds, held, name="zygote-close")
        except RuntimeError:  # not in the daemon's run (it has ended): nobody is left to stall
            close_now(fds)
            if held:
                self.hold(uid, -len(fds))
            return
        self.closing[uid] = self.closing.get(uid, 0) + len(fds)

    async def _close(self, uid: int, fds: list[int], held: bool) -> None:
        # A system task: it must never raise (that would end the daemon's run).
        lock = threading.Lock()
        claimed = [False]  # the close is done once, by whichever thread claims it first

        def job() -> None:
            with lock:
                if claimed[0]:
                    return
                claimed[0] = True
            close_now(fds)

        try:
            await self.run(uid, job)
        except trio.Cancelled:
            # The daemon is stopping. A close still waiting for a token is done by a thread
            # outside the limiter (one already started finishes, abandoned or not).
            with lock:
                mine, claimed[0] = not claimed[0], True
            if mine:
                try:
                    trio.lowlevel.start_thread_soon(lambda: close_now(fds), lambda _: None)
                except RuntimeError:
                    pass  # no thread at all: the process is about to end, and its fds with it
            raise
        except BaseException:  # (nothing else is expected from close_now; never end the run)
            pass
        finally:
            left = self.closing.get(uid, 0) - len(fds)
            if left > 0:
                self.closing[uid] = left
            else:
                self.closing.pop(uid, None)
            if held:
                self.hold(uid, -len(fds))  # (wakes settle too)
            elif uid in self._settled and not self.stuck(uid):
                self._settled.pop(uid).set()

    async def reopen(self, uid: int, fd: int, opener: Callable[[int], int]) -> int:
        """``opener(fd)`` in a worker thread: a new descriptor for a client's pipe (the open takes
        the pipe's mutex). The thread works on a dup of ``fd``, so a close of the client's fd in
        the meantime cannot hand it another file. Exactly one side owns the dup: the thread once it
        started, else the caller; a result nobody waits for any more is closed."""
        dup = os.dup(fd)
        lock = threading.Lock()
        box: dict[str, object] = {"fd": None, "gone": False, "started": False}

        def job() -> None:
            with lock:
                if box["gone"]:
                    return  # the caller gave up before we started: the dup is its to close
                box["started"] = True
            try:
                new = opener(dup)
            finally:
                os.close(dup)
            with lock:
                if not box["gone"]:
                    box["fd"] = new
                    return
            os.close(new)  # abandoned: nobody will take it

        try:
            await self.run(uid, job)
        except BaseException:
            with lock:
                box["gone"] = True
                late, started = box["fd"], box["started"]
            if not started:
                self.close(uid, [dup])
            if late is not None:  # done just as we were cancelled
                self.close(uid, [late])
            raise
        with lock:
            box["gone"] = True
            return box["fd"]  # type: ignore[return-value]

    def end(self, fd: int, owner: Callable[[], int], lane: str = "io") -> "PipeEnd":
        return PipeEnd(self, fd, owner, lane)


class PipeEnd:
    """One of the daemon's pipe ends whose other end someone else may hold, made nonblocking.
    ``owner()`` names the uid whose threads it uses (a reserve child changes hands when taken).
    Each read or write is one nonblocking syscall in a worker thread (``receive_all_there``:
    reads until the pipe is empty, in one thread); readiness is waited for with epoll on the loop
    (pipe_poll takes no mutex)."""

    def __init__(self, hands: PipeHands, fd: int, owner: Callable[[], int], lane: str = "io") -> None:
        os.set_blocking(fd, False)  # (our own description; F_SETFL takes no pipe lock)
        self.fd = fd
        self._lane = lane
        self._hands = hands
        self._owner = owner
        self._lock = threading.Lock()
        self._busy = False  # a thread job is in a syscall on it (one at a time: one reader or writer)
        self._closed = False
        self._eof = False  # met by receive_all_there, which then closed the end

    def fileno(self) -> int:
        return self.fd

    async def send_all(self, data: bytes) -> None:
        view = memoryview(bytes(data))  # immutable: an abandoned thread may still read it
        while view:
            if self._closed:
                raise trio.ClosedResourceError("pipe end closed")
            n = await self._hands.run(self._owner(), self._guarded, os.write, view, lane=self._lane)
            if n:
                view = view[n:]
                continue
            if self._closed:  # (closed by another task while the thread ran)
                raise trio.ClosedResourceError("pipe end closed")
            await trio.lowlevel.wait_writable(self.fd)

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        return await self._receive(os.read, max_bytes)

    async def receive_all_there(self, max_bytes: int = 65536) -> bytes:
        """As ``receive_some``, but one thread job reads all the pipe holds (up to ``max_bytes``),
        and meeting EOF there closes this end at once (nothing more can come); the next call
        returns b"". A writer that has exited leaves its data and EOF together: one thread hop,
        not three (the read, the read of EOF, the close)."""
        if self._eof:
            return b""
        return await self._receive(self._read_all, max_bytes)

    async def _receive(self, op, max_bytes: int) -> bytes:
        while True:
            if self._closed:
                raise trio.ClosedResourceError("pipe end closed")
            await trio.lowlevel.wait_readable(self.fd)
            data = await self._hands.run(self._owner(), self._guarded, op, max_bytes, lane=self._lane)
            if data is not None:
                return data

    def _read_all(self, fd: int, max_bytes: int) -> bytes | None:
        # (in a worker thread, inside _guarded; its finally closes the end if we met EOF)
        chunks, n = [], 0
        while n < max_bytes:
            try:
                data = os.read(fd, max_bytes - n)
            except BlockingIOError:
                break
            except OSError:
                if chunks:  # (what came first is kept; the error comes again with the next job)
                    break
                raise
            if not data:
                self._eof = True
                break
            chunks.append(data)
            n += len(data)
        if not chunks:
            return b"" if self._eof else None
        return b"".join(chunks)

    def _guarded(self, op, arg):
        """In a worker thread: ``op(fd, arg)`` (os.read, os.write, or _read_all); None (or 0 for a
        write) when it would block. Closes the end after it when the loop closed it meanwhile, or
        when _read_all met EOF."""
        with self._lock:
            if self._closed:
                raise trio.ClosedResourceError("pipe end closed")
            self._busy = True
        try:
            return op(self.fd, arg)
        except BlockingIOError:
            return 0 if op is os.write else None
        except OSError as e:
            if e.errno == errno.EBADF:
                raise trio.ClosedResourceError("pipe end closed") from None
            raise
        finally:
            with self._lock:
                self._busy = False
                # Closed while we were in the syscall (the loop left the close to us), or EOF
                # met by _read_all (no task waits on the end then: its one reader awaits us).
                close = self._closed or self._eof
                self._closed = close
            if close:
                close_now([self.fd])

    def close(self) -> None:
        # The lock is held across notify_closing: a thread closing the end at EOF waits for it,
        # so the number cannot be reused before the loop's waiters are woken.
        with self._lock:
            if self._closed:
                return
            self._closed = True
            trio.lowlevel.notify_closing(self.fd)  # a task waiting for readiness wakes (ClosedResourceError)
            if self._busy:
                return
        self._hands.close(self._owner(), [self.fd])

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()
