"""The daemon's TOML configuration file (``zygote serve --config FILE``).

The file is decoded strictly (unknown keys, wrong types and bad values are errors naming the key)
into the same ``DaemonConfig`` / ``PoolConfig`` the flags build, so a flag and a file line mean the
same thing. Example::

    [daemon]
    socket = "/run/zygote/zygote.sock"
    socket_mode = "0660"          # octal string; the group below may connect
    socket_group = "zygote"
    allowed_uids = [1000]         # besides root and the daemon's own uid
    allowed_gids = [1001]         # any peer whose primary gid is listed
    max_children = 512
    max_children_per_client = 64  # per peer uid, over all its connections (root: per connection)
    max_tasks = 16384             # zygotes + all their children's tasks, together (default: half the host's,
                                  # and below a pids limit over the daemon: a unit's TasksMax)
    max_result_bytes = "16M"      # largest return value relayed to a client
    network_pool = "10.213.0.0/16"  # networked children's /30s (only for pools allowing network)
    network_dns = ["192.0.2.53"]
    detached_buffer_bytes = "1M"  # output kept per stream of a detached child (oldest dropped)
    detached_keep_seconds = 600   # an ended detached child stays attachable this long ...
    detached_keep_max = 64        # ... and at most this many of them per peer uid
    detached_keep_bytes = "256M"  # ... holding at most this much output, results and exports per uid
    max_attaches = 256            # attached readers one peer uid may have at once
    max_connections_per_client = 256  # open connections per peer uid (root: no cap)
    max_detached_per_client = 64  # running detached children per peer uid (root: no cap)
    output_rate_per_client = "8M"   # bytes a second of output the daemon reads per peer uid

    [pools.default]
    python = "/opt/pandas-venv/bin/python"   # must have the zygote distribution installed
    preload = ["pandas"]
    env = { PATH = "/usr/bin:/bin", LANG = "C.UTF-8" }
    allow_callables = true        # false: only child_main and allowed_targets run (plain-data arguments)
    allowed_targets = []          # "module:function" names clients may run when allow_callables is false
    zygotes = 2
    reserve = 4                   # children confined ahead of requests with the sandbox below
    reserve_network = 2           # ... and with its network (for requests asking for exactly it)
    forbid_secret_env = true      # refuse requests carrying *_TOKEN, *SECRET*, AWS_*, ... unless:
    env_allow = ["HF_TOKEN"]

    [pools.default.sandbox]      # the pool's default and ceiling: requests may only tighten it
    memory = "512M"
    pids = 64
    timeout = 60
    network = { allow = ["198.51.100.0/24:443"] }  # a ceiling: children ask for it per request

SIGHUP makes a running daemon re-read the file: pools that changed are started afresh and swapped
in, running children are left alone (see ``Daemon.reload``).
"""

from __future__ import annotations

import grp
import os
import tomllib

import msgspec

from zygote_client import SandboxConfig

from ._pool import DEFAULT_ENV, PoolConfig


class ConfigError(ValueError):
    """The configuration file is unreadable or invalid; the message names the file and the key."""


