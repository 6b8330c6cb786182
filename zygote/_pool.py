"""Pools of zygote processes, from the daemon's side (trio).

A Zygote is one exec'd interpreter (zygote/_zygote.py) behind a SOCK_SEQPACKET socket. The daemon
asks it to clone; the reply is the child's pid (the child is the daemon's own, by CLONE_PARENT).
A zygote that dies is restarted by its pool; requests in flight fail with a retriable error.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import msgspec
import trio

from zygote_client import SandboxConfig

from ._childproto import MAX_TREES
from .layers import SetupError
from ._zygote import JOIN_FAILED, NFDS, REP, REQ, code_digest, package_dirs

THREAD_CAPS = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "NUMEXPR_NUM_THREADS": "1", "VECLIB_MAXIMUM_THREADS": "1"}
CLONE_REPLY_TIMEOUT = 30.0  # seconds a zygote may take to answer one clone request
STOP_CLONE_WAIT = 2.0  # seconds a stopping zygote waits for a clone in flight to be answered
STUCK_ZYGOTE_WAIT = 5.0  # seconds a dead zygote may take to go before its replacement starts anyway
QUICK_DEATH = 5.0  # a zygote that dies within this many seconds of being ready counts as a failed start
RESTART_DELAY_MAX = 16.0  # seconds, at most, between attempts to start a zygote that keeps failing
RESTART_FAILURES_MAX = 8  # _watch's count of failures in a row stops here (its delay is at RESTART_DELAY_MAX)


def _restart_delay(failures: int) -> float:
    return 0.0 if failures < 2 else min(RESTART_DELAY_MAX, 2.0 ** (failures - 2))

DEFAULT_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp"}


@dataclass(frozen=True)
class PoolConfig:
    """One named pool.

    Attributes:
        name: the pool's name in requests ("default").
        python: the interpreter the zygote runs (must have the ``zygote`` package importable).
        preload: modules imported once in the zygote; every child has them in sys.modules.
        env: the exact environment of children (and of the zygote, plus thread caps).
        child_main: "module:function" run when a request names no target.
        allow_callables: whether clients may send code to run. False: the pool runs only its
            own code, its ``child_main`` and the targets in ``allowed_targets``, and the child
            decodes their arguments as plain data (no pickled objects: those can call anything);
            requests for callables, scripts, programs (exec) or other targets are refused.
        allowed_targets: "module:function" targets clients may name when allow_callables is
            False (with allow_callables, any target runs).
        zygotes: zygote processes in this pool.
        reserve: children kept cloned and confined with ``sandbox`` ahead of requests; a request
            with exactly that config takes one and skips clone and confinement (0: none).
        reserve_network: children kept confined the same way but with the network ``sandbox``
            allows (its veth, address and egress rules made ahead): a request asking for exactly
            the pool's network takes one (0: none; needs ``sandbox.network``).
        sandbox: the pool's default SandboxConfig.
        forbid_secret_env: refuse requests whose environment has a secret-looking name
            (policy.SECRET_ENV: *_TOKEN, *SECRET*, *PASSWORD*, AWS_*, *_API_KEY, ...).
        env_allow: names accepted despite forbid_secret_env.
    """

    name: str = "default"
    python: str = sys.executable
    preload: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ENV))
    child_main: str | None = None
    allow_callables: bool = True
    allowed_targets: tuple[str, ...] = ()
    zygotes: int = 1
    reserve: int = 0
    reserve_network: int = 0
    sandbox: SandboxConfig = SandboxConfig()
    forbid_secret_env: bool = False
    env_allow: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # The sandbox's unset fields are the built-in defaults: requests inherit them as the pool's.
        object.__setattr__(self, "sandbox", self.sandbox.with_defaults())


class Reserve:
    """A pool's children confined ahead of requests with one SandboxConfig (the daemon fills it)."""

    def __init__(self, size: int, *, network: bool) -> None:
        self.size = size
        self.network = network  # built with the pool's network ceiling, as a networked request asks
        self.built: SandboxConfig | None = None  # its children's effective config (set by the daemon)
        self.children: list = []  # confined, waiting for a request (daemon.Child)
        self.losses = 0  # waiting children that died one soon after another (daemon._reserve_lost) ...
        self.lost_at = 0.0  # ... and time.monotonic() of the last: refills slow down after a few
        self.wake = trio.Event()
        self.last_take = 0.0  # time.monotonic() of the last request that took one ...
        self.gap = float("inf")  # ... and the seconds between it and the one before
        self.wants_room = False  # the filler waits for the daemon to have room (a child's exit wakes it)

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or less: until a take, a fill done, or a discard wakes the filler."""
        self.wake = trio.Event()
        with trio.move_on_after(seconds):
            await self.wake.wait()

    def take(self):
        """The oldest waiting child (the caller checks it is alive); wakes the filler."""
        now = time.monotonic()
        self.gap, self.last_take = now - self.last_take, now
        self.wake.set()
        return self.children.pop(0)


class NetnsJoinFailed(OSError):
    """The zygote could not enter the network namespace it was given (nothing was cloned)."""


class ZygoteDied(Exception):
    """The zygote died or broke protocol while a request was in flight (retriable)."""


class PoolStartError(Exception):
    """A zygote could not start (preload failed, bad interpreter); the message says why."""


# The soft RLIMIT_NOFILE the daemon was started with, once raise_open_files() raised its own:
# zygotes put it back, so children get what they would have had without the daemon's headroom.
_CHILD_NOFILE: int | None = None


def raise_open_files(ceiling: int = 1 << 16) -> None:
    """Raise the daemon's soft open-files limit toward its hard one (at most ``ceiling``).

    The daemon holds about seven fds per child (its pipe ends, pidfd, cgroup fd) plus one per
    connection; under a service manager's usual soft limit of 1024 it would run out near 150
    children, below ``max_children``."""
    global _CHILD_NOFILE
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        return
    if _CHILD_NOFILE is None:
        _CHILD_NOFILE = soft


class Zygote:
    def __init__(self, pool: PoolConfig, index: int,
                 place: Callable[[int], Awaitable[None]] | None = None) -> None:
        self.pool = pool
        self.index = index
        self._place = place  # moves the new process into the zygotes' cgroup (Daemon._place_zygote)
        self.proc: subprocess.Popen | None = None
        self.sock: trio.socket.SocketType | None = None
        self.info: dict = {}
        self._lock = trio.Lock()
        self._req = itertools.count(1)
        self.dead = trio.Event()
        self.ready_at = 0.0  # time.monotonic() when it reported ready
        self.why = ""  # why the daemon took it for dead while it ran (clone), for the log

    async def start(self, timeout: float = 300.0) -> None:
        try:
            parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        except OSError as e:  # out of fds: a restart is tried again later
            raise PoolStartError(f"zygote of pool {self.pool.name!r}: socketpair: {e.strerror}") from None
        env = dict(self.pool.env)
        for k, v in THREAD_CAPS.items():
            env.setdefault(k, v)
        # The zygote drops the caps it does not share with the pool's environment once its
        # preloads ran: it then holds exactly what children get, and they need not change it.
        env["ZYGOTE_UNSET_AFTER_PRELOAD"] = ",".join(k for k in THREAD_CAPS if k not in self.pool.env)
        if _CHILD_NOFILE is not None:
            env["ZYGOTE_OPEN_FILES"] = str(_CHILD_NOFILE)
        try:
            # Popen from the trio thread itself (not a worker thread): children created by
            # CLONE_PARENT get this thread as their real parent, and PDEATHSIG follows it.
            self.proc = subprocess.Popen(
                [self.pool.python, "-P", "-m", "zygote._zygote", str(child.fileno()), *self.pool.preload],
                pass_fds=[child.fileno()], env=env, stdin=subprocess.DEVNULL, close_fds=True,
            )
        except OSError as e:
            parent.close()
            raise PoolStartError(f"cannot start interpreter {self.pool.python!r}: {e.strerror}") from None
        finally:
            child.close()
        self.sock = trio.socket.from_stdlib_socket(parent)
        if self._place is not None:
            # Before it forks or clones anything (it waits for the b"P" below): every process
            # it makes is born in that cgroup, its namespace maker included.
            try:
                await self._place(self.proc.pid)
            except BaseException as e:
                with trio.CancelScope(shield=True):
                    await self.stop()
                if isinstance(e, SetupError):
                    raise PoolStartError(f"pool {self.pool.name!r}: {e.message}" + (f" ({e.hint})" if e.hint else "")) from None
                raise
        try:
            # Placed (or no cgroups): only now may it fork anything (its namespace maker, a
            # preload's helper), or that process would stay in the daemon's cgroup, unbounded.
            try:
                await self.sock.send(b"P")
            except OSError:
                pass  # it failed before this (its "E" still waits below) or died: the recv says
            with trio.fail_after(timeout):
                first = await self._first_message()
        except trio.TooSlowError:
            await self.stop()
            raise PoolStartError(f"zygote of pool {self.pool.name!r} did not become ready in {timeout}s") from None
        except BaseException:  # cancelled (the daemon stopping meanwhile): it must not outlive us
            with trio.CancelScope(shield=True):
                await self.stop()
            raise
        if first[:1] == b"R":
            try:
                info = msgspec.msgpack.decode(first[1:], type=dict)
            except msgspec.DecodeError:
                info = {}
            if info.get("code") != code_digest():
                await self.stop()
                ours, our_client = package_dirs()
                if (info.get("package"), info.get("client_package")) == (ours, our_client):
                    raise PoolStartError(
                        f"pool {self.pool.name!r}: the zygote packages in {ours} changed on disk since this daemon "
                        "started (an upgrade): restart the daemon")
                raise PoolStartError(
                    f"pool {self.pool.name!r}: its interpreter {self.pool.python} imports another version of the "
                    f"zygote packages ({info.get('package') or 'an older one, which does not say where from'}, "
                    f"{info.get('client_package') or '?'}) "
                    f"than this daemon's ({ours}, {our_client}): install the daemon's version of zygote and zygote-client into "
                    "that interpreter's environment, or point the pool's python at one that has them")
            self.info = info
            self.ready_at = time.monotonic()
            return
        await self.stop()
        text = first[1:].decode(errors="replace") if first else "the zygote exited during startup"
        raise PoolStartError(f"pool {self.pool.name!r}: {text}")

    async def _first_message(self) -> bytes:
        """The zygote's b"R"/b"E", or b"" if it ended without one. A zygote that ends with our
        b"P" unread in its socket (it failed before its recv, or was killed) leaves ECONNRESET
        on ours, reported by the next recv even ahead of an "E" it sent: the error is taken
        once and the recv repeated (the "E", then EOF). Any other error: it is gone."""
        assert self.sock is not None
        for _ in range(2):
            try:
                return await self.sock.recv(1 << 20)
            except ConnectionResetError:
                continue
            except OSError:
                break
        return b""

    async def clone(self, fds: list[int], flags: int, owner: int = 0) -> int:
        """Clone one child holding ``fds`` whose user namespace ``owner`` owns (0: the zygote's
        uid); returns its pid. Raises ZygoteDied or OSError."""
        async with self._lock:
            sock = self.sock  # (stop() may set it to None meanwhile: see there)
            if sock is None or self.dead.is_set():
                raise ZygoteDied("zygote is not running")
            req = next(self._req)
            # Shielded: once the request is sent the zygote clones, so the reply must be read even
            # if the requester goes away (a cancelled read would leave the child untracked and the
            # next request reading this reply: "out of order", a needless zygote restart). The
            # time limit only guards against a zygote that stopped answering.
            rep = b""
            with trio.CancelScope(shield=True):
                with trio.move_on_after(CLONE_REPLY_TIMEOUT) as scope:
                    try:
                        await sock.sendmsg([REQ.pack(req, flags, owner)],
                                           [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fd_array(fds))])
                        rep = await sock.recv(64)
                    except (OSError, trio.ClosedResourceError) as e:
                        self.why = self.why or f"its connection failed: {e}"
                        self.dead.set()
                        raise ZygoteDied(f"zygote connection failed: {e}") from None
            if len(rep) != REP.size:
                self.why = self.why or (f"it did not answer a clone in {CLONE_REPLY_TIMEOUT:g} s: the daemon killed it"
                                        if not rep and scope.cancelled_caught else "it ended while cloning")
                self.dead.set()
                if self.proc is not None and self.proc.poll() is None:
                    self.proc.send_signal(signal.SIGKILL)  # silent for CLONE_REPLY_TIMEOUT: replace it
                raise ZygoteDied("zygote died (or stopped answering) while cloning")
            rreq, pid, err = REP.unpack(rep)
            if rreq != req:
                self.why = self.why or "it answered out of order"
                self.dead.set()
                raise ZygoteDied("zygote answered out of order")
            if pid == JOIN_FAILED:
                raise NetnsJoinFailed(err, f"entering the prepared network namespace: {os.strerror(err)}")
            if pid <= 0:
                raise OSError(err, f"clone failed: {os.strerror(err)}")
            return pid

    def ended(self) -> str:
        """How its process ended, for the log ("exited with status 4", "killed by SIGKILL")."""
        rc = self.proc.returncode if self.proc is not None else None
        if rc is None:
            how = "killed, and still held in the kernel"
        elif rc < 0:
            try:
                how = f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                how = f"killed by signal {-rc}"
        else:
            how = f"exited with status {rc}"
        return f"{how} ({self.why})" if self.why else how

    async def stop(self) -> None:
        self.dead.set()  # no clone starts from here
        # A clone already sent gets its reply first (bounded): closed under it, the child it
        # made went untracked and its request failed "internal" (a reload under load).
        with trio.CancelScope(shield=True), trio.move_on_after(STOP_CLONE_WAIT):
            async with self._lock:
                pass
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            await _wait_proc(self.proc)


async def _wait_proc(proc: subprocess.Popen) -> None:
    try:
        fd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        proc.wait()
        return
    except OSError:  # out of fds: poll instead
        while proc.poll() is None:
            await trio.sleep(0.02)
        return
    try:
        while proc.poll() is None:
            await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


def _fd_array(fds: list[int]) -> bytes:
    import array
    # + idmapped trees (TREES_SHIFT), + the cgroup fd for CLONE_INTO_CGROUP, + a prepared network
    # namespace (GIVEN_NETNS)
    assert NFDS <= len(fds) <= NFDS + MAX_TREES + 2
    return array.array("i", fds).tobytes()


class Pool:
    """Runs ``config.zygotes`` zygotes and restarts any that dies."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.zygotes: list[Zygote] = []
        self._rr = itertools.count()
        self.restarts = 0
        self.stuck = 0  # zygotes killed but held in the kernel, replaced already (see _watch)
        self._changed = trio.Condition()
        self.stopping = False
        self.retired_at: float | None = None  # (time.monotonic()) when a reload replaced or removed it
        self.reserve = Reserve(config.reserve, network=False)  # the default SandboxConfig's (leases too)
        self.reserves = (self.reserve, Reserve(config.reserve_network, network=True))
        # Called after a zygote died: a clone it made but never reported is the daemon's
        # (CLONE_PARENT) child that nobody tracks; the daemon reaps such strays.
        self.on_zygote_death = None
        self.place_zygote: Callable[[int], Awaitable[None]] | None = None  # (Zygote's place)
        self.log = None  # the daemon's logger (structlog's), for zygote deaths and failed restarts

    async def start(self) -> None:
        for i in range(self.config.zygotes):
            z = Zygote(self.config, i, self.place_zygote)
            await z.start()
            self.zygotes.append(z)

    async def supervise(self) -> None:
        """Restart dead zygotes forever (run in the daemon's nursery)."""
        async with trio.open_nursery() as n:
            for i in range(len(self.zygotes)):
                n.start_soon(self._watch, i, n)

    async def _watch(self, i: int, nursery: trio.Nursery) -> None:
        """Restart zygote ``i`` whenever it dies, saying so in the log. One that cannot start,
        or dies within QUICK_DEATH of being ready more than once in a row, is tried again after
        a delay that doubles up to RESTART_DELAY_MAX (a broken preload, a wrong zygote version
        in the pool's interpreter: each attempt costs the preloads' CPU, and before the log
        said nothing, the pool answered "restarting" for ever)."""
        failures = 0
        said = ""  # the last failed start's message, logged whole once (a preload's traceback)
        while True:
            z = self.zygotes[i]
            async with trio.open_nursery() as n:
                n.start_soon(self._wait_exit, z, n.cancel_scope)
                await z.dead.wait()
                n.cancel_scope.cancel()
            with trio.move_on_after(STUCK_ZYGOTE_WAIT):
                await z.stop()
            quick = time.monotonic() - z.ready_at < QUICK_DEATH
            failures = min(failures + 1, RESTART_FAILURES_MAX) if quick else 0  # (capped: 2.0 ** 1024 overflows)
            if not self.stopping:
                self._say("warning", "zygote died", zygote=i, pid=z.proc.pid if z.proc else None, how=z.ended(),
                          quick=quick, retry_in=_restart_delay(failures))
            if z.proc is not None and z.proc.poll() is None:
                # SIGKILLed and still there: held in the kernel (its exit closes a file whose
                # file system stopped answering: a FUSE server's FLUSH, an NFS server). Its
                # replacement starts now (the pool served nobody until it went); it is reaped
                # whenever it goes.
                self.stuck += 1
                nursery.start_soon(self._reap_stuck, z)
            if self.on_zygote_death is not None:
                self.on_zygote_death()
            while not self.stopping:
                if failures > 1:
                    await trio.sleep(_restart_delay(failures))
                    if self.stopping:
                        return
                nz = Zygote(self.config, i, self.place_zygote)
                try:
                    await nz.start()
                except PoolStartError as e:
                    failures = min(max(failures, 1) + 1, RESTART_FAILURES_MAX)
                    message, said = (str(e) if str(e) != said else "the same as the last attempt's"), str(e)
                    self._say("error", "zygote restart failed", zygote=i, message=message,
                              retry_in=_restart_delay(failures))
                    continue
                if self.stopping:  # stopped while it started: stop() did not see it
                    await nz.stop()
                    return
                said = ""
                break
            else:
                return
            self.restarts += 1
            self.zygotes[i] = nz
            async with self._changed:
                self._changed.notify_all()

    def _say(self, level: str, event: str, **fields) -> None:
        if self.log is not None:
            getattr(self.log, level)(event, pool=self.config.name, **fields)

    async def _reap_stuck(self, z: Zygote) -> None:
        assert z.proc is not None
        await _wait_proc(z.proc)
        self.stuck -= 1

    @staticmethod
    async def _wait_exit(z: Zygote, scope: trio.CancelScope) -> None:
        assert z.proc is not None
        await _wait_proc(z.proc)
        z.dead.set()

    def pick(self) -> Zygote:
        live = [z for z in self.zygotes if not z.dead.is_set()]
        if not live:
            raise ZygoteDied(f"no zygote of pool {self.config.name!r} is running (restarting)")
        return live[next(self._rr) % len(live)]

    async def stop(self) -> None:
        self.stopping = True
        for z in self.zygotes:
            await z.stop()
