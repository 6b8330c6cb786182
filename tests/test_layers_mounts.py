"""The mounts layer, standalone, in real user + mount + pid namespaces (no daemon).

Each probe forks; the child unshares user, mount and pid namespaces, waits for us to write its
uid/gid maps (as the daemon does), then forks the grandchild that is PID 1 of the new pid namespace.
The grandchild opens the bind sources (still with host uid 0 for the path walk), switches to
sandbox uid 0 (host uid ID_BASE), applies the plan from ``mounts.prepare`` and runs the check inside
the new root; the result comes back as JSON on a pipe.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid

import pytest

from zygote._childproto import ChildPlan
from zygote.layers import SetupError, _sys, mounts, userns
from zygote_client._config import SandboxConfig

from conftest import (ACL_GROUP_OBJ, ACL_MASK, ACL_NO_ID, ACL_OTHER, ACL_USER, ACL_USER_OBJ, drive_userns_child,
                      in_fork, set_acl)

ID_BASE = userns.DEFAULT_ID_BASE
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
_libc = ctypes.CDLL(None, use_errno=True)

INFO = {"executable": sys.executable, "prefix": sys.prefix, "base_prefix": sys.base_prefix,
        "path": list(sys.path), "version": list(sys.version_info[:3])}


def make_plan(cfg: SandboxConfig | None = None, **override) -> ChildPlan:
    fields = mounts.prepare(cfg or SandboxConfig(), INFO)
    fields.update(override)
    return ChildPlan(kind="exec", **fields)


def _send(fd: int, obj) -> None:
    data = json.dumps(obj).encode()
    while data:
        data = data[os.write(fd, data):]


def in_sandbox(plan: ChildPlan, check, pre=None, timeout: float = 30.0, fallback: bool = False):
    """Run ``check()`` inside ``plan``'s root as PID 1 of fresh namespaces; return its result.

    ``pre()`` runs in the child as host root before it unshares (e.g. to add mounts in a private
    namespace that the user namespace then inherits locked). Raises AssertionError with the
    child's traceback, or returns {"setup_error": ...} when apply() raised SetupError.
    """
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    res_r, res_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.close(ready_r)
            os.close(go_w)
            os.close(res_r)
            if pre is not None:
                pre()
            if _libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID) != 0:
                raise OSError(ctypes.get_errno(), "unshare")
            os.write(ready_w, b"u")
            if os.read(go_r, 1) != b"g":
                os._exit(3)
            gc = os.fork()
            if gc == 0:
                try:
                    mounts._use_mount_setattr = not fallback
                    t0 = time.perf_counter()
                    srcs = mounts.open_sources(plan)  # before the uid switch, as the pipeline should
                    userns.apply()
                    t1 = time.perf_counter()
                    mounts.apply(plan, srcs)
                    t2 = time.perf_counter()
                    out = {"ok": True, "open_ms": (t1 - t0) * 1e3, "apply_ms": (t2 - t1) * 1e3,
                           "result": check()}
                except SetupError as e:
                    out = {"ok": True, "setup_error": [e.step, e.errno, e.message, e.hint]}
                except BaseException:
                    out = {"ok": False, "error": traceback.format_exc()}
                try:
                    _send(res_w, out)
                finally:
                    os._exit(0)
            _, status = os.waitpid(gc, 0)
            code = os.waitstatus_to_exitcode(status)
        except BaseException:
            _send(res_w, {"ok": False, "error": traceback.format_exc()})
        finally:
            os._exit(code & 0xFF)
    os.close(ready_w)
    os.close(go_r)
    os.close(res_w)
    out = drive_userns_child(pid, ready_r, go_w, res_r, timeout, ID_BASE)
    assert out["ok"], out["error"]
    return out


def result(plan, check, **kw):
    out = in_sandbox(plan, check, **kw)
    assert "setup_error" not in out, out["setup_error"]
    return out["result"]


@pytest.fixture
def hostdir():
    """A host directory named for the project, removed afterwards."""
    dirs = []

    def make(owner: int | None = None) -> str:
        d = tempfile.mkdtemp(prefix="zygote-mounts-", dir="/tmp")
        os.chmod(d, 0o755)
        if owner is not None:
            os.chown(d, owner, owner)
        dirs.append(d)
        return d

    yield make
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def _errno_of(fn) -> int:
    try:
        fn()
    except OSError as e:
        return e.errno
    return 0


def _write_file(path: str, data: bytes = b"x") -> None:
    with open(path, "wb") as f:
        f.write(data)


# ---- prepare (daemon side) -----------------------------------------------------------------------

def test_prepare_default_root():
    p = mounts.prepare(SandboxConfig(), INFO)
    assert p["root"] == "tmpfs" and p["proc"] and p["dev"] and p["tmp"]
    targets = {b.target for b in p["binds"]}
    assert "/usr" in targets and sys.base_prefix in targets
    for secret in ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/hosts"):
        assert secret not in targets
    assert b"sandbox:x:65534:65534:sandbox:/tmp:/bin/sh" in p["etc_files"]["/etc/passwd"]
    assert p["etc_files"]["/etc/hostname"] == b"zygote\n"
    if os.path.islink("/bin"):
        assert p["symlinks"]["/bin"] == os.readlink("/bin")


@pytest.mark.parametrize("binds, match", [
    ({"/nonexistent-zygote": "/x"}, "does not exist"),
    ({"/etc": "/proc/x"}, "/proc"),
    ({"/etc": "/dev/foo"}, "/dev"),
    ({"/etc": "/usr"}, "would hide /usr"),
    ({"/proc/self": "/x"}, "kernel interface"),
    ({"/": "/host"}, "holds /proc"),  # (a recursive bind of / brought the host's /proc and /sys along)
    ({"/dev": "/hostdev"}, "devtmpfs"),  # (and of /dev the host's devpts, mqueue, hugetlbfs...)
    ({"/etc": "/usr/zygote-nonexistent"}, "must already exist"),
])
def test_prepare_rejects_bad_binds(binds, match):
    with pytest.raises(ValueError, match=match):
        mounts.prepare(SandboxConfig(ro_binds=binds), INFO)


def test_prepare_rejects_root_bind():
    with pytest.raises(ValueError):  # caught by SandboxConfig itself, or by prepare
        mounts.prepare(SandboxConfig(rw_binds={"/tmp": "/"}), INFO)


# ---- security ------------------------------------------------------------------------------------

def test_SECURITY_mounts_no_host_secrets():
    secret_dir = tempfile.mkdtemp(prefix="zygote-secret-", dir="/root")
    secret = os.path.join(secret_dir, "secret.txt")
    _write_file(secret, b"host secret")
    os.chmod(secret_dir, 0o755)
    os.chmod(secret, 0o644)
    try:
        plan = make_plan()

        def probe():
            def visible(p):
                try:
                    with open(p, "rb"):
                        return True
                except OSError:
                    return False
            info = open("/proc/self/mountinfo").read().splitlines()
            return {"shadow": visible("/etc/shadow"), "secret": visible(secret),
                    "via_proc1": visible("/proc/1/root/etc/shadow"),
                    "via_proc1_secret": visible("/proc/1/root" + secret),
                    "root": sorted(os.listdir("/")), "root_home": sorted(os.listdir("/root")),
                    "sys": os.path.exists("/sys"), "mnt": os.path.exists("/mnt"),
                    "pids": sorted(d for d in os.listdir("/proc") if d.isdigit()),
                    "mountinfo": [line.split(" ")[3:5] for line in info],
                    "passwd": open("/etc/passwd").read()}

        r = result(plan, probe)
        assert not r["shadow"] and not r["secret"]
        assert not r["via_proc1"] and not r["via_proc1_secret"]
        expected_top = {t.split("/")[1] for t in [*(b.target for b in plan.binds), *plan.etc_files,
                                                 *plan.symlinks]} | {"tmp", "dev", "proc"}
        assert set(r["root"]) == expected_top
        if sys.base_prefix.startswith("/root/"):
            assert r["root_home"] == [".pyenv"]  # /root holds only the interpreter's mountpoint
        assert not r["sys"] and not r["mnt"]
        assert r["pids"] == ["1"]
        assert "root:x:0:0" in r["passwd"] and "shadow" not in r["passwd"]
        sources = [b.source for b in plan.binds]
        dev_roots = {f"/{n}" for n in mounts._DEV_NODES}
        for root, mountpoint in r["mountinfo"]:
            assert (root == "/" or root in dev_roots or any(mounts._under(root, s) for s in sources)), root
            assert not mounts._under(mountpoint, "/sys")
        # Control: without the new root the same probe sees the host's secrets.
        # (The secret itself stays out of reach there too: /root is 0700 for the sandbox's host uid.)
        host = result(make_plan(root="host"),
                      lambda: [os.path.exists(p) for p in ("/etc/shadow", "/sys/kernel")])
        assert host == [True, True]
    finally:
        shutil.rmtree(secret_dir)


@pytest.mark.parametrize("fallback", [False, True], ids=["mount_setattr", "remount"])
def test_SECURITY_mounts_readonly(hostdir, fallback):
    ro = hostdir(owner=ID_BASE)  # sandbox root owns it: only the read-only mount stops writes
    os.mkdir(os.path.join(ro, "sub"))
    os.chown(os.path.join(ro, "sub"), ID_BASE, ID_BASE)
    rw = hostdir(owner=ID_BASE)
    cfg = SandboxConfig(ro_binds={ro: "/data/ro"}, rw_binds={rw: "/data/rw"})
    plan = make_plan(cfg)
    token = uuid.uuid4().hex

    def pre():
        # A mount below the ro bind's source, made in a private namespace so the user namespace
        # inherits it locked: the read-only flag must reach it too.
        if _libc.unshare(CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "unshare")
        _sys.mount(None, "/", None, _sys.MS_REC | _sys.MS_PRIVATE)
        _sys.mount("zygote-sub", os.path.join(ro, "sub"), "tmpfs", 0, "size=64k,mode=0777")

    def probe():
        def w(p):
            return _errno_of(lambda: _write_file(p))
        out = {p: w(p) for p in ("/usr/zg", "/zg", "/etc/zg", "/etc/passwd", "/data/ro/zg",
                                 "/data/ro/sub/zg", sys.base_prefix + "/zg", "/dev/zg", "/tmp/zg",
                                 f"/data/rw/{token}")}
        out["mkdir_root"] = _errno_of(lambda: os.mkdir("/zgdir"))
        out["devnull"] = _errno_of(lambda: _write_file("/dev/null"))
        return out

    r = result(plan, probe, pre=pre, fallback=fallback)
    for p in ("/usr/zg", "/zg", "/etc/zg", "/etc/passwd", "/data/ro/zg", "/data/ro/sub/zg",
              sys.base_prefix + "/zg", "/dev/zg", "mkdir_root"):
        assert r[p] in (errno.EROFS, errno.EACCES), (p, r[p])
    assert r["/data/ro/sub/zg"] == errno.EROFS
    assert r["/data/ro/zg"] == errno.EROFS
    assert r["/tmp/zg"] == 0 and r["devnull"] == 0
    assert r[f"/data/rw/{token}"] == 0
    assert os.path.exists(os.path.join(rw, token)), "the rw bind's write did not reach the host"
    assert os.listdir(ro) == ["sub"]
    # Control: a writable bind of the same directory is writable, so EROFS above is the layer's.
    plan2 = make_plan(SandboxConfig(rw_binds={ro: "/data/ro"}))
    assert result(plan2, lambda: _errno_of(lambda: _write_file("/data/ro/zg"))) == 0
    os.unlink(os.path.join(ro, "zg"))


def test_SECURITY_mounts_tmp_capped():
    size = 1 << 20
    plan = make_plan(SandboxConfig(tmpfs_size=size))
    name = f"zygote-fill-{uuid.uuid4().hex}"

    def probe():
        written, err = 0, 0
        chunk = b"\0" * 65536
        fd = os.open(f"/tmp/{name}", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while written < 8 * size:
                written += os.write(fd, chunk)
        except OSError as e:
            err = e.errno
        finally:
            os.close(fd)
        return {"written": written, "errno": err}

    r = result(plan, probe)
    assert r["errno"] == errno.ENOSPC
    assert size // 2 <= r["written"] <= size
    assert not os.path.exists(f"/tmp/{name}")


# ---- function ------------------------------------------------------------------------------------

def test_mounts_python_works():
    # Modules the test process has not imported yet, so the child loads them from its own root.
    # (The list is long: the suite's other imports, e.g. prometheus_client, load many of them.)
    fresh = [m for m in ("decimal", "ssl", "sqlite3", "csv", "zoneinfo", "uuid", "fractions", "mailbox",
                         "wave", "plistlib", "imaplib", "xml.dom.minidom", "lzma", "bz2", "smtplib",
                         "sqlite3.dump", "curses.ascii", "dbm.dumb")
             if m not in sys.modules]
    plan = make_plan(SandboxConfig(uid=1000, gid=1000, hostname="zg-test", dev_pts=True))

    def probe():
        import importlib
        import pwd
        for m in fresh:
            importlib.import_module(m)
        import ssl
        ctx = ssl.create_default_context()
        sh = subprocess.run(["/bin/sh", "-c", "echo hi"], capture_output=True, text=True)
        py = subprocess.run([sys.executable, "-c", "import sys, json; print(sys.prefix)"],
                            capture_output=True, text=True)
        return {"sh": sh.stdout, "py": py.stdout.strip(), "py_err": py.stderr[-2000:],
                "cas": ctx.cert_store_stats()["x509_ca"] + len(ctx.get_ca_certs()) or
                os.path.exists("/etc/ssl/certs/ca-certificates.crt"),
                "user": pwd.getpwuid(1000).pw_name, "home": pwd.getpwnam("sandbox").pw_dir,
                "hostname": open("/etc/hostname").read().strip(), "cwd": os.getcwd(),
                "tz": time.strftime("%Z"), "ptmx": os.path.exists("/dev/ptmx"),
                "urandom": len(open("/dev/urandom", "rb").read(8))}

    r = result(plan, probe)
    assert fresh, "every probe module was already imported; pick others"
    assert r["sh"] == "hi\n"
    assert r["py"] == sys.prefix, r["py_err"]
    assert r["user"] == "sandbox" and r["home"] == "/tmp"
    assert r["hostname"] == "zg-test" and r["cwd"] == "/"
    assert r["ptmx"] and r["urandom"] == 8
    assert r["cas"]


def test_mounts_chroot_dir(hostdir):
    root = hostdir()
    for d in ("bin", "dev", "tmp"):
        os.mkdir(os.path.join(root, d))
    busybox = shutil.which("busybox")
    if busybox is None or b"statically linked" not in subprocess.run(
            ["file", "-L", busybox], capture_output=True).stdout:
        src = os.path.join(root, "hello.c")
        _write_file(src, b'#include <stdio.h>\nint main(){puts("hello");return 0;}\n')
        if shutil.which("gcc") is None or subprocess.run(
                ["gcc", "-static", "-O2", "-o", os.path.join(root, "bin", "hello"), src]).returncode:
            pytest.skip("needs a static busybox or gcc with a static libc")
        argv = ["/bin/hello"]
        want = "hello"
    else:
        shutil.copy(busybox, os.path.join(root, "bin", "busybox"))
        argv = ["/bin/busybox", "sh", "-c", "echo hello; /bin/busybox ls /"]
        want = "hello"
    plan = make_plan(SandboxConfig(chroot_dir=root))
    assert plan.root == "chroot" and not plan.proc and plan.binds == []

    def probe():
        run = subprocess.run(argv, capture_output=True, text=True)
        return {"out": run.stdout, "rc": run.returncode, "cwd": os.getcwd(), "root": sorted(os.listdir("/")),
                "proc": os.path.exists("/proc"), "sys": os.path.exists("/sys"),
                "write_root": _errno_of(lambda: _write_file("/zg")),
                "write_tmp": _errno_of(lambda: _write_file("/tmp/zg")),
                "dev": sorted(os.listdir("/dev"))}

    r = result(plan, probe)
    assert r["rc"] == 0 and r["out"].startswith(want), r
    assert r["cwd"] == "/"
    assert not r["proc"] and not r["sys"]
    assert set(r["root"]) >= {"bin", "dev", "tmp"} and "usr" not in r["root"]
    assert r["write_root"] in (errno.EROFS, errno.EACCES) and r["write_tmp"] == 0
    assert "null" in r["dev"]
    assert not os.path.exists(os.path.join(root, "tmp", "zg")), "the chroot's /tmp was written"


def test_mounts_missing_required_source_fails_closed(hostdir):
    d = hostdir()
    plan = make_plan(SandboxConfig(ro_binds={d: "/data"}))
    os.rmdir(d)  # gone between prepare and the child
    out = in_sandbox(plan, lambda: None)
    step, err, message, _hint = out["setup_error"]
    assert step == "mounts" and err == errno.ENOENT and d in message


def test_mounts_cost():
    plan = make_plan()
    runs = [in_sandbox(plan, lambda: None) for _ in range(50)]
    apply_ms = statistics.median(r["apply_ms"] for r in runs)
    open_ms = statistics.median(r["open_ms"] for r in runs)
    print(f"\nmounts: {len(plan.binds)} binds; median open_sources+setresuid {open_ms:.3f} ms, "
          f"apply {apply_ms:.3f} ms over {len(runs)} runs")


def test_SECURITY_bind_source_swapped_to_symlink_is_refused(tmp_path):
    """The daemon checks a bind source against the peer's permissions by its canonical path; the
    child opens that path later. A component swapped for a symlink in between must not be
    followed (it could point at what the peer may not read)."""
    import errno as _errno
    from zygote.layers import SetupError
    from zygote.layers import mounts as _mounts
    real = tmp_path / "real"
    real.mkdir()
    (real / "f").write_text("x")
    os.symlink(str(real), tmp_path / "swapped")
    os.close(_mounts._open_path(str(real / "f")))
    with pytest.raises(SetupError) as e:
        _mounts._open_path(str(tmp_path / "swapped" / "f"))
    assert e.value.errno == _errno.ELOOP


def test_SECURITY_a_source_the_client_named_is_bound_only_if_it_is_what_the_daemon_checked(hostdir):
    """The daemon checks a source the client named against the client's ids, and the child opens
    it later with the daemon's rights. A directory on the way renamed in between for one the
    client cannot search (here its own dir, swapped for a root-only one beside it) led the
    child to a file the client could never reach: the child binds only the file the daemon
    checked (its device and inode), or fails."""
    mine = hostdir(owner=4242)
    os.mkdir(os.path.join(mine, "a"))
    os.mkdir(os.path.join(mine, "private"), 0o700)  # root's, in a directory the client owns
    for d, text in (("a", "mine"), ("private", "root's")):
        with open(os.path.join(mine, d, "f"), "w") as out:
            out.write(text)
        os.chmod(os.path.join(mine, d, "f"), 0o644)
    os.chown(os.path.join(mine, "a"), 4242, 4242)
    f = os.path.join(mine, "a", "f")
    plan = ChildPlan(kind="exec", **mounts.prepare(SandboxConfig(ro_binds={f: "/f"}), INFO, pins={f: _pin_of(f)}))
    assert result(plan, lambda: open("/f").read()) == "mine"
    os.rename(os.path.join(mine, "a"), os.path.join(mine, "old"))  # (what the client itself can do)
    os.rename(os.path.join(mine, "private"), os.path.join(mine, "a"))
    step, err, message, _hint = in_sandbox(plan, lambda: open("/f").read())["setup_error"]
    assert step == "mounts" and err == errno.ESTALE and "not what the daemon checked" in message
    unpinned = ChildPlan(kind="exec", **mounts.prepare(SandboxConfig(ro_binds={f: "/f"}), INFO))
    assert result(unpinned, lambda: open("/f").read()) == "root's"  # (what the pin stops)


def _pin_of(path: str) -> tuple[str, int, int, str]:
    """What check_peer_paths pins for ``path``: (path, st_dev, st_ino, file handle)."""
    fd = os.open(path, os.O_PATH)
    try:
        st = os.fstat(fd)
        return path, st.st_dev, st.st_ino, _sys.file_handle(fd)
    finally:
        os.close(fd)


def test_SECURITY_a_source_replaced_by_a_file_with_its_inode_number_is_not_bound(hostdir):
    """ext4 gives a deleted file's inode number to the next file made at once: a pin of device
    and inode alone let the child bind a new file that took the checked one's number (a
    helper's review). The pin holds the file handle too, whose generation differs."""
    d = hostdir()
    f = os.path.join(d, "f")
    for _ in range(50):
        with open(f, "w") as out:
            out.write("checked")
        pin = _pin_of(f)
        os.unlink(f)
        with open(f, "w") as out:
            out.write("another")
        if os.stat(f).st_ino == pin[2]:
            break
        os.unlink(f)
    assert os.stat(f).st_ino == pin[2] and pin[3], "the file system gave the number out again"
    plan = ChildPlan(kind="exec", **mounts.prepare(SandboxConfig(ro_binds={f: "/f"}), INFO, pins={f: pin}))
    step, err, message, _hint = in_sandbox(plan, lambda: open("/f").read())["setup_error"]
    assert step == "mounts" and err == errno.ESTALE and "not what the daemon checked" in message


