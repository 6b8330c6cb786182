"""Shared fixtures: real daemons, real namespaces, no mocks of the kernel."""

from __future__ import annotations

import json
import contextlib
import fcntl
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from zygote_client import Client

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def client():
    """One embedded daemon for the session (test hooks on), preloading json."""
    with Client.embedded(preload_imports=["json", "colorsys"], test_hooks=True) as c:
        yield c


def daemon_pid(c: Client) -> int:
    proc = c._aclient._proc  # an embedded daemon's process (tests only)
    return proc.pid if proc is not None else c.status().daemon_pid


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of every process whose parent is ``pid``."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            out.append((int(d), fields[0]))
    return out


def sandbox_children(pid: int) -> list[int]:
    """The children of daemon ``pid`` that are sandbox children: each is PID 1 of a pid namespace
    of its own (not a zygote, nor a helper process such as nft's or the peer checker)."""
    out = []
    for child, _ in children_of(pid):
        try:
            with open(f"/proc/{child}/status") as f:
                if len(next(ln for ln in f if ln.startswith("NSpid:")).split()) > 2:
                    out.append(child)
        except OSError:  # gone since it was listed
            pass
    return out


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    """The resident memory of ``pid`` (VmRSS), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(ln for ln in f if ln.startswith("VmRSS:")).split()[1]) << 10


def wait_for(cond, timeout: float = 15.0, what: str = "condition") -> None:
    """Poll ``cond()`` until it is true; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def write_text(path, text: str) -> str:
    """Write ``text`` (dedented) to ``path``; returns the path as a string."""
    with open(path, "w") as f:
        f.write(textwrap.dedent(text))
    return str(path)


def start_daemon(*args: str, wrapper: tuple[str, ...] = ()) -> subprocess.Popen:
    """``zygote serve ARGS`` in its own process (run by ``wrapper``, a command that ends by
    executing its arguments, if given). Its log (stderr) goes to a temporary file, not a
    pipe: a pipe nobody drains would stall a daemon that logs every spawn."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([*wrapper, sys.executable, "-m", "zygote", "serve", *args], stderr=log)
    proc.log = log
    return proc


def _log(proc: subprocess.Popen) -> bytes:
    log = getattr(proc, "log", None)
    if log is None:
        return b""
    log.seek(0)
    return log.read()


def wait_socket(path: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Until ``path`` accepts a connection; a daemon that exits first fails with its log's tail."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(path)
                return
            except OSError:
                pass
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited {proc.returncode}: {_log(proc).decode(errors='replace')[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("daemon did not start")
        time.sleep(0.05)


def stop_daemon(proc: subprocess.Popen) -> bytes:
    """SIGTERM; the daemon must exit 0 within 30 s. Returns its log."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    err = _log(proc)
    assert proc.returncode == 0, err
    return err


@contextlib.contextmanager
def config_daemon(directory, toml: str = "", *args: str):
    """A daemon run from a TOML file: ``[daemon] socket`` in ``directory`` plus ``toml`` (more
    ``[daemon]`` keys first, then pools), and ``args`` (more `zygote serve` arguments); yields
    the socket path once it listens, stops the daemon afterwards."""
    sock = os.path.join(directory, "z.sock")
    cfg = write_text(os.path.join(directory, "z.toml"), f'[daemon]\nsocket = "{sock}"\n' + textwrap.dedent(toml))
    proc = start_daemon("--config", cfg, *args)
    try:
        wait_socket(sock, proc)
        yield sock
    finally:
        stop_daemon(proc)


@pytest.fixture
def shared_dir():
    """A directory other uids can reach (pytest's tmp_path is root-only), removed afterwards."""
    d = tempfile.mkdtemp(prefix="zg-shared-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def serve_socket(directory, *args: str):
    """A `zygote serve --socket` daemon preloading json (and ``args``) in its own process;
    yields the socket path, stops it afterwards."""
    path = str(directory / "zygote.sock")
    proc = start_daemon("--socket", path, "--preload", "json", *args)
    wait_socket(path, proc)
    try:
        yield path
    finally:
        stop_daemon(proc)
        assert not os.path.exists(path), "daemon left its socket file"


@pytest.fixture
def socket_daemon(tmp_path):
    """A `zygote serve --socket` daemon in its own process; yields the socket path."""
    with serve_socket(tmp_path) as path:
        yield path


ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER, ACL_NO_ID = 0x1, 0x2, 0x4, 0x10, 0x20, 0xFFFFFFFF


def set_acl(path: str, *entries: tuple[int, int, int]) -> None:
    """Give ``path`` a POSIX access ACL (no setfacl here): (tag, perm, id) entries in tag order,
    as the system.posix_acl_access xattr holds them (version 2, little-endian)."""
    import struct
    os.setxattr(path, "system.posix_acl_access",
                struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries))


