"""The daemon (trio): serves the protocol, orchestrates spawns, owns and reaps every child.

Per spawn: make the child's pipes; ask a zygote to clone (the child is ours by CLONE_PARENT);
pidfd_open it; write its uid/gid maps; send "go" (the ChildPlan with the payload); wait for Ready or
Failed on its status pipe; hand the client its stdio fds. A watcher task then enforces the
deadline, reads the payload's result pipe (capped, never unpickled), reaps the child through its
pidfd (wait4 for rusage) and reports Exited with the result's raw bytes.
"""

from __future__ import annotations

import array
import ctypes
import dataclasses
import errno as _errno
import fcntl
import functools
import itertools
import math
import os
import platform
import secrets
import select
import signal
import socket
import struct
import sys
import termios
import threading
import time
from dataclasses import dataclass, field

import msgspec
import trio

from zygote_client import ExitStatus, SandboxConfig
from zygote_client import _protocol as P
from zygote_client._config import DEFAULTS
from zygote_client._errors import ProtocolError, cut, quoted
from zygote_client._workspace import ExportResult, WorkspaceError

from . import _childproto as C
from ._clone import ALL_NAMESPACES, CLONE_INTO_CGROUP, CLONE_PARENT
from ._pool import NetnsJoinFailed, Pool, PoolConfig, PoolStartError, Reserve, ZygoteDied, raise_open_files
from ._zygote import GIVEN_NETNS, TREES_SHIFT
from ._nsmaker import NAME as _NSMAKER_BYTES, IdmapMaker
from . import _pipes, _pool, detach, observe, policy
from ._pipes import close_now as _close
from .layers import SetupError, _sys, cgroups, mounts, network, rlimits, seccomp, userns, workspace

SEND_TIMEOUT = 30.0  # seconds one message may wait for a client to read before it is dropped
SEND_QUEUE_BYTES = 64 << 20  # bytes waiting for one connection before it is dropped (at least)
SEND_QUEUE_PER_UID = 256 << 20  # ... and for all of one peer uid's connections
# A connection whose queue is past its cap is dropped only once it stalled: nothing of its queue
# taken for SEND_STALL seconds; a client that reads may have up to SEND_BURST times the cap
# waiting (results ending together: eight of 15 MiB dropped a client that was reading them).
SEND_STALL = 2.0
SEND_BURST = 4
# Export archives (memfds on the daemon's memory) waiting to be sent to one peer uid's
# connections: past it a stalled connection goes (the one with the most). One archive always
# passes, whatever its size. Exited children no longer count against any limit, so without it a
# client reading now and then piled up archives without end (2.8 GiB in 35 s).
EXPORTS_PER_UID = 2 << 30
# Export archives of one peer uid alive anywhere: waiting here, or sent and still open in a client
# (or wherever it passed them), followed until the kernel frees them (_HeldArchives). Once sent,
# an archive used to be counted by nothing: a client keeping its children pinned the daemon's
# memory without bound (2.9 GiB from 48 exports). Past it an export is refused, its child's
# Exited says why (one archive always passes).
HELD_EXPORTS_PER_UID = 4 << 30
HELD_ARCHIVES_PER_UID = 4096  # ... and so many of them (each is an inotify watch of root's)
ERROR_TEXT_MAX = 2000  # characters of an error message sent to a client
# Bytes of requests the daemon holds for one peer uid, over all its connections: frames still
# arriving and spawn requests received but not yet answered. Two frames of the largest size (and
# some slack for the reads in progress); more connections buy no more of the daemon's memory.
PENDING_PER_UID = 2 * P.MAX_FRAME + (4 << 20)
# Spawn requests received and not yet answered, per peer uid over all its connections. Past it the
# daemon reads nothing more from that uid's connections until answers go out: each request is a
# task and its answer (≈ 4 KB), and a client that sent small requests without reading the answers
# made the daemon hold 428000 of them (1.7 GB) in 10 s, with other clients waiting ≈ 50 s once the
# connection was dropped (a helper's review). Above max_children's default: spawns beyond the
# daemon's maximum are refused anyway, and the client library reads answers as they come.
REQUESTS_PER_UID = 1024
# Child output the daemon buffers (max_output_bytes relays) for one peer uid's readers. Past it
# the relays stop reading and the children block on their full pipes, as with any slow reader.
RELAYED_PER_UID = 256 << 20
# A uid's frames that took d seconds to decode put its reading DECODE_SHARE x d off, once that is
# more than DECODE_SLACK seconds ahead (see _serve_conn's next_message).
DECODE_SHARE = 4.0
DECODE_SLACK = 0.02
# Result records the daemon holds for one peer uid's children that have not ended yet (a payload
# may write its record and go on running). Room for a record is taken when its header arrives;
# past the budget the next child's write waits, as on any full pipe (one record always fits).
RESULTS_PER_UID = 256 << 20
PROBE_TIMEOUT = 1.0  # seconds a signal's look at /proc may take (see Daemon._signal)
PATHS_TIMEOUT = 10.0  # seconds looking at a request's own host paths may take
EOF_GRACE = 2.0  # seconds the status and result pipes get to deliver after the child's exit
SETUP_TIMEOUT = 60.0  # seconds a child may take from "go" to Ready (or its setup's failure)
# Host id ranges a root daemon claims beyond max_children: reserve children hold up to half of
# them (see _reserve_room); the rest keep a range given back from being handed out at once.
ID_SLACK = 64
NO_ROOM = "no room for another reserve child"  # (a fill refused for room is no failure)
CPU_CHECK_MIN = 0.01  # seconds, at least, between two looks of the cpu_time guard (see _cpu_guard)
RELAY_GRACE = 5.0  # seconds a relay may go on delivering after its connection closed
RELAY_LINGER = 60.0  # ... and after its child exited (each holds two fds and its buffer)
LEASE_GRACE = 1.0  # seconds past the pool's timeout before a held child nobody started goes
RESERVE_QUIET = 0.025  # seconds without a take before a reserve that is not empty is refilled
RESERVE_PARALLEL = 2  # reserve children being made at once, per pool
RESERVE_LOSS_WINDOW = 10.0  # seconds: waiting reserve children dying within it of each other slow the refill
NET_AHEAD_QUIET = 0.025  # seconds without a networked spawn taking a prepared namespace before another is made
SPAWN_STEPS = ("userns", "mounts", "netns", "rlimits", "uts", "fds", "payload")


@dataclass
class DaemonConfig:
    """Daemon-wide settings (issue 6 brings the TOML file; these mirror its fields).

    Attributes:
        socket_path: where to listen (mode 0600 unless socket_mode says otherwise).
        pools: the pools, by name; requests without a pool use "default".
        allowed_uids: peer uids allowed to connect besides root and the daemon's own uid.
        allowed_gids: peers whose primary gid (SO_PEERCRED) is listed may connect too.
        id_base: first host uid/gid of the ranges sandbox ids 0..65535 map to (root daemon only):
            each live child has one of its own, ``id_base + k * 65536`` (userns.IdSlots).
        test_hooks: accept test-only request fields (failure injection). Never in production.
        max_children: children running for clients at once (all clients; spawns in flight, leased
            children included). Children waiting in a reserve are not counted: a reserve refills
            while the daemon holds fewer than this many children in all (see _reserve_room).
        max_children_per_client: running children one peer uid may have over all its connections,
            detached ones included (root: per connection). None (default): a quarter of
            max_children for peers other than root and the daemon's own uid (so one local user
            cannot take every slot from the others and the administrator), no cap for those two.
        socket_mode, socket_group: the listening socket file's mode and group (None: unchanged).
        max_result_bytes: largest encoded return value relayed to a client; the daemon buffers at
            most this much per child (and RESULTS_PER_UID per peer uid while they run). A larger
            result is dropped (``result_kind="too-large"``) and the child's writes fail, so it
            cannot block on the pipe.
        network_pool: IPv4 network the veths of networked children get their /30s from (only used
            when a pool allows network). Security: children can never reach it (nor each other).
        network_dns: nameservers written to networked children's resolv.conf; children may reach
            them on port 53 (TCP and UDP) whatever their allow-list says.
        network_masquerade: uplink interface to masquerade children's traffic behind; None
            (default) routes their pool addresses as they are.
        network_ahead: network namespaces kept prepared (veth, address, route; no rules, host
            end down) for networked spawns that no reserve child serves: their clone is born in
            one and skips ~10 ms of netlink work. Each holds a /30 of network_pool. 0: none.
        detached_buffer_bytes: per stream (stdout, stderr) of a detached child, the bytes the
            daemon keeps for readers that attach later (default 1 MiB); older bytes are dropped
            and readers are told where their stream starts. Memory: twice this per detached child.
        detached_keep_seconds, detached_keep_max: a detached child that ends before anyone
            attached to it (its spawner does not count) keeps its exit status, result and buffers
            for this long (default 600 s) or until attached once; at most this many such records
            per peer uid (default 64, its oldest dropped).
        detached_keep_bytes: the results, output and export archives one peer uid's kept records
            hold, together (default 256 MiB; its oldest dropped first, its newest always kept).
        max_attaches: attached readers one peer uid may have at once, over all its connections,
            the spawners of its detached children included (each costs the daemon two pipes and
            two tasks, and holds the child's rings, until it ends: at most RELAY_LINGER after
            the child).
        max_connections_per_client: connections one peer uid may hold open at once (root, the
            administrator, has no cap): each costs the daemon a socket, a task and its buffers.
        max_detached_per_client: running detached children one peer uid may have at once (root:
            no cap). Each holds up to twice detached_buffer_bytes of the daemon's memory and a
            reading task whoever attaches, so without it one user could pin max_children of them.
        output_rate_per_client: bytes a second the daemon reads from one peer uid's children's
            output where it reads it at all (detached children, and children with
            max_output_bytes, whose output it relays), default 8 MiB; past it their pipes fill
            and they wait (detach.Budget). Output that goes straight to a client's pipe is not
            the daemon's work and is not held to it.
    """

    socket_path: str | None = None
    pools: dict[str, PoolConfig] = field(default_factory=lambda: {"default": PoolConfig()})
    allowed_uids: tuple[int, ...] = ()
    allowed_gids: tuple[int, ...] = ()
    id_base: int = userns.DEFAULT_ID_BASE
    test_hooks: bool = False
    max_children: int = 1024
    max_children_per_client: int | None = None
    socket_mode: int = 0o600
    socket_group: int | None = None
    always_cgroup: bool = False  # a cgroup (accounting, peak_memory) even for children without limits
    max_tasks: int | None = None  # zygotes + all their children, together (None: cgroups.default_max_tasks)
    max_result_bytes: int = 16 << 20
    network_pool: str = network.DEFAULT_POOL
    network_dns: tuple[str, ...] = ()
    network_masquerade: str | None = None
    network_ahead: int = 1
    detached_buffer_bytes: int = 1 << 20
    detached_keep_seconds: float = 600.0
    detached_keep_max: int = 64
    detached_keep_bytes: int = 256 << 20
    max_attaches: int = 256
    max_connections_per_client: int = 256
    max_detached_per_client: int = 64
    output_rate_per_client: int = 8 << 20


@dataclass(eq=False)
class Child:
    id: str
    pid: int
    pidfd: int
    conn: "Connection | None"
    started: float
    timeout: float | None
    timeout_grace: float | None
    status_stream: trio.lowlevel.FdStream
    result_stream: _pipes.PipeEnd  # (its write end may be passed on by the payload: see _pipes)
    report: C.ExitReport | None = None
    timed_out: bool = False
    exited: trio.Event = field(default_factory=trio.Event)
    status: ExitStatus | None = None
    first: object = None  # the first status message: Ready or Failed
    ready_seen: bool = False
    output_exceeded: bool = False
    # one per max_output_bytes relay or pump: set once all its output is counted, or judged (see _relay)
    relays_counted: list = field(default_factory=list)
    # those held back (by RELAYED_PER_UID or the output budget): source fd -> bytes read, not yet
    # counted; judged together (_judge_held: stdout and stderr share the cap)
    relays_held: dict = field(default_factory=dict)
    cpu_time: float | None = None
    cpu_exceeded: bool = False  # the daemon killed it: its cgroup's CPU usage reached cpu_time
    cgroup: object = None
    attaching: trio.Event | None = None  # its v1 cgroup attach by pid number, until done: not reaped meanwhile
    lease: network.Lease | None = None  # its veth and address, while it has them
    net_ahead: network.Lease | None = None  # born in a prepared namespace, not yet activated (_network_for)
    net_allow: bool = False  # it has a per-child allow chain
    first_event: trio.Event = field(default_factory=trio.Event)
    status_done: trio.Event = field(default_factory=trio.Event)
    status_buf: bytearray = field(default_factory=bytearray)  # status bytes read, short of a whole frame
    status_parked: trio.Event | None = None  # set to read a held child's status again (_park_status)
    status_wait: trio.CancelScope | None = None  # the status reader's wait for bytes, while it waits
    begun: bool = False  # its client said Begun (P.Begun): its report is read when its Job's time is up
    pool: str = "default"
    peer_uid: int = -1
    collector: workspace.Collector | None = None  # the export being received from PID 1
    result_kind: str = ""  # "" (none), a C.RESULT_KINDS value, "too-large" or "invalid"
    result: bytes = b""
    result_done: trio.Event = field(default_factory=trio.Event)
    result_held: tuple[int, int] | None = None  # (peer uid, bytes) of RESULTS_PER_UID it holds
    ended: bool = False  # its pidfd said so: what its pipes hold is all there will be
    died: trio.Event = field(default_factory=trio.Event)  # set with ended
    ctl: trio.lowlevel.FdStream | None = None  # a reserve child's control pipe, until its Job
    reserved: bool = False  # waiting in its pool's reserve (not yet any client's)
    reserve_fds: list[int] = field(default_factory=list)  # its stdin writer, stdout/stderr readers meanwhile
    leased: bool = False  # a reserve child a client holds (P.Lease): the client writes its Job
    leased_from: Pool | None = None  # the pool it was leased from (its timeout; a reload kills it unstarted)
    reloaded: bool = False  # killed because a reload replaced the pool it was leased from (ExitStatus.pool_reloaded)
    detached: bool = False
    has_result: bool = True
    rings: tuple[detach.Ring, detach.Ring] | None = None  # stdout, stderr of a detached child
    watchers: list["Connection"] = field(default_factory=list)  # told of the exit: spawner, attachers
    scope: trio.CancelScope | None = None  # the watcher's (shielded) scope
    direct: bool = False  # the payload is PID 1 itself (no reaper): see _kill and _exit_status
    sigint_delivered: bool = False  # a direct child got SIGINT as itself (see _exit_status)
    emulated: int = 0  # a signal a direct child died of by default, delivered as SIGKILL
    id_slot: int | None = None  # its host id range (userns.IdSlots; None: a non-root daemon's one mapping)
    own_id: int | None = None  # the host uid and gid its sandbox uid and gid map to (userns.client_id)


@dataclass
class _Kept:
    """A detached child that ended with nobody attached: what an attach still gets."""

    child: Child
    exited: P.Exited
    fds: list[int]  # the export archive's memfd, if any
    expires: float
    size: int = 0  # bytes held: the result, the output rings, the archive


class _Flight:
    """One spawn in flight, counted (Daemon.spawning, its connection's, its uid's, and per uid if
    detached) from its checks until it lands: its child exists (cloned and registered, or a
    reserve child handed to it) or it failed. Not both: a child in its last setup steps (maps,
    cgroup, network, "go", Ready) counted twice against max_children and the per-client and
    detached maximums, and the daemon refused requests it had room for."""

    __slots__ = ("daemon", "conn", "detached", "landed")

    def __init__(self, daemon: Daemon, conn: Connection, detached: bool) -> None:
        self.daemon, self.conn, self.detached, self.landed = daemon, conn, detached, False
        uid = conn.peer_uid
        daemon.spawning += 1
        conn.spawning += 1
        daemon.spawning_by_uid[uid] = daemon.spawning_by_uid.get(uid, 0) + 1
        if detached:
            daemon._count(daemon.detached_by_uid, uid, 1)

    def land(self) -> None:
        if self.landed:
            return
        self.landed = True
        d, uid = self.daemon, self.conn.peer_uid
        d.spawning -= 1
        self.conn.spawning -= 1
        d.spawning_by_uid[uid] -= 1
        if not d.spawning_by_uid[uid]:
            del d.spawning_by_uid[uid]
        if self.detached:
            d._count(d.detached_by_uid, uid, -1)


