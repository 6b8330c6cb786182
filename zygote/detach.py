"""Detached children: their output kept in bounded ring buffers, replayed to whoever attaches.

A detached child writes its stdout/stderr into pipes only the daemon reads. ``pump`` reads each
pipe eagerly into a ``Ring`` (so the child never blocks on a full pipe, whoever is or is not
attached, unless its client is past its ``Budget``), dropping the oldest bytes past the ring's
capacity and counting them. ``tap`` feeds one
reader's pipe from a ring, from a stream offset on, until the child's end of the stream closed and
everything kept was written. Readers see positions in the child's whole output: a reader that asks
for an offset the ring has already dropped starts at ``Ring.start`` and learns how much it missed.
"""

from __future__ import annotations

import select
from typing import Awaitable, Callable

import trio

BLOCK = 1 << 16
# After a read of fewer than PACE_BELOW bytes, a relay waits PACE seconds before the next: a child
# writing a byte at a time then costs the daemon at most ~1/PACE rounds a second (each a read
# through a worker thread and a write), not one per write. Nobody's cgroup pays for the daemon's
# CPU: unpaced, six children at cpu=0.2 writing single bytes took a whole core of it. The first
# chunk still goes out at once; later small ones wait up to PACE.
PACE = 0.002
PACE_BELOW = 4096
# A tap whose child is quiet looks this often (seconds) for a reader that closed its end: a write
# would find out (EPIPE), but a quiet child gives it nothing to write, and the tap held its
# reader's place in max_attaches until the child ended.
READER_CHECK = 2.0


class Ring:
    """The last ``capacity`` bytes (at least) of one output stream.

    Kept as fixed-size blocks so appending and reading cost O(bytes) whatever the writes' sizes;
    the memory held is at most ``capacity + BLOCK``.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a ring buffer needs a positive capacity")
        self.capacity = capacity
        self._blocks: list[bytearray] = []
        self._base = 0  # stream offset of _blocks[0][0]
        self.start = 0  # first offset still held: everything before it was dropped
        self.end = 0  # total bytes the stream produced
        self.eof = False
        self._changed = trio.Event()

    @property
    def dropped(self) -> int:
        return self.start

    def append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if not self._blocks or len(self._blocks[-1]) == BLOCK:
                self._blocks.append(bytearray())
            last = self._blocks[-1]
            n = min(BLOCK - len(last), len(view))
            last += view[:n]
            view = view[n:]
        self.end += len(data)
        while len(self._blocks) > 1 and self.end - (self._base + BLOCK) >= self.capacity:
            del self._blocks[0]
            self._base += BLOCK
        self.start = max(self.start, self._base, self.end - self.capacity)
        self._wake()

    def close(self) -> None:
        """The writer's end is closed: no byte will follow ``end``."""
        self.eof = True
        self._wake()

    def read(self, pos: int, n: int = BLOCK) -> bytes:
        """Up to ``n`` bytes from stream offset ``pos`` (``start <= pos``); b"" at or past ``end``."""
        if pos < self.start:
            raise ValueError(f"offset {pos} was dropped (the ring starts at {self.start})")
        if pos >= self.end:
            return b""
        i, j = divmod(pos - self._base, BLOCK)
        return bytes(self._blocks[i][j:j + n])

    async def wait_past(self, pos: int) -> None:
        """Return once there is a byte at ``pos`` or the stream ended."""
        while self.end <= pos and not self.eof:
            await self._changed.wait()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


async def pace(n: int) -> None:
    """What a relay does after reading ``n`` bytes: wait PACE when the read was small."""
    if n < PACE_BELOW:
        await trio.sleep(PACE)


