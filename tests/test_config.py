"""The TOML configuration, access lists, per-client limits, SIGHUP reload, systemd integration."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from zygote.config import ConfigError, load
from zygote_client import _protocol as P
from zygote_client import Client, DaemonError, SandboxConfig

from conftest import (_log, children_of, cmdline, wait_for, ACL_GROUP_OBJ, ACL_MASK, ACL_NO_ID, ACL_OTHER, ACL_USER, ACL_USER_OBJ, RawConn, config_daemon,
                      run_as, sandbox_children, set_acl, start_daemon, stop_daemon, wait_socket, write_text)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_load_example(tmp_path):
    cfg = load(write_text(tmp_path / "z.toml", f"""
        [daemon]
        socket = "/run/zg-test.sock"
        socket_mode = "0660"
        allowed_uids = [1000]
        allowed_gids = [1001]
        max_children = 10
        max_children_per_client = 2

        [pools.default]
        preload = ["json"]
        zygotes = 2

        [pools.default.sandbox]
        memory = "256M"
        pids = 32

        [pools.other]
        python = "{sys.executable}"
        env = {{ PATH = "/usr/bin" }}
        allow_callables = false
        child_main = "json:dumps"
        """), default_python=sys.executable)
    assert cfg.socket_path == "/run/zg-test.sock" and cfg.socket_mode == 0o660
    assert cfg.allowed_uids == (1000,) and cfg.allowed_gids == (1001,)
    assert cfg.max_children == 10 and cfg.max_children_per_client == 2
    assert cfg.pools["default"].preload == ("json",) and cfg.pools["default"].zygotes == 2
    assert cfg.pools["default"].sandbox.memory == "256M" and cfg.pools["default"].sandbox.pids == 32
    assert cfg.pools["other"].env == {"PATH": "/usr/bin"} and not cfg.pools["other"].allow_callables


@pytest.mark.parametrize("text, words", [
    ("[daemon]\nsockt = 'x'\n", ["sockt"]),
    ("[pools.default]\nzygotes = 'two'\n", ["zygotes"]),
    ("[pools.default]\nzygotes = 0\n", ["zygotes", "1..64"]),
    ("[pools.default.sandbox]\nmemory = 'lots'\n", ["memory"]),
    ("[pools.default.sandbox]\nmemroy = '1G'\n", ["memroy"]),
    ("[daemon]\nsocket_mode = '0666'\n", ["socket_mode", "others"]),
    ("[daemon]\nsocket_group = 'zg-no-such-group'\n", ["zg-no-such-group"]),
    ("[pools.default]\npython = 'python3'\n", ["python", "absolute"]),
    ("[pools.default]\nchild_main = 'nocolon'\n", ["child_main"]),
    ("[pools.default]\nreserve = 257\n", ["reserve", "0..256"]),
    ("[pools.default]\nreserve_network = 2\n", ["reserve_network", "network"]),
    ('[daemon]\nnetwork_pool = "10.213.0.0/29"\n[pools.default]\nreserve_network = 2\n'
     '[pools.default.sandbox.network]\n', ["reserve_network", "room for 2"]),
    ("[daemon\n", ["TOML"]),
])
def test_bad_config_names_the_key(tmp_path, text, words):
    path = write_text(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as e:
        load(path, default_python=sys.executable)
    for w in words:
        assert w in str(e.value), str(e.value)
    # and `zygote serve` refuses to start with it, exit 2, the same message
    r = subprocess.run([sys.executable, "-m", "zygote", "serve", "--config", path, "--socket", str(tmp_path / "s")],
                       capture_output=True, timeout=60)
    assert r.returncode == 2 and words[0].encode() in r.stderr, r.stderr


def test_reserve_network_flag_needs_network(tmp_path):
    sock = str(tmp_path / "s")
    r = subprocess.run([sys.executable, "-m", "zygote", "serve", "--socket", sock, "--reserve-network", "1"],
                       capture_output=True, timeout=60)
    assert r.returncode == 2 and b"reserve_network needs a pool that allows network" in r.stderr, r.stderr
    assert not os.path.exists(sock)


def _hello_as(uid: int, gid: int, sock_path: str, groups: tuple[int, ...] = ()) -> str:
    """As uid/gid: the daemon's first answer ("welcome" or "error:<code>"); after a welcome, what
    a Status shows this peer of the daemon's children. ``groups``: its supplementary groups."""
    def talk() -> str:
        c = RawConn(sock_path)
        c.send(c.P.Hello(c.P.VERSION))
        msg = c.reply()
        if not isinstance(msg, c.P.Welcome):
            return f"error:{getattr(msg, 'code', None)}"
        c.send(c.P.Status(1))
        st = c.reply()
        return f"welcome running={st.running} visible={len(st.children)}"
    return run_as(uid, gid, talk, groups)


def test_SECURITY_auth_unlisted_uid_refused_listed_uid_served(shared_dir):
    """The socket is reachable by group 4242 (mode 0660); only uid 4001 is listed: uid 4002 of the
    same group connects at the socket level and is refused by SO_PEERCRED."""
    with config_daemon(shared_dir, """
            socket_mode = "0660"
            socket_group = 4242
            allowed_uids = [4001]
            """) as sock:
        assert os.stat(sock).st_gid == 4242 and os.stat(sock).st_mode & 0o777 == 0o660
        with Client.connect(sock) as root_client:
            child = root_client.spawn_child(_sleeper(), stdin=None)
            # uid 4001 may use the daemon but does not see root's child in `status`
            assert _hello_as(4001, 4242, sock) == "welcome running=1 visible=0"
            assert len(root_client.status().children) == 1
            child.kill()
            child.wait()
        assert _hello_as(4002, 4242, sock) == "error:not-allowed"
        assert _hello_as(4003, 4343, sock).startswith("exception:PermissionError")  # not in the group


def test_SECURITY_an_id_the_daemon_gives_its_children_is_no_client(shared_dir):
    """A process running as one of the host ids the daemon gives its children is refused, even
    in an allowed group: it got that id from a sandbox (a set-ID file a child left on a host
    directory bound read-write, where no seccomp profile forbids making one) and would pass for
    a user of its own, with per-user budgets of its own (a helper's review: four such uids held
    the daemon's every place). Fails without the check: the range's uid is welcome."""
    with config_daemon(shared_dir, """
            socket_mode = "0660"
            socket_group = 4242
            allowed_uids = [4001]
            allowed_gids = [4242]
            """) as sock:
        with Client.connect(sock) as c:
            child = c.spawn_child(_sleeper(), stdin=None)
            try:
                with open(f"/proc/{child.pid}/status") as f:
                    host_uid = int(next(line for line in f if line.startswith("Uid:")).split()[1])
                assert host_uid >= 1_000_000_000  # (the payload's host uid, from the daemon's ranges)
                assert _hello_as(4001, 4242, sock).startswith("welcome")
                assert _hello_as(host_uid, 4242, sock) == "error:not-allowed"
                assert _hello_as(4001, host_uid - 65534, sock, (4242,)) == "error:not-allowed"  # (listed; a range's gid)
            finally:
                child.kill()
                child.wait()


def test_SECURITY_auth_clients_see_only_their_own_children(shared_dir):
    with config_daemon(shared_dir) as sock:
        with Client.connect(sock) as a:
            child = a.spawn_child(_sleeper(), stdin=None)
            with pytest.raises(DaemonError) as e:
                _raw_signal(sock, child.id)
            assert e.value.code == "unknown-child"
            assert child.poll() is None  # untouched by b
            child.kill()
            assert child.wait().returncode == -9


def _sleeper():
    def sleep():
        import time
        time.sleep(60)
    return sleep


def _raw_signal(sock_path: str, child_id: str) -> None:
    """Send a Signal for another connection's child over a fresh raw connection."""
    from zygote_client import _protocol as P
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    try:
        s.sendall(P.encode(P.Hello(P.VERSION), 0))
        dec = P.client_decoder()
        replies = []
        while len(replies) < 2:
            data = s.recv(1 << 16)
            assert data
            dec.feed(data, [])
            while (item := dec.next()) is not None:
                replies.append(item[0])
                if len(replies) == 1:
                    s.sendall(P.encode(P.Signal(7, child_id, signal.SIGKILL), 0))
        if isinstance(replies[1], P.Error):
            raise DaemonError(replies[1].message, code=replies[1].code)
    finally:
        s.close()


def test_max_children_per_client(shared_dir):
    with config_daemon(shared_dir, "max_children_per_client = 2\n") as sock:
        with Client.connect(sock) as a, Client.connect(sock) as b:
            kids = [a.spawn_child(_sleeper(), stdin=None) for _ in range(2)]
            with pytest.raises(DaemonError) as e:
                a.spawn_child(_sleeper(), stdin=None)
            assert e.value.code == "limit" and "per-client" in str(e.value)
            assert b.run(print, ("b",)).stdout == b"b\n"  # another client is not affected
            for k in kids:
                k.kill()
                k.wait()


def _bound(path: str) -> None:
    """Until the socket file exists: bound, a client's connect would wait in its backlog."""
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        assert time.monotonic() < deadline, "no socket"
        time.sleep(0.001)


def test_a_sighup_while_the_pools_start_reloads_once_they_have(tmp_path):
    """A SIGHUP to a --config daemon whose socket is bound while its pool still preloads pandas
    reloads once the pools are up (it killed the daemon: SIGHUP's default action, -1)."""
    sock = str(tmp_path / "z.sock")
    cfg = write_text(tmp_path / "z.toml", f'[daemon]\nsocket = "{sock}"\n[pools.default]\npreload = ["pandas"]\n')
    proc = start_daemon("--config", cfg)
    try:
        _bound(sock)
        proc.send_signal(signal.SIGHUP)
        wait_socket(sock, proc)
        with Client.connect(sock) as c:
            assert c.run(print, ("up",)).stdout == b"up\n"
        wait_for(lambda: b"reloaded" in _log(proc), what="the reload's log line")
    finally:
        stop_daemon(proc)


