"""The ``zygote`` command: serve, run, doctor.

Exit statuses of ``zygote run`` follow the shell's conventions: the child's own code, 128+N when
signal N ended it, 124 when killed at its timeout, 125 when the sandbox could not be made (or its
--export was refused), 127 when the program was not found (126 when it could not be executed).
A child ended by SIGINT or SIGQUIT (Ctrl-C, Ctrl-\\) ends `zygote run` by the same signal, and
so does a terminating signal sent to `zygote run` before its child runs (see _end_by).
At a terminal it passes the terminal's signals on to its child (see _SignalProxy).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys

EXIT_TIMEOUT = 124
EXIT_SANDBOX = 125


def _result_cap(text: str) -> int:
    from zygote_client._config import parse_size
    from zygote_client._protocol import MAX_FRAME
    try:
        n = parse_size(text, "--max-result-bytes")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n > MAX_FRAME - (1 << 20):  # the result rides in one Exited frame
        raise argparse.ArgumentTypeError(f"at most {(MAX_FRAME >> 20) - 1}M (one protocol frame)")
    return n  # type: ignore[return-value]


def _ring_size(text: str) -> int:
    from zygote_client._config import parse_size
    try:
        n = parse_size(text, "--detached-buffer-bytes")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1 byte")
    return n  # type: ignore[return-value]


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the daemon")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help="listen on this Unix socket path (or the config's; "
                       "under systemd socket activation, the inherited socket)")
    where.add_argument("--inherit-fd", type=int, metavar="FD", help=argparse.SUPPRESS)
    p.add_argument("--config", metavar="FILE", help="TOML configuration (see zygote/config.py); flags override "
                   "its daemon settings and its default pool; SIGHUP re-reads it")
    p.add_argument("--python", help="the default pool's interpreter (default: this one)")
    p.add_argument("--preload", action="append", default=[], metavar="MOD", help="import MOD in the zygote")
    p.add_argument("--child-main", metavar="MOD:FUNC", help="what children run when a request names no target")
    p.add_argument("--zygotes", type=int, metavar="N", help="zygote processes in the default pool")
    p.add_argument("--reserve", type=int, metavar="N",
                   help="children of the default pool kept confined ahead of requests (default 0)")
    p.add_argument("--reserve-network", type=int, metavar="N",
                   help="children of the default pool kept confined with its network (veth and rules "
                   "made ahead) for requests asking for exactly that network (default 0; needs --network)")
    p.add_argument("--env-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--allow-uid", type=int, action="append", default=[], help="peer uid allowed to connect")
    p.add_argument("--allow-gid", type=int, action="append", default=[], help="peer primary gid allowed to connect")
    p.add_argument("--max-children", type=int, metavar="N",
                   help="running children at once, all clients (children waiting in a reserve not counted)")
    p.add_argument("--max-children-per-client", type=int, metavar="N",
                   help="running children per peer uid, over all its connections (root: per connection)")
    p.add_argument("--socket-mode", metavar="OCTAL", help="the socket file's mode (default 0600)")
    p.add_argument("--socket-group", metavar="GROUP", help="the socket file's group (name or gid)")
    p.add_argument("--log-format", choices=("json", "console"), default="json",
                   help="one event per spawn and per exit on stderr (default: JSON lines)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   help="default info (error for an embedded daemon)")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics on 127.0.0.1:PORT/metrics (0: any free port, printed)")
    p.add_argument("--max-result-bytes", type=_result_cap, metavar="SIZE",
                   help="largest return value relayed to a client (default 16M); more is dropped")
    p.add_argument("--detached-buffer-bytes", type=_ring_size, metavar="SIZE",
                   help="output kept per stream of a detached child for later attaches (default 1M)")
    p.add_argument("--detached-keep-seconds", type=float, metavar="S",
                   help="how long an ended, never attached detached child stays attachable (default 600)")
    p.add_argument("--test-hooks", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--forbid-secret-env", action="store_true",
                   help="refuse requests whose environment has secret-looking names (*_TOKEN, *SECRET*, AWS_*, ...)")
    p.add_argument("--allow-env", action="append", default=[], metavar="NAME",
                   help="a name accepted despite --forbid-secret-env")

    n = p.add_argument_group("network (opt-in per child; needs CAP_NET_ADMIN and nftables)")
    n.add_argument("--network", action="store_true", help="let children ask for a veth (SandboxConfig.network)")
    n.add_argument("--network-allow", action="append", default=[], metavar="CIDR[:PORT]",
                   help="the pool's allow-list: children may reach only these (implies --network)")
    n.add_argument("--network-pool", metavar="CIDR", help="IPv4 network children's /30s come from (default 10.213.0.0/16)")
    n.add_argument("--network-dns", action="append", default=[], metavar="ADDR",
                   help="nameserver for children's resolv.conf (reachable on port 53)")
    n.add_argument("--network-masquerade", metavar="IFNAME", help="masquerade children's traffic out of this uplink")
    n.add_argument("--network-ahead", type=int, metavar="N",
                   help="network namespaces kept prepared for networked spawns (default 1; 0: none)")


def _status_parser(sub) -> None:
    p = sub.add_parser("status", help="pools, zygotes, running children and counters of a daemon")
    p.add_argument("--socket", required=True, metavar="PATH")
    p.add_argument("--json", action="store_true", help="print the reply as JSON")


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="run a program or a Python file in a confined child of an embedded zygote")
    p.add_argument("--preload", action="append", default=[], metavar="MOD")
    p.add_argument("--timeout", type=float, metavar="S", help="wall-clock limit in seconds (exit 124)")
    p.add_argument("--timeout-grace", type=float, metavar="S", help="SIGTERM this long before SIGKILL at the timeout")
    p.add_argument("--memory", metavar="SIZE", help="cgroup memory limit, e.g. 256M (swap 0)")
    p.add_argument("--pids", type=int, metavar="N", help="cgroup limit on processes+threads")
    p.add_argument("--cpu", type=float, metavar="CORES", help="CPU bandwidth in cores, e.g. 0.5")
    p.add_argument("--cpu-time", type=float, metavar="S", help="CPU seconds of the whole child (all its processes)")
    p.add_argument("--file-size", metavar="SIZE", help="RLIMIT_FSIZE")
    p.add_argument("--open-files", type=int, metavar="N", help="RLIMIT_NOFILE")
    p.add_argument("--max-output", metavar="SIZE", help="stdout+stderr bytes before the child is killed")
    p.add_argument("--ro-bind", action="append", default=[], metavar="SRC[:DST]", help="bind a host path read-only")
    p.add_argument("--rw-bind", action="append", default=[], metavar="SRC[:DST]", help="bind a host path read-write")
    p.add_argument("--chroot", metavar="DIR", help="use DIR as the child's root instead of the generated one")
    p.add_argument("--seccomp-profile", metavar="NAME", help="default, strict, or a JSON file")
    p.add_argument("--workdir", metavar="DIR", help="working directory inside the sandbox")
    p.add_argument("--workspace", metavar="DIR", help="copy DIR into a writable /workspace (the working directory)")
    p.add_argument("--workspace-allow", action="append", default=[], metavar="NAME",
                   help="stage this secret-looking name (e.g. .env) anyway")
    p.add_argument("--export", metavar="DIR", help="after the child ends, write what it put in /out to DIR (new)")
    p.add_argument("--export-max", metavar="SIZE", help="bytes /out may hold (default 64M)")
    p.add_argument("--export-truncate", action="store_true",
                   help="drop what is over the limits (and symlinks, fifos) instead of refusing the export")
    p.add_argument("--python", dest="pyfile", metavar="FILE", help="run this Python file in a warm child")
    p.add_argument("--reaper", action="store_true",
                   help="a PID-1 reaper in front of the payload (always for -- PROGRAM): orphans are "
                        "reaped and a payload that signals itself dies of it")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="child environment entry")
    p.add_argument("--network", action="store_true", help="give the child a veth (public IPv4 destinations only)")
    p.add_argument("--allow", action="append", default=[], metavar="CIDR[:PORT]",
                   help="with --network: reach only these networks (may include private ranges)")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- PROGRAM ARGS (or ARGS for --python)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="zygote", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    _serve_parser(sub)
    _run_parser(sub)
    _status_parser(sub)
    d = sub.add_parser("doctor", help="which confinement layers this host supports, and how to fix the rest")
    d.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        return serve(args)
    if args.cmd == "run":
        try:
            return run(args)
        except KeyboardInterrupt:  # Ctrl-C before our handlers were in place: no traceback
            return _end_by(signal.SIGINT)
    if args.cmd == "status":
        return status(args)
    if args.cmd == "doctor":
        from .doctor import main as doctor_main
        return doctor_main(json_out=args.json)
    return 2


def _config_from_args(args):
    """DaemonConfig from --config (if any) with the flags applied on top. Raises ConfigError."""
    import dataclasses

    import msgspec

    from zygote_client import NetworkConfig

    from . import config as config_file
    from ._pool import DEFAULT_ENV, PoolConfig
    from .daemon import DaemonConfig
    from .layers.network import NetworkHost

    if args.config:
        cfg = config_file.load(args.config, default_python=sys.executable)
    else:
        cfg = DaemonConfig(pools={"default": PoolConfig(python=sys.executable, env=dict(DEFAULT_ENV))})
    pool = cfg.pools.get("default") or PoolConfig(python=sys.executable, env=dict(DEFAULT_ENV))
    pool_changes: dict = {}
    if args.python:
        pool_changes["python"] = args.python
    if args.preload:
        pool_changes["preload"] = tuple(args.preload)
    if args.child_main:
        pool_changes["child_main"] = args.child_main
    if args.zygotes is not None:
        if not 1 <= args.zygotes <= 64:
            raise config_file.ConfigError(f"--zygotes must be 1..64, got {args.zygotes}")
        pool_changes["zygotes"] = args.zygotes
    if args.reserve is not None:
        pool_changes["reserve"] = args.reserve
    if args.reserve_network is not None:
        pool_changes["reserve_network"] = args.reserve_network
    if args.env_fd is not None:
        with os.fdopen(args.env_fd) as f:
            data = f.read()
        if data:
            pool_changes["env"] = {str(k): str(v) for k, v in json.loads(data).items()}
    if args.forbid_secret_env:
        pool_changes["forbid_secret_env"] = True
    if args.allow_env:
        pool_changes["env_allow"] = tuple(pool.env_allow) + tuple(args.allow_env)
    if args.network or args.network_allow:
        pool_changes["sandbox"] = msgspec.structs.replace(
            pool_changes.get("sandbox", pool.sandbox), network=NetworkConfig(allow=tuple(args.network_allow)))
    changes: dict = {"test_hooks": args.test_hooks,
                     "allowed_uids": cfg.allowed_uids + tuple(args.allow_uid),
                     "allowed_gids": cfg.allowed_gids + tuple(args.allow_gid)}
    if pool_changes or "default" not in cfg.pools:
        changes["pools"] = {**cfg.pools, "default": dataclasses.replace(pool, **pool_changes)}
        config_file.check_reserves(changes["pools"]["default"], "the default pool (--reserve, --reserve-network)")
    # Flags that set a DaemonConfig field as they are, when given (empty lists count as not given).
    for flag, field in (("socket", "socket_path"), ("max_result_bytes", "max_result_bytes"),
                        ("network_pool", "network_pool"), ("network_masquerade", "network_masquerade"),
                        ("network_ahead", "network_ahead"),
                        ("detached_buffer_bytes", "detached_buffer_bytes"),
                        ("detached_keep_seconds", "detached_keep_seconds"), ("max_children", "max_children"),
                        ("max_children_per_client", "max_children_per_client")):
        value = getattr(args, flag)
        if value is not None and value != "":
            changes[field] = value
    if args.network_dns:
        changes["network_dns"] = tuple(args.network_dns)
    try:  # validates the address pool and nameservers, touches nothing
        NetworkHost(changes.get("network_pool", cfg.network_pool), changes.get("network_dns", cfg.network_dns))
    except ValueError as e:
        raise config_file.ConfigError(str(e)) from None
    if changes.get("network_ahead", 0) < 0:
        raise config_file.ConfigError("--network-ahead must be >= 0")
    config_file.check_network_room(changes.get("pools", cfg.pools), changes.get("network_pool", cfg.network_pool),
                                   "--network-pool/--reserve-network")
    if args.socket_mode is not None:
        try:
            changes["socket_mode"] = int(args.socket_mode, 8)
        except ValueError:
            raise config_file.ConfigError(f"--socket-mode must be octal, got {args.socket_mode!r}") from None
    if args.socket_group is not None:
        changes["socket_group"] = config_file._gid("--socket-group",
                                                   int(args.socket_group) if args.socket_group.isdigit()
                                                   else args.socket_group)
    return dataclasses.replace(cfg, **changes)


def _activated_socket() -> socket.socket | None:
    """The listening socket systemd passed (socket activation: LISTEN_PID/LISTEN_FDS), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        return None
    for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(k, None)
    s = socket.socket(fileno=3)
    os.set_inheritable(3, False)
    if s.family != socket.AF_UNIX or s.type != socket.SOCK_STREAM:
        raise SystemExit("zygote serve: the socket systemd passed is not a Unix stream socket")
    return s