class Connection:
    def __init__(self, daemon: "Daemon", sock: trio.socket.SocketType, peer: tuple[int, int, int]) -> None:
        self.daemon = daemon
        self.sock = sock
        self.peer_pid, self.peer_uid, self.peer_gid = peer
        self.children: dict[str, Child] = {}  # spawned here, or attached to from here
        self._send_lock = trio.Lock()
        self.closed = False
        self.queued = 0  # bytes of messages waiting to be sent
        self.moved_at = 0.0  # (trio clock) when the queue last moved: a send began on it empty, or sent some
        self._stall_watch = False  # a task watches the queue, over its cap, for a stall
        self._unread = -1  # the client's unread bytes when stalled() last looked (SIOCOUTQ)
        self.exports = 0  # bytes of export archives waiting to be sent here
        self.archives = 0  # ... and how many
        self.spawning = 0  # spawns of this connection in flight (not yet a child or a failure)
        # Its Hello said "sandbox-inherits": a request's unset SandboxConfig fields are the pool's
        # (the reserve's own connection asks with resolved configs: the same either way).
        self.sandbox_inherits = False
        # Its Hello said "begun": it sends Begun for a leased child whose Job has a timeout, so
        # its held children's Started reports are read when needed (_park_status).
        self.begun = False
        self.nursery: trio.Nursery | None = None  # the connection's tasks (taps die with it)

    def spawned(self) -> int:
        return sum(1 for c in self.children.values() if c.conn is self)

    async def send(self, msg, fds: list[int] = (), archive: int = 0) -> None:
        """Send one message; never blocks the daemon on a client that stops reading.

        Bytes waiting for this connection are capped (SEND_QUEUE_BYTES, or twice the largest
        result when that is more: results and exports are large; past it a client still reading
        has SEND_BURST times that before it goes, one that stalled for SEND_STALL goes now), and
        for all its uid's connections together (SEND_QUEUE_PER_UID: more connections buy no
        more: past it the uid's connection with the most waiting goes); each send has
        SEND_TIMEOUT; past any of these the connection is dropped, which kills its children like
        any disconnect and frees what their reports held. ``archive``: the bytes of an export's
        memfd among ``fds``, sent only once the client read all before it (_all_read) and
        counted per uid meanwhile (EXPORTS_PER_UID).
        """
        if self.closed:
            return
        if isinstance(msg, (P.Error, P.SpawnFailed)):
            # Messages quote what the client sent: a 70 MiB pool name must not come back whole
            # (nor a path or a hint that holds one).
            long = {k: cut(v, ERROR_TEXT_MAX) for k in ("message", "path", "hint")
                    if isinstance(v := getattr(msg, k, None), str) and len(v) > ERROR_TEXT_MAX}
            if long:
                msg = msgspec.structs.replace(msg, **long)
        if fds and isinstance(msg, P.Exited) and msg.export is not None:  # (an empty one counts too)
            refused = self.daemon.held_archives.admit(fds, self.peer_uid, archive)
            if refused is not None:  # (the memfd stays ours: the caller closes it)
                msg = msgspec.structs.replace(msg, export=msgspec.structs.replace(msg.export, error=refused))
                fds, archive = [], 0
        try:
            data = P.encode(msg, len(fds))
        except Exception as e:  # noqa: BLE001 - a report too large to frame: a bug, not a crash
            self.daemon.observer.log.error("send", kind=type(msg).__name__, message=f"{type(e).__name__}: {e}")
            self.drop()
            return
        size = len(data)
        uid = self.peer_uid
        now = trio.current_time()
        if not self.queued:
            self.moved_at = now
        self.queued += size
        self.daemon._count(self.daemon.queued_by_uid, uid, size)
        self.exports += archive
        self.archives += bool(archive)
        try:
            if archive and self._exports_over():
                # A stalled one goes (reading now and then piled them up); one that reads gets
                # them, however many (its children are what made them).
                worst = max(self._export_holders(), key=lambda c: (c.stalled(now), c.exports), default=self)
                if worst.stalled(now):
                    worst.drop()
                    if worst is self or self.closed:
                        return
            cap = self.daemon.send_queue_bytes
            if self.queued > cap and (self.queued > SEND_BURST * cap or self.stalled(now)):
                self.drop()
                return
            if self.queued > cap or (archive and self._exports_over()):
                if not self._stall_watch and self.nursery is not None:
                    try:
                        self.nursery.start_soon(self._watch_for_stall)
                        self._stall_watch = True
                    except RuntimeError:  # the connection's nursery is done: so is the connection
                        pass
            if self.daemon.queued_by_uid.get(uid, 0) > self.daemon.send_queue_per_uid:
                # over the uid's budget: the connection holding the most goes (a slow reader), not
                # whichever has the next message (a healthy one, as likely as not)
                # (a stalled one first: the one with the most may be reading a burst of results)
                worst = max(self.daemon.open_conns.get(uid, ()), key=lambda c: (c.stalled(now), c.queued),
                            default=self)
                worst.drop()
                if worst is self or self.closed:
                    return
            async with self._send_lock:
                if self.closed:
                    return
                with trio.move_on_after(SEND_TIMEOUT) as scope:
                    view = memoryview(data)  # slices of a view: no copy of a large frame per send
                    try:
                        if archive:
                            await self._all_read()
                        if fds:
                            n = await self.sock.sendmsg([view], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                                  array.array("i", fds).tobytes())])
                            view = view[n:]
                            self.moved_at = trio.current_time()
                        while view:
                            n = await self.sock.send(view)
                            view = view[n:]
                            self.moved_at = trio.current_time()
                    except (OSError, trio.ClosedResourceError, trio.BrokenResourceError):
                        # (ClosedResourceError: the connection's own task closed the socket, on
                        # the client's EOF, while this send waited for room: not an OSError.)
                        self.closed = True
                if scope.cancelled_caught:
                    self.drop()
        finally:
            self.queued -= size
            self.daemon._count(self.daemon.queued_by_uid, uid, -size)
            self.exports -= archive
            self.archives -= bool(archive)

    def _unread_bytes(self) -> int:
        """What the client has still to read of what we sent (SIOCOUTQ). Raises OSError."""
        fd = self.sock.fileno()
        if fd < 0:  # (closed by the connection's own task)
            raise OSError(_errno.EBADF, "connection closed")
        return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0" * 4))[0]

    async def _all_read(self) -> None:
        """Wait until the client has read all we sent. Before a message with an export archive
        (a memfd of up to 1 GiB, on the daemon's memory): once sent, it sits in the client's
        socket, where nothing counts it, for as long as the client does not read; one at a time,
        a client pins at most one, and the next waits here, under SEND_TIMEOUT."""
        while self._unread_bytes():
            await trio.sleep(0.005)

    def stalled(self, now: float) -> bool:
        """Nothing of the queue was taken for SEND_STALL. Judged by our sends' progress, and, when
        that is old, by the bytes the client has still to read (SIOCOUTQ): a daemon behind on
        its own sends must not take a client that reads for one that stopped."""
        if not self.queued or now - self.moved_at <= SEND_STALL:
            return False
        try:
            unread = self._unread_bytes()
        except OSError:
            return True
        if unread == 0 or unread != self._unread:  # (0: all read; our own send has not run yet)
            self._unread = unread
            self.moved_at = now
            return False
        return True

    def _exports_over(self) -> bool:
        """This connection waits to send export archives while its uid's, over its open
        connections, pass EXPORTS_PER_UID (one archive always passes). (Summed over those: a
        dropped one's sends still count theirs until they wake.)"""
        if not self.exports:
            return False
        mine = self._export_holders()
        return (sum(c.exports for c in mine) > self.daemon.exports_per_uid
                and sum(c.archives for c in mine) > 1)

    def _export_holders(self) -> list["Connection"]:
        """This uid's open connections with archives waiting."""
        return [c for c in self.daemon.open_conns.get(self.peer_uid, ()) if c.exports and not c.closed]

    async def _watch_for_stall(self) -> None:
        """While the queue is over its cap, or it waits with archives over its uid's budget:
        drop the connection once it stalled (the next message might never come to look)."""
        try:
            while not self.closed and (self.queued > self.daemon.send_queue_bytes or self._exports_over()):
                if self.stalled(trio.current_time()):
                    self.drop()
                    return
                await trio.sleep_until(self.moved_at + SEND_STALL + 0.01)
        finally:
            self._stall_watch = False

    def drop(self) -> None:
        """Give up on this client: its reader loop ends and its children are killed."""
        self.closed = True
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        # (tests only: how long a stopped zygote may leave a clone unanswered, not 30 s; how
        # long a killed one may take to go before its replacement starts, not 5 s)
        _pool.CLONE_REPLY_TIMEOUT = self._test_knob("CLONE_REPLY_TIMEOUT", _pool.CLONE_REPLY_TIMEOUT, float)
        _pool.STUCK_ZYGOTE_WAIT = self._test_knob("STUCK_ZYGOTE_WAIT", _pool.STUCK_ZYGOTE_WAIT, float)
        self.pools: dict[str, Pool] = {}
        self.children: dict[str, Child] = {}
        self.spawning = 0  # spawns in flight (reserve fills too; see _client_count)
        self.spawning_by_uid: dict[int, int] = {}  # the same per peer uid (max_children_per_client)
        self.detached_by_uid: dict[int, int] = {}  # uid -> detached children running or being spawned
        self.kept: dict[str, _Kept] = {}  # ended detached children not yet attached (oldest first)
        self._kept_changed = trio.Event()  # set by _keep (see _expire_kept_on_time)
        self.watching = 0  # watcher tasks still running (shutdown waits for them)
        self.shutting_down = False  # shutdown() began: reserves no longer refill
        self._nursery: trio.Nursery | None = None
        self._ids = itertools.count(1)
        self._prefix = secrets.token_hex(3)
        self.uid_map, self.gid_map = userns.map_lines(config.id_base, os.getuid(), os.getgid())  # (non-root)
        self.id_slots = userns.IdSlots(config.id_base, config.max_children + ID_SLACK) if os.getuid() == 0 else None
        self._give_ownership = self.id_slots is not None and userns.can_give_ownership()
        self.spawns_total = 0
        self.cleaning = 0
        self.pending: dict[int, int] = {}  # peer uid -> bytes of requests held for it (PENDING_PER_UID)
        self.requests: dict[int, int] = {}  # peer uid -> spawn requests not yet answered (REQUESTS_PER_UID)
        self._decode_until: dict[int, float] = {}  # per uid: no reading before (see _serve_conn)
        self._request_room: dict[int, trio.Event] = {}  # set when a uid's count drops below the cap
        self.queued_by_uid: dict[int, int] = {}  # peer uid -> bytes waiting to be sent to it
        self.exports_per_uid = self._test_knob("EXPORTS_PER_UID", EXPORTS_PER_UID, int)
        self.held_archives = _HeldArchives(self._test_knob("HELD_EXPORTS_PER_UID", HELD_EXPORTS_PER_UID, int))
        self.tap_linger = self._test_knob("TAP_LINGER", RELAY_LINGER, float)
        self.relay_grace = self._test_knob("RELAY_GRACE", RELAY_GRACE, float)
        self.relayed_per_uid = self._test_knob("RELAYED_PER_UID", RELAYED_PER_UID, int)
        self._pause_sources = self._test_knob("PAUSE_BEFORE_SOURCES", None, str)  # (see ChildPlan)
        self.setup_timeout = self._test_knob("SETUP_TIMEOUT", SETUP_TIMEOUT, float)  # (see _setup_outside)
        self.reserve_quiet = self._test_knob("RESERVE_QUIET", RESERVE_QUIET, float)
        self._fit_pause = self._test_knob("FIT_PAUSE", 0.0, float)  # (see _take_reserved)
        self.open_conns: dict[int, set[Connection]] = {}  # peer uid -> its open connections
        self.attached: dict[int, int] = {}  # peer uid -> its live attaches (max_attaches)
        self.relayed: dict[int, int] = {}  # peer uid -> bytes of its children's output buffered
        self.output_budget = detach.Budget(lambda: self.config.output_rate_per_client)  # (what it reads)
        self._relayed_freed: dict[int, trio.Event] = {}  # uid -> set when its relays free some
        self.results_held: dict[int, int] = {}  # peer uid -> bytes of result records held (RESULTS_PER_UID)
        self._results_freed: dict[int, trio.Event] = {}  # uid -> set when its children's records go
        self.results_per_uid = self._test_knob("RESULTS_PER_UID", RESULTS_PER_UID, int)
        # Two results of the largest allowed size fit the queues (a 100 MiB max_result_bytes
        # must not drop every client it answers as a slow reader).
        most = 2 * min(config.max_result_bytes, P.MAX_FRAME - (1 << 20))
        self.send_queue_bytes = max(SEND_QUEUE_BYTES, most)
        self.send_queue_per_uid = max(SEND_QUEUE_PER_UID, self.send_queue_bytes)
        self._relays: dict[trio.CancelScope, Child] = {}  # running relays (cut short after a close)
        self.hands = _pipes.PipeHands()  # threads for the syscalls that can wait on a client's pipe lock
        self.cgroups: cgroups.CgroupHost | None = None
        self.cgroup_error: SetupError | None = None
        self.zygotes_cgroup_error: SetupError | None = None  # (bound_children failed: no zygote starts)
        self._into_cgroup = False  # clone children straight into their cgroup (set for v2 hosts)
        self._reserve_conn = Connection(self, None, (0, -1, -1))  # owns children waiting in reserves
        self._reserve_conn.closed = True  # nothing is ever sent to it
        self.observer = observe.Observer()
        self.observer.watch_pools(lambda: self.pools)
        self.observer.watch_running(self._running_for_clients)
        self.observer.watch_kept(lambda: len(self.kept))
        self.network: network.NetworkHost | None = None
        self.network_error: SetupError | None = None
        self._idmaps: IdmapMaker | None = None  # user namespaces for idmapped binds (_idmapped)
        self._net_ready: list[tuple[network.Lease, int]] = []  # prepared namespaces: (lease, fd)
        self._net_wake = trio.Event()  # set when a networked spawn took one
        self._net_takes = 0
        self._addresses_wanted = 0  # requests waiting for a reserve child's address (_acquire_address)
        self._net_refill: trio.CancelScope | None = None  # _keep_net_ahead's, while it runs ...
        self._net_refill_done = trio.Event()  # ... and set once it has ended
        # cpu_time (see _cpu_guard): child -> [CPU seconds it had used, the zygote tree's usage
        # just before that reading (None: not read yet), its cgroup]
        self._cpu_watched: dict[Child, list] = {}
        self._cpu_wake = trio.Event()
        self._cpu_guarding = False
        self._cpu_limiter = trio.CapacityLimiter(1)
        self._ncpu = os.cpu_count() or 1  # no cgroup's usage grows faster than this many CPU-seconds a second

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start_cgroups(self) -> None:
        """Find the cgroup hierarchy before any zygote starts (v2 may move the daemon into a leaf)."""
        try:
            self.cgroups = await trio.to_thread.run_sync(cgroups.detect, f"zygote/d{os.getpid()}")
        except SetupError as e:
            self.cgroups, self.cgroup_error = None, e
            return
        self._into_cgroup = self.cgroups.version == 2  # clone3(CLONE_INTO_CGROUP): Linux >= 5.7, v2 only
        await trio.to_thread.run_sync(cgroups.remove_dead_instances, self.cgroups)
        # Every zygote runs in one cgroup with a tasks bound, and so does every child born
        # without a cgroup of its own (see CgroupHost.bound_children). Not made: no zygote
        # starts (Pool.start raises), rather than children adding up to the host's pid_max.
        try:
            await self._bound_children(self.config)
        except SetupError as e:
            self.zygotes_cgroup_error = e

    async def start_network(self, config: DaemonConfig | None = None) -> None:
        """Install the egress ruleset when some pool of ``config`` (the daemon's by default)
        allows network; otherwise touch nothing."""
        config = config or self.config
        if all(pc.sandbox.network is None for pc in config.pools.values()):
            return
        host = network.NetworkHost(config.network_pool, config.network_dns, config.network_masquerade)
        host.pause_before_rules = self._test_knob("PAUSE_BEFORE_RULES", None, str)
        host.flows_per_child = self._test_knob("FLOWS_PER_CHILD", host.flows_per_child, int)
        host.pause_before_start = self._test_knob("PAUSE_NETWORK_START", None, str)
        try:
            await trio.to_thread.run_sync(host.start)
        except SetupError as e:
            self.network_error = e
            return
        self.network = host

    async def start_pools(self) -> None:
        for name, pc in self.config.pools.items():
            pool = self._new_pool(pc)
            await pool.start()
            self._say_fork_hooks(pool)
            self.pools[name] = pool

    def _new_pool(self, pc: PoolConfig) -> Pool:
        pool = Pool(pc)
        if self.cgroups is not None:
            pool.place_zygote = self._place_zygote
        pool.on_zygote_death = lambda: self._nursery.start_soon(self._reap_strays)
        pool.log = self.observer.log
        for reserve in pool.reserves:  # (what _reserve_fits compares each request with: once per pool)
            reserve.built = policy.effective(pc.sandbox, self._reserve_request(pool, reserve))
        return pool

    def _say_fork_hooks(self, pool: Pool) -> None:
        """Log why a pool's zygotes clone with all of CPython's fork work (not lean: _clone.lean_hooks)."""
        how = next((z.info.get("fork_hooks") for z in pool.zygotes), None)
        if how and how != "lean":
            self.observer.log.info("pool", pool=pool.config.name, message=f"its zygotes clone with {how}")

    async def _bound_children(self, config: DaemonConfig) -> int:
        """Bound the children's cgroup (and make the zygotes' leaf) with ``config``'s max_tasks;
        returns the bound."""
        assert self.cgroups is not None
        tasks = config.max_tasks or cgroups.default_max_tasks(self.cgroups)
        await trio.to_thread.run_sync(self.cgroups.bound_children, tasks)
        return tasks

    async def _place_zygote(self, pid: int) -> None:
        """Into the zygotes' cgroup, before it clones (Zygote.start calls it right after the exec)."""
        if self.zygotes_cgroup_error is not None:
            raise self.zygotes_cgroup_error
        assert self.cgroups is not None
        await trio.to_thread.run_sync(self.cgroups.place_zygote, pid)

    async def _warm_seccomp(self, done: trio.Event) -> None:
        """Load libseccomp and compile each pool's profile, and the named ones a request may
        tighten it to, before the first request, which would otherwise wait for both on the loop
        (~15 ms: finding the library runs ldconfig, a child process of the daemon). A profile that
        does not compile is left to the requests to report, as before."""
        profiles = set()
        for pc in self.config.pools.values():
            own = pc.sandbox.seccomp_profile
            rank = policy.SECCOMP_RANK.get(own)
            profiles |= {own} if rank is None else {n for n, r in policy.SECCOMP_RANK.items() if r >= rank}

        def compile_all() -> None:
            for profile in profiles:
                try:
                    seccomp.prepare(profile)
                except (ValueError, OSError, ImportError):
                    pass
        try:
            await trio.to_thread.run_sync(compile_all)
        finally:
            done.set()

    async def _reap_strays(self) -> None:
        """Reap children a dead zygote cloned but never reported (their pid never reached us).

        Such a child gets EOF on its control pipe (we closed our end with the failed request)
        and exits; nobody waits for it. Only zombies in a pid namespace of their own (sandbox
        children, never a zygote or a helper such as nft) that no Child record owns are reaped.
        """
        for delay in (0.05, 0.5, 2.0):
            await trio.sleep(delay)
            known = {c.pid for c in self.children.values()}
            for pid in _stray_zombies(known):
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass

    async def run(self, *, listen_sock: socket.socket | None = None, inherit_fd: int | None = None,
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled (or, with inherit_fd, until that one connection closes)."""
        raise_open_files()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            warmed = trio.Event()
            nursery.start_soon(self._warm_seccomp, warmed)  # (in a thread, while the zygotes start)
            nursery.start_soon(self.held_archives.follow)
            nursery.start_soon(self._expire_kept_on_time)
            try:
                await self.start_cgroups()
                await self.start_network()
                await self.start_pools()
            except PoolStartError as e:
                with trio.CancelScope(shield=True):
                    await self.shutdown()  # the cgroup directory made above must not outlive us
                if inherit_fd is not None:
                    sock = trio.socket.from_stdlib_socket(socket.socket(fileno=inherit_fd))
                    conn = Connection(self, sock, (0, os.getuid(), os.getgid()))
                    await conn.send(P.Error(0, "pool-failed", str(e)))
                    sock.close()
                raise
            except BaseException:  # cancelled while starting (stopped right after its socket
                with trio.CancelScope(shield=True):  # listened): what it made goes, as at a stop
                    await self.shutdown()  # (its cgroups and id lock files outlived it)
                raise
            try:
                for pool in self.pools.values():
                    nursery.start_soon(pool.supervise)
                    self._start_reserves(pool)
                if self.network is not None:
                    nursery.start_soon(self._keep_net_ahead, self.network)
                await warmed.wait()
                task_status.started()
                if inherit_fd is not None:
                    s = socket.socket(fileno=inherit_fd)
                    await self._serve_conn(trio.socket.from_stdlib_socket(s), embedded=True)
                else:
                    assert listen_sock is not None
                    await self._accept_loop(trio.socket.from_stdlib_socket(listen_sock), nursery)
            finally:
                with trio.CancelScope(shield=True):
                    await self.shutdown()
                nursery.cancel_scope.cancel()

    async def _accept_loop(self, lsock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        """Accept connections for ever. Out of file descriptors (or kernel memory), the daemon
        waits and tries again: the client stays in the listen backlog meanwhile, and whoever
        holds the fds (connections, children) keeps being served. Any other failure of one
        accept concerns that client alone (it went away, or the LSM refused it)."""
        starved = False
        while True:
            try:
                s, _ = await lsock.accept()
            except OSError as e:
                if e.errno not in (_errno.EMFILE, _errno.ENFILE, _errno.ENOBUFS, _errno.ENOMEM):
                    continue
                if not starved:  # once per episode, not 10 times a second
                    self.observer.log.warning("accept", message=f"cannot accept connections: {e.strerror}; "
                                              "retrying every 0.1 s (raise the daemon's open-files limit, "
                                              "LimitNOFILE= in its unit, or find the client holding them)")
                starved = True
                await trio.sleep(0.1)
                continue
            starved = False
            nursery.start_soon(self._serve_conn, s)

    async def reload(self, config: DaemonConfig) -> list[str]:
        """Adopt a re-read configuration (SIGHUP) without touching running children.

        New and changed pools are started first; if one fails, nothing changes and PoolStartError
        propagates. Then they replace the old ones, whose zygotes are stopped (children are the
        daemon's, not the zygote's, so they run on). Access rules and child limits apply to the next
        connection or spawn. The socket, id_base and test_hooks stay as they were at start, and a
        root daemon's max_children goes no higher than the host id ranges it claimed at start.
        Networking starts here if the first pool that allows it came with this configuration.
        Returns a line per change.
        """
        # The network settings stay as the children's firewall was built at start (a new
        # network_dns in resolv.conf but not in the rules would leave the old server reachable
        # and the new one blocked): they take effect at the next start.
        # (Networking not started yet: the new ones are what it starts with, below.)
        net = {f: getattr(self.config, f) for f in ("network_pool", "network_dns", "network_masquerade")
               if self.network is not None}
        fixed = {f: getattr(self.config, f) for f in ("socket_path", "socket_mode", "socket_group", "id_base")}
        net_changed = [f for f, v in {**net, **fixed}.items() if getattr(config, f) != v]
        # A reserve child was made with the daemon's always_cgroup of its day: all pools restart.
        everything = config.always_cgroup != self.config.always_cgroup
        keep = dataclasses.replace(config, test_hooks=self.config.test_hooks, **fixed, **net)
        kept_max = None
        if self.id_slots is not None and keep.max_children > self.id_slots.count - ID_SLACK:
            # A root daemon claimed its children's host id ranges at start, for max_children then:
            # more children would find no range (and the reserve, sized from what is left beyond
            # max_children, would never refill). Raised only as far as the claim allows.
            kept_max = (keep.max_children, self.id_slots.count - ID_SLACK)
            keep = dataclasses.replace(keep, max_children=kept_max[1])
        started: dict[str, Pool] = {}
        net_started = None
        try:
            for name, pc in keep.pools.items():
                old = self.pools.get(name)
                if old is None or old.config != pc or everything:
                    pool = self._new_pool(pc)
                    started[name] = pool
                    await pool.start()
                    self._say_fork_hooks(pool)
            if self.network is None and any(pc.sandbox.network is not None for pc in keep.pools.values()):
                # The first pool with network: the egress rules are installed before the pools
                # are swapped in (networked spawns failed with "networking was not started" until
                # the next start, and then in the moment between the swap and the rules).
                self.network_error = None
                await self.start_network(keep)
                net_started = self.network is not None
        except BaseException:
            with trio.CancelScope(shield=True):
                for pool in started.values():
                    await pool.stop()
            raise
        changes = [f"pool {n!r} {'restarted' if n in self.pools else 'added'}" for n in started]
        retired = [p for n, p in self.pools.items() if n not in keep.pools or n in started]
        changes += [f"pool {n!r} removed" for n in self.pools if n not in keep.pools]
        changes += [f"{f} changed: kept as it was until the daemon restarts" for f in net_changed]
        if kept_max is not None:
            changes.append(f"max_children {kept_max[0]}: {kept_max[1]} until the daemon restarts (the host id "
                           "ranges for its children are claimed at start)")
        now = time.monotonic()
        for pool in retired:  # (a leased child of it that read its Job before now runs: _started)
            pool.retired_at = now
        self.pools = {n: started.get(n) or self.pools[n] for n in keep.pools}
        if keep.max_tasks != self.config.max_tasks and self.cgroups is not None and self.zygotes_cgroup_error is None:
            try:  # (a bound below what runs now only stops new tasks: nothing is killed)
                changes.append(f"max_tasks {await self._bound_children(keep)}")
            except SetupError as e:
                changes.append(f"max_tasks unchanged: {e.message}")
                keep = dataclasses.replace(keep, max_tasks=self.config.max_tasks)  # (tried again next reload)
        self.config = keep
        if net_started:
            self._nursery.start_soon(self._keep_net_ahead, self.network)
            changes.append("networking started")
        elif net_started is not None:
            changes.append(f"networking could not start: {self.network_error}")
        self._net_wake.set()  # network_ahead may have changed
        for pool in started.values():
            self._nursery.start_soon(pool.supervise)
            self._start_reserves(pool)
        for pool in retired:
            await pool.stop()
            self._discard_reserve(pool)
        return changes

    async def shutdown(self) -> None:
        """Kill every child, detached ones too, and wait until each is reaped and its cgroup gone
        (the watchers are shielded from the daemon's own cancellation for exactly this)."""
        # First: the reserve children killed below leave their reserves (_reserve_lost), which
        # would refill at once, and each refill is killed in the next round (a clone storm).
        self.shutting_down = True
        for pool in self.pools.values():
            for reserve in pool.reserves:
                reserve.wake.set()
        with trio.move_on_after(15):
            while True:
                # Again each round: a reserve refill still under way registers children after
                # the first round (a networked one waiting for its Job held shutdown for 15 s,
                # past an embedded client's 10 s: SIGKILLed, it left its nft table behind).
                for child in list(self.children.values()):
                    self._kill(child, signal.SIGKILL)
                if not self.watching:
                    break
                await trio.sleep(0.01)
        for child in list(self.children.values()):
            if child.scope is not None:
                child.scope.cancel()  # a child that would not die: stop waiting, its pidfd closes
        for kept in self.kept.values():
            _close(kept.fds)
        self.kept.clear()
        for pool in self.pools.values():
            await pool.stop()
        if self.network is not None:  # after the children: their veths and rules go with the table
            net, self.network = self.network, None
            if self._net_refill is not None:  # ended before net.close: no veth made after its sweep
                self._net_refill.cancel()
                await self._net_refill_done.wait()
            ready, self._net_ready = self._net_ready, []
            _close([fd for _, fd in ready])  # (their veths go with net.close)
            await trio.to_thread.run_sync(net.close)
        if self.cgroups is not None:
            try:
                await trio.to_thread.run_sync(self.cgroups.close)
            except SetupError:
                pass
        if self.id_slots is not None:  # (every child is reaped: nothing holds their ids)
            self.id_slots.close(unlink=True)
        if self._idmaps is not None:
            await trio.to_thread.run_sync(self._idmaps.close)
        await trio.to_thread.run_sync(policy.stop_checker, True)

    # ---- connections -------------------------------------------------------------------------

    def _wake_relays(self, uid: int) -> None:
        """Relays of ``uid`` waiting for room in its RELAYED_PER_UID look again (see _relay)."""
        if uid in self._relayed_freed:
            self._relayed_freed.pop(uid).set()

    def _count(self, table: dict[int, int], uid: int, n: int) -> None:
        """Add ``n`` (negative: release) to ``uid``'s entry in ``table`` (a per-uid count or byte total)."""
        left = table.get(uid, 0) + n
        if left > 0:
            table[uid] = left
        else:
            table.pop(uid, None)
        if n < 0 and table is self.relayed:
            self._wake_relays(uid)
        if n < 0 and table is self.results_held:
            self._wake_results(uid)

    def _test_knob(self, name: str, default, conv):
        """``conv($ZYGOTE_TEST_<name>)`` under --test-hooks when it is set, else ``default``."""
        value = os.environ.get(f"ZYGOTE_TEST_{name}") if self.config.test_hooks else None
        return conv(value) if value else default

    def _sandbox_id(self, uid: int, gid: int) -> bool:
        """Whether a peer runs as one of the ids this daemon gives its children (see _serve_conn)."""
        return self.id_slots is not None and (self.id_slots.holds(uid) or self.id_slots.holds(gid))

    def _peer_allowed(self, uid: int, gid: int) -> bool:
        if self._sandbox_id(uid, gid):
            return False
        return (uid == 0 or uid == os.getuid() or uid in self.config.allowed_uids
                or gid in self.config.allowed_gids)

    async def _serve_conn(self, sock: trio.socket.SocketType, embedded: bool = False) -> None:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        conn = Connection(self, sock, struct.unpack("3i", creds))
        uid = conn.peer_uid

        def drop(fds: list[int]) -> None:  # fds from the client: closed off the loop's thread
            self.hands.drop_received(uid, fds)

        decoder = P.daemon_decoder(close=drop)

        def next_message():
            # Decoding runs on the event loop and holds the GIL (a worker thread would not free
            # the loop): a frame of large strings costs ~0.6 s per 250 MiB. Each frame's decoding
            # time d puts the uid's reading DECODE_SHARE x d further off (counted from now, or
            # from where it already was), and its connections read nothing more while that is
            # over DECODE_SLACK ahead: one user's frames take a bounded share of the loop,
            # whatever they hold and however they are cut (frames under a threshold of their own
            # once went uncounted: a second review), and ordinary requests never wait.
            t = time.perf_counter()
            try:
                return decoder.next()
            finally:
                spent = time.perf_counter() - t
                now = trio.current_time()
                self._decode_until[uid] = max(self._decode_until.get(uid, 0.0), now) + spent * DECODE_SHARE
                if len(self._decode_until) > 1024:  # (those past go)
                    self._decode_until = {u: v for u, v in self._decode_until.items() if v > now}
        held = 0  # decoder.pending_bytes, as counted in self.pending
        self.observer.connection(+1)
        self.open_conns.setdefault(uid, set()).add(conn)
        try:
            if not self._peer_allowed(conn.peer_uid, conn.peer_gid):
                # (Ids this daemon gives its children are no client's: a process running as one
                # got it from a sandbox, e.g. a set-ID file left on a host directory, and would
                # pass for a user of its own, with budgets of its own.)
                why = (" (it is one of the ids this daemon gives its children)"
                       if self._sandbox_id(conn.peer_uid, conn.peer_gid) else "")
                await conn.send(P.Error(0, "not-allowed", f"uid {conn.peer_uid} may not use this daemon{why}"))
                return
            cap = self.config.max_connections_per_client
            if uid != 0 and len(self.open_conns[uid]) > cap:
                await conn.send(P.Error(0, "limit", f"uid {uid} already has {cap} connections open, "
                                        "the daemon's maximum per user (max_connections_per_client)"))
                return
            async with trio.open_nursery() as nursery:
                conn.nursery = nursery
                hello = False
                while True:
                    # Nothing more from a uid whose fds pile up (closes stuck on locks its own
                    # processes hold, or simply many): what it sends meanwhile stays in flight, on
                    # its side's account. Checked once the socket is readable, and the room for
                    # one more message's fds reserved before the receive, so connections that
                    # were idle cannot each bring one more batch past the check.
                    try:
                        await trio.lowlevel.wait_readable(sock.fileno())
                    except (OSError, trio.ClosedResourceError):
                        break
                    if (until := self._decode_until.get(uid, 0.0)) > trio.current_time() + DECODE_SLACK:
                        await trio.sleep_until(until)  # (its frames' share of the loop: next_message)
                    if self.hands.stuck(uid):
                        # (a connection that went, or was dropped, ends now: its held fds go
                        # with it, which may be what the others wait for)
                        while self.hands.stuck(uid) and not conn.closed and not _peer_gone(sock.fileno()):
                            with trio.move_on_after(0.5):
                                await self.hands.settle(uid)
                        if conn.closed or self.hands.stuck(uid):
                            break
                    self.hands.hold(uid, _pipes.SCM_MAX_FD)
                    try:
                        # Room for all the fds one message can carry: any that did not fit
                        # would be closed by the kernel inside this call, on our thread.
                        data, anc, flags, _ = await sock.recvmsg(1 << 18, socket.CMSG_SPACE(4 * _pipes.SCM_MAX_FD))
                        fds = _fds_from(anc)
                        self.hands.hold(uid, len(fds))
                    except OSError:
                        break
                    finally:
                        self.hands.hold(uid, -_pipes.SCM_MAX_FD)
                    if flags & socket.MSG_CTRUNC:
                        drop(fds)
                        await conn.send(P.Error(0, "protocol", "too many fds in one message"))
                        break
                    if not data:
                        drop(fds)
                        break
                    try:
                        decoder.feed(data, fds)
                        while (item := next_message()) is not None:
                            msg, mfds = item
                            if not hello:
                                drop(mfds)
                                if not isinstance(msg, P.Hello):
                                    raise ProtocolError("the first message must be hello")
                                if msg.version != P.VERSION:
                                    raise ProtocolError(f"protocol version {msg.version} not supported")
                                hello = True
                                features = msg.client.split()[1:]
                                conn.sandbox_inherits = "sandbox-inherits" in features
                                conn.begun = "begun" in features
                                await conn.send(P.Welcome(P.VERSION, os.getpid(), list(self.pools), leases=True,
                                                          begun=conn.begun))
                                continue
                            try:
                                if isinstance(msg, P.Spawn):  # held until answered (its payload too)
                                    while self.requests.get(uid, 0) >= REQUESTS_PER_UID:
                                        await self._request_room.setdefault(uid, trio.Event()).wait()
                                    self._count(self.requests, uid, 1)
                                    self._count(self.pending, uid, decoder.last_length)
                                    nursery.start_soon(self._spawn_request, conn, msg, mfds, decoder.last_length)
                                    continue
                                await self._dispatch(conn, msg, mfds, nursery)
                            except Exception as e:  # noqa: BLE001 - a bug or EMFILE: this request
                                # fails, not the daemon (a spawn has its own guard, in its task)
                                self.observer.log.error("request", kind=type(msg).__name__,
                                                        message=f"{type(e).__name__}: {e}")
                                await conn.send(P.Error(getattr(msg, "req", 0), "internal",
                                                        f"internal error: {type(e).__name__}: {e}"))
                    except ProtocolError as e:
                        await conn.send(P.Error(0, "protocol", str(e)))
                        break
                    finally:
                        # The last message (a Spawn's payload: up to MAX_FRAME) must not stay
                        # alive in this frame while the connection waits for its next one: once
                        # answered it is counted by no budget (4 idle connections held 1 GiB).
                        item = msg = mfds = None
                    now = decoder.pending_bytes
                    self._count(self.pending, uid, now - held)
                    held = now
                    if self.pending.get(uid, 0) > PENDING_PER_UID:
                        await conn.send(P.Error(0, "limit", (
                            f"uid {uid} has {self.pending.get(uid, 0) >> 20} MiB of unfinished requests on its "
                            f"connections; the daemon holds at most {PENDING_PER_UID >> 20} MiB per user "
                            "(finish sending one request before starting the next)")))
                        break
                nursery.cancel_scope.cancel()
        finally:
            decoder.close_fds()
            self._count(self.pending, uid, -held)
            for scope, child in self._relays.items():  # a reader still there gets RELAY_GRACE more
                if child.conn is conn:
                    scope.deadline = min(scope.deadline, trio.current_time() + self.relay_grace)
            conn.closed = True
            self.open_conns[uid].discard(conn)
            if not self.open_conns[uid]:
                del self.open_conns[uid]
            for child in list(conn.children.values()):
                if child.detached:
                    if conn in child.watchers:
                        child.watchers.remove(conn)
                else:
                    self._kill(child, signal.SIGKILL)
            # Unread fds the client sent wait in the socket, and go when it is released: in a
            # worker thread, like every last close of a client's fd.
            trio.lowlevel.notify_closing(sock)  # a watcher still sending to it gets ClosedResourceError
            self.hands.close(uid, [sock.detach()])
            self.observer.connection(-1)

    async def _dispatch(self, conn: Connection, msg, fds: list[int], nursery: trio.Nursery) -> None:
        self.hands.drop_received(conn.peer_uid, fds)  # none of these carries fds
        if isinstance(msg, P.Signal):
            child = conn.children.get(msg.child)
            if child is None:
                await conn.send(P.Error(msg.req, "unknown-child", f"no child {quoted(msg.child)} on this connection"))
            elif not 1 <= msg.signum < signal.NSIG:
                await conn.send(P.Error(msg.req, "bad-request", f"bad signal number {msg.signum}"))
            else:
                await self._signal(child, msg.signum)
                await conn.send(P.Ok(msg.req))
        elif isinstance(msg, P.Attach):
            await self._attach(conn, msg)
        elif isinstance(msg, P.Status):
            await conn.send(self.status(msg.req, conn.peer_uid))
        elif isinstance(msg, P.Lease):
            await self._lease(conn, msg)
        elif isinstance(msg, P.Begun):  # (no answer: an unknown or ended child is no error, a race)
            child = conn.children.get(msg.child)
            if child is not None and child.status_parked is not None and not child.begun:
                child.begun = True  # (the first one counts: no task per message)
                self._nursery.start_soon(self._read_parked_after, child, msg.timeout)
        else:
            await conn.send(P.Error(getattr(msg, "req", 0), "bad-request", f"unexpected {type(msg).__name__}"))

    def status(self, req: int, peer_uid: int) -> P.StatusReply:
        for child in list(self.children.values()):  # (a parked report: its age runs from its Job)
            self._drain_parked(child)
        now = time.monotonic()
        pools = [P.PoolStatus(name=n, python=p.config.python, preload=list(p.config.preload),
                              zygotes=p.config.zygotes,
                              zygotes_running=sum(1 for z in p.zygotes if not z.dead.is_set()),
                              restarts=p.restarts, reserve=sum(r.size for r in p.reserves),
                              reserve_waiting=sum(len(r.children) for r in p.reserves))
                 for n, p in self.pools.items()]
        mine = [P.ChildStatus(id=c.id, pool=c.pool, pid=c.pid, peer_uid=c.peer_uid, age=now - c.started)
                for c in self.children.values()
                if c.conn is not self._reserve_conn and (peer_uid == 0 or c.peer_uid == peer_uid)]
        return P.StatusReply(req=req, daemon_pid=os.getpid(), uptime=now - self.observer.started, pools=pools,
                             running=self._running_for_clients(), children=mine,
                             counters=dict(self.observer.counters, spawns_total=self.spawns_total))

    # ---- spawning ----------------------------------------------------------------------------

    def _answered(self, uid: int, size: int) -> None:
        """A spawn request of ``size`` bytes is answered (or given up): it no longer counts."""
        self._count(self.pending, uid, -size)
        self._count(self.requests, uid, -1)
        if self.requests.get(uid, 0) < REQUESTS_PER_UID and (room := self._request_room.pop(uid, None)) is not None:
            room.set()

    async def _spawn_request(self, conn: Connection, msg: P.Spawn, fds: list[int], size: int) -> None:
        """One Spawn, to its answer. ``size`` (its frame) is counted in ``pending`` until then."""
        t0 = time.monotonic()
        try:
            try:
                reply, out_fds = await self.spawn(conn, msg, fds)
            except Exception as e:  # a bug must not take the daemon down; the client gets the text
                if isinstance(e, OSError) and e.errno in (_errno.EMFILE, _errno.ENFILE):
                    # (a step with no answer of its own to it: the client may retry once fds are back)
                    reply = P.SpawnFailed(msg.req, f"the daemon is out of fds: {e.strerror}", code="limit")
                else:
                    reply = P.SpawnFailed(msg.req, f"internal error: {type(e).__name__}: {e}", "internal",
                                          code="internal")
                out_fds = []
            finally:
                self.hands.drop_received(conn.peer_uid, fds)
        except BaseException:
            self._answered(conn.peer_uid, size)
            raise
        try:
            await conn.send(reply, out_fds)  # the client first: the event below is not on its path
        finally:
            self.hands.close(conn.peer_uid, out_fds)  # sent: the client may hold their locks now
            self._answered(conn.peer_uid, size)
            if isinstance(reply, P.Spawned):
                self.observer.spawned(outcome="ok", seconds=time.monotonic() - t0, child=reply.child,
                                      pool=msg.pool or "default", peer_uid=conn.peer_uid, kind=msg.kind)
            else:
                self.observer.spawned(outcome=reply.code, seconds=time.monotonic() - t0, child=None,
                                      pool=msg.pool or "default", peer_uid=conn.peer_uid,
                                      kind=msg.kind, step=reply.step,
                                      message=reply.message)

    def _check_request(self, pool: Pool, msg: P.Spawn) -> tuple[str, str | None, dict[str, str]]:
        """The request's own fields, checked against its pool: (kind, target, env). Raises _Refused."""
        pc = pool.config
        kind, target = msg.kind, msg.target
        if kind == "callable" and msg.py and pool.zygotes and (
                theirs := ".".join(str(v) for v in (pool.zygotes[0].info.get("version") or [])[:2])) and msg.py != theirs:
            raise _Refused("bad-request", f"the callable was pickled by Python {quoted(msg.py)} and pool {pc.name!r} "
                           f"runs Python {theirs}: a function sent by value is bytecode only its own Python "
                           "runs (use that Python for the client, or a target 'module:function')")
        if not pc.allow_callables:  # the pool runs only its own code (see PoolConfig)
            own = f"pool {pc.name!r} runs only its own code (allow_callables = false): "
            if kind == "callable":
                raise _Refused("bad-request", f"pool {pc.name!r} does not accept callables from clients")
            if kind in ("script", "exec"):
                raise _Refused("bad-request", own + f"it does not accept {'scripts' if kind == 'script' else 'programs'}"
                                                    " from clients")
            if kind == "target" and target not in pc.allowed_targets:
                raise _Refused("bad-request", own + f"{quoted(target)} is not in its allowed_targets")
            # Its code runs in the environment given: PATH, LD_PRELOAD, PYTHONPATH or BASH_ENV
            # pointing into a workspace would run the client's own. Only env_allow names may differ.
            for name, value in (msg.env or {}).items():
                if name not in pc.env_allow and pc.env.get(name) != value:
                    raise _Refused("bad-request", own + f"its environment is its own, and {quoted(name)} is not in its "
                                                        "env_allow")
        if kind == "child_main":
            if not pc.child_main:
                raise _Refused("bad-request", f"pool {pc.name!r} has no child_main and no target was given")
            target = pc.child_main
        problem = C.job_problem(kind, target, msg.argv, None)
        if problem:
            raise _Refused("bad-request", problem)
        if msg.stdio not in ("pipe", "fds"):
            raise _Refused("bad-request", "stdio must be 'pipe' or 'fds'")
        if (msg.test_fail_step is not None or msg.test_relax_mounts or msg.test_landlock_abi) and not self.config.test_hooks:
            raise _Refused("bad-request", "test_fail_step needs a daemon started with --test-hooks")
        return kind, target, dict(pc.env if msg.env is None else msg.env)

    def _plan(self, pool: Pool, msg: P.Spawn, cfg: SandboxConfig, deferred: bool = False,
              prewarm: bool = True, pins: dict | None = None) -> C.ChildPlan:
        if unset := [k for k in DEFAULTS if getattr(cfg, k) is None]:  # (policy.effective resolves them)
            raise RuntimeError(f"unresolved sandbox fields {unset}: refused rather than confined by guesses")
        if deferred:  # a reserve child: no request yet (see _take_reserved); the pool's environment
            # is what most requests get; the target is the pool's child_main, the only one a Job
            # of kind child_main may run (a leased child's Job comes from the client)
            kind, target, env = "deferred", pool.config.child_main, dict(pool.config.env)
        else:
            kind, target, env = self._check_request(pool, msg)
        info = pool.zygotes[0].info if pool.zygotes else {}
        etc = {"/etc/resolv.conf": network.resolv_conf(self.config.network_dns)} if cfg.network else None
        try:
            files = workspace.prepare(cfg)
        except WorkspaceError as e:
            raise _Refused("workspace", e.reason, e.path) from None
        try:
            fs = mounts.prepare(cfg, info, files.pop("tmpfs"), etc, pins)  # (pins: check_peer_paths)
        except ValueError as e:
            raise _Refused("bad-request", str(e)) from None
        if msg.test_relax_mounts:  # test-only: keep the host tree so Landlock alone can be tested
            if fs.get("tmpfs"):
                raise _Refused("bad-request", "test_relax_mounts cannot stage a workspace or an export")
            fs = dict(root="host", binds=list(fs.get("binds", [])), proc=True)
        ro, rw = _landlock_paths(fs, cfg)
        try:
            bpf = seccomp.prepare(cfg.seccomp_profile)
        except ValueError as e:
            raise _Refused("bad-request", f"seccomp_profile: {e}") from None
        return C.ChildPlan(
            kind=kind, payload=msg.payload, target=target, argv=msg.argv, env=env,
            result_pickle=msg.trusted_results, py=msg.py,
            process_name=msg.process_name, hostname=cfg.hostname,
            cwd=cfg.workdir or files.get("workspace_path"),
            rlimits=rlimits.plan(cpu_time=cfg.cpu_time, file_size=cfg.file_size_bytes,
                                 open_files=cfg.open_files, pids=cfg.pids),
            landlock=cfg.landlock, landlock_ro=ro, landlock_abi=max(1, msg.test_landlock_abi), landlock_rw=rw,
            landlock_net=cfg.network is None, uid=cfg.uid, gid=cfg.gid, drop_privileges=True,
            seccomp_bpf=bpf, nested_limit_required=cfg.seccomp_profile not in _NO_NEW_USERNS_PROFILES,
            test_fail_step=msg.test_fail_step, deferred=deferred, prewarm=prewarm,
            test_pause_sources=self._pause_sources,
            data_args=not pool.config.allow_callables,
            reaper=_needs_reaper(cfg, kind), **files,
            **{k: v for k, v in fs.items() if k in C.ChildPlan.__struct_fields__},
        )

    async def spawn(self, conn: Connection, msg: P.Spawn, client_fds: list[int], *, prewarm: bool = True):
        pool = self.pools.get(msg.pool or "default")
        if pool is None:
            return P.SpawnFailed(msg.req, f"no pool named {quoted(msg.pool)}", code="bad-request"), []
        # Spawns in flight count too: a burst of requests would otherwise all pass the check before
        # the first clone registers its child.
        if conn is self._reserve_conn:
            if not self._reserve_room():
                return P.SpawnFailed(msg.req, NO_ROOM, code="limit"), []
        elif (full := self._at_max_children()) is not None:
            return P.SpawnFailed(msg.req, full, code="limit"), []
        per_client = self._per_client_cap(conn)
        if per_client is not None and conn is not self._reserve_conn:
            n, who = self._client_load(conn)
            if n >= per_client:
                held = self._held_by(conn)
                why = (f" ({held} of them held unstarted for its leases: a client with leases=K holds K)"
                       if held else "")
                return P.SpawnFailed(msg.req, f"{who} runs {n} children, the per-client maximum{why}",
                                     code="limit"), []
        # Detached children outlive their connection and keep output buffers in the daemon:
        # counted per uid while their spawn is in flight (a burst cannot pass the check
        # together), and from their registration until their watcher ends (see _watch).
        detached = msg.detached and conn.peer_uid != 0
        if detached and self.detached_by_uid.get(conn.peer_uid, 0) >= self.config.max_detached_per_client:
            return P.SpawnFailed(msg.req, f"uid {conn.peer_uid} runs {self.config.max_detached_per_client} "
                                 "detached children, the daemon's maximum per user (max_detached_per_client)",
                                 code="limit"), []
        if msg.detached and self.attached.get(conn.peer_uid, 0) >= self.config.max_attaches:
            # Its output comes to the spawner through feeds counted as an attach: counted from
            # here (a burst cannot pass the check together), handed to them by _start_detached.
            return P.SpawnFailed(msg.req, f"uid {conn.peer_uid} already has {self.config.max_attaches} attached "
                                 "readers (the spawners' of detached children included), the daemon's maximum "
                                 "per user (max_attaches)", code="limit"), []
        flight = _Flight(self, conn, detached)
        if msg.detached:  # (the spawner's feeds: counted from here, see _start_detached)
            self._count(self.attached, conn.peer_uid, 1)
        reply = None
        try:
            reply = await self._spawn(pool, conn, msg, client_fds, prewarm, flight)
            if (pool.stopping and isinstance(reply[0], P.SpawnFailed) and reply[0].code == "retry"
                    and conn is not self._reserve_conn  # (the old pool's filler: its child would go)
                    and (now := self.pools.get(msg.pool or "default")) not in (None, pool)):
                # A reload replaced the pool while this request was in it (its zygote stopped
                # under it): once more, in the new one, rather than a "retry" for the client.
                reply = await self._spawn(now, conn, msg, client_fds, prewarm, flight)
            return reply
        finally:
            if not flight.landed:  # no child came of it: what it held back is free
                flight.land()
                self._room_freed()
            if msg.detached and not (reply and isinstance(reply[0], P.Spawned)):
                self._count(self.attached, conn.peer_uid, -1)  # no child: _start_detached never ran

    async def _look(self, uid: int, fn, *args):
        """``fn(*args)``, which looks at host paths or mount tables a client named (a FUSE or NFS
        server that stopped answering, a mount table made huge), in a worker thread of ``uid``'s
        "paths" lane. Raises trio.TooSlowError past PATHS_TIMEOUT."""
        with trio.fail_after(PATHS_TIMEOUT):
            return await self.hands.run(uid, fn, *args, lane="paths")

    def _in_reserves(self) -> int:
        """Children the reserves hold for requests: waiting, or being made."""
        return len(self._reserve_conn.children) + self._reserve_conn.spawning

    def _running_for_clients(self) -> int:
        """Children alive for clients (status().running, zygote_children_running): every child but
        those the reserves are making or hold waiting (a held leased child counts). Called from
        the metrics thread too: two lengths, no iteration."""
        return max(0, len(self.children) - len(self._reserve_conn.children))  # (see _watch_and_reap)

    def _client_count(self) -> int:
        """What max_children bounds: every child and spawn in flight but those of the reserves
        (taken by a request or leased, a child counts). Waiting reserve children are not running
        for anyone: counted, a full reserve as large as max_children refused every request, and
        any reserve lowered what clients could run."""
        return len(self.children) + self.spawning - self._in_reserves()

    def _at_max_children(self) -> str | None:
        """Why a client may not have one more child now (max_children), or None."""
        n = self._client_count()
        return f"the daemon runs {n} children, its maximum" if n >= self.config.max_children else None

    def _reserve_room(self) -> bool:
        """Whether a reserve may make one more child. Only while the daemon holds fewer than
        max_children in all (so reserve children never exceed max_children, and all the daemon's
        children never 2 x max_children), and for a root daemon only while its reserve children
        stay below the host id ranges it claimed beyond max_children, less ID_SLACK / 2: a large
        reserve would otherwise hold the ranges a client's clone needs, and a range given back
        would be handed out again at once. Counted, not read from the free ranges: a spawn takes
        its range late (after path checks, a cgroup), so those would lag."""
        if len(self.children) + self.spawning >= self.config.max_children:
            return False
        return self.id_slots is None or (
            self._in_reserves() < self.id_slots.count - self.config.max_children - ID_SLACK // 2)

    def _reserve_lost(self, child: Child) -> None:
        """A waiting reserve child died (the OOM killer's pick, or a signal from the host): it
        leaves its reserve, which refills, more slowly when it keeps happening (_fill_reserve)."""
        pool = self.pools.get(child.pool)
        for reserve in pool.reserves if pool is not None else ():
            if child in reserve.children:
                reserve.children.remove(child)
                now = time.monotonic()
                reserve.losses = reserve.losses + 1 if now - reserve.lost_at < RESERVE_LOSS_WINDOW else 1
                reserve.lost_at = now
                reserve.wake.set()

    def _room_freed(self) -> None:
        """A child left, or a spawn ended without one: a reserve that waited for room may refill."""
        for pool in self.pools.values():
            for reserve in pool.reserves:
                if reserve.wants_room:
                    reserve.wake.set()

    def _per_client_cap(self, conn: Connection) -> int | None:
        """The max_children_per_client that applies to ``conn``'s peer (see DaemonConfig)."""
        if self.config.max_children_per_client is not None:
            return self.config.max_children_per_client
        if conn.peer_uid in (0, os.getuid()):
            return None
        return max(1, self.config.max_children // 4)

    def _held_by(self, conn: Connection) -> int:
        """Leased children not yet started among those _client_load counts (parked reports are
        read first: a child started from a lease is not "held")."""
        mine = list(conn.children.values() if conn.peer_uid == 0 else
                    (c for c in self.children.values() if c.peer_uid == conn.peer_uid))
        for c in mine:
            self._drain_parked(c)
        return sum(1 for c in mine if c.leased)

    def _client_load(self, conn: Connection) -> tuple[int, str]:
        """Children (and spawns in flight) counted against max_children_per_client: per peer uid,
        over all its connections and its detached children, so more connections buy no more; for
        root (the administrator) per connection, as a guard against one runaway client."""
        if conn.peer_uid == 0:
            return conn.spawned() + conn.spawning, "this connection"
        uid = conn.peer_uid
        n = sum(1 for c in self.children.values() if c.peer_uid == uid and not c.reserved)
        return n + self.spawning_by_uid.get(uid, 0), f"uid {uid}"

    async def _spawn(self, pool: Pool, conn: Connection, msg: P.Spawn, client_fds: list[int], prewarm: bool,
                     flight: _Flight):
        if msg.detached and msg.stdio != "pipe":
            return P.SpawnFailed(msg.req, "a detached child needs stdio='pipe' (the daemon keeps its output)",
                                 code="bad-request"), []
        # Refused before anything is done or made for the child (a reserve child taken, the
        # plan's path checks, a cgroup v2 child's cgroup: its fd stayed, the cgroup too).
        if msg.stdio == "fds" and len(client_fds) != 3:
            return P.SpawnFailed(msg.req, "stdio='fds' needs exactly 3 fds", code="bad-request"), []
        if msg.stdio != "fds" and client_fds:
            return P.SpawnFailed(msg.req, "unexpected fds with stdio='pipe'", code="bad-request"), []
        if msg.sandbox is not None and (
                named := len(msg.sandbox.ro_binds) + len(msg.sandbox.rw_binds)) > policy.MAX_HOST_PATHS:
            # (before the merge with the pool's and the nesting check, each work per bind)
            return P.SpawnFailed(msg.req, f"a request may name at most {policy.MAX_HOST_PATHS} binds, "
                                 f"this one names {named}", code="policy"), []
        try:
            cfg = (pool.reserve.built if msg.sandbox is None  # (the pool's default: made once, _new_pool)
                   else policy.effective(pool.config.sandbox, msg.sandbox, inherit=conn.sandbox_inherits))
            own_paths = policy.names_host_paths(cfg, pool.config.sandbox)
            pins = {}
            if own_paths:
                pins = await self._look(conn.peer_uid, policy.check_peer_paths, cfg, pool.config.sandbox,
                                        conn.peer_uid, conn.peer_gid, policy.peer_groups(conn.sock))
            if pool.config.forbid_secret_env and msg.env is not None:
                policy.check_env(msg.env, pool.config.env_allow)
        except policy.PolicyError as e:
            return P.SpawnFailed(msg.req, str(e), code="policy"), []
        except trio.TooSlowError:
            return _paths_too_slow(msg.req), []
        timeout = cfg.timeout
        if msg.timeout is not None:
            if not (msg.timeout > 0 and msg.timeout < 1e9):
                return P.SpawnFailed(msg.req, "timeout must be a positive number of seconds below 1e9, "
                                     f"got {msg.timeout!r}", code="bad-request"), []
            timeout = msg.timeout if timeout is None else min(timeout, msg.timeout)
        reserve = self._reserve_fits(pool, msg, cfg, conn.peer_uid) if conn is not self._reserve_conn else None
        if reserve is not None:
            try:
                taken = await self._take_reserved(pool, reserve, conn, msg, timeout, cfg, flight)
            except _Refused as r:
                return P.SpawnFailed(msg.req, r.message, code=r.code, path=r.path), []
            if taken is not None:
                return taken
        if conn is self._reserve_conn:
            timeout = None  # a reserve child's deadline is armed when a request takes it
        try:
            make = functools.partial(self._plan, pool, msg, cfg, deferred=conn is self._reserve_conn, prewarm=prewarm,
                                     pins=pins)
            # In a worker thread when it stats host paths the client named, or checks a workspace
            # (up to 100000 entries a client chose): neither may hold up the loop.
            slow = own_paths or cfg.workspace is not None
            plan = await self._look(conn.peer_uid, make) if slow else make()
        except trio.TooSlowError:
            return _paths_too_slow(msg.req), []
        except _Refused as r:
            return P.SpawnFailed(msg.req, r.message, code=r.code, path=r.path), []
        cid = f"{self._prefix}-{next(self._ids)}"
        # stdio="fds" with max_output_bytes: the daemon writes the counted output into the client's
        # stdout/stderr, which must be pipes (see _relay_target); each becomes a nonblocking fd of ours.
        targets: list[int] = []
        uid = conn.peer_uid

        def drop(fds) -> None:  # pipe ends the client reads, or may hold the lock of
            self.hands.close(uid, fds)

        def drop_pairs() -> None:  # (the first of each pair comes from the child: ours alone)
            _close([r for r, _ in relays] + [r for r, _ in detached])
            drop([w for _, w in relays] + [w for _, w in detached])

        if msg.stdio == "fds":
            try:
                mounted = any(policy.on_a_mount(fd) for fd in client_fds)
            except OSError as e:
                return P.SpawnFailed(msg.req, f"stdio='fds': {e.strerror}", code="bad-request"), []
            if mounted:  # files (a terminal, a redirect): which mount, from tables a user can make large
                try:
                    why = await self._look(uid, policy.stdio_problem, client_fds, conn.peer_pid)
                except trio.TooSlowError:
                    why = "looking up the fds' mounts took too long"
                if why is not None:
                    return P.SpawnFailed(msg.req, f"stdio='fds': {why}", code="bad-request"), []
        if msg.stdio == "fds" and cfg.max_output is not None:
            try:  # (the open waits on the pipe's lock: in a thread of the client's uid)
                for cfd in client_fds[1:]:
                    targets.append(await self.hands.reopen(uid, cfd, _relay_target))
            except (ValueError, OSError) as e:
                drop(targets)
                what = e.strerror if isinstance(e, OSError) else str(e)
                return P.SpawnFailed(msg.req, f"stdio='fds' with max_output_bytes: {what}", code="bad-request"), []
            except BaseException:
                drop(targets)
                raise
        # cgroup v2: make the child's cgroup first and clone it straight into it
        # (CLONE_INTO_CGROUP): no migration of a running task at all. v1 attaches after the clone.
        born_in = None
        ahead: network.Lease | None = None  # a prepared network namespace's lease, until the child holds it
        ahead_fd = -1
        if self._into_cgroup and self._wants_cgroup(cfg):
            try:
                born_in = await trio.to_thread.run_sync(self._make_cgroup, cid, cfg)
            except SetupError as e:
                drop(targets)
                return P.SpawnFailed(msg.req, e.message, "cgroup", e.errno, e.hint, code="unavailable"), []
            except BaseException:
                drop(targets)
                raise
        # The child's pipes. Ours are CLOEXEC; the zygote hands its copies to the clone.
        mine: list[int] = []
        theirs: list[int] = []
        relays: list[tuple[int, int]] = []  # (read end from the child, nonblocking write end to the reader)
        detached: list[tuple[int, int]] = []  # (read end from the child, write end of the spawner's tap)
        slot = None  # its host id range (userns.IdSlots), until a Child holds it
        trees: list[int] = []  # idmapped copies of the client's bind sources, until the clone has them
        own_id = None  # the client's own host id for the child's sandbox ids (with trees: _idmapped)
        registered: Child | None = None  # a child in self.children whose Spawned has not gone out
        stdio: list[int] = []  # the child's ends of the stdio pipes made here (see _own_stdio)
        try:
            limit = cfg.max_output
            if msg.stdio == "fds":
                theirs.append(client_fds[0])
                if limit is None:
                    theirs += client_fds[1:]
                while targets:  # the daemon counts what passes (max_output_bytes) and writes it on
                    r, w = os.pipe2(os.O_CLOEXEC)
                    theirs.append(w); stdio.append(w)
                    relays.append((r, targets.pop(0)))  # (the relay's alone: not in `mine`)
                out = []
            else:
                if msg.stdin:
                    r, w = os.pipe2(os.O_CLOEXEC)
                    theirs.append(r); mine.append(w); stdio.append(r)
                else:
                    theirs.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
                for _ in range(2):
                    r, w = os.pipe2(os.O_CLOEXEC)
                    theirs.append(w); mine.append(r); stdio.append(w)
                    if msg.detached:  # the daemon reads the child's pipe; the spawner reads a tap
                        tr, tw = os.pipe2(os.O_CLOEXEC)
                        mine.remove(r)
                        detached.append((r, tw))
                        mine.append(tr)
                    elif limit is not None:
                        r2, w2 = os.pipe2(os.O_CLOEXEC)
                        mine.remove(r)
                        relays.append((r, w2))
                        mine.append(r2)
                out = list(mine)
            ctl_r, ctl_w = os.pipe2(os.O_CLOEXEC)
            st_r, st_w = os.pipe2(os.O_CLOEXEC)
            res_r, res_w = os.pipe2(os.O_CLOEXEC)
            theirs += [ctl_r, st_w, res_w]
            mine += [ctl_w, st_r, res_r]
            try:
                if self.id_slots is not None:  # (a root daemon: a host id range of its own, see userns)
                    try:
                        slot = self.id_slots.take()
                    except LookupError as e:
                        raise _NoIdSlot(_errno.EAGAIN, str(e)) from None
                owner = self.id_slots.first_id(slot) if slot is not None and self._give_ownership else 0
                if (slot is not None and uid != 0 and any(b.pin is not None for b in plan.binds)
                        and not self._test_knob("NO_IDMAP", False, bool)):  # (a test of the child's own walk)
                    plan, trees, own_id = await self._idmapped(plan, uid, conn.peer_gid)
                if slot is not None and own_id is None and conn is not self._reserve_conn:
                    own_id = self._own_id_for_pool_rw(uid, plan)  # (a reserve child's client is unknown yet)
                if slot is not None:
                    self._own_stdio(stdio, slot, own_id, plan)
                zyg = pool.pick()
                flags, extra = ALL_NAMESPACES | CLONE_PARENT | len(trees) << TREES_SHIFT, list(trees)
                if born_in is not None:
                    flags |= CLONE_INTO_CGROUP
                    extra.append(born_in.fd())
                if cfg.network is not None and zyg.info.get("given_netns") and (took := self._take_net_ready()):
                    # Born in a namespace prepared ahead (network.prepare): its veth, address and
                    # route exist already; _network_for adds its rules and brings the host end up.
                    ahead, ahead_fd = took
                    self._net_takes += 1
                    self._net_wake.set()
                    flags |= GIVEN_NETNS
                    extra.append(ahead_fd)
                pid = await zyg.clone(theirs + extra, flags, owner)
            except (ZygoteDied, OSError) as e:
                refused = isinstance(e, _BindRefused)  # (before the clone: no cgroup or netns fault)
                if slot is not None:
                    self.id_slots.give(slot)
                    slot = None
                if ahead is not None:  # no child in it: its veth goes
                    self._nursery.start_soon(self._net_discard, ahead)
                    ahead = None
                # No child: our ends of its pipes (and any relay pipes) go now, or every failed
                # clone in a burst would leak a handful of fds.
                _close(mine)
                drop_pairs()
                mine, relays, detached = [], [], []  # closed: the handler below must not close them again
                if born_in is not None:
                    cg, born_in = born_in, None
                    with trio.CancelScope(shield=True):  # removed even if the client goes meanwhile
                        await trio.to_thread.run_sync(self._cgroup_remove, cg)
                    if (isinstance(e, OSError) and not isinstance(e, NetnsJoinFailed) and not refused
                            and e.errno in (_errno.EINVAL, _errno.EOPNOTSUPP, _errno.ENOSYS, _errno.E2BIG)):
                        # (E2BIG: clone3 before Linux 5.7 has no cgroup field, and says so)
                        self._into_cgroup = False  # this kernel cannot: attach after the clone from now on
                        return P.SpawnFailed(msg.req, f"{e} (CLONE_INTO_CGROUP is now off; retry)", "clone",
                                             e.errno or 0, code="retry"), []
                if isinstance(e, _BindRefused):
                    return P.SpawnFailed(msg.req, e.message, e.step if e.code != "policy" else "",
                                         e.errno or 0, e.hint, code=e.code), []
                if isinstance(e, ZygoteDied):
                    return P.SpawnFailed(msg.req, str(e), "clone", code="retry"), []
                if isinstance(e, NetnsJoinFailed):  # that zygote gets none from now on: make its own
                    zyg.info["given_netns"] = False
                    return P.SpawnFailed(msg.req, str(e), "network", e.errno or 0, code="retry"), []
                return P.SpawnFailed(msg.req, str(e), "clone", e.errno or 0,  # (the tasks hint is not a slot's)
                                     "" if isinstance(e, _NoIdSlot) else _clone_hint(e.errno), code="unavailable"), []
            finally:
                # the client's own fds are closed by our caller
                _close([fd for fd in theirs if fd not in client_fds] + trees)
                theirs, trees = [], []
                if ahead_fd >= 0:  # the child keeps the namespace alive now (or nobody needs it)
                    os.close(ahead_fd)
                    ahead_fd = -1
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:  # out of fds: the clone gets EOF on its control pipe and exits
                self._nursery.start_soon(self._reap_strays)
                raise
            child = Child(id=cid, pid=pid, pidfd=pidfd, conn=conn,
                          started=time.monotonic(), timeout=timeout, timeout_grace=cfg.timeout_grace,
                          status_stream=trio.lowlevel.FdStream(st_r),
                          result_stream=self.hands.end(res_r, lambda: child.peer_uid, "result"),
                          cpu_time=cfg.cpu_time,
                          pool=pool.config.name, peer_uid=conn.peer_uid, detached=msg.detached,
                          has_result=msg.kind not in ("exec", "script"), watchers=[conn],
                          direct=not plan.reaper, id_slot=slot, own_id=own_id)
            slot = None  # (given back when its watcher ends)
            child.cgroup, born_in = born_in, None  # the child owns it now (removed after reaping)
            child.net_ahead, ahead = ahead, None  # (released when its watcher ends, or used before go)
            mine.remove(st_r)
            mine.remove(res_r)
            self.children[child.id] = child
            conn.children[child.id] = child
            registered = child
            flight.land()  # (counted as this child from here)
            if child.detached and child.peer_uid != 0:  # (until _watch ends: max_detached_per_client)
                self._count(self.detached_by_uid, child.peer_uid, 1)
            self.spawns_total += 1
            self._nursery.start_soon(self._watch, child)
            if cfg.export is not None:  # (after the watcher: a memfd_create that fails leaves no stray)
                child.collector = workspace.Collector(cfg.export)
            ctl = trio.lowlevel.FdStream(ctl_w)
            mine.remove(ctl_w)
            failure = await self._setup_outside(child, ctl, plan, msg, cfg)
            if failure is not None:
                self._kill(child, signal.SIGKILL)
                _close(out)
                drop_pairs()
                return failure, []
            if detached:
                self._start_detached(child, conn, detached, limit)
            if relays:
                box = [0]
                for r, w in relays:
                    self._nursery.start_soon(self._relay, child, r, w, limit, box)
            return P.Spawned(msg.req, child.id, pid, msg.stdio == "pipe" and msg.stdin), out
        except BaseException:
            # Cancelled (the connection closed), out of fds half-way through making the pipes, or
            # a bug: nothing handed our pipe ends on yet. A child already registered is killed by
            # the connection's own cleanup, unless detached: that one outlives its connection, and
            # nobody was told its id (no Spawned), its output has no ring to attach to, and it
            # held a place of its uid's max_detached_per_client until the daemon stopped.
            if registered is not None and registered.detached:
                self._kill(registered, signal.SIGKILL)
            _close([fd for fd in theirs if fd not in client_fds] + trees)
            drop(targets)
            _close(mine)
            drop_pairs()
            if slot is not None:  # cloned (a stray the zygote's reaping handles) or not: no Child holds it
                self.id_slots.give(slot)
            if ahead is not None:  # (its stray, if cloned, dies with the veth's namespace's last user)
                self._nursery.start_soon(self._net_discard, ahead)
            if born_in is not None:  # made for a child that never came to be
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._cgroup_remove, born_in)
            raise

    @staticmethod
    def _pool_rw(plan: C.ChildPlan) -> bool:
        """Whether the plan binds one of its pool's sources read-write (a client's own binds carry
        ``pin`` when the client is not root: they are idmapped instead, _idmapped)."""
        return any(not b.readonly and b.pin is None for b in plan.binds)

    def _own_stdio(self, fds: list[int], slot: int, own_id: int | None, plan: C.ChildPlan) -> None:
        """Give the child's ends of the stdio pipes the daemon made to the host ids its payload
        runs as (a root daemon's). A pipe belongs to whoever made it, mode 0600: as root's, a
        payload could use the fds it was given but not open them again by name, so
        ``open("/dev/stdout", "w")``, ``echo x > /dev/stderr`` and ``/proc/self/fd/1`` failed
        with EACCES. Only pipes made for this child (never a client's own fds), and nobody else
        runs as those ids (a child's range is its own; a client's own id only reaches its own
        children, each in a pid namespace that shows no other's fds)."""
        first = self.id_slots.first_id(slot)
        hu = own_id if own_id is not None else first + plan.uid
        hg = own_id if own_id is not None else first + plan.gid
        for fd in fds:
            os.fchown(fd, hu, hg)

    def _own_id_for_pool_rw(self, uid: int, plan: C.ChildPlan) -> int | None:
        """The host id a root daemon's child of non-root client ``uid`` runs as (its sandbox uid
        and gid) when its pool binds a host directory read-write: the client's own
        (userns.client_id), as for idmapped binds. None: the child keeps its range's ids (a root
        client, or no pool read-write bind).

        Why: host id ranges go from one child to the next whoever its client is (and a restarted
        daemon hands out its first ranges again), so what a child left in such a bind, whatever
        its mode, was a later child's of any client (a helper's red-team: another client's 0600
        file read after ~130 cheap spawns). As the client's own id, a child reaches there what
        the client's other children made and, as "other", what the rest made; files of range
        ids are "other" to it too. Reserve and leased children of such pools have their maps
        before their client is known: only root clients take them (_reserve_fits, _lease).

        Raises:
            _BindRefused: the client has no such id (uid past userns.CLIENT_IDS, or host accounts
                among the client ids): the spawn fails, step "userns".
        """
        if uid == 0 or not self._pool_rw(plan):
            return None
        try:
            return self.id_slots.own_id(uid)
        except OSError as e:
            raise _BindRefused(e.errno or _errno.ERANGE,
                               f"the pool binds a host directory read-write, so a non-root client's child runs "
                               f"as the client's own host id, and there is none: {e.strerror}",
                               hint="give this client a pool without read-write binds",
                               code="sandbox", step="userns") from None

    async def _idmapped(self, plan: C.ChildPlan, uid: int, gid: int
                        ) -> tuple[C.ChildPlan, list[int], int | None]:
        """The plan with the binds of sources a non-root client named (``MountSpec.pin``) made
        idmapped copies (mounts.idmapped_tree), their fds in ``MountSpec.tree`` order, and the
        host id the child's sandbox uid and gid must map to (None: no copy was made).

        Through such a bind the child acts as the client: the mount's maps take the client's
        ``uid``/``gid`` (its primary group) to host ids of the client's own (userns.client_id,
        never any other client's child's), one way (_nsmaker.one_way_map), every other id to
        itself, and the child's sandbox uid and gid map to those ids. So files the child makes
        there belong to the client, the client's own files are the child's (a 0700 directory of
        the client's works, read-only or read-write as bound), and files of anyone else are
        others' to the child. Without it, what a child made there belonged to its host id range,
        reused by later children of other clients (a set-ID file, under a pool without seccomp,
        let a local user become such a uid). Mapped to the child's range instead (the first
        version), a copy that outlived the child behind an fd its payload handed out gave a
        later child of another client with the same range the client's files.

        Fails closed for read-write binds: one that cannot be idmapped (a file system without
        idmapped mounts anywhere under it, no user namespace for the maps, a walk that did not
        end in time) refuses the spawn; a read-only one is bound as before (the log says so).
        More than MAX_TREES binds of the client's own are refused.

        Raises:
            _BindRefused: the spawn fails, naming the mounts step (or the policy).
        """
        if sum(b.pin is not None for b in plan.binds) > C.MAX_TREES:
            raise _BindRefused(_errno.E2BIG, f"at most {C.MAX_TREES} binds of the client's own host paths "
                               "per child (each is a mount of its own)", code="policy")
        box: dict = {"done": False, "late": False, "trees": []}
        lock = threading.Lock()
        if self._idmaps is None:
            self._idmaps = IdmapMaker()  # (its server starts at the first request)
        maker = self._idmaps

        def make() -> tuple[C.ChildPlan, list[int], list[str], int | None]:
            trees: list[int] = []
            plain: list[str] = []  # read-only binds made without an idmap, and why
            binds = list(plan.binds)
            ns, own = -1, None
            try:
                try:
                    own = self.id_slots.own_id(uid)
                    ns = maker.make(uid, own, gid, own)  # (one way: _nsmaker.one_way_map)
                except OSError as e:
                    ns, why = -1, e
                for i, spec in enumerate(binds):
                    if spec.pin is None:
                        continue
                    if ns >= 0:
                        try:
                            tree = mounts.idmapped_tree(spec, ns)
                        except (OSError, SetupError) as e:
                            why = e
                        else:
                            binds[i] = msgspec.structs.replace(spec, tree=C.TREE_FD + len(trees))
                            trees.append(tree)
                            continue
                    text = getattr(why, "message", None) or str(why)
                    if not spec.readonly:
                        raise _BindRefused(getattr(why, "errno", 0) or _errno.EIO,
                                           f"read-write bind of {quoted(spec.source)}: no idmapped mount ({text})",
                                           hint=_HINT_IDMAP, code="sandbox")
                    plain.append(f"{spec.source} bound read-only without an idmap: {text}")
            except BaseException:
                _close(trees)
                raise
            finally:
                if ns >= 0:
                    os.close(ns)
            with lock:
                if box["late"]:  # (the spawn gave up waiting: nobody takes them)
                    _close(trees)
                    return plan, [], plain, None
                box["done"], box["trees"] = True, trees
            return msgspec.structs.replace(plan, binds=binds), trees, plain, own

        try:
            plan, trees, plain, own = await self._look(uid, make)
        except BaseException as e:
            with lock:  # (finished just as the wait ended: its trees are ours to close)
                box["late"] = True
                _close(box["trees"])
            if isinstance(e, trio.TooSlowError):
                raise _BindRefused(_errno.ETIMEDOUT, _paths_too_slow(0).message, code="unavailable") from None
            raise
        for text in plain:
            self.observer.log.warning("mounts", message=text)
        return plan, trees, (own if trees else None)

    # ---- the pool reserve: children confined ahead of requests ---------------------------------

    @staticmethod
    def _reserve_request(pool: Pool, reserve: Reserve) -> SandboxConfig | None:
        """What a reserve's children are requested with: nothing (the pool's default), or for the
        networked reserve the pool's own SandboxConfig, network ceiling included."""
        return pool.config.sandbox if reserve.network else None

    def _reserve_fits(self, pool: Pool, msg: P.Spawn, cfg: SandboxConfig, uid: int) -> Reserve | None:
        """The reserve a request of client ``uid`` can take a child from: one built with exactly
        the request's effective SandboxConfig (the pool's default, or with ``reserve_network``
        the default plus the pool's network), daemon-made pipes, no test hooks. Its cgroup limits
        (memory, pids, cpu) may differ when the reserve children have a cgroup: the daemon writes
        the request's limits into it before the Job (policy already made them no looser than the
        pool's), so a request with its own limits skips the clone and, on cgroup v1, the attach
        stall too. None for a non-root client of a pool with read-write binds: its child runs as
        the client's own id (_own_id_for_pool_rw), and a reserve child's maps are written
        before anyone asks for it."""
        if not self._reserve_serves(pool, uid):
            return None
        if not (msg.stdio == "pipe" and not msg.detached
                and msg.test_fail_step is None and not msg.test_relax_mounts and not msg.test_landlock_abi):
            return None
        for reserve in pool.reserves:
            if reserve.size == 0 or (cfg.network is not None) != reserve.network:
                continue
            built = reserve.built
            if cfg != built and not (
                    self._wants_cgroup(built)
                    and msgspec.structs.replace(cfg, memory=built.memory, pids=built.pids, cpu=built.cpu) == built):
                continue
            if built.pids is None and (cfg.pids or 0) > rlimits.DEFAULT_PROCESSES:
                continue  # (built without a pids limit, it has RLIMIT_NPROC DEFAULT_PROCESSES: see rlimits)
            if _needs_reaper(cfg, msg.kind) == _needs_reaper(built, "deferred"):
                return reserve
        return None

    def _reserve_serves(self, pool: Pool, uid: int) -> bool:
        """Whether client ``uid`` may take the pool's reserve children (by request or lease): all
        may, but where a root daemon runs a non-root client's children as the client's own id
        (_own_id_for_pool_rw) only root does."""
        return uid == 0 or self.id_slots is None or not pool.config.sandbox.rw_binds

    @staticmethod
    async def _limits_for(child: Child, cfg: SandboxConfig) -> str:
        """Give a reserve child's cgroup the request's limits (before its Job): "ok"; "skip" when
        it cannot take them as it is (no cgroup, or a memory limit without headroom over what it
        already uses: the child stays in the reserve, the request clones); "refused" when the
        kernel refused a write (the child is discarded, the request clones)."""
        want = cgroups.limits(cfg.memory_bytes, cfg.pids, cfg.cpu)
        if child.cgroup is None:
            return "skip" if want else "ok"
        if child.cgroup.limits == want:
            return "ok"
        try:  # a worker thread: lowering a memory limit makes the kernel reclaim first
            done = await trio.to_thread.run_sync(child.cgroup.set_limits, cfg.memory_bytes, cfg.pids, cfg.cpu)
        except SetupError:
            return "refused"
        return "ok" if done else "skip"

    async def _take_reserved(self, pool: Pool, reserve: Reserve, conn: Connection, msg: P.Spawn,
                             timeout: float | None, cfg: SandboxConfig, flight: _Flight):
        """Hand a waiting reserve child this request: its Job on the control pipe, its pipes to the
        client. None when the reserve is empty (the caller clones as usual). Raises _Refused."""
        kind, target, env = self._check_request(pool, msg)
        job = C.frame(C.Job(kind=kind, payload=msg.payload, target=target, argv=msg.argv, env=env,
                            process_name=msg.process_name, result_pickle=msg.trusted_results, py=msg.py))
        while reserve.children:
            child = reserve.take()
            fit = "gone"
            if not child.exited.is_set() and child.ctl is not None:
                try:
                    if self._fit_pause:  # (a test hook: a client's going lands in the fitting)
                        await trio.sleep(self._fit_pause)
                    fit = await self._limits_for(child, cfg)
                except BaseException:  # cancelled (the client went): out of the reserve and
                    self._kill(child, signal.SIGKILL)  # nobody's, it must not linger (it counts)
                    raise
                # The write awaited: the pool may have been replaced (a reload discarded the list
                # this child was out of) and the child may have died meanwhile.
                if pool.stopping or self.pools.get(pool.config.name) is not pool:
                    self._kill(child, signal.SIGKILL)
                    fit = "refused"
                elif child.exited.is_set() or child.ctl is None:
                    fit = "gone"
                elif fit == "skip":  # (every child of a reserve is alike) keep it; clone
                    reserve.children.insert(0, child)
                    return None
            ctl, child.ctl = child.ctl, None
            fds, child.reserve_fds = child.reserve_fds, []
            if fit != "ok":
                _close(fds)
                if ctl is not None:
                    await ctl.aclose()  # EOF: a live child whose cgroup refused the limits exits
                if fit == "refused":  # the next one would refuse them too: clone, which reports why
                    return None
                continue
            if not msg.stdin:  # the child reads EOF, as from /dev/null: closed before the Job, while
                os.close(fds.pop(0))  # no payload code can have handed its end to anyone
            self._hand_to(child, conn, timeout)
            self._cpu_start(child)  # (before the Job: from it on, the payload runs)
            child.has_result = kind not in ("exec", "script")
            try:
                # The pipe is empty and a Job frame is small: one non-blocking write, no scheduling
                # round on the request's path (send_all only for what a large payload leaves).
                try:
                    rest = memoryview(job)[os.write(ctl.fileno(), job):]  # (a view: no copy of a large Job)
                except BlockingIOError:
                    rest = job
                if rest:
                    await ctl.send_all(rest)
            except (trio.BrokenResourceError, OSError):  # it died while waiting: try the next one
                conn.children.pop(child.id, None)
                child.conn, child.watchers = None, []
                _close(fds)
                continue
            except BaseException:  # cancelled: the connection's cleanup kills the child
                _close(fds)
                raise
            finally:
                ctl.close()
            flight.land()  # (the connection's child since _hand_to: counted as that from here)
            if timeout is not None:
                self._nursery.start_soon(self._deadline_until_exit, child)
            return P.Spawned(msg.req, child.id, child.pid, msg.stdin), fds
        return None

    def _hand_to(self, child: Child, conn: Connection, timeout: float | None) -> None:
        """A reserve child is this connection's from now on: its exit is reported there, it
        counts against the connection's limits, and its clock starts (again at its Job if leased:
        Started.at)."""
        self._reserve_conn.children.pop(child.id, None)
        child.reserved = False
        child.conn, child.peer_uid, child.watchers = conn, conn.peer_uid, [conn]
        child.started, child.timeout = time.monotonic(), timeout
        conn.children[child.id] = child

    async def _lease(self, conn: Connection, msg: P.Lease) -> None:
        """Hand a waiting reserve child to the client itself (P.Lease): its pipes and the write
        end of its control pipe, on which the client later writes the Job. The child checks the
        Job's fields and reports Started (see _started), so the daemon is off the spawn's path.
        Only pools that accept callables and do not screen environments lease: those two are
        checks on the request that the daemon makes and a child would not repeat."""
        pool = self.pools.get(msg.pool or "default")
        why = code = ""
        if pool is None:
            why, code = f"no pool named {quoted(msg.pool)}", "bad-request"
        elif not pool.config.allow_callables or pool.config.forbid_secret_env:
            why, code = (f"pool {pool.config.name!r} does not lease children (it refuses callables or screens "
                         "environments: requests go through the daemon)"), "bad-request"
        elif not pool.reserve.size:
            why, code = f"pool {pool.config.name!r} keeps no reserve (--reserve N)", "bad-request"
        elif not self._reserve_serves(pool, conn.peer_uid):
            why, code = (f"pool {pool.config.name!r} leases children to root only (it binds host directories "
                         "read-write, so a non-root client's children run as the client's own host id, which a "
                         "reserve child cannot have: requests go through the daemon)"), "bad-request"
        elif (cap := self._per_client_cap(conn)) is not None and self._client_load(conn)[0] >= cap:
            why, code = "the per-client maximum of children is reached", "limit"
        elif (full := self._at_max_children()) is not None:  # (a held child counts)
            why, code = full, "limit"
        if why:
            await conn.send(P.SpawnFailed(msg.req, why, code=code))
            return
        reserve = pool.reserve
        while reserve.children:
            child = reserve.take()
            ctl, child.ctl = child.ctl, None
            fds, child.reserve_fds = child.reserve_fds, []
            if child.exited.is_set() or child.ended or ctl is None:  # (ended: its watcher already
                _close(fds)                                             # unparked; it must not park)
                if ctl is not None:
                    ctl.close()
                continue
            # What the daemon sends, the client may hold the lock of once it has it (see _pipes):
            # the control pipe goes as a copy, so our stream's close is not the last one, and the
            # copies are closed in a worker thread after the send.
            try:
                fds.append(os.dup(ctl.fileno()))
            except OSError as e:
                _close(fds)
                ctl.close()  # (the child reads EOF and exits)
                await conn.send(P.SpawnFailed(msg.req, f"the daemon is out of fds: {e.strerror}", code="limit"))
                return
            ctl.close()
            self._hand_to(child, conn, None)
            child.leased, child.leased_from = True, pool
            # Its cpu_time counts from now (its cgroup's usage is cumulative, and held it uses
            # none): the pool's limit then never waits for its Started report to be read.
            self._cpu_start(child)
            if conn.begun and child.collector is None:  # (an export comes on that pipe: read as it comes)
                self._park_status(child)
            if pool.config.sandbox.timeout is not None:
                # Held unstarted, it holds what a running child holds: no longer than the pool's
                # timeout (then it goes, and the client leases another); its Job starts its clock.
                self._nursery.start_soon(self._lease_expiry, child, pool.config.sandbox.timeout)
            try:
                await conn.send(P.Leased(msg.req, child.id, child.pid), fds)
            finally:
                self.hands.close(conn.peer_uid, fds)
            return
        await conn.send(P.SpawnFailed(msg.req, "no reserve child is waiting now", code="empty"))

    async def _lease_expiry(self, child: Child, seconds: float) -> None:
        if await _exits_within(child, seconds):
            return
        # A Started report in its pipe (a parked one) is read now: a Job read at any time until
        # here has a deadline no earlier than now, so the pool's timeout is kept exactly.
        self._unpark_status(child)
        # (LEASE_GRACE more: a Job written just before the expiry is not killed as it starts,
        # before its Started has arrived)
        if await _exits_within(child, LEASE_GRACE):
            return
        if child.leased:  # still not started
            self._kill(child, signal.SIGKILL)

    def _park_status(self, child: Child) -> None:
        """Stop reading a held (leased) child's status pipe until its Started report is needed.
        Its client writes the Job straight to it, and the child reports Started before the
        payload runs; read at once, that write woke the daemon, which this guest then ran on
        the child's own CPU, ahead of the child (≈ 0.25 ms of a leased spawn after an idle
        second; benchmarks/README.md). Nothing else comes on that pipe until the child's exit
        report (not so for a pool whose default exports a directory: the export comes on that
        pipe, and PID 1 could wait on a full pipe forever; those are read as before), and
        nothing waits for the report: its deadline is armed from the moment the
        child read the Job (Started.at), its cpu_time is counted since the lease. So it is read
        when the Job's own timeout would run out (the client says Begun with it), when the
        pool's would (_lease_expiry), when a reload retires the pool (_drain_parked), or at the
        exit, whichever comes first."""
        child.status_parked = trio.Event()
        if child.status_wait is not None:
            child.status_wait.cancel()

    async def _read_parked_after(self, child: Child, seconds: float) -> None:
        """Read a parked child's Started report ``seconds`` from now (its client's Begun: the Job's
        timeout, as the client says), unless it ended first. The deadline the report arms runs
        from when the child read the Job, so a child whose time is up then is killed at once."""
        if not await _exits_within(child, min(seconds, 1e9) if seconds > 0 else 0.0):  # (nan: at once)
            self._unpark_status(child)

    def _unpark_status(self, child: Child) -> None:
        parked, child.status_parked = child.status_parked, None
        if parked is not None:
            parked.set()

    def _drain_parked(self, child: Child) -> None:
        """Take in what a parked status pipe holds now (its reader waits for _unpark_status, not
        in a read: this is the pipe's only reader meanwhile). A reload uses it to tell a child
        that started before it from one that did not, status to count a child's age from its Job."""
        if child.status_parked is None or child.pidfd < 0:
            return
        while True:
            try:
                data = os.read(child.status_stream.fileno(), 65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:  # EOF: the reader, once unparked, sees it too
                break
            child.status_buf += data
            if not self._status_frames(child):
                break

    def _started(self, child: Child, started: C.Started) -> None:
        """A leased child read its Job from its client: count its time and arm its deadline from
        then, with the Job's timeout capped at the pool's. (Sent before any payload code runs; a
        second one, or one from a child nobody leased, is ignored.)"""
        if not child.leased or child.conn is None:
            return
        child.leased = False
        pool = child.leased_from
        # When it read the Job (a parked report is read later: _park_status), taken no earlier
        # than its lease and no later than now: its clock runs from there.
        at = min(max(started.at, child.started), time.monotonic())
        if pool is None or (pool.retired_at is not None and at >= pool.retired_at):
            child.reloaded = True  # its Job came after a reload retired its pool: not run on the old one's
            self._kill(child, signal.SIGKILL)
            return
        child.started = at
        child.has_result = started.kind not in ("exec", "script")
        t = started.timeout if started.timeout is not None and 0 < started.timeout < 1e9 else None
        cap = pool.config.sandbox.timeout  # the reserve's config has the pool's timeout
        child.timeout = t if cap is None else (cap if t is None else min(t, cap))
        if child.timeout is not None:
            self._nursery.start_soon(self._deadline_until_exit, child)
        self.observer.spawned(outcome="ok", seconds=0.0, child=child.id, pool=child.pool,
                              peer_uid=child.peer_uid, kind=started.kind, leased=True)

    async def _deadline_until_exit(self, child: Child) -> None:
        async with trio.open_nursery() as n:
            async def on_exit() -> None:
                await child.exited.wait()
                n.cancel_scope.cancel()
            n.start_soon(on_exit)
            await self._deadline(child, n.cancel_scope)
            n.cancel_scope.cancel()

    def _start_reserves(self, pool: Pool) -> None:
        for reserve in pool.reserves:
            if reserve.size:
                self._nursery.start_soon(self._fill_reserve, pool, reserve)

    async def _fill_reserve(self, pool: Pool, reserve: Reserve) -> None:
        """Keep ``reserve.size`` confined children waiting for requests (one task per reserve).

        Each is cloned and confined by the ordinary spawn path (cgroup, veth and all) as a request
        for the reserve's SandboxConfig would be, then waits for one Job; none is ever used twice.
        Up to RESERVE_PARALLEL are made at once: the zygote clones one at a time, but the children
        confine themselves in parallel, so a drained reserve comes back faster on several cores.
        """
        failures = [0]
        filling = [0]
        async with trio.open_nursery() as n:
            while not pool.stopping and not self.shutting_down:
                short = reserve.size - len(reserve.children) - filling[0]
                if short <= 0 or filling[0] >= RESERVE_PARALLEL:
                    # Until something changes that: a take, a fill done, a waiting child's death,
                    # a discard all wake it (an idle daemon sleeps: a timer here woke it twice a
                    # second, and a wake-up that lands on a leased child's start costs it the CPU).
                    await reserve.sleep(math.inf)
                    continue
                if reserve.losses > 1 and (wait := reserve.lost_at + _backoff(reserve.losses) - time.monotonic()) > 0:
                    # Its waiting children keep dying (something on the host kills them): refill
                    # after a pause that doubles with each, not in a loop of clones.
                    await reserve.sleep(wait)
                    continue
                if not self._reserve_room():
                    reserve.wants_room = True  # (woken when a child leaves: see _watch_and_reap)
                    try:
                        await reserve.sleep(5)
                    finally:
                        reserve.wants_room = False
                    continue
                quiet = reserve.last_take + self.reserve_quiet - time.monotonic()
                if 2 * (len(reserve.children) + filling[0]) >= reserve.size and quiet > 0 \
                        and reserve.gap >= self.reserve_quiet:
                    # Refill in a quiet moment: a clone now would compete for the CPU with the
                    # child that was just handed out. A reserve down to less than half, or taken
                    # from twice within RESERVE_QUIET, is refilled at once: under a steady stream
                    # of requests there is no quiet moment, and waiting for one would let it
                    # drain to nothing, and requests would clone on their own path (one
                    # requester back to back: p90 12-14 ms through the reserve, 5-6 ms refilled
                    # at once; see benchmarks/README.md, session 18).
                    await reserve.sleep(quiet)  # (a take within it ends it: then a stream)
                    continue
                filling[0] += 1
                # A reserve down to less than half is being drained by a stream of requests: its
                # children skip the prewarm (a fake request's worth of CPU that a quiet refill
                # spends to take a request's copy-on-write faults early; under load the CPU is
                # what limits the rate: 2 requesters sharing a daemon, A/B alternated 4 times, 130/s
                # with it, 141/s without).
                urgent = 2 * (len(reserve.children) + filling[0] - 1) < reserve.size
                n.start_soon(self._fill_one, pool, reserve, filling, failures, not urgent)
                await trio.sleep(0)

    async def _fill_one(self, pool: Pool, reserve: Reserve, filling: list[int], failures: list[int],
                        prewarm: bool) -> None:
        try:
            msg = P.Spawn(req=0, kind="exec", argv=["reserve"], pool=pool.config.name, stdin=True,
                          sandbox=self._reserve_request(pool, reserve))
            try:
                reply, fds = await self.spawn(self._reserve_conn, msg, [], prewarm=prewarm)
            except Exception as e:  # noqa: BLE001 - as _spawn_request: a bug or EMFILE is one failed fill
                reply, fds = P.SpawnFailed(0, f"internal error: {type(e).__name__}: {e}", "internal",
                                           code="internal"), []
            child = self.children.get(reply.child) if isinstance(reply, P.Spawned) else None
            if child is None or pool.stopping or self.shutting_down:
                _close(fds)
                if child is not None:
                    self._kill(child, signal.SIGKILL)
                if isinstance(reply, P.SpawnFailed) and reply.message != NO_ROOM:  # (room: the loop waits)
                    failures[0] += 1
                    self.observer.log.warning("reserve", pool=pool.config.name, network=reserve.network,
                                              step=reply.step, message=reply.message)
                    await trio.sleep(_backoff(failures[0]))
                return
            failures[0] = 0
            child.reserved, child.reserve_fds = True, fds
            reserve.children.append(child)
        finally:
            filling[0] -= 1
            reserve.wake.set()

    def _discard_reserve(self, pool: Pool) -> None:
        """A retired pool's waiting children go, held ones (leased, not started) too: they were
        confined by the old configuration, and the client leases new ones."""
        for reserve in pool.reserves:
            reserve.wake.set()
            for child in reserve.children:
                self._kill(child, signal.SIGKILL)
        for child in list(self.children.values()):
            if not (child.leased and child.leased_from is pool):
                continue
            self._drain_parked(child)  # (a Started report waiting there says it started in time)
            if child.leased:
                child.reloaded = True  # (its client may have written its Job: the status says why)
                self._kill(child, signal.SIGKILL)

    def _start_detached(self, child: Child, conn: Connection, pipes: list[tuple[int, int]],
                        limit: int | None) -> None:
        """Pump the child's stdout/stderr into rings (counting max_output_bytes across both) and
        tap them for the spawner from offset 0. The taps take over the count spawn() took for
        them in self.attached (it is given back here if they cannot start). Runs with no wait
        before the spawn's Spawned reply: spawn() knows by that reply that it ran."""
        child.rings = (detach.Ring(self.config.detached_buffer_bytes), detach.Ring(self.config.detached_buffer_bytes))
        total = [0]

        def count(n: int) -> bool:
            total[0] += n
            if limit is not None and total[0] > limit:
                child.output_exceeded = True
                self._kill(child, signal.SIGKILL)
                return False
            return True

        async def pump(r: int, ring: detach.Ring) -> None:
            counted = None if limit is None else trio.Event()  # (the exit report waits for it)
            if counted is not None:
                child.relays_counted.append(counted)
            try:
                await detach.pump(self.hands.end(r, lambda: child.peer_uid), ring, count,
                                  lambda n: self._pay_output(child, child.peer_uid, r, counted, total, limit, n))
            finally:
                if counted is not None:
                    counted.set()

        for ring, (r, _) in zip(child.rings, pipes):
            self._nursery.start_soon(pump, r, ring)
        uid = conn.peer_uid
        if conn.nursery is None or conn.closed:
            self.hands.close(uid, [w for _, w in pipes])
            self._count(self.attached, uid, -1)
            return
        conn.nursery.start_soon(self._taps, child, uid, [w for _, w in pipes], (0, 0))

    async def _pay_output(self, child: Child, uid: int, src: int, counted: trio.Event | None, used: list[int],
                          limit: int | None, n: int) -> None:
        """Pay ``n`` bytes of ``child``'s output (read from ``src``) from ``uid``'s budget, and
        wait while it is overdrawn. If the child dies meanwhile, with max_output_bytes
        (``limit``, of which ``used[0]`` is counted) and its exit not yet judged (``counted``),
        what the held-back pipes still hold decides output_exceeded at once: the report waits
        only EOF_GRACE for it, and later the flag could only be lost (the output cut unflagged)."""
        wait = self.output_budget.charge(uid, n)
        if wait <= 0:
            return
        until = trio.current_time() + wait
        if counted is None or limit is None:
            await trio.sleep_until(until)
            return
        child.relays_held[src] = 0
        try:
            with trio.move_on_at(until):
                await child.died.wait()
            if child.died.is_set() and not counted.is_set():
                await self._judge_held(child, uid, used[0], limit, counted)
            await trio.sleep_until(until)
        finally:
            child.relays_held.pop(src, None)

    async def _judge_held(self, child: Child, uid: int, used: int, limit: int, counted: trio.Event) -> None:
        """The child died while output of it was held back: whether what every held-back pipe
        holds (and what was read from them, not yet counted) takes ``used`` past ``limit``.
        All of them together: stdout and stderr share max_output_bytes, and each pipe alone
        may be under it while both are over."""
        held = 0
        for fd, pending in list(child.relays_held.items()):
            held += pending
            try:
                held += await self.hands.run(uid, _bytes_in_pipe, fd)
            except OSError:
                pass
        if used + held > limit:
            child.output_exceeded = True
        counted.set()

    async def _taps(self, child: Child, uid: int, fds: list[int], starts, pay=None) -> None:
        """Feed the pipes ``fds`` (their read ends are, or were about to be, the client's) from
        the child's rings, from ``starts``; ``uid``'s count in ``attached`` (taken by the caller)
        is given back when both end. Once the child has ended they get RELAY_LINGER more to
        deliver: a reader that keeps its pipes and never reads must not hold the rings (and two
        fds) for ever (attaching again works while the child runs or its record is kept)."""
        try:
            async with trio.open_nursery() as n:
                async def linger() -> None:
                    await child.exited.wait()
                    n.cancel_scope.deadline = trio.current_time() + self.tap_linger
                n.start_soon(linger)
                async with trio.open_nursery() as feeds:
                    for ring, fd, pos in zip(child.rings, fds, starts):
                        feeds.start_soon(detach.tap, ring, self.hands.end(fd, lambda: uid), pos, pay)
                n.cancel_scope.cancel()
        finally:
            self._count(self.attached, uid, -1)

    async def _attach(self, conn: Connection, msg: P.Attach) -> None:
        """Attach ``conn`` to a detached child of the same peer uid (root: any), running or kept."""
        self._expire_kept()
        kept = self.kept.get(msg.child)
        child = kept.child if kept is not None else self.children.get(msg.child)
        if child is None or not (conn.peer_uid == 0 or conn.peer_uid == child.peer_uid):
            # the same answer as for a made-up id: other peers learn nothing about the child
            await conn.send(P.Error(msg.req, "unknown-child", f"no child {quoted(msg.child)} for this peer"))
            return
        if not child.detached or child.rings is None:
            await conn.send(P.Error(msg.req, "bad-request", f"child {quoted(msg.child)} was not spawned detached=True"))
            return
        if msg.offset < 0:
            await conn.send(P.Error(msg.req, "bad-request", f"offset must be >= 0, got {msg.offset}"))
            return
        uid = conn.peer_uid
        if self.attached.get(uid, 0) >= self.config.max_attaches:  # each costs two pipes and two tasks
            await conn.send(P.Error(msg.req, "limit", f"uid {uid} already has {self.config.max_attaches} "
                                    "attached readers, the daemon's maximum per user (max_attaches)"))
            return
        starts = [max(msg.offset, ring.start) for ring in child.rings]
        pipes: list[tuple[int, int]] = []
        self._count(self.attached, uid, 1)  # counted before the awaits: concurrent attaches see it
        handed = False  # the taps task took the count over
        # Before any wait: an ended child's record is this attach's (another attach, or expiry,
        # cannot take it meanwhile); a running one reports its exit here too, even one that
        # ends while the Attached reply waits to be sent (before, that exit went unheard here,
        # and the dead child stayed in this connection's table until it closed).
        watching = False
        if kept is not None:
            del self.kept[child.id]
        elif conn not in child.watchers:
            child.watchers.append(conn)
            conn.children[child.id] = child
            watching = True
        try:
            try:
                for _ in child.rings:
                    pipes.append(os.pipe2(os.O_CLOEXEC))
            except OSError as e:
                _close([fd for pair in pipes for fd in pair])  # (nobody else has seen them)
                pipes = []
                await conn.send(P.Error(msg.req, "limit",
                                        f"the daemon cannot make the attach's pipes now: {e.strerror}"))
                return
            try:
                await conn.send(P.Attached(msg.req, child.id, child.pid, starts[0], starts[1], child.has_result),
                                [r for r, _ in pipes])
            finally:
                self.hands.close(conn.peer_uid, [r for r, _ in pipes])
            if conn.closed:
                return

            # (a replay: the daemon writes those bytes again, for the reader's budget; the
            # spawner's own taps are not held: the pump paid for what they write)
            conn.nursery.start_soon(self._taps, child, uid, [w for _, w in pipes], starts,
                                    lambda n: self.output_budget.pay(uid, n))
            handed = True  # (the attach counts until both its taps end)
        finally:
            if not handed:  # (failed, cancelled, or the connection went): our ends go too
                self.hands.close(conn.peer_uid, [w for _, w in pipes])
                self._count(self.attached, uid, -1)
                if kept is not None:  # the record stays for a later attach
                    self.kept[child.id] = kept
                elif watching:
                    if conn in child.watchers:
                        child.watchers.remove(conn)
                    conn.children.pop(child.id, None)
        if kept is not None:  # ended already: the exit follows at once, and the record goes
            try:
                await conn.send(kept.exited, kept.fds, archive=_archive_bytes(kept.fds))
            finally:
                _close(kept.fds)

    def _keep(self, child: Child, exited: P.Exited, fds: list[int]) -> None:
        kept: list[int] = []
        try:
            for fd in fds:
                kept.append(os.dup(fd))
        except OSError as e:  # out of fds: keep the exit without the export (an attacher gets the rest)
            _close(kept)
            kept = []
            if exited.export is not None:
                exited = msgspec.structs.replace(exited, export=ExportResult(
                    error=f"the daemon could not keep the archive for a later attach: {e.strerror}"))
            self.observer.log.warning("keep", child=child.id, message=f"the export was dropped: {e.strerror}")
        record = _Kept(child, exited, kept, time.monotonic() + self.config.detached_keep_seconds)
        record.size = _kept_bytes(record)
        self.kept[child.id] = record
        self._expire_kept()
        self._kept_changed.set()  # (_expire_kept_on_time: a new record, maybe the first)
        # Per peer uid, oldest first out, by count and by the bytes held (results, output rings,
        # export archives): a user leaving many large detached results behind pins no more than
        # its own share, and never pushes out another user's records.
        uid = child.peer_uid
        mine = [cid for cid, k in self.kept.items() if k.child.peer_uid == uid]  # oldest first
        while len(mine) > self.config.detached_keep_max or (
                len(mine) > 1 and sum(self.kept[cid].size for cid in mine) > self.config.detached_keep_bytes):
            _close(self.kept.pop(mine.pop(0)).fds)

    async def _expire_kept_on_time(self) -> None:
        """Expire kept records on time even if no attach or keep comes (before, an expired
        record's result, rings and archive stayed in memory until one did). One task for all
        (one per record was ≈ 3.4 KB each for detached_keep_seconds, whatever the caps)."""
        while True:
            self._kept_changed = trio.Event()
            self._expire_kept()
            if not self.kept:
                await self._kept_changed.wait()
                continue
            first = min(k.expires for k in self.kept.values())
            # (+10 ms: trio's clock and time.monotonic are both CLOCK_MONOTONIC, read apart)
            with trio.move_on_after(max(0.0, first - time.monotonic()) + 0.01):
                await self._kept_changed.wait()

    def _expire_kept(self) -> None:
        now = time.monotonic()
        for cid in [cid for cid, k in self.kept.items() if k.expires <= now]:
            _close(self.kept.pop(cid).fds)

    async def _setup_outside(self, child: Child, ctl: trio.lowlevel.FdStream, plan: C.ChildPlan,
                             msg: P.Spawn, cfg: SandboxConfig) -> P.SpawnFailed | None:
        """Everything the daemon does to the child's pid before "go", then go, then the handshake."""
        went = False  # the plan was sent: only then may a reserve child keep its control pipe
        try:
            try:
                if child.id_slot is None:
                    maps = (self.uid_map, self.gid_map)
                elif child.own_id is None:
                    maps = userns.map_lines(self.id_slots.first_id(child.id_slot), 0, 0)
                else:  # (its idmapped binds take the client's files to this: _idmapped)
                    first = self.id_slots.first_id(child.id_slot)
                    maps = (userns.own_map(first, plan.uid, child.own_id), userns.own_map(first, plan.gid, child.own_id))
                userns.outside(child.pid, *maps)
            except OSError as e:
                return P.SpawnFailed(msg.req, f"writing uid/gid maps: {e.strerror}", "userns", e.errno or 0,
                                     "the daemon needs CAP_SETUID/CAP_SETGID over the child's user namespace",
                                     code="unavailable")
            # The OOM killer's first choice, whatever score the daemon was started with (systemd's
            # OOMScoreAdjust= hands a negative one down, and at -1000 a child over its memory
            # limit could not be killed), and before its zygote: the child's is raised, the
            # zygote's stays the daemon's. Raising needs no privilege (the open needs what the
            # maps' did). Its read-only /proc keeps the child from lowering it back to the floor,
            # which is 1000 only when we hold CAP_SYS_RESOURCE (docs/architecture.md, Zygote).
            try:
                if msg.test_fail_step == "oom_score_adj":  # (--test-hooks only: _plan refuses it otherwise)
                    raise OSError(_errno.EACCES, os.strerror(_errno.EACCES))
                _sys.write_once(f"/proc/{child.pid}/oom_score_adj", b"1000")
            except OSError as e:
                return P.SpawnFailed(msg.req, f"raising the child's oom_score_adj: {e.strerror}", "oom_score_adj",
                                     e.errno or 0, "the daemon needs /proc mounted and its children's "
                                     "/proc/PID/oom_score_adj writable", code="unavailable")
            asked = _cgroup_asks(cfg)
            wants_cg = bool(asked)
            # Only children with cgroup limits get a cgroup: on cgroup v1 each attach waits for an RCU
            # grace period per hierarchy (≈35 ms measured here for 4 hierarchies), see cgroups.py.
            # cpu_time is one: the CPU of all the child's processes is counted in its cgroup.
            if child.cgroup is not None:
                pass  # cgroup v2: born in it (CLONE_INTO_CGROUP)
            elif self.cgroups is not None and (wants_cg or self.config.always_cgroup):
                # By its pid number (cgroup.procs): the watcher must not reap it meanwhile, or the
                # number could be another process's by the time the thread writes it.
                child.attaching = trio.Event()
                try:
                    cg = await trio.to_thread.run_sync(self._cgroup_for, child, cfg, msg.test_fail_step)
                except SetupError as e:
                    return P.SpawnFailed(msg.req, e.message, "cgroup", e.errno, e.hint, code="unavailable")
                finally:
                    child.attaching.set()
                if child.pidfd < 0:  # reaped meanwhile: its watcher already looked for a cgroup
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(self._cgroup_remove, cg)
                    return P.SpawnFailed(msg.req, "the child died during setup", "cgroup", code="sandbox")
                child.cgroup = cg
            elif wants_cg:
                e = self.cgroup_error
                what = "/".join(asked) + (" needs" if len(asked) == 1 else " need")
                why = " (the CPU of all its processes is counted in its cgroup)" if "cpu_time" in asked else ""
                return P.SpawnFailed(msg.req, f"{what} cgroups{why}: {e.message if e else 'none'}",
                                     "cgroup", e.errno if e else 0, e.hint if e else "", code="unavailable")
            if child.cgroup is not None:
                plan = msgspec.structs.replace(plan, cgroupns=True)
            if cfg.network is not None:
                try:
                    await self._network_for(child, cfg)
                except SetupError as e:
                    code = "unavailable" if e.errno in (_errno.EPERM, _errno.ENOENT) else "sandbox"
                    return P.SpawnFailed(msg.req, e.message, "network", e.errno, e.hint, code=code)
            if not plan.deferred:  # (a reserve child's payload runs at its Job: _take_reserved, _started)
                self._cpu_start(child)
            try:
                await ctl.send_all(C.frame(plan))
                went = True
            except (trio.BrokenResourceError, OSError):
                pass  # the child died before go; its status pipe/exit tells why
        finally:
            # A failure before go (or an exception) closes it: the child reads EOF instead of a
            # plan and exits, rather than wait for ever for a Job nobody will send.
            if went and plan.deferred and not child.exited.is_set():
                child.ctl = ctl  # the Job goes here when a request takes this reserve child
            else:
                await ctl.aclose()
        # Bounded: a child held in its setup (a bind source on a file system that stopped
        # answering) kept the request, and its place under max_children, for ever.
        first = None
        with trio.move_on_after(self.setup_timeout):
            first = await child_first_status(child)
            if not isinstance(first, (C.Ready, C.Failed)):
                await child.exited.wait()
        if isinstance(first, C.Ready):
            return None
        if isinstance(first, C.Failed):
            out_of_tasks = first.step == "fork" and first.errno == _errno.EAGAIN  # (the reaper's fork, as a clone)
            code = ("unavailable" if out_of_tasks or first.errno in (_errno.ENOSYS, _errno.EOPNOTSUPP, _errno.EPERM)
                    else "sandbox")
            hint = _clone_hint(first.errno) if out_of_tasks else first.hint
            return P.SpawnFailed(msg.req, first.message, first.step, first.errno, hint, code=code)
        if not child.exited.is_set():  # (the caller kills it)
            return P.SpawnFailed(msg.req, f"the child did not finish its setup in {self.setup_timeout:g} s "
                                 "(a file system it opens may have stopped answering)", "setup", code="sandbox")
        rc = child.status.returncode if child.status else None
        return P.SpawnFailed(msg.req, f"the child died during setup (returncode {rc})", "setup", code="sandbox")

    def _take_net_ready(self) -> tuple[network.Lease, int] | None:
        """A prepared namespace whose veth is still the one prepare made, or None. Someone may
        have deleted it meanwhile (an administrator, a network manager tidying veths): a child
        born in such a namespace could only fail its spawn, so those found are discarded here,
        and a spawn finding none makes its own namespace."""
        net = self.network
        while self._net_ready:
            lease, nsfd = self._net_ready.pop()
            if net is not None and net.intact(lease):
                return lease, nsfd
            os.close(nsfd)
            self._net_wake.set()  # (the refill makes another)
            self._nursery.start_soon(self._net_discard, lease)
        return None

    async def _network_for(self, child: Child, cfg: SandboxConfig) -> None:
        """The child's veth, address and rules (network.py), before "go"; SetupError fails it."""
        net = self.network
        if net is None:
            e = self.network_error
            raise e if e is not None else SetupError(
                "network", "networking was not started", _errno.ENOENT, network.HINT_CAP)
        assert cfg.network is not None
        if child.exited.is_set():  # (reaped already: its watcher let go of a prepared namespace)
            raise SetupError("network", "the child died before its network was set up", _errno.ESRCH)
        allow = network.parse_allow(cfg.network.allow)
        if cfg.network.allow and not allow:
            raise SetupError("network", "the allow-list names only IPv6 networks; children get IPv4 only",
                             _errno.EINVAL, "add an IPv4 network to network.allow")
        lease, child.net_ahead = child.net_ahead, None
        if lease is not None:  # born in a prepared namespace: its rules, then its host end up
            try:
                await trio.to_thread.run_sync(net.activate, lease, allow)
            except BaseException:
                self._nursery.start_soon(self._net_discard, lease, bool(allow))
                raise
        else:
            lease = await self._acquire_address(net, for_reserve=child.conn is self._reserve_conn)
            try:
                await trio.to_thread.run_sync(net.attach, lease, os.dup(child.pidfd), child.pid, allow)
            except BaseException:
                net.pool.release(lease)  # attach undid its own work
                raise
        child.lease, child.net_allow = lease, bool(allow)
        if child.exited.is_set():  # reaped while we worked: its watcher found no lease to release
            await self._network_release(child)

    async def _acquire_address(self, net, for_reserve: bool) -> network.Lease:
        """An address of the pool for a child that makes its own veth. When the pool has none
        left and a networked reserve child waits, that child gives its address up: a request
        comes before the reserve (which only ever checks that it fits the pool by itself, so a
        request with an allow-list of its own could find the last address held by it); the
        reserve makes none while a request waits for one."""
        if for_reserve and self._addresses_wanted:
            raise SetupError(network.STEP, "a request waits for an address of the pool", _errno.EADDRNOTAVAIL)
        try:
            return net.pool.acquire()
        except SetupError as e:
            if e.errno != _errno.EADDRNOTAVAIL or for_reserve:
                raise
            victim = next((r.children.pop() for p in self.pools.values() for r in p.reserves
                           if r.network and r.children), None)
            if victim is None:
                raise
            self._kill(victim, signal.SIGKILL)
            self._addresses_wanted += 1
            try:
                with trio.move_on_after(10):
                    await victim.exited.wait()
                    while True:  # (its watcher frees the address once the veth is gone: ~30 ms)
                        await trio.sleep(0.01)
                        try:
                            return net.pool.acquire()
                        except SetupError:
                            pass
            finally:
                self._addresses_wanted -= 1
            raise

    async def _network_release(self, child: Child) -> None:
        if child.net_ahead is not None:  # born in a prepared namespace, died before it was activated
            ahead, child.net_ahead = child.net_ahead, None
            await self._net_discard(ahead)
        lease, child.lease = child.lease, None
        if lease is not None:
            await self._net_discard(lease, child.net_allow)

    async def _net_discard(self, lease: network.Lease, has_allow: bool = False) -> None:
        """Delete a lease's veth and its rules (``has_allow``: with an allow chain) and free its
        address: a child's after reaping, a prepared namespace nobody used or activated."""
        net = self.network
        if net is None:
            return  # shut down: net.close removed every link of the pool
        self.cleaning += 1
        try:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(net.detach, lease, has_allow)
        finally:
            self.cleaning -= 1
            net.pool.release(lease)

    async def _keep_net_ahead(self, net: network.NetworkHost) -> None:
        """Keep ``network_ahead`` network namespaces prepared (network.prepare) for networked spawns,
        made once NET_AHEAD_QUIET passed without a networked spawn taking one, off the spawns'
        path; a spawn that finds none makes its own (network.attach), as before."""
        try:
            with trio.CancelScope() as self._net_refill:
                await self._keep_net_ahead_loop(net)
        finally:
            self._net_refill = None
            self._net_refill_done.set()

    async def _keep_net_ahead_loop(self, net: network.NetworkHost) -> None:
        fails = 0
        while self.network is net:
            # Nothing is kept while no pool allows network (a reload took it from the last one);
            # the egress table stays until the daemon ends, for networked children still running.
            ahead = self.config.network_ahead if any(p.config.sandbox.network is not None
                                                     for p in self.pools.values()) else 0
            while len(self._net_ready) > ahead:  # lowered by a reload
                lease, nsfd = self._net_ready.pop(0)
                os.close(nsfd)
                await self._net_discard(lease)
            if not any(z.info.get("given_netns") for p in self.pools.values() for z in p.zygotes):
                await trio.sleep(1.0)  # no zygote can clone into one (no CAP_SYS_ADMIN): none made
                continue
            if len(self._net_ready) >= ahead:
                self._net_wake = trio.Event()
                await self._net_wake.wait()
                continue
            takes = self._net_takes
            await trio.sleep(NET_AHEAD_QUIET if not fails else min(30.0, 0.1 * 2 ** fails))
            if self._net_takes != takes or self.network is not net:
                continue  # not quiet yet (or shut down)
            if self._addresses_wanted:  # (a request waits for the next free one)
                fails = min(fails + 1, 10)
                continue
            try:
                lease = net.pool.acquire()
            except SetupError:  # every address in use: again later
                fails = min(fails + 1, 10)
                continue
            try:
                nsfd = await trio.to_thread.run_sync(net.prepare, lease)
            except Exception as e:  # noqa: BLE001 - (this task failing would end the daemon)
                net.pool.release(lease)  # prepare undid its own work
                fails = min(fails + 1, 10)
                self.observer.log.warning("network", message=f"preparing a network namespace ahead: "
                                          f"{e.message if isinstance(e, SetupError) else repr(e)}")
                continue
            if self.network is not net:  # shut down meanwhile (a cancelled thread's result still
                os.close(nsfd)           # comes back): its veth goes with its namespace and net.close
                return
            fails = 0
            self._net_ready.append((lease, nsfd))

    # ---- watching and reaping ----------------------------------------------------------------

    def _kill(self, child: Child, signum: int) -> None:
        """Send ``signum`` (SIGKILL or SIGSTOP: forced, whatever the child) now."""
        # pidfd is -1 once reaped: its number may already belong to another file.
        if child.exited.is_set() or child.pidfd < 0:
            return
        try:
            signal.pidfd_send_signal(child.pidfd, signum)
        except ProcessLookupError:
            pass
        except PermissionError as e:  # (not ours to signal: a capability missing) loud, not fatal
            self.observer.log.error("kill", child=child.id, signal=signum, message=str(e))

    async def _signal(self, child: Child, signum: int) -> None:
        """Send ``signum`` with subprocess semantics.

        The kernel drops a signal sent to a pid namespace's init from outside unless init has a
        handler for it (only SIGKILL and SIGSTOP are forced). So for a child whose payload is
        PID 1: a caught or ignored signal goes as itself; one whose default action is to stop
        goes as SIGSTOP; one whose default is to terminate goes as SIGKILL and the exit is
        reported as ``-signum``. The dispositions come from /proc (the pid is our unreaped child:
        it cannot be reused meanwhile). /proc/PID/syscall (is it in sigwait?) is read in a worker
        thread of the child's uid: it waits for the child's exec lock, which an execve holds
        while it closes the fds marked close-on-exec, so for as long as a FUSE server leaves a
        FLUSH unanswered. A read that takes over PROBE_TIMEOUT counts as "no" (a timeout's
        SIGTERM must not wait on it)."""
        if child.direct and signum not in (signal.SIGKILL, signal.SIGSTOP) and signum not in _DEFAULT_IGNORED:
            handled, alive = _signal_state(child.pid, signum)  # (status takes no exec lock)
            if not handled and alive:
                with trio.move_on_after(PROBE_TIMEOUT):
                    handled = await self.hands.run(child.peer_uid, _in_sigtimedwait, child.pid, lane="probe")
            if handled:
                child.sigint_delivered |= signum == signal.SIGINT
            elif signum in _DEFAULT_STOPS:
                signum = signal.SIGSTOP
            else:
                if alive and not child.emulated:  # a child already dying keeps the cause it dies of
                    child.emulated = signum
                signum = signal.SIGKILL
        self._kill(child, signum)

    async def _watch(self, child: Child) -> None:
        """Watch one child to its reaping. Shielded: the daemon's own cancellation (SIGTERM)
        must not leave a child unreaped or its cgroup behind; ``shutdown`` kills the children,
        and only a child that will not die gets its ``scope`` cancelled."""
        self.watching += 1
        try:
            with trio.CancelScope(shield=True) as child.scope:
                await self._watch_and_reap(child)
        finally:
            _close(child.reserve_fds)  # a reserve child that ended unused
            child.reserve_fds = []
            if child.ctl is not None:
                with trio.CancelScope(shield=True):
                    await child.ctl.aclose()
                child.ctl = None
            self.watching -= 1
            if child.id_slot is not None:  # (not given back after wait4: the watch failed before)
                self.id_slots.give(child.id_slot)
                child.id_slot = None
            if child.detached and child.peer_uid != 0:
                self._count(self.detached_by_uid, child.peer_uid, -1)
            if child.collector is not None:
                child.collector.close()  # an export nobody will receive (cancelled, or already sent)
            self._release_result(child)  # (a watch that failed before the report)

    async def _watch_and_reap(self, child: Child) -> None:
        try:
            async with trio.open_nursery() as n:
                n.start_soon(self._read_status, child)
                n.start_soon(self._read_result, child)
                n.start_soon(self._deadline, child, n.cancel_scope)
                await _wait_pidfd(child.pidfd)
                child.ended = True  # (its result, if waiting for room, is read now: _hold_result)
                child.died.set()  # (a relay held back counts what its pipe holds: _relay)
                self._unpark_status(child)  # (a held child's reports: read to EOF now)
                self._wake_relays(child.peer_uid)
                self._wake_results(child.peer_uid)
                # Every writer in the pid namespace died with it, so what they wrote is in the
                # pipes and EOF follows, unless the payload handed a write end to someone
                # outside: then what is there is all there will be.
                with trio.move_on_after(EOF_GRACE):
                    await child.status_done.wait()
                    await child.result_done.wait()
                    for counted in child.relays_counted:  # (output_exceeded: see _relay)
                        await counted.wait()
                n.cancel_scope.cancel()
            if child.attaching is not None:  # (see _setup_outside: a zombie keeps its number)
                await child.attaching.wait()
            _, wstatus, ru = os.wait4(child.pid, 0)
            if child.id_slot is not None:  # its pid namespace died with it: nothing holds its ids
                self.id_slots.give(child.id_slot)  # (not after the report: a slow reader's
                child.id_slot = None  # reports would hold the daemon's ranges)
        finally:
            os.close(child.pidfd)
            child.pidfd = -1  # reaped: _kill must not signal whatever reuses the number
            self._cpu_watched.pop(child, None)  # (before its cgroup goes)
            with trio.CancelScope(shield=True):
                await child.status_stream.aclose()
                await child.result_stream.aclose()
        child.status = self._exit_status(child, wstatus, ru)
        cg, child.cgroup = child.cgroup, None
        if cg is not None:
            child.status = await trio.to_thread.run_sync(self._cgroup_stats, cg, child.status)
        export, export_fds = None, []
        if child.collector is not None:
            fields, fd = child.collector.finish()
            export, export_fds = ExportResult(**fields), [fd] if fd is not None else []
        child.exited.set()
        # A reserve child that never ran a request: waiting, or held by a client (leased) that
        # wrote it no Job the daemon heard of (a reload, an expired or given-back lease).
        unused = child.conn is self._reserve_conn or child.leased
        # (the reserve's first: a metrics scrape between the two reads one too many, not too few)
        self._reserve_conn.children.pop(child.id, None)  # (with it: see _client_count)
        self.children.pop(child.id, None)
        if child.reserved:  # died waiting (the OOM killer's pick, a reload): its reserve refills
            self._reserve_lost(child)
        self._room_freed()
        if child.ready_seen and not unused:
            self.observer.exited(child=child.id, pool=child.pool, peer_uid=child.peer_uid, status=child.status)
        elif child.ready_seen:  # (its spawn was never counted: nor is its exit)
            self.observer.counters["reserve_discards"] += 1
        exited = P.Exited(child.id, child.status, export=export, result_kind=child.result_kind,
                          result=child.result)
        # From here the record counts where it goes: a connection's send queue, or a kept record.
        self._release_result(child)
        # A detached child nobody attached to is kept before its spawner hears of the exit: an
        # Attach sent right after that Exited must find it (it was not: a race the suite hit).
        kept = child.detached and child.ready_seen and not any(
            conn is not child.conn and not conn.closed for conn in child.watchers)

        if kept:  # at once (no wait since it left self.children): an Attach finds one or the other
            self._keep(child, exited, export_fds)

        async def report() -> None:
            attached = False  # an attacher (not the spawner) was told of the exit
            try:
                for conn in list(child.watchers):  # (an attach or a close may change it meanwhile)
                    conn.children.pop(child.id, None)
                    if not conn.closed and child.ready_seen:
                        await conn.send(exited, export_fds, archive=_archive_bytes(export_fds))
                        attached = attached or (conn is not child.conn and not conn.closed)
                if child.detached and child.ready_seen and not attached and not kept:
                    self._keep(child, exited, export_fds)
            finally:
                _close(export_fds)

        # The report and the release side by side: a client that stops reading holds its send
        # up to SEND_TIMEOUT, and must not hold the child's address and cgroup meanwhile (its
        # children no longer count against it, so it could pin the whole address pool).
        async with trio.open_nursery() as n:
            n.start_soon(report)
            await self._network_release(child)  # ≈30 ms per veth, off the report's path
            if cg is not None:  # removal may wait for the kernel to let go (EBUSY)
                self.cleaning += 1
                try:
                    await trio.to_thread.run_sync(self._cgroup_remove, cg)
                finally:
                    self.cleaning -= 1

    def _wants_cgroup(self, cfg: SandboxConfig) -> bool:
        return self.cgroups is not None and (bool(_cgroup_asks(cfg)) or self.config.always_cgroup)

    def _make_cgroup(self, cid: str, cfg: SandboxConfig):
        assert self.cgroups is not None
        cg = self.cgroups.create(cid, memory=cfg.memory_bytes, pids=cfg.pids, cpu=cfg.cpu)
        try:
            cg.fd()
        except OSError as e:
            cg.remove()
            raise SetupError("cgroup", f"opening the child's cgroup for CLONE_INTO_CGROUP: {e.strerror}",
                             e.errno or 0) from None
        return cg

    def _cgroup_for(self, child: Child, cfg: SandboxConfig, test_step: str | None = None):
        assert self.cgroups is not None
        cg = self.cgroups.create(child.id, memory=cfg.memory_bytes, pids=cfg.pids, cpu=cfg.cpu)
        try:
            if test_step == "cgroup-attach-delay":  # test hook: a slow attach
                time.sleep(1.0)
            cg.attach(child.pid, fail_after_first=test_step == "cgroup-attach-half")
        except BaseException:
            # Attached in some hierarchies, maybe: a live task there keeps the cgroup busy (its
            # removal would wait, fail and hide this error). The child cannot run on half
            # placed; it was not reaped meanwhile (child.attaching), so its pidfd is its own.
            try:
                signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)
            except OSError:
                pass  # (gone already)
            try:
                cg.remove()
            except SetupError as e:  # (the attach's error is the one the client gets)
                self.observer.log.warning("cgroup", child=child.id, message=f"left for the daemon's stop: {e.message}")
            raise
        return cg

    async def _relay(self, child: Child, src: int, dst: int, limit: int, box: list[int]) -> None:
        """Copy a child's output to its reader, counting it against max_output_bytes.

        The daemon reads eagerly, so a child whose reader is slow does not block on a full pipe
        and its output is still counted (past the limit the relay stops, kills the child and
        flags output_exceeded); what is read waits in a buffer. Those buffers together hold at
        most RELAYED_PER_UID for the child's uid: past it the relay stops reading, and the child
        blocks as it would on any full pipe. A reader that goes away (EPIPE) ends the relay, so
        the child gets EPIPE too. When the connection closes the relay gets RELAY_GRACE more to
        deliver, then ends (its buffer and fds with it).

        ``dst`` is a nonblocking pipe end of the daemon's own (its pipe to the client, or a
        client's pipe reopened). The client can hold that pipe's lock, so the writes and the
        close go through a PipeEnd (worker threads of the client's uid, see _pipes); so do the
        reads of ``src``, whose write end the payload may have handed to such a client.
        """
        instream = self.hands.end(src, lambda: child.peer_uid)
        buf = bytearray()
        more = trio.Event()
        done = False
        uid = child.peer_uid  # whom the buffer is counted for (a reserve child's changes when taken)
        counted = trio.Event()  # the exit report waits for it (bounded): output_exceeded is known
        child.relays_counted.append(counted)

        def owner() -> int:
            nonlocal uid
            if child.peer_uid != uid:
                self._count(self.relayed, uid, -len(buf))
                uid = child.peer_uid
                self._count(self.relayed, uid, len(buf))
            return uid

        outstream = self.hands.end(dst, owner)

        async def reader() -> None:
            nonlocal done
            try:
                while True:
                    data = await instream.receive_some(65536)
                    if not data:
                        break
                    if box[0] + len(data) > limit:
                        data = data[: max(0, limit - box[0])]
                        box[0] = limit
                        child.output_exceeded = True
                        self._kill(child, signal.SIGKILL)
                        self._count(self.relayed, owner(), len(data))
                        buf.extend(data)
                        break
                    while buf and self.relayed.get(owner(), 0) + len(data) > self.relayed_per_uid:
                        # Our own buffer drains first; any relay of this uid freeing bytes wakes
                        # us, and so does the child's death (_watch_and_reap). The event is taken
                        # before the await below: a wake meanwhile must not be lost.
                        freed = self._relayed_freed.setdefault(uid, trio.Event())
                        child.relays_held[src] = len(data)
                        if child.died.is_set() and not counted.is_set():
                            await self._judge_held(child, owner(), box[0], limit, counted)
                        await freed.wait()
                    child.relays_held.pop(src, None)
                    box[0] += len(data)
                    self._count(self.relayed, owner(), len(data))
                    buf.extend(data)
                    more.set()
                    await detach.pace(len(data))
                    await self._pay_output(child, owner(), src, counted, box, limit, len(data))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                child.relays_held.pop(src, None)  # (before the end closes src)
                done = True
                counted.set()
                more.set()

        async def writer() -> None:
            nonlocal more
            try:
                while True:
                    await more.wait()
                    more = trio.Event()
                    while buf:
                        chunk = bytes(buf[:65536])
                        await outstream.send_all(chunk)
                        who = owner()  # (before the del: a change of owner moves len(buf))
                        del buf[:len(chunk)]
                        self._count(self.relayed, who, -len(chunk))
                    if done:
                        return
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return

        scope = trio.CancelScope()
        self._relays[scope] = child
        conn = child.conn
        if conn is not None and conn is not self._reserve_conn and conn.closed:
            scope.deadline = trio.current_time() + self.relay_grace
        async def linger() -> None:
            await child.exited.wait()
            scope.deadline = min(scope.deadline, trio.current_time() + RELAY_LINGER)

        try:
            with scope:
                async with trio.open_nursery() as n:
                    n.start_soon(reader)
                    n.start_soon(linger)
                    await writer()  # delivered all, or the reader went away: the relay is over
                    n.cancel_scope.cancel()
        finally:
            del self._relays[scope]
            self._count(self.relayed, owner(), -len(buf))
            buf.clear()
            instream.close()
            outstream.close()

    def _cgroup_remove(self, cg) -> None:
        """Kill what is left in a child's cgroup and remove it (in a worker thread). Never raises:
        a cgroup the kernel will not let go of (a task stuck in D state past the kill's deadline)
        is logged and left, under the daemon's named directory, for the next start to clear."""
        try:
            try:
                cg.kill()
            finally:
                cg.remove()
        except (SetupError, OSError) as e:
            self.observer.log.error("cgroup", child=cg.child_id, message=f"left behind: {e}")

    @staticmethod
    def _cgroup_stats(cg, status: ExitStatus) -> ExitStatus:
        try:
            st = cg.stats(status.returncode)
        except OSError:
            st = None
        if not st:
            return status
        enforcement = dict(status.enforcement)
        enforcement.update(st.get("enforcement", {}))
        return msgspec.structs.replace(
            status, memory_exceeded=bool(st.get("memory_exceeded")), pids_exceeded=bool(st.get("pids_exceeded")),
            peak_memory=st.get("peak_memory"), cpu_user=st.get("cpu_user", status.cpu_user),
            cpu_system=st.get("cpu_system", status.cpu_system), enforcement=enforcement)

    def _cpu_start(self, child: Child) -> None:
        """The child's payload may run from now on: hold its cgroup's CPU usage (all its processes)
        against its cpu_time (see _cpu_guard). Called before "go" for a fresh child, before the
        Job for a reserve child a request takes, at Started for a leased one. Fail closed: a
        child with cpu_time but no cgroup (the spawn path refuses that first) is killed."""
        if child.cpu_time is None or child in self._cpu_watched or child.exited.is_set() or child.pidfd < 0:
            return
        if child.cgroup is None or self.cgroups is None:
            self.observer.log.error("cpu_time", child=child.id, message="no cgroup to count its CPU in: killed")
            self._kill(child, signal.SIGKILL)
            return
        self._cpu_watched[child] = [0.0, None, child.cgroup]  # read at the guard's next round
        self._cpu_wake.set()
        if not self._cpu_guarding:
            self._cpu_guarding = True
            self._nursery.start_soon(self._cpu_guard)

    async def _cpu_guard(self) -> None:
        """Enforce cpu_time on the whole child: SIGKILL (PID 1: the pid namespace goes with it)
        once the child's cgroup has used cpu_time CPU-seconds. RLIMIT_CPU alone counted each
        process apart, so forks each under the limit ran up any total.

        One task for all children, no fixed polling period. Each round reads, in one worker
        thread, the usage of the whole ``zygote`` tree and that of the children that could have
        reached their budget since their last reading: no child's usage grows faster than the
        tree's (hierarchical accounting), so a child whose budget left exceeds the tree's growth
        since it was read is not looked at. The next round is at the earliest moment any child
        could reach its budget, all the host's CPUs on it: (least budget left) / CPUs, at least
        CPU_CHECK_MIN later (the overshoot is at most CPUs x that, plus a thread hop). Idle
        children cost no reads of their own (one read of the tree per round serves all); a
        child alone on one of N CPUs is read about N x ln(budget / (N x CPU_CHECK_MIN)) times.
        A registration wakes the guard at once. A usage that cannot be read kills the child."""
        while True:
            if not self._cpu_watched:
                self._cpu_wake = trio.Event()
                await self._cpu_wake.wait()
                continue
            self._cpu_wake = trio.Event()  # registrations from here on cut the next sleep short
            snap = list(self._cpu_watched.items())
            try:  # (a thread of its own: cgroup removals that wait for EBUSY do not delay it)
                base, got = await trio.to_thread.run_sync(
                    _cpu_read, self.cgroups, [(w[2], child.cpu_time, w[0], w[1]) for child, w in snap],
                    limiter=self._cpu_limiter, abandon_on_cancel=True)
            except RuntimeError as e:  # no thread could be started (the host is out of tasks): later
                self.observer.log.error("cpu_time", message=f"reading CPU usage: {e}; retrying")
                await trio.sleep(CPU_CHECK_MIN * 10)
                continue
            for (child, w), used in zip(snap, got):
                if self._cpu_watched.get(child) is not w or used is None:
                    continue  # reaped meanwhile, or it cannot have reached its budget yet
                if isinstance(used, Exception):  # fail closed: a budget nobody can count is spent
                    del self._cpu_watched[child]
                    self.observer.log.error("cpu_time", child=child.id,
                                            message=f"reading its CPU usage: {used}; killed")
                    self._kill(child, signal.SIGKILL)
                elif used >= child.cpu_time:
                    del self._cpu_watched[child]
                    child.cpu_exceeded = True
                    self._kill(child, signal.SIGKILL)
                else:
                    w[0], w[1] = used, base
            left = [child.cpu_time - w[0] - (base - w[1] if base is not None and w[1] is not None else 0.0)
                    for child, w in self._cpu_watched.items()]
            if left:
                with trio.move_on_after(max(CPU_CHECK_MIN, min(left) / self._ncpu)):
                    await self._cpu_wake.wait()

    async def _deadline(self, child: Child, scope: trio.CancelScope) -> None:
        if child.timeout is None:
            return
        # child.started is time.monotonic(); trio's clock has its own origin
        await trio.sleep(max(0.0, child.started + child.timeout - time.monotonic()))
        if child.ended:  # (it exited first; its pipes' EOF grace is not its run time)
            return
        child.timed_out = True
        if child.timeout_grace:
            await self._signal(child, signal.SIGTERM)
            await trio.sleep(child.timeout_grace)
        self._kill(child, signal.SIGKILL)

    async def _read_result(self, child: Child) -> None:
        """Collect the payload's one result record, at most ``max_result_bytes`` of it.

        Only the record's kind byte and length are looked at; the body goes to the client as it
        came (it may be a pickle: nothing here ever loads it). Past the cap the daemon stops
        reading and closes its end, so the child's write fails instead of blocking.
        """
        cap = min(self.config.max_result_bytes, P.MAX_FRAME - (1 << 20))  # it must fit one Exited frame
        hdr = C.RESULT_HEADER
        buf = bytearray()
        try:
            while True:
                try:
                    data = await child.result_stream.receive_all_there(1 << 16)
                except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
                    data = b""
                if not data:
                    break
                buf += data
                if len(buf) >= hdr.size:
                    kind, length = hdr.unpack_from(buf)
                    if kind not in C.RESULT_KINDS or len(buf) > hdr.size + length:
                        child.result_kind = "invalid"  # not ours, or more than the one record
                        return
                    if length > cap:
                        child.result_kind = "too-large"
                        return
                    if child.result_held is None:
                        await self._hold_result(child, hdr.size + length)
            if not buf:
                return  # no result: sys.exit, a signal, or a kind without a return value
            if len(buf) < hdr.size:
                child.result_kind = "invalid"  # shorter than a header: cut short, or not ours
                return
            kind, length = hdr.unpack_from(buf)
            if len(buf) != hdr.size + length:
                child.result_kind = "invalid"  # cut short (killed mid-write)
                return
            child.result_kind, child.result = C.RESULT_KINDS[kind], bytes(memoryview(buf)[hdr.size:])
        finally:
            if not child.result:
                self._release_result(child)  # (kept, it is held until the child's report is made)
            with trio.CancelScope(shield=True):
                await child.result_stream.aclose()
            child.result_done.set()

    async def _hold_result(self, child: Child, size: int) -> None:
        """Take room for a result record of ``size`` bytes from its peer uid's RESULTS_PER_UID,
        waiting (reading nothing more of the pipe meanwhile) while the uid's other children that
        have not ended hold it. Taken whole at the header, so records half read never wait on
        each other; one always fits. A child that has ended waits for nothing: what its pipe
        holds is all it wrote (a pipe's worth at most), and a header claiming the budget must not
        lose a sibling's small record that sat in its pipe. (A reserve child's record comes after
        a request took it.)"""
        uid = child.peer_uid
        while (not child.ended and self.results_held.get(uid, 0)
               and self.results_held[uid] + size > self.results_per_uid):
            await self._results_freed.setdefault(uid, trio.Event()).wait()
        self._count(self.results_held, uid, size)
        child.result_held = (uid, size)

    def _wake_results(self, uid: int) -> None:
        """Wake the uid's children waiting for room for their results, to look again."""
        if uid in self._results_freed:
            self._results_freed.pop(uid).set()

    def _release_result(self, child: Child) -> None:
        if child.result_held is not None:
            uid, size = child.result_held
            child.result_held = None
            self._count(self.results_held, uid, -size)

    async def _read_status(self, child: Child) -> None:
        try:
            while True:
                if child.status_parked is not None:  # a held child's (_park_status)
                    # Out of the event loop's epoll set meanwhile: trio leaves an fd nobody waits
                    # for there with no events asked, but a hang-up is always reported, and a
                    # payload that is PID 1 closes the pipe's last write end as it starts. No task
                    # waits for it now, so this wakes nobody; the next read registers it again.
                    trio.lowlevel.notify_closing(child.status_stream.fileno())
                    await child.status_parked.wait()
                    continue
                data = None
                with trio.CancelScope() as child.status_wait:
                    try:
                        data = await child.status_stream.receive_some(65536)
                    except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
                        data = b""
                child.status_wait = None
                if data is None:  # parked while it waited (nothing was read)
                    continue
                if not data:
                    break
                child.status_buf += data
                if not self._status_frames(child):
                    return
        finally:
            child.first_event.set()
            child.status_done.set()

    def _status_frames(self, child: Child) -> bool:
        """Act on the whole frames in ``child.status_buf``; False once the child was killed for
        speaking garbage (nothing more of it is read)."""
        buf = child.status_buf
        while len(buf) >= C.LEN.size:
            (n,) = C.LEN.unpack_from(buf)
            if n > C.MAX_STATUS_FRAME:
                self._kill(child, signal.SIGKILL)  # a child speaking garbage is ended
                return False
            if len(buf) < C.LEN.size + n:
                break
            body = bytes(buf[C.LEN.size:C.LEN.size + n])
            del buf[:C.LEN.size + n]
            try:
                m = C.status_decoder.decode(body)
            except (msgspec.DecodeError, msgspec.ValidationError):
                self._kill(child, signal.SIGKILL)
                return False
            if isinstance(m, C.Started):
                self._cpu_start(child)  # (a leased child's counts from its lease: this is a no-op then)
                self._started(child, m)
            elif isinstance(m, C.ExitReport):
                if not child.direct:  # a payload that is PID 1 has no reaper to report for it
                    child.report = m
            elif isinstance(m, (C.Out, C.OutSkip, C.OutEnd)):
                if child.collector is not None and child.ready_seen:
                    child.collector.feed(m)
            elif child.first is None:
                child.first = m
                if isinstance(m, C.Ready):
                    child.ready_seen = True
                child.first_event.set()
        return True

    def _exit_status(self, child: Child, wstatus: int, ru) -> ExitStatus:
        if os.WIFSIGNALED(wstatus):
            rc = -os.WTERMSIG(wstatus)
            if child.direct and rc == -signal.SIGKILL and child.emulated:
                rc = -child.emulated  # a default-action signal, delivered as SIGKILL (Daemon._signal)
        elif child.direct:
            rc = os.WEXITSTATUS(wstatus)
            if rc == 128 + signal.SIGINT and child.sigint_delivered:
                rc = -signal.SIGINT  # Python's KeyboardInterrupt exit as PID 1 (it cannot kill itself)
        else:
            rc = os.WEXITSTATUS(wstatus)
            if rc == 0 and child.report is not None:
                try:
                    rc = os.waitstatus_to_exitcode(child.report.wait_status)
                except ValueError:
                    rc = 1
        enforcement = {"timeout": "daemon"} if child.timeout else {}
        cpu_exceeded = False
        if child.cpu_time is not None:
            # the daemon, from the child's cgroup (_cpu_guard); RLIMIT_CPU per process is the backstop
            enforcement["cpu_time"] = (f"cgroup-v{self.cgroups.version}" if child.cgroup is not None
                                       and self.cgroups is not None else "rlimit")
            used = ru.ru_utime + ru.ru_stime
            # The daemon's own kill (child.cpu_exceeded), or the RLIMIT_CPU backstop: SIGXCPU at the
            # soft limit, SIGKILL at the hard one (setrlimit(2)), either only with that much CPU
            # used (a payload may raise SIGXCPU itself; the OOM killer's or a client's SIGKILL
            # near the budget is theirs). 0.95: the usage read at the reap, not the kernel's tick.
            soft, hard = rlimits.cpu_seconds(child.cpu_time)
            cpu_exceeded = child.cpu_exceeded or (rc == -signal.SIGXCPU and used >= soft * 0.95) or (
                rc == -signal.SIGKILL and not child.timed_out and used >= hard * 0.95)
        if child.output_exceeded:
            enforcement["max_output_bytes"] = "daemon"
        return ExitStatus(
            returncode=rc, timed_out=child.timed_out, output_exceeded=child.output_exceeded,
            cpu_time_exceeded=cpu_exceeded, pool_reloaded=child.reloaded, wall_time=time.monotonic() - child.started,
            cpu_user=ru.ru_utime, cpu_system=ru.ru_stime, enforcement=enforcement,
        )


async def _exits_within(child: Child, seconds: float) -> bool:
    """Whether ``child`` exits within ``seconds`` (waiting no longer)."""
    with trio.move_on_after(seconds):
        await child.exited.wait()
        return True
    return False


def _backoff(n: int) -> float:
    """Seconds to wait after ``n`` failures in a row (a reserve's fills, its children's deaths):
    0.25 s doubling, at most 30."""
    return min(30.0, 0.25 * 2 ** min(n, 7))


def _cgroup_asks(cfg: SandboxConfig) -> list[str]:
    """The fields of ``cfg`` that need the child to have a cgroup of its own."""
    return [k for k in ("memory", "pids", "cpu", "cpu_time") if getattr(cfg, k) is not None]


def _cpu_read(host, items: list) -> tuple[float | None, list]:
    """In a worker thread, for Daemon._cpu_guard: the ``zygote`` tree's CPU usage (None if it
    cannot be read: then every child is read), and for each (cgroup, budget, used, tree usage at
    that reading) the child's usage now; None where the tree grew less since its last reading
    than its budget left (it cannot have reached it), the exception where the read failed."""
    try:
        base = host.cpu_usage()
    except (OSError, KeyError, ValueError):
        base = None
    out: list = []
    for cg, budget, used, at in items:
        if base is not None and at is not None and base - at < budget - used:
            out.append(None)
            continue
        try:
            out.append(cg.cpu_usage())
        except (OSError, KeyError, ValueError) as e:
            out.append(e)
    return base, out


def _signal_state(pid: int, signum: int) -> tuple[bool, bool]:
    """(whether process ``pid`` catches, ignores or blocks ``signum`` — caught, ignored, or blocked
    (sigwait/signalfd, or deferred on purpose): it goes as itself; whether it is alive)."""
    state = _sys.signal_state(pid)
    if state is None:
        return False, False  # gone: nothing to deliver to anyway
    return bool(state[0] & 1 << (signum - 1)), state[1]


def _in_sigtimedwait(pid: int) -> bool:
    """Whether process ``pid`` waits in rt_sigtimedwait: sigwait() unblocks what it waits for
    while it waits (the kernel keeps the old mask as real_blocked, which it honours but /proc
    does not show), so such a payload gets the signal as itself. Unreadable (no ptrace access):
    no. The read waits for the process's exec lock: run it in a worker thread."""
    try:
        with open(f"/proc/{pid}/syscall", "rb") as f:
            return f.read().split(b" ", 1)[0] == _NR_RT_SIGTIMEDWAIT
    except OSError:
        return False


# The shipped profiles that refuse unshare/clone/clone3 with CLONE_NEWUSER themselves
# (tests/test_layers_seccomp.py): for their children the nested user namespace limit is a
# second wall, skipped where /proc/sys is read-only (containers), as before it existed.
_NO_NEW_USERNS_PROFILES = frozenset({"default", "strict"})


def _bytes_in_pipe(fd: int) -> int:
    """FIONREAD: what a pipe holds unread (in a worker thread: it takes the pipe's lock)."""
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return buf[0]


async def child_first_status(child: Child):
    await child.first_event.wait()
    return child.first


def _needs_reaper(cfg: SandboxConfig, kind: str) -> bool:
    """Whether the child gets a PID-1 reaper in front of its payload (ChildPlan.reaper): when
    asked (SandboxConfig.reaper), for an export (PID 1 packs it after the payload ended), and for
    an exec'd program: shells and the like expect an init that reaps the orphans they leave and
    lets them die of their own signals (``kill -SEGV $$``), which a pid namespace's PID 1 cannot."""
    return cfg.reaper or cfg.export is not None or kind == "exec"


_NR_RT_SIGTIMEDWAIT = {"x86_64": b"128", "aarch64": b"137"}.get(platform.machine(), b"-")
# Default dispositions (signal(7)): ignored by default, or stopping the process.
_DEFAULT_IGNORED = frozenset({signal.SIGCHLD, signal.SIGURG, signal.SIGWINCH, signal.SIGCONT})
_DEFAULT_STOPS = frozenset({signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})


class _HeldArchives:
    """Export archives sent to clients, counted per peer uid until the kernel frees them.

    Once sent, an archive (a sealed memfd on the daemon's memory) lives for as long as any fd or
    mapping of it does, in the client or wherever it passed it. An inotify watch on each
    archive's inode reports IN_IGNORED when the inode goes, which is when its pages are freed
    (a memfd reports no close events; the watch does not keep the inode; its mask, IN_MOVE_SELF,
    never fires for a memfd, so that is the only event). Each archive counts from its first send
    (waiting ones included) to then; past ``cap`` bytes or ``count`` archives for its uid, a new
    one is refused (one always passes). The watch is added through our own fd of it, before the
    send. Events lost to a full queue (IN_Q_OVERFLOW) are made up for from the watches the kernel
    still lists (/proc/self/fdinfo). Not counted: pages a client spliced into pipes of its own
    before letting the archive go (bounded by its pipe budget and its open files).
    """

    _IN_MOVE_SELF = 0x800
    _IN_Q_OVERFLOW = 0x4000
    _IN_IGNORED = 0x8000
    _EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name: none here)

    def __init__(self, cap: int, count: int = HELD_ARCHIVES_PER_UID) -> None:
        self.cap, self.count = cap, count
        self.fd = -1
        self.by_uid: dict[int, list[int]] = {}  # uid -> [bytes, archives]
        self._watches: dict[int, tuple[int, int]] = {}  # wd -> (uid, bytes counted)

    def admit(self, fds: list[int], uid: int, size: int) -> str | None:
        """Count the archive among ``fds`` (our memfd) against ``uid`` before it is sent; None, or
        why it may not be sent (the export is refused then)."""
        if self.fd < 0:
            return "the daemon cannot follow export archives (no inotify instance: fs.inotify.max_user_instances)"
        cost = size + 8192  # (its last page, and the watch)
        wd = _sys.libc.inotify_add_watch(self.fd, f"/proc/self/fd/{fds[-1]}".encode(), self._IN_MOVE_SELF)
        if wd < 0:
            err = ctypes.get_errno()
            return (f"the daemon cannot follow this export archive ({os.strerror(err)}; "
                    "fs.inotify.max_user_watches)")
        if wd in self._watches:
            return None  # (sent to another of its watchers already: counted once)
        held, n = self.by_uid.get(uid, (0, 0))
        if n and (held + cost > self.cap or n >= self.count):
            _sys.libc.inotify_rm_watch(self.fd, wd)  # (its IN_IGNORED finds no entry)
            return (f"uid {uid} holds {n} export archives ({held >> 20} MiB) not released yet (the daemon "
                    f"keeps at most {self.count} and {self.cap >> 20} MiB per user): export them and call "
                    "close_export(), or let their children go")
        self._watches[wd] = (uid, cost)
        self.by_uid[uid] = [held + cost, n + 1]
        return None

    def _release(self, wd: int) -> None:
        held = self._watches.pop(wd, None)
        if held is not None:
            uid, cost = held
            counts = self.by_uid.get(uid)
            if counts is not None:
                counts[0] -= cost
                counts[1] -= 1
                if counts[1] <= 0:
                    del self.by_uid[uid]

    def _resync(self) -> None:
        """After lost events: every watch the kernel no longer lists was released."""
        try:
            with open(f"/proc/self/fdinfo/{self.fd}") as f:
                live = {int(line.split("wd:", 1)[1].split()[0], 16) for line in f if line.startswith("inotify wd:")}
        except (OSError, ValueError, IndexError):
            return  # (the next overflow tries again)
        for wd in [wd for wd in self._watches if wd not in live]:
            self._release(wd)

    RETRY = 5.0  # seconds between tries for an inotify instance (admit refuses meanwhile, saying why)

    async def follow(self) -> None:
        """Read the watches' events for the daemon's life (a task of its nursery)."""
        while (fd := _sys.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)) < 0:
            await trio.sleep(self.RETRY)  # (fs.inotify.max_user_instances: another process may let one go)
        self.fd = fd
        try:
            while True:
                await trio.lowlevel.wait_readable(fd)
                try:
                    data = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                at = 0
                while at + self._EVENT.size <= len(data):
                    wd, mask, _cookie, length = self._EVENT.unpack_from(data, at)
                    at += self._EVENT.size + length
                    if mask & self._IN_Q_OVERFLOW:
                        self._resync()
                    elif mask & self._IN_IGNORED:
                        self._release(wd)
        finally:
            self.fd = -1
            os.close(fd)


def _archive_bytes(fds: list[int]) -> int:
    """The size of an export's archive: its memfd (our own: fstat asks no other filesystem)."""
    size = 0
    for fd in fds:
        try:
            size += os.fstat(fd).st_size
        except OSError:
            pass
    return size


def _kept_bytes(k: "_Kept") -> int:
    rings = k.child.rings or ()
    return len(k.exited.result or b"") + sum(r.end - r.start for r in rings) + _archive_bytes(k.fds)


_NSMAKER_NAME = _NSMAKER_BYTES.decode()


def _stray_zombies(known: set[int]) -> list[int]:
    """Zombie children of this process, in a pid namespace of their own, not in ``known``; and
    those named as a zygote's namespace maker (zygote/_nsmaker.py: it ends with its zygote, and
    comes to us when we are its new parent, a subreaper or a container's PID 1)."""
    out = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:  # out of fds: the caller tries again later
        return out
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            continue
        for pid in pids:
            if pid in known:
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    comm, _, rest = f.read().partition(" (")[2].rpartition(")")
                    state = rest.split()[0]
                with open(f"/proc/{pid}/status") as f:
                    nspid = next((line.split()[1:] for line in f if line.startswith("NSpid:")), [])
            except (OSError, StopIteration):
                continue
            if state == "Z" and (len(nspid) > 1 or comm == _NSMAKER_NAME):
                out.append(pid)
    return out


async def _wait_pidfd(pidfd: int) -> None:
    await trio.lowlevel.wait_readable(pidfd)


class _Refused(Exception):
    def __init__(self, code: str, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.path = path


def _landlock_paths(fs: dict, cfg: SandboxConfig) -> tuple[list[str], list[str]]:
    """Landlock rules matching the mount plan: read where bound read-only, write only under rw
    binds, /tmp and the few device files; nothing else (so even a relaxed mount layer leaks nothing)."""
    if fs.get("root") == "chroot":
        ro = ["/"]
    else:
        ro = sorted({b.target for b in fs.get("binds", []) if b.readonly} | {"/etc", "/dev", "/proc"})
    rw = ["/tmp", "/dev/shm", "/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"]
    rw += [b.target for b in fs.get("binds", []) if not b.readonly]
    rw += [t.target for t in fs.get("tmpfs", [])]
    if cfg.dev_pts:
        rw += ["/dev/pts", "/dev/ptmx"]
    return ro, sorted(set(rw))


class _NoIdSlot(OSError):
    """No host id range is free for another child (userns.IdSlots)."""


def _clone_hint(err: int | None) -> str:
    if err in (_errno.EPERM, _errno.ENOSPC, _errno.EUSERS):
        return ("user namespaces are restricted here: check sysctl user.max_user_namespaces, "
                "kernel.unprivileged_userns_clone=1, kernel.apparmor_restrict_unprivileged_userns=0; "
                "in Docker use --security-opt seccomp=docker/seccomp-zygote.json")
    if err == _errno.EINVAL:
        return "the kernel lacks one of the namespace kinds (user, pid, mount, ipc, uts, net, cgroup)"
    if err == _errno.EAGAIN:
        return ("the zygotes and their children hold all the tasks the daemon allows them together "
                "(daemon.max_tasks), or the host is out of pids: retry once some end")
    return ""


def _relay_target(fd: int) -> int:
    """For a client's stdout/stderr that the daemon will relay counted output into: a
    nonblocking write end of our own on the same pipe. Raises ValueError (or OSError).

    Only the write end of an anonymous pipe. Whatever the daemon writes, root writes, and the
    kernel checks some writes when they happen, not at open: a unix-socket receiver with
    SO_PASSCRED would see the daemon's pid and uid 0 (systemd's notify socket takes MAINPID=
    from it), /proc files such as autogroup or oom_score_adj check the writer's capabilities,
    a setuid file written by root keeps its bit, quotas and reserved blocks do not apply. A
    pipe has none of that. Neither policy.is_pipe nor F_GETFL reaches a filesystem. The reopening
    through /proc is a description of our own that we may make nonblocking (the client's flags
    are not ours to change) and grants nothing: the same pipe, write only, as the client's was.
    """
    if fcntl.fcntl(fd, fcntl.F_GETFL) & (os.O_ACCMODE | os.O_PATH) not in (os.O_WRONLY, os.O_RDWR):
        raise ValueError("the fd given for output is not open for writing")
    if not policy.is_pipe(fd):
        raise ValueError("the fd given for output is not a pipe; the daemon writes counted output "
                         "only into pipes (zygote run puts one in front of a terminal, file or socket)")
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == _errno.ENXIO:
            raise ValueError("the pipe given for output has no reader") from None
        raise


class _BindRefused(OSError):
    """A bind that the daemon could not make safely (Daemon._idmapped, _own_id_for_pool_rw): the
    spawn fails with this message, step ``step`` (none for code "policy")."""

    def __init__(self, err: int, message: str, hint: str = "", code: str = "unavailable",
                 step: str = "mounts") -> None:
        super().__init__(err, message)
        self.message, self.hint, self.code, self.step = message, hint, code, step


_HINT_IDMAP = ("bind it read-only, or put it on a file system with idmapped mounts (ext4, xfs, btrfs; tmpfs "
               "from Linux 6.3): a non-root client's read-write binds are idmapped, so that what the "
               "child makes there is the client's")


def _paths_too_slow(req: int) -> P.SpawnFailed:
    return P.SpawnFailed(req, f"checking the request's host paths or workspace took over {PATHS_TIMEOUT:g} s "
                         "(a filesystem that does not answer?)", code="unavailable")


def _peer_gone(fd: int) -> bool:
    """Whether the peer of connected socket ``fd`` has closed (or shut down its writing), by
    poll's POLLRDHUP: nothing is read, so data waiting before the EOF stays where it is."""
    p = select.poll()
    p.register(fd, select.POLLRDHUP)
    return any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, ev in p.poll(0))


def _fds_from(anc) -> list[int]:
    fds: list[int] = []
    for level, typ, data in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - (len(data) % a.itemsize)])
            fds.extend(a)
    return fds