def _started_with(dispositions: dict, *args: str):
    """start_daemon(*args) with these signal dispositions of ours at its exec (a handler of ours
    becomes SIG_DFL there; SIG_IGN stays): a run of the suite from a script's background job has
    SIGINT ignored, which the daemon would inherit."""
    old = {sig: signal.signal(sig, how) for sig, how in dispositions.items()}
    try:
        return start_daemon(*args)
    finally:
        for sig, how in old.items():
            signal.signal(sig, how)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_as_the_socket_is_bound_stops_the_daemon_cleanly(tmp_path, sig):
    """SIGTERM, SIGINT or SIGHUP (no --config: it stops the daemon) the moment the socket file
    exists: exit status 0 and no socket file left (the signal's default action ended it, -15 in
    3 of 3 runs, before trio's handlers were in place)."""
    sock = str(tmp_path / "z.sock")
    proc = _started_with({sig: signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL},
                         "--socket", sock)
    try:
        _bound(sock)
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0, _log(proc)
        assert not os.path.exists(sock)
    finally:
        if proc.poll() is None:
            stop_daemon(proc)


def test_a_sighup_still_queued_at_the_stop_does_not_end_the_daemon_by_itself(tmp_path):
    """SIGHUP then SIGTERM while a --config daemon's pool preloads pandas: the SIGHUP waits for a
    reload that never comes; the daemon stops cleanly, exit 0 and its socket file removed (the
    receiver raised the SIGHUP again as it closed, after SIGHUP's default action was back: the
    daemon ended by it, -1, its socket file left; found by a helper's review)."""
    sock = str(tmp_path / "z.sock")
    cfg = write_text(tmp_path / "z.toml", f'[daemon]\nsocket = "{sock}"\n[pools.default]\npreload = ["pandas"]\n')
    proc = _started_with({signal.SIGHUP: signal.SIG_DFL}, "--config", cfg)
    try:
        _bound(sock)
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, _log(proc)
        assert not os.path.exists(sock)
    finally:
        if proc.poll() is None:
            stop_daemon(proc)


def test_sigint_and_sighup_ignored_at_start_stay_ignored(tmp_path):
    """A daemon started with SIGINT and SIGHUP ignored (a script's background job, nohup) keeps
    ignoring them, before and after it is ready, as such jobs do; SIGTERM still stops it. (An
    early SIGINT was lost anyway: trio re-sets SIGINT's disposition at its start, which discards
    a pending one when it is SIG_IGN.)"""
    sock = str(tmp_path / "z.sock")
    proc = _started_with({signal.SIGINT: signal.SIG_IGN, signal.SIGHUP: signal.SIG_IGN}, "--socket", sock)
    try:
        _bound(sock)
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGHUP)
        wait_socket(sock, proc)
        with Client.connect(sock) as c:
            proc.send_signal(signal.SIGINT)
            proc.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            assert proc.poll() is None
            assert c.run(print, ("up",)).stdout == b"up\n"
    finally:
        stop_daemon(proc)


def test_sighup_reload_keeps_running_children(shared_dir):
    sock = os.path.join(shared_dir, "z.sock")
    cfg = os.path.join(shared_dir, "z.toml")
    write_text(cfg, f'[daemon]\nsocket = "{sock}"\n[pools.default]\npreload = ["json"]\n')
    proc = start_daemon("--config", cfg)
    try:
        wait_socket(sock, proc)
        with Client.connect(sock) as c:
            def slow():
                import sys, time
                print("before", flush=True)
                time.sleep(3)
                print("after", "colorsys" in sys.modules)
            child = c.spawn_child(slow, stdin=None)
            assert child.stdout.readline() == b"before\n"
            write_text(cfg, f'[daemon]\nsocket = "{sock}"\n[pools.default]\npreload = ["json", "colorsys"]\n'
                        '[pools.extra]\npreload = ["colorsys"]\n')
            os.kill(proc.pid, signal.SIGHUP)
            assert child.stdout.read() == b"after False\n"  # the old child ran on, from the old zygote
            assert child.wait().returncode == 0

        def has_colorsys():
            import sys
            print("colorsys" in sys.modules)
        deadline = time.monotonic() + 60
        while True:  # the reload finishes in the background
            with Client.connect(sock) as c:
                if "extra" in c.welcome.pools:
                    assert c.spawn_child(has_colorsys, stdin=None, pool="extra").stdout.read() == b"True\n"
                    assert c.spawn_child(has_colorsys, stdin=None).stdout.read() == b"True\n"
                    break
            assert time.monotonic() < deadline, "reload did not happen"
            time.sleep(0.2)
        # a broken file is refused and the daemon keeps serving with what it had
        write_text(cfg, "[pools.default]\nzygotes = 'many'\n")
        os.kill(proc.pid, signal.SIGHUP)
        time.sleep(0.5)
        with Client.connect(sock) as c:
            assert "extra" in c.welcome.pools and c.run(print, ("ok",)).stdout == b"ok\n"
    finally:
        err = stop_daemon(proc)
    assert b"reloaded" in err and b"reload refused" in err, err