def sd_notify(state: str) -> None:
    """Tell systemd our state (READY=1, RELOADING=1, STOPPING=1) when it asked (NOTIFY_SOCKET)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(addr)
            s.send(state.encode())
        except OSError as e:
            _say(f"zygote serve: sd_notify {state!r}: {e}")


def _say(text: str) -> None:
    """A line on stderr from a running daemon; one that cannot be written (the reader went away)
    is dropped rather than raised into the daemon."""
    from .observe import LossyStream
    print(text, file=LossyStream(sys.stderr), flush=True)


def serve(args) -> int:
    import trio

    from .config import ConfigError
    from ._pool import PoolStartError
    from .daemon import Daemon

    # From here a supervisor may signal us and (once the socket is bound) a client may connect,
    # which tells a script the daemon is up: SIGTERM, SIGINT and SIGHUP wait, blocked, until
    # trio's receivers are in place (main_task). Their default action killed the daemon with
    # nothing cleaned up (its socket file, its claims on id ranges), and a SIGHUP while a
    # --config daemon's pools started (seconds, with pandas) killed it too.
    # SIGINT and SIGHUP ignored when we were started (a background job of a script, nohup) stay
    # ignored, as the convention for such jobs is, except SIGHUP's reload of a --config daemon.
    ignored = {s for s in (signal.SIGINT, signal.SIGHUP) if signal.getsignal(s) == signal.SIG_IGN}
    stopping = [s for s in (signal.SIGTERM, signal.SIGINT) + (() if args.config else (signal.SIGHUP,))
                if s not in ignored]
    handled = set(stopping) | ({signal.SIGHUP} if args.config else set())
    signal.pthread_sigmask(signal.SIG_BLOCK, handled)
    try:
        cfg = _config_from_args(args)
    except ConfigError as e:
        print(f"zygote serve: {e}", file=sys.stderr)
        return 2
    listen = _activated_socket() if args.inherit_fd is None else None
    own_socket = False
    if listen is None and args.inherit_fd is None:
        if not cfg.socket_path:
            print("zygote serve: no socket: give --socket PATH or daemon.socket in --config", file=sys.stderr)
            return 2
        listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        if os.path.exists(cfg.socket_path) and _is_stale_socket(cfg.socket_path):
            os.unlink(cfg.socket_path)
        old = os.umask(0o177)
        try:
            listen.bind(cfg.socket_path)
        finally:
            os.umask(old)
        own_socket = True
        if cfg.socket_group is not None:
            os.chown(cfg.socket_path, -1, cfg.socket_group)
        os.chmod(cfg.socket_path, cfg.socket_mode)
        listen.listen(128)
    elif listen is not None:
        listen.listen(128)
    from . import observe
    observe.configure_logging(args.log_format, args.log_level or ("error" if args.inherit_fd is not None else "info"))
    _large_blocks_mapped()
    try:
        daemon = Daemon(cfg)
    except (ValueError, OSError) as e:  # e.g. no free block of host id ranges (layers/userns.py)
        print(f"zygote serve: {e}", file=sys.stderr)
        if own_socket:
            os.unlink(cfg.socket_path)
        return 2
    _warn_shared_rw_binds(daemon)
    if args.metrics_port is not None:
        from . import observe
        try:
            port = daemon.observer.serve_metrics(
                args.metrics_port, timeout=daemon._test_knob("METRICS_TIMEOUT", observe.METRICS_TIMEOUT, float))
        except OSError as e:
            print(f"zygote serve: metrics port {args.metrics_port}: {e.strerror}", file=sys.stderr)
            if own_socket:
                os.unlink(cfg.socket_path)
            return 2
        print(f"zygote serve: metrics on http://127.0.0.1:{port}/metrics", file=sys.stderr, flush=True)

    async def main_task() -> None:
        # SIGHUP reloads a --config daemon (one that came while the pools started, once they
        # have); without --config it stops the daemon as SIGTERM does.
        reloading = trio.open_signal_receiver(signal.SIGHUP) if args.config else contextlib.nullcontext()
        with trio.open_signal_receiver(*stopping) as stops, reloading as hups:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)  # (before any zygote starts)
            try:
                async with trio.open_nursery() as n:
                    n.start_soon(_stop_on_signals, stops, n.cancel_scope)

                    async def run_daemon(task_status=trio.TASK_STATUS_IGNORED) -> None:
                        await daemon.run(listen_sock=listen, inherit_fd=args.inherit_fd, task_status=task_status)
                        n.cancel_scope.cancel()  # the embedded connection closed

                    await n.start(run_daemon)
                    sd_notify("READY=1")  # only now: every pool's zygote has preloaded
                    if args.config:
                        n.start_soon(_reload_on_hup, daemon, args, hups)
            finally:
                # A receiver raises the signals it still holds (a SIGHUP that came while the
                # pools started, a second SIGTERM during the shutdown) again as it closes, once
                # the old dispositions are back: blocked, they stay pending here and are ignored
                # below, instead of ending the process by their default action before the
                # cleanup (its socket file was left).
                signal.pthread_sigmask(signal.SIG_BLOCK, handled)

    try:
        trio.run(main_task)
    except (PoolStartError, BaseExceptionGroup) as e:
        err = _find(e, PoolStartError)
        if err is None:
            raise
        print(f"zygote serve: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        pass
    finally:
        for sig in handled:  # (a trio worker thread could still take one from outside)
            signal.signal(sig, signal.SIG_IGN)
        sd_notify("STOPPING=1")
        daemon.observer.close()
        if listen is not None:
            listen.close()
        if own_socket:
            try:
                os.unlink(cfg.socket_path)
            except FileNotFoundError:
                pass
    return 0


def status(args) -> int:
    import msgspec

    from zygote_client import Client, ZygoteError

    try:
        with Client.connect(args.socket) as c:
            st = c.status()
    except (OSError, ZygoteError) as e:
        print(f"zygote status: {args.socket}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(msgspec.json.encode(st).decode())
        return 0
    print(f"daemon pid {st.daemon_pid}, up {st.uptime:.0f} s, {st.running} children running")
    for p in st.pools:
        reserve = f"{p.reserve_waiting}/{p.reserve} reserve children waiting, " if p.reserve else ""
        print(f"  pool {p.name}: {p.zygotes_running}/{p.zygotes} zygotes, {p.restarts} restarts, {reserve}"
              f"python {p.python}, preload {', '.join(p.preload) or '-'}")
    for c in st.children:
        print(f"  child {c.id}: pool {c.pool}, pid {c.pid}, uid {c.peer_uid}, {c.age:.1f} s")
    print("  " + ", ".join(f"{k} {v}" for k, v in sorted(st.counters.items())))
    return 0


LARGE_BLOCK = 1 << 20  # bytes: the daemon's allocations from this size on are mappings of their own


def _large_blocks_mapped() -> None:
    """Have glibc's malloc map every block of LARGE_BLOCK or more on its own, for good. By default
    it raises that threshold (up to 32 MiB) each time such a block is freed, and from then on
    blocks below it come from the heap, which keeps what it once held: after a few large frames
    (request payloads of several MiB, read in pieces into a growing buffer) the daemon held ~60
    MiB more for as long as it ran (a helper's review). A mapping goes back to the system when it
    is freed. (Nothing to do where the C library has no mallopt, e.g. musl.)"""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(ctypes.c_int(-3), ctypes.c_int(LARGE_BLOCK))  # M_MMAP_THRESHOLD (malloc.h)


def _warn_shared_rw_binds(daemon) -> None:
    from .config import shared_rw_bind_warnings
    slots = daemon.id_slots
    for line in shared_rw_bind_warnings(daemon.config, slots is not None, slots and slots.clients_taken):
        _say(f"zygote serve: warning: {line}")


async def _reload_on_hup(daemon, args, sigs) -> None:
    from .config import ConfigError
    from ._pool import PoolStartError

    async for _ in sigs:
        sd_notify("RELOADING=1")
        try:
            changes = await daemon.reload(_config_from_args(args))
            _say(f"zygote serve: reloaded {args.config}: {'; '.join(changes) or 'no pool changed'}")
            _warn_shared_rw_binds(daemon)
        except (ConfigError, PoolStartError) as e:
            _say(f"zygote serve: reload refused, the old configuration stays: {e}")
        except Exception as e:  # noqa: BLE001 - a bug in reading the file must not end the daemon
            _say(f"zygote serve: reload failed ({type(e).__name__}: {e}), the old configuration stays")
        sd_notify("READY=1")


def _find(exc: BaseException, kind: type) -> BaseException | None:
    """The first ``kind`` in ``exc`` or, for an exception group, anywhere inside it."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _find(sub, kind)
            if found is not None:
                return found
    return None


async def _stop_on_signals(sigs, scope) -> None:
    async for _ in sigs:
        scope.cancel()
        return


def _is_stale_socket(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        s.close()
    raise SystemExit(f"zygote serve: {path} is in use by a running daemon")


def run(args) -> int:
    from zygote_client import Client, DaemonError, SandboxError, WorkspaceError, ZygoteError

    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp"}
    for item in args.env:
        k, sep, v = item.partition("=")
        if not sep or not k:
            print(f"zygote run: --env expects NAME=VALUE, got {item!r}", file=sys.stderr)
            return 2
        env[k] = v
    script = None
    if args.pyfile:
        try:
            with open(args.pyfile, "rb") as f:
                script = f.read()
        except OSError as e:
            print(f"zygote run: {args.pyfile}: {e.strerror}", file=sys.stderr)
            return 2
        argv = [args.pyfile, *argv]
    elif not argv:
        print("zygote run: nothing to run (use -- PROGRAM ARGS or --python FILE)", file=sys.stderr)
        return 2
    try:
        cfg = _sandbox_config(args)
    except (ValueError, WorkspaceError) as e:
        print(f"zygote run: {e}", file=sys.stderr)
        return 2
    if args.export and os.path.lexists(args.export):
        print(f"zygote run: --export {args.export}: already exists", file=sys.stderr)
        return 2
    sys.stdout.flush()
    terminal = _TerminalState((0, 1, 2))
    try:
        # (--allow goes on the embedded daemon's pool too: a request's list may only narrow it)
        daemon_args = (["--network"] + [f"--network-allow={a}" for a in cfg.network.allow]
                       if cfg.network is not None else [])
        with contextlib.closing(terminal), _SignalProxy() as proxy, \
                Client.embedded(preload_imports=args.preload, environment=env, daemon_args=daemon_args) as client:
            stdio, copiers = _stdio_for(cfg)
            try:
                child = client.spawn_child(_argv=argv, _script=script, _stdio_fds=stdio, env=env,
                                           timeout=args.timeout, sandbox_config=cfg)
            finally:
                for fd in stdio[1:]:
                    if fd > 2:
                        os.close(fd)
            proxy.started(child)
            try:
                status = child.wait()
            finally:
                proxy.finished()
            for t in copiers:
                t.join()
            if args.export:
                child.export(args.export)
    except _Interrupted as e:  # before the child was running, or after it ended
        return _end_by(e.signum)
    except WorkspaceError as e:
        print(f"zygote run: {e}", file=sys.stderr)
        return EXIT_SANDBOX
    except SandboxError as e:
        print(f"zygote run: {e}", file=sys.stderr)
        return EXIT_SANDBOX
    except (DaemonError, ZygoteError) as e:
        print(f"zygote run: {e}", file=sys.stderr)
        return EXIT_SANDBOX
    if status.timed_out:
        return EXIT_TIMEOUT
    rc = status.returncode
    if -rc in (signal.SIGINT, signal.SIGQUIT):
        return _end_by(-rc)
    return 128 - rc if rc < 0 else rc


def _end_by(signum: int) -> int:
    """End this process by ``signum``'s default action, as a program the signal ended does.

    A shell tells a command that Ctrl-C ended from one that caught it and chose to exit by how it
    ended, not by $? (128+N either way): bash ends a loop or a script only when the command died
    of SIGINT. So `zygote run` dies of it too (after the embedded daemon shut down: we are past
    it here), without a core dump for SIGQUIT. Returns 128+signum only if the signal did not end
    us (it is blocked in a way we could not undo)."""
    import resource
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    if signum == signal.SIGQUIT:  # no core: not RLIMIT_CORE 0 alone (a core_pattern pipe ignores it)
        try:
            resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
        except (OSError, ValueError):
            pass
        from .layers import _sys
        _sys.libc.prctl(_sys.PR_SET_DUMPABLE, 0, 0, 0, 0)
    try:
        signal.signal(signum, signal.SIG_DFL)
    except ValueError:  # not the main thread (main() called from another program's thread)
        return 128 + signum
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
    os.kill(os.getpid(), signum)
    return 128 + signum


# What a terminal sends its foreground process group (Ctrl-C, Ctrl-\, Ctrl-Z, a resize, a
# hangup), SIGTERM, and the shell's SIGCONT: `zygote run` is that group, its child is not (a
# session of its own, and the embedded daemon another), so it passes them on.
_PROXIED = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP, signal.SIGWINCH, signal.SIGTSTP,
            signal.SIGCONT)
_ENDING = frozenset({signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP})


class _Interrupted(BaseException):
    """A terminating signal while no child runs: `zygote run` ends by it (see _end_by)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _TerminalState:
    """The state of the terminal `zygote run` shares with its child, put back once the child ended.

    The child gets this process's own stdin (and, without max_output_bytes, its stdout and
    stderr): at a terminal, it shares their open file description and the terminal itself, and
    what it set there outlived it (a helper's review): O_NONBLOCK on the description (the shell's
    next read failed with EAGAIN), the termios modes (echo and line editing off), TIOCEXCL (nobody
    but root could open the terminal any more). Each is put back at ``close`` if it changed, as a
    shell does for a job it resumes; the modes only while we are the terminal's foreground (a
    background tcsetattr would stop us, or change a foreground job's terminal under it)."""

    TIOCGEXCL = 0x80045440  # _IOR('T', 0x40, int): whether TIOCEXCL is set (Linux ≥ 3.8)

    def __init__(self, fds) -> None:
        import fcntl
        import termios
        self.saved = []
        for fd in fds:
            try:
                if not os.isatty(fd):
                    continue
                self.saved.append((fd, fcntl.fcntl(fd, fcntl.F_GETFL), termios.tcgetattr(fd), self._exclusive(fd)))
            except (OSError, termios.error):
                continue

    def _exclusive(self, fd: int) -> bool | None:
        import fcntl
        try:
            return bool(int.from_bytes(fcntl.ioctl(fd, self.TIOCGEXCL, bytes(4)), sys.byteorder))
        except OSError:
            return None

    def close(self) -> None:
        import fcntl
        import termios
        for fd, flags, attrs, exclusive in self.saved:
            try:
                if fcntl.fcntl(fd, fcntl.F_GETFL) != flags:
                    fcntl.fcntl(fd, fcntl.F_SETFL, flags)
                if exclusive is False and self._exclusive(fd):
                    fcntl.ioctl(fd, termios.TIOCNXCL)
                if termios.tcgetattr(fd) != attrs:
                    try:
                        foreground = os.tcgetpgrp(fd) == os.getpgrp()
                    except OSError:  # not our controlling terminal: no job control to mind
                        foreground = True
                    if foreground:
                        termios.tcsetattr(fd, termios.TCSADRAIN, attrs)
            except (OSError, termios.error):
                continue


