"""What the daemon tells operators: one structured log line per spawn and per exit, counters for
``zygote status``, and Prometheus metrics on an optional local port.

Logs go through structlog to stderr (JSON lines by default, ``console`` for people), so journald
or a collector gets one parseable event per spawn and per exit. Metrics use prometheus-client with
a registry of the daemon's own (never the process-global one) and no per-child labels: label values
come from small fixed sets (outcome, reason, pool), so the series count stays bounded.
"""

from __future__ import annotations

import atexit
import logging
import socket
import struct
import sys
import threading
import time
from collections import Counter, deque
from wsgiref.simple_server import WSGIRequestHandler, make_server

import structlog
from prometheus_client import CollectorRegistry, Counter as PCounter, Gauge, Histogram
from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

# The metrics port takes any local user's connection (no SO_PEERCRED on TCP): a thread each, so
# they are bounded (past METRICS_CONNECTIONS a new one is closed at once) and each has
# METRICS_TIMEOUT seconds in all. prometheus-client's own server had neither: 3000 idle
# connections from a uid the socket refuses made 3000 threads and fds (a helper's review). One
# peer, the uid that owns the other end (sock_diag) or else its address, holds at most
# METRICS_PER_PEER of the places, so a local user reconnecting in a loop cannot keep a scraper
# running as another uid out.
METRICS_CONNECTIONS = 8
METRICS_PER_PEER = 2
METRICS_TIMEOUT = 5.0


class _MetricsHandler(WSGIRequestHandler):
    timeout = METRICS_TIMEOUT  # (StreamRequestHandler: set on the connection before it is read)

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass  # (no access log on the daemon's stderr)


def _cut_off(request) -> None:
    try:
        request.shutdown(socket.SHUT_RDWR)  # (its thread's read or write returns; it closes it)
    except OSError:
        pass


def _peer_uid(request) -> int | None:
    """The uid owning the other end of accepted TCP connection ``request`` when that end is a
    socket of this host (an exact sock_diag lookup, as `ss -p` makes), else None."""
    from pyroute2.netlink import NLM_F_REQUEST
    from pyroute2.netlink.diag import SOCK_DIAG_BY_FAMILY, DiagSocket, inet_diag_req

    peer, local = request.getpeername(), request.getsockname()
    family = request.family
    if family == socket.AF_INET6 and peer[0].startswith("::ffff:") and "." in peer[0]:
        family, peer, local = socket.AF_INET, (peer[0][7:], peer[1]), (local[0].rsplit(":", 1)[-1], local[1])

    def words(addr: str) -> tuple[int, int, int, int]:
        raw = socket.inet_pton(family, addr).ljust(16, b"\0")
        return struct.unpack(">4I", raw)

    req = inet_diag_req()
    req["sdiag_family"], req["sdiag_protocol"], req["idiag_states"] = family, socket.IPPROTO_TCP, 0xFFFFFFFF
    # the peer's own socket: its local end is our peer, its remote end us
    req["idiag_sport"], req["idiag_dport"] = peer[1], local[1]
    req["idiag_src"], req["idiag_dst"] = words(peer[0]), words(local[0])
    req["idiag_if"], req["idiag_cookie"] = 0, 0xFFFFFFFFFFFFFFFF  # (no cookie: look it up by its addresses)
    with DiagSocket() as diag:
        diag.bind()
        for msg in diag.nlm_request(req, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST):
            return int(msg["idiag_uid"])
    return None


def _peer_key(request, client_address) -> tuple:
    try:
        uid = _peer_uid(request)
    except Exception:  # noqa: BLE001 - (gone already, another host, no sock_diag): by address
        uid = None
    return ("uid", uid) if uid is not None else ("address", client_address[0])


class _MetricsServer(ThreadingWSGIServer):
    request_queue_size = 64

    def __init__(self, *args, **kwargs) -> None:
        self._lock = threading.Lock()
        self._held: dict[tuple, int] = {}  # peer key -> places held
        self._key_of: dict = {}  # accepted socket -> its peer key (one per place taken)
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:
        key = _peer_key(request, client_address)
        with self._lock:
            if self._held.get(key, 0) >= METRICS_PER_PEER or len(self._key_of) >= METRICS_CONNECTIONS:
                self.shutdown_request(request)  # (closed unread: a scraper retries)
                return
            self._held[key] = self._held.get(key, 0) + 1
            self._key_of[request] = key
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(request)
            raise

    def _release(self, request) -> None:
        with self._lock:
            key = self._key_of.pop(request)
            self._held[key] -= 1
            if not self._held[key]:
                del self._held[key]

    def process_request_thread(self, request, client_address) -> None:
        # A whole request gets METRICS_TIMEOUT: the per-read timeout alone let a client sending a
        # byte every few seconds hold its place for hours (8 such held every scrape off).
        cut = threading.Timer(self.RequestHandlerClass.timeout, _cut_off, (request,))
        cut.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            cut.cancel()
            self._release(request)

    def handle_error(self, request, client_address) -> None:
        pass  # a connection that timed out or went: nothing to report on the daemon's stderr

