"""Files in and out: the staged workspace and the bounded export directory.

* ``prepare(cfg, ceiling)``  daemon side: re-validate the workspace the client sent (names, kinds,
  limits: the daemon never trusts the client's checks) and plan two tmpfs mounts of the child's
  own, sized so that nothing the child writes can reach the host's disk or memory beyond a cap.
* ``apply(plan)``            child side, PID 1 after the root is built and before the privilege
  drop: unpack the workspace into its tmpfs, owned by the sandbox uid. Nothing is ever followed:
  each entry is created relative to its parent's directory fd with O_NOFOLLOW/O_EXCL.
* ``pack(plan, send)``       child side, PID 1 after the payload and everything it started ended:
  stream the export directory to the daemon (directories, file chunks, and a note for every
  symlink, fifo, socket, device or unreadable entry, which are never exported).
* ``Collector``              daemon side: checks that untrusted stream (PID 1 runs as the sandbox
  uid: a payload could have tampered with it) and writes what passes into a sealed memfd.

The export lives in the child's mount namespace and disappears with it: there is no host
directory to clean up and no host path a child could aim a symlink at.
"""

from __future__ import annotations

import errno as _errno
import fcntl
import os
import stat

from zygote_client._workspace import (CHUNK, ENTRIES_MAX, MAX_NAME_BYTES, Entry, Export, WorkspaceError, check_entries,
                                      check_name, record)

from zygote_client._errors import cut

from .._childproto import Out, OutEnd, OutSkip, TmpfsSpec
from . import SetupError

# The daemon's ceiling on any workspace (a Spawn frame holds at most 256 MiB anyway).
WORKSPACE_CEILING = (ENTRIES_MAX, 256 << 20, 256 << 20)  # files, bytes per file, bytes
_SLACK = 1 << 20  # the export tmpfs holds a little more than max_bytes, so exceeding is seen
_MAX_SKIPPED = 100
_SKIPPED_TEXT = 1024  # characters of a skipped entry's path (half that of its reason)
MAX_DEPTH = 64  # directory nesting packed from an export


# ---- daemon side: plan -------------------------------------------------------------------------

def prepare(cfg) -> dict:
    """ChildPlan fields for cfg.workspace and cfg.export (already within the pool's ceiling).

    Raises:
        WorkspaceError: a workspace entry is refused (the message names its path).
    """
    cfg = cfg.with_defaults()
    out: dict = {"tmpfs": []}
    ws = cfg.workspace
    if ws is not None:
        entries = check_entries(ws.entries, ws, ceiling=WORKSPACE_CEILING)
        data = sum(len(e.data) for e in entries if e.kind == "file")
        out["tmpfs"].append(TmpfsSpec(ws.path, data + cfg.tmpfs_bytes, 0, cfg.uid, cfg.gid))
        out.update(workspace_path=ws.path, workspace_entries=entries)
    ex = cfg.export
    if ex is not None:
        out["tmpfs"].append(TmpfsSpec(ex.path, ex.max_bytes + _SLACK, ex.max_files + 64, cfg.uid, cfg.gid))
        out.update(export_path=ex.path, export_limits=(ex.max_files, ex.file_bytes, ex.max_bytes))
    return out


# ---- child side: stage -------------------------------------------------------------------------

def apply(plan) -> None:
    """Unpack the plan's workspace into its (already mounted, empty) tmpfs.

    Raises:
        SetupError: step "workspace", naming the entry.
    """
    if plan.workspace_path is None:
        return
    uid, gid = plan.uid, plan.gid
    try:
        top = os.open(plan.workspace_path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise SetupError("workspace", f"open {plan.workspace_path}: {e.strerror}", e.errno or 0) from None
    try:
        for e in plan.workspace_entries:
            parts = e.path.split("/")
            pfd = -1
            try:
                pfd = _parent(top, parts, uid, gid)
                name = parts[-1]
                if e.kind == "dir":
                    fd = _mkdir(pfd, name, uid, gid)
                    try:
                        os.fchmod(fd, (e.mode & 0o777) | 0o700)
                    finally:
                        os.close(fd)
                elif e.kind == "symlink":
                    os.symlink(e.data, name, dir_fd=pfd)
                    os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
                else:
                    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 0o600, dir_fd=pfd)
                    try:
                        view = memoryview(e.data)
                        while view:
                            view = view[os.write(fd, view):]
                        os.fchown(fd, uid, gid)
                        os.fchmod(fd, (e.mode & 0o777) | 0o600)
                    finally:
                        os.close(fd)
            except OSError as err:
                raise SetupError("workspace", f"stage {e.path}: {err.strerror}", err.errno or 0) from None
            finally:
                if pfd not in (-1, top):
                    os.close(pfd)
    finally:
        os.close(top)


