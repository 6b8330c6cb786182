"""The sandbox configuration a request carries: one frozen, typed, validated tree.

Every field says its unit, default, limit and security consequence. The daemon applies a pool's
policy ceiling on top: a request may tighten what its pool allows, never loosen it.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import TYPE_CHECKING, Annotated, Literal

import msgspec

from ._errors import one_of, quoted
from ._workspace import PATH_MAX, Export, Workspace

# Decoders refuse more before building them (see _protocol.ARGV_MAX): each bind is a mount,
# and a host path the daemon checks as the client (policy.MAX_HOST_PATHS, 256, for all of a
# request's binds). 4096 each was taken: two such lists of long paths held the daemon's event
# loop for seconds per frame (a helper's review).
BINDS_MAX = 256
Binds = Annotated[dict[str, str], msgspec.Meta(max_length=BINDS_MAX)]

# Matched against the stripped text of at most _SIZE_TEXT_MAX characters: the pattern with a
# \s* at each end backtracked quadratically ("1" + 16000 spaces + "x": 1.1 s on the event loop).
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB]?)")
_SIZE_TEXT_MAX = 64
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_MAX = 1 << 62  # beyond any memory or file size, and within every kernel interface's s64
_NAME_RE = re.compile(r"^[A-Za-z0-9_.@+-]{1,64}$")
CPU_MIN, CPU_MAX = 0.01, 4096.0  # cores: SandboxConfig.cpu (the kernel's quota of 1 ms per 100 ms period)


def parse_size(value: int | str | None, field: str) -> int | None:
    """Turn ``1048576``, ``"64M"`` or ``"1.5GiB"`` into bytes (powers of 1024); None stays None.

    Raises:
        ValueError: naming ``field`` when the value is not a positive size.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{field}: expected a size such as 268435456 or '256M', got {quoted(value)}")
    if isinstance(value, int):
        n = value
    else:
        text = str(value)
        m = _SIZE_RE.fullmatch(text.strip()) if len(text) <= _SIZE_TEXT_MAX else None
        if not m:
            raise ValueError(f"{field}: expected a size such as 268435456 or '256M', got {quoted(value, 60)}")
        x = float(m.group(1)) * _UNITS[m.group(2).lower()]
        n = int(x) if math.isfinite(x) and x < _SIZE_MAX else _SIZE_MAX  # 9e400 is inf: no int
    if n <= 0:
        raise ValueError(f"{field}: must be positive, got {quoted(value, 60)}")
    if n >= _SIZE_MAX:
        raise ValueError(f"{field}: must be under 2**62 bytes, got {quoted(value, 60)}")
    return n


def _check_abs(path: str, field: str) -> None:
    """An absolute path in plain form: no '..', '.' or empty components (one trailing '/' is
    fine), shorter than PATH_MAX. (The daemon resolves some of these on the host: a path of a
    million './' would keep it busy for minutes.)"""
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise ValueError(f"{field}: expected an absolute path, got {quoted(path, 60)}")
    if len(path) >= PATH_MAX:
        raise ValueError(f"{field}: a path of {len(path)} characters (the limit is {PATH_MAX - 1})")
    if path == "/":
        return
    # Its components between slashes, by substring searches (a split of a path of 2000
    # components took ~0.1 ms, for each of hundreds of binds, on the daemon's event loop).
    framed = path if path.endswith("/") else path + "/"
    if "/../" in framed:
        raise ValueError(f"{field}: '..' is not allowed in {quoted(path, 60)}")
    if "//" in framed or "/./" in framed:
        raise ValueError(f"{field}: empty and '.' components are not allowed in {quoted(path, 60)}")


def parse_allow(item: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None]:
    """Parse one allow-list entry: ``"198.51.100.0/24"``, ``"10.0.0.5:443"``, ``"2001:db8::/32:443"``.

    The port follows the last ``:`` when what precedes it is an IPv4 network or has a ``/``
    prefix (so a bare IPv6 address is never mistaken for one with a port).

    Raises:
        ValueError: naming the entry.
    """
    if not isinstance(item, str) or len(item) > 64:  # (ipaddress quotes a bad value whole)
        raise ValueError(f"network.allow: expected 'CIDR' or 'CIDR:PORT', got {quoted(item)}")
    head, sep, tail = item.rpartition(":")
    port = None
    if sep and tail.isdigit() and ("/" in head or ":" not in head):
        item, port = head, int(tail)
        if not 1 <= port <= 65535:
            raise ValueError(f"network.allow: port {port} is not in 1..65535")
    try:
        return ipaddress.ip_network(item), port
    except ValueError as e:
        raise ValueError(f"network.allow: {e}") from None


class NetworkConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Opt-in network access through a veth pair (see docs/architecture.md, "Network").

    With a NetworkConfig the child gets an address from the daemon's pool and a default route; it
    can never reach the daemon's host itself, nor (unless an allow-list names them) private,
    link-local (cloud metadata), multicast or reserved ranges. Only IPv4 is routed.

    Attributes:
        allow: destination networks the child may reach, as ``"CIDR"`` or ``"CIDR:PORT"`` (the
            port for TCP and UDP). Empty (default): any public IPv4 destination, or the pool's
            list when it has one. Non-empty: exactly these, even inside the private ranges; a
            request may only narrow the pool's list (under a pool without a list, public
            addresses only: private ranges must be in the pool's). At most 64 entries.
    """

    allow: Annotated[tuple[str, ...], msgspec.Meta(max_length=64)] = ()

    def __post_init__(self) -> None:
        if len(self.allow) > 64:
            raise ValueError(f"network.allow: at most 64 entries, got {len(self.allow)}")
        for item in self.allow:
            parse_allow(item)


# The built-in value of each SandboxConfig field whose None means "the pool's": a pool's own
# unset fields (proc and workdir stay None: their default depends on the root and workspace).
DEFAULTS = {"tmpfs_size": "64M", "seccomp_profile": "default", "landlock": "auto", "uid": 65534, "gid": 65534,
            "hostname": "zygote", "dev_pts": False, "reaper": False}


LANDLOCK_MODES = ("auto", "required", "off")
if TYPE_CHECKING:
    LandlockMode = Literal["auto", "required", "off"]
else:
    LandlockMode = str  # (on the wire; checked in __post_init__: see _errors.one_of)


class SandboxConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """How one child is confined and limited. The built-in defaults are the strictest useful settings.

    A field left unset (None) takes the pool's value: a request that names only what it changes
    (``SandboxConfig(memory="128M")``) keeps the rest of its pool's sandbox, and the pool's own
    unset fields are the built-in defaults (``DEFAULTS``, written below as "Default").

    Attributes:
        chroot_dir: host directory used as the child's root instead of the generated tmpfs root.
            Default None. Security: everything under it is visible to the child (read-only).
        ro_binds: host path -> sandbox path, bound read-only. Default none (a request's add to
            the pool's). Security: the child can
            read everything under each host path (mounts under it included: a path holding /proc
            or /sys is refused). A client's own paths are checked as the client (the kernel's
            answer for its uid, gid and supplementary groups: ACLs count) and bound only as
            checked; a pool's are the administrator's, resolved at every spawn: keep them out
            of directories other users can write. A non-root client's own binds are idmapped
            (a root daemon, a file system that allows it: ext4, xfs, btrfs, tmpfs from Linux
            6.3): there the child acts as the client's uid and primary gid, so it reads the
            client's files (a 0700 directory, a 0600 file) as the client would; files of other
            owners it reaches through their "other" bits, and may not change. At most 64 per
            request; one on a file system without idmapped mounts is bound as for a root client
            (read through "other" bits; the daemon's log says so).
        rw_binds: host path -> sandbox path, bound read-write. Default none. Security: the child can
            change these host files. A non-root client's are idmapped (see ro_binds): what the
            child makes there belongs to the client (uid and primary gid); one that cannot be
            (a file system without idmapped mounts, a client uid above 4194303) fails the spawn
            (step "mounts"). A root client's child writes in the pool's as an unprivileged
            host uid of a range of its own, which differs between children (a root daemon's
            ``id_base + k * 65536 + uid``), and only where the modes let "others" write; a
            non-root client's child with idmapped binds, or in a pool with read-write binds,
            writes there as its client's own host id (``id_base - 4194304 + client uid``), the
            same for all that client's such children, so modes keep clients' files apart there
            as in any shared directory (not from directories another client's child made
            writable, nor from a default ACL it set on one); a client with no such id (uid
            above 4194303) is refused in such a pool (step "userns").
        workdir: the child's working directory inside the sandbox. Default "/" (or the workspace).
        tmpfs_size: size cap of the generated root and of /tmp, bytes or "64M". Default "64M".
        seccomp_profile: a name in seccomp-profiles/ ("default", "strict") or a JSON file path.
            Default "default". Only a pool may turn it off ("unconfined").
        landlock: "auto" (use where the kernel has it), "required" (fail if it does not), "off"
            (pool-level only). Default "auto".
        uid, gid: the unprivileged ids the payload runs as inside the sandbox. Default 65534.
        hostname: the UTS hostname inside. Default "zygote".
        dev_pts: mount a private devpts at /dev/pts. Default False.
        proc: mount a fresh /proc (the child's own pid namespace only). Default: True for the
            generated root, False for chroot_dir.
        memory: cgroup memory limit, bytes or "256M"; swap is 0. Default None (pool's).
        pids: cgroup limit on tasks (processes + threads). Default None (pool's).
        cpu: CPU bandwidth in cores (0.5 = half a core), 0.01..4096. Default None.
        cpu_time: CPU seconds of the whole child, every process it starts included: the daemon
            counts its cgroup and SIGKILLs it once reached (``cpu_time_exceeded``), within a few
            tens of ms of CPU. Each process also gets RLIMIT_CPU at it (rounded up) as a backstop.
            Needs cgroups: without them the spawn fails (step "cgroup"). Default None.
        timeout: wall-clock seconds, enforced by the daemon (SIGKILL of the whole tree). Default None.
        timeout_grace: seconds between SIGTERM and SIGKILL on timeout. Default None (SIGKILL at once).
        file_size: RLIMIT_FSIZE in bytes or "10M". Default None.
        open_files: RLIMIT_NOFILE. Default None.
        max_output_bytes: stdout+stderr bytes the daemon relays before it stops and kills the child.
            Default None. With ``stdio`` fds of the caller's own, stdout and stderr must be pipes
            (the daemon writes the counted output into them, and into nothing else).
        network: None (an empty network namespace with only lo) or a NetworkConfig.
        workspace: a Workspace (``Workspace.from_dir``/``from_files``) copied into a fresh tmpfs at
            its ``path`` (default "/workspace", also the working directory unless workdir is set),
            owned by the sandbox uid. Default None. Security: the source is read by the client
            with its own permissions and never touched; the child writes only to its copy.
        export: an Export: a capped tmpfs (default "/out") the caller gets back after the child
            ended (``child.export(dest)``). Default None.
        reaper: put a small reaper in front of the payload: PID 1 of the child's pid namespace
            forwards signals and reaps orphans, the payload runs as PID 2 (bubblewrap's and
            ``docker --init``'s layout). Default False: the payload is PID 1 itself (nsjail's
            layout), one process per child instead of two: faster to start and to end, ~1.5 MiB
            less memory. Signals sent through the client (``terminate``, ``send_signal``, the
            timeout) still act as on a subprocess: the daemon delivers them. What a PID 1 does
            not get unless it has a handler: signals it raises against itself
            (``os.kill(os.getpid(), ...)``; ``abort()`` ends as SIGSEGV), signals from its own
            subprocesses, SIGXCPU at the ``cpu_time`` rlimit (the daemon's kill at ``cpu_time``,
            or the hard limit a second later, ends it) and SIGALRM from ``alarm()``; orphaned
            grandchildren (``cmd &`` in a shell) stay zombies until it exits. Code that relies
            on those wants the reaper. A pool's True holds for every request; an export and an
            exec'd program (``zygote run --``) always get one.
    """

    chroot_dir: str | None = None
    ro_binds: Binds = {}
    rw_binds: Binds = {}
    workdir: str | None = None
    tmpfs_size: int | str | None = None
    seccomp_profile: str | None = None
    landlock: LandlockMode | None = None
    uid: int | None = None
    gid: int | None = None
    hostname: str | None = None
    dev_pts: bool | None = None
    proc: bool | None = None
    memory: int | str | None = None
    pids: int | None = None
    cpu: float | None = None
    cpu_time: float | None = None
    timeout: float | None = None
    timeout_grace: float | None = None
    file_size: int | str | None = None
    open_files: int | None = None
    max_output_bytes: int | str | None = None
    network: NetworkConfig | None = None
    workspace: Workspace | None = None
    export: Export | None = None
    reaper: bool | None = None

    def __post_init__(self) -> None:
        if self.chroot_dir is not None:
            _check_abs(self.chroot_dir, "chroot_dir")
        for field in ("ro_binds", "rw_binds"):
            for src, dst in getattr(self, field).items():
                _check_abs(src, f"{field} source")
                _check_abs(dst, f"{field} destination")
                if dst == "/":
                    raise ValueError(f"{field}: cannot bind over the sandbox root ({quoted(src)} -> '/')")
        if self.workdir is not None:
            _check_abs(self.workdir, "workdir")
        if self.landlock is not None:
            one_of(self.landlock, LANDLOCK_MODES, "landlock")
        if self.workspace is not None and self.export is not None:
            a, b = self.workspace.path, self.export.path
            if a == b or a.startswith(b + "/") or b.startswith(a + "/"):
                raise ValueError(f"workspace path {quoted(a)} and export path {quoted(b)} must not overlap")
        parse_size(self.tmpfs_size, "tmpfs_size")
        parse_size(self.memory, "memory")
        parse_size(self.file_size, "file_size")
        parse_size(self.max_output_bytes, "max_output_bytes")
        for name in ("uid", "gid"):
            v = getattr(self, name)
            if v is not None and not 1 <= v <= 65534:
                raise ValueError(f"{name}: must be an unprivileged id in 1..65534, got {quoted(v)}")
        if self.hostname is not None and not _NAME_RE.match(self.hostname):
            raise ValueError(f"hostname: expected 1-64 of [A-Za-z0-9_.@+-], got {quoted(self.hostname)}")
        if self.seccomp_profile is not None and (not self.seccomp_profile or "\0" in self.seccomp_profile):
            raise ValueError("seccomp_profile: expected a profile name or an absolute JSON path")
        if self.pids is not None and not 1 <= self.pids <= 1 << 22:
            raise ValueError(f"pids: must be in 1..4194304, got {quoted(self.pids)}")
        if self.open_files is not None and not 3 <= self.open_files <= 1 << 20:
            raise ValueError(f"open_files: must be in 3..1048576, got {quoted(self.open_files)}")
        for name in ("cpu", "cpu_time", "timeout", "timeout_grace"):
            v = getattr(self, name)
            if v is not None and (not math.isfinite(v) or v <= 0):
                raise ValueError(f"{name}: must be a positive number of seconds/cores, got {quoted(v)}")
        # The kernel's CPU quota is 1 ms at least per 100 ms period: a smaller share would be
        # enforced as 0.01 core, looser than asked, so it is refused.
        if self.cpu is not None and not CPU_MIN <= self.cpu <= CPU_MAX:
            raise ValueError(f"cpu: must be {CPU_MIN}..{CPU_MAX} cores, got {quoted(self.cpu)}")

    # Sizes in bytes, parsed once the config validated.
    @property
    def tmpfs_bytes(self) -> int:
        size = DEFAULTS["tmpfs_size"] if self.tmpfs_size is None else self.tmpfs_size
        return parse_size(size, "tmpfs_size")  # type: ignore[return-value]

    def with_defaults(self) -> SandboxConfig:
        """This config with each unset field of ``DEFAULTS`` at its built-in default (what a
        pool's sandbox means; the daemon resolves every pool's this way)."""
        unset = {k: v for k, v in DEFAULTS.items() if getattr(self, k) is None}
        return msgspec.structs.replace(self, **unset) if unset else self

    @property
    def memory_bytes(self) -> int | None:
        return parse_size(self.memory, "memory")

    @property
    def file_size_bytes(self) -> int | None:
        return parse_size(self.file_size, "file_size")

    @property
    def max_output(self) -> int | None:
        return parse_size(self.max_output_bytes, "max_output_bytes")


class ExitStatus(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a child ended, and why.

    Attributes:
        returncode: the payload's exit code; negative -N when signal N ended it (as subprocess).
        timed_out: the daemon killed it at the wall-clock ``timeout``.
        memory_exceeded: the cgroup's OOM killer fired.
        pids_exceeded: a fork/clone failed at the ``pids`` limit.
        cpu_time_exceeded: the daemon killed it when its cgroup had used ``cpu_time`` (all its
            processes), or a process's RLIMIT_CPU backstop ended it (SIGXCPU/SIGKILL).
        output_exceeded: it wrote more than ``max_output_bytes``.
        pool_reloaded: the daemon killed it (SIGKILL) because a reload replaced its pool while
            the client held it (a leased child, see ``Client.connect(leases=)``): its Job was
            written just before or as the reload came, and its payload may have started. Running
            it again gets a child of the new pool.
        wall_time: seconds from clone to reaping.
        cpu_user, cpu_system: CPU seconds of the child and everything it started.
        peak_memory: peak memory in bytes from the cgroup, None where there is no cgroup.
        enforcement: limit name -> mechanism that enforced it (e.g. ``"memory": "cgroup-v1"``).
    """

    returncode: int
    timed_out: bool = False
    memory_exceeded: bool = False
    pids_exceeded: bool = False
    cpu_time_exceeded: bool = False
    output_exceeded: bool = False
    pool_reloaded: bool = False
    wall_time: float = 0.0
    cpu_user: float = 0.0
    cpu_system: float = 0.0
    peak_memory: int | None = None
    enforcement: dict[str, str] = {}