class _SignalProxy:
    """`zygote run`'s handlers of _PROXIED, while it runs; the old ones are put back after.

    While the child runs (``child`` set, no exit yet) each signal is forwarded to it with
    ``send_signal`` (the daemon's subprocess semantics: a payload that catches it gets it, one
    that does not dies of it or, for SIGTSTP, stops), and `zygote run` goes on waiting: it ends
    with the child's status (a payload that handles SIGINT decides itself whether Ctrl-C ends it).
    Before the child runs (before the daemon's word that it started has reached us: its payload
    may already have printed) and after it ended, SIGINT, SIGQUIT, SIGTERM and SIGHUP end `zygote
    run` (by that signal: _end_by) and no traceback (the daemon then kills a child being made). A SIGWINCH
    or SIGCONT that comes while the spawn is under way is kept and forwarded once the child is
    known (the payload may already run and have drawn for the old size: spawn_child returns after
    it started).

    SIGTSTP (Ctrl-Z): the child gets SIGTSTP (stopped unless it catches it), then `zygote run`
    stops itself with SIGTSTP's default action, so the shell sees a stopped job; the shell's
    SIGCONT (``fg``, ``bg``) is forwarded and resumes the child. When no job-control shell could
    resume us (our process group would be orphaned: our parent is not in our session in another
    group), Ctrl-Z is ignored, as the kernel ignores it for a program that does not catch it.
    """

    def __init__(self) -> None:
        self.child = None
        self._old: dict[int, object] = {}
        self._queue: list[int] = []  # to forward, in order (each once: pending signals merge)
        self._forwarding = False  # a forward is under way (its client call holds a lock)
        self._done = False  # see finished()

    def __enter__(self) -> "_SignalProxy":
        import threading
        if threading.current_thread() is threading.main_thread():  # (signal.signal works only there)
            for sig in _PROXIED:
                self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def started(self, child) -> None:
        """The child runs: forward what came before it was known."""
        self.child = child
        self._drain()

    def _drain(self) -> None:
        """Forward what is queued, unless a forward is under way: a handler runs on the main
        thread between two bytecodes of whatever it interrupted, and a forward started inside
        another would wait forever for the lock the first one's client call holds. The one under
        way forwards what was queued meanwhile."""
        while self._queue and not self._forwarding:  # (again: one may come after the inner check)
            self._forwarding = True
            try:
                while self._queue:
                    signum = self._queue.pop(0)
                    child = self._running()
                    if child is not None:
                        self._forward(child, signum)
            finally:
                self._forwarding = False

    def finished(self) -> None:
        """The child ended, or waiting for it failed: forward nothing more (the client may be
        closing, holding the lock a forward would wait for)."""
        self._done = True

    def _running(self):
        child = self.child
        return child if child is not None and child.returncode is None and not self._done else None

    def _on_signal(self, signum: int, _frame) -> None:
        if signum == signal.SIGTSTP:
            self._stop()
            return
        if self._running() is not None or (self.child is None and signum not in _ENDING):
            if signum not in self._queue:
                self._queue.append(signum)
            if self.child is not None:
                self._drain()
        elif signum in _ENDING:
            raise _Interrupted(signum)

    @staticmethod
    def _forward(child, signum: int) -> None:
        from zygote_client import ZygoteError
        try:
            child.send_signal(signum)
        except ZygoteError:
            pass  # the connection is gone: the child's wait() says so

    def _stop(self) -> None:
        if not _job_control():
            return
        if self._forwarding:
            return  # (in the middle of a forward, whose client call we would stop: press again)
        child = self._running()
        if child is not None:
            self._forwarding = True
            try:
                self._forward(child, signal.SIGTSTP)
            finally:
                self._forwarding = False
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        try:
            os.kill(os.getpid(), signal.SIGTSTP)  # stops us before kill() returns; SIGCONT resumes
        finally:
            signal.signal(signal.SIGTSTP, self._on_signal)