def test_systemd_socket_activation_and_notify(tmp_path):
    """A socket passed as fd 3 with LISTEN_PID/LISTEN_FDS is served; READY=1 arrives on
    NOTIFY_SOCKET only after the zygote has preloaded, STOPPING=1 at SIGTERM."""
    path = str(tmp_path / "act.sock")
    listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listen.bind(path)
    listen.listen(8)
    notify_path = str(tmp_path / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(60)
    fd = listen.fileno()
    script = (f"export LISTEN_PID=$$ LISTEN_FDS=1 NOTIFY_SOCKET={notify_path}; exec 3<&{fd}; "
              f"exec {sys.executable} -m zygote serve --preload json")
    proc = subprocess.Popen(["bash", "-c", script], pass_fds=[fd], stderr=subprocess.PIPE)
    listen.close()
    try:
        assert notify.recv(64) == b"READY=1"
        with Client.connect(path) as c:
            assert c.run(print, ("activated",)).stdout == b"activated\n"
    finally:
        stop_daemon(proc)
    assert notify.recv(64) == b"STOPPING=1"
    notify.close()
    assert os.path.exists(path), "the daemon removed a socket systemd owns"


def test_systemd_units_name_the_daemon():
    import configparser
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read([os.path.join(REPO, "systemd", "zygote.service"), os.path.join(REPO, "systemd", "zygote.socket")])
    assert unit["Service"]["Type"] == "notify" and "zygote serve" in unit["Service"]["ExecStart"]
    assert unit["Service"]["Delegate"] == "yes"
    assert unit["Socket"]["ListenStream"].endswith(".sock")


def _spawns_as(uid: int, gid: int, sock_path: str, plan: list[int]) -> list[str]:
    """As uid/gid: open len(plan) connections and send plan[i] sleeping spawns on connection i,
    one after another; the answers' types (and codes), in order."""
    import pickle

    def talk() -> str:
        out, conns = [], []
        for n in plan:
            c = RawConn(sock_path)
            conns.append(c)  # kept open: closing one would kill its children
            c.send(c.P.Hello(c.P.VERSION))
            c.reply()
            for i in range(1, n + 1):
                c.send(c.P.Spawn(req=i, kind="target", target="time:sleep", payload=pickle.dumps(((30,), {})),
                                 stdin=False))
                m = c.reply()
                out.append(f"{type(m).__name__}:{getattr(m, 'code', '')}")
        return ",".join(out)
    return run_as(uid, gid, talk).split(",")


def test_SECURITY_per_client_cap_counts_a_uid_over_its_connections(shared_dir):
    """max_children_per_client is per peer uid: a second connection of the same uid buys no more."""
    with config_daemon(shared_dir, """
            socket_mode = "0660"
            socket_group = 4242
            allowed_uids = [4001]
            max_children_per_client = 2
            """) as sock:
        got = _spawns_as(4001, 4242, sock, [2, 1])
        assert got == ["Spawned:", "Spawned:", "SpawnFailed:limit"], got


def test_pool_reaper_holds_for_every_request(tmp_path):
    """A pool with ``reaper = true`` (say, one that runs shells) puts a reaper in front of every
    payload, also of requests that pass their own SandboxConfig, and its reserve children too."""
    with config_daemon(tmp_path, """
            [pools.default]
            reserve = 1
            [pools.default.sandbox]
            reaper = true
            """) as sock, Client.connect(sock) as c:
        def where():
            import os
            print(os.getpid(), sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
        for sandbox in (None, SandboxConfig(), SandboxConfig(reaper=False), SandboxConfig(memory="64M")):
            r = c.run(where, sandbox_config=sandbox)
            assert r.stdout == b"2 [1, 2]\n", (sandbox, r.stdout, r.stderr)


def test_SECURITY_connections_per_uid_are_capped(shared_dir):
    """A user cannot hold more than max_connections_per_client connections open (each costs the
    daemon a socket, a task and buffers): the next one gets Error(limit) and is closed; once one
    closes, a new one is served. Another uid is not affected."""
    with config_daemon(shared_dir, """
            socket_mode = "0660"
            socket_group = 4242
            allowed_uids = [4001, 4002]
            max_connections_per_client = 2
            """) as sock:
        def talk() -> str:
            out, conns = [], []
            for i in range(3):
                c = RawConn(sock)
                conns.append(c)
                if i < 2:  # (the refused one is answered at once: a hello it never reads would
                    c.send(c.P.Hello(c.P.VERSION))  # turn its close into a reset)
                m = c.reply()
                out.append(f"{type(m).__name__}:{getattr(m, 'code', '')}")
            out.append(str(conns[2].reply()))  # the refused one is closed: EOF
            conns[0].sock.close()
            time.sleep(0.5)
            c = RawConn(sock)
            c.send(c.P.Hello(c.P.VERSION))
            out.append(type(c.reply()).__name__)
            return ",".join(out)

        assert run_as(4001, 4242, talk).split(",") == ["Welcome:", "Welcome:", "Error:limit", "None", "Welcome"]

        def other() -> str:  # while 4001 still holds two
            c = RawConn(sock)
            c.send(c.P.Hello(c.P.VERSION))
            return type(c.reply()).__name__
        assert run_as(4002, 4242, other) == "Welcome"


def _sleep_request(req: int, detached: bool = True):
    return P.Spawn(req=req, kind="exec", argv=["/bin/sh", "-c", "exec sleep 60"], stdin=False, detached=detached)


def _replies(c, n: int) -> list:
    """The next ``n`` replies on RawConn ``c``, Exited messages skipped."""
    out = []
    while len(out) < n:
        m = c.reply()
        if not isinstance(m, P.Exited):
            out.append(m)
    return out


def _tags(msgs) -> list[str]:
    return [f"{type(m).__name__}:{getattr(m, 'code', '')}" for m in msgs]


def _hello(sock: str) -> RawConn:
    c = RawConn(sock)
    c.send(c.P.Hello(c.P.VERSION))
    c.reply()
    return c


def test_SECURITY_one_user_cannot_take_every_child_slot_by_default(shared_dir):
    """max_children_per_client unset: a peer other than root may run a quarter of max_children
    (here 2 of 8) over all its connections, so one local user cannot lock every other user, and
    the administrator, out of the daemon. Another uid and root are not affected."""
    with config_daemon(shared_dir, """
            socket_mode = "0660"
            socket_group = 4242
            allowed_uids = [4001, 4002]
            max_children = 8
            """) as sock:
        def burst() -> str:  # two connections, three requests before any reply, then one more
            first, second = _hello(sock), _hello(sock)
            for req in (1, 2, 3):
                first.send(_sleep_request(req))  # (detached: they outlive these connections)
            got = sorted(_tags(_replies(first, 3)), reverse=True)
            second.send(_sleep_request(4, detached=False))
            return ",".join(got + _tags(_replies(second, 1)))

        assert run_as(4001, 4242, burst).split(",") == [
            "Spawned:", "Spawned:", "SpawnFailed:limit", "SpawnFailed:limit"]

        def one() -> str:
            c = _hello(sock)
            c.send(_sleep_request(1, detached=False))
            return _tags(_replies(c, 1))[0]
        assert run_as(4001, 4242, one) == "SpawnFailed:limit"  # (its two detached ones still run)
        assert run_as(4002, 4242, one) == "Spawned:"
        with Client.connect(sock) as root:  # root: no default cap (only max_children)
            kids = [root.spawn_child(time.sleep, (60,), stdin=None) for _ in range(5)]
            for ch in kids:
                ch.kill()
                ch.wait()


def test_SECURITY_detached_children_per_uid_are_capped(shared_dir):
    """Detached children outlive their connection and each keeps up to two output buffers in the
    daemon: one user may run max_detached_per_client of them at once, however many connections
    it spreads them over (a burst sent without waiting for replies included); the next is refused
    with Error(limit) while plain children still run; once one ends, a new one is accepted.
    Another uid is not affected."""
    with config_daemon(shared_dir, """
            socket_mode = "0660"
            socket_group = 4242
            allowed_uids = [4001, 4002]
            max_detached_per_client = 2
            """) as sock:
        spawn, replies, tags = _sleep_request, _replies, _tags

        def talk() -> str:
            out = []
            first, second = RawConn(sock), RawConn(sock)
            for c in (first, second):
                c.send(c.P.Hello(c.P.VERSION))
                c.reply()
            for req in (1, 2, 3):  # a burst: no reply read in between
                first.send(spawn(req))
            got = sorted(replies(first, 3), key=lambda m: m.req)  # (answered in any order)
            out += sorted(tags(got), reverse=True)
            second.send(spawn(4))  # another connection of the same user
            second.send(spawn(5, detached=False))
            out += tags(sorted(replies(second, 2), key=lambda m: m.req))
            live = [m.child for m in got if isinstance(m, P.Spawned)]
            first.send(P.Signal(req=6, child=live[0], signum=9))
            out += tags(replies(first, 1))
            for _ in range(100):  # the killed one is reaped soon after
                time.sleep(0.1)
                second.send(spawn(7))
                m = replies(second, 1)[0]
                if isinstance(m, P.Spawned):
                    break
            out.append(type(m).__name__)
            return ",".join(out)

        assert run_as(4001, 4242, talk).split(",") == [
            "Spawned:", "Spawned:", "SpawnFailed:limit",  # the burst: two of three
            "SpawnFailed:limit", "Spawned:",  # the other connection: no detached one, a plain one
            "Ok:", "Spawned"]

        def other() -> str:  # while 4001 holds two
            c = RawConn(sock)
            c.send(c.P.Hello(c.P.VERSION))
            c.reply()
            c.send(spawn(1))
            return type(c.reply()).__name__
        assert run_as(4002, 4242, other) == "Spawned"  # (the daemon's SIGTERM ends them all)


@pytest.mark.parametrize("path", ["/tmp/./x", "/tmp//x", "//tmp", "/tmp/../etc", "/" + "a" * 5000])
def test_paths_in_a_sandbox_config_are_plain(path):
    """Bind sources, destinations, chroot_dir and workdir are absolute, without '.', '..' or
    empty components, under PATH_MAX (the daemon resolves some of them on the host)."""
    from zygote_client import SandboxConfig
    with pytest.raises(ValueError):
        SandboxConfig(ro_binds={path: "/x"})
    with pytest.raises(ValueError):
        SandboxConfig(workdir=path)
    assert SandboxConfig(ro_binds={"/tmp/": "/x"}, workdir="/")  # one trailing '/', and the root, are fine


class _Gadget:
    """Pickles as a call of print: what a pickled argument can make the unpickler do."""

    def __reduce__(self):
        return (print, ("gadget ran",))


def test_SECURITY_a_pool_without_callables_runs_only_its_own_code(tmp_path):
    """allow_callables = false: the pool runs its child_main and its allowed_targets, with
    arguments decoded as plain data. Scripts, programs, other targets (builtins:exec would run
    any source) and pickled objects (whose reduce can call anything) are refused."""
    from zygote_client import DaemonError, RemoteError
    with config_daemon(tmp_path, """
            [pools.default]
            allow_callables = false
            child_main = "builtins:print"
            allowed_targets = ["json:dumps"]
            """) as sock, Client.connect(sock) as c:
        r = c.run(None, ("hello", [1, 2.5, None, {"k": (b"x", True)}]))
        assert r.returncode == 0 and r.stdout == b"hello [1, 2.5, None, {'k': (b'x', True)}]\n", r
        assert c.run("json:dumps", ([1],)).value == "[1]"
        for how, call in [("callables", lambda: c.run(print)),
                          ("not in its allowed_targets", lambda: c.run("builtins:exec", ("print('ran')",))),
                          ("scripts", lambda: c.spawn_child(None, _argv=["-"], _script=b"print('ran')")),
                          ("programs", lambda: c.spawn_child(None, _argv=["/bin/echo", "ran"], stdin=None))]:
            with pytest.raises(DaemonError, match=how):
                call()
        with pytest.raises(DaemonError, match="env_allow"):  # PATH into a workspace, LD_PRELOAD, ...
            c.run(None, ("x",), env={"PATH": "/workspace/bin:/usr/bin:/bin"})
        r = c.run(None, ("same env",), env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
                                             "HOME": "/tmp"})
        assert r.stdout == b"same env\n", r  # the pool's own values are fine
        for args in [(_Gadget(),), (), ]:
            kwargs = {"x": _Gadget()} if not args else {}
            r = c.run(None, args, kwargs=kwargs)
            assert b"gadget ran" not in r.stdout and r.returncode != 0, r
            assert b"plain data" in r.stderr, r.stderr
            with pytest.raises(RemoteError, match="plain data"):
                r.value


def test_allowed_targets_must_name_functions(tmp_path):
    with pytest.raises(ConfigError, match="allowed_targets must be 'module:function'"):
        load(write_text(tmp_path / "z.toml", '[pools.default]\nallowed_targets = ["json"]\n'), default_python=sys.executable)


def test_SECURITY_data_only_arguments_refuse_extension_codes():
    """copyreg extension codes already in its cache are pushed without find_class: a pool that
    registers some (a preload) must not turn an EXT opcode into a callable."""
    import copyreg
    import pickle

    from zygote import child
    from zygote._childproto import ChildPlan
    copyreg.add_extension("posix", "system", 240)
    try:
        pickle.loads(b"\x80\x02\x82\xf0.")  # now in copyreg's cache
        plan = ChildPlan(kind="target", target="json:dumps", data_args=True,
                         payload=b"\x80\x02\x82\xf0)\x86}\x86.")  # ((system,), {}) via EXT1 240
        with pytest.raises(pickle.UnpicklingError, match="EXT1"):
            child._load(plan)
        ok = ChildPlan(kind="target", target="json:dumps", data_args=True,
                       payload=pickle.dumps((([1, {2}, frozenset([3]), bytearray(b"x")],), {"k": None}), protocol=5))
        assert child._load(ok)[1:] == (([1, {2}, frozenset([3]), bytearray(b"x")],), {"k": None})
    finally:
        copyreg.remove_extension("posix", "system", 240)
        copyreg.clear_extension_cache()


def _daemon_for_4001(shared_dir: str, *args: str, more: str = ""):
    """A daemon in its own process that uid 4001 (through group 4242) may use: (socket, process).
    ``more``: further lines of its configuration file, after its [daemon] section."""
    sock = os.path.join(shared_dir, "z.sock")
    cfg = write_text(os.path.join(shared_dir, "z.toml"), f"""
        [daemon]
        socket = "{sock}"
        socket_mode = "0660"
        socket_group = 4242
        allowed_uids = [4001]
        """ + more)
    return sock, start_daemon("--config", cfg, *args)


def _spawn_answer(sock: str, argv: list[str], ro_binds: dict, **sandbox) -> str:
    """Over a fresh raw connection (as whoever calls it): one exec Spawn with these read-only
    binds (and ``sandbox``: more SandboxConfig fields); the daemon's answer as "Kind:code:message"."""
    c = RawConn(sock)
    c.send(c.P.Hello(c.P.VERSION))
    c.reply()
    c.send(c.P.Spawn(req=1, kind="exec", argv=argv, stdin=False,
                     sandbox=SandboxConfig(ro_binds=ro_binds, **sandbox)))
    m = c.reply()
    return f"{type(m).__name__}:{getattr(m, 'code', '')}:{getattr(m, 'message', '')}"


def test_SECURITY_a_nested_bind_target_tells_nothing_of_a_directory_the_client_cannot_search(shared_dir):
    """A bind target inside another bind must exist there already; the daemon looked as root, so
    uid 4001 learnt whether names exist in a directory it may not search (a helper's review: a
    missing name was refused at once, an existing one failed later in the child). Now the client
    must reach that path itself, and both get the same answer. Fails on the previous daemon: the
    answers differ."""
    hidden = os.path.join(shared_dir, "zgvic")
    os.mkdir(hidden, 0o700)
    os.chown(hidden, 4002, 4002)
    with open(os.path.join(hidden, "exists"), "w") as f:
        f.write("x")
    os.chown(os.path.join(hidden, "exists"), 4002, 4002)
    mine = os.path.join(shared_dir, "mine")
    os.mkdir(mine)
    with open(os.path.join(mine, "seen"), "w"):
        pass

    locked = os.path.join(shared_dir, "locked")
    os.mkdir(locked, 0o700)  # (root's: 4001 sees that it exists, may not look inside)
    pub = os.path.join(shared_dir, "pub")
    os.mkdir(pub)
    os.chmod(pub, 0o777)
    os.mkdir(os.path.join(pub, "zgvic"), 0o700)
    os.chown(os.path.join(pub, "zgvic"), 4002, 4002)
    with open(os.path.join(pub, "zgvic", "exists"), "w"):
        pass
    sock, proc = _daemon_for_4001(shared_dir)

    def spawn(binds: dict, **sandbox):
        return lambda: _spawn_answer(sock, ["/bin/cat", "/x/mine/seen"], binds, **sandbox)

    def same_answer(make) -> str:
        answers = [run_as(4001, 4242, make(name)) for name in ("exists", "missing")]
        assert answers[0].startswith("SpawnFailed:policy:") and "must already exist" in answers[0], answers
        assert answers[0].replace("exists", "missing") == answers[1], answers
        return answers[0]

    try:
        wait_socket(sock, proc)
        same_answer(lambda name: spawn({shared_dir: "/x", "/etc/hostname": f"/x/zgvic/{name}"}))
        # Inside a chroot_dir the request names, and with its source bound both read-only and
        # read-write (the second review: neither was taken for an enclosing layer).
        same_answer(lambda name: spawn({"/etc/hostname": f"/zgvic/{name}"}, chroot_dir=shared_dir))
        same_answer(lambda name: spawn({pub: "/x", "/etc/hostname": f"/x/zgvic/{name}"}, rw_binds={pub: "/y"}))
        # A nested target the client can see works; so does one over a directory it may not
        # read, as long as it can see that it is there (the first version refused it).
        out = run_as(4001, 4242, spawn({shared_dir: "/x", "/etc/hostname": "/x/mine/seen"}))
        assert out.startswith("Spawned:"), out
        out = run_as(4001, 4242, spawn({shared_dir: "/x", mine: "/x/locked"}))
        assert out.startswith("Spawned:"), out
    finally:
        stop_daemon(proc)


def test_SECURITY_a_client_s_bind_is_checked_as_the_client_itself(shared_dir):
    """End to end, through the socket: a file whose mode bits let everyone read it but whose ACL
    denies uid 4001 is refused to uid 4001 (mode bits alone had let it through); a file only
    group 4300 may read is bound for uid 4001 when 4300 is one of its supplementary groups
    (SO_PEERGROUPS), which the mode-bit guess had refused."""
    denied = os.path.join(shared_dir, "denied")
    grouped = os.path.join(shared_dir, "grouped")
    for path in (denied, grouped):
        with open(path, "w") as f:
            f.write(os.path.basename(path))
    os.chmod(denied, 0o644)
    set_acl(denied, (ACL_USER_OBJ, 6, ACL_NO_ID), (ACL_USER, 0, 4001), (ACL_GROUP_OBJ, 4, ACL_NO_ID),
            (ACL_MASK, 4, ACL_NO_ID), (ACL_OTHER, 4, ACL_NO_ID))
    os.chmod(grouped, 0o640)
    os.chown(grouped, 0, 4300)
    sock, proc = _daemon_for_4001(shared_dir)

    def spawn(path: str):
        return lambda: _spawn_answer(sock, ["/bin/true"], {path: "/f"})

    try:
        wait_socket(sock, proc)
        out = run_as(4001, 4242, spawn(denied), groups=(4300,))
        assert out.startswith("SpawnFailed:policy:") and "may not read" in out, out
        assert run_as(4001, 4242, spawn(grouped), groups=(4300,)).startswith("Spawned:"), "its group's file"
        out = run_as(4001, 4242, spawn(grouped))  # (without the group: refused)
        assert out.startswith("SpawnFailed:policy:") and "may not read" in out, out
    finally:
        stop_daemon(proc)


@pytest.mark.parametrize("idmap", [True, False], ids=["idmapped", "child_walk"])
def test_SECURITY_a_bind_source_swapped_after_the_check_is_not_bound(shared_dir, tmp_path, monkeypatch, idmap):
    """A client (uid 4001) names a file in its own directory; the daemon checks it may read it;
    before the child opens it (held there by a test hook) the client renames a root-only
    directory beside it into its place. The child must not bind what the path leads to now
    (it walks with the daemon's rights). The daemon's idmapped copy of the source was made
    before the clone, from the file checked: the child binds that one. Without the idmap (a
    file system that has none; here a test hook) the child opens the path itself: the spawn
    fails, naming the mounts step."""
    import threading

    mine = os.path.join(shared_dir, "mine")
    os.makedirs(os.path.join(mine, "a"))
    os.mkdir(os.path.join(mine, "private"), 0o700)
    for d, text in (("a", "mine"), ("private", "root's")):
        with open(os.path.join(mine, d, "f"), "w") as out:
            out.write(text)
        os.chmod(os.path.join(mine, d, "f"), 0o644)
    for d in (mine, os.path.join(mine, "a"), os.path.join(mine, "a", "f")):
        os.chown(d, 4001, 4242)
    go = tmp_path / "go"
    monkeypatch.setenv("ZYGOTE_TEST_PAUSE_BEFORE_SOURCES", str(go))
    if not idmap:
        monkeypatch.setenv("ZYGOTE_TEST_NO_IDMAP", "1")
    sock, proc = _daemon_for_4001(shared_dir, "--test-hooks")

    def swap() -> None:
        # The request was checked (before the clone), its child waits before opening its sources.
        _until_held_before_sources(proc)
        os.rename(os.path.join(mine, "a"), os.path.join(mine, "old"))
        os.rename(os.path.join(mine, "private"), os.path.join(mine, "a"))
        go.write_text("")

    def spawn() -> str:
        c = RawConn(sock)
        c.send(c.P.Hello(c.P.VERSION))
        c.reply()
        c.send(c.P.Spawn(req=1, kind="exec", argv=["/bin/cat", "/f"], stdin=False,
                         sandbox=SandboxConfig(ro_binds={os.path.join(mine, "a", "f"): "/f"})))
        fds: list[int] = []
        m = c.reply(keep=fds)
        return f"{type(m).__name__}:{getattr(m, 'step', '')}:{getattr(m, 'message', '')}:{_read_all(fds)}"

    try:
        wait_socket(sock, proc)
        t = threading.Thread(target=swap)
        t.start()
        try:
            out = run_as(4001, 4242, spawn)
        finally:
            t.join()
        if idmap:
            assert out == "Spawned:::mine", out
        else:
            assert out.startswith("SpawnFailed:mounts:") and "not what the daemon checked" in out, out
    finally:
        stop_daemon(proc)


def _read_all(fds: list[int]) -> str:
    """What a spawned child's stdout (fds[0]) holds until EOF; every fd closed."""
    out = b""
    try:
        while fds and (chunk := os.read(fds[0], 65536)):
            out += chunk
    finally:
        for fd in fds:
            os.close(fd)
    return out.decode(errors="replace")


def _mine_and_secret(shared_dir: str, mode: int = 0o700) -> tuple[str, str]:
    """uid 4001's directory (``mode``, 4001:4242) with sub/h in it, and its 0700 directory
    holding s, a 0600 file only it may read."""
    mine, sec = os.path.join(shared_dir, "mine"), os.path.join(shared_dir, "sec")
    for d in (mine, os.path.join(mine, "sub"), sec):
        os.mkdir(d)
        os.chown(d, 4001, 4242)
        os.chmod(d, mode if d == mine else 0o700)
    for path, text in ((os.path.join(mine, "sub", "h"), ""), (os.path.join(sec, "s"), "s3cret")):
        with open(path, "w") as f:
            f.write(text)
        os.chown(path, 4001, 4242)
        os.chmod(path, 0o600)
    return mine, sec


def _spawn_exec_as_4001(sock: str, script: str, between=None, uid: int = 4001, **sandbox) -> str:
    """As uid 4001 (or ``uid``; group 4242): one `sh -c script` child; its stdout up to a line
    "ready", what ``between()`` returns then (while the child waits for its stdin to close), and
    the rest. Returns once the daemon reported the child's exit (with ``max_children = 1`` the
    next spawn could come before the daemon had reaped it, and be refused)."""
    def talk() -> str:
        c = RawConn(sock)
        c.send(c.P.Hello(c.P.VERSION, client="test sandbox-inherits"))  # (the pool's fields where unset)
        c.reply()
        c.send(c.P.Spawn(req=1, kind="exec", argv=["/bin/sh", "-c", script], stdin=True,
                         sandbox=SandboxConfig(**sandbox)))
        fds: list[int] = []
        m = c.reply(keep=fds)
        if type(m).__name__ != "Spawned":
            return f"{type(m).__name__}:{getattr(m, 'message', '')}"
        stdin, rest = fds[0], fds[1:]
        out = b""
        while b"ready\n" not in out and (chunk := os.read(rest[0], 65536)):
            out += chunk
        seen = between() if between is not None else ""
        os.close(stdin)
        out = out.decode() + seen + _read_all(rest)
        while (m := c.reply()) is not None and type(m).__name__ != "Exited":
            pass
        return out
    return run_as(uid, 4242, talk)


def test_a_client_s_own_binds_act_as_the_client(shared_dir):
    """A non-root client's bind sources are bound through an idmapped mount in which the child's
    ids and the client's swap places: the child reads the client's 0600 file (ro), writes in its
    0700 directory (rw), and what it makes there is the client's (4001:4242) on the host, not a
    host id of the child's range (which another client's child gets later). The copy is
    private: a bind the child makes inside it (a nested target) never shows on the host. Fails
    on the previous daemon (the child, a uid of its own range, could neither read nor write)."""
    mine, sec = _mine_and_secret(shared_dir)
    # A shared mount, as systemd makes every mount on most hosts (this one's / is private): a
    # copy of it that stayed its peer would pass the child's mounts under it on to the host's.
    subprocess.run(["mount", "--bind", mine, mine], check=True)
    subprocess.run(["mount", "--make-shared", mine], check=True)
    sock, proc = _daemon_for_4001(shared_dir)

    def host_mounts() -> str:
        with open("/proc/self/mountinfo") as f:
            return "host sees %d\n" % sum(mine in line for line in f)  # (the shared bind itself: 1)

    try:
        wait_socket(sock, proc)
        out = _spawn_exec_as_4001(
            sock, "cat /r/s; echo; cat /w/sub/h; echo; echo made > /w/new && stat -c '%u:%g' /w/new;"
                  " stat -c '%u:%g %a' /w; echo ready; read x; echo done", host_mounts,
            ro_binds={sec: "/r", os.path.join(sec, "s"): "/w/sub/h"}, rw_binds={mine: "/w"})
        assert out.splitlines() == ["s3cret", "s3cret", "65534:65534", "65534:65534 700", "ready",
                                    "host sees 1", "done"], out
        st = os.stat(os.path.join(mine, "new"))
        assert (st.st_uid, st.st_gid) == (4001, 4242)
        with open(os.path.join(mine, "new")) as f:
            assert f.read() == "made\n"
    finally:
        log = stop_daemon(proc)
        subprocess.run(["umount", "-R", mine], check=True)  # (-R: a mount the child passed on, if any)
    assert b"without an idmap" not in log, log[-2000:]


def test_SECURITY_a_child_without_seccomp_makes_no_set_id_file_of_a_sandbox_uid(shared_dir):
    """Under a pool without seccomp nothing refuses set-ID modes, and a child of uid 4001 marks a
    file it made in a directory of 4001's bound read-write (0777 here, so that the previous
    daemon's child could write too). The file is 4001's on the host: a set-user-ID file of
    4001's own, which 4001 could make itself. Before, it belonged to the child's host uid, which
    later children of other clients get (a local user running it could signal them). Fails on
    the previous daemon: the file is the range uid's."""
    mine, _ = _mine_and_secret(shared_dir, 0o777)
    sock, proc = _daemon_for_4001(shared_dir, more="""
        [pools.default.sandbox]
        seccomp_profile = "unconfined"
        """)
    try:
        wait_socket(sock, proc)
        out = _spawn_exec_as_4001(sock, "touch /w/f && chmod 6755 /w/f && mkdir /w/d && chmod 2777 /w/d"
                                        " && echo ready", rw_binds={mine: "/w"})
        assert out == "ready\n", out
    finally:
        stop_daemon(proc)
    made = {name: os.stat(os.path.join(mine, name)) for name in ("f", "d")}
    assert all(st.st_mode & 0o6000 for st in made.values()), "the marks were refused: the test proves nothing"
    assert {(st.st_uid, st.st_gid) for st in made.values()} == {(4001, 4242)}, made


def _children_as(sock: str, uid: int, script: str, n: int, stop=None) -> list[str]:
    """As ``uid`` (group 4242), on one connection: up to ``n`` plain `sh -c script` children, one
    after another, each reaped before the next; their stdouts, up to the first one for which
    ``stop(out)`` is true. A refused spawn ends the list with "<reply type>:<message>"."""
    def cycle() -> str:
        c = RawConn(sock)
        c.send(c.P.Hello(c.P.VERSION))
        c.reply()
        seen = []
        for i in range(1, n + 1):
            c.send(c.P.Spawn(req=i, kind="exec", argv=["/bin/sh", "-c", script], stdin=False))
            fds: list[int] = []
            m = c.reply(keep=fds)
            if type(m).__name__ != "Spawned":
                seen.append(f"{type(m).__name__}:{getattr(m, 'message', '')}")
                break
            seen.append(_read_all(fds))
            while type(m := c.reply()).__name__ != "Exited":
                pass
            if stop is not None and stop(seen[-1]):
                break
        return "\0".join(seen)
    return run_as(uid, 4242, cycle).split("\0")


def _host_id(maps: str, inside: int) -> tuple[int, int]:
    """From a child's /proc/self/uid_map text: (host id of sandbox id ``inside``, its range's first)."""
    got, first = -1, -1
    for line in maps.strip().splitlines():
        a, b, n = map(int, line.split())
        if a <= inside < a + n:
            got = b + inside - a
        if a == 0:
            first = b
    return got, first


_SHOW_IDS = "cat /proc/self/uid_map; echo -; cat /proc/self/gid_map; echo ready"


def _ids_of(out: str) -> tuple[int, int, int]:
    """(host uid, host gid, range's first id) of sandbox id 65534, from a child's output that
    ends with _SHOW_IDS's (what the script printed before it is left out)."""
    uid_map, gid_map = out.split("ready")[0].rsplit("-\n", 1)
    uid_map = "\n".join(ln for ln in uid_map.splitlines() if len(ln.split()) == 3 and ln.split()[0].isdigit())
    (uid, rng), (gid, _) = _host_id(uid_map, 65534), _host_id(gid_map, 65534)
    return uid, gid, rng


def test_SECURITY_an_idmapped_copy_maps_to_no_other_client_s_child(shared_dir):
    """An idmapped copy outlives its child behind any fd of it the payload hands out, and takes
    the client's files to the host ids the child ran as. Those are the client's own
    (userns.client_id): its next child has them too, and no child of another client ever does,
    not even one that gets the first child's host id range again (ranges are reused, the least
    recently used last), nor one of a client with the same primary group and binds of its own.
    Fails on the previous daemon, which mapped the copy to the child's own range: uid 4002's
    children came round to that range, and to its ids."""
    mine, _ = _mine_and_secret(shared_dir)
    theirs = os.path.join(shared_dir, "theirs")
    os.mkdir(theirs, 0o700)
    os.chown(theirs, 4002, 4242)
    show = _SHOW_IDS
    with config_daemon(shared_dir, """
            socket_mode = "0660"
            socket_group = 4242
            allowed_uids = [4001, 4002]
            max_children = 1
            """) as sock:
        first = [_spawn_exec_as_4001(sock, show, rw_binds={mine: "/w"}) for _ in range(2)]
        other = _spawn_exec_as_4001(sock, show, uid=4002, rw_binds={theirs: "/w"})
        others = _children_as(sock, 4002, show, 130)  # (the daemon's 127 ranges, and some)
    assert len(others) == 130, others[:2]
    (u1, g1, r1), (u2, g2, _) = _ids_of(first[0]), _ids_of(first[1])
    assert (u1, g1) == (u2, g2), first  # the client's own ids, every time
    seen = [_ids_of(out) for out in others]
    assert r1 in {r for _, _, r in seen}, "4002 never got the first child's range: the test proves nothing"
    assert not {u1, g1} & {i for u, g, _ in seen for i in (u, g)}, (u1, g1, first[0])
    u3, g3, _ = _ids_of(other)  # (4002 with a bind of its own: ids of its own, not its group's)
    assert not {u1, g1} & {u3, g3} and u3 not in {u for u, _, _ in seen}, (first[0], other)


def _cache_pool(shared_dir: str) -> tuple[str, str]:
    """A directory anyone may write (1777, as /tmp), and the configuration of a daemon that uids
    4001 and 4002 may use (group 4242), one child at a time, whose default pool binds it
    read-write at /cache."""
    cache = os.path.join(shared_dir, "cache")
    os.mkdir(cache)
    os.chmod(cache, 0o1777)
    return cache, f"""
        socket_mode = "0660"
        socket_group = 4242
        allowed_uids = [4001, 4002]
        max_children = 1

        [pools.default.sandbox]
        rw_binds = {{ "{cache}" = "/cache" }}
        """


def test_SECURITY_a_pool_s_read_write_bind_keeps_a_client_s_files_from_other_clients_children(shared_dir):
    """Host id ranges go from one child to the next whoever its client is: a 0600 file a child of
    uid 4001 left in its pool's read-write bind belonged to its range's uid, and uid 4002's
    children, spawned one after another until one got that range (~130 cheap spawns), read it
    (a helper's red-team). A non-root client's child in such a pool now runs as the client's own
    host id (userns.client_id): 4001's next child reads its file, 4002's never does, not even
    the one with the first child's range. Fails on the previous daemon (4002 read "s3cret", and
    4001's second child, of another range, could not)."""
    cache, toml = _cache_pool(shared_dir)
    with config_daemon(shared_dir, toml) as sock:
        first = _spawn_exec_as_4001(sock, "umask 077; echo s3cret > /cache/s; " + _SHOW_IDS)
        again = _spawn_exec_as_4001(sock, "cat /cache/s; " + _SHOW_IDS)
        uid, gid, rng = _ids_of(first)
        others = _children_as(sock, 4002, "cat /cache/s 2>&1; " + _SHOW_IDS, 130,
                              stop=lambda out: _ids_of(out)[2] == rng)
    st = os.stat(os.path.join(cache, "s"))
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (uid, gid, 0o600), (st, first)
    assert _ids_of(others[-1])[2] == rng, f"4002 never got the first child's range: the test proves nothing {others[-1]}"
    assert not [out for out in others if "s3cret" in out], others
    assert all("Permission denied" in out for out in others), others[:2]
    assert again.startswith("s3cret\n") and _ids_of(again)[:2] == (uid, gid), again


def test_SECURITY_a_restarted_daemon_s_children_do_not_read_what_the_last_one_s_left(shared_dir):
    """A restarted daemon hands out its ranges from the first again: the first child of uid 4002
    after a restart had the host ids of uid 4001's first child before it, and read the 0600
    file that child left in the pool's read-write bind. Its children run as 4002's own id now.
    Fails on the previous daemon (4002 read "s3cret")."""
    cache, toml = _cache_pool(shared_dir)
    with config_daemon(shared_dir, toml) as sock:
        rng = _ids_of(_spawn_exec_as_4001(sock, "umask 077; echo s3cret > /cache/s; " + _SHOW_IDS))[2]
    with config_daemon(shared_dir, toml) as sock:
        others = _children_as(sock, 4002, "cat /cache/s 2>&1; " + _SHOW_IDS, 130,
                              stop=lambda out: _ids_of(out)[2] == rng)
    assert _ids_of(others[-1])[2] == rng, f"4002 never got the first child's range: the test proves nothing {others}"
    assert not [out for out in others if "s3cret" in out], others


def test_a_child_in_a_pool_with_read_write_binds_runs_as_its_client_or_not_at_all(shared_dir):
    """Where its pool binds a host directory read-write, a non-root client's child runs as the
    client's own host id or is refused (step "userns": a uid past userns.CLIENT_IDS has none;
    the same client's spawn in a pool without such binds runs). Reserve children have their
    maps before anyone asks for one: a non-root client's request does not take one (its child
    has the client's id, with two waiting) and its Lease is refused ("bad-request": the client
    library then spawns through the daemon); root's request still takes one, and root still
    leases. A request may not name the pool's read-write source among its read-only binds or
    as its chroot_dir.
    Fails on the previous daemon (a range's ids for every child; the reserve served 4001)."""
    from zygote.layers import userns
    big = userns.CLIENT_IDS + 7
    cache, toml = _cache_pool(shared_dir)
    toml = toml.replace("allowed_uids = [4001, 4002]", f"allowed_uids = [4001, {big}]").replace(
        "max_children = 1", "max_children = 8").replace(
        "[pools.default.sandbox]", "[pools.default]\nreserve = 2\n\n[pools.default.sandbox]") + "\n[pools.plain]\n"
    with config_daemon(shared_dir, toml) as sock, Client.connect(sock) as root:
        def waiting() -> set[int]:
            st = root.status()
            running = {ch.pid for ch in st.children}
            return {p for p in sandbox_children(st.daemon_pid) if p not in running}
        wait_for(lambda: sum(p.reserve_waiting for p in root.status().pools if p.name == "default") == 2,
                 what="two reserve children")
        held = waiting()

        def script() -> str:  # (a script, as a reserve child runs: a program has a reaper in front)
            c = RawConn(sock)
            c.send(c.P.Hello(c.P.VERSION))
            c.reply()
            c.send(c.P.Spawn(req=1, kind="script", argv=["-"], stdin=False, payload=(
                b"print(open('/proc/self/uid_map').read() + '-')\n"
                b"print(open('/proc/self/gid_map').read() + 'ready')\n")))
            fds: list[int] = []
            m = c.reply(keep=fds)
            if type(m).__name__ != "Spawned":
                return f"{type(m).__name__}:{getattr(m, 'message', '')}"
            return f"{m.pid}\n{_read_all(fds)}"
        pid, out = run_as(4001, 4242, script).split("\n", 1)
        assert int(pid) not in held and _ids_of(out)[:2] == (userns.client_id(userns.DEFAULT_ID_BASE, 4001),) * 2, \
            (pid, held, out)

        def refused() -> str:
            out = []
            for pool in ("default", "plain"):
                c = RawConn(sock)
                c.send(c.P.Hello(c.P.VERSION))
                c.reply()
                c.send(c.P.Spawn(req=1, pool=pool, kind="exec", argv=["/bin/true"], stdin=False))
                m = c.reply()
                out.append(f"{type(m).__name__} {getattr(m, 'step', '')} {getattr(m, 'code', '')} "
                           f"{getattr(m, 'message', '')}")
            return "\n".join(out)
        big_default, big_plain = run_as(big, 4242, refused).split("\n")
        assert big_default.startswith("SpawnFailed userns sandbox ") and "own host id" in big_default, big_default
        assert big_plain.startswith("Spawned"), big_plain

        def lease() -> str:
            c = RawConn(sock)
            c.send(c.P.Hello(c.P.VERSION))
            c.reply()
            c.send(c.P.Lease(1))
            m = c.reply()  # (its fds closed: a leased child ends then)
            c.sock.close()
            return f"{type(m).__name__} {getattr(m, 'code', '')} {getattr(m, 'message', '')}"
        assert run_as(4001, 4242, lease).startswith("SpawnFailed bad-request pool 'default' leases children to root only")
        # Named read-only by the request, the pool's source was checked for reading only, and
        # its read-write bind was idmapped as the client's too: refused (a helper's review).
        out = _spawn_exec_as_4001(sock, "touch /cache/by-4001; echo ready", ro_binds={cache: "/ro"})
        assert out.startswith("SpawnFailed:ro_binds: ") and "binds read-write" in out, out
        os.mkdir(os.path.join(cache, "cache"))  # (the pool's target, inside such a root, must exist)
        out = _spawn_exec_as_4001(sock, "touch /cache/by-4001; echo ready", chroot_dir=cache)
        assert out.startswith("SpawnFailed:chroot_dir: ") and "binds read-write" in out, out
        ours = root.spawn_child(print, ("up",))
        assert ours.pid in held and ours.stdout.read() == b"up\n", (ours.pid, held)
        ours.wait()
        assert lease().startswith("Leased"), lease()


def test_SECURITY_a_client_may_not_name_more_binds_than_the_daemon_idmaps(shared_dir):
    """A child gets at most MAX_TREES idmapped copies (one fd each through the zygote). The
    first version bound any further bind of the client's plainly: 64 dummies ahead of the one
    that mattered switched the idmapping off for it (a helper's review). Now such a request is
    refused; MAX_TREES binds are fine."""
    from zygote._childproto import MAX_TREES
    mine, _ = _mine_and_secret(shared_dir, 0o755)
    for i in range(MAX_TREES + 1):
        with open(os.path.join(mine, f"f{i}"), "w") as f:
            f.write(f"{i} ")
        os.chmod(os.path.join(mine, f"f{i}"), 0o644)
    sock, proc = _daemon_for_4001(shared_dir)

    def binds(n: int) -> dict:
        return {os.path.join(mine, f"f{i}"): f"/f/{i:03d}" for i in range(n)}

    try:
        wait_socket(sock, proc)
        out = _spawn_exec_as_4001(sock, "exec 2>&1; cat " + " ".join(f"/f/{i:03d}" for i in range(MAX_TREES))
                                  + " && echo && echo ready", ro_binds=binds(MAX_TREES))
        assert out == " ".join(str(i) for i in range(MAX_TREES)) + " \nready\n", out
        out = _spawn_exec_as_4001(sock, "echo ready", ro_binds=binds(MAX_TREES + 1))
        assert out.startswith("SpawnFailed:") and f"at most {MAX_TREES} binds" in out, out
    finally:
        stop_daemon(proc)


def test_SECURITY_a_read_write_bind_that_cannot_be_idmapped_is_refused(shared_dir):
    """ramfs has no idmapped mounts. A client's read-write bind of a directory on one is
    refused, naming the mounts step and the fix: bound plainly, what the child made there was a
    sandbox uid's, reused by later children of other clients (set-ID under a pool without
    seccomp; the first version fell back to that). A read-only bind there is made as before
    (its "other" bits), and the daemon's log says so."""
    ram = os.path.join(shared_dir, "zg-ram")
    os.mkdir(ram)
    subprocess.run(["mount", "-t", "ramfs", "-o", "mode=0777", "zg-ram", ram], check=True)
    try:
        with open(os.path.join(ram, "r"), "w") as f:
            f.write("seen")
        sock, proc = _daemon_for_4001(shared_dir)
        try:
            wait_socket(sock, proc)
            out = _spawn_exec_as_4001(sock, "echo x > /w/f; echo ready", rw_binds={ram: "/w"})
            assert out.startswith("SpawnFailed:read-write bind of") and "no idmapped mount" in out, out
            assert os.listdir(ram) == ["r"]
            out = _spawn_exec_as_4001(sock, "cat /r/r && echo && echo ready", ro_binds={ram: "/r"})
            assert out == "seen\nready\n", out
        finally:
            log = stop_daemon(proc)
        assert b"bound read-only without an idmap" in log, log[-2000:]
    finally:
        subprocess.run(["umount", ram], check=True)


def test_SECURITY_a_client_handed_its_child_s_idmapped_mount_makes_nothing_through_it(shared_dir):
    """The payload passes a directory fd of its idmapped bind out to its client (SCM_RIGHTS over
    a socket the client left in the bind; the mount works behind the fd after the child ended).
    The first version's maps swapped the two ids, so the client's own uid wrote as the child's
    sandbox uid through it: a set-ID file of a uid later children of other clients run as (a
    helper's review, reproduced: it killed such a child). The maps go one way now: the client
    makes nothing there (EOVERFLOW: its id is not a mapped one)."""
    mine, _ = _mine_and_secret(shared_dir)
    pub = os.path.join(mine, "pub")
    os.mkdir(pub, 0o777)
    os.chmod(pub, 0o777)
    os.chown(pub, 4001, 4242)
    sock, proc = _daemon_for_4001(shared_dir)
    code = ("import os, socket\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "s.connect('/w/pub/s')\n"
            "socket.send_fds(s, [b'd'], [os.open('/w/pub', os.O_RDONLY | os.O_DIRECTORY)])\n")

    def talk() -> str:
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(os.path.join(pub, "s"))
        listener.listen(1)
        listener.settimeout(30)
        c = RawConn(sock)
        c.send(c.P.Hello(c.P.VERSION, client="test sandbox-inherits"))
        c.reply()
        c.send(c.P.Spawn(req=1, kind="exec", argv=[sys.executable, "-I", "-S", "-c", code], stdin=False,
                         sandbox=SandboxConfig(rw_binds={mine: "/w"})))
        fds: list[int] = []
        m = c.reply(keep=fds)
        if type(m).__name__ != "Spawned":
            return f"{type(m).__name__}:{getattr(m, 'message', '')}"
        conn, _ = listener.accept()
        _, got, _, _ = socket.recv_fds(conn, 8, 1)
        _read_all(fds)  # (until the child ended)
        try:
            os.close(os.open("k", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=got[0]))
            return "made"
        except OSError as e:
            return errno.errorcode[e.errno]

    try:
        wait_socket(sock, proc)
        assert run_as(4001, 4242, talk) == "EOVERFLOW"
        assert not os.path.exists(os.path.join(pub, "k"))
    finally:
        stop_daemon(proc)


def _until_held_before_sources(proc) -> None:
    """Until the daemon has a child (ZYGOTE_TEST_PAUSE_BEFORE_SOURCES holds it before it opens its
    sources; the request was checked before the clone)."""
    wait_for(lambda: sandbox_children(proc.pid), 30, "the child held before its sources")


def _spawn_changed_after_the_check(shared_dir: str, go, monkeypatch, change, **sandbox) -> str:
    """As uid 4001: one spawn (see _spawn_exec_as_4001) whose child a test hook holds before it
    opens its sources; meanwhile, once the child exists (the request was checked before the
    clone), ``change()`` runs."""
    import threading
    monkeypatch.setenv("ZYGOTE_TEST_PAUSE_BEFORE_SOURCES", str(go))
    sock, proc = _daemon_for_4001(shared_dir, "--test-hooks")

    def later() -> None:
        _until_held_before_sources(proc)
        change()
        go.write_text("")

    try:
        wait_socket(sock, proc)
        t = threading.Thread(target=later)
        t.start()
        try:
            return _spawn_exec_as_4001(sock, "echo ready", **sandbox)
        finally:
            t.join()
    finally:
        stop_daemon(proc)


def test_SECURITY_a_directory_swapped_for_a_symlink_after_the_check_leads_no_mount_astray(shared_dir, tmp_path,
                                                                                          monkeypatch):
    """A bind target inside a client's bind is walked without following symlinks. The client
    swapped a directory on the way to one for a symlink to / after the check (the child held by
    a test hook; a helper's review did it without the hook, by exchanging the two in a loop):
    the child mounted the inner bind over its new root, and the rest of the root (the
    interpreter's symlinks, mount points) was made in the client's other directory on the host,
    as the sandbox root. Now the spawn fails, naming the mount point, and nothing is made."""
    mine, sec = _mine_and_secret(shared_dir)
    os.makedirs(os.path.join(mine, "a", "mnt"))

    def swap() -> None:
        os.rename(os.path.join(mine, "a"), os.path.join(mine, "gone"))
        os.symlink("/", os.path.join(mine, "a"))

    out = _spawn_changed_after_the_check(shared_dir, tmp_path / "go", monkeypatch, swap,
                                         rw_binds={mine: "/w", sec: "/w/a/mnt"})
    assert out.startswith("SpawnFailed:mount point /w/a/mnt") and "no symlink on the way" in out, out
    assert os.listdir(sec) == ["s"]


def test_SECURITY_a_nested_bind_target_deleted_after_the_check_is_not_made_on_the_host(shared_dir, tmp_path,
                                                                                       monkeypatch):
    """A bind target inside a client's bind must exist on the host (checked with the request).
    Deleted after the check (the child held by a test hook), the first idmapped version's child
    made it again, on the host, as its sandbox root (the client's files are the sandbox's in the
    copy; a helper's review). Now the spawn fails, naming the mounts step, and nothing is made."""
    mine, sec = _mine_and_secret(shared_dir)

    def remove() -> None:
        os.unlink(os.path.join(mine, "sub", "h"))
        os.rmdir(os.path.join(mine, "sub"))

    out = _spawn_changed_after_the_check(shared_dir, tmp_path / "go", monkeypatch, remove,
                                         ro_binds={os.path.join(sec, "s"): "/w/sub/h"}, rw_binds={mine: "/w"})
    assert out.startswith("SpawnFailed:mount point /w/sub/h") and "must exist on the host" in out, out
    assert os.listdir(mine) == []


def _zygotes_of(pid: int) -> list[int]:
    return [p for p, _ in children_of(pid) if b"zygote._zygote" in cmdline(p)]


def _pool_with_preload(tmp_path, sock: str, module: str, body: str, version: int, extra: str = "") -> str:
    """A config file whose default pool preloads ``module`` (written with ``body`` in
    ``tmp_path``); ``version`` goes into the pool's environment, so a new one is a changed pool."""
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(body))
    return write_text(tmp_path / "z.toml", f'[daemon]\nsocket = "{sock}"\n{extra}[pools.default]\npreload = ["{module}"]\n'
                      f'reserve = 0\nenv = {{PATH = "/usr/bin:/bin", PYTHONPATH = "{tmp_path}", V = "{version}"}}\n')


