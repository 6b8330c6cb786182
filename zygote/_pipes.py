"""Pipes a client can reach: the daemon's syscalls that take a pipe's lock run in worker threads.

Linux serialises everyone who reads, writes, opens or finally closes a pipe on one mutex, and a
reader can keep it as long as it likes: splice() from a pipe into a socket whose buffer is full
holds the mutex while it waits for room. O_NONBLOCK does not help, since waiting for the mutex is
not waiting for data. A client doing that to a pipe the daemon writes into (counted output, a
detached child's tap), to its own pipe the daemon reopens (stdio="fds" with max_output_bytes), or
to a pipe whose last reference the daemon drops (any fd a client sent) would stop the daemon's one
event-loop thread, and every other client with it.

So those syscalls run in worker threads, at most THREADS_PER_UID at a time for one client uid: a
client that pins its own pipes stalls its own output, and the threads it pins stay counted against
it. A thread stuck in a write is never abandoned with a descriptor the loop might close and reuse
under it: ``Outlet.close`` during a write leaves the close to the writing thread. Closes waiting for
a thread are counted per uid (``closing``) so the daemon can refuse new work to a uid that piles
them up, rather than collect its descriptors until the process runs out.

Children need none of this for the pipes the daemon reads: seccomp refuses them splice and its kin
(the default and strict profiles), and a write takes the mutex only for as long as the copy.
"""

from __future__ import annotations

import os
import threading
from typing import Callable

import trio

THREADS_PER_UID = 4  # worker threads one client uid may have in pipe syscalls at once
CLOSING_PER_UID = 256  # descriptors of one uid waiting to be closed before its spawns are refused


def close_now(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class PipeHands:
    """Worker threads for pipe syscalls, per client uid."""

    def __init__(self) -> None:
        self._limiters: dict[int, trio.CapacityLimiter] = {}
        self.closing: dict[int, int] = {}  # uid -> descriptors queued or being closed for it

    def limiter(self, uid: int) -> trio.CapacityLimiter:
        lim = self._limiters.get(uid)
        if lim is None:
            lim = self._limiters[uid] = trio.CapacityLimiter(THREADS_PER_UID)
        return lim

    def close(self, uid: int, fds) -> None:
        """Close ``fds`` (a client's, or pipe ends a client reads) in a worker thread, soon.
        Called from the loop's thread, from anywhere, cleanup included: it never waits."""
        fds = [fd for fd in fds if fd is not None and fd >= 0]
        if not fds:
            return
        try:
            trio.lowlevel.spawn_system_task(self._close, uid, fds, name="zygote-close")
        except RuntimeError:  # not in the daemon's run (it has ended): nobody is left to stall
            close_now(fds)
            return
        self.closing[uid] = self.closing.get(uid, 0) + len(fds)

    async def _close(self, uid: int, fds: list[int]) -> None:
        lock = threading.Lock()
        claimed = [False]  # the close is done once, by whichever thread claims it first

        def job() -> None:
            with lock:
                if claimed[0]:
                    return
                claimed[0] = True
            close_now(fds)

        try:
            await trio.to_thread.run_sync(job, limiter=self.limiter(uid), abandon_on_cancel=True)
        except trio.Cancelled:
            # The daemon is stopping. A close still waiting for a token is done by a thread
            # outside the limiter (one already started finishes, abandoned or not).
            with lock:
                mine, claimed[0] = not claimed[0], True
            if mine:
                trio.lowlevel.start_thread_soon(lambda: close_now(fds), lambda _: None)
            raise
        finally:
            left = self.closing.get(uid, 0) - len(fds)
            if left > 0:
                self.closing[uid] = left
            else:
                self.closing.pop(uid, None)

    async def reopen(self, uid: int, fd: int, opener: Callable[[int], int]) -> int:
        """``opener(fd)`` in a worker thread: a new descriptor for a client's pipe (the open takes
        the pipe's mutex). The thread works on a dup of ``fd``, so a close of the client's fd in
        the meantime cannot hand it another file; a result nobody waits for any more is closed."""
        dup = os.dup(fd)
        lock = threading.Lock()
        box: dict[str, object] = {"fd": None, "gone": False, "started": False}

        def job() -> None:
            with lock:
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
            await trio.to_thread.run_sync(job, limiter=self.limiter(uid), abandon_on_cancel=True)
        except BaseException:
            with lock:
                box["gone"] = True
                late, started = box["fd"], box["started"]
            if not started:  # cancelled before a thread was free: the dup is still ours
                self.close(uid, [dup])
            if late is not None:  # done just as we were cancelled
                self.close(uid, [late])
            raise
        with lock:
            box["gone"] = True
            return box["fd"]  # type: ignore[return-value]

    def outlet(self, fd: int, owner: Callable[[], int]) -> "Outlet":
        return Outlet(self, fd, owner)


class Outlet:
    """The daemon's nonblocking write end of a pipe a client reads. ``owner()`` names the uid whose
    threads it uses (a reserve child's output changes hands when a request takes it)."""

    def __init__(self, hands: PipeHands, fd: int, owner: Callable[[], int]) -> None:
        os.set_blocking(fd, False)  # (our own description; F_SETFL takes no pipe lock)
        self.fd = fd
        self._hands = hands
        self._owner = owner
        self._lock = threading.Lock()
        self._busy = False
        self._closed = False

    async def send_all(self, data: bytes) -> None:
        view = memoryview(bytes(data))  # immutable: an abandoned thread may still read it
        while view:
            if self._closed:
                raise trio.ClosedResourceError("outlet closed")
            n = await trio.to_thread.run_sync(self._write, view, limiter=self._hands.limiter(self._owner()),
                                              abandon_on_cancel=True)
            if n:
                view = view[n:]
            else:  # full: epoll tells when there is room (pipe_poll takes no mutex)
                await trio.lowlevel.wait_writable(self.fd)

    def _write(self, view: memoryview) -> int:
        """In a worker thread: one nonblocking write; 0 when the pipe is full."""
        with self._lock:
            if self._closed:
                raise trio.ClosedResourceError("outlet closed")
            self._busy = True
        try:
            return os.write(self.fd, view)
        except BlockingIOError:
            return 0
        finally:
            with self._lock:
                self._busy = False
                close = self._closed
            if close:  # closed while we wrote: the loop left the close to us
                close_now([self.fd])

    def close(self) -> None:
        if self._closed:
            return
        trio.lowlevel.notify_closing(self.fd)  # a task waiting for room wakes (ClosedResourceError)
        with self._lock:
            self._closed = True
            if self._busy:
                return
        self._hands.close(self._owner(), [self.fd])

    async def aclose(self) -> None:
        self.close()