def _job_control() -> bool:
    """Whether a stop of our process group would be seen by a job-control shell (it is not
    orphaned, judged by our parent: in our session, in another group)."""
    ppid = os.getppid()
    try:
        return os.getsid(ppid) == os.getsid(0) and os.getpgid(ppid) != os.getpgrp()
    except OSError:
        return False


def _stdio_for(cfg) -> tuple[tuple[int, int, int], list]:
    """The three fds `zygote run` gives its child: its own 0, 1, 2, except that with
    max_output_bytes (the daemon then writes the counted output itself, and it writes only into
    pipes) a stdout or stderr that is not a pipe (a terminal, a file, a journal socket) gets a
    pipe copied into it here, by this process, with the caller's own rights."""
    import select
    import threading

    fds = [0, 1, 2]
    copiers = []
    if cfg.max_output_bytes is None:
        return (0, 1, 2), copiers
    from .policy import is_pipe
    for i in (1, 2):
        try:
            if is_pipe(i):
                continue
        except OSError:
            continue  # closed: the daemon refuses it with its own message
        r, w = os.pipe()

        def copy(r: int = r, out: int = i) -> None:
            try:
                while data := os.read(r, 65536):
                    while data:
                        try:
                            data = data[os.write(out, data):]
                        except BlockingIOError:  # a nonblocking stdout: wait until it takes more
                            p = select.poll()
                            p.register(out, select.POLLOUT)
                            p.poll()
            except OSError:
                pass  # our reader went away: closing r gives the child EPIPE through the daemon
            finally:
                os.close(r)
        t = threading.Thread(target=copy, daemon=True)
        t.start()
        copiers.append(t)
        fds[i] = w
    return (fds[0], fds[1], fds[2]), copiers