class _DaemonSection(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    socket: str | None = None
    socket_mode: str = "0600"
    socket_group: str | int | None = None
    allowed_uids: list[int] = []
    allowed_gids: list[int] = []
    max_children: int = 1024
    max_children_per_client: int | None = None
    id_base: int | None = None
    always_cgroup: bool = False
    max_tasks: int | None = None
    max_result_bytes: str | int | None = None
    network_pool: str | None = None
    network_dns: list[str] = []
    network_masquerade: str | None = None
    network_ahead: int = 1
    detached_buffer_bytes: str | int | None = None
    detached_keep_seconds: float = 600.0
    detached_keep_max: int = 64
    detached_keep_bytes: str | int | None = None
    max_attaches: int = 256
    max_connections_per_client: int = 256
    max_detached_per_client: int = 64
    output_rate_per_client: str | int | None = None


class _PoolSection(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    python: str | None = None
    preload: list[str] = []
    env: dict[str, str] | None = None
    child_main: str | None = None
    allow_callables: bool = True
    allowed_targets: list[str] = []
    zygotes: int = 1
    reserve: int = 0
    reserve_network: int = 0
    forbid_secret_env: bool = False
    env_allow: list[str] = []
    sandbox: SandboxConfig = SandboxConfig()


class _File(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    daemon: _DaemonSection = _DaemonSection()
    pools: dict[str, _PoolSection] = {}


def check_reserves(pool: PoolConfig, where: str) -> None:
    """A pool's reserve sizes are 0..256, and a networked reserve needs a pool that allows network.
    ``where`` names the pool in the message ("FILE: pools.NAME", "the default pool")."""
    for name in ("reserve", "reserve_network"):
        if not 0 <= getattr(pool, name) <= 256:
            raise ConfigError(f"{where}: {name} must be 0..256, got {getattr(pool, name)}")
    if pool.reserve_network and pool.sandbox.network is None:
        raise ConfigError(f"{where}: reserve_network needs a pool that allows network "
                          "(sandbox.network in its TOML table, or --network)")


def check_profile(pool: PoolConfig, where: str) -> None:
    """The pool's seccomp profile exists and is valid: every default request of a pool naming
    one that is not failed ("unknown seccomp profile") while the file (or a reload) was taken."""
    profile = pool.sandbox.seccomp_profile
    if profile in (None, "", "unconfined"):
        return
    from .layers import seccomp
    try:
        seccomp.load_profile(profile)
    except seccomp.ProfileError as e:
        raise ConfigError(f"{where}: sandbox.seccomp_profile: {e}") from None


def check_nested_pool_binds(pools, where: str) -> None:
    """No pool's bind source (or chroot_dir) lies below a pool's read-write bind source. Pool
    sources are found again at every spawn, by their path: a child of the pool with the
    read-write bind could put a symlink there, and the next child (any client's) would get
    whatever host directory it names, read-write too for a read-write bind (a helper's
    red-team: a child listed and wrote the host's /tmp)."""
    writable = [(name, os.path.realpath(src)) for name, pc in pools.items() for src in pc.sandbox.rw_binds]
    for name, pc in pools.items():
        sources = [*pc.sandbox.ro_binds, *pc.sandbox.rw_binds, *filter(None, [pc.sandbox.chroot_dir])]
        for src in sources:
            r = os.path.realpath(src)
            for other, w in writable:
                if r != w and r.startswith(w.rstrip("/") + "/"):
                    raise ConfigError(
                        f"{where}: pools.{name}: {src!r} lies inside {w!r}, which pools.{other} binds "
                        "read-write: its children could replace it with a symlink to any host path. "
                        "Keep pool bind sources apart (or bind only the outer directory)")


def shared_rw_bind_warnings(cfg, root: bool, clients_taken: str | None) -> list[str]:
    """Lines about the pools' read-write binds of a daemon that serves other users too (said at
    start and at each reload; not refused, a shared cache is a common use):

    - where children of different clients may run as the same host ids there. A root daemon
      (``root``) runs a non-root client's child in such a pool as the client's own host id
      (Daemon._own_id_for_pool_rw), so modes keep clients apart there, unless host accounts
      hold the client ids (``clients_taken`` at the daemon's start, userns.IdSlots): then such
      children are refused. A daemon not run as root runs every child as its own user: what one
      client's children leave there is another's.
    - a pool with ``seccomp_profile = "unconfined"``: nothing refuses set-ID modes, so a child
      can leave a set-user-ID program there that any local user runs as the child's host id
      (a non-root client's own: its files there, its running children's signals)."""
    if not (cfg.allowed_uids or cfg.allowed_gids or cfg.socket_group is not None):
        return []
    binds = [(name, src) for name, pc in cfg.pools.items() for src in pc.sandbox.rw_binds]
    lines = [f"pools.{name}: {src!r} is bound read-write without seccomp (seccomp_profile \"unconfined\"): a "
             "child can leave a set-user-ID program there that any local user runs as the child's host id "
             "(for a non-root client's child, the client's own: its files there, its children's signals); keep "
             "a seccomp profile, or keep such a pool to one client"
             for name, src in binds if cfg.pools[name].sandbox.seccomp_profile == "unconfined"]
    if root and clients_taken is None:
        return lines
    if root:
        return lines + [f"pools.{name}: {src!r} is bound read-write, where a non-root client's child runs as the "
                        f"client's own host id, and there are none ({clients_taken}): non-root clients' spawns in "
                        "this pool are refused" for name, src in binds]
    return lines + [f"pools.{name}: {src!r} is bound read-write into every child of the pool, and a daemon not run "
                    "as root runs every client's children as its own user: what one client's children leave there "
                    "is readable and writable by another's, whatever its mode (give each client a pool of its own, "
                    "or keep private data out of it)" for name, src in binds]


def check_network_room(pools, network_pool: str, where: str) -> None:
    """Every pool's networked reserve together must leave addresses for requests: each held
    child keeps a /30 of ``network_pool``. (A pool that is not a valid network is reported by
    the network layer's own check.)"""
    import ipaddress

    try:
        slots = ipaddress.ip_network(network_pool).num_addresses // 4
    except ValueError:
        return
    held = sum(p.reserve_network for p in pools.values())
    if held and held >= slots:
        raise ConfigError(f"{where}: the pools' reserve_network add up to {held}, but network_pool "
                          f"{network_pool} has room for {slots} networked children: lower reserve_network "
                          "or give a larger network_pool")


def load(path: str, *, default_python: str):
    """Read ``path`` and return a DaemonConfig (socket not yet created). Raises ConfigError."""
    from .daemon import DaemonConfig  # the daemon module imports trio; keep this module light

    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        parsed = msgspec.convert(raw, _File)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{path}: {e}") from None
    except ValueError as e:  # SandboxConfig's own checks (sizes, ranges) raise ValueError
        raise ConfigError(f"{path}: {e}") from None

    d = parsed.daemon
    try:
        mode = int(d.socket_mode, 8)
    except ValueError:
        raise ConfigError(f"{path}: daemon.socket_mode must be an octal string such as \"0660\", "
                          f"got {d.socket_mode!r}") from None
    if mode & ~0o777 or mode & 0o007:
        raise ConfigError(f"{path}: daemon.socket_mode {d.socket_mode!r}: only owner and group bits "
                          "(others may never connect; list their uids instead)")
    group = _gid(path, d.socket_group)
    if d.max_tasks is not None and not 16 <= d.max_tasks <= 4194304:  # (the kernel's pid_max ceiling)
        raise ConfigError(f"{path}: daemon.max_tasks must be 16 to 4194304 (tasks: the zygotes' and all "
                          "their children's together)")
    if d.max_children < 1 or (d.max_children_per_client is not None and d.max_children_per_client < 1):
        raise ConfigError(f"{path}: daemon.max_children and max_children_per_client must be >= 1")
    pools = {}
    for name, p in (parsed.pools or {"default": _PoolSection()}).items():
        where = f"{path}: pools.{name}"
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{where}: a pool name is letters, digits, '-' and '_'")
        if not 1 <= p.zygotes <= 64:
            raise ConfigError(f"{where}.zygotes must be 1..64, got {p.zygotes}")
        for name_, t in [("child_main", p.child_main)] + [("allowed_targets", t) for t in p.allowed_targets]:
            if t is not None and ":" not in t:
                raise ConfigError(f"{where}.{name_} must be 'module:function', got {t!r}")
        python = p.python or default_python
        if not (os.path.isabs(python) and os.access(python, os.X_OK)):
            raise ConfigError(f"{where}.python {python!r} is not an absolute path to an executable")
        pools[name] = PoolConfig(name=name, python=python, preload=tuple(p.preload),
                                 env=dict(DEFAULT_ENV if p.env is None else p.env), child_main=p.child_main,
                                 allow_callables=p.allow_callables, allowed_targets=tuple(p.allowed_targets),
                                 zygotes=p.zygotes, reserve=p.reserve,
                                 reserve_network=p.reserve_network, sandbox=p.sandbox,
                                 forbid_secret_env=p.forbid_secret_env, env_allow=tuple(p.env_allow))
        check_reserves(pools[name], where)
        check_profile(pools[name], where)
    check_nested_pool_binds(pools, path)
    kw = {}
    if d.max_result_bytes is not None:
        from zygote_client._config import parse_size
        from zygote_client._protocol import MAX_FRAME
        try:
            kw["max_result_bytes"] = parse_size(d.max_result_bytes, "daemon.max_result_bytes")
        except ValueError as e:
            raise ConfigError(f"{path}: {e}") from None
        if kw["max_result_bytes"] > MAX_FRAME - (1 << 20):
            raise ConfigError(f"{path}: daemon.max_result_bytes: at most {(MAX_FRAME >> 20) - 1}M (one frame)")
    if d.detached_buffer_bytes is not None:
        from zygote_client._config import parse_size
        try:
            kw["detached_buffer_bytes"] = parse_size(d.detached_buffer_bytes, "daemon.detached_buffer_bytes")
        except ValueError as e:
            raise ConfigError(f"{path}: {e}") from None
        if kw["detached_buffer_bytes"] < 1:
            raise ConfigError(f"{path}: daemon.detached_buffer_bytes must be at least 1 byte")
    if d.detached_keep_seconds < 0 or d.detached_keep_max < 0:
        raise ConfigError(f"{path}: daemon.detached_keep_seconds and detached_keep_max must be >= 0")
    kw["detached_keep_seconds"] = d.detached_keep_seconds
    kw["detached_keep_max"] = d.detached_keep_max
    if d.max_attaches < 1:
        raise ConfigError(f"{path}: daemon.max_attaches must be >= 1")
    kw["max_attaches"] = d.max_attaches
    if d.max_connections_per_client < 1:
        raise ConfigError(f"{path}: daemon.max_connections_per_client must be >= 1")
    kw["max_connections_per_client"] = d.max_connections_per_client
    if d.max_detached_per_client < 1:
        raise ConfigError(f"{path}: daemon.max_detached_per_client must be >= 1")
    kw["max_detached_per_client"] = d.max_detached_per_client
    if d.detached_keep_bytes is not None:
        from zygote_client._config import parse_size
        try:
            kw["detached_keep_bytes"] = parse_size(d.detached_keep_bytes, "daemon.detached_keep_bytes")
        except ValueError as e:
            raise ConfigError(f"{path}: {e}") from None
    if d.output_rate_per_client is not None:
        from zygote_client._config import parse_size
        try:
            kw["output_rate_per_client"] = parse_size(d.output_rate_per_client, "daemon.output_rate_per_client")
        except ValueError as e:
            raise ConfigError(f"{path}: {e}") from None
        if kw["output_rate_per_client"] < 4096:  # (a pipe page a second, at least)
            raise ConfigError(f"{path}: daemon.output_rate_per_client must be at least 4K (bytes a second)")
    if d.id_base is not None:
        kw["id_base"] = d.id_base
    if d.network_pool is not None:
        kw["network_pool"] = d.network_pool
    if d.network_dns:
        kw["network_dns"] = tuple(d.network_dns)
    if d.network_masquerade is not None:
        kw["network_masquerade"] = d.network_masquerade
    if d.network_ahead < 0:
        raise ConfigError(f"{path}: daemon.network_ahead must be >= 0")
    kw["network_ahead"] = d.network_ahead  # (not counted against the pool's room: any networked spawn takes one)
    from .layers.network import DEFAULT_POOL
    check_network_room(pools, kw.get("network_pool", DEFAULT_POOL), path)
    return DaemonConfig(socket_path=d.socket, pools=pools, allowed_uids=tuple(d.allowed_uids),
                        allowed_gids=tuple(d.allowed_gids), max_children=d.max_children,
                        max_children_per_client=d.max_children_per_client, socket_mode=mode,
                        socket_group=group, always_cgroup=d.always_cgroup, max_tasks=d.max_tasks, **kw)


def _gid(path: str, group: str | int | None) -> int | None:
    if group is None or isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"{path}: daemon.socket_group {group!r}: no such group") from None
