"""Landlock and privilege-drop layers, each applied in a real user namespace without the daemon.

Every check runs in a forked child that unshares a user + mount namespace (uid 0 inside, mapped to
an unprivileged host range as the daemon maps it) and reports JSON back over a pipe. Each security
test also runs the same probe without the layer (the control) so it fails if the layer is removed.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import traceback

import prctl
import pytest

from zygote.layers import SetupError, _sys, landlock, privileges, userns

from conftest import drive_userns_child

ID_BASE = userns.DEFAULT_ID_BASE  # sandbox uid 0 is this host uid
NOBODY = 65534
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
_libc = ctypes.CDLL(None, use_errno=True)

ABI = landlock.abi_version()


def needs_abi(n: int, what: str):
    return pytest.mark.skipif(ABI < n, reason=f"{what} needs Landlock ABI {n}; this kernel has {ABI}")


# ---- the namespace helper ----------------------------------------------------------------------

def in_userns(check, setup=None, timeout: float = 30.0):
    """Fork; the child unshares user+mount namespaces, becomes uid 0 there (maps written by us, as the
    daemon does), runs ``setup()`` (the layers under test) then ``check()``, and sends back JSON."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    res_r, res_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(ready_r)
            os.close(go_w)
            os.close(res_r)
            if _libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
                raise OSError(ctypes.get_errno(), "unshare")
            os.write(ready_w, b"u")
            os.close(ready_w)
            if os.read(go_r, 1) != b"g":
                os._exit(3)
            userns.apply()
            _sys.mount(None, "/", None, _sys.MS_REC | _sys.MS_PRIVATE)  # nothing leaks to the host
            if setup is not None:
                setup()
            out = {"ok": True, "result": check()}
        except BaseException:
            out = {"ok": False, "error": traceback.format_exc()}
        try:
            data = json.dumps(out).encode()
            while data:
                data = data[os.write(res_w, data):]
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(go_r)
    os.close(res_w)
    out = drive_userns_child(pid, ready_r, go_w, res_r, timeout, ID_BASE)
    if not out["ok"]:
        pytest.fail("child failed:\n" + out["error"])
    return out["result"]


def attempt(fn, *args) -> str:
    """"ok", or the errno name of the OSError the call raised."""
    try:
        fn(*args)
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return "ok"


def read(path: str) -> None:
    with open(path, "rb") as f:
        f.read()


def write(path: str) -> None:
    with open(path, "ab") as f:
        f.write(b"x")


@pytest.fixture
def zg_dir():
    """A world-traversable temp dir (the child's mapped ids cannot enter pytest's 0700 tmp_path)."""
    d = tempfile.mkdtemp(prefix="zg-test-", dir="/tmp")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def owned_by_sandbox_root(path: str, mode: int) -> str:
    os.chown(path, ID_BASE, ID_BASE)
    os.chmod(path, mode)
    return path


def system_ro() -> list[str]:
    # (not sys.base_prefix: under /root, 0700, which the sandbox ids cannot even open for a rule)
    return ["/usr", "/lib", "/lib64", "/bin", "/etc", sys.prefix]


# ---- landlock ----------------------------------------------------------------------------------

def _fs_tree(base: str) -> dict[str, str]:
    p = {name: os.path.join(base, name) for name in ("secret", "ro", "rw")}
    os.mkdir(p["secret"], 0o755)
    for name in ("ro", "rw"):
        os.mkdir(p[name])
        owned_by_sandbox_root(p[name], 0o755)  # writable by the child without Landlock
    with open(os.path.join(p["secret"], "secret.txt"), "w") as f:
        f.write("host secret")
    os.chmod(os.path.join(p["secret"], "secret.txt"), 0o644)
    with open(os.path.join(p["ro"], "data.txt"), "w") as f:
        f.write("data")
    allowed = os.path.join(p["secret"], "allowed.txt")
    with open(allowed, "w") as f:
        f.write("a")
    owned_by_sandbox_root(allowed, 0o644)
    p["allowed"] = allowed
    return p


def _fs_probe(p: dict[str, str]) -> dict[str, str]:
    return {
        "secret_read": attempt(read, os.path.join(p["secret"], "secret.txt")),
        "secret_list": attempt(os.listdir, p["secret"]),
        "ro_read": attempt(read, os.path.join(p["ro"], "data.txt")),
        "etc_read": attempt(read, "/etc/passwd"),
        "ro_write": attempt(write, os.path.join(p["ro"], "new.txt")),
        "rw_write": attempt(write, os.path.join(p["rw"], "new.txt")),
        "file_rule_write": attempt(write, p["allowed"]),  # a rule on a single file
    }


