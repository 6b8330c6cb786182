"""zygote benchmarks: spawn latency, throughput and memory against the alternatives, on this host.

    .venv/bin/python benchmarks/run.py            # ~2-3 minutes
    .venv/bin/python benchmarks/run.py --quick    # ~30 seconds, fewer samples

Prints a table, the ratios and the project's targets as PASS/FAIL lines, and writes everything
(raw samples included) to benchmarks/results/latest.json. See benchmarks/README.md for what each
row measures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import steps  # noqa: E402  (benchmarks/steps.py)
from _baselines import smaps  # noqa: E402  (light to import: pandas only inside its functions)

from zygote_client import DEVNULL, Client, NetworkConfig, SandboxConfig  # noqa: E402

if __name__ != "__main__":
    # Payloads below are sent by value: the zygote cannot import this file.
    import cloudpickle
    cloudpickle.register_pickle_by_value(sys.modules[__name__])

MiB = 1 << 20
RESERVE = 4  # pre-confined children per pool in the reserve rows
LEASES = 2  # reserve children the client holds in the leased row (Client(..., leases=N))
LEASED_TIMEOUT = 30.0  # seconds: the timeout of the leased rows' Jobs that have one
# Where the (f) baseline is measured, in parts spread over the run (see pooled_fork)
FORK_AT = ("before (a)", "after (a) and (b)", "before the reserve rows", "at the end")
perf = time.perf_counter


# ---- payloads (run inside the confined child) ----------------------------------------------------

def byte_payload() -> None:
    """Print one byte and exit."""
    print("x", end="", flush=True)


def sleep_payload() -> None:
    """Say "ready", then sleep until killed (for the memory measurement)."""
    import time as _t
    print("r", end="", flush=True)
    _t.sleep(120)


def net_payload() -> None:
    """Print the names of the child's network interfaces."""
    import socket as _s
    print(",".join(name for _, name in _s.if_nameindex()), end="", flush=True)


# ---- statistics ---------------------------------------------------------------------------------

def pct(s: list[float], p: float) -> float:
    """Nearest-rank percentile of sorted samples."""
    return s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))]


def summary(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"n": len(s), "median_ms": statistics.median(s) * 1e3, "p90_ms": pct(s, 90) * 1e3,
            "p99_ms": pct(s, 99) * 1e3, "min_ms": s[0] * 1e3, "max_ms": s[-1] * 1e3,
            "samples_ms": [round(x * 1e3, 4) for x in samples]}


# ---- (a), (b): zygote ---------------------------------------------------------------------------

def zygote_sample(client: Client, cfg: SandboxConfig | None = None,
                  timeout: float | None = None) -> tuple[float, float, float]:
    """One spawn: (first byte, spawn_child returned, reaped), seconds from calling spawn_child."""
    t0 = perf()
    child = client.spawn_child(byte_payload, sandbox_config=cfg, stdin=DEVNULL, timeout=timeout)
    t_ready = perf()
    b = os.read(child.stdout.fileno(), 1)
    t_first = perf()
    child.stdout.close()
    child.stderr.close()
    st = child.wait()
    t_reaped = perf()
    if b != b"x" or st.returncode != 0:
        raise RuntimeError(f"unexpected child output {b!r} / status {st}")
    return t_first - t0, t_ready - t0, t_reaped - t0


def bench_zygote(client: Client, n: int, cfg: SandboxConfig | None = None, timeout: float | None = None) -> dict:
    for _ in range(10):
        zygote_sample(client, cfg, timeout)  # warm: first spawns fault in the daemon's and client's paths
    first, ready, reaped = [], [], []
    for _ in range(n):
        f, r, x = zygote_sample(client, cfg, timeout)
        first.append(f)
        ready.append(r)
        reaped.append(x)
    return {"first_byte": summary(first), "ready": summary(ready), "reaped": summary(reaped)}


def bench_async_reserve(n: int) -> dict:
    """The reserve row again through the async client in this thread's own event loop: the same
    requests without the blocking client's hop to its loop thread and back."""
    import anyio

    from zygote_client import open_embedded

    async def main() -> list[float]:
        out = []
        async with await open_embedded(preload_imports=["pandas"], daemon_args=["--reserve", str(RESERVE)]) as c:
            await anyio.sleep(1.0)  # let the reserve fill
            for i in range(n + 10):
                t0 = perf()
                child = await c.spawn_child(byte_payload, stdin=DEVNULL)
                b = await child.stdout.receive(1)
                t1 = perf()
                await child.stdout.aclose()
                await child.stderr.aclose()
                st = await child.wait()
                if b != b"x" or st.returncode != 0:
                    raise RuntimeError(f"unexpected child output {b!r} / status {st}")
                if i >= 10:  # the first ten warm the paths, as in bench_zygote
                    out.append(t1 - t0)
                await anyio.sleep(0.03)  # the reserve refills after 25 ms without a take (RESERVE_QUIET)
        return out

    return {"first_byte": summary(anyio.run(main))}


