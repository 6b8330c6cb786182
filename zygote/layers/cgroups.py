"""cgroups, daemon side: one cgroup per child under one ``zygote`` directory, v1 or v2.

The daemon is the only user. Everything here is synchronous file I/O on cgroupfs; the trio daemon
calls it from a worker thread. The child never touches its cgroup (it lives in a cgroup namespace).

Layout (``<base>`` = ``<mount>/<daemon's cgroup>/zygote/d<pid>``)::

    v2 (unified):  <base>/daemon                  the daemon itself, if it had to move
                   <base>/children                pids.max = daemon.max_tasks: all it starts
                   <base>/children/zygotes        the zygotes, and children without a cgroup
                   <base>/children/<child-id>     one per child with a cgroup of its own
    v1 (hybrid):   the same children/ tree (no daemon leaf: the daemon stays where it is) under
                   each of the memory, pids, cpu, cpuacct (and freezer, if mounted) hierarchies;
                   the zygotes' leaf is made in the pids hierarchy only

Verbs: ``detect()`` (prepare, once at daemon start) → ``CgroupHost.create()`` per request →
``ChildCgroup.attach()`` / ``fd()`` (outside, before "go") → ``cpu_usage()`` (while it runs, for
cpu_time) → ``stats()``, ``kill()``, ``remove()`` (cleanup, after reaping) → ``CgroupHost.close()`` at shutdown.

cgroup v1 and the attach stall: writing a pid to a v1 ``cgroup.procs`` takes
cgroup_threadgroup_rwsem for writing, which waits for an RCU grace period (≈15 ms on this machine
kind) whenever no other migration happened in the last ≈20 ms (kernels without ``favordynmods``).
Every attach therefore costs up to one grace period per request on a quiet host; ``prepare_pool``
pre-creates directories so at least the mkdirs and the limit files are off the request path, but
only attaching earlier (e.g. a warm, already-attached child) would remove the stall. On v2 use
``clone3(CLONE_INTO_CGROUP)`` with ``ChildCgroup.fd()``: the child is born in its cgroup, no
migration at all.
"""

from __future__ import annotations

import contextlib
import errno as E
import fcntl
import os
import signal
import time

from . import SetupError
from . import _sys

STEP = "cgroup"
CONTROLLERS = ("memory", "pids", "cpu")  # what every child gets, limited or not
V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")  # cpuacct: CPU time accounting on v1
CPU_PERIOD_US = 100_000
DAEMON_LEAF = "daemon"
WORK_DIR = "children"  # the bounded parent of everything the daemon starts (bound_children)
ZYGOTES_LEAF = "zygotes"  # in WORK_DIR: the zygotes, and every child born without a cgroup of its own
POOL_PREFIX = "zgpool-"
USER_HZ = os.sysconf("SC_CLK_TCK")
RESERVE_HEADROOM = 4 << 20  # bytes a reserve child keeps under a request's memory limit, at least

HINT_DELEGATE = (
    "run the daemon as root, or in a systemd unit with Delegate=yes; in Docker: --cgroupns=private "
    "and a writable /sys/fs/cgroup (e.g. --privileged, or CAP_SYS_ADMIN and remount it rw)"
)


def limits(memory: int | None, pids: int | None, cpu: float | None) -> dict[str, object]:
    """The limits a cgroup has after ``_limit(memory, pids, cpu)`` (``ChildCgroup.limits``)."""
    return {k: v for k, v in (("memory", memory), ("pids", pids), ("cpu", cpu)) if v is not None}


def _err(message: str, err: int = 0, hint: str = HINT_DELEGATE) -> SetupError:
    return SetupError(STEP, message, err, hint)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


_write = _sys.write_once  # one write(2) per value: cgroupfs parses each as one command


def _keyed(path: str) -> dict[str, int]:
    """Parse a flat keyed file ("key value" per line: memory.events, cpu.stat, pids.events)."""
    out = {}
    for line in _read(path).splitlines():
        k, _, v = line.partition(" ")
        try:
            out[k] = int(v)
        except ValueError:
            pass
    return out


def _procs(path: str) -> list[int]:
    try:
        return [int(p) for p in _read(os.path.join(path, "cgroup.procs")).split()]
    except FileNotFoundError:
        return []


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo (proc(5))
    if "\\" not in s:
        return s
    return s.encode().decode("unicode_escape").encode("latin-1").decode()


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(fstype, mount root, mount point, super options) of every cgroup/cgroup2 mount."""
    out = []
    for line in _read("/proc/self/mountinfo").splitlines():
        pre, _, post = line.partition(" - ")
        f = pre.split()
        fstype, _src, opts = (post.split() + ["", ""])[:3]
        if fstype in ("cgroup", "cgroup2"):
            out.append((fstype, _unescape(f[3]), _unescape(f[4]), set(opts.split(","))))
    return out


def _own_cgroups() -> dict[str, str]:
    """controller -> this process's cgroup path from /proc/self/cgroup; "" is the v2 entry."""
    out = {}
    for line in _read("/proc/self/cgroup").splitlines():
        _, ctrls, path = line.split(":", 2)
        for c in ctrls.split(",") if ctrls else [""]:
            out[c] = path
    return out


