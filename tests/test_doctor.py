"""`zygote doctor`: real probes on this host, their output, and that they leave nothing behind."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time

import pytest

from zygote import doctor
from zygote.layers import cgroups as _cg

ZYGOTE = [sys.executable, "-m", "zygote", "doctor"]
STATUSES = {"available", "partial", "missing"}


def leftovers() -> list[str]:
    """Anything a doctor run could have left on the host: cgroup probe dirs, zgdoc links, mounts."""
    found = glob.glob("/sys/fs/cgroup/*/zygote-doctor-*") + glob.glob("/sys/fs/cgroup/zygote-doctor-*")
    # the probe dirs live under this process's own cgroup in each hierarchy, not only at the top
    own = _cg._own_cgroups()
    for fstype, root, mnt, opts in _cg._mounts():
        for ctrl, path in own.items():
            if (fstype == "cgroup2") == (ctrl == "") and (ctrl == "" or ctrl in opts):
                try:
                    found += glob.glob(os.path.join(_cg._under(mnt, root, path), "zygote-doctor-*"))
                except Exception:  # noqa: BLE001 - a cgroup outside this mount
                    pass
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    found += [line for line in links.splitlines() if "zgdoc" in line]
    with open("/proc/self/mountinfo") as f:
        found += [line for line in f if "zygote-doctor" in line]
    return sorted(set(found))


def children() -> list[str]:
    out = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            out += f.read().split()
    return out


def test_text_lists_every_layer_and_exits_0():
    before = leftovers()
    t = time.monotonic()
    r = subprocess.run(ZYGOTE, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    for name in doctor.LAYER_NAMES:
        row = [ln for ln in lines if ln[2:].split()[:1] == [name]]
        assert len(row) == 1, f"{name} not listed once in:\n{r.stdout}"
        assert row[0][2:].split()[1] in STATUSES
    # the brief's layers, by the names a reader would look for
    for word in ("user", "pid", "mount", "ipc", "uts", "net", "cgroup", "clone3", "uid-map", "proc", "tmpfs",
                 "bind", "pivot", "cgroups", "landlock", "seccomp", "libseccomp", "no-new-privs",
                 "python-prctl", "cap-net-admin", "nft", "veth", "pyroute2"):
        assert word in r.stdout
    assert "ok: the default configuration can run here" in r.stdout
    assert r.stderr == ""
    assert took < 10, f"doctor took {took:.1f} s"
    assert leftovers() == before


def test_json_parses_and_is_ok():
    before = leftovers()
    r = subprocess.run([*ZYGOTE, "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] is True
    assert [la["name"] for la in out["layers"]] == list(doctor.LAYER_NAMES)
    for la in out["layers"]:
        assert set(la) >= {"name", "status", "detail", "fix"}
        assert la["status"] in STATUSES, la
        assert la["detail"], la
        if la["required"]:
            assert la["status"] == "available", la
    assert leftovers() == before


def test_this_host_as_briefed():
    """The machine in the brief: root, kernel 6.18, hybrid cgroups, Landlock ABI 7, nft, veth."""
    layers = {la["name"]: la for la in doctor.probe()}
    assert all(la["status"] == "available" for la in layers.values()), \
        [la for la in layers.values() if la["status"] != "available"]
    assert layers["landlock"]["detail"].startswith("ABI ")
    abi = int(layers["landlock"]["detail"].split()[1].rstrip(":"))
    assert abi >= 1 and "fs" in layers["landlock"]["detail"]
    if abi >= 7:
        assert "audit" in layers["landlock"]["detail"]
    assert layers["cgroups"]["detail"].split(";")[0] in ("v1", "v2", "hybrid")
    assert "clone3 present" in layers["clone3"]["detail"]
    if os.geteuid() == 0:
        assert "0 1000000000 65536" in layers["uid-map"]["detail"]


def test_in_process_probe_reaps_and_cleans_up():
    before = leftovers()
    mnt_before = open("/proc/self/mountinfo").read()
    netns_before = os.readlink("/proc/self/ns/net")
    children_before = children()  # (an earlier test's leftover is that test's failure, not ours)
    doctor.probe()
    assert children() == children_before
    assert leftovers() == before
    assert open("/proc/self/mountinfo").read() == mnt_before
    assert os.readlink("/proc/self/ns/net") == netns_before


def test_failing_layers_are_reported_with_fixes_not_raised():
    """Under a seccomp filter that refuses namespaces (as Docker's default profile does) and kills
    on landlock_create_ruleset, the doctor still answers: exit 1, the fix names the Docker flags."""
    pytest.importorskip("pyseccomp")
    script = (
        "import errno, os, sys, pyseccomp as sc\n"
        "f = sc.SyscallFilter(sc.ALLOW)\n"
        "f.add_rule(sc.ERRNO(errno.EPERM), 'unshare')\n"
        "f.add_rule(sc.ERRNO(errno.ENOSYS), 'clone3')\n"
        "f.add_rule(sc.KILL_PROCESS, 'landlock_create_ruleset')\n"
        "f.load()\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'zygote', 'doctor', '--json'])\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] is False
    layers = {la["name"]: la for la in out["layers"]}
    assert layers["ns-user"]["status"] == "missing"
    assert "EPERM" in layers["ns-user"]["detail"]
    assert "--security-opt seccomp=" in layers["ns-user"]["fix"]
    assert layers["clone3"]["status"] == "missing"
    assert "ENOSYS" in layers["clone3"]["detail"]
    assert layers["landlock"]["status"] == "missing"
    assert "SIGSYS" in layers["landlock"]["detail"]
    assert "lsm=landlock" in layers["landlock"]["fix"]
    for name in ("proc-mount", "tmpfs-mount", "bind-mount", "pivot-root", "veth"):
        assert layers[name]["status"] == "missing" and layers[name]["fix"], layers[name]
    # what does not depend on namespaces still works under the filter
    for name in ("seccomp", "no-new-privs", "python-prctl", "libseccomp"):
        assert layers[name]["status"] == "available", layers[name]
    assert "already runs under a seccomp filter" in layers["seccomp"]["detail"]


def test_without_capabilities_points_at_the_fix():
    """uid 0 with every capability dropped: the namespaces still come through a user namespace,
    but the 65536-id map, cgroups and nft need the privileges, and each says so."""
    setpriv = subprocess.run(["which", "setpriv"], capture_output=True, text=True).stdout.strip()
    if os.geteuid() != 0 or not setpriv:
        pytest.skip("needs root and setpriv")
    r = subprocess.run([setpriv, "--inh-caps=-all", "--bounding-set=-all", *ZYGOTE, "--json"],
                       capture_output=True, text=True, timeout=60)
    out = json.loads(r.stdout)
    layers = {la["name"]: la for la in out["layers"]}
    assert r.returncode == 1 and out["ok"] is False
    assert layers["ns-pid"]["status"] == "available"
    assert "inside a new user namespace" in layers["ns-pid"]["detail"]
    assert layers["uid-map"]["status"] == "missing"
    assert "CAP_SETUID" in layers["uid-map"]["fix"]
    assert layers["cap-net-admin"]["status"] == "missing"
    assert "--cap-add NET_ADMIN" in layers["cap-net-admin"]["fix"]
    assert layers["nft"]["status"] == "partial"


def test_overmounted_proc_names_systempaths():
    """Docker masks /proc paths with bind mounts; the kernel then refuses a fresh proc in a user
    namespace (mount_too_revealing). Reproduced in a private mount namespace of our own."""
    unshare = subprocess.run(["which", "unshare"], capture_output=True, text=True).stdout.strip()
    if os.geteuid() != 0 or not unshare or not os.path.exists("/proc/keys"):
        pytest.skip("needs root, unshare(1) and /proc/keys")
    cmd = "mount --bind /dev/null /proc/keys && exec " + " ".join([*ZYGOTE, "--json"])
    r = subprocess.run([unshare, "-m", "--propagation", "private", "sh", "-c", cmd],
                       capture_output=True, text=True, timeout=60)
    out = json.loads(r.stdout)
    layers = {la["name"]: la for la in out["layers"]}
    assert r.returncode == 1 and out["ok"] is False
    assert layers["proc-mount"]["status"] == "missing"
    assert "EPERM" in layers["proc-mount"]["detail"]
    assert "systempaths=unconfined" in layers["proc-mount"]["fix"]
    assert [la["name"] for la in out["layers"] if la["status"] != "available"] == ["proc-mount"]


def test_an_egress_table_the_kernel_refuses_makes_nft_partial(monkeypatch):
    """nft working is not enough: the daemon's table needs nft_connlimit, nft_limit and
    conntrack timeout policies (the children's flow budgets). The doctor loads the table in a
    throwaway network namespace; one the kernel refuses (here, a second batch made invalid: the
    probes are forked from this process) makes the layer partial, naming the kernel options."""
    from zygote import _nft
    if os.geteuid() != 0:
        pytest.skip("needs root (nft in the host's network namespace)")
    assert "egress table loads" in {la["name"]: la for la in doctor.probe()}["nft"]["detail"]
    monkeypatch.setattr(_nft, "timeouts", lambda table: f"table inet {table} {{ ct timeout x {{ protocol nosuch; }} }}\n")
    nft = {la["name"]: la for la in doctor.probe()}["nft"]
    assert nft["status"] == "partial" and "CONFIG_NF_CONNTRACK_TIMEOUT" in nft["fix"], nft


def test_the_egress_table_probe_leaves_nothing_in_the_callers_namespace(monkeypatch):
    """The probe loads its table in a throwaway network namespace, also from a process that has
    a libnftables context already (made in its own namespace, as the tests' process has): the
    table was once left in the caller's namespace."""
    from zygote import _nft
    if os.geteuid() != 0 or _nft._library() is None:
        pytest.skip("needs root and libnftables")
    doctor.probe()
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    if "zygote-doctor" in tables:
        subprocess.run(["nft", "delete", "table", "inet", "zygote-doctor"])
    assert "zygote-doctor" not in tables, tables
