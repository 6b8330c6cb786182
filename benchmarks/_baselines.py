"""Worker for the baselines run.py compares zygote against: plain fork and multiprocessing forkserver.

Runs as its own small process (``python _baselines.py fork|forkserver N``), not inside run.py:
run.py has threads (the client's portal) and a big import graph, and forkserver children re-run
their parent's ``__main__`` file, so both baselines would measure run.py instead of the mechanism.
Prints one JSON object on stdout: {"first_byte": [seconds...], "reaped": [seconds...]}; mode
``forkmem`` prints the smaps_rollup sizes of one sleeping forked child instead.
"""

from __future__ import annotations

import gc
import json
import multiprocessing as mp
import os
import sys
import time


def write_byte(conn) -> None:
    """The forkserver child's target: one byte to the pipe, then exit."""
    os.write(conn.fileno(), b"x")


def bench_fork(n: int) -> dict:
    # Warm process: pandas imported, heap frozen, as the zygote is before it clones.
    import pandas  # noqa: F401
    gc.collect()
    gc.freeze()
    first, reaped = [], []
    for _ in range(n):
        r, w = os.pipe()
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            try:
                os.write(w, b"x")
            finally:
                os._exit(0)
        os.close(w)
        os.read(r, 1)
        t1 = time.perf_counter()
        os.waitpid(pid, 0)
        t2 = time.perf_counter()
        os.close(r)
        first.append(t1 - t0)
        reaped.append(t2 - t0)
    return {"first_byte": first, "reaped": reaped}


def bench_forkserver(n: int) -> dict:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["pandas"])
    # Start the server (and its pandas import) before timing anything.
    p = ctx.Process(target=os.getpid)
    p.start()
    p.join()
    first, reaped = [], []
    for _ in range(n):
        # A multiprocessing Pipe: its write end reaches the child the way forkserver passes fds
        # (SCM_RIGHTS with the spawn request); a bare int fd would not exist in the child.
        r, w = ctx.Pipe(duplex=False)
        t0 = time.perf_counter()
        p = ctx.Process(target=write_byte, args=(w,))
        p.start()
        w.close()
        os.read(r.fileno(), 1)
        t1 = time.perf_counter()
        p.join()
        t2 = time.perf_counter()
        r.close()
        first.append(t1 - t0)
        reaped.append(t2 - t0)
    return {"first_byte": first, "reaped": reaped}


def fork_memory(_n: int) -> dict:
    """Private memory of a plain fork of the warm pandas process that prints a byte and sleeps:
    what the same trivial payload costs without any zygote machinery (the memory baseline)."""
    import signal
    import pandas  # noqa: F401
    gc.collect()
    gc.freeze()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            sys.stdout = os.fdopen(w, "w")
            print("r", end="", flush=True)
            time.sleep(120)
        finally:
            os._exit(0)
    os.close(w)
    try:
        os.read(r, 1)
        time.sleep(0.2)
        return smaps(pid)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)


def smaps(pid: int) -> dict:
    """Rss, Pss and private (Private_Clean + Private_Dirty) of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                out[parts[0][:-1]] = int(parts[1]) * 1024
    return {"rss": out.get("Rss", 0), "pss": out.get("Pss", 0),
            "private": out.get("Private_Clean", 0) + out.get("Private_Dirty", 0)}


def main(argv: list[str]) -> None:
    mode, n = argv[0], int(argv[1])
    result = {"fork": bench_fork, "forkserver": bench_forkserver, "forkmem": fork_memory}[mode](n)
    sys.stdout.write(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
