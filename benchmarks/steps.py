"""What each confinement step costs, in microseconds, measured in isolation where possible.

Usage: ``python benchmarks/steps.py [--quick] [--json]`` (run.py calls ``measure()`` and prints
``format_table()``).

The measurements run in a separate worker process (``steps.py --worker``) because a raw clone3 is
only safe from a single-threaded process and run.py has threads. The worker imports pandas (so the
clone copies a pandas-sized address space, as the zygote's does), every layer module of
zygote/layers/ that exists, freezes its heap like the zygote, and then measures:

1. process creation, seen from the parent: os.fork, clone3 without flags, clone3 with each
   namespace flag alone and with all seven; first byte from the child and reaped.
2. one child per iteration, cloned with all namespaces, that applies every layer in the pipeline
   order of zygote/child.py and times each ``apply`` itself (child side), then writes one byte
   itself (it is the payload: PID 1, the default) and only then times what a reaper would add
   (forking a PID-2 payload); plus what the parent does to it (uid/gid maps, cgroup create /
   attach / remove). The clone-to-first-byte of that child is the whole pipeline without the
   daemon, client and protocol.
3. daemon-side one-off costs: compiling the default seccomp profile; a cgroup v1 attach after the
   host had no migration for a while (the RCU grace-period stall).

A layer module that is missing, or whose apply() has a different signature than this script
knows, is reported as "n/a" with the reason, never as a number.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# ---- the parent side (run.py / command line) ---------------------------------------------------

def measure(quick: bool = False, python: str = sys.executable, preload: str = "pandas",
            timeout: float = 120.0) -> dict:
    """Run the worker and return its results: {"rows": [...], "info": {...}} (or {"error": text}).

    Each row: {"group", "step", "side", "median_us", "p90_us", "n", "note"}; median_us is None for
    an n/a row.
    """
    cmd = [python, os.path.abspath(__file__), "--worker", "--iterations", "12" if quick else "40",
           "--preload", preload]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.path.join(ROOT, "client"),
                                                    env.get("PYTHONPATH", "")) if p)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env.setdefault(k, "1")  # the worker must stay single-threaded, as a zygote does
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"error": f"steps worker timed out after {timeout:.0f} s"}
    if p.returncode != 0:
        return {"error": f"steps worker exited {p.returncode}: {p.stderr.decode(errors='replace')[-2000:]}"}
    return json.loads(p.stdout)


def format_table(result: dict) -> str:
    if "error" in result:
        return f"per-step costs: not measured ({result['error']})"
    lines = [f"{'group':<10} {'step':<52} {'side':<7} {'median µs':>10} {'p90 µs':>9} {'n':>4}  note"]
    lines.append("-" * len(lines[0]))
    for r in result["rows"]:
        if r["median_us"] is None:
            med, p90 = "n/a", ""
        else:
            med, p90 = f"{r['median_us']:.0f}", f"{r['p90_us']:.0f}"
        lines.append(f"{r['group']:<10} {r['step']:<52} {r['side']:<7} {med:>10} {p90:>9} {r['n']:>4}  {r['note']}")
    info = result.get("info", {})
    if info:
        lines.append("(" + "; ".join(f"{k}: {v}" for k, v in info.items()) + ")")
    return "\n".join(lines)


# ---- the worker --------------------------------------------------------------------------------

def _worker(iterations: int, preload: str) -> dict:
    import gc
    import importlib
    import time
    import traceback

    # Everything the children run is imported here, before the first clone: a clone must not import.
    if preload:
        importlib.import_module(preload)
    from zygote import _clone
    from zygote import _childproto as C
    from zygote.layers import SetupError
    from zygote.layers import _sys

    layers: dict[str, object] = {}
    missing: dict[str, str] = {}
    for name in ("userns", "mounts", "netns", "rlimits", "uts", "landlock", "privileges", "seccomp",
                 "cgroups", "network"):
        try:
            layers[name] = importlib.import_module(f"zygote.layers.{name}")
        except Exception as e:  # noqa: BLE001 - a module being written may not import yet
            missing[name] = f"{type(e).__name__}: {e}"[:120] if not isinstance(e, ModuleNotFoundError) \
                else "module not present"

    if os.geteuid() == 0:
        os.setgroups([])  # as the zygote does before cloning
    cloner = _clone.Cloner()
    if _clone.thread_count() != 1:
        raise SystemExit(f"the worker has {_clone.thread_count()} threads; set OMP_NUM_THREADS=1")

    rows: list[dict] = []
    info: dict[str, object] = {"preload": preload or "(none)", "iterations": iterations}

    def row(group: str, step: str, side: str, samples_us: list[float] | None, note: str = "") -> None:
        if samples_us:
            s = sorted(samples_us)
            p90 = s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]
            rows.append(dict(group=group, step=step, side=side, median_us=statistics.median(s),
                             p90_us=p90, n=len(s), note=note))
        else:
            rows.append(dict(group=group, step=step, side=side, median_us=None, p90_us=None, n=0, note=note))

    now = time.perf_counter_ns

    gc.collect()
    gc.freeze()

    # -- 1. process creation ---------------------------------------------------------------------
    def create(flags: int | None, n: int) -> tuple[list[float], list[float]]:
        first, reaped = [], []
        for _ in range(n):
            r, w = os.pipe()
            t0 = now()
            pid = os.fork() if flags is None else cloner.clone(flags)
            if pid == 0:
                try:
                    os.write(w, b"x")
                finally:
                    os._exit(0)
            os.close(w)
            os.read(r, 1)
            t1 = now()
            os.waitpid(pid, 0)
            t2 = now()
            os.close(r)
            first.append((t1 - t0) / 1e3)
            reaped.append((t2 - t0) / 1e3)
        return first, reaped

    # Variants are interleaved round-robin so a burst of load on the host (other jobs on this
    # machine) lands on all of them alike instead of on whichever ran at that moment.
    variants: list[tuple[str, int | None]] = [("fork", None), ("clone3", 0)]
    variants += [(f"CLONE_NEW{n}", f) for n, f in (
        ("USER", _clone.CLONE_NEWUSER), ("PID", _clone.CLONE_NEWPID), ("NS", _clone.CLONE_NEWNS),
        ("IPC", _clone.CLONE_NEWIPC), ("UTS", _clone.CLONE_NEWUTS), ("NET", _clone.CLONE_NEWNET),
        ("CGROUP", _clone.CLONE_NEWCGROUP))]
    variants.append(("all", _clone.ALL_NAMESPACES))
    create(None, 3)  # warm
    firsts: dict[str, list[float]] = {v: [] for v, _ in variants}
    reapeds: dict[str, list[float]] = {v: [] for v, _ in variants}
    failed: dict[str, str] = {}
    for _ in range(max(10, iterations)):
        for name, flags in variants:
            if name in failed:
                continue
            try:
                f, r = create(flags, 1)
            except OSError as e:
                failed[name] = f"clone3: {e.strerror}"
                continue
            firsts[name] += f
            reapeds[name] += r
    base_f = statistics.median(firsts["clone3"])
    base_r = statistics.median(reapeds["clone3"])
    row("process", "os.fork -> child's first byte", "parent", firsts["fork"])
    row("process", "os.fork -> reaped", "parent", reapeds["fork"])
    row("process", "clone3(no flags) -> first byte", "parent", firsts["clone3"])
    row("process", "clone3(no flags) -> reaped", "parent", reapeds["clone3"])
    for name, _ in variants[2:]:
        label = "all 7 namespaces" if name == "all" else f"{name} alone"
        if name in failed:
            row("namespace", label, "kernel", None, failed[name])
            continue
        row("namespace", f"{label} -> first byte", "kernel", firsts[name],
            f"{statistics.median(firsts[name]) - base_f:+.0f} µs vs clone3 without flags")
        if name == "all":
            row("namespace", f"{label} -> reaped", "kernel", reapeds[name],
                f"{statistics.median(reapeds[name]) - base_r:+.0f} µs vs clone3 without flags")

    # CPython's after-fork work in the child (PyOS_AfterFork_Child: its own state, then the
    # os.register_at_fork hooks: random reseeds itself, threading and logging renew their locks),
    # which Cloner.clone and os.fork run before the child's first line: timed alone, with the
    # copy-on-write faults it takes.
    import ctypes
    import resource

    def after_fork(n: int) -> tuple[list[float], list[float]]:
        took, faults = [], []
        args = _clone._CloneArgs()
        args.flags, args.child_tid, args.exit_signal = _clone.CLONE_CHILD_SETTID, cloner._tid_addr, 17
        for _ in range(n):
            r, w = os.pipe()
            _clone._api.PyOS_BeforeFork()
            pid = _clone._libc.syscall(_clone._SYS_CLONE3, ctypes.byref(args), ctypes.sizeof(args))
            if pid == 0:
                try:
                    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, now()
                    _clone._api.PyOS_AfterFork_Child()
                    t1, f1 = now(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    os.write(w, f"{(t1 - t0) / 1e3} {f1 - f0}".encode())
                finally:
                    os._exit(0)
            _clone._api.PyOS_AfterFork_Parent()
            os.close(w)
            if pid > 0:
                t, f = os.read(r, 100).split()
                took.append(float(t))
                faults.append(float(f))
                os.waitpid(pid, 0)
            os.close(r)
        return took, faults

    try:
        took, faults = after_fork(max(10, iterations))
        row("process", "CPython after-fork work in the child (all of it)", "child", took,
            f"{statistics.median(faults):.0f} copy-on-write faults; a lean clone (_clone.lean_hooks) runs random's reseed only")
    except Exception as e:  # noqa: BLE001 - a row, not the run
        row("process", "CPython after-fork work in the child", "child", None, f"{type(e).__name__}: {e}"[:100])

    # -- daemon-side preparation -----------------------------------------------------------------
    seccomp = layers.get("seccomp")
    bpf = b""
    if seccomp is not None:
        try:
            t = []
            for _ in range(3):
                t0 = now()
                bpf = seccomp.compile_profile(seccomp.load_profile("default"))
                t.append((now() - t0) / 1e3)
            row("seccomp", "compile 'default' profile (once per profile)", "daemon", t,
                f"{len(bpf) // 8} BPF instructions")
        except Exception as e:  # noqa: BLE001
            row("seccomp", "compile 'default' profile", "daemon", None, f"{type(e).__name__}: {e}"[:100])
            bpf = b""

    cg_host = None
    cgroups = layers.get("cgroups")
    if cgroups is not None:
        try:
            cg_host = cgroups.detect(f"zygote-bench-{os.getpid()}")
            info["cgroup"] = f"v{cg_host.version}"
        except Exception as e:  # noqa: BLE001
            row("cgroup", "detect", "daemon", None, f"{type(e).__name__}: {e}"[:100])
            cg_host = None

    userns = layers.get("userns")
    uid_map = gid_map = b""
    if userns is not None:
        uid_map, gid_map = userns.map_lines(getattr(userns, "DEFAULT_ID_BASE", 1_000_000_000),
                                            os.getuid(), os.getgid())

    # -- 2. the pipeline, child side -------------------------------------------------------------
    # The plan is built the way the daemon builds it when the modules offer it (mounts.prepare,
    # the daemon's Landlock path list); otherwise from a fixed list of the interpreter's dirs.
    def world_readable(path: str) -> bool:
        # The child's ids are unmapped on the host, so it gets the "other" permission bits: a
        # path under a 0700 directory (e.g. a pyenv under /root) cannot be opened from inside.
        parts = path.strip("/").split("/")
        mode = 0
        for i in range(len(parts) + 1):
            p = "/" + "/".join(parts[:i])
            try:
                mode = os.stat(p).st_mode
            except OSError:
                return False
            if not mode & 0o001:
                return False
        return bool(mode & 0o004)

    skipped_paths: list[str] = []

    def interp_dirs() -> list[str]:
        seen: list[str] = []
        for p in ("/usr", "/lib", "/lib64", "/bin", "/etc", sys.base_prefix, sys.prefix):
            rp = os.path.realpath(p)
            if not os.path.isdir(rp) or any(rp == s or rp.startswith(s + "/") for s in seen):
                continue
            if not world_readable(rp):
                if rp not in skipped_paths:
                    skipped_paths.append(rp)
                continue
            seen.append(rp)
        return seen

    fields = set(C.ChildPlan.__struct_fields__)
    mnt = layers.get("mounts")
    plans: dict[str, object] = {"host": C.ChildPlan(kind="callable", root="host", proc=True)}
    ll_ro = interp_dirs() + ["/proc", "/dev"]
    ll_rw = ["/tmp"]
    plan_source = "fixed list"
    try:
        if mnt is not None and hasattr(mnt, "prepare"):
            from zygote_client import SandboxConfig
            zinfo = {"pid": os.getpid(), "executable": sys.executable, "prefix": sys.prefix,
                     "base_prefix": sys.base_prefix, "version": list(sys.version_info[:3]),
                     "path": sys.path, "preloaded": [preload] if preload else []}
            fs = mnt.prepare(SandboxConfig(), zinfo)
            plans["tmpfs"] = C.ChildPlan(kind="callable", **{k: v for k, v in fs.items() if k in fields})
            plan_source = "mounts.prepare(SandboxConfig())"
            try:
                from zygote.daemon import _landlock_paths
                ll_ro, ll_rw = _landlock_paths(fs, SandboxConfig())
                plan_source += " + daemon._landlock_paths"
            except Exception:  # noqa: BLE001
                pass
        else:
            plans["tmpfs"] = C.ChildPlan(kind="callable", root="tmpfs", tmpfs_bytes=64 << 20, proc=True,
                                         binds=[C.MountSpec(p, p, True, False) for p in interp_dirs()])
    except Exception as e:  # noqa: BLE001
        missing["mounts(tmpfs root)"] = f"building the plan: {type(e).__name__}: {e}"[:120]
    info["plan"] = plan_source
    rl = layers.get("rlimits")
    rlimit_list = rl.plan(cpu_time=60, file_size=1 << 30, open_files=256) if rl is not None else []
    unshare = getattr(_sys, "unshare", None)

    def child_pipeline(go_r: int, res_w: int, byte_w: int, mount_mode: str, cgroupns: bool) -> None:
        """Runs in the clone, in zygote/child.py's order; never returns. Reports {step: µs or
        "error: ..."} on res_w."""
        t: dict[str, object] = {}
        os.read(go_r, 1)
        plan = plans[mount_mode]

        def step(name: str, fn, *args, **kwargs):
            t0 = now()
            try:
                out = fn(*args, **kwargs)
            except SetupError as e:
                t[name] = f"error: {e.step}: {e.message}"
                return None
            except (TypeError, AttributeError) as e:  # an API that changed under us
                t[name] = f"error: API: {e}"
                return None
            t[name] = (now() - t0) / 1e3
            return out

        sources = None
        if mnt is not None and hasattr(mnt, "open_sources"):
            # before userns.apply: the path walk still has the daemon's host uid
            sources = step("mounts:open_sources", mnt.open_sources, plan)
        if userns is not None:
            step("userns", userns.apply)
        if cgroupns and unshare is not None:
            step("cgroupns", unshare, _clone.CLONE_NEWCGROUP)
        if mnt is not None:
            if hasattr(mnt, "open_sources"):
                step(f"mounts:{mount_mode}", mnt.apply, plan, sources)
            else:
                step(f"mounts:{mount_mode}", mnt.apply, plan)
        if layers.get("netns") is not None:
            step("netns", layers["netns"].apply)
        if rl is not None:
            step("rlimits", rl.apply, rlimit_list)
        if layers.get("uts") is not None:
            step("uts", layers["uts"].apply, "zygote", None)
        ll = layers.get("landlock")
        if ll is not None:
            step("landlock", ll.apply, ll_ro, ll_rw, deny_tcp=True, mode="auto")
        pv = layers.get("privileges")
        if pv is not None:
            step("privileges", pv.apply, 65534, 65534)
        if seccomp is not None and bpf:
            step("seccomp", seccomp.apply, bpf)
        t0 = now()
        os.closerange(max(go_r, res_w, byte_w) + 1, 1 << 20)
        t["fds"] = (now() - t0) / 1e3
        os.write(byte_w, b"x")  # the payload's first byte: by default the payload is PID 1 itself
        t0 = now()
        pid = os.fork()  # what SandboxConfig.reaper adds, after the byte so the total excludes it
        if pid == 0:
            os._exit(0)
        t["payload fork"] = (now() - t0) / 1e3
        os.waitpid(pid, 0)
        t["payload fork+exit"] = (now() - t0) / 1e3
        os.write(res_w, json.dumps(t).encode())

    def one(mount_mode: str, cg_idle: float = 0.0) -> dict:
        go_r, go_w = os.pipe()
        res_r, res_w = os.pipe()
        byte_r, byte_w = os.pipe()
        out: dict[str, object] = {}
        cg = None
        if cg_host is not None:
            t0 = now()
            cg = cg_host.create(f"zg-bench-{time.monotonic_ns()}", memory=256 << 20, pids=64)
            out["cgroup create"] = (now() - t0) / 1e3
        t0 = now()
        pid = cloner.clone(_clone.ALL_NAMESPACES)
        if pid == 0:
            try:
                child_pipeline(go_r, res_w, byte_w, mount_mode, cg is not None)
            except BaseException:  # noqa: BLE001
                try:
                    os.write(res_w, json.dumps({"crash": traceback.format_exc()[-400:]}).encode())
                except BaseException:  # noqa: BLE001
                    pass
            finally:
                os._exit(0)
        t_clone = now()
        for fd in (go_r, res_w, byte_w):
            os.close(fd)
        out["clone3 (parent returns)"] = (t_clone - t0) / 1e3
        try:
            if userns is not None:
                t1 = now()
                userns.outside(pid, uid_map, gid_map)
                out["uid/gid maps"] = (now() - t1) / 1e3
            if cg is not None:
                if cg_idle:
                    time.sleep(cg_idle)
                t1 = now()
                cg.attach(pid)
                out["cgroup attach (idle)" if cg_idle else "cgroup attach"] = (now() - t1) / 1e3
                if not cg_idle:
                    # The same write again, right after a migration: no RCU grace period to wait
                    # for this time, so this is the attach without the v1 stall.
                    t1 = now()
                    cg.attach(pid)
                    out["cgroup attach (warm)"] = (now() - t1) / 1e3
            t_go = now()
            os.write(go_w, b"g")
            os.read(byte_r, 1)
            t_first = now()
            data = b""
            while chunk := os.read(res_r, 65536):
                data += chunk
            os.waitpid(pid, 0)
            t_reaped = now()
            if not cg_idle:
                out["end to end: clone -> first byte"] = (t_first - t0) / 1e3
                out["end to end: go -> first byte"] = (t_first - t_go) / 1e3
                out["end to end: clone -> reaped"] = (t_reaped - t0) / 1e3
            out["child"] = json.loads(data) if data else {"crash": "no report"}
        finally:
            for fd in (go_w, res_r, byte_r):
                os.close(fd)
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            if cg is not None:
                t1 = now()
                cg.remove()
                out["cgroup remove"] = (now() - t1) / 1e3
        return out

    # Which mount mode this build supports: a generated tmpfs root if mounts.py has it, else "host".
    mount_mode = "host"
    if "tmpfs" in plans and layers.get("mounts") is not None:
        probe = one("tmpfs")
        v = probe.get("child", {}).get("mounts:tmpfs")
        if isinstance(v, (int, float)):
            mount_mode = "tmpfs"
        else:
            missing["mounts(tmpfs root)"] = str(v or probe.get("child"))[:120]
    info["mount mode"] = mount_mode
    if skipped_paths and plan_source == "fixed list":
        info["not bound/ruled (not world-readable)"] = ", ".join(skipped_paths)

    try:
        one(mount_mode)  # warm
        results = [one(mount_mode) for _ in range(iterations)]
        idle = []
        if cg_host is not None:
            idle = [one(mount_mode, cg_idle=0.15) for _ in range(max(3, iterations // 6))]
    finally:
        if cg_host is not None:
            cg_host.close()

    crashes = [r["child"]["crash"] for r in results if "crash" in r.get("child", {})]
    if crashes:
        info["child crash"] = crashes[0]

    def col(key: str, src: list[dict], child: bool = False) -> tuple[list[float], str]:
        vals, err = [], ""
        for r in src:
            v = (r.get("child", {}) if child else r).get(key)
            if isinstance(v, (int, float)):
                vals.append(float(v))
            elif isinstance(v, str) and not err:
                err = v
        return vals, err

    def emit(group: str, key: str, label: str, side: str, src: list[dict], child: bool, note: str = "") -> None:
        vals, err = col(key, src, child)
        row(group, label, side, vals or None, err[:110] if not vals else note)

    emit("userns", "uid/gid maps", "write setgroups, gid_map, uid_map", "daemon", results, False)
    emit("mounts", "mounts:open_sources", "open_sources: O_PATH fds of the bind sources", "child", results, True)
    emit("userns", "userns", "apply: setresuid/setresgid(0) inside", "child", results, True)
    emit("cgroup", "cgroupns", "unshare(CLONE_NEWCGROUP) after the attach", "child", results, True)
    if mount_mode == "tmpfs":
        p = plans["tmpfs"]
        extra = f", {len(p.symlinks)} symlinks" if hasattr(p, "symlinks") else ""
        emit("mounts", "mounts:tmpfs", f"apply: tmpfs root, {len(p.binds)} ro binds{extra}, pivot_root",
             "child", results, True)
    else:
        emit("mounts", "mounts:host", "apply: make / private + fresh /proc", "child", results, True,
             "tmpfs root: " + missing.get("mounts(tmpfs root)", "not measured"))
    emit("netns", "netns", "apply: lo up", "child", results, True,
         "only when the clone made the netns: the zygote makes one ahead while idle")
    emit("rlimits", "rlimits", f"apply: {len(rlimit_list)} setrlimit", "child", results, True)
    emit("uts", "uts", "apply: sethostname (no process name)", "child", results, True)
    emit("landlock", "landlock", f"apply: ruleset, {len(ll_ro) + len(ll_rw)} path rules, restrict", "child",
         results, True)
    emit("privileges", "privileges", "apply: uid/gid 65534, caps, securebits, nnp", "child", results, True)
    emit("seccomp", "seccomp", "apply: load BPF (TSYNC)", "child", results, True)
    emit("fds", "fds", "closerange(all other fds)", "child", results, True)
    emit("payload", "payload fork", "with a reaper: PID 1 forks the payload (returns in PID 1)", "child",
         results, True)
    emit("payload", "payload fork+exit", "with a reaper: PID 1 forks the payload and reaps it", "child",
         results, True)
    if cg_host is not None:
        emit("cgroup", "cgroup create", "create (mkdir / pooled rename + limits)", "daemon", results, False)
        emit("cgroup", "cgroup attach", "attach (one per iteration, ~tens of ms apart)", "daemon", results,
             False)
        emit("cgroup", "cgroup attach (warm)", "attach again right after a migration", "daemon", results, False,
             "no RCU grace-period wait")
        emit("cgroup", "cgroup attach (idle)", "attach after 150 ms without migration", "daemon", idle, False)
        emit("cgroup", "cgroup remove", "remove (rmdir after reaping)", "daemon", results, False)
    emit("total", "clone3 (parent returns)", "clone3(all namespaces) returns in the parent", "parent",
         results, False)
    emit("total", "end to end: go -> first byte", "all layers: go -> payload's first byte", "parent",
         results, False)
    emit("total", "end to end: clone -> first byte", "all layers: clone -> payload's first byte", "parent",
         results, False, "no daemon, client or protocol")
    emit("total", "end to end: clone -> reaped", "all layers: clone -> reaped (incl. the reaper probe)", "parent",
         results, False)
    for name in ("landlock", "privileges", "seccomp", "cgroups", "network"):
        if name in missing:
            row(name, f"zygote.layers.{name}", "-", None, missing[name])
    return {"rows": rows, "info": info}


def main(argv: list[str]) -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations (a few seconds)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--preload", default="pandas", help="module the worker imports first (default pandas)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--iterations", type=int, default=40, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        res = _worker(a.iterations, a.preload)
        sys.stdout.write(json.dumps(res))
        sys.stdout.flush()
        return
    res = measure(quick=a.quick, preload=a.preload)
    print(json.dumps(res, indent=1) if a.json else format_table(res))


if __name__ == "__main__":
    main(sys.argv[1:])