def _mark_and_kill_the_zygote(proc, sock: str, mark) -> int:
    """Once the daemon's pool is up, create ``mark`` (the preload behaves otherwise from then
    on) and SIGKILL the daemon's zygote (the test's own); returns its pid."""
    wait_socket(sock, proc)
    Client.connect(sock).close()  # (its Welcome: the pool is up)
    [first] = _zygotes_of(proc.pid)
    mark.touch()
    os.kill(first, signal.SIGKILL)
    return first


def test_a_pool_retired_while_its_zygote_restarts_leaves_no_zygote_running(tmp_path):
    """A reload retires a pool whose zygote is being restarted (it died; its replacement still
    preloads). The restart checked for a stopping pool only before it started the new zygote,
    which then joined the stopped pool's list, unseen by its stop: an interpreter with all its
    preloads held for as long as the daemon ran (a helper's review). Here the replacement's
    preload takes 1.5 s, and the reload comes 0.3 s into it."""
    sock = str(tmp_path / "z.sock")
    mark = tmp_path / "slow"
    body = f"""
        import os, time
        if os.path.exists({str(mark)!r}):  # once: the next zygote preloads at once
            os.unlink({str(mark)!r})
            time.sleep(1.5)
        """
    cfg = _pool_with_preload(tmp_path, sock, "zg_once_slow", body, 1)
    proc = start_daemon("--config", cfg)
    try:
        _mark_and_kill_the_zygote(proc, sock, mark)
        time.sleep(0.3)
        _pool_with_preload(tmp_path, sock, "zg_once_slow", body, 2)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: b"reloaded" in _log(proc), what="the reload")
        wait_for(lambda: not mark.exists(), what="the restart's preload")
        time.sleep(1.8)  # (the restart's preload ends)
        assert len(_zygotes_of(proc.pid)) == 1, _zygotes_of(proc.pid)
        with Client.connect(sock) as c:
            assert c.run(print, ("ok",)).stdout == b"ok\n"
    finally:
        stop_daemon(proc)


