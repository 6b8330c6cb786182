"""The ``zygote`` command: serve, run, doctor.

Exit statuses of ``zygote run`` follow the shell's conventions: the child's own code, 128+N when
signal N ended it, 124 when killed at its timeout, 125 when the sandbox could not be made,
127 when the program was not found (126 when it could not be executed).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys

EXIT_TIMEOUT = 124
EXIT_SANDBOX = 125


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the daemon")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", metavar="PATH", help="listen on this Unix socket path")
    where.add_argument("--inherit-fd", type=int, metavar="FD", help=argparse.SUPPRESS)
    p.add_argument("--python", default=sys.executable, help="the pool's interpreter (default: this one)")
    p.add_argument("--preload", action="append", default=[], metavar="MOD", help="import MOD in the zygote")
    p.add_argument("--child-main", metavar="MOD:FUNC", help="what children run when a request names no target")
    p.add_argument("--env-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--allow-uid", type=int, action="append", default=[], help="peer uid allowed to connect")
    p.add_argument("--test-hooks", action="store_true", help=argparse.SUPPRESS)
    n = p.add_argument_group("network (opt-in per child; needs CAP_NET_ADMIN and nftables)")
    n.add_argument("--network", action="store_true", help="let children ask for a veth (SandboxConfig.network)")
    n.add_argument("--network-allow", action="append", default=[], metavar="CIDR[:PORT]",
                   help="the pool's allow-list: children may reach only these (implies --network)")
    n.add_argument("--network-pool", metavar="CIDR", help="IPv4 network children's /30s come from (default 10.213.0.0/16)")
    n.add_argument("--network-dns", action="append", default=[], metavar="ADDR",
                   help="nameserver for children's resolv.conf (reachable on port 53)")
    n.add_argument("--network-masquerade", metavar="IFNAME", help="masquerade children's traffic out of this uplink")


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="run a program or a Python file in a confined child of an embedded zygote")
    p.add_argument("--preload", action="append", default=[], metavar="MOD")
    p.add_argument("--timeout", type=float, metavar="S", help="wall-clock limit in seconds (exit 124)")
    p.add_argument("--timeout-grace", type=float, metavar="S", help="SIGTERM this long before SIGKILL at the timeout")
    p.add_argument("--memory", metavar="SIZE", help="cgroup memory limit, e.g. 256M (swap 0)")
    p.add_argument("--pids", type=int, metavar="N", help="cgroup limit on processes+threads")
    p.add_argument("--cpu", type=float, metavar="CORES", help="CPU bandwidth in cores, e.g. 0.5")
    p.add_argument("--cpu-time", type=float, metavar="S", help="RLIMIT_CPU seconds")
    p.add_argument("--file-size", metavar="SIZE", help="RLIMIT_FSIZE")
    p.add_argument("--open-files", type=int, metavar="N", help="RLIMIT_NOFILE")
    p.add_argument("--max-output", metavar="SIZE", help="stdout+stderr bytes before the child is killed")
    p.add_argument("--ro-bind", action="append", default=[], metavar="SRC[:DST]", help="bind a host path read-only")
    p.add_argument("--rw-bind", action="append", default=[], metavar="SRC[:DST]", help="bind a host path read-write")
    p.add_argument("--chroot", metavar="DIR", help="use DIR as the child's root instead of the generated one")
    p.add_argument("--seccomp-profile", metavar="NAME", help="default, strict, or a JSON file")
    p.add_argument("--workdir", metavar="DIR", help="working directory inside the sandbox")
    p.add_argument("--python", dest="pyfile", metavar="FILE", help="run this Python file in a warm child")
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
    d = sub.add_parser("doctor", help="which confinement layers this host supports, and how to fix the rest")
    d.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        return serve(args)
    if args.cmd == "run":
        return run(args)
    if args.cmd == "doctor":
        from .doctor import main as doctor_main
        return doctor_main(json_out=args.json)
    return 2


def serve(args) -> int:
    import trio

    from zygote_client import NetworkConfig, SandboxConfig

    from ._pool import PoolConfig, PoolStartError, DEFAULT_ENV
    from .daemon import Daemon, DaemonConfig
    from .layers.network import DEFAULT_POOL, NetworkHost

    env = dict(DEFAULT_ENV)
    if args.env_fd is not None:
        with os.fdopen(args.env_fd) as f:
            data = f.read()
        if data:
            env = {str(k): str(v) for k, v in json.loads(data).items()}
    sandbox = SandboxConfig()
    try:
        if args.network or args.network_allow:
            sandbox = SandboxConfig(network=NetworkConfig(allow=tuple(args.network_allow)))
        NetworkHost(args.network_pool or DEFAULT_POOL, tuple(args.network_dns))  # validates, touches nothing
    except ValueError as e:
        print(f"zygote serve: {e}", file=sys.stderr)
        return 2
    pool = PoolConfig(python=args.python, preload=tuple(args.preload), env=env, child_main=args.child_main,
                      sandbox=sandbox)
    cfg = DaemonConfig(socket_path=args.socket, pools={"default": pool}, allowed_uids=tuple(args.allow_uid),
                       test_hooks=args.test_hooks, network_pool=args.network_pool or DEFAULT_POOL,
                       network_dns=tuple(args.network_dns), network_masquerade=args.network_masquerade)
    daemon = Daemon(cfg)
    listen = None
    if args.socket:
        listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        if os.path.exists(args.socket) and _is_stale_socket(args.socket):
            os.unlink(args.socket)
        old = os.umask(0o177)
        try:
            listen.bind(args.socket)
        finally:
            os.umask(old)
        os.chmod(args.socket, cfg.socket_mode)
        listen.listen(128)

    async def main_task() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(_stop_on_signals, n.cancel_scope)
            await daemon.run(listen_sock=listen, inherit_fd=args.inherit_fd)
            n.cancel_scope.cancel()

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
        if args.socket and listen is not None:
            listen.close()
            try:
                os.unlink(args.socket)
            except FileNotFoundError:
                pass
    return 0


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


async def _stop_on_signals(scope) -> None:
    import trio
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
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
    from zygote_client import Client, DaemonError, SandboxError, ZygoteError

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
    except ValueError as e:
        print(f"zygote run: {e}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    try:
        daemon_args = ["--network"] if cfg.network is not None else []
        with Client.embedded(preload_imports=args.preload, environment=env, daemon_args=daemon_args) as client:
            child = client.spawn_child(_argv=argv, _script=script, _stdio_fds=(0, 1, 2), env=env,
                                       timeout=args.timeout, sandbox_config=cfg)
            status = child.wait()
    except SandboxError as e:
        print(f"zygote run: {e}", file=sys.stderr)
        return EXIT_SANDBOX
    except (DaemonError, ZygoteError) as e:
        print(f"zygote run: {e}", file=sys.stderr)
        return EXIT_SANDBOX
    if status.timed_out:
        return EXIT_TIMEOUT
    rc = status.returncode
    return 128 - rc if rc < 0 else rc


def _sandbox_config(args):
    from zygote_client import NetworkConfig, SandboxConfig

    def binds(items):
        out = {}
        for item in items:
            src, _, dst = item.partition(":")
            out[os.path.abspath(src)] = dst or os.path.abspath(src)
        return out

    kw = dict(memory=args.memory, pids=args.pids, cpu=args.cpu, cpu_time=args.cpu_time, file_size=args.file_size,
              open_files=args.open_files, max_output_bytes=args.max_output, timeout_grace=args.timeout_grace,
              ro_binds=binds(args.ro_bind), rw_binds=binds(args.rw_bind), workdir=args.workdir,
              chroot_dir=os.path.abspath(args.chroot) if args.chroot else None)
    if args.seccomp_profile:
        kw["seccomp_profile"] = args.seccomp_profile
    if args.allow and not args.network:
        raise ValueError("--allow needs --network")
    if args.network:
        kw["network"] = NetworkConfig(allow=tuple(args.allow))
    return SandboxConfig(**{k: v for k, v in kw.items() if v not in (None, {}, "")})


if __name__ == "__main__":
    raise SystemExit(main())
