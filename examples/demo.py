"""zygote in one screen: warm pandas children in milliseconds, each one confined.

1. Start an embedded daemon + zygote that imports pandas once, keeping a reserve of two children
   cloned and confined ahead of requests.
2. Spawn five confined children that compute with pandas, a tenth of a second apart as an
   interactive user would; time each from the spawn_child call to the first byte of its stdout and
   to its exit, next to a cold `python -c "import pandas ..."` subprocess measured the same way.
   Then one child's return value through the result channel (client.call).
3. Show that a child cannot do what the sandbox forbids (read /etc/shadow, reach a server on the
   host's 127.0.0.1, see host processes), and that a timeout kills it.

Run it with `bash scripts/demo.sh` (sets everything up first) or `.venv/bin/python examples/demo.py`.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import statistics
import subprocess
import sys
import time

from zygote_client import Client

PRELOAD = "pandas" if importlib.util.find_spec("pandas") else "json"
N_CHILDREN = 5
N_COLD = 3


# ---- what the children run (sent to them with cloudpickle) --------------------------------------

def compute(i: int) -> None:
    if PRELOAD == "pandas":
        import pandas as pd  # already in sys.modules: the zygote imported it before cloning
        df = pd.DataFrame({"x": range(1000 * (i + 1))})
        result = f"sum={df.x.sum()} mean={df.x.mean():.1f}"
    else:
        import json
        result = json.dumps({"sum": sum(range(1000 * (i + 1)))})
    print(f"child {i}: pid {os.getpid()} (its own pid namespace), uid {os.getuid()}, {result}")


COLD_CODE = ("import os, pandas as pd; df = pd.DataFrame({'x': range(1000)}); "
             "print(f'cold: pid {os.getpid()}, sum={df.x.sum()} mean={df.x.mean():.1f}')"
             if PRELOAD == "pandas" else
             "import os, json; print('cold: pid', os.getpid(), json.dumps({'sum': sum(range(1000))}))")


def describe(n: int) -> dict:
    """Returns a value (JSON-compatible: the default result channel)."""
    if PRELOAD == "pandas":
        import pandas as pd
        s = pd.Series(range(n))
        return {"n": n, "mean": float(s.mean()), "std": round(float(s.std()), 3)}
    return {"n": n, "mean": (n - 1) / 2}


def forbidden(port: int, host_pid: int) -> None:
    """Try three things the sandbox must refuse; exit 1 if any of them works."""
    import errno

    allowed = 0

    def attempt(what, fn):
        nonlocal allowed
        try:
            fn()
        except OSError as e:
            print(f"  blocked  {what}: {type(e).__name__} ({errno.errorcode.get(e.errno, e.errno)})")
        else:
            allowed += 1
            print(f"  ALLOWED  {what}")

    attempt("read /etc/shadow", lambda: open("/etc/shadow", "rb").read())
    def connect():
        with socket.socket() as s:  # a numeric address: no resolver, no idna codec import
            s.settimeout(2)
            s.connect(("127.0.0.1", port))

    attempt(f"connect to the host's 127.0.0.1:{port}", connect)
    attempt(f"signal the host process {host_pid}", lambda: os.kill(host_pid, 0))
    sys.exit(1 if allowed else 0)


def sleeper() -> None:
    time.sleep(60)


# ---- the demonstration --------------------------------------------------------------------------

def timed_child(client: Client, i: int) -> tuple[str, float, float, float]:
    """(output, ms to ready, ms to first stdout byte, ms to exit) for one spawn."""
    t0 = time.perf_counter()
    child = client.spawn_child(compute, (i,))
    t_ready = time.perf_counter()
    first = os.read(child.stdout.fileno(), 1)
    t_first = time.perf_counter()
    rest, err = child.communicate()
    status = child.wait()
    t_exit = time.perf_counter()
    if status.returncode != 0:
        raise SystemExit(f"child {i} failed ({status.returncode}): {err.decode(errors='replace')}")
    return (first + rest).decode().rstrip(), *(1e3 * (t - t0) for t in (t_ready, t_first, t_exit))


def timed_cold() -> tuple[str, float, float]:
    """The same measurement for a fresh interpreter that imports the module itself."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", COLD_CODE], stdout=subprocess.PIPE)
    first = os.read(proc.stdout.fileno(), 1)
    t_first = time.perf_counter()
    rest, _ = proc.communicate()
    t_exit = time.perf_counter()
    return (first + rest).decode().rstrip(), 1e3 * (t_first - t0), 1e3 * (t_exit - t0)


def main() -> int:
    print(f"zygote demo: Python {sys.version.split()[0]}, preloading {PRELOAD!r}\n")
    t0 = time.perf_counter()
    with Client.embedded(preload_imports=[PRELOAD], daemon_args=["--reserve", "2"]) as client:
        print(f"embedded daemon + zygote ready in {time.perf_counter() - t0:.2f} s "
              f"(paid once: interpreter start + import {PRELOAD})\n")

        print(f"{N_CHILDREN} confined children computing with {PRELOAD}:")
        time.sleep(0.2)  # the reserve fills in the background
        warm = []
        for i in range(N_CHILDREN):
            warm.append(timed_child(client, i))
            time.sleep(0.1)
        for out, *_ in warm:
            print("  " + out)
        cold = [timed_cold() for _ in range(N_COLD)]
        print("  " + cold[0][0])

        print("\nlatency in ms, from the call to ...      ready   first byte   exited")
        for i, (_, ready, first, done) in enumerate(warm):
            print(f"  zygote child {i}                        {ready:7.1f}   {first:10.1f}   {done:6.1f}")
        for i, (_, first, done) in enumerate(cold):
            print(f"  cold `python -c 'import {PRELOAD}'` #{i}      {'-':>5}   {first:10.1f}   {done:6.1f}")
        w = statistics.median(f for _, _, f, _ in warm)
        c = statistics.median(f for _, f, _ in cold)
        print(f"  median to first byte: {w:.1f} ms warm vs {c:.1f} ms cold ({c / w:.0f}x)")

        value = client.call(describe, 1000)
        print(f"\na return value through the result channel (JSON, never unpickled by the daemon): {value}")

        print("\na child trying what the sandbox forbids:")
        with socket.create_server(("127.0.0.1", 0)) as server:
            port = server.getsockname()[1]
            socket.create_connection(("127.0.0.1", port), timeout=2).close()  # reachable from here
            res = client.run(forbidden, (port, os.getpid()), timeout=30)
        sys.stdout.write(res.stdout.decode())
        if res.returncode != 0:
            print(f"  the child was able to do something it must not (exit {res.returncode}):")
            print(res.stderr.decode())
            return 1

        res = client.run(sleeper, timeout=0.5)
        print(f"\na child sleeping 60 s with timeout=0.5: returncode {res.returncode}, "
              f"timed_out={res.status.timed_out}, wall {res.status.wall_time:.2f} s")
        if not res.status.timed_out:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