def _under(mount: str, root: str, path: str) -> str:
    """The directory of cgroup `path` in a mount of cgroup `root` (not "/" when a sub-cgroup is bind-mounted)."""
    if path.startswith("/.."):
        raise _err(f"this process's cgroup {path} is outside its cgroup namespace", E.ENOENT)
    if root != "/":
        if not (path == root or path.startswith(root.rstrip("/") + "/")):
            raise _err(f"this process's cgroup {path} is not below the mounted cgroup {root} at {mount}", E.ENOENT)
        path = path[len(root.rstrip("/")):]
    return os.path.join(mount, path.lstrip("/")).rstrip("/")


def _rmdir(path: str, timeout: float = 2.0) -> None:
    """rmdir a cgroup and any sub-cgroups, retrying EBUSY while the kernel lets go of exited tasks."""
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno not in (E.EBUSY, E.ENOTEMPTY):
                raise _err(f"rmdir {path}: {e.strerror}", e.errno) from None
            # a cgroup with children is EBUSY: remove them first (bottom-up)
            for sub in sorted((d.path for d in os.scandir(path) if d.is_dir(follow_symlinks=False)), reverse=True):
                _rmdir(sub, max(0.0, deadline - time.monotonic()))
            if time.monotonic() > deadline:
                raise _err(f"rmdir {path}: still busy after {timeout:.1f}s (tasks {_procs(path)} remain)",
                           e.errno, "a task in uninterruptible sleep can hold its cgroup; check `ps -o stat`") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.02)


class _Hier:
    """One hierarchy: the controllers it carries and the ``zygote`` base directory in it."""

    def __init__(self, controllers: frozenset[str], own: str, base: str) -> None:
        self.controllers = controllers
        self.own = own     # the daemon's own cgroup directory in this hierarchy
        self.base = base   # own/<name>
        self.work = os.path.join(base, WORK_DIR)  # the children's (and zygotes') parent
        self.lock_fd = -1


