"""The wire protocol, sans I/O: messages, framing and the fd bookkeeping of SCM_RIGHTS.

Used unchanged by the trio daemon and by both client faces; nothing here touches a socket.

A frame is an 8-byte header followed by a msgpack body::

    b"ZG" | version: u8 | nfds: u8 | length: u32 (big endian) | body (length bytes)

The body is one tagged message (``{"type": "spawn", ...}``) decoded strictly: unknown fields, wrong
types and unknown tags are errors. File descriptors ride on the ``sendmsg`` that carries the frame's
first byte; the receiver counts them against ``nfds``. Payloads (pickles) are opaque ``bytes``
fields: nothing outside a confined child ever unpickles them.

Fields left at their default are not sent (``omit_defaults``), so a field added to version 1 with a
default changes nothing on the wire until it is used: a peer that predates it decodes the frame.
"""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING, Annotated, Callable, Literal, Union

import msgspec

from ._config import ExitStatus, SandboxConfig
from ._errors import ProtocolError, one_of
from ._workspace import ENTRIES_MAX, ExportResult

VERSION = 1
MAGIC = b"ZG"
HEADER = struct.Struct("!2sBBI")
MAX_FRAME = 256 << 20  # payloads (cloudpickled closures with data) can be large
MAX_FDS = 4
HANDOFF_MIN = 1 << 20  # frames from this size on are decoded from their own buffer (see FrameDecoder.next)


class _Msg(msgspec.Struct, frozen=True, tag_field="type", forbid_unknown_fields=True, omit_defaults=True):
    pass


# ---- client -> daemon -------------------------------------------------------------------------

# Collection sizes a decoder refuses before building anything (msgspec checks an array's or a
# map's length from its header): the daemon decodes a request on its event loop, and a frame of
# many tiny items grows ≈ 25-fold in Python objects (a 128 MiB frame of two-letter argv entries
# took 3.3 GB and held every client for 4.6 s; a helper's review). Far above any real use: exec's
# own limit (ARG_MAX, ≈ 2 MB of argv and environment together) comes first.
ARGV_MAX = 131072
ENV_MAX = 65536
Argv = Annotated[list[str], msgspec.Meta(max_length=ARGV_MAX)]
Env = Annotated[dict[str, str], msgspec.Meta(max_length=ENV_MAX)]


class Hello(_Msg, tag="hello"):
    """First message of a connection. The daemon answers Welcome or Error and closes.

    ``client``: the client's name, then the features it speaks, space-separated (a field every
    daemon accepts as it is, so a feature named here costs an older daemon nothing). Features:
    ``sandbox-inherits``: a Spawn's SandboxConfig fields left None are the pool's. Without it
    (a client from before session 23, which leaves out a field equal to the built-in default,
    so that its explicit ``seccomp_profile="default"`` reads as unset) they are the built-in
    defaults. ``begun``: the client sends Begun for each leased child it starts with a Job
    that has a timeout (the daemon then answers Welcome with ``begun`` set, and reads such a
    connection's held children's Started reports when it needs them, see Begun).
    """

    version: int
    client: Annotated[str, msgspec.Meta(max_length=1024)] = ""


CLIENT = "zygote_client sandbox-inherits begun"  # this client's Hello.client


KINDS = ("callable", "target", "child_main", "exec", "script")
if TYPE_CHECKING:
    Kind = Literal["callable", "target", "child_main", "exec", "script"]
else:
    Kind = str  # (on the wire; checked in Spawn.__post_init__: see _errors.one_of)