def test_SECURITY_a_chroot_dir_the_client_named_is_used_only_if_it_is_what_the_daemon_checked(hostdir):
    """The same as for bind sources, for chroot_dir: a directory on the way renamed after the
    check for a root-only one holding a tree of the same shape must not become the child's
    root (the child would read what the client could never reach)."""
    mine = hostdir(owner=4242)
    for d in ("a", "private"):
        os.mkdir(os.path.join(mine, d), 0o700 if d == "private" else 0o755)
        os.mkdir(os.path.join(mine, d, "c"), 0o755)
        os.mkdir(os.path.join(mine, d, "c", "tmp"))
        with open(os.path.join(mine, d, "c", "marker"), "w") as out:
            out.write(d)
        os.chmod(os.path.join(mine, d, "c", "marker"), 0o644)
    root = os.path.join(mine, "a", "c")
    plan = ChildPlan(kind="exec", **mounts.prepare(SandboxConfig(chroot_dir=root), INFO, pins={root: _pin_of(root)}))
    assert plan.chroot_pin == _pin_of(root)[1:]
    assert result(plan, lambda: open("/marker").read()) == "a"
    os.rename(os.path.join(mine, "a"), os.path.join(mine, "old"))  # (the client's own directory)
    os.rename(os.path.join(mine, "private"), os.path.join(mine, "a"))
    step, err, message, _hint = in_sandbox(plan, lambda: open("/marker").read())["setup_error"]
    assert step == "mounts" and err == errno.ESTALE and "not what the daemon checked" in message