_SPAWN_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


LOG_TEXT_MAX = 2000  # characters of one text field in a log line


def _clip_texts(_logger, _method, event: dict) -> dict:
    """Cut each text field of a log event at LOG_TEXT_MAX characters. Many come from clients (a
    pool name, an error quoting a request): a 70 MiB pool name went into the log whole, twice
    (as itself and quoted in the message), and each line waiting in the queue held its size."""
    for key, value in event.items():
        if isinstance(value, str) and len(value) > LOG_TEXT_MAX:
            event[key] = f"{value[:LOG_TEXT_MAX]}... ({len(value)} characters, cut)"
    return event


def configure_logging(fmt: str = "json", level: str = "info", stream=None) -> None:
    """Route the daemon's events to ``stream`` (stderr) as JSON lines or console text."""
    renderer = (structlog.processors.JSONRenderer() if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[_clip_texts, structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    renderer],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(QueuedStream(stream or sys.stderr)),
        cache_logger_on_first_use=False,
    )


class LossyStream:
    """A text stream (the log, the daemon's stderr) whose lines that cannot be written are
    dropped: a collector that went away (EPIPE), a closed or absent stderr, a full disk must not
    turn a log call into an exception in the middle of reaping a child."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> None:
        try:
            self._stream.write(text)
        except (OSError, ValueError, AttributeError):
            pass

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError, AttributeError):
            pass


class QueuedStream:
    """The log's stream as the daemon sees it: lines go into a list and a thread of their own
    writes them. A log reader that stops reading (a paused terminal, a stuck journald, a pipe
    nobody drains) stalls that thread only, never the event loop: past QUEUE_ITEMS lines held
    (waiting, or taken by the writer and not yet written), new lines are dropped, and a line
    after the next batch written says how many. At exit the lines held get DRAIN_SECONDS to reach the
    stream (a process killed outright loses what it held, up to GATHER_SECONDS of lines).

    Only the first line into an empty list wakes the writer, which then waits GATHER_SECONDS for
    more and writes them in chunks of CHUNK_CHARS: a spawn and an exit log a line each, and a
    wake-up of the writer per line (a futex call, then the two threads trading the GIL) cost a
    busy daemon about 8 context switches and 0.1-0.3 ms of CPU per spawn; in batches it is a few
    wake-ups per second."""

    QUEUE_ITEMS = 20000
    DRAIN_SECONDS = 2.0
    GATHER_SECONDS = 0.05
    CHUNK_CHARS = 65536

    def __init__(self, stream) -> None:
        self._stream = LossyStream(stream)
        self._lines: deque[str] = deque()
        self._held = 0  # lines the writer took and has not finished writing (they count as held)
        self._dropped = 0
        self._hurry = False  # exiting: no more gathering
        self._cond = threading.Condition(threading.Lock())
        threading.Thread(target=self._run, name="zygote-log", daemon=True).start()
        atexit.register(self.drain, self.DRAIN_SECONDS)

    def write(self, text: str) -> None:
        with self._cond:
            if len(self._lines) + self._held >= self.QUEUE_ITEMS:
                self._dropped += 1
                return
            self._lines.append(text)
            if len(self._lines) == 1:
                self._cond.notify()  # (the writer waits only for an empty list to fill)

    def flush(self) -> None:
        pass  # the writer flushes after every chunk

    def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            self._hurry = True
            self._cond.notify_all()
            while self._lines or self._held:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._lines:
                    self._cond.wait()
                if not self._hurry:
                    self._cond.wait(self.GATHER_SECONDS)  # (cut short by drain only)
                lines, self._lines = self._lines, deque()
                self._held = len(lines)
                # Dropped since the last batch was taken (the note follows this batch: mostly
                # after its lines, since a full list takes none until the last batch is written).
                dropped, self._dropped = self._dropped, 0
            try:
                while lines:  # (each line let go once it is in a chunk)
                    chunk, size = [], 0
                    while lines and size < self.CHUNK_CHARS:
                        chunk.append(lines.popleft())
                        size += len(chunk[-1])
                    self._stream.write("".join(chunk))
                    self._stream.flush()
                if dropped:
                    self._stream.write(f'{{"event": "log-lines-dropped", "lines": {dropped}, '
                                       '"message": "the log reader did not keep up"}\n')
                    self._stream.flush()
            except Exception:  # noqa: BLE001 - what LossyStream does not drop
                pass  # (the batch is lost, not the writer)
            finally:
                with self._cond:
                    self._held = 0
                    self._cond.notify_all()  # (a drain waiting for the last batch)


_LIMIT_FLAGS = (("timed_out", "timeout"), ("memory_exceeded", "memory"), ("pids_exceeded", "pids"),
                ("cpu_time_exceeded", "cpu_time"), ("output_exceeded", "output"))


def limits_hit(status) -> list[str]:
    return [word for flag, word in _LIMIT_FLAGS if getattr(status, flag, False)]


def exit_reason(status) -> str:
    """One word for why a child ended (a bounded label value)."""
    hit = limits_hit(status)
    if hit:
        return hit[0]
    if status.pool_reloaded:
        return "reload"
    if status.returncode == 0:
        return "ok"
    return "signal" if status.returncode < 0 else "error"


class Observer:
    """Counters and metrics of one daemon; ``log`` is its structlog logger."""

    def __init__(self) -> None:
        self.log = structlog.get_logger("zygote")
        self.started = time.monotonic()
        self.counters: Counter[str] = Counter()
        self.registry = CollectorRegistry(auto_describe=True)
        self._spawns = PCounter("zygote_spawns", "Spawn requests by outcome",
                                ["outcome"], registry=self.registry)
        self._spawn_seconds = Histogram("zygote_spawn_duration_seconds",
                                        "From request to ready (or failure), seconds",
                                        ["outcome"], buckets=_SPAWN_BUCKETS, registry=self.registry)
        self._exits = PCounter("zygote_exits", "Children reaped, by why they ended",
                               ["reason"], registry=self.registry)
        self._running = Gauge("zygote_children_running", "Children running for clients now (held leased ones "
                              "included, waiting reserve children not)", registry=self.registry)
        self._connections = Gauge("zygote_connections", "Client connections open now", registry=self.registry)
        self._kept = Gauge("zygote_detached_kept", "Ended detached children kept for a later attach now",
                           registry=self.registry)
        self._server = None

    def watch_pools(self, pools) -> None:
        """Report zygote restarts per pool from ``pools()`` (name -> Pool) at each scrape."""
        self.registry.register(_PoolCollector(pools))

    def watch_running(self, running) -> None:
        """zygote_children_running is ``running()`` at each scrape (read from the metrics thread: a
        length or two, never stale as a value set at the last spawn or exit was)."""
        self._running.set_function(running)

    def watch_kept(self, kept) -> None:
        """zygote_detached_kept is ``kept()`` at each scrape (a length, read from the metrics thread)."""
        self._kept.set_function(kept)

    def serve_metrics(self, port: int, addr: str = "127.0.0.1", timeout: float = METRICS_TIMEOUT) -> int:
        """Expose /metrics on addr:port (a thread serving at most METRICS_CONNECTIONS at once, in
        threads of their own, each for at most ``timeout`` seconds); returns the bound port."""
        server_cls = type("_Server", (_MetricsServer,),
                          {"address_family": socket.AF_INET6 if ":" in addr else socket.AF_INET})
        handler_cls = type("_Handler", (_MetricsHandler,), {"timeout": timeout})
        self._server = make_server(addr, port, make_wsgi_app(self.registry), server_cls,
                                   handler_class=handler_cls)
        threading.Thread(target=self._server.serve_forever, name="zygote-metrics", daemon=True).start()
        return self._server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def connection(self, delta: int) -> None:
        self._connections.inc(delta)

    def spawned(self, *, outcome: str, seconds: float, child: str | None, pool: str, peer_uid: int,
                **fields) -> None:
        self.counters[f"spawns_{outcome}"] += 1
        self._spawns.labels(outcome).inc()
        self._spawn_seconds.labels(outcome).observe(seconds)
        level = self.log.info if outcome == "ok" else self.log.warning
        level("spawn", outcome=outcome, child=child, pool=pool, peer_uid=peer_uid,
              spawn_ms=round(seconds * 1000, 3), **fields)

    def exited(self, *, child: str, pool: str, peer_uid: int, status) -> None:
        reason = exit_reason(status)
        self.counters[f"exits_{reason}"] += 1
        self._exits.labels(reason).inc()
        limits = limits_hit(status)
        self.log.info("exit", child=child, pool=pool, peer_uid=peer_uid, reason=reason,
                      returncode=status.returncode, wall_s=round(status.wall_time, 4),
                      cpu_user_s=status.cpu_user, cpu_system_s=status.cpu_system,
                      peak_memory=status.peak_memory, limits_hit=limits)


class _PoolCollector:
    def __init__(self, pools) -> None:
        self._pools = pools

    def describe(self):
        return []  # unknown until collected: pools come and go with SIGHUP

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        restarts = GaugeMetricFamily("zygote_zygote_restarts", "Zygote restarts since the pool started",
                                     labels=["pool"])
        running = GaugeMetricFamily("zygote_zygotes_running", "Zygote processes alive", labels=["pool"])
        stuck = GaugeMetricFamily("zygote_zygotes_stuck", "Zygotes killed and replaced but held in the kernel "
                                  "(a file system that stopped answering)", labels=["pool"])
        for name, pool in list(self._pools().items()):
            restarts.add_metric([name], pool.restarts)
            running.add_metric([name], sum(1 for z in pool.zygotes if not z.dead.is_set()))
            stuck.add_metric([name], pool.stuck)
        yield restarts
        yield running
        yield stuck
