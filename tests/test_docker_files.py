"""docker/ holds files no Docker engine ran here: check what can be checked on the host.

The files parse; every path they name exists; compose, the DaemonSet and the entrypoint agree on
the capabilities; and a real daemon with exactly the entrypoint's capabilities, under the container's
seccomp profile compiled by zygote's own seccomp layer, spawns a confined child with cgroup limits.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import yaml

from zygote.layers import seccomp

DOCKER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docker")
REPO = os.path.dirname(DOCKER)
PROFILE = os.path.join(DOCKER, "seccomp-daemon.json")


def _entrypoint():
    spec = importlib.util.spec_from_file_location("zg_entrypoint", os.path.join(DOCKER, "entrypoint.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _yaml_docs(name: str) -> list[dict]:
    with open(os.path.join(DOCKER, name)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def test_dockerfile_copies_files_that_exist():
    with open(os.path.join(DOCKER, "Dockerfile")) as f:
        text = f.read()
    copies = re.findall(r"^COPY\s+(?!--from)(.+)$", text, re.M)
    assert copies
    for line in copies:
        *sources, _dest = line.split()
        for src in sources:
            assert os.path.exists(os.path.join(REPO, src)), f"Dockerfile copies missing {src}"
    assert "entrypoint.py" in text and "nftables" in text


def test_compose_and_daemonset_parse_and_agree_on_capabilities():
    compose = _yaml_docs("compose.yaml")[0]
    daemon = compose["services"]["daemon"]
    assert daemon["cap_drop"] == ["ALL"]
    wanted = set(_entrypoint().DAEMON_CAPS) | {"SYS_ADMIN"}  # SYS_ADMIN: the entrypoint's remount only
    assert set(daemon["cap_add"]) == wanted
    seccomp_opt = [o for o in daemon["security_opt"] if o.startswith("seccomp=")]
    assert seccomp_opt and os.path.isfile(os.path.join(DOCKER, seccomp_opt[0].split("=", 1)[1]))
    assert "zygote-run" in compose["volumes"]
    assert any(v.startswith("zygote-run:") for v in compose["services"]["client"]["volumes"])

    ds, pod = _yaml_docs("kubernetes/daemonset.yaml")
    assert ds["kind"] == "DaemonSet" and pod["kind"] == "Pod"
    ctx = ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    assert ctx["capabilities"]["drop"] == ["ALL"] and set(ctx["capabilities"]["add"]) == wanted
    assert os.path.basename(ctx["seccompProfile"]["localhostProfile"]) == os.path.basename(PROFILE)
    host_paths = {v["hostPath"]["path"] for v in ds["spec"]["template"]["spec"]["volumes"] if "hostPath" in v}
    assert host_paths == {v["hostPath"]["path"] for v in pod["spec"]["volumes"]}


# What the daemon, a zygote and a child's setup call (the child's own filter comes later).
_NEEDED = ["clone", "clone3", "unshare", "setns", "mount", "umount2", "pivot_root", "mount_setattr",
           "pidfd_open", "pidfd_send_signal", "landlock_create_ruleset", "landlock_add_rule",
           "landlock_restrict_self", "seccomp", "prctl", "sethostname", "capset", "setresuid", "setgroups"]


def test_seccomp_profile_compiles_and_denies_nothing_the_daemon_needs():
    with open(PROFILE) as f:
        profile = json.load(f)
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    denied = {n for rule in profile["syscalls"] if rule["action"] != "SCMP_ACT_ALLOW" for n in rule["names"]}
    assert not denied & set(_NEEDED)
    assert {"open_by_handle_at", "kexec_load", "init_module", "bpf"} <= denied
    assert seccomp.compile_profile(seccomp.normalize(profile))


_LAUNCH = """
import importlib.util, os, sys
from zygote.layers import seccomp
spec = importlib.util.spec_from_file_location("ep", sys.argv[1]); ep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ep)
if os.environ.get("ZG_TEST_INHERIT"):  # an old runtime: the container's caps also inheritable
    import prctl
    prctl.cap_inheritable.sys_admin = True
ep.drop_to(set(sys.argv[2].split(",")))
seccomp.apply(seccomp.compile_profile(seccomp.load_profile(sys.argv[3])))
os.execv(sys.executable, [sys.executable, "-m", "zygote", "run", *sys.argv[4:]])
"""


def _run_contained(caps: set[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _LAUNCH, os.path.join(DOCKER, "entrypoint.py"), ",".join(sorted(caps)), PROFILE,
         "--memory", "64M", "--pids", "16", "--timeout", "30", "--", "/bin/sh", "-c", "echo contained"],
        capture_output=True, timeout=120)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to a capability set needs root")
def test_daemon_runs_with_exactly_the_entrypoint_caps_under_the_profile():
    caps = set(_entrypoint().DAEMON_CAPS)
    r = _run_contained(caps)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == b"contained\n"
    # Even when the runtime left capabilities in the inheritable set, the daemon gets only these.
    r = subprocess.run([sys.executable, "-c", _LAUNCH.replace(
        'os.execv(sys.executable, [sys.executable, "-m", "zygote", "run", *sys.argv[4:]])',
        'os.execv("/bin/grep", ["grep", "CapEff", "/proc/self/status"])'),
        os.path.join(DOCKER, "entrypoint.py"), ",".join(sorted(caps)), PROFILE],
        capture_output=True, timeout=60, env={**os.environ, "ZG_TEST_INHERIT": "1"})
    eff = int(r.stdout.split()[1], 16)
    assert eff & (1 << 21) == 0, f"CAP_SYS_ADMIN survived the entrypoint: {r.stdout!r} {r.stderr!r}"
    # Controls: each uid/gid map capability is really needed (so the run above proves the set works).
    for missing in ("SETUID", "SETGID"):
        r = _run_contained(caps - {missing})
        assert r.returncode != 0 and r.stdout == b"", (missing, r.stdout)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to a capability set needs root")
def test_a_daemon_without_cap_kill_keeps_its_children_killable():
    """A child's host id range owns its user namespace only when the daemon could still act on
    it from outside without owning it: with CAP_SYS_ADMIN and CAP_SYS_PTRACE but no CAP_KILL,
    the daemon's SIGKILL at the timeout failed (EPERM: the child's uids are not the daemon's),
    which ended the daemon and left the child running. Such a daemon keeps root as the owner.
    (The daemon now survives a refused kill, and a child that ran to its end was still reported
    as timed out: the child sleeps 600 s, and the run must end soon after the timeout.)"""
    import time
    caps = set(_entrypoint().DAEMON_CAPS) | {"SYS_ADMIN", "SYS_PTRACE"}
    t0 = time.monotonic()
    p = subprocess.Popen(
        [sys.executable, "-c", _LAUNCH, os.path.join(DOCKER, "entrypoint.py"), ",".join(sorted(caps)), PROFILE,
         "--timeout", "2", "--", "/bin/sh", "-c", "exec sleep 600"],
        stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = p.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        # (a daemon that cannot kill leaves itself, its zygotes and the child: the whole tree
        # under the launcher goes, by pid, before the launcher does)
        tree, todo = [], [p.pid]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            try:
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as f:
                        todo += map(int, f.read().split())
            except OSError:
                pass
        for pid in reversed(tree):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        p.wait()
        pytest.fail(f"the run took over {time.monotonic() - t0:.0f} s: the child was not killed at its timeout")
    assert p.returncode == 124, err.decode()[-2000:]  # killed at its timeout, reported as such