def test_SECURITY_prepare_takes_the_checked_path_of_a_source_the_client_named(hostdir):
    """The daemon resolves a source the client named once, in the check; prepare resolved it
    again as root, so a client re-pointing its own symlink in between learnt whether paths it
    cannot reach exist (and are directories) from the error. Now the checked path is used."""
    d = hostdir()
    st = os.stat(d)
    gone = os.path.join(d, "no-such-link")  # what the client's path leads to by now: nothing
    fields = mounts.prepare(SandboxConfig(ro_binds={gone: "/x"}), INFO, pins={gone: (d, st.st_dev, st.st_ino, "")})
    (spec,) = [b for b in fields["binds"] if b.target == "/x"]
    assert spec.source == d and spec.pin == (st.st_dev, st.st_ino, "")



def test_SECURITY_a_client_s_paths_are_checked_by_the_kernel_as_the_client(hostdir):
    """check_peer_paths guessed from mode bits: an ACL denying the client a file its "other"
    bits let everyone read passed, so the client got it bound (the child opens sources with the
    daemon's rights). It now asks the kernel, in a process that takes the client's uid, gid and
    supplementary groups: ACLs that deny or grant, and groups, count as the client's own open
    would find them; the daemon keeps its ids and capabilities."""
    from zygote import policy
    d = hostdir()
    denied = os.path.join(d, "denied")  # 0644, but an ACL entry gives uid 4001 nothing
    with open(denied, "w") as f:
        f.write("x")
    os.chmod(denied, 0o644)
    set_acl(denied, (ACL_USER_OBJ, 6, ACL_NO_ID), (ACL_USER, 0, 4001), (ACL_GROUP_OBJ, 4, ACL_NO_ID),
            (ACL_MASK, 4, ACL_NO_ID), (ACL_OTHER, 4, ACL_NO_ID))
    assert stat.S_IMODE(os.stat(denied).st_mode) == 0o644
    grouped = os.path.join(d, "grouped")  # 0640 root:4300
    with open(grouped, "w") as f:
        f.write("x")
    os.chmod(grouped, 0o640)
    os.chown(grouped, 0, 4300)
    granted = os.path.join(d, "granted")  # a 0700 root directory an ACL opens to uid 4001
    os.mkdir(granted, 0o700)
    set_acl(granted, (ACL_USER_OBJ, 7, ACL_NO_ID), (ACL_USER, 7, 4001), (ACL_GROUP_OBJ, 0, ACL_NO_ID),
            (ACL_MASK, 7, ACL_NO_ID), (ACL_OTHER, 0, ACL_NO_ID))

    def check(field: str, path: str, uid: int, groups: tuple[int, ...] = ()) -> bool:
        cfg = SandboxConfig(**{field: {path: "/x"}})
        try:
            pins = policy.check_peer_paths(cfg, SandboxConfig(), uid, uid, groups)
        except policy.PolicyError as e:
            assert f"uid {uid} may not" in str(e)
            return False
        assert pins == {path: _pin_of(path)}
        return True

    def ids() -> tuple[str, str]:
        status = dict(line.split(":\t", 1) for line in open("/proc/thread-self/status").read().splitlines())
        return status["Uid"], status["CapEff"]

    before = ids()
    assert not check("ro_binds", denied, 4001)      # the ACL entry denies; mode bits said yes
    assert check("ro_binds", denied, 4002)          # (no entry for 4002: the "other" bits)
    assert not check("ro_binds", grouped, 4001)
    assert check("ro_binds", grouped, 4001, (4300,))  # a supplementary group of the client's
    assert check("rw_binds", granted, 4001)           # an ACL that grants (mode bits said no)
    assert not check("rw_binds", granted, 4002)
    assert not check("rw_binds", d, 4001)             # root's 0755 directory: read, not write
    assert check("ro_binds", d, 4001)
    assert ids() == before  # the checks ran as the client in a process of their own
    with pytest.raises(policy.PolicyError, match="supplementary groups"):  # groups unknown: nothing passes
        policy.check_peer_paths(SandboxConfig(ro_binds={d: "/x"}), SandboxConfig(), 4001, 4001, None)


