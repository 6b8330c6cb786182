"""Files in and out of a child: staged workspaces, bounded exports, and the checks they share.

In: ``Workspace.from_dir`` walks a directory *in the client*, with the caller's own permissions,
never following a symlink (``openat``-style, ``O_NOFOLLOW``, ``fstat`` of what was opened), and
refuses special files, symlinks that leave the source, secret-looking names and anything over its
limits, before any request is sent. The entries travel in the Spawn frame; the daemon runs the same
checks again (it never trusts a client's) and the child unpacks them into a fresh tmpfs.

Out: the child's PID 1 packs its ``/out`` tmpfs after the payload ended; the daemon validates that
stream (names, kinds, limits) into a sealed memfd of ``Entry`` records, which reaches the client
with the Exited message. ``unpack_archive`` writes it into a temporary sibling of the destination
and renames it into place, so a destination is either complete or untouched.

Archive format (the memfd): records of a 4-byte big-endian length and a msgpack ``Entry``; a
"file" record with the same path as the record before it appends to that file.
"""

from __future__ import annotations

import errno as _errno
import fnmatch
import os
import re
import shutil
import stat
import struct
import tempfile
from typing import TYPE_CHECKING, Annotated, Iterator, Literal

import msgspec

from ._errors import ZygoteError, one_of, quoted

PATH_MAX = 4096  # a sandbox or host path is shorter (checked before anything splits it)
DEFAULT_WORKSPACE = "/workspace"
DEFAULT_OUT = "/out"
CHUNK = 256 << 10  # file data per record / status frame
_LEN = struct.Struct("!I")
_MAX_RECORD = CHUNK + 8192  # data plus the path and a little msgpack framing

MAX_ENTRY_DEPTH = 64  # path components of one workspace entry
MAX_NAME_BYTES = 16 << 20  # the paths of all a workspace's entries together (and of an export's)

# Names a workspace refuses unless allowed by name: matched against every path component (and, for
# the "a/b" patterns, against every pair of components). Keys, credentials, tokens.
SECRET_NAMES = (
    ".env", ".env.*", "*.env", "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", "*.pem", "*.key",
    "*.p12", "*.pfx", "*.keystore", "*.jks", ".netrc", "_netrc", ".pgpass", ".git-credentials",
    ".npmrc", ".pypirc", ".htpasswd", ".aws", ".ssh", ".gnupg", ".kube", ".docker", ".azure",
    ".git/config", "credentials", "credentials.json", "*.tfvars",
)


