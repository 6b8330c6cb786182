"""Observability: a structured log line per spawn and per exit, `zygote status`, Prometheus metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

from zygote_client import Client, DaemonError, SandboxError

from conftest import wait_socket


def test_logs_status_and_metrics(tmp_path):
    sock = str(tmp_path / "z.sock")
    proc = subprocess.Popen([sys.executable, "-m", "zygote", "serve", "--socket", sock, "--metrics-port", "0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "metrics on http://127.0.0.1:" in line, line
        url = line.split()[-1]
        wait_socket(sock, proc)
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


def test_log_lines_past_the_queue_are_dropped_and_counted():
    """The log's queue is bounded: with its reader stalled, lines past it are dropped (not held
    in memory), and the writer says how many once the reader reads again."""
    import time

    from zygote.observe import QueuedStream

    class Small(QueuedStream):
        QUEUE_ITEMS = 10

    r, w = os.pipe()
    out = os.fdopen(w, "w")
    stream = Small(out)
    line = "x" * 1023 + "\n"
    for _ in range(200):  # 64 fill the pipe, 10 wait in the queue (one more in the writer's hand)
        stream.write(line)
    got = b""
    deadline = time.monotonic() + 10
    while b"log-lines-dropped" not in got and time.monotonic() < deadline:
        got += os.read(r, 1 << 16)
    assert b"log-lines-dropped" in got
    time.sleep(0.5)  # what is still queued behind the note
    os.set_blocking(r, False)
    try:
        while chunk := os.read(r, 1 << 16):
            got += chunk
    except BlockingIOError:
        pass
    dropped = json.loads(got[got.index(b'{"event": "log-lines-dropped"'):].split(b"\n")[0])["lines"]
    assert dropped >= 200 - 64 - 11 and dropped + got.count(line.encode()) == 200
    os.close(r)


def test_a_burst_of_log_lines_reaches_the_stream_in_a_few_writes():
    """Only the first line into an empty queue wakes the log's writer, which gathers the lines
    that follow into one write: a daemon logging a spawn and an exit per child does not wake a
    thread (and trade the GIL with it) twice per spawn. Every line still arrives, in order, and
    a drain at exit does not wait for the gathering to end."""
    import threading
    import time

    from zygote.observe import QueuedStream

    class Recorder:
        def __init__(self) -> None:
            self.writes: list[str] = []
            self.lock = threading.Lock()

        def write(self, text: str) -> None:
            with self.lock:
                self.writes.append(text)

        def flush(self) -> None:
            pass

    class Slow(QueuedStream):
        GATHER_SECONDS = 5.0  # longer than the test waits: only drain() can cut it short

    out = Recorder()
    stream = Slow(out)
    lines = [f"line {i}\n" for i in range(200)]
    for line in lines:
        stream.write(line)
    t0 = time.monotonic()
    stream.drain(10.0)
    assert time.monotonic() - t0 < 4.0, "drain waited for the writer's gathering to end"
    assert "".join(out.writes) == "".join(lines)
    assert len(out.writes) <= 3, f"{len(out.writes)} writes for one burst of 200 lines"
