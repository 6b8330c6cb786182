"""Observability: a structured log line per spawn and per exit, `zygote status`, Prometheus metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest

from zygote_client import Client, DaemonError, SandboxError

from conftest import _log, start_daemon, stop_daemon, wait_for, wait_socket, write_text


def test_logs_status_and_metrics(tmp_path):
    sock = str(tmp_path / "z.sock")
    proc, url, _ = _metrics_daemon(tmp_path)
    try:
        with Client.connect(sock) as c:
            assert c.run(print, ("a",)).returncode == 0
            try:
                c.spawn_child("not-a-target", stdin=None)
            except (DaemonError, SandboxError):
                pass

            def spin():
                while True:
                    pass
            r = c.run(spin, timeout=0.5)
            assert r.status.timed_out
            def sleep():
                import time
                time.sleep(60)
            sleeper = c.spawn_child(sleep, stdin=None)
            st = c.status()
            assert st.running == 1 and [ch.id for ch in st.children] == [sleeper.id]
            assert st.pools[0].name == "default" and st.pools[0].zygotes_running == 1
            assert st.counters["spawns_ok"] == 3 and st.counters["exits_timeout"] == 1

            out = subprocess.run([sys.executable, "-m", "zygote", "status", "--socket", sock, "--json"],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            data = json.loads(out.stdout)
            # root sees every child (other peers only their own: test_config's auth test)
            assert data["running"] == 1 and [ch["id"] for ch in data["children"]] == [sleeper.id]
            text = subprocess.run([sys.executable, "-m", "zygote", "status", "--socket", sock],
                                  capture_output=True, text=True, timeout=60).stdout
            assert "pool default: 1/1 zygotes" in text

            metrics = urllib.request.urlopen(url, timeout=10).read().decode()
            sleeper.kill()
            sleeper.wait()
        assert 'zygote_spawns_total{outcome="ok"} 3.0' in metrics
        assert 'zygote_spawns_total{outcome="bad-request"} 1.0' in metrics
        assert 'zygote_exits_total{reason="timeout"} 1.0' in metrics
        assert 'zygote_spawn_duration_seconds_count{outcome="ok"} 3.0' in metrics
        assert 'zygote_zygotes_running{pool="default"} 1.0' in metrics
        assert "zygote_children_running 1.0" in metrics
        assert sleeper.id not in metrics  # no per-child labels
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    events = [json.loads(l) for l in err.splitlines() if l.startswith("{")]
    spawns = [e for e in events if e["event"] == "spawn"]
    exits = [e for e in events if e["event"] == "exit"]
    assert [e["outcome"] for e in spawns] == ["ok", "bad-request", "ok", "ok"], spawns
    assert all(e["pool"] == "default" and e["peer_uid"] == os.getuid() and e["spawn_ms"] > 0 for e in spawns)
    assert {e["child"] for e in spawns if e["outcome"] == "ok"} == {e["child"] for e in exits}
    timeout_exit = [e for e in exits if e["reason"] == "timeout"]
    assert len(timeout_exit) == 1 and timeout_exit[0]["limits_hit"] == ["timeout"]
    assert all("wall_s" in e and "returncode" in e for e in exits)



def test_reserve_children_are_not_counted_as_running_or_exited(tmp_path):
    """Children a reserve makes and holds run for nobody: status().running, its children and the
    zygote_children_running gauge leave them out (they counted them, the gauge as of the last
    client spawn or exit), and those that end unused (a reload) are counted as reserve_discards,
    not as exits (two reloads with no client made exits_signal 4)."""
    import signal
    sock = str(tmp_path / "z.sock")
    path = tmp_path / "z.toml"
    write_text(path, f'[daemon]\nsocket = "{sock}"\n[pools.default]\nreserve = 2\n')
    proc = start_daemon("--config", str(path), "--metrics-port", "0")
    try:
        url = _metrics_url(proc, sock)

        def gauge() -> str:
            return _metric(url, "zygote_children_running")
        with Client.connect(sock) as c:
            wait_for(lambda: c.status().pools[0].reserve_waiting == 2, 30, "the reserve")
            st = c.status()
            assert st.running == 0 and st.children == [] and st.pools[0].reserve == 2, st
            assert gauge() == "zygote_children_running 0.0"
            assert c.run(print, ("a",)).returncode == 0  # (from the reserve)
            wait_for(lambda: c.status().pools[0].reserve_waiting == 2, 30, "the refill")
            assert gauge() == "zygote_children_running 0.0"  # (was 2: the reserve, at the exit)
            sleeper = c.spawn_child(__import__("time").sleep, (60,), stdin=None)
            assert gauge() == "zygote_children_running 1.0"
            assert c.status().running == 1 and [ch.id for ch in c.status().children] == [sleeper.id]
            sleeper.kill()
            sleeper.wait()
            wait_for(lambda: c.status().running == 0, what="the sleeper's exit")
            wait_for(lambda: c.status().pools[0].reserve_waiting == 2, 30, "the reserve, full")
            for n in (1, 2):  # (a changed pool replaces the old one, whose reserve children go)
                preload = json.dumps(["colorsys", "json"][:n])
                write_text(path, f'[daemon]\nsocket = "{sock}"\n[pools.default]\nreserve = 2\npreload = {preload}\n')
                proc.send_signal(signal.SIGHUP)
                wait_for(lambda: c.status().counters.get("reserve_discards", 0) >= 2 * n
                         and c.status().pools[0].reserve_waiting == 2, 30, f"reload {n}")
            counters = c.status().counters
            assert counters.get("exits_ok") == 1 and counters.get("exits_signal") == 1, counters
            assert counters["reserve_discards"] == 4, counters
            assert c.status().running == 0 and gauge() == "zygote_children_running 0.0"
    finally:
        stop_daemon(proc)
    exits = [json.loads(line) for line in _log(proc).decode().splitlines()
             if line.startswith("{") and json.loads(line)["event"] == "exit"]
    assert len(exits) == 2 and all(e["peer_uid"] == os.getuid() for e in exits), exits


def test_kept_detached_records_expire_on_time_by_themselves(tmp_path):
    """An ended detached child nobody attached to is kept detached_keep_seconds for a later
    attach. Its expiry was looked at only on the next attach or keep: with neither, its result,
    output rings and archive stayed in memory until the daemon stopped. The gauge
    zygote_detached_kept counts the records kept."""
    sock = str(tmp_path / "z.sock")
    path = write_text(tmp_path / "z.toml", f'[daemon]\nsocket = "{sock}"\ndetached_keep_seconds = 1\n')
    proc = start_daemon("--config", str(path), "--metrics-port", "0")
    try:
        url = _metrics_url(proc, sock)
        with Client.connect(sock) as c:
            assert _metric(url, "zygote_detached_kept") == "zygote_detached_kept 0.0"
            ch = c.spawn_child(print, ("x" * 1000,), stdin=None, detached=True)
            ch.wait(timeout=30)
            wait_for(lambda: _metric(url, "zygote_detached_kept") == "zygote_detached_kept 1.0", 10, "the record kept")
            wait_for(lambda: _metric(url, "zygote_detached_kept") == "zygote_detached_kept 0.0", 10, "the record's expiry")
            with pytest.raises(DaemonError) as e:
                c.attach(ch.id)
            assert e.value.code == "unknown-child"
    finally:
        stop_daemon(proc)


def test_a_daemon_whose_log_reader_went_away_keeps_serving(tmp_path):
    """stderr is a pipe whose reader closed (a collector that died): every log line fails with
    EPIPE. The daemon drops the lines and goes on spawning and reaping."""
    sock = str(tmp_path / "z.sock")
    r, w = os.pipe()
    os.close(r)
    proc = subprocess.Popen([sys.executable, "-m", "zygote", "serve", "--socket", sock], stderr=w)
    os.close(w)
    try:
        wait_socket(sock, proc)
        with Client.connect(sock) as c:
            for i in range(3):  # a spawn line and an exit line each
                assert c.call(lambda i=i: i * 2) == i * 2
        assert proc.poll() is None
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


def test_a_daemon_whose_log_reader_stopped_reading_keeps_serving(tmp_path):
    """stderr is a pipe nobody drains (a paused terminal, a stuck journald): once it is full a
    write would wait. The log is written by a thread of its own, so spawning goes on; lines past
    its queue are dropped and counted, and the count shows once the reader catches up."""
    import threading
    import time

    sock = str(tmp_path / "z.sock")
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "zygote", "serve", "--socket", sock], stderr=w)
    os.close(w)
    done: list[int] = []
    try:
        wait_socket(sock, proc)

        def spawn_many() -> None:
            with Client.connect(sock) as c:
                for i in range(300):  # ~600 bytes of log each: the 64 KiB pipe fills after ~100
                    assert c.call(lambda i=i: i) == i
                    done.append(i)

        t = threading.Thread(target=spawn_many, daemon=True)
        t.start()
        t.join(120)
        assert len(done) == 300, f"spawns stopped after {len(done)}: the daemon waits on its log"
        os.set_blocking(r, False)
        log = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and log.count(b'"event": "exit"') < 300:
            try:
                log += os.read(r, 1 << 16)
            except BlockingIOError:
                time.sleep(0.05)
        # The reader gets every line that waited (600 lines are far below the queue's bound).
        assert log.count(b'"event": "spawn"') == 300 and log.count(b'"event": "exit"') == 300
    finally:
        proc.terminate()
        try:
            os.set_blocking(r, False)
            while os.read(r, 1 << 16):  # drain, so its exit is not held up
                pass
        except BlockingIOError:
            pass
        assert proc.wait(timeout=30) == 0
        os.close(r)


class _Gate:
    """A log stream whose writes are recorded and can be held (a reader that stopped reading)."""

    def __init__(self, fail_first: bool = False) -> None:
        import threading

        self.writes: list[str] = []
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()  # a write is in progress (or was)
        self.fail_first = fail_first

    def write(self, text: str) -> None:
        self.entered.set()
        self.open.wait(30)
        if self.fail_first:
            self.fail_first = False
            raise RuntimeError("a stream failing in a way LossyStream does not expect")
        self.writes.append(text)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        return "".join(self.writes)


def test_log_lines_past_the_queue_are_dropped_and_counted():
    """The log's queue is bounded, counting the lines its writer holds while its reader is
    stalled: lines past it are dropped (not held in memory), and a line after the next ones
    written says how many."""
    import time

    from zygote.observe import QueuedStream

    class Small(QueuedStream):
        QUEUE_ITEMS = 10
        GATHER_SECONDS = 0.01

    gate = _Gate()
    gate.open.clear()
    stream = Small(gate)
    for i in range(10):
        stream.write(f"kept {i}\n")
    assert gate.entered.wait(10), "the writer never took the first lines"
    for i in range(15):  # the writer holds 10, stalled: no room
        stream.write(f"dropped {i}\n")
    gate.open.set()
    wait_for(lambda: "kept 9" in gate.text(), 10, "the held lines to be written")
    for i in range(3):
        stream.write(f"late {i}\n")
    stream.drain(10.0)
    out = gate.text()
    assert "dropped" not in out.replace('"log-lines-dropped"', "")
    assert [ln for ln in out.splitlines() if not ln.startswith("{")] == \
        [f"kept {i}" for i in range(10)] + [f"late {i}" for i in range(3)]
    note = json.loads(out.splitlines()[-1])
    assert note["event"] == "log-lines-dropped" and note["lines"] == 15


def test_a_burst_of_log_lines_reaches_the_stream_in_a_few_writes():
    """Only the first line into an empty queue wakes the log's writer, which gathers the lines
    that follow into one write: a daemon logging a spawn and an exit per child does not wake a
    thread (and trade the GIL with it) twice per spawn. Every line still arrives, in order; a
    lone line arrives by itself; a drain at exit does not wait for the gathering to end, but
    does wait for a batch being written; and a stream that raises loses that batch, not the
    writer."""
    import threading
    import time

    from zygote.observe import QueuedStream

    class Slow(QueuedStream):
        GATHER_SECONDS = 5.0  # longer than the test waits: only drain() can cut it short

    out = _Gate()
    stream = Slow(out)
    lines = [f"line {i}\n" for i in range(200)]
    for line in lines:
        stream.write(line)
    t0 = time.monotonic()
    stream.drain(10.0)
    assert time.monotonic() - t0 < 4.0, "drain waited for the writer's gathering to end"
    assert out.text() == "".join(lines)
    assert len(out.writes) <= 3, f"{len(out.writes)} writes for one burst of 200 lines"

    # A lone line, no drain: the write wakes the writer, and it comes after the gathering.
    lone = _Gate()
    stream = QueuedStream(lone)
    stream.write("alone\n")
    wait_for(lambda: lone.writes, 10, "a line written alone to reach the stream")
    assert lone.text() == "alone\n"

    # drain() while a batch is being written waits for it.
    held = _Gate()
    held.open.clear()
    stream = QueuedStream(held)
    stream.write("in flight\n")
    assert held.entered.wait(10)
    threading.Timer(0.5, held.open.set).start()
    stream.drain(10.0)
    assert held.text() == "in flight\n", "drain returned while a batch was still being written"

    # A stream raising an exception LossyStream does not catch: the next lines still go out.
    failing = _Gate(fail_first=True)
    stream = QueuedStream(failing)
    stream.write("lost\n")
    wait_for(lambda: not failing.fail_first, 10, "the stream's first (failing) write")
    stream.write("after\n")
    t0 = time.monotonic()
    stream.drain(5.0)
    assert time.monotonic() - t0 < 4.0 and failing.text() == "after\n", "the writer died with its stream"


def _metrics_url(proc, sock: str) -> str:
    """The metrics URL a daemon started with --metrics-port 0 logged, once it serves ``sock``."""
    wait_socket(sock, proc)

    def url_in_log() -> list[str]:
        return [w for w in _log(proc).decode().split() if w.startswith("http://127.0.0.1:")]
    wait_for(url_in_log, what="the metrics address in the log")
    return url_in_log()[0]


def _metric(url: str, name: str) -> str:
    """The line of the unlabelled metric ``name`` in a scrape of ``url``."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return [line for line in text.splitlines() if line.startswith(name + " ")][0]


