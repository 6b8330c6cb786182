"""The ring buffer behind detached children (zygote/detach.py), without a daemon."""

from __future__ import annotations

import os

import pytest
import trio

from zygote._pipes import PipeHands
from zygote.detach import BLOCK, Ring, pump, tap


def _all_from(ring: Ring, pos: int) -> bytes:
    out = bytearray()
    while chunk := ring.read(pos + len(out)):
        out += chunk
    return bytes(out)


def test_ring_keeps_the_newest_capacity_bytes_and_counts_the_rest():
    ring = Ring(100_000)
    stream = bytes(i % 251 for i in range(1_000_003))
    for i in range(0, len(stream), 777):  # writes of an odd size, across block boundaries
        ring.append(stream[i:i + 777])
    assert ring.end == len(stream)
    assert ring.start == ring.dropped == len(stream) - 100_000
    assert _all_from(ring, ring.start) == stream[-100_000:]
    assert _all_from(ring, len(stream) - 10) == stream[-10:]
    with pytest.raises(ValueError):
        ring.read(ring.start - 1)
    assert ring.read(ring.end) == b"" and ring.read(ring.end + 5) == b""


def test_ring_memory_is_bounded():
    ring = Ring(3 * BLOCK)
    for _ in range(1000):
        ring.append(b"x" * 1000)
    assert sum(len(b) for b in ring._blocks) <= 4 * BLOCK


def test_pump_and_tap_move_everything_in_order():
    """A writer through pump into a small ring, a tap out of it: a reader that keeps up loses
    nothing, and both ends are closed at EOF."""
    data = os.urandom(300_000)

    async def main():
        ring = Ring(1 << 20)
        src_r, src_w = os.pipe()
        dst_r, dst_w = os.pipe()
        got = bytearray()

        async def write():
            async with trio.lowlevel.FdStream(src_w) as s:
                await s.send_all(data)

        async def read():
            async with trio.lowlevel.FdStream(dst_r) as s:
                while chunk := await s.receive_some(1 << 16):
                    got.extend(chunk)

        async with trio.open_nursery() as n:
            hands = PipeHands()
            n.start_soon(pump, hands.end(src_r, lambda: 0), ring, lambda size: True)
            n.start_soon(tap, ring, hands.end(dst_w, lambda: 0), 0)
            n.start_soon(write)
            n.start_soon(read)
        assert bytes(got) == data and ring.eof

    trio.run(main)


def test_budget_holds_each_uid_to_its_rate_apart():
    """detach.Budget: a second's worth at once, then ``rate`` a second; each uid apart; a payer
    that overdrew waits what it owes; concurrent payers of one uid share the rate; a changed
    rate applies at the next payment. (Trio's virtual clock: the waits take no real time.)"""
    from zygote.detach import Budget

    rate = [1000]
    budget = Budget(lambda: rate[0], least=1)

    async def main():
        t0 = trio.current_time()
        await budget.pay(1, 1000)  # the burst: no wait
        assert trio.current_time() == t0
        await budget.pay(2, 1000)  # another uid's own burst
        assert trio.current_time() == t0
        await budget.pay(1, 500)  # overdrawn by 500: half a second
        assert trio.current_time() - t0 == pytest.approx(0.5)
        t1 = trio.current_time()
        async with trio.open_nursery() as n:  # two payers of one uid, 1000 each: 2 s together
            for _ in range(2):
                n.start_soon(budget.pay, 3, 1000)
        assert trio.current_time() - t1 == pytest.approx(1.0)  # (the first 1000 was its burst)
        rate[0] = 100
        t2 = trio.current_time()
        await budget.pay(4, 300)  # at the new rate: 100 of burst, 200 owed at 100/s
        assert trio.current_time() - t2 == pytest.approx(2.0)
        least = Budget(lambda: 1000, least=100)  # (a read costs at least that: per-read work)
        await least.pay(5, 1000)
        t3 = trio.current_time()
        for _ in range(10):
            await least.pay(5, 1)
        assert trio.current_time() - t3 == pytest.approx(1.0)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