def _sandbox_config(args):
    from zygote_client import Export, NetworkConfig, SandboxConfig, Workspace
    from zygote_client._config import parse_size

    def binds(items):
        out = {}
        for item in items:
            src, _, dst = item.partition(":")
            out[os.path.abspath(src)] = dst or os.path.abspath(src)
        return out

    kw = dict(memory=args.memory, pids=args.pids, cpu=args.cpu, cpu_time=args.cpu_time, file_size=args.file_size,
              open_files=args.open_files, max_output_bytes=args.max_output, timeout_grace=args.timeout_grace,
              ro_binds=binds(args.ro_bind), rw_binds=binds(args.rw_bind), workdir=args.workdir,
              chroot_dir=os.path.abspath(args.chroot) if args.chroot else None, reaper=args.reaper or None)
    if args.seccomp_profile:
        kw["seccomp_profile"] = args.seccomp_profile
    if args.workspace:
        kw["workspace"] = Workspace.from_dir(args.workspace, allow=tuple(args.workspace_allow))
    if args.export:
        ex = {"on_exceed": "truncate" if args.export_truncate else "refuse"}
        if args.export_max:
            ex["max_bytes"] = parse_size(args.export_max, "--export-max")
        kw["export"] = Export(**ex)
    if args.allow and not args.network:
        raise ValueError("--allow needs --network")
    if args.network:
        kw["network"] = NetworkConfig(allow=tuple(args.allow))
    return SandboxConfig(**{k: v for k, v in kw.items() if v not in (None, {}, "")})


if __name__ == "__main__":
    raise SystemExit(main())