class Budget:
    """The output the daemon reads for one peer uid's children (detached children's pumps,
    counted relays), held to ``rate()`` bytes a second: a token bucket per uid, holding at
    most one second's worth. Each read is paid after it is made; a uid past its budget waits
    before its next read, so its children block on full pipes as they would with a slow reader.

    PACE makes many small writes cheap; this is for large ones: unpaced, one detached child
    writing 64 KiB blocks took 86% of the daemon's CPU, and every other client's spawns got 3x
    slower (a helper's red-team, session 32). Per uid, not per child: a client may run
    max_detached_per_client of them.
    """

    def __init__(self, rate: Callable[[], int], least: int = PACE_BELOW) -> None:
        self.rate = rate  # (read at each payment: a reload may change it)
        # What a read costs at least: the daemon's work is mostly per read (a worker thread's
        # syscall, a wakeup), and PACE holds each stream alone, so 128 streams of one client
        # writing a byte at a time took 86% of a core for 13 KiB/s (a helper's review). At
        # 4 KiB a read, the default rate allows one client 2048 reads a second.
        self.least = least
        self._held: dict[int, tuple[float, float]] = {}  # uid -> (bytes left, when)

    def charge(self, uid: int, n: int) -> float:
        """Take ``n`` bytes (``least`` at least) from ``uid``'s bucket; the seconds to wait
        before the next read."""
        rate = self.rate()
        now = trio.current_time()
        left, then = self._held.get(uid, (rate, now))
        left = min(rate, left + (now - then) * rate) - max(n, self.least)
        self._held[uid] = (left, now)
        if len(self._held) > 4096:  # (forget uids whose bucket is full again: nothing owed)
            self._held = {u: (b, t) for u, (b, t) in self._held.items() if b + (now - t) * rate < rate}
        return -left / rate if left < 0 else 0.0

    async def pay(self, uid: int, n: int) -> None:
        """``charge``, and wait what it says."""
        wait = self.charge(uid, n)
        if wait > 0:
            await trio.sleep(wait)


async def pump(stream, ring: Ring, count: Callable[[int], bool],
               pay: Callable[[int], Awaitable[None]] | None = None) -> None:
    """Read a detached child's output pipe (an ``_pipes.PipeEnd``) into ``ring`` until EOF.

    ``count(n)`` is told every chunk's size and returns False to stop reading (the output cap
    killed the child); the ring is closed either way. ``pay(n)`` (``Budget.pay`` for the
    child's uid) is awaited after each chunk.
    """
    try:
        while True:
            data = await stream.receive_some(BLOCK)
            if not data:
                break
            ring.append(data)
            if not count(len(data)):
                break
            await pace(len(data))
            if pay is not None:
                await pay(len(data))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        ring.close()
        stream.close()


async def tap(ring: Ring, out, pos: int, pay: Callable[[int], Awaitable[None]] | None = None) -> None:
    """Write ``ring`` from ``pos`` into ``out`` (an ``_pipes.PipeEnd`` on a reader's pipe), then
    close it. ``pay(n)`` is awaited after each write (an attach's replay: the reader's budget).

    A reader slower than the ring (the child wrote more than ``capacity`` since) skips what was
    dropped meanwhile. A reader that closed its end just ends the tap: at the next write, or
    within READER_CHECK while there is nothing to write.
    """
    try:
        while True:
            pos = max(pos, ring.start)
            data = ring.read(pos)
            if data:
                await out.send_all(data)
                pos += len(data)
                if pay is not None:
                    await pay(len(data))
            elif ring.eof and pos >= ring.end:
                return
            else:
                with trio.move_on_after(READER_CHECK) as quiet:
                    await ring.wait_past(pos)
                if quiet.cancelled_caught and reader_gone(out.fileno()):
                    return
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        out.close()


def reader_gone(fd: int) -> bool:
    """Whether nobody holds the read end of the pipe whose write end is ``fd`` (poll reports
    POLLERR then, whatever events were asked for; pipe_poll takes no lock)."""
    p = select.poll()
    p.register(fd, 0)
    return any(ev & select.POLLERR for _, ev in p.poll(0))