class CgroupHost:
    """The daemon's view of the host's cgroups. Built by ``detect()``; no public constructor."""

    def __init__(self, version: int, hiers: list[_Hier], *, moved_from: str | None = None) -> None:
        self.version = version
        self._hiers = hiers
        self._moved_from = moved_from   # v2: the cgroup the daemon was moved out of (to go back at close)
        self._children: dict[str, ChildCgroup] = {}
        self._zygotes: str | None = None  # the ZYGOTES_LEAF directory (pids hierarchy), once made
        self._pool: list[str] = []
        self._seq = 0
        self._closed = False
        by = {c: h for h in hiers for c in h.controllers}
        self._by = by
        first = hiers[0].base
        self.kill_method = ("cgroup.kill" if os.path.exists(os.path.join(first, "cgroup.kill")) else "freeze"
                            ) if version == 2 else ("freezer" if "freezer" in by else "signal")

    @property
    def base(self) -> str:
        """The ``zygote`` directory of the memory hierarchy (the only one on v2)."""
        return self._by["memory"].base

    def available(self) -> dict:
        """What this host enforces: version, controllers -> base directory, kill method, CLONE_INTO_CGROUP."""
        return {
            "version": self.version,
            "controllers": {c: h.base for c, h in sorted(self._by.items())},
            "kill": self.kill_method,
            "clone_into_cgroup": self.version == 2,
            "daemon_moved": self._moved_from is not None,
        }

    def cpu_usage(self) -> float:
        """CPU seconds used so far by everything under the ``zygote`` directory (every child, and
        on v2 the daemon itself if it had to move into it): v2 ``cpu.stat`` usage_usec, v1
        ``cpuacct.usage``. No child's usage can grow faster than this total (hierarchical
        accounting); the daemon's cpu_time guard uses it to know which children to look at.
        Raises OSError, KeyError or ValueError when the file cannot be read or parsed."""
        if self.version == 2:
            return _keyed(f"{self._by['cpu'].base}/cpu.stat")["usage_usec"] / 1e6
        return int(_read(f"{self._by['cpuacct'].base}/cpuacct.usage")) / 1e9

    # -- children ------------------------------------------------------------------------------

    def create(self, child_id: str, *, memory: int | None = None, pids: int | None = None,
               cpu: float | None = None) -> ChildCgroup:
        """Create the child's cgroup in every hierarchy and write its limits.

        The cgroup exists even without limits: it is how the daemon accounts for and kills the
        child's whole tree.

        Args:
            child_id: directory name, e.g. "a1b2c3-17" (no "/", not "daemon", not a pool name).
            memory: bytes; swap is 0 (v2 memory.swap.max=0, v1 memsw limit = memory limit).
            pids: max tasks (processes + threads) in the cgroup.
            cpu: CPUs' worth of time per period, e.g. 0.5 (CFS quota, period 100 ms).
        Raises:
            SetupError("cgroup", ...): the directory or a limit could not be written.
        """
        if (not child_id or "/" in child_id or child_id in (".", "..", DAEMON_LEAF, ZYGOTES_LEAF)
                or child_id.startswith(POOL_PREFIX)):
            raise ValueError(f"bad cgroup child id {child_id!r}")
        if child_id in self._children:
            raise ValueError(f"cgroup child {child_id!r} exists")
        if memory is not None and memory <= 0 or pids is not None and pids <= 0 or cpu is not None and cpu <= 0:
            raise ValueError("cgroup limits must be positive")
        pooled = self._pool.pop() if self._pool else None
        dirs: dict[str, str] = {}
        try:
            for h in self._hiers:
                d = os.path.join(h.work, child_id)
                if pooled:
                    # v1 only (cgroup1_rename; v2 refuses rename): a pre-made directory takes the child's name
                    os.rename(os.path.join(h.work, pooled), d)
                else:
                    os.mkdir(d)
                for c in h.controllers:
                    dirs[c] = d
        except OSError as e:
            for d in set(dirs.values()):
                _rmdir(d)
            raise _err(f"mkdir {e.filename}: {e.strerror}", e.errno) from None
        cg = ChildCgroup(self, child_id, dirs)
        self._children[child_id] = cg
        try:
            cg._limit(memory, pids, cpu)
        except BaseException:
            cg.remove()
            raise
        return cg

    def bound_children(self, max_tasks: int) -> str:
        """Bound everything the daemon starts to ``max_tasks`` tasks together (``pids.max`` of
        ``<base>/children``), and make the cgroup zygotes run in (``place_zygote``) below it.
        Called again (reload), it rewrites the bound.

        Clones start in their zygote's cgroup, and a child without a cgroup of its own stays
        there; a child with one is born in it (v2) or moved into it (v1), beside the zygotes'
        leaf. RLIMIT_NPROC bounds each child (rlimits.DEFAULT_PROCESSES), and a child's own
        ``pids`` limit bounds it alone, not their sum: a client's 256 children could hold 262144
        tasks, past the host's pid_max. Under one parent they count together, zygotes included,
        below the host's bound; the daemon's own threads do not count (v2: its leaf is beside
        the parent, so children cannot starve it). v1: only the pids hierarchy's leaf is made
        (the others keep the zygotes where they were). Returns the leaf's directory.

        Raises:
            SetupError("cgroup", ...): a directory or the bound could not be written.
        """
        if max_tasks < 1:
            raise ValueError("max_tasks must be >= 1")
        work = self._by["pids"].work
        d = os.path.join(work, ZYGOTES_LEAF)
        try:
            try:
                os.mkdir(d)
            except FileExistsError:
                pass
            _write(os.path.join(work, "pids.max"), str(max_tasks))
        except OSError as e:
            raise _err(f"the children's cgroup {work}: {e.strerror}", e.errno or 0,
                       "daemon.max_tasks is out of the kernel's range" if e.errno == E.EINVAL else HINT_DELEGATE) from None
        self._zygotes = d
        return d

    def place_zygote(self, pid: int) -> None:
        """Move a zygote just started (before it clones anything) into the zygotes' cgroup.

        Raises:
            SetupError("cgroup", ...): it could not be moved (its children would then count
            against no common bound: the caller stops it).
        """
        if self._zygotes is None:
            raise _err("the zygotes' cgroup was not made", E.ENOENT)
        try:
            _write(os.path.join(self._zygotes, "cgroup.procs"), str(pid))
        except OSError as e:
            raise _err(f"moving zygote {pid} into {self._zygotes}: {e.strerror}", e.errno or 0) from None

    def prepare_pool(self, n: int) -> None:
        """Pre-create up to `n` empty child directories (v1 only: v2 cannot rename a cgroup).

        ``create`` renames one instead of calling mkdir in every hierarchy. On v2 this does nothing;
        there, clone3(CLONE_INTO_CGROUP) already keeps migration off the request path.
        """
        if self.version != 1:
            return
        while len(self._pool) < n:
            self._seq += 1
            name = f"{POOL_PREFIX}{self._seq}"
            made = []
            try:
                for h in self._hiers:
                    os.mkdir(os.path.join(h.work, name))
                    made.append(os.path.join(h.work, name))
            except OSError as e:
                for d in made:
                    _rmdir(d)
                raise _err(f"mkdir {e.filename}: {e.strerror}", e.errno) from None
            self._pool.append(name)

    def cleanup_stale(self) -> list[str]:
        """Kill and remove child cgroups a crashed predecessor left behind; return their names.

        Only directories under our own ``zygote`` base are touched (held under an flock, so no
        other live daemon owns them); children of this host are left alone.
        """
        names: set[str] = set()
        for h in self._hiers:
            try:
                names.update(d.name for d in os.scandir(h.work) if d.is_dir(follow_symlinks=False))
            except FileNotFoundError:
                pass
        names -= set(self._children) | set(self._pool) | {ZYGOTES_LEAF}
        for name in sorted(names):
            dirs = {c: os.path.join(h.work, name) for h in self._hiers for c in h.controllers}
            stale = ChildCgroup(self, name, {c: d for c, d in dirs.items() if os.path.isdir(d)})
            stale.kill()
            stale.remove()
        return sorted(names)

    def close(self) -> None:
        """Remove every child cgroup (killing what is left in them) and the ``zygote`` tree.

        On v2 a daemon that was moved out of its cgroup first goes back there, with the controllers
        we enabled there disabled again, so the host looks as before (a daemon that was not moved
        leaves them: see the comment below).
        """
        if self._closed:
            return
        for cg in list(self._children.values()):
            cg.kill()
            cg.remove()
        self._children.clear()
        for name in self._pool:
            for h in self._hiers:
                _rmdir(os.path.join(h.work, name))
        self._pool.clear()
        self.cleanup_stale()
        if self._zygotes is not None:  # (its zygotes were stopped: what is left is theirs)
            d, self._zygotes = self._zygotes, None
            _empty_and_remove(d)
        for h in self._hiers:
            _rmdir(h.work)
        if self.version == 2:
            h = self._hiers[0]
            try:
                # Controllers can only be disabled top-down once no child uses them (cgroup-v2.rst,
                # "Top-down Constraint"); we own base, so everything enabled in it goes.
                bsub = os.path.join(h.base, "cgroup.subtree_control")
                if _read(bsub).split():
                    _write(bsub, " ".join("-" + c for c in _read(bsub).split()))
                osub = os.path.join(h.own, "cgroup.subtree_control")
                if self._moved_from is not None:
                    # We moved because `own` had processes, so it had no controllers enabled then;
                    # it must have none again before a process may re-enter it. The middle
                    # directory's (zygote/, between own and base) keep own's from going (EBUSY):
                    # they go first, unless another daemon instance is under it.
                    mid = os.path.dirname(h.base)
                    if mid != h.own.rstrip("/") and not any(d.is_dir(follow_symlinks=False) and d.path != h.base
                                                            for d in os.scandir(mid)):
                        msub = os.path.join(mid, "cgroup.subtree_control")
                        if _read(msub).split():
                            _write(msub, " ".join("-" + c for c in _read(msub).split()))
                    if _read(osub).split():
                        _write(osub, " ".join("-" + c for c in _read(osub).split()))
                    # every process in the leaf is ours: the daemon and whatever it forked since the move
                    leaf = os.path.join(h.base, DAEMON_LEAF)
                    for _ in range(100):
                        pids = _procs(leaf)
                        if not pids:
                            break
                        for pid in pids:
                            try:
                                _write(os.path.join(h.own, "cgroup.procs"), str(pid))
                            except ProcessLookupError:
                                pass
                    _rmdir(leaf)
                # Not moved: the controllers we enabled in own stay. Disabling them would take
                # them from every cgroup under own, ours or not (the kernel refuses only while
                # a child enables them further down), and others may use them by now.
            except OSError as e:
                raise _err(f"restoring {h.own}: {e.strerror}", e.errno or 0) from None
        for h in self._hiers:
            if h.lock_fd >= 0:
                os.close(h.lock_fd)
                h.lock_fd = -1
        for h in self._hiers:
            _rmdir(h.base)
            parent = os.path.dirname(h.base)
            if os.path.basename(parent) == "zygote" and os.path.dirname(parent) == h.own.rstrip("/"):
                try:  # the shared parent goes when the last daemon instance leaves it
                    os.rmdir(parent)
                except OSError:
                    pass
        self._closed = True

    def __enter__(self) -> CgroupHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChildCgroup:
    """One child's cgroup, in every hierarchy. Made by ``CgroupHost.create``."""

    def __init__(self, host: CgroupHost, child_id: str, dirs: dict[str, str]) -> None:
        self.host = host
        self.child_id = child_id
        self.dirs = dirs                       # controller -> directory
        self.paths = sorted(set(dirs.values()))  # one per hierarchy
        self.limits: dict[str, object] = {}
        self._fd = -1

    def set_limits(self, memory: int | None, pids: int | None, cpu: float | None) -> bool:
        """Write these limits (a reserve child taken by a request with its own; each no looser
        than what the pool allows). False, writing nothing, when ``memory`` leaves less headroom
        over what the cgroup already uses than RESERVE_HEADROOM (v1 would refuse a limit below
        the usage, v2 would OOM-kill the child; a reserve child may still be warming up). Raises
        SetupError("cgroup", ...) if the kernel refuses a write."""
        mem = self.dirs.get("memory")
        if memory is not None and mem is not None:
            name = "memory.current" if self.host.version == 2 else "memory.usage_in_bytes"
            try:
                if memory - int(_read(f"{mem}/{name}")) < max(RESERVE_HEADROOM, memory // 10):
                    return False
            except (OSError, ValueError) as e:
                raise _err(f"reading {name} of {self.child_id}: {e}", getattr(e, "errno", 0) or 0) from None
        self._limit(memory, pids, cpu)
        return True

    def _limit(self, memory: int | None, pids: int | None, cpu: float | None) -> None:
        v2 = self.host.version == 2
        mem, pid, cpud = self.dirs.get("memory"), self.dirs.get("pids"), self.dirs.get("cpu")
        try:
            if v2:
                if memory is not None:
                    _write(f"{mem}/memory.max", str(memory))
                    if os.path.exists(f"{mem}/memory.swap.max"):  # absent without swap accounting
                        _write(f"{mem}/memory.swap.max", "0")
                if pids is not None:
                    _write(f"{pid}/pids.max", str(pids))
                if cpu is not None:
                    _write(f"{cpud}/cpu.max", f"{max(1000, round(cpu * CPU_PERIOD_US))} {CPU_PERIOD_US}")
            else:
                # v1 inherits oom_kill_disable from the parent: make sure the OOM killer is on
                _write(f"{mem}/memory.oom_control", "0")
                if memory is not None:
                    # limit first: memsw.limit_in_bytes must stay >= limit_in_bytes (EINVAL otherwise)
                    _write(f"{mem}/memory.limit_in_bytes", str(memory))
                    if os.path.exists(f"{mem}/memory.memsw.limit_in_bytes"):  # swap accounting on
                        _write(f"{mem}/memory.memsw.limit_in_bytes", str(memory))
                    # v1 charges socket buffers to a memcg only once its TCP limit is written,
                    # and to a counter of their own: unwritten, a child's TCP buffers (over its own
                    # loopback, or out) went unbounded by its memory limit, into the host's
                    # tcp_mem (675 MiB queued by a child limited to 64M, a helper's red-team).
                    if os.path.exists(f"{mem}/memory.kmem.tcp.limit_in_bytes"):
                        _write(f"{mem}/memory.kmem.tcp.limit_in_bytes", str(memory))
                if pids is not None:
                    _write(f"{pid}/pids.max", str(pids))
                if cpu is not None:
                    _write(f"{cpud}/cpu.cfs_period_us", str(CPU_PERIOD_US))
                    _write(f"{cpud}/cpu.cfs_quota_us", str(max(1000, round(cpu * CPU_PERIOD_US))))
        except OSError as e:
            hint = HINT_DELEGATE if e.errno != E.EINVAL else "the kernel refused the value for that file (out of its range)"
            raise _err(f"writing {e.filename or 'limit'} in {self.child_id}: {e.strerror}", e.errno or 0, hint) from None
        self.limits = limits(memory, pids, cpu)

    def attach(self, pid: int, fail_after_first: bool = False) -> None:
        """Move process `pid` (all its threads) into this cgroup in every hierarchy.

        A failure may leave it moved in the hierarchies before (``fail_after_first``, for
        tests: as if the second write failed)."""
        for i, d in enumerate(self.paths):
            try:
                if fail_after_first and i == 1:
                    raise OSError(E.EINVAL, os.strerror(E.EINVAL))
                _write(os.path.join(d, "cgroup.procs"), str(pid))
            except OSError as e:
                raise _err(f"attaching pid {pid} to {d}: {e.strerror}", e.errno or 0) from None

    def fd(self) -> int | None:
        """v2: an O_DIRECTORY fd of the cgroup for clone3(CLONE_INTO_CGROUP); None on v1.

        The fd belongs to this object and is closed by ``remove()``. It is opened O_RDONLY, not
        O_PATH: clone3 looks the fd up with fdget(), which rejects O_PATH files.
        """
        if self.host.version != 2:
            return None
        if self._fd < 0:
            self._fd = os.open(self.paths[0], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return self._fd

    def pids(self) -> list[int]:
        """Live processes in the cgroup (zombies are not listed), union over the hierarchies."""
        out: set[int] = set()
        for d in self.paths:
            out.update(_procs(d))
        return sorted(out)

    def cpu_usage(self) -> float:
        """CPU seconds used so far by every process that was ever in the cgroup (the whole child:
        forks, threads, processes that already exited): v2 ``cpu.stat`` usage_usec, v1
        ``cpuacct.usage`` (ns). What the daemon holds against ``cpu_time``. Raises OSError,
        KeyError or ValueError when the file cannot be read or parsed."""
        if self.host.version == 2:
            return _keyed(f"{self.dirs['cpu']}/cpu.stat")["usage_usec"] / 1e6
        return int(_read(f"{self.dirs.get('cpuacct', self.dirs['cpu'])}/cpuacct.usage")) / 1e9

    def stats(self, returncode: int | None = None) -> dict:
        """Accounting after (or during) the child's life.

        Returns memory_exceeded, pids_exceeded (None where the kernel does not say), peak_memory
        (bytes or None), cpu_user and cpu_system (seconds, the whole tree) and enforcement
        (limit -> "cgroup-v1"/"cgroup-v2").

        memory_exceeded on v1: "oom_kill N" in memory.oom_control (Linux ≥ 4.13). Older kernels
        lack that line; then a heuristic is used: memory.failcnt > 0 (usage reached the limit at
        least once) *and* the child died of SIGKILL (`returncode` == -9). It can misreport a child
        that hit the limit, recovered by reclaim and was SIGKILLed for another reason.
        """
        v2 = self.host.version == 2
        mem, pid, cpud = self.dirs.get("memory"), self.dirs.get("pids"), self.dirs.get("cpu")
        acct = self.dirs.get("cpuacct", cpud)
        out: dict = {"memory_exceeded": False, "pids_exceeded": None, "peak_memory": None,
                     "cpu_user": 0.0, "cpu_system": 0.0,
                     "enforcement": {k: f"cgroup-v{self.host.version}" for k in self.limits}}
        if v2:
            ev = _keyed(f"{mem}/memory.events")
            out["memory_exceeded"] = ev.get("oom_kill", 0) > 0 or ev.get("oom", 0) > 0
            if os.path.exists(f"{mem}/memory.peak"):  # Linux ≥ 5.19
                out["peak_memory"] = int(_read(f"{mem}/memory.peak"))
            st = _keyed(f"{cpud}/cpu.stat")
            out["cpu_user"] = st.get("user_usec", 0) / 1e6
            out["cpu_system"] = st.get("system_usec", 0) / 1e6
        else:
            oc = _keyed(f"{mem}/memory.oom_control")
            if "oom_kill" in oc:
                out["memory_exceeded"] = oc["oom_kill"] > 0
            else:
                out["memory_exceeded"] = int(_read(f"{mem}/memory.failcnt")) > 0 and returncode == -signal.SIGKILL
            out["peak_memory"] = int(_read(f"{mem}/memory.max_usage_in_bytes"))
            # cpuacct.usage counts every nanosecond run; its user/system split (usage_user and
            # usage_sys, or cpuacct.stat's USER_HZ ticks) is sampled at timer ticks and need not
            # add up to it (1.49999 s split against 1.5 s used). The total is what cpu_time is held
            # to, so it is reported whole, split in the sampled ratio (as v2's cpu.stat and the
            # kernel's per-task times do).
            total = int(_read(f"{acct}/cpuacct.usage")) / 1e9
            if os.path.exists(f"{acct}/cpuacct.usage_user"):
                user = int(_read(f"{acct}/cpuacct.usage_user"))
                system = int(_read(f"{acct}/cpuacct.usage_sys"))
            else:  # cpuacct.stat counts USER_HZ ticks
                st = _keyed(f"{acct}/cpuacct.stat")
                user, system = st.get("user", 0), st.get("system", 0)
            out["cpu_user"] = total * user / (user + system) if user + system else total
            out["cpu_system"] = total - out["cpu_user"]
        # pids.events exists on v2 and, since Linux 4.x, on v1 too: "max N" counts refused forks
        # v1 (and v2 before Linux 6.13, or mounted pids_localevents) counts there every fork of
        # this cgroup refused by any ancestor's limit too: daemon.max_tasks on zygote/d<pid>/children
        # would read as this child's own. Only a child given a pids limit can have hit its own.
        if os.path.exists(f"{pid}/pids.events"):
            out["pids_exceeded"] = "pids" in self.limits and _keyed(f"{pid}/pids.events").get("max", 0) > 0
        return out

    def kill(self, timeout: float = 5.0) -> None:
        """SIGKILL every process in the cgroup and wait until none is left (zombies don't count).

        v2: cgroup.kill (Linux ≥ 5.14), else freeze + kill each + thaw. v1: the same through the
        freezer hierarchy when mounted (a frozen task cannot fork or exit, so the pid list is
        exact and no pid is reused under us), else repeated kill(2) of the listed pids.
        """
        deadline = time.monotonic() + timeout
        method = self.host.kill_method
        v2 = self.host.version == 2
        freezer = self.dirs.get("freezer")
        while True:
            pids = self.pids()
            if not pids:
                return
            if time.monotonic() > deadline:
                raise _err(f"cgroup {self.child_id}: processes {pids} survived SIGKILL for {timeout:.0f}s", E.EBUSY,
                           "a task in uninterruptible sleep (D state) cannot die; see `ps -o pid,stat,wchan`")
            if method == "cgroup.kill":
                _write(f"{self.paths[0]}/cgroup.kill", "1")
            elif method == "freeze" and v2:
                self._frozen(f"{self.paths[0]}/cgroup.freeze", "1", deadline)
                self._signal(self.pids())
                _write(f"{self.paths[0]}/cgroup.freeze", "0")
            elif freezer:
                self._frozen(f"{freezer}/freezer.state", "FROZEN", deadline)
                self._signal(self.pids())
                _write(f"{freezer}/freezer.state", "THAWED")
            else:
                self._signal(pids)
            time.sleep(0.001)

    def _frozen(self, path: str, value: str, deadline: float) -> None:
        """Freeze and wait (bounded) until the kernel says frozen; a task stuck in D may delay it."""
        _write(path, value)
        while time.monotonic() < deadline:
            if path.endswith("cgroup.freeze"):
                if _keyed(path.replace("cgroup.freeze", "cgroup.events")).get("frozen") == 1:
                    return
            elif _read(path).strip() == "FROZEN":
                return
            time.sleep(0.0005)

    @staticmethod
    def _signal(pids: list[int]) -> None:
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def remove(self) -> None:
        """rmdir the cgroup in every hierarchy (after the child is reaped); idempotent.

        The kernel drops an exited task from its cgroup slightly after it is reaped, so EBUSY is
        retried briefly; sub-cgroups are removed first.
        """
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            for d in self.paths:
                _rmdir(d)
        finally:
            self.host._children.pop(self.child_id, None)


def default_max_tasks(host: CgroupHost | None = None) -> int:
    """Half of what the host can run (the smaller of kernel.pid_max and kernel.threads-max): the
    default bound of ``<base>/children`` (daemon.max_tasks), leaving the rest of the host its own
    half. With ``host``, also below any ``pids.max`` over the daemon's own cgroup (a systemd
    unit's TasksMax, DefaultTasksMax=15% by default; a container's pids limit), less an eighth
    of it (at least 64) for the daemon's own threads and helpers: children filling that
    limit instead made the daemon's thread starts fail."""
    most = []
    for path in ("/proc/sys/kernel/pid_max", "/proc/sys/kernel/threads-max"):
        try:
            most.append(int(_read(path)))
        except (OSError, ValueError):
            pass
    bound = max(1024, min(most or [32768]) // 2)
    if host is not None:
        above = _pids_limit_above(host._by["pids"].own)
        if above is not None:
            bound = min(bound, max(16, above - max(64, above // 8)))
    return bound


def _pids_limit_above(own: str) -> int | None:
    """The smallest ``pids.max`` from ``own`` up to its hierarchy's root (None: "max" all the way,
    or none readable)."""
    least = None
    d = own.rstrip("/")
    while d and os.path.exists(os.path.join(d, "pids.max")):
        try:
            text = _read(os.path.join(d, "pids.max")).strip()
        except OSError:
            text = "max"
        if text != "max":
            try:
                least = int(text) if least is None else min(least, int(text))
            except ValueError:
                pass
        d = os.path.dirname(d)
    return least


def detect(name: str = "zygote") -> CgroupHost:
    """Find the host's cgroup hierarchy and set up the daemon's ``<own cgroup>/<name>`` directory.

    v2 when the memory controller lives in a cgroup2 hierarchy (a pure v2 host, or a hybrid one
    booted with cgroup_no_v1=memory); v1 otherwise, with memory, pids, cpu and cpuacct (and
    freezer, if mounted) found in /proc/self/mountinfo.

    On v2 the "no internal processes" rule (cgroup-v2.rst) forbids enabling controllers in the
    subtree_control of a non-root cgroup that has processes: the daemon then moves itself into
    ``<own>/<name>/daemon`` first. Only the daemon's own process is moved; any other process in
    its cgroup is an error (it is not ours to move).

    The base directory is flock()ed for the host's lifetime: a second daemon with the same base
    would kill the first one's children in ``cleanup_stale``.

    Raises:
        SetupError("cgroup", ...): no usable hierarchy, a controller missing, or not writable;
        the hint names the delegation fix.
    """
    # "zygote" or "zygote/<instance>": one shared, visible parent; one leaf per daemon instance
    if not name or name.count("/") > 1 or any(p in ("", ".", "..") for p in name.split("/")):
        raise ValueError(f"bad cgroup directory name {name!r}")
    try:
        mounts = _mounts()
        own = _own_cgroups()
    except OSError as e:
        raise _err(f"reading /proc/self: {e.strerror}", e.errno or 0, "mount /proc") from None
    for fstype, root, mnt, _ in mounts:
        if fstype == "cgroup2" and "" in own:
            d = _under(mnt, root, own[""])
            # a previous detect() in this process may already have moved us into <own>/<name>/daemon
            tail = f"/{name}/{DAEMON_LEAF}"
            already = d.endswith(tail)
            if already:
                d = d[: -len(tail)]
            try:
                ctrls = set(_read(f"{d}/cgroup.controllers").split())
            except OSError:
                continue
            if "memory" in ctrls:
                return _detect_v2(name, d, ctrls, already)
    return _detect_v1(name, mounts, own)


def _lock(h: _Hier) -> None:
    h.lock_fd = os.open(h.base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(h.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(h.lock_fd)
        h.lock_fd = -1
        raise _err(f"{h.base} is in use by another zygote daemon", e.errno or E.EWOULDBLOCK,
                   "give each daemon its own cgroup directory name, or run it in its own cgroup") from None


def _mkbase(d: str) -> None:
    try:
        os.mkdir(d)
    except FileExistsError:
        pass
    except OSError as e:
        raise _err(f"cannot create {d}: {e.strerror}", e.errno) from None


def _detect_v2(name: str, own: str, ctrls: set[str], already: bool) -> CgroupHost:
    missing = [c for c in CONTROLLERS if c not in ctrls]
    if missing:
        raise _err(f"cgroup v2 controllers {missing} are not available in {own}", E.ENOENT,
                   "enable them in the parent's cgroup.subtree_control (systemd: Delegate=yes; "
                   "Docker: --cgroupns=private)")
    base = os.path.join(own, name)
    subtree = os.path.join(own, "cgroup.subtree_control")
    need = [c for c in CONTROLLERS if c not in _read(subtree).split()]
    moved_from = own if already else None
    # The real root cgroup has no cgroup.type and is exempt from the no-internal-processes rule.
    if need and not already and os.path.exists(os.path.join(own, "cgroup.type")):
        procs = _procs(own)
        foreign = [p for p in procs if p != os.getpid()]
        if foreign:
            raise _err(f"cannot enable {need} in {own}: it also holds processes that are not this daemon "
                       f"({foreign[:10]}); cgroup v2 allows controllers only in cgroups without processes",
                       E.EBUSY, "start the daemon alone in its cgroup (systemd: its own unit with Delegate=yes; "
                       "Docker: as the container's only process, --cgroupns=private)")
        if procs:
            if "/" in name:
                _mkbase(os.path.dirname(base))
            _mkbase(base)
            leaf = os.path.join(base, DAEMON_LEAF)
            _mkbase(leaf)
            try:
                _write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))
            except OSError as e:
                raise _err(f"moving the daemon into {leaf}: {e.strerror}", e.errno or 0) from None
            moved_from = own
    try:
        if need:
            _write(subtree, " ".join("+" + c for c in need))
        # the shared middle directory (zygote/d<pid>: zygote/), <base>, and the children's parent
        for d in ([os.path.dirname(base)] if "/" in name else []) + [base, os.path.join(base, WORK_DIR)]:
            _mkbase(d)
            dsub = os.path.join(d, "cgroup.subtree_control")
            dneed = [c for c in CONTROLLERS if c not in _read(dsub).split()]
            if dneed:
                _write(dsub, " ".join("+" + c for c in dneed))
    except OSError as e:
        raise _err(f"enabling {CONTROLLERS} in {e.filename or subtree}: {e.strerror}", e.errno or 0) from None
    h = _Hier(frozenset(CONTROLLERS), own, base)
    host = CgroupHost(2, [h], moved_from=moved_from)
    _lock(h)
    return host


def _detect_v1(name: str, mounts: list, own: dict[str, str]) -> CgroupHost:
    found: dict[str, tuple[str, str]] = {}   # controller -> (mount point, mount root), first mount wins
    for fstype, root, mnt, opts in mounts:
        if fstype == "cgroup":
            for c in (*V1_CONTROLLERS, "freezer"):
                if c in opts and c not in found:
                    found[c] = (mnt, root)
    missing = [c for c in V1_CONTROLLERS if c not in found or c not in own]
    if missing:
        raise _err(f"no cgroup v1 hierarchy (and no cgroup2 memory controller) for {missing}", E.ENOENT,
                   "mount the missing cgroup controllers (or boot with a cgroup v2 hierarchy); in Docker: "
                   "--cgroupns=private and a writable /sys/fs/cgroup")
    hiers: dict[str, _Hier] = {}
    for c in (*V1_CONTROLLERS, "freezer"):
        if c not in found or c not in own:
            continue
        mnt, root = found[c]
        if mnt in hiers:  # co-mounted, e.g. cpu,cpuacct
            hiers[mnt].controllers = hiers[mnt].controllers | {c}
            continue
        d = _under(mnt, root, own[c])
        base = os.path.join(d, name)
        parts = ([os.path.dirname(base)] if "/" in name else []) + [base, os.path.join(base, WORK_DIR)]
        try:  # (the daemon's name has a middle directory: zygote/d<pid>)
            for part in parts:
                _mkbase(part)
        except SetupError:
            if c == "freezer":  # optional: only makes kill() exact
                continue
            raise
        hiers[mnt] = _Hier(frozenset({c}), d, base)
    host = CgroupHost(1, list(hiers.values()))
    try:
        for h in host._hiers:
            _lock(h)
    except SetupError:
        for h in host._hiers:
            if h.lock_fd >= 0:
                os.close(h.lock_fd)
        raise
    return host


def remove_dead_instances(host: CgroupHost) -> list[str]:
    """Remove ``zygote/d<pid>`` trees left by daemons that died without cleaning up.

    A live daemon holds an flock on its directory in each hierarchy; a dead one's tree is taken
    over only when its pid no longer exists and the locks of all its copies (v1: one per
    hierarchy, whose paths may differ) can be had. It is thawed, what is still inside is
    SIGKILLed, and it is removed; a tree that will not go is left for a later start.
    """
    removed = []
    copies: dict[str, list[str]] = {}  # d<pid> -> its directories, one per hierarchy
    for h in host._hiers:
        parent = os.path.dirname(h.base)
        if os.path.basename(parent) != "zygote":
            continue
        try:
            entries = [e for e in os.scandir(parent) if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
        for e in entries:
            if e.path != h.base and e.name.startswith("d") and e.name[1:].isdigit():
                copies.setdefault(e.name, []).append(e.path)
    for name, paths in sorted(copies.items()):
        if os.path.exists(f"/proc/{name[1:]}"):
            continue
        fds: list[int] = []
        try:
            for path in paths:  # all locked, or none touched (a live instance holds one)
                fds.append(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
                fcntl.flock(fds[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            for fd in fds:
                os.close(fd)
            continue
        try:
            for path in paths:  # (a frozen task dies only once thawed: v1's freezer is a
                _thaw_tree(path)  # hierarchy of its own)
            for path in paths:
                try:
                    for root, _dirs, _files in os.walk(path, topdown=False):
                        _empty_and_remove(root)
                    removed.append(path)
                except (OSError, SetupError):
                    pass  # (still busy: a task in D state. Left for the next start; this one goes on)
        finally:
            for fd in fds:
                os.close(fd)
    return removed


def _empty_and_remove(d: str) -> None:
    """SIGKILL what is left in the cgroup ``d`` (ours: a dead daemon's, or zygotes stopped
    already), for up to ~0.5 s, then remove it (SetupError if it stays busy)."""
    for _ in range(50):
        try:
            pids = _procs(d)
        except OSError:
            break
        if not pids:
            break
        ChildCgroup._signal(pids)
        time.sleep(0.01)
    _rmdir(d)


def _thaw_tree(path: str) -> None:
    """Thaw every cgroup under ``path``, top down (a v1 child stays frozen under a frozen parent):
    a dead daemon may have left one frozen (between the freeze and the thaw of ChildCgroup.kill)."""
    for root, _dirs, _files in os.walk(path):
        for name, value in (("freezer.state", "THAWED"), ("cgroup.freeze", "0")):
            if os.path.exists(f"{root}/{name}"):
                with contextlib.suppress(OSError):
                    _write(f"{root}/{name}", value)