@needs_abi(1, "filesystem rules")
def test_SECURITY_landlock_denies_read_outside(zg_dir):
    p = _fs_tree(zg_dir)
    control = in_userns(lambda: _fs_probe(p))
    assert set(control.values()) == {"ok"}, control

    abi = []

    def setup():
        abi.append(landlock.apply(system_ro() + [p["ro"], "/nonexistent-zg"], [p["rw"], p["allowed"]],
                                  deny_tcp=True, mode="required"))

    confined = in_userns(lambda: dict(_fs_probe(p), abi=abi[0]), setup)
    assert confined == {
        "secret_read": "EACCES", "secret_list": "EACCES", "ro_read": "ok", "etc_read": "ok",
        "ro_write": "EACCES", "rw_write": "ok", "file_rule_write": "ok", "abi": ABI,
    }


@needs_abi(4, "TCP rules")
def test_SECURITY_landlock_denies_tcp_connect():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]

        def probe():
            with socket.socket() as s:
                connect = attempt(s.connect, ("127.0.0.1", port))
            with socket.socket() as s:
                bind = attempt(s.bind, ("127.0.0.1", 0))
            return {"connect": connect, "bind": bind}

        assert in_userns(probe) == {"connect": "ok", "bind": "ok"}  # same netns: reachable
        confined = in_userns(probe, lambda: landlock.apply(system_ro(), [], deny_tcp=True, mode="required"))
        assert confined == {"connect": "EACCES", "bind": "EACCES"}


@needs_abi(6, "signal scoping")
def test_SECURITY_landlock_scopes_signals():
    # Owned by the sandbox's host uid, so without Landlock the child may signal it (kill(2) rules).
    sleeper = subprocess.Popen(["sleep", "60"], user=ID_BASE, group=ID_BASE, extra_groups=[])
    try:
        probe = lambda: attempt(os.kill, sleeper.pid, 0)  # noqa: E731
        assert in_userns(probe) == "ok"
        confined = in_userns(probe, lambda: landlock.apply(system_ro(), [], deny_tcp=False, mode="required"))
        assert confined == "EPERM"
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


@needs_abi(6, "abstract unix socket scoping")
def test_SECURITY_landlock_scopes_abstract_unix_sockets():
    name = f"\0zg-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(name)
        listener.listen(8)

        def probe():
            with socket.socket(socket.AF_UNIX) as s:
                return attempt(s.connect, name)

        assert in_userns(probe) == "ok"
        confined = in_userns(probe, lambda: landlock.apply(system_ro(), [], deny_tcp=False, mode="required"))
        assert confined == "EPERM"


def test_landlock_required_fails_closed():
    def probe():
        try:
            landlock.apply(["/"], [], deny_tcp=True, mode="required", required_abi=99)
        except SetupError as e:
            return {"step": e.step, "errno": e.errno, "hint": e.hint}
        return "applied"

    out = in_userns(probe)
    assert out != "applied"
    assert out["step"] == "landlock" and out["errno"] == errno.EOPNOTSUPP and out["hint"]


def test_landlock_abi_and_rights():
    assert ABI >= 0
    assert landlock.fs_rights(1) == (1 << 13) - 1
    assert landlock.fs_rights(2) & landlock.FS_REFER and not landlock.fs_rights(2) & landlock.FS_TRUNCATE
    assert landlock.fs_rights(5) & landlock.FS_IOCTL_DEV
    assert not landlock.fs_rights(4) & landlock.FS_IOCTL_DEV


# ---- privileges --------------------------------------------------------------------------------

def _status_caps() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {k: int(v, 16) for k, v in (line.split(":") for line in f) if k.startswith("Cap")}


def _set_securebits_raw(bits: int) -> None:
    if _sys.libc.prctl(privileges.PR_SET_SECUREBITS, bits, 0, 0, 0) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _priv_probe(mnt: str) -> dict:
    def keep_caps():  # raw: python-prctl refuses bits 6-7, which the layer sets
        _set_securebits_raw(_sys.libc.prctl(privileges.PR_GET_SECUREBITS, 0, 0, 0, 0) | privileges.SECBIT_KEEP_CAPS)

    out = {
        "resuid": list(os.getresuid()), "resgid": list(os.getresgid()),
        "caps": _status_caps(),
        "nnp": bool(prctl.get_no_new_privs()),
        "securebits": _sys.libc.prctl(privileges.PR_GET_SECUREBITS, 0, 0, 0, 0),
        "securebits_clear": attempt(_set_securebits_raw, 0),
        "keep_caps": attempt(keep_caps),
        "mount": attempt(_sys.mount, "zg-tmpfs", mnt, "tmpfs", 0),
    }
    out["setuid0"] = attempt(os.setuid, 0)  # last: in the control it is a no-op (already 0)
    return out


@pytest.fixture(scope="module")
def priv_results():
    d = tempfile.mkdtemp(prefix="zg-test-", dir="/tmp")
    try:
        os.chmod(d, 0o755)
        mnt = os.path.join(d, "mnt")
        os.mkdir(mnt)
        owned_by_sandbox_root(mnt, 0o755)
        control = in_userns(lambda: _priv_probe(mnt))
        confined = in_userns(lambda: _priv_probe(mnt), lambda: privileges.apply(NOBODY, NOBODY))
        yield control, confined
    finally:
        shutil.rmtree(d)