def _mkdir(pfd: int, name: str, uid: int, gid: int) -> int:
    """Open directory ``name`` under ``pfd`` without following links, making it if missing."""
    try:
        os.mkdir(name, 0o755, dir_fd=pfd)
        made = True
    except FileExistsError:
        made = False
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
    if made:
        os.fchown(fd, uid, gid)
    return fd


def _parent(top: int, parts: list[str], uid: int, gid: int) -> int:
    """An fd of the directory holding ``parts[-1]``, walked from ``top`` one O_NOFOLLOW step at a
    time and made where missing (from_files lists no parents). Only one fd per level is open at
    once, so a workspace may hold more directories than RLIMIT_NOFILE."""
    fd = top
    for part in parts[:-1]:
        try:
            nxt = _mkdir(fd, part, uid, gid)
        finally:
            if fd != top:
                os.close(fd)
        fd = nxt
    return fd


# ---- child side: pack (PID 1) --------------------------------------------------------------------

def pack(plan, send) -> None:
    """Stream plan.export_path to the daemon with ``send(msg)``; always ends with OutEnd.

    Reads at most a little past each limit (the daemon decides; a sparse 10 GB file costs nothing).
    """
    max_files, file_bytes, max_bytes = plan.export_limits
    budget = [max_files + 1, max_bytes + 1]  # entries, bytes left to read
    try:
        top = os.open(plan.export_path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        send(OutEnd(f"open {plan.export_path}: {e.strerror}"))
        return
    try:
        _pack_dir(top, "", send, budget, file_bytes, 0)
    except OSError as e:
        send(OutEnd(f"reading the export: {e.strerror}"))
        return
    finally:
        os.close(top)
    send(OutEnd())


def _pack_dir(dfd: int, rel: str, send, budget: list[int], file_bytes: int, depth: int) -> None:
    if depth >= MAX_DEPTH:  # bounded recursion and open directory fds in PID 1
        send(OutSkip(rel.rstrip("/"), f"nested deeper than {MAX_DEPTH} directories"))
        return
    for name in sorted(os.listdir(dfd)):
        path = rel + name
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            send(OutSkip(path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"),
                         "the name is not valid UTF-8"))
            continue
        if budget[0] <= 0:
            send(OutSkip(path, "more entries than max_files"))
            return
        budget[0] -= 1
        try:
            st = os.lstat(name, dir_fd=dfd)
        except OSError as e:
            send(OutSkip(path, f"cannot stat: {e.strerror}"))
            continue
        mode = stat.S_IMODE(st.st_mode) & 0o777
        if stat.S_ISDIR(st.st_mode):
            try:
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            except OSError as e:
                send(OutSkip(path, f"cannot open: {e.strerror}"))
                continue
            try:
                send(Out(path, "dir", mode))
                _pack_dir(fd, path + "/", send, budget, file_bytes, depth + 1)
            finally:
                os.close(fd)
        elif stat.S_ISREG(st.st_mode):
            _pack_file(dfd, name, path, mode, send, budget, file_bytes)
        else:
            send(OutSkip(path, _kind(st.st_mode)))


def _pack_file(dfd: int, name: str, path: str, mode: int, send, budget: list[int], file_bytes: int) -> None:
    try:
        # O_NONBLOCK: a fifo swapped in after lstat must not block PID 1; fstat then refuses it.
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except OSError as e:
        send(OutSkip(path, f"cannot open: {e.strerror}" if e.errno != _errno.ELOOP else "symlink"))
        return
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            send(OutSkip(path, _kind(st.st_mode)))
            return
        if budget[1] <= 0 and st.st_size > 0:  # listed as left out, not archived empty
            send(OutSkip(path, "over max_bytes (the files before it used it up)"))
            return
        left = min(file_bytes + 1, budget[1])
        first = True
        while first or left > 0:
            data = os.read(fd, min(CHUNK, left)) if left > 0 else b""
            if not data and not first:
                break
            send(Out(path, "file", mode, data))
            first = False
            left -= len(data)
            budget[1] -= len(data)
            if not data:
                break
    except OSError as e:
        send(OutSkip(path, f"cannot read: {e.strerror}"))
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISLNK, "symlink"), (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return what
    return "special file"


# ---- daemon side: collect ------------------------------------------------------------------------

class Collector:
    """Checks PID 1's export stream against the request's Export and archives what passes.

    Everything PID 1 sends is untrusted: names are checked (relative, no ``..``, no NUL, parent
    listed first), only directories and regular files are archived, and the limits are counted
    here. ``on_exceed="refuse"`` drops the whole archive at the first problem;
    ``"truncate"`` skips or cuts and records what it did.
    """

    def __init__(self, export: Export) -> None:
        self.export = export
        self.fd: int | None = os.memfd_create("zygote-export", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self.dirs: set[str] = {""}
        self.seen: set[str] = set()
        self.current: str | None = None  # the file whose chunks are arriving
        self.cut: str | None = None  # a file being dropped past a limit
        self.files = self.bytes = self.file_bytes = 0
        self.names = 0  # bytes of the paths taken: the archive and the sets above hold them
        self.last_piece = 0  # size of the current file's last data piece
        self.skipped: list[str] = []
        self.dropped = 0
        self.error: tuple[str, str | None] | None = None
        self.ended = False

    def feed(self, m) -> None:
        if self.error is not None or self.ended:
            return
        if isinstance(m, OutEnd):
            self.ended = True
            if m.error:
                self._refuse(m.error, None)
            return
        if isinstance(m, OutSkip):
            self._over(m.path, m.reason)
            return
        if m.kind == "file" and isinstance(m.data, (bytes, bytearray)) and len(m.data) > CHUNK:
            return self._refuse(f"a record of {len(m.data)} bytes (the packer sends at most {CHUNK})", m.path)
        if m.kind == "file" and m.path in (self.current, self.cut):
            # Continuation pieces follow full ones only: each piece repeats the path, so a stream of
            # tiny pieces would grow the archive far past max_bytes.
            if self.last_piece < CHUNK:
                return self._refuse("a continuation after a short piece (the stream is malformed)", m.path)
            self.last_piece = len(m.data)
            if m.path == self.current:
                self._data(m.path, m.data)
            return
        self.current = self.cut = None
        try:
            parts = check_name(m.path)
        except WorkspaceError as e:
            self._over(e.path or repr(m.path), e.reason)
            return
        parent = "/".join(parts[:-1])
        if m.path in self.seen:
            return self._over(m.path, "listed twice")
        if parent not in self.dirs:
            return self._over(m.path, "its directory was not exported")
        if m.kind not in ("dir", "file"):
            return self._over(m.path, f"{m.kind} entries are not exported")
        if len(self.seen) >= self.export.max_files:
            return self._over(m.path, f"more than max_files={self.export.max_files}")
        # Paths are not file data, but they fill the archive and this process as much: 100000
        # paths of 4000 bytes each took 400 MB (the data budget was 4 KiB).
        size = len(m.path.encode("utf-8", "surrogatepass"))  # (bytes: a character may take four)
        if self.names + size > MAX_NAME_BYTES:
            return self._over(m.path, f"the exported paths add up to more than {MAX_NAME_BYTES} bytes")
        self.names += size
        self.seen.add(m.path)
        mode = m.mode & 0o777 if isinstance(m.mode, int) else 0o644
        if m.kind == "dir":
            self.dirs.add(m.path)
            self._write(Entry(m.path, "dir", mode))
            return
        self.files += 1
        self.current, self.file_bytes, self.last_piece = m.path, 0, len(m.data)
        self._write(Entry(m.path, "file", mode))
        self._data(m.path, m.data)

    def _data(self, path: str, data: bytes) -> None:
        room = min(self.export.file_bytes - self.file_bytes, self.export.max_bytes - self.bytes)
        if len(data) > room:
            which = ("max_bytes" if self.export.max_bytes - self.bytes <= self.export.file_bytes - self.file_bytes
                     else "max_file_bytes")  # (the total, when both are hit)
            limit = self.export.file_bytes if which == "max_file_bytes" else self.export.max_bytes
            self._over(path, f"exceeds {which}={limit} (cut at {self.file_bytes + room} bytes)")
            data = data[:max(room, 0)]
            self.current, self.cut = None, path
        if data and self.error is None:
            self.file_bytes += len(data)
            self.bytes += len(data)
            self._write(Entry(path, "file", 0, data))

    def _write(self, entry: Entry) -> None:
        if self.fd is None:
            return
        buf = memoryview(record(entry))
        try:
            while buf:
                buf = buf[os.write(self.fd, buf):]
        except OSError as e:  # the daemon's own memory (ENOMEM, ENOSPC): this export fails, not the daemon
            self._refuse(f"the daemon could not hold the archive: {e.strerror}", entry.path)

    def _over(self, path: str, reason: str) -> None:
        if self.export.on_exceed == "refuse":
            self._refuse(reason, path)
            return
        if len(self.skipped) < _MAX_SKIPPED:
            # (from PID 1, so untrusted: the path and the reason are cut, as the list is)
            self.skipped.append(f"{cut(path, _SKIPPED_TEXT)}: {cut(reason, _SKIPPED_TEXT // 2)}")
        else:
            self.dropped += 1

    def _refuse(self, reason: str, path: str | None) -> None:
        self.error = (reason, path)
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def finish(self):
        """(ExportResult fields, sealed memfd or None). The caller owns the fd."""
        if self.error is None and not self.ended:
            self._refuse("the child ended before its output was exported (killed or timed out)", None)
        if self.error is not None:
            reason, path = self.error
            return dict(error=reason, error_path=path), None
        skipped = list(self.skipped)
        if self.dropped:
            skipped.append(f"... and {self.dropped} more")
        fd, self.fd = self.fd, None
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                    | fcntl.F_SEAL_WRITE)
        return dict(files=self.files, bytes=self.bytes, truncated=bool(skipped), skipped=tuple(skipped)), fd