class WorkspaceError(ZygoteError):
    """A workspace or an export was refused; ``path`` names the offending entry (relative)."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(f"{path}: {message}" if path is not None else message)
        self.path = path
        self.reason = message


class ExportError(WorkspaceError):
    """An export was refused or could not be written; the destination was left untouched."""


ENTRY_KINDS = ("dir", "file", "symlink")
ON_EXCEED = ("refuse", "truncate")
if TYPE_CHECKING:
    EntryKind = Literal["dir", "file", "symlink"]
    OnExceed = Literal["refuse", "truncate"]
else:
    EntryKind = OnExceed = str  # (on the wire; checked in __post_init__: see _errors.one_of)


class Entry(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """One archive member: a relative path, its kind, permission bits and data (file) or link text
    (symlink)."""

    path: str
    kind: EntryKind
    mode: int = 0o644
    data: bytes = b""

    def __post_init__(self) -> None:
        one_of(self.kind, ENTRY_KINDS, "kind", 60)


ENTRIES_MAX = 100_000  # entries a Spawn frame may carry (the protocol's bound; the daemon's ceiling)


class Workspace(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """Files staged into a fresh, writable directory inside the sandbox. Build one with
    ``from_dir`` or ``from_files`` (they check everything before any child exists).

    Attributes:
        entries: the validated files, directories and inside-pointing symlinks.
        path: where the copy appears inside the sandbox (a tmpfs of its own); also the working
            directory unless ``workdir`` is set. Default "/workspace".
        max_files: entries allowed. Default 10000 (the daemon's ceiling is 100000).
        max_file_bytes: bytes per file. Default 64 MiB.
        max_bytes: bytes in all. Default 128 MiB (a Spawn frame holds at most 256 MiB).
        allow: secret-looking names or relative paths to accept anyway (e.g. ".env").
    """

    # (decoders refuse more entries before building them: the daemon's ceiling, see check_entries)
    entries: Annotated[tuple[Entry, ...], msgspec.Meta(max_length=ENTRIES_MAX)] = ()
    path: str = DEFAULT_WORKSPACE
    max_files: int = 10_000
    max_file_bytes: int = 64 << 20
    max_bytes: int = 128 << 20
    allow: Annotated[tuple[str, ...], msgspec.Meta(max_length=4096)] = ()

    def __post_init__(self) -> None:
        for name in ("max_files", "max_file_bytes", "max_bytes"):
            v = getattr(self, name)  # (another type is the client's type check's: a TypeError)
            if isinstance(v, int) and not isinstance(v, bool) and v <= 0:
                raise ValueError(f"workspace {name}: must be a positive integer, got {quoted(v)}")

    @classmethod
    def from_dir(cls, source: str | os.PathLike, **kw) -> "Workspace":
        """Copy ``source`` (read now, with this process's permissions) into a Workspace.

        Symlinks are kept as symlinks when they point inside ``source`` (relative, no ``..`` after
        a name); others are refused, as are fifos, sockets, devices, secret-looking names and
        anything over the limits.

        Raises:
            WorkspaceError: naming the offending path (relative to ``source``).
        """
        ws = cls(**kw)
        entries = list(_walk(os.fspath(source), ws))
        return msgspec.structs.replace(ws, entries=tuple(check_entries(entries, ws)))

    @classmethod
    def from_files(cls, files: dict[str, bytes | str], **kw) -> "Workspace":
        """A Workspace of the given relative paths and contents (parents are made as needed).

        Raises:
            WorkspaceError: naming the offending path.
        """
        ws = cls(**kw)
        entries = []
        for name, data in files.items():
            if isinstance(data, str):
                data = data.encode()
            if not isinstance(data, (bytes, bytearray)):
                raise WorkspaceError(f"expected bytes or str, got {type(data).__name__}", path=name)
            entries.append(Entry(name, "file", 0o644, bytes(data)))
        return msgspec.structs.replace(ws, entries=tuple(check_entries(entries, ws)))


class Export(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """An output directory the child fills and the caller gets back after it ended.

    The directory is a tmpfs of its own, capped at ``max_bytes`` (plus 1 MiB, so that exceeding is
    seen) and ``max_files`` inodes: a child writing without end gets ENOSPC, never the host's disk.

    Attributes:
        path: the directory inside the sandbox. Default "/out".
        max_files: entries exported. Default 1000 (ceiling: the pool's Export, else 100000).
        max_file_bytes: bytes per file. Default: max_bytes.
        max_bytes: bytes in all. Default 64 MiB (ceiling: the pool's Export, else 1 GiB).
        on_exceed: "refuse" (no export at all; the error names the first offending path) or
            "truncate" (drop what is over a limit, cut the file that crosses it, skip symlinks and
            special files; ``ExportResult.skipped`` lists them). Default "refuse".
    """

    path: str = DEFAULT_OUT
    max_files: int = 1000
    max_file_bytes: int | None = None
    max_bytes: int = 64 << 20
    on_exceed: OnExceed = "refuse"

    def __post_init__(self) -> None:
        check_sandbox_path(self.path, "export path")
        one_of(self.on_exceed, ON_EXCEED, "export on_exceed", 60)  # (anything else would read as "truncate")
        for name in ("max_files", "max_bytes", "max_file_bytes"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ValueError(f"export {name}: must be a positive integer, got {quoted(v)}")

    @property
    def file_bytes(self) -> int:
        return min(self.max_file_bytes or self.max_bytes, self.max_bytes)


class ExportResult(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """What the daemon made of a child's output directory.

    Attributes:
        files, bytes: regular files and data bytes in the archive.
        truncated: something was dropped or cut (``on_exceed="truncate"``).
        skipped: "path: reason" for each entry dropped or cut.
        error: why the export was refused (then there is no archive); None when it succeeded.
        error_path: the offending path, when one is to blame.
    """

    files: int = 0
    bytes: int = 0
    truncated: bool = False
    skipped: tuple[str, ...] = ()
    error: str | None = None
    error_path: str | None = None


# ---- checks shared by the client and the daemon -------------------------------------------------


def check_sandbox_path(path: str, field: str) -> None:
    if not isinstance(path, str) or not path.startswith("/") or path == "/" or "\0" in path:
        raise ValueError(f"{field}: expected an absolute path other than '/', got {quoted(path)}")
    if len(path) >= PATH_MAX:  # (first: splitting 200 MiB of '/ab' took 39 s as a Spawn was decoded)
        raise ValueError(f"{field}: a path of {len(path)} characters (the limit is {PATH_MAX - 1})")
    if any(part in ("", ".", "..") for part in path.split("/")[1:]):
        raise ValueError(f"{field}: expected a normalized path, got {quoted(path)}")


def check_name(path: str) -> list[str]:
    """The components of a safe relative archive path, or WorkspaceError: no absolute paths, no
    ``.``/``..``/empty components, no NUL, valid UTF-8, kernel length limits."""
    if not isinstance(path, str) or not path:
        raise WorkspaceError("empty path", path=quoted(path))
    if path.startswith("/"):
        raise WorkspaceError("absolute paths are not allowed", path=path)
    if "\0" in path or len(path.encode("utf-8", "surrogatepass")) >= PATH_MAX:
        raise WorkspaceError("NUL byte or path too long", path=quoted(path))
    parts = path.split("/")
    for p in parts:
        if p in ("", ".", ".."):
            raise WorkspaceError("'.', '..' and empty components are not allowed", path=path)
        if len(p.encode("utf-8", "surrogatepass")) > 255:
            raise WorkspaceError("a component is longer than 255 bytes", path=path)
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise WorkspaceError("the name is not valid UTF-8", path=quoted(path)) from None
    return parts


# SECRET_NAMES as two patterns: one matched against each component, one against each pair of
# neighbouring components ("a/b"); one regex match per name instead of one fnmatch per pattern.
_SECRET_ONE = re.compile("|".join(fnmatch.translate(p) for p in SECRET_NAMES if "/" not in p))
_SECRET_PAIR = re.compile("|".join(fnmatch.translate(p) for p in SECRET_NAMES if "/" in p))


def is_secret_name(parts: list[str]) -> bool:
    if any(_SECRET_ONE.match(p.lower()) for p in parts):
        return True
    return any(_SECRET_PAIR.match(f"{a}/{b}".lower()) for a, b in zip(parts, parts[1:]))


def _link_ok(parts: list[str], target: str) -> bool:
    """A link target stays inside the tree: relative, ``..`` only as a prefix and no deeper than
    the link's own directory. With every link in the tree so checked, resolution never leaves it
    (each ``..`` climbs a real directory, every later component descends)."""
    if not target or target.startswith("/") or "\0" in target:
        return False
    comps = [c for c in target.split("/") if c not in ("", ".")]
    ups = 0
    while ups < len(comps) and comps[ups] == "..":
        ups += 1
    return ".." not in comps[ups:] and ups <= len(parts) - 1


def check_entries(entries: list[Entry] | tuple[Entry, ...], ws: Workspace, *,
                  ceiling: tuple[int, int, int] | None = None) -> list[Entry]:
    """Validate a workspace's entries (client before sending, daemon again on receipt).

    ``ceiling``: (files, file bytes, total bytes) the daemon allows at most, whatever ``ws`` says.

    Returns the entries with parent directories listed before their contents.

    Raises:
        WorkspaceError: naming the first offending path.
    """
    try:
        check_sandbox_path(ws.path, "workspace path")
    except ValueError as e:
        raise WorkspaceError(str(e), path=ws.path) from None
    max_files, max_file, max_total = ws.max_files, ws.max_file_bytes, ws.max_bytes
    if ceiling is not None:
        max_files, max_file, max_total = (min(a, b) for a, b in zip((max_files, max_file, max_total), ceiling))
    if len(entries) > max_files:
        raise WorkspaceError(f"more than max_files={max_files} entries", path=entries[max_files].path)
    allow = set(ws.allow)
    kinds: dict[str, str] = {}  # the entries' own kinds
    under: set[str] = set()  # every directory some entry lies in, listed or not
    total = names = dir_names = 0
    for e in entries:
        parts = check_name(e.path)
        # Work per entry stays linear in its name (a daemon checks what any client sends):
        # components and name bytes are capped, each ancestor is registered once.
        if len(parts) > MAX_ENTRY_DEPTH:
            raise WorkspaceError(f"more than {MAX_ENTRY_DEPTH} path components", path=e.path[:200])
        names += len(e.path.encode("utf-8", "surrogatepass"))
        if names > MAX_NAME_BYTES:
            raise WorkspaceError(f"the entries' paths add up to more than {MAX_NAME_BYTES} bytes", path=e.path[:200])
        if e.path in kinds:
            raise WorkspaceError("listed twice", path=e.path)
        if e.kind not in ENTRY_KINDS:
            raise WorkspaceError(f"unsupported kind {quoted(e.kind)}", path=e.path)
        if is_secret_name(parts) and e.path not in allow and parts[-1] not in allow:
            raise WorkspaceError("looks like a secret (keys, credentials, tokens); pass "
                                 f"allow=({quoted(e.path)},) to stage it anyway", path=e.path)
        if e.kind != "dir" and e.path in under:  # an earlier entry lies inside this one
            raise WorkspaceError(f"it is a {e.kind}, and other entries lie inside it", path=e.path)
        parent = e.path.rpartition("/")[0]
        while parent:  # up to the first ancestor already known (its own were checked then)
            if parent in kinds and kinds[parent] != "dir":
                raise WorkspaceError(f"its parent {quoted(parent)} is a {kinds[parent]}", path=e.path)
            if parent in under:
                break
            under.add(parent)
            # (in a tree as from_dir walks it every such directory is an entry itself, so this
            # costs nothing; names of directories nobody listed must not grow without bound)
            dir_names += len(parent)
            if dir_names > MAX_NAME_BYTES:
                raise WorkspaceError(f"the names of the entries' directories add up to more than "
                                     f"{MAX_NAME_BYTES} bytes", path=e.path[:200])
            parent = parent.rpartition("/")[0]
        if e.kind == "symlink":
            if len(e.data) >= PATH_MAX:  # (before anything splits it: a daemon checks what any client sends)
                raise WorkspaceError(f"symlink target of {len(e.data)} bytes (the kernel's limit is "
                                     f"{PATH_MAX - 1})", path=e.path)
            total += len(e.data)
            if total > max_total:
                raise WorkspaceError(f"the workspace exceeds max_bytes={max_total} here", path=e.path)
            target = e.data.decode("utf-8", "replace")
            if not _link_ok(parts, target):
                raise WorkspaceError(f"symlink to {quoted(target)} points outside the workspace", path=e.path)
        elif e.kind == "file":
            if len(e.data) > max_file:
                raise WorkspaceError(f"{len(e.data)} bytes exceed max_file_bytes={max_file}", path=e.path)
            total += len(e.data)
            if total > max_total:
                raise WorkspaceError(f"the workspace exceeds max_bytes={max_total} here", path=e.path)
        elif e.data:
            raise WorkspaceError("a directory carries no data", path=e.path)
        kinds[e.path] = e.kind
    return sorted(entries, key=lambda e: e.path.split("/"))


def _walk(root: str, ws: Workspace) -> Iterator[Entry]:
    """Entries of ``root``, read through directory fds with O_NOFOLLOW: what is read is what was
    checked, and a symlink or a swapped directory is never followed."""
    try:
        top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise WorkspaceError(f"cannot open the source: {e.strerror}", path=root) from None
    count = 0
    total = 0
    # Depth first, one open directory per level (each listed when opened): the fds held are the
    # depth, not the directories still to visit (1500 siblings took 1500 fds: EMFILE).
    stack: list[tuple[int, str, Iterator[str]]] = []
    try:
        try:
            stack.append((top, "", iter(sorted(os.listdir(top)))))
        except BaseException:
            os.close(top)
            raise
        while stack:
            dfd, rel, names = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                os.close(dfd)
                continue
            path = f"{rel}{name}"
            count += 1
            if count > ws.max_files:
                raise WorkspaceError(f"more than max_files={ws.max_files} entries", path=path)
            st = os.lstat(name, dir_fd=dfd)
            mode = stat.S_IMODE(st.st_mode) & 0o777
            if stat.S_ISLNK(st.st_mode):
                yield Entry(path, "symlink", 0o777, os.fsencode(os.readlink(name, dir_fd=dfd)))
            elif stat.S_ISDIR(st.st_mode):
                if len(stack) >= MAX_ENTRY_DEPTH:
                    raise WorkspaceError(f"more than {MAX_ENTRY_DEPTH} path components", path=path[:200])
                fd = _open_nofollow(name, dfd, os.O_DIRECTORY, path)
                try:
                    listing = iter(sorted(os.listdir(fd)))
                except BaseException:
                    os.close(fd)
                    raise
                stack.append((fd, path + "/", listing))
                yield Entry(path, "dir", mode)
            elif stat.S_ISREG(st.st_mode):
                if st.st_size > ws.max_file_bytes:
                    raise WorkspaceError(f"{st.st_size} bytes exceed max_file_bytes={ws.max_file_bytes}",
                                         path=path)
                data = _read_file(name, dfd, path, ws.max_file_bytes)
                total += len(data)
                if total > ws.max_bytes:
                    raise WorkspaceError(f"the workspace exceeds max_bytes={ws.max_bytes} here", path=path)
                yield Entry(path, "file", mode, data)
            else:
                raise WorkspaceError(f"{_kind(st.st_mode)} files cannot be staged", path=path)
    finally:
        for fd, _, _ in stack:
            os.close(fd)


def _open_nofollow(name: str, dfd: int, flags: int, path: str) -> int:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | flags, dir_fd=dfd)
    except OSError as e:
        raise WorkspaceError(f"cannot open: {e.strerror}", path=path) from None
    return fd


def _read_file(name: str, dfd: int, path: str, limit: int) -> bytes:
    # O_NONBLOCK: a fifo swapped in after lstat must not hang us; fstat then refuses it.
    fd = _open_nofollow(name, dfd, 0, path)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise WorkspaceError(f"{_kind(st.st_mode)} files cannot be staged", path=path)
        chunks = []
        n = 0
        while chunk := os.read(fd, 1 << 20):
            n += len(chunk)
            if n > limit:
                raise WorkspaceError(f"more than max_file_bytes={limit} bytes", path=path)
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISLNK, "symlink"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "special"


# ---- the export archive ---------------------------------------------------------------------------

_entry_enc = msgspec.msgpack.Encoder()
_entry_dec = msgspec.msgpack.Decoder(Entry)


def record(entry: Entry) -> bytes:
    body = _entry_enc.encode(entry)
    return _LEN.pack(len(body)) + body


def read_archive(fd: int) -> Iterator[Entry]:
    """Decode the records of an archive fd (read with pread: the fd's offset is not used).

    Raises:
        ExportError: the archive is malformed.
    """
    off = 0
    while True:
        hdr = os.pread(fd, _LEN.size, off)
        if not hdr:
            return
        if len(hdr) < _LEN.size:
            raise ExportError("truncated export archive")
        (n,) = _LEN.unpack(hdr)
        if n > _MAX_RECORD:
            raise ExportError(f"export archive record of {n} bytes is too large")
        body = os.pread(fd, n, off + _LEN.size)
        if len(body) != n:
            raise ExportError("truncated export archive")
        off += _LEN.size + n
        try:
            yield _entry_dec.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise ExportError(f"malformed export archive: {e}") from None


def unpack_archive(fd: int, dest: str | os.PathLike, *, max_files: int | None = None,
                   max_bytes: int | None = None) -> list[str]:
    """Write an export archive into ``dest`` (must not exist, or be an empty directory, whose
    permission bits the result keeps; not its ACLs or owner: it is replaced).

    Everything goes into a temporary sibling first, created entry by entry relative to directory
    fds with O_NOFOLLOW and O_EXCL (a name with ``..``, an absolute name or a symlink is refused,
    whatever the daemon said), then renamed to ``dest``: on any error nothing is left behind.

    Returns the relative paths of the regular files written.

    Raises:
        ExportError: naming the offending path; ``dest`` is untouched.
    """
    dest = os.path.abspath(os.fspath(dest))
    parent, base = os.path.split(dest)
    if not base:
        raise ExportError("the destination has no name", path=dest)
    if os.path.lexists(dest) and (not os.path.isdir(dest) or os.path.islink(dest) or os.listdir(dest)):
        raise ExportError("the destination exists and is not an empty directory", path=dest)
    try:
        # An empty directory given keeps its permissions (a private one stays private); a new
        # one gets what mkdir would give it.
        given = os.stat(dest) if os.path.lexists(dest) else None
        mode = given.st_mode & 0o3777 if given is not None else 0o777 & ~_umask()
        # (a short name of our own: dest's name may be near NAME_MAX already)
        tmp = tempfile.mkdtemp(prefix=".zg-export.", dir=parent)
    except OSError as e:
        raise ExportError(f"cannot make the export's directory: {e.strerror}", path=dest) from None
    files: list[str] = []
    try:
        top = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _unpack_into(fd, top, files, max_files, max_bytes)
            if given is not None and os.fstat(top).st_gid != given.st_gid:
                try:  # its group too: a group-readable private directory stays that group's
                    os.fchown(top, -1, given.st_gid)
                except OSError:
                    mode &= 0o700  # (not ours to give that group): the owner's bits only
            os.fchmod(top, mode)
        finally:
            os.close(top)
        try:
            os.rename(tmp, dest)
        except OSError as e:
            raise ExportError(f"cannot move the export into place: {e.strerror}", path=dest) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files


def _umask() -> int:
    """This process's umask, read without setting it: os.umask(0) and back would leave every
    other thread's files created in between without it (world-writable ones, say)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o077  # (no /proc: private rather than guessed)


def _unpack_into(fd: int, top: int, files: list[str], max_files: int | None, max_bytes: int | None) -> None:
    dirs: set[str] = {""}
    current: tuple[str, int] | None = None  # the file being appended to
    seen: set[str] = set()
    total = 0
    try:
        for e in read_archive(fd):
            try:
                parts = check_name(e.path)
            except WorkspaceError as err:
                raise ExportError(err.reason, path=err.path) from None
            if current is not None and current[0] == e.path and e.kind == "file":
                _write_all(current[1], e.data)
                total += len(e.data)
            else:
                if current is not None:
                    os.close(current[1])
                    current = None
                if e.path in seen:
                    raise ExportError("listed twice", path=e.path)
                seen.add(e.path)
                if e.kind == "symlink":
                    raise ExportError("symlinks are not exported", path=e.path)
                parent = "/".join(parts[:-1])
                if parent not in dirs:
                    raise ExportError(f"its directory {quoted(parent)} was not listed before it", path=e.path)
                mode = e.mode & 0o777
                pfd = -1
                try:
                    pfd = _open_dir(top, parts[:-1])
                    if e.kind == "dir":
                        os.mkdir(parts[-1], mode | 0o700, dir_fd=pfd)
                        dirs.add(e.path)
                    else:
                        wfd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                      mode | 0o600, dir_fd=pfd)
                        current = (e.path, wfd)
                        files.append(e.path)
                        _write_all(wfd, e.data)
                        total += len(e.data)
                except OSError as err:
                    raise ExportError(f"cannot create: {err.strerror}", path=e.path) from None
                finally:
                    if pfd not in (-1, top):
                        os.close(pfd)
            if max_files is not None and len(seen) > max_files:
                raise ExportError(f"more than max_files={max_files} entries", path=e.path)
            if max_bytes is not None and total > max_bytes:
                raise ExportError(f"more than max_bytes={max_bytes} bytes", path=e.path)
    finally:
        if current is not None:
            os.close(current[1])


def _open_dir(top: int, parts: list[str]) -> int:
    """An fd of top/parts..., walked one O_NOFOLLOW|O_DIRECTORY step at a time (one fd per level
    at most, so an export may hold more directories than RLIMIT_NOFILE)."""
    fd = top
    for part in parts:
        try:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        finally:
            if fd != top:
                os.close(fd)
        fd = nxt
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except OSError as e:
            if e.errno == _errno.EINTR:
                continue
            raise