def test_SECURITY_privileges_ids(priv_results):
    control, confined = priv_results
    assert control["resuid"] == [0, 0, 0] and control["resgid"] == [0, 0, 0]
    assert confined["resuid"] == [NOBODY] * 3 and confined["resgid"] == [NOBODY] * 3


def test_SECURITY_privileges_setuid_root_fails(priv_results):
    control, confined = priv_results
    assert control["setuid0"] == "ok"
    assert confined["setuid0"] == "EPERM"


def test_SECURITY_privileges_capabilities_empty(priv_results):
    control, confined = priv_results
    assert control["caps"]["CapEff"] != 0 and control["caps"]["CapBnd"] != 0
    assert set(confined["caps"]) == {"CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"}
    assert confined["caps"] == dict.fromkeys(confined["caps"], 0)


def test_SECURITY_privileges_no_new_privs(priv_results):
    _, confined = priv_results
    assert confined["nnp"] is True


def test_SECURITY_privileges_securebits_locked(priv_results):
    control, confined = priv_results
    assert control["securebits_clear"] == "ok" and control["keep_caps"] == "ok"
    assert confined["securebits_clear"] == "EPERM" and confined["keep_caps"] == "EPERM"
    # (Without capabilities, changing the bits takes CAP_SETPCAP, so the two EPERMs above come
    # with or without the locks: the locks are read back, for a process that regains it.)
    locks = (privileges.SECBIT_NOROOT_LOCKED | privileges.SECBIT_NO_SETUID_FIXUP_LOCKED
             | privileges.SECBIT_KEEP_CAPS_LOCKED | privileges.SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED)
    assert control["securebits"] & locks == 0, control
    assert confined["securebits"] & locks == locks, confined


def test_SECURITY_privileges_mount_denied(priv_results):
    control, confined = priv_results
    assert control["mount"] == "ok"
    assert confined["mount"] == "EPERM"


def test_SECURITY_privileges_setuid_binary_gains_nothing(zg_dir):
    # The binary lives on a tmpfs the child mounts in its own mount namespace: setuid bits work
    # there whatever the host's /tmp flags are (mnt_may_suid: a mount made inside our user
    # namespace), and the copy is owned by the namespace's root, as a binary in a chroot_dir could be.
    d = os.path.join(zg_dir, "suid")
    os.mkdir(d, 0o755)
    binary = os.path.join(d, "id")

    def install():
        _sys.mount("zg-suid", d, "tmpfs", _sys.MS_NODEV, "mode=755,size=8m")
        shutil.copy("/usr/bin/id", binary)
        os.chmod(binary, 0o4755)  # owner: uid 0 inside (host uid ID_BASE)

    def euid():
        return subprocess.run([binary, "-u"], capture_output=True, check=True).stdout.decode().strip()

    def plain_drop():  # what a naive sandbox does: change uid, nothing else
        install()
        _sys.syscall("setresgid", NOBODY, NOBODY, NOBODY)
        _sys.syscall("setresuid", NOBODY, NOBODY, NOBODY)

    def layer():
        install()
        privileges.apply(NOBODY, NOBODY)

    assert in_userns(euid, plain_drop) == "0"  # control: the setuid bit makes it root again
    assert in_userns(euid, layer) == str(NOBODY)


def test_privileges_after_landlock_without_proc(zg_dir):
    """Pipeline order: Landlock (no /proc in its rules) then the drop, whose check uses no /proc."""
    p = _fs_tree(zg_dir)

    def setup():
        landlock.apply(system_ro(), [], deny_tcp=False, mode="auto")
        privileges.apply(NOBODY, NOBODY)

    out = in_userns(lambda: {"proc": attempt(read, "/proc/self/status"),
                             "secret": attempt(read, os.path.join(p["secret"], "secret.txt")),
                             "uid": os.getuid()}, setup)
    assert out["uid"] == NOBODY
    if ABI:
        assert out["proc"] == "EACCES" and out["secret"] == "EACCES"


def test_a_key_quota_full_at_the_zygotes_keyring_change_says_so():
    """The zygote leaves its session keyring for a new one, which counts against its user's key
    quota (200 keys for a user other than root): a rootless daemon whose user is at its quota
    cannot start a zygote, and the error names the quota to raise (a helper's review). Run as
    uid 65534 in a forked child, after filling the quota (the keys go with its session)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        out = "no error"
        try:
            os.close(r)
            libc = ctypes.CDLL(None, use_errno=True)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            assert libc.syscall(250, 1, None) > 0  # a session keyring of its own, holding the keys
            for i in range(100000):
                if libc.syscall(248, b"user", f"zg-fill-{i}".encode(), b"x", 1, -3) < 0:
                    break
            privileges.leave_session_keyring()
        except OSError as e:
            out = f"{e.errno} {e}"
        except BaseException:
            out = traceback.format_exc()
        finally:
            os.write(w, out.encode())
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        got = f.read().decode()
    os.waitpid(pid, 0)
    assert got.startswith(f"{errno.EDQUOT} ") and "kernel.keys.maxkeys" in got, got
