"""The daemon's pipe ends read in worker threads (zygote/_pipes.py), without a daemon."""

from __future__ import annotations

import os
import socket
import threading
import time

import trio

from zygote._pipes import PipeHands


def _counting(hands: PipeHands) -> list[int]:
    """Count the worker-thread jobs ``hands`` runs."""
    jobs = [0]
    run = hands.run

    async def counted(*args, **kw):
        jobs[0] += 1
        return await run(*args, **kw)

    hands.run = counted  # type: ignore[method-assign]
    return jobs


def _names(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        return None


def test_what_an_exited_writer_left_is_read_and_the_end_closed_in_one_thread_job():
    """A child's result pipe is usually read after the child has exited: its data and EOF are
    both there. One worker-thread job reads them and closes the end (it was three: the read, the
    read of EOF, the close), and what follows is EOF without another job."""
    async def main():
        hands = PipeHands()
        jobs = _counting(hands)
        r, w = os.pipe()
        name = _names(r)
        data = os.urandom(40_000)
        os.write(w, data)
        os.close(w)
        end = hands.end(r, lambda: 0, "result")
        assert await end.receive_all_there(1 << 16) == data
        assert jobs[0] == 1
        assert _names(r) != name, "the end was not closed at EOF"
        assert await end.receive_all_there(1 << 16) == b""
        assert jobs[0] == 1
        await end.aclose()  # (already closed: nothing to do, and no close of a reused number)
        assert hands.closing == {}

    trio.run(main)


def test_a_writer_still_running_gets_what_is_there_and_eof_later():
    """With the writer still there, a job returns what the pipe holds without waiting for more,
    at most ``max_bytes``; EOF comes once the writer closes, and closes the end."""
    async def main():
        hands = PipeHands()
        r, w = os.pipe()
        name = _names(r)
        end = hands.end(r, lambda: 0, "result")
        os.write(w, b"a" * 3000)
        assert await end.receive_all_there(1000) == b"a" * 1000
        assert await end.receive_all_there(1 << 16) == b"a" * 2000
        assert _names(r) == name

        async def later():
            await trio.sleep(0.05)
            os.write(w, b"b")
            os.close(w)

        async with trio.open_nursery() as n:
            n.start_soon(later)
            assert await end.receive_all_there(1 << 16) == b"b"
        assert await end.receive_all_there(1 << 16) == b""
        assert _names(r) != name
        await end.aclose()

    trio.run(main)


def test_closing_an_end_that_a_thread_closed_at_eof_wakes_nobody_else():
    """The end's number may be reused once a thread closed it at EOF: closing the PipeEnd after
    that must not notify (and wake with an error) a task waiting on the new file."""
    async def main():
        hands = PipeHands()
        r, w = os.pipe()
        os.close(w)
        end = hands.end(r, lambda: 0, "result")
        assert await end.receive_all_there(1 << 16) == b""
        r2, w2 = os.pipe()
        if r2 != r:  # (usually the same number already: the lowest free one)
            os.dup2(r2, r)
            os.close(r2)
            r2 = r
        got = []

        async def wait_on_new():
            await trio.lowlevel.wait_readable(r2)
            got.append(os.read(r2, 10))

        try:
            async with trio.open_nursery() as n:
                n.start_soon(wait_on_new)
                await trio.sleep(0.01)
                await end.aclose()
                await trio.sleep(0.01)
                os.write(w2, b"x")
        finally:
            os.close(r2)
            os.close(w2)
        assert got == [b"x"]

    trio.run(main)


def test_a_close_racing_a_thread_that_closes_at_eof_never_notifies_a_closed_number(monkeypatch):
    """The loop closes an end (a child's watch ending) while a thread job is reading it and about
    to meet EOF. Whichever closes the fd, the loop's notify_closing must come while the number
    is still the pipe's: were the thread free to close it just before, the number could already
    belong to another file, whose waiters the notify would wake with an error."""
    async def main():
        hands = PipeHands()
        r, w = os.pipe()
        name = _names(r)
        os.close(w)  # EOF waiting to be read
        end = hands.end(r, lambda: 0, "result")
        in_job, go = threading.Event(), threading.Event()
        read_all = end._read_all

        def held_read_all(fd, n):
            in_job.set()
            go.wait(10)
            return read_all(fd, n)

        end._read_all = held_read_all
        seen = []
        notify = trio.lowlevel.notify_closing

        def watching_notify(fd):
            go.set()  # the thread meets EOF now; give it time to close the fd if it can
            deadline = time.monotonic() + 0.3
            while time.monotonic() < deadline and _names(r) == name:
                time.sleep(0.01)
            seen.append(_names(r) == name)
            notify(fd)

        monkeypatch.setattr(trio.lowlevel, "notify_closing", watching_notify)
        async with trio.open_nursery() as n:
            n.start_soon(end.receive_all_there, 1 << 16)
            while not in_job.is_set():
                await trio.sleep(0.005)
            await end.aclose()
        assert seen == [True], "notify_closing came after the thread had closed the fd"
        assert _names(r) != name

    trio.run(main)


def test_one_job_returns_at_most_max_bytes_however_the_reads_come():
    """A job reads until the end would block, but never gathers more than ``max_bytes``: the
    result's caps are checked between jobs. (Datagrams: each read returns one, so a job's
    second read is the one that must be cut to what is left.)"""
    async def main():
        hands = PipeHands()
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for _ in range(4):
            b.send(b"x" * 1000)
        end = hands.end(a.detach(), lambda: 0, "result")
        got = await end.receive_all_there(1500)
        assert len(got) == 1500
        await end.aclose()
        b.close()

    trio.run(main)