def _metrics_daemon(tmp_path, timeout: float | None = None) -> tuple[subprocess.Popen, str, int]:
    """A daemon serving metrics on a free port: (its process, the metrics URL, the port); each
    metrics connection gets ``timeout`` seconds when given (a test knob), else METRICS_TIMEOUT."""
    sock = str(tmp_path / "z.sock")
    hooks, env = [], None
    if timeout is not None:
        hooks, env = ["--test-hooks"], {**os.environ, "ZYGOTE_TEST_METRICS_TIMEOUT": str(timeout)}
    proc = subprocess.Popen([sys.executable, "-m", "zygote", "serve", "--socket", sock, "--metrics-port", "0", *hooks],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        assert "metrics on http://127.0.0.1:" in line, line
        url = line.split()[-1]
        wait_socket(sock, proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, url, int(url.rsplit(":", 1)[1].split("/")[0])


def test_SECURITY_one_local_user_cannot_hold_every_metrics_place(tmp_path):
    """Any local user can connect to the metrics port, and a place is held until its connection
    times out: one user reconnecting kept every place taken, and a scraper running as another
    uid was closed out. One peer (the uid owning the connection's other end) holds at most
    METRICS_PER_PEER places. Fails on the previous server (nobody's 12 connections hold all 8
    places, and root's scrape is closed at once)."""
    import socket
    import time

    from zygote.observe import METRICS_TIMEOUT

    proc, url, port = _metrics_daemon(tmp_path)
    holder = None
    try:
        # 12 connections as uid 65534, each kept open (and sent a byte) for less than the timeout
        r, w = os.pipe()
        holder = os.fork()
        if holder == 0:
            try:
                os.close(r)
                import encodings.idna  # noqa: F401  (the interpreter's files are root's only)
                os.setuid(65534)
                held = [socket.create_connection(("127.0.0.1", port)) for _ in range(12)]
                time.sleep(0.5)
                for s in held:
                    try:
                        s.send(b"G")
                    except OSError:
                        pass
                os.write(w, b"x")
                time.sleep(METRICS_TIMEOUT - 1.5)
            except BaseException as e:
                print("holder:", repr(e), file=sys.stderr, flush=True)
            finally:
                os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"x"
        os.close(r)
        t0 = time.monotonic()
        metrics = urllib.request.urlopen(url, timeout=METRICS_TIMEOUT).read().decode()
        assert time.monotonic() - t0 < 2.0, "the scrape waited for nobody's connections to time out"
        assert os.waitpid(holder, os.WNOHANG) == (0, 0)  # (they were still there)
        assert "zygote_spawns_total" in metrics, metrics[:200]
    finally:
        if holder:
            os.kill(holder, 9)
            os.waitpid(holder, 0)
        proc.terminate()
        proc.wait(30)


def test_SECURITY_idle_metrics_connections_are_bounded(tmp_path):
    """The metrics port takes any local user's TCP connection: prometheus-client's server gave
    each a thread and kept it, idle, for ever (3000 connections: 3000 threads and fds). At most
    METRICS_CONNECTIONS are served at once (more are closed at once) and each connection gets
    METRICS_TIMEOUT in all; a scrape gets through once the idle ones time out. The idle ones
    come from 20 uids, 2 each (a peer's own share, METRICS_PER_PEER, would otherwise hold them
    and leave the overall bound untested: it did, a helper's mutation audit). Fails on the old
    server (a thread per idle connection) and without the overall bound."""
    import socket
    import time

    from zygote.observe import METRICS_CONNECTIONS, METRICS_PER_PEER

    METRICS_TIMEOUT = 2.0  # (a test knob; 5 s in a daemon)
    proc, url, port = _metrics_daemon(tmp_path, METRICS_TIMEOUT)
    holders = []
    try:

        def threads() -> int:
            with open(f"/proc/{proc.pid}/status") as f:
                return int(next(ln for ln in f if ln.startswith("Threads:")).split()[1])

        base = threads()
        r, w = os.pipe()
        for uid in range(5001, 5021):
            pid = os.fork()
            if pid == 0:  # a local user holding its share, a byte now and then (a per-read
                try:      # timeout alone let such connections stay for ever)
                    os.close(r)
                    import encodings.idna  # noqa: F401  (the interpreter's files are root's only)
                    os.setuid(uid)
                    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(METRICS_PER_PEER)]
                    os.write(w, b"x")
                    while True:
                        time.sleep(0.2)
                        for s in held:
                            try:
                                s.send(b"G")
                            except OSError:
                                pass  # (closed at once, or timed out)
                finally:
                    os._exit(0)
            holders.append(pid)
        os.close(w)
        for _ in holders:
            assert os.read(r, 1) == b"x"
        os.close(r)
        time.sleep(0.5)
        # (a thread and a deadline timer per place, and the daemon's own workers)
        assert threads() <= base + 2 * METRICS_CONNECTIONS + 6, (base, threads())
        # A scrape while the idle ones hold every place is closed at once (as a scraper retries):
        # it gets through once they time out.
        deadline = time.monotonic() + METRICS_TIMEOUT + 5
        while True:
            try:
                metrics = urllib.request.urlopen(url, timeout=METRICS_TIMEOUT + 10).read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline, "no scrape got through once the idle ones timed out"
                time.sleep(0.2)
        assert "zygote_spawns_total" in metrics, metrics[:200]
    finally:
        for pid in holders:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        proc.terminate()
        proc.wait(30)