def in_fork(fn) -> str:
    """``fn()`` (returning a str) in a forked process; its result, or "exception:<repr>"."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            out = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            out = f"exception:{e!r}"
        try:
            os.write(w, out.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


def run_as(uid: int, gid: int, fn, groups: tuple[int, ...] = ()) -> str:
    """``fn()`` (returning a str) in a forked process with uid/gid and supplementary ``groups``
    (none by default); its result, or "exception:<repr>". For socket-level tests as another
    user: the venv's interpreter lives under /root, so a subprocess as another uid cannot even
    start."""
    def become() -> str:
        os.setgroups(list(groups))
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        return fn()
    return in_fork(become)


class RawConn:
    """A bare protocol connection (no client library): send messages, read replies one by one;
    fds that come with a reply are closed unread."""

    def __init__(self, path: str) -> None:
        from zygote_client import _protocol as P
        self.P = P
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.dec = P.client_decoder()

    def send(self, msg) -> None:
        try:
            self.sock.sendall(self.P.encode(msg))
        except (BrokenPipeError, ConnectionResetError):
            pass  # a refused peer gets its error at once and the connection closes: read it

    def reply(self, keep: list[int] | None = None):
        """The next message, or None at EOF. Its fds go into ``keep`` if given, else are closed
        (a leased child whose control pipe is closed ends, as its lease is given up)."""
        while (item := self.dec.next()) is None:
            data, anc, _, _ = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(4 * 8))
            if not data:
                return None
            fds = [fd for level, kind, blob in anc if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                   for fd in memoryview(blob).cast("i")]
            self.dec.feed(data, fds)
        if keep is not None:
            keep.extend(item[1])
        else:
            for fd in item[1]:
                os.close(fd)
        return item[0]


def cmdline(pid: int) -> bytes:
    """/proc/PID/cmdline, or b"" for a process that is gone (or a zombie) by the time we look."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def drive_userns_child(pid: int, ready_r: int, go_w: int, res_r: int, timeout: float, id_base: int) -> dict:
    """The parent's half of a layer test in a forked child that unshares a user namespace: wait
    for "u" (unshared), write its maps as the daemon does (sandbox 0.. -> ``id_base``..), send "g",
    read its JSON report within ``timeout``, reap it. Closes the three fds."""
    from zygote.layers import userns
    try:
        if os.read(ready_r, 1) != b"u":
            pytest.fail("child died before unsharing")
        userns.outside(pid, *userns.map_lines(id_base, 0, 0))
        os.write(go_w, b"g")
        chunks = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([res_r], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                pytest.fail("child timed out")
            b = os.read(res_r, 1 << 16)
            if not b:
                break
            chunks.append(b)
    finally:
        for fd in (ready_r, go_w, res_r):
            os.close(fd)
        os.waitpid(pid, 0)
    return json.loads(b"".join(chunks) or b'{"ok": false, "error": "the child reported nothing"}')


NS_GET_USERNS = 0xB701  # ioctl_ns(2): the user namespace that owns a namespace
NS_GET_PARENT = 0xB702  # ioctl_ns(2): a user namespace's parent


def owned_by_a_maker(pid: int) -> bool:
    """Whether the network namespace of ``pid`` belongs to a user namespace of a namespace maker
    (zygote/_nsmaker.py): a child of ours (the host's), neither ours nor ``pid``'s own."""
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        owner = fcntl.ioctl(fd, NS_GET_USERNS)
        try:
            try:
                parent = fcntl.ioctl(owner, NS_GET_PARENT)
            except PermissionError:  # (the initial user namespace has no parent: the host's)
                return False
            try:
                return (os.fstat(parent).st_ino == os.stat("/proc/self/ns/user").st_ino
                        and os.fstat(owner).st_ino != os.stat(f"/proc/{pid}/ns/user").st_ino)
            finally:
                os.close(parent)
        finally:
            os.close(owner)
    finally:
        os.close(fd)


def listen_for_host_device_events(client, sandbox_config=None) -> tuple[bytes, object, bool]:
    """A child that listens for the kernel's device events (NETLINK_KOBJECT_UEVENT, what udev
    reads) while this process makes three synthetic ones with a marker of its own: (its first
    line, b"listening" or b"refused"; the marked events it heard, or why it could not listen;
    whether its network namespace was one made ahead by a namespace maker, owned_by_a_maker, or
    None when it could not listen). No udev runs here; where one does, it re-applies /dev/null's rules."""
    import uuid

    marker = f"zg{uuid.uuid4().hex[:12]}"

    def listen(marker):
        import socket
        try:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 15)  # NETLINK_KOBJECT_UEVENT
            s.bind((0, 1))
        except OSError as e:
            print("refused", flush=True)
            return f"refused: {e.strerror}"
        print("listening", flush=True)
        s.settimeout(3)
        got = []
        try:
            while True:
                event = s.recv(65536).replace(b"\0", b" ").decode(errors="replace")
                if marker in event:
                    got.append(event)
        except socket.timeout:
            return got

    child = client.spawn_child(listen, (marker,), stdin=None, sandbox_config=sandbox_config)
    first = child.stdout.readline()
    made_ahead = None
    if first == b"listening\n":
        made_ahead = owned_by_a_maker(child.pid)  # (it listens for 3 s)
        for _ in range(3):
            with open("/sys/devices/virtual/mem/null/uevent", "w") as f:
                f.write(f"change {uuid.uuid4()} ZGTEST={marker}")
            time.sleep(0.2)
    got = child.result()
    assert child.wait().returncode == 0, child.stderr.read()
    return first, got, made_ahead
