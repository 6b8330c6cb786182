"""The sans-I/O protocol: framing, strict decoding, fd accounting; and a live daemon under fuzzing."""

from __future__ import annotations

import array
import os
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zygote_client import Client, ProtocolError, SandboxConfig
from zygote_client import _protocol as P


def test_roundtrip_all_message_kinds():
    msgs = [
        P.Hello(P.VERSION, "x"),
        P.Spawn(req=1, kind="callable", payload=b"\x80\x04", sandbox=SandboxConfig(memory="64M")),
        P.Signal(req=2, child="abc-1", signum=15),
    ]
    d = P.daemon_decoder()
    for m in msgs:
        d.feed(P.encode(m))
        got, fds = d.next()
        assert got == m and fds == []


def test_byte_by_byte_feeding():
    frame = P.encode(P.Spawn(req=7, kind="target", target="os:getcwd"))
    d = P.daemon_decoder()
    for i in range(len(frame) - 1):
        d.feed(frame[i:i + 1])
        assert d.next() is None
    d.feed(frame[-1:])
    assert d.next()[0].req == 7


@pytest.mark.parametrize("mutate, text", [
    (lambda f: b"XX" + f[2:], "magic"),
    (lambda f: f[:2] + b"\x09" + f[3:], "version"),
    (lambda f: f[:4] + struct.pack("!I", P.MAX_FRAME + 1) + f[8:], "limit"),
    (lambda f: f[:8] + b"\xc1" * (len(f) - 8), "undecodable"),
])
def test_bad_frames_raise(mutate, text):
    d = P.daemon_decoder()
    d.feed(mutate(P.encode(P.Hello(P.VERSION))))
    with pytest.raises(ProtocolError, match=text):
        d.next()


def test_unknown_field_rejected():
    import msgspec
    body = msgspec.msgpack.encode({"type": "hello", "version": 1, "evil": True})
    d = P.daemon_decoder()
    d.feed(P.HEADER.pack(P.MAGIC, P.VERSION, 0, len(body)) + body)
    with pytest.raises(ProtocolError):
        d.next()


def test_fd_count_mismatch_closes_fds():
    r, w = os.pipe()
    d = P.daemon_decoder()
    d.feed(P.encode(P.Hello(P.VERSION)), [r])  # a frame that declares 0 fds
    with pytest.raises(ProtocolError, match="fds"):
        d.next()
    with pytest.raises(OSError):
        os.fstat(r)  # the decoder closed the unexpected fd
    os.close(w)


def test_invalid_sandbox_config_rejected_on_the_wire():
    import msgspec
    body = msgspec.msgpack.encode({"type": "spawn", "req": 1, "kind": "exec", "argv": ["x"],
                                   "sandbox": {"uid": 0}})
    d = P.daemon_decoder()
    d.feed(P.HEADER.pack(P.MAGIC, P.VERSION, 0, len(body)) + body)
    with pytest.raises(ProtocolError):
        d.next()


def _raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    return s


def _alive(path: str) -> None:
    with Client.connect(path) as c:
        assert c.run(print, ("alive",)).stdout == b"alive\n"


def test_live_daemon_survives_garbage(socket_daemon):
    cases = [
        b"",
        b"GET / HTTP/1.0\r\n\r\n",
        P.encode(P.Hello(P.VERSION))[:5],                      # truncated
        P.HEADER.pack(P.MAGIC, 99, 0, 0),                      # wrong version
        P.HEADER.pack(P.MAGIC, P.VERSION, 0, 1 << 30),         # oversized
        P.encode(P.Spawn(req=1, kind="exec", argv=["x"])),     # spawn before hello
        P.encode(P.Hello(P.VERSION)) + b"\x00" * 100,          # garbage after hello
    ]
    for data in cases:
        s = _raw(socket_daemon)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        except OSError:
            pass
        finally:
            s.close()
    _alive(socket_daemon)


def test_live_daemon_unexpected_fds(socket_daemon):
    s = _raw(socket_daemon)
    r, w = os.pipe()
    try:
        s.sendall(P.encode(P.Hello(P.VERSION)))
        data = P.encode(P.Signal(req=1, child="x", signum=9))  # declares 0 fds
        s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r, w]).tobytes())])
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        assert b"fds" in got  # an error reply naming the problem, then close
    finally:
        s.close()
        os.close(r)
        os.close(w)
    _alive(socket_daemon)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(min_size=0, max_size=64))
def test_decoder_fuzz_never_crashes(blob):
    d = P.daemon_decoder()
    d.feed(P.HEADER.pack(P.MAGIC, P.VERSION, 0, len(blob)) + blob)
    try:
        d.next()
    except ProtocolError:
        pass


def test_live_daemon_fuzz(socket_daemon):
    """Thousands of random frames (valid headers, random bodies) in one connection each batch."""
    import random
    rng = random.Random(1234)
    for batch in range(20):
        s = _raw(socket_daemon)
        try:
            s.sendall(P.encode(P.Hello(P.VERSION)))
            frames = []
            for _ in range(100):
                body = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 40)))
                frames.append(P.HEADER.pack(P.MAGIC, P.VERSION, 0, len(body)) + body)
            s.sendall(b"".join(frames))
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        except OSError:
            pass
        finally:
            s.close()
    _alive(socket_daemon)