def bench_idle(client: Client, n: int, idle: float = 1.0, cfg: SandboxConfig | None = None,
               timeout: float | None = None) -> dict:
    first = []
    for _ in range(n):
        time.sleep(idle)
        first.append(zygote_sample(client, cfg, timeout)[0])
    return {"first_byte": summary(first), "idle_s": idle}


# Limits put the child in a cgroup of its own (default children get none): the same spawn with
# memory and pids limits shows what the cgroup costs, including the v1 attach stall after idle.
LIMITS = SandboxConfig(memory="256M", pids=64)
# A pool whose default (its ceiling) has limits keeps reserve children with a cgroup; a request
# with tighter limits (LIMITS) takes one and gets its limits written in: no clone, no attach.
RESERVE_LIMITS = {"memory": "512M", "pids": 128}
NET = SandboxConfig(network=NetworkConfig())  # the (b) rows: the pool's network (--network: no allow-list)


def network_available(client: Client) -> tuple[bool, str]:
    """Whether the daemon really gives a child a network (not just accepts the field)."""
    cfg = SandboxConfig(network=NetworkConfig())
    try:
        done = client.run(net_payload, sandbox_config=cfg, timeout=30)
    except Exception as e:  # noqa: BLE001 - any refusal means "not available"
        return False, f"{type(e).__name__}: {e}"
    names = done.stdout.decode(errors="replace").split(",")
    if done.returncode != 0:
        return False, f"the networked child exited {done.returncode}: {done.stderr[-200:]!r}"
    if [n for n in names if n and n != "lo"]:
        return True, "interfaces: " + ",".join(names)
    return False, "the daemon accepts network=NetworkConfig() but the child has only lo"


# ---- memory ---------------------------------------------------------------------------------------

def children_of(pid: int) -> list[int]:
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except FileNotFoundError:
        pass
    return kids


def find_zygote(client: Client, exclude: set[int] = frozenset()) -> int | None:
    daemon = client._aclient._proc.pid
    for pid in children_of(daemon):
        if pid in exclude:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"zygote._zygote" in f.read():
                    return pid
        except FileNotFoundError:
            continue
    return None


def bench_memory(client: Client) -> dict:
    zpid = find_zygote(client)
    res: dict = {"zygote_pid": zpid}
    if zpid is not None:
        res["zygote"] = smaps(zpid)
    child = client.spawn_child(sleep_payload, stdin=DEVNULL)
    try:
        if os.read(child.stdout.fileno(), 1) != b"r":
            raise RuntimeError("the memory child did not report ready")
        time.sleep(0.2)  # let the payload settle after its write
        payload = children_of(child.pid)
        res["pid1"] = smaps(child.pid)  # the payload itself (default) or, with a reaper, the reaper
        if payload:
            res["payload"] = smaps(payload[0])
        res["child_private"] = res["pid1"]["private"] + res.get("payload", {}).get("private", 0)
    finally:
        child.kill()
        child.stdout.close()
        child.stderr.close()
        child.wait()
    return res


# ---- throughput -----------------------------------------------------------------------------------