def test_a_zygote_that_cannot_restart_says_why_in_the_log(tmp_path):
    """A zygote whose restart fails (its preload broke after the daemon started: a package
    upgraded under it) was retried every second without a word in the log: the pool answered
    "restarting" for ever. Now the death and each failure are logged with the reason, and the
    pool comes back once the cause is gone. (The delays between attempts: the MockClock tests
    in test_spawn.py.)"""
    sock = str(tmp_path / "z.sock")
    mark = tmp_path / "broken"
    body = f"""
        import os
        if os.path.exists({str(mark)!r}):
            raise ImportError("broken on purpose")
        """
    proc = start_daemon("--config", _pool_with_preload(tmp_path, sock, "zg_breakable", body, 1))
    try:
        first = _mark_and_kill_the_zygote(proc, sock, mark)
        wait_for(lambda: b"zygote restart failed" in _log(proc), what="the failed restart's log line")
        mark.unlink()
        log = _log(proc).decode(errors="replace")
        died = [ln for ln in log.splitlines() if "zygote died" in ln]
        assert len(died) == 1 and "killed by SIGKILL" in died[0] and str(first) in died[0], died
        failed = [ln for ln in log.splitlines() if "zygote restart failed" in ln]
        assert failed and "broken on purpose" in failed[0] and "zg_breakable" in failed[0], failed
        with Client.connect(sock) as c:  # (the next attempt, a second later, succeeds)
            wait_for(lambda: c.status().pools[0].zygotes_running == 1, timeout=20, what="the restart")
            assert c.run(print, ("ok",)).stdout == b"ok\n"
    finally:
        stop_daemon(proc)


