"""anyio byte streams over a child's pipe ends, for trio and asyncio alike.

The fds come from the daemon with SCM_RIGHTS. They are switched to non-blocking and read or
written directly, waiting with ``anyio.wait_readable``/``wait_writable`` (epoll under asyncio,
trio's own I/O manager under trio): no thread per stream.
"""

from __future__ import annotations

import os

import anyio
from anyio.abc import ByteReceiveStream, ByteSendStream

CHUNK = 1 << 16


class _PipeEnd:
    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd

    def fileno(self) -> int:
        if self._fd < 0:
            raise anyio.ClosedResourceError
        return self._fd

    def detach(self) -> int:
        """Give up the fd (switched back to blocking) without closing it; the stream is closed."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            raise anyio.ClosedResourceError
        os.set_blocking(fd, True)
        return fd

    async def aclose(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            anyio.notify_closing(fd)  # a task waiting on it wakes with ClosedResourceError
            os.close(fd)


class PipeReceiveStream(_PipeEnd, ByteReceiveStream):
    """A child's stdout or stderr. ``receive`` raises ``anyio.EndOfStream`` once the child (and
    every process it made) has closed its end."""

    async def receive(self, max_bytes: int = CHUNK) -> bytes:
        while True:
            try:
                data = os.read(self.fileno(), max_bytes)
            except BlockingIOError:
                await anyio.wait_readable(self.fileno())
                continue
            if not data:
                raise anyio.EndOfStream
            return data

    async def read_all(self) -> bytes:
        """Everything until EOF."""
        chunks = []
        async for chunk in self:
            chunks.append(chunk)
        return b"".join(chunks)


class PipeSendStream(_PipeEnd, ByteSendStream):
    """A child's stdin. Closing it (``aclose``) is the child's EOF."""

    async def send(self, item: bytes) -> None:
        view = memoryview(item)
        while view:
            try:
                n = os.write(self.fileno(), view[:CHUNK])
            except BlockingIOError:
                await anyio.wait_writable(self.fileno())
                continue
            except BrokenPipeError:
                raise anyio.BrokenResourceError("the child closed its stdin") from None
            view = view[n:]