class Spawn(_Msg, tag="spawn"):
    """Ask for a child.

    ``kind`` says what ``payload`` holds (all pickles are opened only inside the confined child):
    ``"callable"``: cloudpickle of (func, args, kwargs); ``"target"``: ``target`` is
    "module:function" and payload is a pickle of (args, kwargs); ``"child_main"``: the pool's
    child_main with payload (args, kwargs); ``"exec"``: ``argv`` is exec'd after confinement.

    ``trusted_results``: the child returns its value as a cloudpickle (which the client will load)
    instead of JSON. The daemon only relays it.

    ``detached``: the child is not killed when this connection closes. The daemon reads its
    stdout/stderr into a bounded ring buffer per stream (``Attach`` reads it from an offset); the
    spawner's stdout/stderr fds are fed from that buffer. Needs ``stdio="pipe"``.
    """

    req: int
    kind: Kind
    # Decoded as a view of the received frame's buffer (no copy: see FrameDecoder); a client
    # builds it from bytes, which encode alike.
    payload: memoryview = b""
    target: str | None = None
    argv: Argv | None = None
    pool: str | None = None
    process_name: str | None = None
    env: Env | None = None
    sandbox: SandboxConfig | None = None
    stdin: bool = True
    stdio: str = "pipe"  # "pipe": the daemon makes pipes; "fds": the frame carries stdin/out/err
    timeout: float | None = None  # wall-clock seconds; the stricter of this and sandbox.timeout wins
    trusted_results: bool = False
    detached: bool = False  # outlives this connection; output kept in the daemon's ring buffer
    py: str | None = None  # "3.11": the Python that pickled a callable (only one of that version can run it)
    test_landlock_abi: int = 0  # test-only: require this Landlock ABI (simulates an older kernel)
    test_relax_mounts: bool = False  # test-only: host mount tree (to test Landlock alone)
    test_fail_step: str | None = None  # honoured only by a daemon started with --test-hooks

    def __post_init__(self) -> None:
        one_of(self.kind, KINDS, "kind")


class Signal(_Msg, tag="signal"):
    """Send ``signum`` to one of this connection's children (the whole tree for SIGKILL)."""

    req: int
    child: str
    signum: int


class Attach(_Msg, tag="attach"):
    """Follow a detached child from this connection: its output from ``offset`` (in bytes of each
    stream) and its exit. Allowed for the peer uid that spawned it, and for root; anyone else gets
    ``Error(code="unknown-child")``, as for an id that does not exist."""

    req: int
    child: str
    offset: int = 0


class Status(_Msg, tag="status"):
    """Ask for the daemon's state (``zygote status``)."""

    req: int


class Lease(_Msg, tag="lease"):
    """Take one of the pool's reserve children into this connection's hands, to start it later
    by writing a Job straight to it (no daemon round trip on the spawn). Answered by Leased, or by
    SpawnFailed (``code`` "empty": none waiting now; "bad-request": this pool does not lease).
    A leased child counts against the connection's child limits from now on, dies with the
    connection, and runs nothing until its Job; its deadline starts when it reads the Job."""

    req: int
    pool: str | None = None


class Begun(_Msg, tag="begun"):
    """The client wrote the Job of ``child``, one it leased, with this ``timeout`` (sent only on
    a connection whose Welcome said ``begun``, only for a Job with a timeout; no answer). The
    daemon reads the child's Started report that many seconds later (the report, not this
    message, says what the Job's timeout is and when the child read it: the deadline runs from
    then). Otherwise the daemon reads that report when the child exits or when the pool's own
    timeout would run out, whichever is first: not at once, since the child's write would wake
    the daemon just as the child starts, on the CPU it runs on (≈ 0.3-0.45 ms of a leased spawn
    after an idle second). A client that leaves Begun out, or names a longer timeout here, only
    delays its own Job's timeout; the pool's holds."""

    child: str
    timeout: float


# ---- daemon -> client -------------------------------------------------------------------------


class Welcome(_Msg, tag="welcome"):
    version: int
    daemon_pid: int
    pools: list[str]
    leases: bool = False  # the daemon answers Lease (a client never sends one otherwise)
    begun: bool = False  # the daemon takes Begun (said only to a client whose Hello names "begun")


class Spawned(_Msg, tag="spawned"):
    """The child is confined and running its payload. fds: stdin writer (if asked), stdout and
    stderr readers, in that order."""

    req: int
    child: str
    pid: int
    has_stdin: bool


class Leased(_Msg, tag="leased"):
    """Reply to Lease: a confined child waiting for its Job. fds: its stdin writer, stdout and
    stderr readers, and the write end of its control pipe, in that order. The client starts it
    by writing one ``job_frame`` on the control pipe (and closing it); its exit is reported as for
    any child (Exited), also when it ends unused."""

    req: int
    child: str
    pid: int