def test_SECURITY_a_client_s_path_through_a_proc_magic_link_is_refused(hostdir, monkeypatch):
    """A /proc magic link jumps into a directory without the search checks of its parents. The
    check's own /proc/self links are open to it whatever its ids: a client symlink to
    /proc/self/cwd reached into the working directory it inherits from the daemon (here inside
    a root-only directory). A helper's review found the first version of the check, a thread of
    the daemon walking realpath's text again, followed such a link swapped in between. The
    check follows no magic link (RESOLVE_NO_MAGICLINKS: without it, this test's file is pinned)."""
    from zygote import policy
    d = hostdir()
    inner = os.path.join(d, "private", "inner")
    os.makedirs(inner)
    os.chmod(os.path.join(d, "private"), 0o700)  # root's: uid 4001 cannot search it
    os.chmod(inner, 0o755)
    with open(os.path.join(inner, "secret"), "w") as f:
        f.write("root's")
    os.chmod(os.path.join(inner, "secret"), 0o644)
    mine = os.path.join(d, "mine")
    os.mkdir(mine)
    os.chown(mine, 4001, 4001)
    os.symlink("/proc/self/cwd", os.path.join(mine, "jump"))
    monkeypatch.chdir(inner)  # (the daemon's working directory, which the check inherits)
    for path in (os.path.join(inner, "secret"), os.path.join(mine, "jump", "secret")):
        with pytest.raises(policy.PolicyError, match="uid 4001 may not read"):
            policy.check_peer_paths(SandboxConfig(ro_binds={path: "/x"}), SandboxConfig(), 4001, 4001)