def cpu_times(pid: int) -> tuple[float, ...]:
    """(user, system, reaped children's user, reaped children's system) CPU seconds of ``pid``,
    then its minor page faults and its reaped children's (counts)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # fields[0] is stat(5)'s field 3
    hz = os.sysconf("SC_CLK_TCK")
    return tuple(int(x) / hz for x in fields[11:15]) + (int(fields[7]), int(fields[8]))


def cpu_owners(clients: list[Client]) -> dict[str, list[int]]:
    """The processes whose CPU a spawn costs: the daemons (their reaped children are the
    zygote's children: each child's CPU is added to its daemon's at the reap) and the zygotes."""
    daemons = sorted({c._aclient._proc.pid for c in clients})
    return {"daemon": daemons, "zygote": [z for z in (find_zygote(c) for c in clients) if z is not None]}


def _per_spawn(before: dict, after: dict, n: int, kind: str, i: int) -> float:
    return sum(after[kind][p][i] - before[kind][p][i] for p in after[kind] if p in before[kind]) / n


def cpu_split(before: dict, after: dict, n: int) -> dict:
    """Milliseconds of CPU per completed spawn, by process kind, from two cpu_owners readings."""
    ms = lambda kind, i: _per_spawn(before, after, n, kind, i) * 1e3
    return {"client": ms("client", 0) + ms("client", 1), "daemon": ms("daemon", 0) + ms("daemon", 1),
            "zygote": ms("zygote", 0) + ms("zygote", 1), "child_user": ms("daemon", 2), "child_system": ms("daemon", 3)}


def fault_split(before: dict, after: dict, n: int) -> dict:
    """Minor page faults per completed spawn: each child's (its whole life, counted at the
    reap), the zygote's (its own pages, shared with each new clone, copied again when it next
    writes them) and the daemon's."""
    return {"child": _per_spawn(before, after, n, "daemon", 5), "zygote": _per_spawn(before, after, n, "zygote", 4),
            "daemon": _per_spawn(before, after, n, "daemon", 4)}


def cow_fault_us(pages: int = 4096) -> float | None:
    """Microseconds one copy-on-write fault costs on this host: a forked child writes one byte
    to each of ``pages`` pages its parent had written (the median of three runs)."""
    import mmap
    runs = []
    for _ in range(3):
        m = mmap.mmap(-1, pages * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            for i in range(pages):
                m[i * mmap.PAGESIZE] = 1
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    t0 = perf()
                    for i in range(pages):
                        m[i * mmap.PAGESIZE] = 2
                    t1 = perf()
                    for i in range(pages):  # the loop alone, its pages now our own
                        m[i * mmap.PAGESIZE] = 3
                    os.write(w, repr((t1 - t0) - (perf() - t1)).encode())
                finally:
                    os._exit(0)
            os.close(w)
            data = os.read(r, 100)
            os.close(r)
            os.waitpid(pid, 0)
            if data:
                runs.append(float(data) / pages * 1e6)
        finally:
            m.close()
    return statistics.median(runs) if runs else None


def bench_throughput(clients: list[Client], duration: float) -> dict:
    """One thread per client, each calling client.run(byte_payload) until the deadline. Also
    the CPU each completed spawn cost, by process: this one (the clients), the daemons, the
    zygotes, and the children (reaped meanwhile, so a few in flight at either end blur it)."""
    counts = [0] * len(clients)
    errors: list[str] = []
    start = threading.Barrier(len(clients) + 1)
    stop_at = [0.0]

    def worker(i: int, c: Client) -> None:
        start.wait()
        try:
            while perf() < stop_at[0]:
                c.run(byte_payload)
                counts[i] += 1
        except Exception as e:  # noqa: BLE001
            errors.append(f"{type(e).__name__}: {e}")

    def reading() -> dict:
        procs = dict(cpu_owners(clients), client=[os.getpid()])
        out: dict = {}
        for kind, pids in procs.items():
            out[kind] = {}
            for pid in pids:
                try:
                    out[kind][pid] = cpu_times(pid)
                except (FileNotFoundError, ProcessLookupError):
                    pass
        return out

    threads = [threading.Thread(target=worker, args=(i, c)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    before = reading()
    stop_at[0] = perf() + duration
    t0 = perf()
    start.wait()
    for t in threads:
        t.join()
    elapsed = perf() - t0
    after = reading()
    n = sum(counts)
    return {"requesters": len(clients), "completed": n, "seconds": elapsed,
            "per_second": n / elapsed, "errors": errors[:3],
            "cpu_ms_per_spawn": cpu_split(before, after, n) if n else None,
            "faults_per_spawn": fault_split(before, after, n) if n else None}


def bench_throughput_runs(clients: list[Client], duration: float, runs: int = 3) -> dict:
    """``bench_throughput`` ``runs`` times back to back; the run with the median rate, with every
    run's rate under "runs". On a shared 2-CPU VM one 5 s run of the same daemon moved between
    143 and 173 per second from one run to the next (host noise, not the daemon's state: the
    spread was the same within one daemon's life as between daemons), so one run decided the
    target's PASS or FAIL by chance."""
    results = [bench_throughput(clients, duration) for _ in range(runs)]
    pick = sorted(results, key=lambda r: r["per_second"])[len(results) // 2]
    return dict(pick, runs=[r["per_second"] for r in results])


# ---- (c), (e): cold processes ----------------------------------------------------------------------

COLD_CODE = "import pandas; print(1)"


def first_byte_of(cmd: list[str]) -> tuple[float, int, bytes]:
    t0 = perf()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    b = p.stdout.read(1)
    t1 = perf()
    _, err = p.communicate()
    return t1 - t0, p.returncode, err


def bench_cold(cmd: list[str], n: int) -> dict:
    _, rc, err = first_byte_of(cmd)  # warm the page cache; also checks the command works
    if rc != 0:
        return {"error": f"exit {rc}: {err.decode(errors='replace')[-300:]}"}
    return {"first_byte": summary([first_byte_of(cmd)[0] for _ in range(n)])}


def bwrap_cmd() -> list[str] | None:
    bw = shutil.which("bwrap")
    if bw is None:
        return None
    # As root, --unshare-all (user namespace included, "-try") works with a read-only host root.
    return [bw, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "--dev", "/dev",
            "--proc", "/proc", sys.executable, "-c", COLD_CODE]


# ---- (d), (f): baselines in a separate small process ---------------------------------------------

def run_baseline(mode: str, n: int) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(k, "1")
    p = subprocess.run([sys.executable, os.path.join(HERE, "_baselines.py"), mode, str(n)],
                       capture_output=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        return {"error": f"exit {p.returncode}: {p.stderr.decode(errors='replace')[-500:]}"}
    return json.loads(p.stdout)


def pooled_fork(runs: list[dict]) -> dict:
    """(f) from its parts: their samples pooled, each part's median kept ("parts"). The target
    ratios compare medians taken minutes apart on a host whose speed drifts (a plain fork measured
    1.8 ms and 4.7 ms in two runs an hour apart): spread over the run, the baseline drifts with
    the rows it is compared to, and the parts show how much the host moved."""
    done = [r for r in runs if "error" not in r]
    if not done:
        return {"error": runs[-1]["error"] if runs else "not measured"}
    out = {k: summary([x for r in done for x in r[k]]) for k in ("first_byte", "reaped")}
    out["parts"] = [{"at": r["at"], "median_ms": statistics.median(r["first_byte"]) * 1e3}
                    if "error" not in r else {"at": r["at"], "error": r["error"]} for r in runs]
    return out


def bench_baseline(mode: str, n: int) -> dict:
    raw = run_baseline(mode, n)
    return raw if "error" in raw else {k: summary(v) for k, v in raw.items()}


# ---- report ---------------------------------------------------------------------------------------

def machine_info() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    try:
        with open("/proc/cmdline") as f:  # a guest kernel that keeps work off idle vCPUs (README)
            packing = [w for w in f.read().split() if w.startswith("sched_vcpu_pack")]
    except OSError:
        packing = []
    return {"kernel": platform.release(), "cpu": cpu, "cpus": os.cpu_count(),
            "python": sys.version.split()[0], "executable": sys.executable,
            "loadavg_start": os.getloadavg(), "vcpu_packing": packing}


def fmt_row(name: str, r: dict | None, key: str = "first_byte", note: str = "") -> str:
    if r is None or "error" in r or r.get(key) is None:
        why = (r or {}).get("error") or (r or {}).get("skipped") or note or "not measured"
        return f"  {name:<58} {'':>5} {'n/a':>9}                       {why}"
    s = r[key]
    return (f"  {name:<58} {s['n']:>5} {s['median_ms']:>9.2f} {s['p90_ms']:>9.2f} {s['p99_ms']:>9.2f}"
            + (f"  {note}" if note else ""))


def med(r: dict | None, key: str = "first_byte") -> float | None:
    if not r or "error" in r or key not in r:
        return None
    return r[key]["median_ms"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="zygote spawn benchmarks (see benchmarks/README.md)")
    ap.add_argument("--quick", action="store_true", help="fewer samples: about 30 s instead of 2-3 min")
    ap.add_argument("-n", "--samples", type=int, default=None, help="warm zygote spawns (default 200, quick 50)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "latest.json"), help="JSON output path")
    ap.add_argument("--no-steps", action="store_true", help="skip the per-step table (steps.py)")
    a = ap.parse_args(argv)
    q = a.quick
    n_warm = a.samples or (50 if q else 200)
    n_idle = 4 if q else 20
    n_cg, n_cg_idle = (20, 3) if q else (50, 10)
    n_cold = 4 if q else 20
    n_fs = 30 if q else 100
    n_fork = 50 if q else 200
    tp_secs = 2.0 if q else 5.0

    t_start = perf()
    info = machine_info()
    res: dict = {"machine": info, "args": {"quick": q, "warm_samples": n_warm, "idle_samples": n_idle,
                                           "cgroup_samples": n_cg, "cgroup_idle_samples": n_cg_idle,
                                           "cold_samples": n_cold, "forkserver_samples": n_fs,
                                           "fork_samples": n_fork, "throughput_seconds": tp_secs},
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    res["cow_fault_us"] = cow_fault_us()  # (forks: before any client's thread exists)
    if info["loadavg_start"][0] > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {info['loadavg_start'][0]:.1f} on {os.cpu_count()} CPUs: "
              "other work on this host will inflate and spread the numbers", file=sys.stderr)

    def say(msg: str) -> None:
        print(f"[{perf() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    fork_runs: list[dict] = []  # (f) in parts spread over the run (FORK_AT), pooled at the end

    def fork_part() -> None:
        at = FORK_AT[len(fork_runs)]
        say(f"(f) os.fork of a warm pandas process, part {len(fork_runs) + 1} of {len(FORK_AT)} ({at})")
        raw = run_baseline("fork", max(10, n_fork // len(FORK_AT)))
        fork_runs.append(dict(raw, at=at))

    clients: list[Client] = []
    try:
        say("starting an embedded daemon + zygote with pandas preloaded (networking on, no reserve)")
        t0 = perf()
        try:
            ca = Client.embedded(preload_imports=["pandas"], daemon_args=["--network"])
        except Exception as e:  # noqa: BLE001 - no CAP_NET_ADMIN or nft: (b) is skipped below
            say(f"  networking unavailable ({type(e).__name__}: {e}); starting without it")
            ca = Client.embedded(preload_imports=["pandas"])
        clients.append(ca)
        res["embedded_start_s"] = perf() - t0

        fork_part()
        say(f"(a) zygote, default confinement: {n_warm} warm spawns")
        res["a_zygote"] = bench_zygote(ca, n_warm)
        say(f"(a) first spawn after 1 s idle: {n_idle} samples")
        res["a_idle"] = bench_idle(ca, n_idle)

        say(f"(a) with memory+pids limits (a cgroup per child): {n_cg} warm, {n_cg_idle} after 1 s idle")
        try:
            res["a_cgroup"] = bench_zygote(ca, n_cg, LIMITS)
            res["a_cgroup_idle"] = bench_idle(ca, n_cg_idle, cfg=LIMITS)
        except Exception as e:  # noqa: BLE001 - e.g. no usable cgroup hierarchy on this host
            res["a_cgroup"] = res["a_cgroup_idle"] = {"error": f"{type(e).__name__}: {e}"[:200]}

        say("memory: zygote and one sleeping child")
        try:
            res["memory"] = bench_memory(ca)
            fm = run_baseline("forkmem", 1)
            if "error" not in fm:
                res["memory"]["fork_baseline"] = fm
                res["memory"]["child_overhead"] = res["memory"]["child_private"] - fm["private"]
        except Exception as e:  # noqa: BLE001
            res["memory"] = {"error": f"{type(e).__name__}: {e}"}

        ok, why = network_available(ca)
        if ok:
            say(f"(b) networked: {n_warm // 2} spawns ({why})")
            res["b_network"] = bench_zygote(ca, n_warm // 2, NET)
        else:
            say(f"(b) networked: not available yet ({why})")
            res["b_network"] = {"skipped": f"not available yet: {why}"}

        fork_part()
        say(f"throughput: 1 requester, {tp_secs:.0f} s")
        res["throughput_1"] = bench_throughput([ca], tp_secs)
        say("throughput: 2 requesters, each with its own Client.embedded")
        cb = Client.embedded(preload_imports=["pandas"])
        clients.append(cb)
        zygote_sample(cb)
        res["throughput_2"] = bench_throughput([ca, cb], tp_secs)
        say("throughput: 2 requesters sharing one client (one daemon)")
        res["throughput_2_shared"] = bench_throughput([ca, ca], tp_secs)
        for c in (ca, cb):
            c.close()
        clients.clear()

        fork_part()
        say(f"(a) with a reserve of {RESERVE} pre-confined children: {n_warm} warm, {n_idle} after 1 s idle")
        cr = Client.embedded(preload_imports=["pandas"], daemon_args=["--reserve", str(RESERVE)])
        clients.append(cr)
        time.sleep(1.0)  # let the reserve fill
        res["a_reserve"] = bench_zygote(cr, n_warm)
        res["a_reserve_idle"] = bench_idle(cr, n_idle)
        say(f"(a) with a reserve, async client in its own loop: {n_warm // 2} spawns 30 ms apart")
        try:
            res["a_reserve_async"] = bench_async_reserve(n_warm // 2)
        except Exception as e:  # noqa: BLE001 - a row, not the run
            res["a_reserve_async"] = {"error": f"{type(e).__name__}: {e}"}
        say(f"(a) reserve, the client holding {LEASES} leased children: {n_warm} warm, {n_idle} after 1 s idle")
        try:
            cl = Client.embedded(preload_imports=["pandas"], daemon_args=["--reserve", str(RESERVE)], leases=LEASES)
            clients.append(cl)
            time.sleep(1.0)
            res["a_reserve_leased"] = bench_zygote(cl, n_warm)
            res["a_reserve_leased_idle"] = bench_idle(cl, n_idle)
            # A Job with a timeout of its own: the client tells the daemon (Begun), which the
            # untimed rows above do not pay (docs/architecture.md, "Leased reserve children").
            res["a_reserve_leased_timed"] = bench_zygote(cl, n_warm // 2, timeout=LEASED_TIMEOUT)
            res["a_reserve_leased_timed_idle"] = bench_idle(cl, n_idle, timeout=LEASED_TIMEOUT)
            cl.close()
            clients.remove(cl)
        except Exception as e:  # noqa: BLE001 - a row, not the run
            res["a_reserve_leased"] = {"error": f"{type(e).__name__}: {e}"[:200]}
        say("throughput with a reserve: 2 requesters sharing one daemon (the production shape)")
        time.sleep(1.0)
        res["throughput_2_reserve_shared"] = bench_throughput_runs([cr, cr], tp_secs)  # (the target's row)
        say("throughput with reserves: 2 requesters, each with its own Client.embedded")
        cr2 = Client.embedded(preload_imports=["pandas"], daemon_args=["--reserve", str(RESERVE)])
        clients.append(cr2)
        time.sleep(1.0)
        res["throughput_2_reserve"] = bench_throughput([cr, cr2], tp_secs)
        for c in (cr, cr2):
            c.close()
        clients.clear()

        if ok:
            say(f"(b) with a networked reserve of {RESERVE}: {n_warm // 2} warm, {n_idle} after 1 s idle")
            try:
                cn = Client.embedded(preload_imports=["pandas"],
                                     daemon_args=["--network", "--reserve-network", str(RESERVE)])
                clients.append(cn)
                time.sleep(1.0)  # let the reserve fill
                res["b_network_reserve"] = bench_zygote(cn, n_warm // 2, NET)
                res["b_network_reserve_idle"] = bench_idle(cn, n_idle, cfg=NET)
                cn.close()
                clients.remove(cn)
            except Exception as e:  # noqa: BLE001 - a row, not the run
                res["b_network_reserve"] = {"error": f"{type(e).__name__}: {e}"[:200]}

        say(f"(a) + limits with a reserve (pool default {RESERVE_LIMITS}): {n_cg} warm, {n_cg_idle} after 1 s idle")
        try:
            with tempfile.TemporaryDirectory(prefix="zg-bench-") as d:
                toml = os.path.join(d, "pool.toml")
                with open(toml, "w") as f:
                    f.write("[pools.default.sandbox]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in RESERVE_LIMITS.items()))
                crl = Client.embedded(preload_imports=["pandas"],
                                      daemon_args=["--reserve", str(RESERVE), "--config", toml])
            clients.append(crl)
            time.sleep(1.0)
            res["a_cgroup_reserve"] = bench_zygote(crl, n_cg, LIMITS)
            res["a_cgroup_reserve_idle"] = bench_idle(crl, n_cg_idle, cfg=LIMITS)
        except Exception as e:  # noqa: BLE001 - e.g. no usable cgroup hierarchy on this host
            res["a_cgroup_reserve"] = res["a_cgroup_reserve_idle"] = {"error": f"{type(e).__name__}: {e}"[:200]}
    finally:
        for c in clients:
            try:
                c.close()
            except Exception as e:  # noqa: BLE001
                print(f"closing a client: {e}", file=sys.stderr)

    say(f"(c) cold python -c {COLD_CODE!r}: {n_cold} samples")
    res["c_cold"] = bench_cold([sys.executable, "-c", COLD_CODE], n_cold)
    say(f"(d) multiprocessing forkserver, pandas preloaded: {n_fs} samples")
    res["d_forkserver"] = bench_baseline("forkserver", n_fs)
    cmd = bwrap_cmd()
    if cmd is None:
        say("(e) bubblewrap: skipped (bwrap not installed; run benchmarks/setup.sh)")
        res["e_bwrap"] = {"skipped": "bwrap not installed (benchmarks/setup.sh installs it)"}
    else:
        say(f"(e) bubblewrap + python + pandas: {n_cold} samples")
        res["e_bwrap"] = bench_cold(cmd, n_cold)
        res["e_bwrap"]["command"] = " ".join(cmd)
    fork_part()
    res["f_fork"] = pooled_fork(fork_runs)

    if not a.no_steps:
        say("per-step costs (steps.py)")
        res["steps"] = steps.measure(quick=q)
    res["machine"]["loadavg_end"] = os.getloadavg()
    res["elapsed_s"] = perf() - t_start

    report(res)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nwrote {os.path.relpath(a.out)} ({res['elapsed_s']:.0f} s)")
    return 0


def report(res: dict) -> None:
    m = res["machine"]
    print(f"\nzygote benchmarks — {m['cpu']} ×{m['cpus']}, kernel {m['kernel']}, Python {m['python']}, "
          f"load {m['loadavg_start'][0]:.1f} → {m['loadavg_end'][0]:.1f}")
    if m.get("vcpu_packing"):
        print(f"  (guest kernel with {' '.join(m['vcpu_packing'])}: processes that hand work to each other tend to "
              "share one vCPU, so a spawn's latency is the sum of their work; see benchmarks/README.md)")
    print(f"\n  {'spawn → first byte the child prints (ms)':<58} {'n':>5} {'median':>9} {'p90':>9} {'p99':>9}")
    a, idle = res["a_zygote"], res["a_idle"]
    print(fmt_row("(a) zygote, default confinement, pandas preloaded", a))
    print(fmt_row("    ... spawn_child returned (child reported ready)", a, "ready"))
    print(fmt_row("    ... spawn → exit reported (wait returned)", a, "reaped"))
    print(fmt_row(f"(a) first spawn after {idle['idle_s']:.0f} s idle", idle))
    print(fmt_row("(a) + memory/pids limits (cgroup per child)", res.get("a_cgroup")))
    print(fmt_row("    ... first spawn after 1 s idle", res.get("a_cgroup_idle")))
    print(fmt_row(f"    ... with a reserve of {RESERVE} (pool default {'/'.join(map(str, RESERVE_LIMITS.values()))})",
                  res.get("a_cgroup_reserve")))
    print(fmt_row("        ... first spawn after 1 s idle", res.get("a_cgroup_reserve_idle")))
    print(fmt_row(f"(a) with a reserve of {RESERVE} pre-confined children", res.get("a_reserve")))
    print(fmt_row("    ... first spawn after 1 s idle", res.get("a_reserve_idle")))
    print(fmt_row("    ... async client, 30 ms apart (no thread hop)", res.get("a_reserve_async")))
    print(fmt_row(f"    ... client holding {LEASES} leased children (Job written to one)", res.get("a_reserve_leased")))
    print(fmt_row("        ... first spawn after 1 s idle", res.get("a_reserve_leased_idle")))
    print(fmt_row(f"        ... each with a timeout ({LEASED_TIMEOUT:g} s)", res.get("a_reserve_leased_timed")))
    print(fmt_row("            ... first spawn after 1 s idle", res.get("a_reserve_leased_timed_idle")))
    print(fmt_row("(b) zygote + network (veth)", res["b_network"]))
    print(fmt_row(f"    ... with a networked reserve of {RESERVE} (veths made ahead)", res.get("b_network_reserve")))
    print(fmt_row("        ... first spawn after 1 s idle", res.get("b_network_reserve_idle")))
    print(fmt_row("(c) cold `python -c \"import pandas; print(1)\"`", res["c_cold"]))
    print(fmt_row("(d) multiprocessing forkserver, pandas preloaded", res["d_forkserver"]))
    print(fmt_row("(e) bubblewrap --unshare-all + python + pandas", res["e_bwrap"]))
    print(fmt_row("(f) os.fork() of a warm pandas process", res["f_fork"]))
    print(fmt_row("    ... fork → reaped", res["f_fork"], "reaped"))
    parts = (res["f_fork"] or {}).get("parts") or []
    if parts:
        print(f"      (its {len(parts)} parts over the run, medians: "
              + " / ".join(f"{p['median_ms']:.2f}" if "median_ms" in p else "error" for p in parts)
              + " ms)")

    print("\n  sustained spawn+exit (client.run of a one-byte payload)")
    for key, label in (("throughput_1", "1 requester"), ("throughput_2", "2 requesters, own Client.embedded each"),
                       ("throughput_2_shared", "2 requesters sharing one Client (one daemon)"),
                       ("throughput_2_reserve_shared", f"2 requesters sharing one daemon, reserve {RESERVE}"),
                       ("throughput_2_reserve", f"2 requesters, own Client.embedded each, reserve {RESERVE}")):
        t = res.get(key)
        if t:
            err = f"  errors: {t['errors']}" if t["errors"] else ""
            print(f"  {label:<58} {t['per_second']:>8.1f} /s  ({t['completed']} in {t['seconds']:.1f} s){err}")
            if len(t.get("runs") or ()) > 1:
                print(f"      (the median of {len(t['runs'])} runs: " + " / ".join(f"{x:.1f}" for x in t["runs"]) + " /s)")
    cpu = (res.get("throughput_2_reserve_shared") or {}).get("cpu_ms_per_spawn")
    if cpu:
        total = sum(cpu.values())
        cores = os.cpu_count() or 1
        rate = res["throughput_2_reserve_shared"]["per_second"]
        print(f"  CPU per spawn+exit in the shared-daemon reserve row (ms): client {cpu['client']:.2f}, "
              f"daemon {cpu['daemon']:.2f}, zygote {cpu['zygote']:.2f}, child {cpu['child_user']:.2f} user + "
              f"{cpu['child_system']:.2f} system = {total:.2f}\n"
              f"  ({cores} CPUs: at most ~{cores * 1000 / total:.0f} /s at that cost; "
              f"{rate * total / 10 / cores:.0f}% of the CPUs used)")
        flt = res["throughput_2_reserve_shared"].get("faults_per_spawn")
        cow = res.get("cow_fault_us")
        if flt:
            cost = (f"; one copy-on-write fault costs {cow:.1f} µs here, so the child's are up to "
                    f"~{flt['child'] * cow / 1e3:.1f} ms of its CPU") if cow else ""
            print(f"  page faults per spawn+exit: child {flt['child']:.0f}, zygote {flt['zygote']:.0f}, "
                  f"daemon {flt['daemon']:.0f}{cost}\n"
                  f"  (a child's writes to the zygote's pages, reference counts above all: see benchmarks/README.md)")

    mem = res.get("memory", {})
    print("\n  memory (smaps_rollup)                                          Rss        Pss    Private")
    if "error" in mem:
        print(f"  n/a: {mem['error']}")
    for key, label in (("zygote", "zygote process (pandas preloaded)"),
                       ("pid1", "child: PID 1 (the payload itself; default: no reaper)"),
                       ("payload", "child: payload process under a reaper (sleeping)"),
                       ("fork_baseline", "baseline: os.fork child, same payload, no zygote")):
        if key in mem:
            s = mem[key]
            print(f"  {label:<58} {s['rss'] / MiB:>8.1f}M {s['pss'] / MiB:>8.1f}M {s['private'] / MiB:>8.2f}M")
    if "child_private" in mem:
        print(f"  {'child total private (all its processes)':<58} {'':>19} {mem['child_private'] / MiB:>8.2f}M")
    if "child_overhead" in mem:
        print(f"  {'child overhead beyond the payload (total - baseline)':<58} {'':>19} "
              f"{mem['child_overhead'] / MiB:>8.2f}M")

    a_m = med(a)
    ratios = {}
    print("\n  ratios of medians (first byte)")
    for key, label in (("c_cold", "a/c"), ("d_forkserver", "a/d"), ("e_bwrap", "a/e"), ("f_fork", "a/f")):
        x = med(res[key])
        if a_m and x:
            ratios[label] = a_m / x
            print(f"  {label} = {a_m:.2f} / {x:.2f} ms = {a_m / x:.3f}   ({x / a_m:.1f}× the zygote's latency)")
        else:
            print(f"  {label} = n/a")
    b_m = med(res["b_network"])
    if a_m and b_m:
        ratios["b/a"] = b_m / a_m
    res["ratios"] = ratios

    targets = []

    def target(label: str, value: float | None, ok: bool | None, shown: str) -> None:
        verdict = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        targets.append({"target": label, "verdict": verdict, "value": value})
        print(f"  {verdict}  {label:<62} {shown}")

    print("\n  targets  (r = the reserve rows: the spawn path a request matching its pool's default takes;"
          "\n           the first line is without the reserve, as the target asks)")
    f_m, c_m, d_m, e_m = med(res["f_fork"]), med(res["c_cold"]), med(res["d_forkserver"]), med(res["e_bwrap"])
    # The reserve rows: the fastest of the daemon-served and the leased one (both blocking client,
    # back to back); the target line says which.
    r_key = min((k for k in ("a_reserve", "a_reserve_leased") if med(res.get(k))),
                key=lambda k: med(res.get(k)), default="a_reserve")
    r_m, ri_m = med(res.get(r_key)), med(res.get(r_key + "_idle"))
    best = r_m or a_m  # the fastest confined path this run measured
    i_m = ri_m if r_m else med(idle)
    target("confined spawn→first byte median ≤ 1.5× os.fork (f), no reserve", a_m / f_m if f_m else None,
           a_m <= 1.5 * f_m if f_m else None, f"{a_m:.2f} ms vs 1.5 × {f_m:.2f} ms" if f_m else "(f) n/a")
    target(f"with the reserve ≤ 0.25× os.fork (f)  [{r_key}]", r_m / f_m if (r_m and f_m) else None,
           r_m <= 0.25 * f_m if (r_m and f_m) else None,
           f"{r_m:.2f} ms vs 0.25 × {f_m:.2f} ms" if (r_m and f_m) else "n/a")
    target("≥ 80× faster than cold python + pandas (c)  [r]", c_m / best if c_m else None,
           c_m / best >= 80 if c_m else None, f"{c_m / best:.1f}×" if c_m else "(c) n/a")
    target("≥ 80× faster than bubblewrap + python + pandas (e)  [r]", e_m / best if e_m else None,
           e_m / best >= 80 if e_m else None, f"{e_m / best:.1f}×" if e_m else "(e) n/a")
    target("≤ 0.6× forkserver with pandas preloaded (d)  [r]", best / d_m if d_m else None,
           best <= 0.6 * d_m if d_m else None, f"{best / d_m:.2f}×" if d_m else "(d) n/a")
    target("first spawn after 1 s idle ≤ 2× warm median  [r]", i_m / best, i_m <= 2 * best,
           f"{i_m:.2f} ms vs 2 × {best:.2f} ms")
    # One daemon serving both requesters, as a host runs it (the rows above show the others).
    t2 = (res.get("throughput_2_reserve_shared") or res.get("throughput_2", {})).get("per_second")
    target("≥ 150 spawn+exit per second with 2 requesters  [r]", t2, t2 >= 150 if t2 is not None else None,
           f"{t2:.1f} /s" if t2 is not None else "n/a")
    target("networked spawn ≤ 3× default", b_m / a_m if b_m else None, b_m <= 3 * a_m if b_m else None,
           f"{b_m / a_m:.2f}×" if b_m else "networked children not available yet")
    # "Beyond its payload": the child's private memory (all its processes) minus what the same
    # trivial payload dirties in a plain fork of a warm pandas process (the forkmem baseline).
    co = mem.get("child_overhead")
    target("each child's private memory ≤ 2 MB beyond its payload", co,
           co <= 2 * MiB if co is not None else None,
           f"{co / MiB:.2f} MiB = {mem['child_private'] / MiB:.2f} (the child) - "
           f"{mem['fork_baseline']['private'] / MiB:.2f} (plain fork, same payload)" if co is not None else "n/a")
    res["targets"] = targets

    if "steps" in res:
        print("\n  per-step costs (benchmarks/steps.py; µs; medians unless noted)\n")
        print(steps.format_table(res["steps"]))


if __name__ == "__main__":
    sys.exit(main())