def test_a_zygote_still_preloading_when_the_daemon_stops_does_not_outlive_it(tmp_path):
    """SIGTERM while a reload's new pool still preloads: the zygote's start was cancelled, and
    only a start that timed out killed its interpreter; this one ran on after the daemon had
    exited (a helper's review, with a preload that never returns)."""
    sock = str(tmp_path / "z.sock")
    mark = tmp_path / "hang"
    body = f"""
        import os, time
        if os.path.exists({str(mark)!r}):
            time.sleep(120)
        """
    cfg = _pool_with_preload(tmp_path, sock, "zg_hangs_when_marked", body, 1)
    proc = start_daemon("--config", cfg)
    leftover: list[int] = []
    try:
        wait_socket(sock, proc)
        Client.connect(sock).close()  # (its Welcome: the pool is up)
        mark.touch()
        _pool_with_preload(tmp_path, sock, "zg_hangs_when_marked", body, 2)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(_zygotes_of(proc.pid)) == 2, what="the new pool's zygote")
        time.sleep(0.5)
        stop_daemon(proc)
        time.sleep(0.5)
        leftover = [int(d) for d in os.listdir("/proc") if d.isdigit()
                    and b"zg_hangs_when_marked" in cmdline(int(d)) and b"zygote._zygote" in cmdline(int(d))]
        assert leftover == [], "a zygote outlived its daemon"
    finally:
        for pid in leftover:  # (ours: the preload names a module of this test's)
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            stop_daemon(proc)