def test_a_long_chain_of_symlinks_is_refused_as_unreachable(hostdir):
    """The kernel walks a client's path (40 links at most): a chain of 1500 symlinks is a path
    the client cannot reach, not a RecursionError in the daemon's own resolution."""
    from zygote import policy
    d = hostdir()
    with open(os.path.join(d, "f"), "w") as f:
        f.write("x")
    prev = "f"
    for i in range(1500):
        os.symlink(prev, os.path.join(d, f"l{i}"))
        prev = f"l{i}"
    with pytest.raises(policy.PolicyError, match="uid 4001 may not read"):
        policy.check_peer_paths(SandboxConfig(ro_binds={os.path.join(d, prev): "/x"}), SandboxConfig(), 4001, 4001)


def test_a_path_the_plan_could_not_carry_is_refused_at_the_check(hostdir, monkeypatch):
    """A canonical path that is not UTF-8 passed the check, and the child's plan failed to
    encode after its clone; one longer than PATH_MAX raised a raw OSError (an "internal" error).
    Both are paths out of reach now. A check that takes too long is killed and refused."""
    from zygote import policy
    d = hostdir()
    latin = os.path.join(os.fsencode(d), b"caf\xe9")
    os.mkdir(latin)
    os.symlink(latin, os.path.join(d, "utf8-link"))
    deep = d
    for _ in range(2):  # two links to directories of 255-character names nested ten deep
        long = os.path.join(deep, "n" * 200)
        os.makedirs(os.path.join(long, *(["d" * 250] * 10)))
        os.symlink(os.path.join(long, *(["d" * 250] * 10)), os.path.join(d, f"far{len(deep)}"))
        deep = os.path.join(d, f"far{len(deep)}")
    for path in (os.path.join(d, "utf8-link"), deep):
        with pytest.raises(policy.PolicyError, match="uid 4001 may not read"):
            policy.check_peer_paths(SandboxConfig(ro_binds={path: "/x"}), SandboxConfig(), 4001, 4001)
    monkeypatch.setattr(policy, "CHECK_TIMEOUT", 0.001)
    with pytest.raises(policy.PolicyError, match="took over"):
        policy.check_peer_paths(SandboxConfig(ro_binds={d: "/x"}), SandboxConfig(), 4001, 4001)