class Job(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """What starts a confined child that waits for a request (a reserve child): the daemon writes
    one for a Spawn that takes a reserve child, a client one for a child it leased. The fields
    are those of Spawn; the child checks them (kind, target, argv) before anything runs, and
    reports the kind and timeout to the daemon, which arms the deadline (no later than the
    pool's) from then."""

    kind: str
    payload: bytes = b""
    target: str | None = None
    argv: Argv | None = None
    env: Env | None = None  # None: the pool's (the child has it already)
    process_name: str | None = None
    result_pickle: bool = False  # encode the return value with cloudpickle (the client's trusted_results)
    timeout: float | None = None  # seconds from the Job (a leased child's; the daemon caps it)
    py: str | None = None  # as Spawn.py: the child refuses a callable pickled by another Python


JOB_LEN = struct.Struct("!I")  # a Job frame: this length, then the msgpack body (as every child pipe's frame)


def job_frame(job: Job) -> bytes:
    body = _encoder.encode(job)
    return JOB_LEN.pack(len(body)) + body


class Attached(_Msg, tag="attached"):
    """Reply to Attach. fds: stdout and stderr readers, fed from the daemon's ring buffers, which
    reach EOF after the child ended and everything kept was delivered. ``stdout_offset`` /
    ``stderr_offset``: the stream position of their first byte (above the asked offset when the
    buffer had already dropped older bytes). ``has_result``: a payload kind with a return value.
    An ``Exited`` for the child follows on this connection when it ends (at once if it has)."""

    req: int
    child: str
    pid: int
    stdout_offset: int = 0
    stderr_offset: int = 0
    has_result: bool = True


class SpawnFailed(_Msg, tag="spawn-failed", omit_defaults=True):
    """The spawn did not happen; ``step`` names the confinement step when one failed, ``path`` the
    refused workspace entry (code "workspace")."""

    req: int
    message: str
    step: str = ""
    errno: int = 0
    hint: str = ""
    code: str = "sandbox"  # "sandbox" | "unavailable" | "bad-request" | "retry" | "limit" | "workspace"
    path: str | None = None


class Ok(_Msg, tag="ok"):
    req: int


class Error(_Msg, tag="error"):
    """A request was refused; ``req`` is 0 when the error is about the connection itself."""

    req: int
    code: str
    message: str


class Exited(_Msg, tag="exited", omit_defaults=True):
    """A child of this connection ended and was reaped.

    ``export`` is present only for a child with ``SandboxConfig.export`` (so older clients never
    see the field); when it has no ``error`` the frame carries one fd: a sealed memfd holding the
    export archive (see ``_workspace``).

    ``result_kind`` says what ``result`` holds, the payload's outcome as the child encoded it
    (the daemon never decodes it): ``""`` no result (exec/script kinds, sys.exit, killed);
    ``"json"`` the return value as JSON text; ``"pickle"`` the return value as a cloudpickle
    (only for a Spawn with ``trusted_results``); ``"error"`` the payload raised: JSON
    ``{"type", "message", "traceback"}``; ``"unencodable"`` the value could not be encoded: JSON
    ``{"type", "message"}``; ``"too-large"`` over the daemon's ``max_result_bytes`` (no bytes);
    ``"invalid"`` the child wrote something that is not one complete record (no bytes).
    """

    child: str
    status: ExitStatus
    export: ExportResult | None = None
    result_kind: str = ""
    result: bytes = b""


class PoolStatus(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    python: str
    preload: list[str]
    zygotes: int  # configured
    zygotes_running: int
    restarts: int
    reserve: int = 0  # children it keeps confined ahead of requests (both reserves)
    reserve_waiting: int = 0  # ... waiting now (made, no request yet)


class ChildStatus(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    pool: str
    pid: int
    peer_uid: int
    age: float  # seconds since the spawn


class StatusReply(_Msg, tag="status-reply"):
    """The daemon's state. ``children`` lists only the asking peer's own (root sees all);
    ``running`` counts every child."""

    req: int
    daemon_pid: int
    uptime: float
    pools: list[PoolStatus]
    running: int
    children: list[ChildStatus]
    counters: dict[str, int]


ClientMessage = Union[Hello, Spawn, Signal, Attach, Status, Lease, Begun]
DaemonMessage = Union[Welcome, Spawned, Leased, Attached, SpawnFailed, Ok, Error, Exited, StatusReply]

_encoder = msgspec.msgpack.Encoder()


def encode(msg: _Msg, nfds: int = 0) -> bytearray:
    """Frame one message; the caller sends exactly ``nfds`` fds with the frame's first byte."""
    if not 0 <= nfds <= MAX_FDS:
        raise ValueError(f"at most {MAX_FDS} fds per frame")
    # One buffer, header first: a frame may carry a result or payload of many MiB, so no copy
    # for the concatenation.
    frame = bytearray(HEADER.size)
    _encoder.encode_into(msg, frame, HEADER.size)
    n = len(frame) - HEADER.size
    if n > MAX_FRAME:
        raise ProtocolError(f"frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
    HEADER.pack_into(frame, 0, MAGIC, VERSION, nfds, n)
    return frame


_probes: dict[type, msgspec.msgpack.Decoder] = {}


def check(msg: _Msg) -> None:
    """Raise TypeError when the daemon could not decode ``msg`` (ValueError for a collection past
    its bound: ARGV_MAX and kin): a field of the wrong type (an ``env`` value that is not a str,
    a ``timeout`` given as a string) is a protocol error there, which ends the connection and
    every child on it. The bulky parts (a payload's bytes, a
    workspace's files: made and checked by this library) are left out of the check."""
    probe = msg
    if isinstance(getattr(msg, "payload", None), bytes) and msg.payload:
        probe = msgspec.structs.replace(probe, payload=b"")
    sandbox = getattr(msg, "sandbox", None)
    workspace = getattr(sandbox, "workspace", None)
    if getattr(workspace, "entries", None):  # (its limits and allow-list are the caller's: checked)
        if len(workspace.entries) > ENTRIES_MAX:  # (the decoder's bound, which the probe leaves out)
            raise ValueError(f"{type(msg).__name__}: too many items: a workspace of {len(workspace.entries)} "
                             f"entries, the protocol's maximum is {ENTRIES_MAX}")
        probe = msgspec.structs.replace(probe, sandbox=msgspec.structs.replace(
            sandbox, workspace=msgspec.structs.replace(workspace, entries=())))
    decoder = _probes.get(type(msg))
    if decoder is None:
        decoder = _probes[type(msg)] = msgspec.msgpack.Decoder(type(msg))
    try:
        decoder.decode(_encoder.encode(probe))
    except msgspec.ValidationError as e:
        if "of length <=" in str(e):  # (a collection past the protocol's bound: ARGV_MAX and kin)
            raise ValueError(f"{type(msg).__name__}: too many items: {e}") from None
        raise TypeError(f"{type(msg).__name__}: a field of the wrong type: {e}") from None
    except (msgspec.EncodeError, TypeError, ValueError, OverflowError) as e:
        raise TypeError(f"{type(msg).__name__}: a field of the wrong type: {e}") from None


class FrameDecoder:
    """Turns received bytes (and the fds that came with them) into messages.

    Feed what each ``recvmsg`` returned; fds received in one call belong to the frame holding the
    last byte of that call (the kernel stops a stream read right after the skb that carried fds).
    Any violation raises ProtocolError; the decoder is then unusable and ``close_fds`` releases
    every fd it still holds. ``close`` is how it lets fds go (the daemon's closes a client's fds
    in worker threads: the last close of a pipe can wait on that pipe's lock).
    """

    def __init__(self, message_type: object, *, max_frame: int = MAX_FRAME,
                 close: Callable[[list[int]], None] | None = None) -> None:
        self._close = close or _close_all
        self._decoder = msgspec.msgpack.Decoder(message_type)
        self._max_frame = max_frame
        self._buf = bytearray()
        self._base = 0  # stream offset of self._buf[0]
        self._fd_batches: list[tuple[int, list[int]]] = []  # (stream offset of last byte, fds)
        self._broken = False
        self.last_length = 0  # body length of the frame ``next`` returned last

    def feed(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        if fds and sum(len(b) for _, b in self._fd_batches) + len(fds) > 2 * MAX_FDS:
            # Fed after the previous bytes were drained, what is held belongs to one unfinished
            # frame (at most MAX_FDS) and the new batch to it or the next: more is a peer hoarding
            # fds in a frame it never finishes.
            self._fd_batches.append((self._base + len(self._buf), list(fds)))
            self._broken = True
            raise ProtocolError("more fds than an unfinished frame may carry")
        if fds:
            if not data:
                self._fd_batches.append((self._base + len(self._buf), list(fds)))
                self._broken = True
                raise ProtocolError("fds received without data")
            self._fd_batches.append((self._base + len(self._buf) + len(data) - 1, list(fds)))
        self._buf += data

    def next(self) -> tuple[object, list[int]] | None:
        """Return the next complete (message, fds), or None if more bytes are needed."""
        if self._broken:
            raise ProtocolError("decoder is broken after an earlier error")
        if len(self._buf) < HEADER.size:
            return None
        magic, version, nfds, length = HEADER.unpack_from(self._buf)
        try:
            if magic != MAGIC:
                raise ProtocolError("bad frame magic (not a zygote peer?)")
            if version != VERSION:
                raise ProtocolError(f"protocol version {version} not supported (this side speaks {VERSION})")
            if length > self._max_frame:
                raise ProtocolError(f"frame of {length} bytes exceeds the {self._max_frame}-byte limit")
            if nfds > MAX_FDS:
                raise ProtocolError(f"frame declares {nfds} fds, more than {MAX_FDS}")
        except ProtocolError:
            self._broken = True
            raise
        end = HEADER.size + length
        if len(self._buf) < end:
            return None
        start_off, end_off = self._base, self._base + end
        fds: list[int] = []
        rest = []
        for off, batch in self._fd_batches:
            if start_off <= off < end_off:
                fds.extend(batch)
            else:
                rest.append((off, batch))
        self._fd_batches = rest
        self.last_length = length
        if len(fds) != nfds:
            del self._buf[:end]
            self._base = end_off
            self._close(fds)
            self._broken = True
            raise ProtocolError(f"frame declares {nfds} fds but {len(fds)} arrived")
        # A message may hold views of its frame (memoryview fields: Spawn.payload), so it is
        # decoded from a buffer nobody changes after: a large frame's own buffer, handed over
        # whole (no copy: copying a 250 MiB payload out of it held the daemon's event loop, and
        # every other client, ~0.3 s per frame; msgspec holds the GIL, so a worker thread does not
        # help), a small frame's copy.
        failed: Exception | None = None
        if end >= HANDOFF_MIN:
            frame, self._buf = self._buf, self._buf[end:]  # (the rest: at most one receive's worth)
        else:
            frame = bytes(memoryview(self._buf)[:end])
            del self._buf[:end]
        with memoryview(frame) as view:
            try:
                msg = self._decoder.decode(view[HEADER.size:end])
            except Exception as exc:  # noqa: BLE001 - a validator's OverflowError too: bytes from a peer
                failed = exc  # must end as a protocol error, never as an exception nobody expects
        del frame
        self._base = end_off
        if failed is None and end >= HANDOFF_MIN:
            payload = getattr(msg, "payload", None)
            if isinstance(payload, memoryview) and len(payload) < end // 2:
                # A small payload would keep its whole frame alive (an 8 MiB argv beside it, or
                # anything else the frame held, already copied out): it is copied instead.
                msg = msgspec.structs.replace(msg, payload=memoryview(bytes(payload)))
                payload.release()
        if failed is not None:
            self._close(fds)
            self._broken = True
            text = str(failed)
            text = text if len(text) <= 500 else text[:500] + "..."
            raise ProtocolError(f"undecodable frame: {text}") from None
        return msg, fds

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)

    def close_fds(self) -> None:
        for _, batch in self._fd_batches:
            self._close(batch)
        self._fd_batches.clear()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def client_decoder() -> FrameDecoder:
    """A decoder for what a client receives."""
    return FrameDecoder(DaemonMessage)


def daemon_decoder(max_frame: int = MAX_FRAME, close: Callable[[list[int]], None] | None = None) -> FrameDecoder:
    """A decoder for what the daemon receives."""
    return FrameDecoder(ClientMessage, max_frame=max_frame, close=close)