def test_requests_during_reloads_are_answered(tmp_path):
    """A reload stops the old pool's zygotes while requests may be cloning from them: one got
    "internal" (the zygote's socket closed under its clone), others "retry" (the pool they had
    looked up was stopped). A clone in flight now gets its reply before the zygote stops, and a
    request that found its pool replaced tries once more in the new one."""
    import threading
    sock = str(tmp_path / "z.sock")
    cfg = _pool_with_preload(tmp_path, sock, "zg_plain", "x = 1\n", 0)
    proc = start_daemon("--config", cfg)
    errors: list[str] = []
    done = threading.Event()
    ran = [0]

    def requester() -> None:
        with Client.connect(sock) as c:
            while not done.is_set():
                try:
                    assert c.run(print, ("x",)).stdout == b"x\n"
                    ran[0] += 1
                except Exception as e:  # noqa: BLE001 - every kind counts as a failure here
                    errors.append(f"{type(e).__name__}: {e}")
    try:
        wait_socket(sock, proc)
        threads = [threading.Thread(target=requester) for _ in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        for v in range(1, 1000):  # 8 reloads, and more while fewer than 4 were done (on a loaded
            time.sleep(0.25)      # host, signals that come during a reload are taken as one)
            _pool_with_preload(tmp_path, sock, "zg_plain", "x = 1\n", v)
            proc.send_signal(signal.SIGHUP)
            if v >= 8 and (_log(proc).count(b"reloaded") >= 4 or time.monotonic() > deadline):
                break
        time.sleep(0.5)
    finally:
        done.set()
        for t in threads:
            t.join(60)
        err = stop_daemon(proc)
    assert err.count(b"reloaded") >= 4, err[-2000:]
    assert ran[0] > 20 and errors == [], (ran[0], errors[:5])


def test_a_pool_naming_an_unknown_seccomp_profile_is_refused_with_the_file(tmp_path):
    """A pool's seccomp_profile is checked when the file is read (at start and at each reload):
    a name that does not exist was taken, and every default request of the pool then failed
    with "unknown seccomp profile" (a helper's review)."""
    cfg = write_text(tmp_path / "z.toml", '[pools.default.sandbox]\nseccomp_profile = "nonexistent"\n')
    with pytest.raises(ConfigError, match=r"pools\.default: sandbox\.seccomp_profile: unknown seccomp profile"):
        load(cfg, default_python=sys.executable)
    write_text(cfg, '[pools.default.sandbox]\nseccomp_profile = "strict"\n')
    assert load(cfg, default_python=sys.executable).pools["default"].sandbox.seccomp_profile == "strict"


def test_a_reload_changing_always_cgroup_remakes_the_reserves_and_says_what_it_keeps(tmp_path):
    """always_cgroup applies to the children made after it: reserve children made before a
    reload that turned it on had no cgroup and were still handed out (no peak_memory), so the
    pools restart. Settings a reload cannot change (the socket's mode, id_base) are named in
    its log line, as the network ones were; they were kept silently."""
    sock = str(tmp_path / "z.sock")
    cfg = write_text(tmp_path / "z.toml", f'[daemon]\nsocket = "{sock}"\n[pools.default]\nreserve = 2\n')
    proc = start_daemon("--config", cfg)
    try:
        wait_socket(sock, proc)
        with Client.connect(sock) as c:
            wait_for(lambda: c.status().pools[0].reserve_waiting == 2, 30, "the reserve")
            write_text(cfg, f'[daemon]\nsocket = "{sock}"\nsocket_mode = "0660"\nalways_cgroup = true\n'
                       '[pools.default]\nreserve = 2\n')
            proc.send_signal(signal.SIGHUP)
            wait_for(lambda: b"reloaded" in _log(proc), 30, "the reload")
            for _ in range(3):  # more than the reserve held
                assert c.run(print, ("x",)).status.peak_memory is not None
    finally:
        err = stop_daemon(proc)
    line = [ln for ln in err.decode().splitlines() if "reloaded" in ln][0]
    assert "pool 'default' restarted" in line and "socket_mode changed: kept" in line, line


def test_SECURITY_a_pool_bind_source_inside_a_pool_read_write_bind_is_refused(tmp_path):
    """Pool bind sources are found again by their path at every spawn: one inside another pool
    read-write bind could be swapped for a symlink by a child of that pool, and the next child
    (another client's) got the host directory it named (a helper's red-team: the host's /tmp,
    listed and written). Such a configuration is refused when the file is read (at start and at
    each reload), for the same pool and across pools; sources side by side are fine."""
    outer, inner, apart = tmp_path / "rw", tmp_path / "rw" / "models", tmp_path / "apart"
    for d in (outer, inner, apart):
        d.mkdir()
    same = f'[pools.default.sandbox]\nrw_binds = {{ "{outer}" = "/w" }}\nro_binds = {{ "{inner}" = "/models" }}\n'
    across = (f'[pools.a.sandbox]\nrw_binds = {{ "{outer}" = "/w" }}\n'
              f'[pools.b.sandbox]\nrw_binds = {{ "{inner}" = "/scratch" }}\n')
    chroot = f'[pools.a.sandbox]\nrw_binds = {{ "{outer}" = "/w" }}\n[pools.b.sandbox]\nchroot_dir = "{inner}"\n'
    for toml in (same, across, chroot):
        cfg = write_text(tmp_path / "z.toml", toml)
        with pytest.raises(ConfigError, match="lies inside"):
            load(cfg, default_python=sys.executable)
    fine = f'[pools.default.sandbox]\nrw_binds = {{ "{outer}" = "/w" }}\nro_binds = {{ "{apart}" = "/models" }}\n'
    load(write_text(tmp_path / "z.toml", fine), default_python=sys.executable)


def test_a_daemon_serving_other_users_warns_where_its_pools_read_write_binds_are_shared(shared_dir):
    """A root daemon runs a non-root client's child in a pool with read-write binds as the
    client's own host id, so it does not warn of them (it did while children of any client took
    the same host ids over time). Where host accounts hold client ids (here an id_base that puts
    "nobody"'s 65534 among them), it warns that non-root clients' spawns there are refused, and they
    are (step "userns"). A daemon not run as root (all children its own user) warns of each
    such bind (the function: the venv lives under /root, so no other user can start this
    daemon here), and any daemon serving others warns of a pool without seccomp that has one."""
    from zygote.config import shared_rw_bind_warnings
    from zygote.layers import userns
    shared = os.path.join(shared_dir, "cache")
    os.mkdir(shared)
    pool = f'[pools.default.sandbox]\nrw_binds = {{ "{shared}" = "/cache" }}\n'
    serve = 'socket_mode = "0660"\nsocket_group = 4242\nallowed_uids = [4001]\n'
    taken = f"id_base = {userns.CLIENT_IDS + 60000}\n"
    for extra, expect in ((serve, False), ("", False), (serve + taken, True)):
        cfg = write_text(os.path.join(shared_dir, "w.toml"), f'[daemon]\nsocket = "{shared_dir}/w.sock"\n{extra}{pool}')
        proc = start_daemon("--config", cfg)
        try:
            wait_socket(f"{shared_dir}/w.sock", proc)
            out = _spawn_exec_as_4001(f"{shared_dir}/w.sock", "id -u") if extra else ""
        finally:
            log = stop_daemon(proc)
        assert (b"warning: pools.default: " in log and shared.encode() in log) == expect, log[-2000:]
        if expect:
            assert b"non-root clients' spawns in this pool are refused" in log, log[-2000:]
            assert out.startswith("SpawnFailed:the pool binds a host directory read-write") and "65534" in out, out
        elif extra:
            assert out == "65534\n", out
    loaded = load(write_text(os.path.join(shared_dir, "w.toml"), f'[daemon]\nsocket = "/x.sock"\n{serve}{pool}'),
                  default_python=sys.executable)
    [line] = shared_rw_bind_warnings(loaded, False, None)
    assert line.startswith("pools.default: ") and "runs every client's children as its own user" in line, line
    assert shared_rw_bind_warnings(loaded, True, None) == []
    # Without seccomp nothing refuses set-ID modes: a program left there runs as the child's id
    # (a non-root client's own) for any local user (a helper's review).
    bare = load(write_text(os.path.join(shared_dir, "w.toml"), f'[daemon]\nsocket = "/x.sock"\n{serve}{pool}'
                           'seccomp_profile = "unconfined"\n'), default_python=sys.executable)
    [line] = shared_rw_bind_warnings(bare, True, None)
    assert line.startswith("pools.default: ") and "set-user-ID" in line, line


def test_max_tasks_must_lie_in_the_kernel_s_range(tmp_path):
    """(A helper's review: 5000000 reached the kernel, which refused it with a hint about cgroup
    delegation; 1 started a daemon none of whose spawns could clone.)"""
    for bad in (1, 5000000):
        with pytest.raises(ConfigError, match="max_tasks must be 16 to 4194304"):
            load(write_text(tmp_path / "z.toml", f'[daemon]\nmax_tasks = {bad}\n'), default_python=sys.executable)
    assert load(write_text(tmp_path / "z.toml", '[daemon]\nmax_tasks = 4096\n'),
                default_python=sys.executable).max_tasks == 4096


def test_output_rate_per_client_is_a_size_a_second(tmp_path):
    """daemon.output_rate_per_client (detach.Budget): a size, at least 4K; 8 MiB when absent."""
    assert load(write_text(tmp_path / "z.toml", '[daemon]\n'),
                default_python=sys.executable).output_rate_per_client == 8 << 20
    assert load(write_text(tmp_path / "z.toml", '[daemon]\noutput_rate_per_client = "2M"\n'),
                default_python=sys.executable).output_rate_per_client == 2 << 20
    for bad, says in (('"1K"', "at least 4K"), ("0", "must be positive"), ('"fast"', "expected a size"),
                      ("-5", "must be positive")):
        with pytest.raises(ConfigError, match=says):
            load(write_text(tmp_path / "z.toml", f'[daemon]\noutput_rate_per_client = {bad}\n'),
                 default_python=sys.executable)