def test_SECURITY_a_mount_table_that_cannot_be_read_refuses_binds(hostdir):
    """Binds are refused when the daemon cannot read its mount table: the check for kernel
    interfaces under a bind source let every bind through unchecked when /proc/self/mountinfo
    could not be read. (A process of the test's own, with /proc covered in its own mount
    namespace.)"""
    d = hostdir()

    def without_proc() -> str:
        _sys.unshare(CLONE_NEWNS)
        _sys.mount(None, "/", None, _sys.MS_REC | _sys.MS_PRIVATE)
        _sys.mount("tmpfs", "/proc", "tmpfs", 0)
        try:
            mounts.prepare(SandboxConfig(ro_binds={d: "/data"}), INFO)
        except ValueError as e:
            return str(e)
        return "prepared"

    out = in_fork(without_proc)
    assert "cannot read /proc/self/mountinfo" in out, out


def test_SECURITY_a_path_named_twice_must_be_the_same_file_both_times(monkeypatch, hostdir):
    """check_peer_paths pins each path the client named; named twice (a write bind and
    chroot_dir) and checked twice, it must have been the same file both times, or the read check
    (chroot_dir) could replace the write check of the rw bind of the same path. (The file each
    check finds stands in for a path swapped between them.)"""
    from zygote import policy
    d = hostdir()
    cfg = SandboxConfig(rw_binds={d: "/x"}, chroot_dir=d)
    found = iter([(d, 1, 2), (d, 1, 2)])
    # (with a chroot_dir every bind target lies inside it: those are asked too, as "e")
    monkeypatch.setattr(policy, "_as_peer", lambda uid, gid, groups, asks: [
        next(found) if kind != "e" else (d + "/x", 1, 9, "") for _, kind in asks])
    assert policy.check_peer_paths(cfg, SandboxConfig(), 4001, 4001) == {d: (d, 1, 2)}
    found = iter([(d, 1, 2), ("/elsewhere", 1, 3)])
    with pytest.raises(policy.PolicyError, match="changed while the request was checked"):
        policy.check_peer_paths(cfg, SandboxConfig(), 4001, 4001)
