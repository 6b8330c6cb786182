"""Mount namespace: a private mount tree, then (unless mode "host") a new root for the child.

Daemon side, ``prepare(cfg, zygote_info)`` decides what the child's root holds. Child side,
``apply(plan)`` builds it inside the child's own mount namespace and pivots into it.

Modes:

* "host"   keeps the host's tree (made private so nothing propagates back) and only replaces /proc
  with one for the child's pid namespace.
* "tmpfs"  (the default root) a size-capped tmpfs holding only read-only binds of what the
  interpreter needs (/usr, its prefixes, its sys.path), generated /etc files, the configured binds,
  a minimal /dev, a fresh /proc and a capped /tmp. The root itself is read-only at the end.
* "chroot" a user-supplied directory bound read-only as the root; /dev, /proc and /tmp are mounted
  only where it has those directories (nothing is ever written into the user's tree).

Bind sources are opened with O_PATH *in the child's mount namespace* (an fd from the zygote's
namespace would be refused with EINVAL, mount(2)) and bound through /proc/self/fd/N, so the scratch
directory the root is assembled on may hide a source without harm. ``open_sources`` may run before
the uid switch (userns.apply), while the child still has the daemon's host uid for path walks:
a root daemon's interpreter under /root (mode 0700) is otherwise unreachable for the sandbox's
unprivileged host uid, because capabilities in a user namespace never override permissions on
inodes whose owner is not mapped there (capabilities(7), "Interaction with user namespaces").
"""

from __future__ import annotations

import ast
import ctypes
import errno as _errno
import functools
import os
import re
import stat

from zygote_client._errors import quoted

from .._childproto import MountSpec, TmpfsSpec
from . import SetupError
from . import _sys

# ---- daemon side ---------------------------------------------------------------------------------

# Top-level system directories: on merged-/usr systems (Debian 12) they are symlinks into /usr and
# are recreated as the same symlinks; where they are real directories they are bound read-only.
_SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# Public host files CPython and its stdlib use: the dynamic loader's cache (dlopen of extension
# modules' libraries), CA certificates and OpenSSL's config (ssl), /etc/alternatives (Debian's
# /usr/bin/* links through it). Never /etc/passwd, group, shadow, hosts: those are generated.
_HOST_ETC = ("/etc/ld.so.cache", "/etc/ssl/openssl.cnf", "/etc/ssl/certs", "/etc/alternatives")
# Where the new root is assembled before pivot_root: an existing directory, mounted over only in
# the child's private namespace. Never a directory a bind source must be walked through (the
# sources are opened before, and /dev nodes are bound by path), hence not /dev or /proc.
_SCRATCH = ("/mnt", "/media", "/srv", "/opt", "/boot", "/home", "/var", "/run", "/tmp")
_KERNEL_TREES = ("/proc", "/sys")  # never a bind source: host processes and kernel knobs
_GENERATED_TREES = ("/proc", "/dev")  # never a bind target: the sandbox makes its own
_MAPPING_RE = re.compile(r"^MAPPING\s*(?::[^=]*)?=\s*(\{.*\})\s*$", re.M)


# Filesystems of kernel interfaces: a bind (always recursive) of a tree holding one of these
# would bring the host's instance into the child (its devices, namespaces, message queues...).
_KERNEL_FS = frozenset(("proc", "sysfs", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "bpf", "nsfs",
                        "devpts", "devtmpfs", "mqueue", "configfs", "pstore", "efivarfs", "binfmt_misc",
                        "hugetlbfs", "fusectl"))


def _kernel_mounts() -> list[tuple[str, str]]:
    """(mount point, type) of this process's mounts of kernel interfaces' filesystems. Raises
    ValueError if the mount table cannot be read: a bind is then refused, not let through
    unchecked."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields, _, rest = line.partition(" - ")
                fstype = rest.split(" ", 1)[0]
                if fstype in _KERNEL_FS:
                    out.append((re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields.split()[4]), fstype))
    except (OSError, IndexError) as e:
        raise ValueError(f"cannot read /proc/self/mountinfo to check binds for kernel-interface mounts ({e}); "
                         "the daemon needs /proc mounted") from None
    return out


def _kernel_mount_under(real: str, kernel: list[tuple[str, str]]) -> str | None:
    """The first of ``kernel`` (_kernel_mounts) at or below ``real``, as "path (type)", or None."""
    return next((f"{point} ({fstype})" for point, fstype in kernel if _under(point, real)), None)


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _canon(target: str, symlinks: dict[str, str]) -> str:
    """``target`` with the root's own top-level symlinks resolved (/bin/x -> /usr/bin/x)."""
    for _ in range(8):
        for link, text in symlinks.items():
            if _under(target, link) and link != target:
                base = text if text.startswith("/") else os.path.join(os.path.dirname(link), text)
                target = os.path.normpath(base + target[len(link):])
                break
        else:
            return target
    return target


@functools.lru_cache(maxsize=16)
def _interpreter_layout(executable: str, prefix: str, base_prefix: str, path: tuple[str, ...],
                        extra: tuple[str, ...]) -> tuple[tuple[MountSpec, ...], tuple[tuple[str, str], ...]]:
    """Read-only binds and symlinks that let this interpreter run in a generated root.

    Cached per interpreter: it stats a few dozen paths and reads editable-install finders.
    """
    binds: list[MountSpec] = [MountSpec("/usr", "/usr", True, True)]
    symlinks: dict[str, str] = {}
    for d in _SYSTEM_DIRS:
        if os.path.islink(d):
            symlinks[d] = os.readlink(d)
        elif os.path.isdir(d):
            binds.append(MountSpec(d, d, True, True))

    def add(p: str, required: bool) -> None:
        if not p or not os.path.isabs(p):
            return  # "" or a relative sys.path entry: the zygote's cwd, never bound
        target = _canon(os.path.normpath(p), symlinks)
        if any(_under(target, b.target) for b in binds):
            return  # already visible through a broader bind
        if target.count("/") < 2 or not os.path.exists(p):
            # "/" or a top-level directory (/root, /home, /work: e.g. `python -m` puts the
            # daemon's cwd first on sys.path) is too broad to expose to every child.
            return
        real = os.path.realpath(p)
        # A broader bind replaces the narrower ones it covers with the same content.
        binds[:] = [b for b in binds if not (_under(b.target, target)
                                             and b.source == real + b.target[len(target):])]
        binds.append(MountSpec(real, target, True, required))

    add(base_prefix, True)
    add(prefix, True)
    for entry in path:
        add(entry, False)
    for entry in extra:
        add(entry, False)
    for entry in _editable_roots(path):
        add(entry, False)
    add(os.path.realpath(executable), True)

    for f in _HOST_ETC:
        if os.path.exists(f):
            binds.append(MountSpec(os.path.realpath(f), f, True, False))
    if os.path.lexists("/etc/localtime"):
        real = os.path.realpath("/etc/localtime")
        if os.path.isfile(real):
            if any(_under(real, b.target) and b.source == b.target for b in binds):
                symlinks["/etc/localtime"] = real  # zoneinfo under /usr: a link keeps the zone name
            else:
                binds.append(MountSpec(real, "/etc/localtime", True, False))
    return tuple(binds), tuple(symlinks.items())


def _editable_roots(path: tuple[str, ...]) -> list[str]:
    """Package directories of setuptools editable installs: a meta-path finder maps them, they are
    not on sys.path, so the root would miss them."""
    roots: list[str] = []
    for entry in path:
        if not entry.endswith(("site-packages", "dist-packages")) or not os.path.isdir(entry):
            continue
        for name in sorted(os.listdir(entry)):
            if not (name.startswith("__editable__") and name.endswith("_finder.py")):
                continue
            try:
                with open(os.path.join(entry, name), encoding="utf-8") as f:
                    m = _MAPPING_RE.search(f.read())
                mapping = ast.literal_eval(m.group(1)) if m else {}
            except (OSError, ValueError, SyntaxError):
                continue
            roots.extend(v for v in mapping.values() if isinstance(v, str))
    return roots


def _etc_files(cfg) -> dict[str, bytes]:
    uid, gid, host = cfg.uid, cfg.gid, cfg.hostname
    # The sandbox user first: with the default uid 65534 it shares nobody's id, and getpwuid
    # returns the first match.
    passwd = (f"root:x:0:0:root:/:/bin/sh\n"
              f"sandbox:x:{uid}:{gid}:sandbox:/tmp:/bin/sh\n"
              f"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
    group = f"root:x:0:\nsandbox:x:{gid}:\nnogroup:x:65534:\n"
    return {
        "/etc/passwd": passwd.encode(),
        "/etc/group": group.encode(),
        "/etc/hostname": f"{host}\n".encode(),
        # So localhost and the sandbox's own name resolve without the host's /etc/hosts.
        "/etc/hosts": (f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                       f"127.0.1.1\t{host}\n").encode(),
        # Only "files" (and dns): the host's may name NSS modules (systemd, sss) that would try to
        # reach services the sandbox cannot see.
        "/etc/nsswitch.conf": b"passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n",
    }


def _choose_scratch(avoid: list[str]) -> str:
    for d in _SCRATCH:
        if os.path.isdir(d) and not os.path.islink(d) and not any(_under(a, d) for a in avoid):
            return d
    raise ValueError(f"no directory to assemble the sandbox root on: need one of {', '.join(_SCRATCH)}")


def _user_binds(cfg, layers: list[tuple[str, str | None]], protected: list[str],
                symlinks: dict[str, str], taken: set[str], pins: dict | None = None) -> list[MountSpec]:
    """Validate ro_binds/rw_binds against what the root already holds.

    ``layers``: (sandbox path, host source or None for a tmpfs of ours) already mounted; a target
    inside a host-backed layer must already exist there (no mountpoint is ever created in a host
    directory, and no symlink on the way is followed). ``protected``: paths a bind may not hide.
    """
    wanted = []
    for readonly, field, mapping in ((True, "ro_binds", cfg.ro_binds), (False, "rw_binds", cfg.rw_binds)):
        for src, dst in mapping.items():
            wanted.append((_canon(os.path.normpath(dst), symlinks), src, dst, readonly, field))
    wanted.sort()
    layers = list(layers)
    out = []
    kernel = _kernel_mounts() if wanted else []  # (read once for all the binds)
    for t, src, dst, readonly, field in wanted:
        what = f"{field}: {quoted(src)} -> {quoted(dst)}"
        pin = (pins or {}).get(src)
        if pin is not None:  # the client's: the path the check resolved, not resolved again as root
            real = pin[0]
        elif not os.path.exists(src):
            raise ValueError(f"{what}: the source does not exist on the host")
        else:
            real = os.path.realpath(src)
        for k in _KERNEL_TREES:
            if _under(real, k):
                raise ValueError(f"{what}: {k} is the host's kernel interface and cannot be bound")
            if _under(k, real):  # (binds are recursive: its submounts come along)
                raise ValueError(f"{what}: it holds {k}, the host's kernel interface, which a bind "
                                 "would bring along; bind the directories needed below it instead")
        held = _kernel_mount_under(real, kernel)
        if held is not None:
            raise ValueError(f"{what}: it holds {held}, a kernel interface a bind would bring along; "
                             "bind the directories needed beside it instead")
        if t == "/":
            raise ValueError(f"{what}: cannot bind over the sandbox root")
        for k in _GENERATED_TREES:
            if _under(t, k):
                raise ValueError(f"{what}: {k} is generated by the sandbox and cannot be a bind target")
        for link in symlinks:
            if _under(t, link):
                raise ValueError(f"{what}: {link} is a symlink in the sandbox root; bind at its target")
        for p in protected:
            if _under(p, t):
                raise ValueError(f"{what}: it would hide {p}, which the sandbox needs; choose another target")
        if t in taken:
            raise ValueError(f"{what}: another bind already uses the target {t}")
        parent_t, parent_src = max((lay for lay in layers if _under(t, lay[0])), key=lambda lay: len(lay[0]))
        if parent_src is not None:
            host = os.path.normpath(parent_src + t[len(parent_t.rstrip("/")):])
            if not os.path.exists(host) or os.path.realpath(host) != host:
                raise ValueError(f"{what}: the target lies inside the bind of {parent_t}, where "
                                 f"{quoted(host)} must already exist (no symlinks on the way)")
            if os.path.isdir(host) != os.path.isdir(real):
                raise ValueError(f"{what}: the source and the existing target {quoted(host)} differ in type")
        out.append(MountSpec(real, t, readonly, True, pin[1:] if pin is not None else None))
        layers.append((t, real))
        taken.add(t)
    return out


def prepare(cfg, zygote_info: dict, tmpfs: list[TmpfsSpec] = (), etc_extra: dict[str, bytes] | None = None,
            pins: dict[str, tuple[str, int, int, str]] | None = None) -> dict:
    """ChildPlan field values for the mount layer of one child.

    Args:
        cfg: the request's SandboxConfig (effective: unset fields are the built-in defaults).
        zygote_info: the zygote's ready info (executable, prefix, base_prefix, path, version;
            optional extra_paths: more import roots to bind read-only).
        tmpfs: extra tmpfs mounts of the child's own (workspace, export) to place in the root.
        etc_extra: more generated files under /etc (e.g. resolv.conf for a networked child);
            ignored with chroot_dir, whose /etc is the user's.
        pins: the sources the client named, as given, -> (canonical path, st_dev, st_ino, handle) of
            what the daemon checked (policy.check_peer_paths): their specs take that path
            (resolved once, by the check: resolving it again here as root would tell the client
            whether paths it cannot reach exist) and carry the rest (MountSpec.pin, chroot_pin).

    Returns:
        root, chroot_dir, tmpfs_bytes, binds, proc, dev_pts, etc_files, symlinks, scratch, dev, tmp,
        tmpfs.

    Raises:
        ValueError: a bind, tmpfs target or chroot_dir that cannot work or would weaken the sandbox
            (message names the field and the path).
    """
    cfg = cfg.with_defaults()  # (the daemon passes resolved configs: then this is cfg)
    if cfg.chroot_dir is not None:
        if tmpfs:
            raise ValueError(f"{tmpfs[0].target}: a workspace or export needs the generated root, not chroot_dir")
        return _prepare_chroot(cfg, pins)
    binds, links = _interpreter_layout(
        zygote_info["executable"], zygote_info["prefix"], zygote_info["base_prefix"],
        tuple(zygote_info.get("path") or ()), tuple(zygote_info.get("extra_paths") or ()))
    symlinks = dict(links)
    etc_files = {**_etc_files(cfg), **(etc_extra or {})}
    layers: list[tuple[str, str | None]] = [("/", None), ("/tmp", None)]
    layers += [(b.target, b.source) for b in binds]
    protected = [b.target for b in binds] + list(etc_files) + list(symlinks)
    user = _user_binds(cfg, layers, protected, symlinks, {b.target for b in binds}, pins)
    all_binds = sorted([*binds, *user], key=lambda b: b.target)  # parents before what they hold
    _check_tmpfs(tmpfs, all_binds, protected, symlinks)
    return dict(root="tmpfs", chroot_dir=None, tmpfs_bytes=cfg.tmpfs_bytes, binds=all_binds,
                proc=cfg.proc is not False, dev_pts=cfg.dev_pts, etc_files=etc_files,
                symlinks=symlinks, scratch=_choose_scratch([]), dev=True, tmp=True, tmpfs=list(tmpfs))


def _check_tmpfs(tmpfs, binds: list[MountSpec], protected: list[str], symlinks: dict[str, str]) -> None:
    """Extra tmpfs mounts go on directories of the root's own tmpfs (or /tmp): never inside a
    host bind (no mountpoint is made in a host directory), never over what the sandbox needs."""
    for i, t in enumerate(tmpfs):
        p = t.target
        what = f"{p}: the workspace/export directory"
        if p == "/" or any(_under(p, k) for k in _GENERATED_TREES):
            raise ValueError(f"{what} cannot be / or under /proc or /dev")
        for link in symlinks:
            if _under(p, link):
                raise ValueError(f"{what} lies under {link}, a symlink in the sandbox root")
        for b in binds:
            if _under(p, b.target) or _under(b.target, p):
                raise ValueError(f"{what} overlaps the bind at {b.target}")
        for q in protected:
            if _under(q, p):
                raise ValueError(f"{what} would hide {q}, which the sandbox needs")
        for other in tmpfs[:i]:
            if _under(p, other.target) or _under(other.target, p):
                raise ValueError(f"{what} overlaps {other.target}")


def _prepare_chroot(cfg, pins: dict | None = None) -> dict:
    root = cfg.chroot_dir
    pin = (pins or {}).get(root)  # the client's: as for its binds (_user_binds)
    if pin is None and not os.path.isdir(root):
        raise ValueError(f"chroot_dir: {quoted(root)} is not a directory on the host")
    real = pin[0] if pin is not None else os.path.realpath(root)
    if real == "/":
        raise ValueError("chroot_dir: the host's / cannot be the sandbox root; leave chroot_dir unset")
    for k in _KERNEL_TREES:
        if _under(real, k):
            raise ValueError(f"chroot_dir: {quoted(root)} is under {k}")
    held = _kernel_mount_under(real, _kernel_mounts())
    if held is not None:
        raise ValueError(f"chroot_dir: {quoted(root)} holds {held}, a kernel interface the child would see")

    def has_dir(sub: str) -> bool:
        p = real + sub
        return os.path.isdir(p) and os.path.realpath(p) == p  # a symlink could point anywhere

    proc = cfg.proc is True
    if proc and not has_dir("/proc"):
        raise ValueError(f"chroot_dir: proc=True needs an empty /proc directory in {quoted(root)}")
    dev = has_dir("/dev")
    if cfg.dev_pts and not dev:
        raise ValueError(f"chroot_dir: dev_pts=True needs a /dev directory in {quoted(root)}")
    tmp = has_dir("/tmp")
    layers: list[tuple[str, str | None]] = [("/", real)] + ([("/tmp", None)] if tmp else [])
    user = _user_binds(cfg, layers, [], {}, set(), pins)
    return dict(root="chroot", chroot_dir=real, tmpfs_bytes=cfg.tmpfs_bytes, binds=user, proc=proc,
                dev_pts=cfg.dev_pts, etc_files={}, symlinks={}, scratch=_choose_scratch([real]),
                dev=dev, tmp=tmp, chroot_pin=pin[1:] if pin is not None else None)


# ---- child side ----------------------------------------------------------------------------------

_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME = 1024, 2048, 1 << 21


class _MountAttr(ctypes.Structure):  # struct mount_attr, mount_setattr(2)
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


_ATTR_RO = _MountAttr(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV, 0, 0, 0)
_ATTR_RW = _MountAttr(_MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV, 0, 0, 0)
_ATTR_SIZE = ctypes.c_size_t(ctypes.sizeof(_MountAttr))
_MOUNT_ATTR_IDMAP = 0x100000
_OPEN_TREE_CLONE = 1
_MOVE_MOUNT_F_EMPTY_PATH, _MOVE_MOUNT_T_EMPTY_PATH = 0x4, 0x40
# Set to False on ENOSYS (kernels before 5.12): per-mount MS_REMOUNT from then on.
_use_mount_setattr = True

# mknod is refused in a user namespace, so the device nodes are the host's, bound onto empty files.
_DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
_DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
              ("stderr", "/proc/self/fd/2"))
SHM_MAX = 16 << 20
_NS = _sys.MS_NOSUID | _sys.MS_NODEV
# A fresh /proc, read-only whatever Landlock does: a child that makes itself dumpable (prctl, or
# any exec) owns its /proc files, and could write its oom_score_adj back down to the kernel's
# floor (the daemon's score, -1000 under systemd's OOMScoreAdjust=-1000, unless the daemon holds
# CAP_SYS_RESOURCE). Nothing of ours writes the child's /proc after the mount. (Its magic links,
# /proc/self/fd/N, still lead to the files they name: their own mounts and modes decide.)
_PROC = _NS | _sys.MS_NOEXEC | _sys.MS_RDONLY
_HINT_MOUNT = ("the child needs CAP_SYS_ADMIN over its own mount namespace (a user namespace made "
               "with it); in Docker, run with the zygote seccomp profile and "
               "--security-opt apparmor=unconfined")
_HINT_PROC = ("the host's /proc must be fully visible (no masked paths); in Docker run with "
              "--security-opt systempaths=unconfined")
_HINT_SOURCE = ("every parent directory of a bind source must be searchable by the sandbox's host "
                "uid (chmod o+x), or the sources must be opened with mounts.open_sources() before "
                "the uid switch")


def _err(what: str, e: OSError, hint: str = "") -> SetupError:
    return SetupError("mounts", f"{what}: {os.strerror(e.errno) if e.errno else e}", e.errno or 0, hint)


def open_sources(plan) -> dict[str, int]:
    """O_PATH fds of the plan's bind sources (and chroot_dir), opened in this mount namespace.

    Call it in the child, after clone and before userns.apply() when the daemon runs as root, so
    the path walk still has the daemon's host uid. ``apply`` consumes (closes) the fds.

    Raises:
        SetupError: a required source is missing or unreachable.
    """
    fds: dict[str, int] = {}
    try:
        if plan.root == "chroot" and plan.chroot_dir:
            fds[plan.chroot_dir] = _open_path(plan.chroot_dir)
            _check_pin(fds[plan.chroot_dir], plan.chroot_dir, plan.chroot_pin)
        for spec in plan.binds:
            if spec.tree >= 0:  # the daemon's idmapped copy, at that fd: the very file checked?
                _check_pin(spec.tree, spec.source, spec.pin)
                continue
            if spec.source not in fds:
                try:
                    fds[spec.source] = _open_path(spec.source)
                except SetupError as e:
                    if e.errno == _errno.ENOENT and not spec.required:
                        continue
                    raise
            _check_pin(fds[spec.source], spec.source, spec.pin)
    except BaseException:
        _close_all(fds)
        raise
    return fds


def _check_pin(fd: int, path: str, pin: tuple[int, int, str] | None) -> None:
    """A source the client named must be the very file the daemon checked against the client's
    ids. The walk here has the daemon's rights: a directory on the way renamed meanwhile for
    one the client cannot search (or a file for a hard link) would be bound otherwise, and
    what it holds readable to the child. (Symlinks are refused on the way: _open_path.) The
    file handle tells a file that took a deleted one's inode number from it (ext4 hands a freed
    number out again at once)."""
    if pin is None:
        return
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != tuple(pin[:2]) or (pin[2] and _sys.file_handle(fd) != pin[2]):
        raise SetupError("mounts", f"bind source {path} is not what the daemon checked (it was replaced "
                         "since)", _errno.ESTALE,
                         "leave the paths a request names in place until its child has started")


_use_openat2 = True


def _open_path(path: str) -> int:
    """O_PATH fd of a bind source, following no symlink on the way.

    Every source in a plan is a canonical path: the pool's resolved by the daemon, a client's the
    kernel's name for the file its check opened as the client (policy.check_peer_paths). A
    symlink found here means a component was swapped after
    that check: refuse (ELOOP) rather than bind whatever it now points to. openat2 needs Linux
    5.6; before that the plain open is the fallback.
    """
    global _use_openat2
    try:
        if _use_openat2:
            try:
                return _sys.openat2(path, os.O_PATH | os.O_CLOEXEC,
                                    _sys.RESOLVE_NO_SYMLINKS | _sys.RESOLVE_NO_MAGICLINKS)
            except OSError as e:
                if e.errno != _errno.ENOSYS:
                    raise
                _use_openat2 = False
        return os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        hint = _HINT_SOURCE if e.errno == _errno.EACCES else (
            "a path component became a symlink after the request was checked" if e.errno == _errno.ELOOP else "")
        raise _err(f"open bind source {path}", e, hint) from None


def _close_all(fds: dict[str, int]) -> None:
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def apply(plan, sources: dict[str, int] | None = None) -> None:  # plan: ChildPlan
    """Child side: make the mount tree private and build the plan's root (see the module doc).

    Args:
        plan: the ChildPlan.
        sources: fds from ``open_sources(plan)``, when it ran earlier; opened here otherwise.
            Closed before returning, in every case.

    Raises:
        SetupError: step "mounts", naming the operation, with the errno and the fix when the host
            is at fault.
    """
    try:
        # Private propagation first: without it our mounts would propagate to the host's tree.
        _sys.mount(None, "/", None, _sys.MS_REC | _sys.MS_PRIVATE)
    except OSError as e:
        if sources:
            _close_all(sources)
        _close_trees(plan)
        raise SetupError("mounts", f"make / private: {e.strerror}", e.errno or 0) from None
    if plan.root == "host":
        _close_trees(plan)
        if sources:
            _close_all(sources)
        if plan.proc:
            try:
                _sys.mount("proc", "/proc", "proc", _PROC)
            except OSError as e:
                raise SetupError("mounts", f"mount a fresh /proc: {e.strerror}", e.errno or 0,
                                 "the host's /proc must be fully visible (no masked paths); in Docker "
                                 "run with --security-opt systempaths=unconfined") from None
        return
    if plan.root not in ("tmpfs", "chroot"):
        _close_trees(plan)
        if sources:
            _close_all(sources)
        raise SetupError("mounts", f"root mode {plan.root!r} is not supported by this build", 95)
    if sources is None:
        sources = open_sources(plan)
    try:
        _build(plan, sources)
    finally:
        _close_all(sources)
        _close_trees(plan)


def _close_trees(plan) -> None:
    """The idmapped trees' fds (attached or not: an attached mount stays), never the payload's."""
    for spec in plan.binds:
        if spec.tree >= 0:
            try:
                os.close(spec.tree)
            except OSError:
                pass


def _inodes(size: int) -> int:
    """A tmpfs's inode cap for ``size`` bytes: one per KiB (64M: 65536 files), at least 1024.
    Without one the kernel's default allowed ~3 M empty files in a "64M" /tmp, and their inodes
    and dentries are kernel memory no size cap counts: a child without a memory cgroup held
    1.2 GiB of it that way (a helper's red-team). An inode and its dentry take about 1 KiB, so
    this keeps a tmpfs's kernel memory about its size."""
    return max(1024, size // 1024)


def _build(plan, srcs: dict[str, int]) -> None:
    R = plan.scratch
    made = {"/"}  # sandbox directories known to exist: one mkdir each, no stat storm
    try:
        if plan.root == "tmpfs":
            _sys.mount("zygote", R, "tmpfs", _NS,
                       f"size={plan.tmpfs_bytes},nr_inodes={_inodes(plan.tmpfs_bytes)},mode=0755")
        else:
            _bind(srcs[plan.chroot_dir], R)
            _setattr(R, _ATTR_RO)
    except OSError as e:
        raise _err(f"mount the new root on {R}", e, _HINT_MOUNT if e.errno == _errno.EPERM else "") from None
    rfd = os.open(R, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _build_on(plan, srcs, R, rfd, made)
    finally:
        os.close(rfd)


def _build_on(plan, srcs: dict[str, int], R: str, rfd: int, made: set[str]) -> None:
    # A chroot_dir the client named is the client's: its mount points are opened as _client_target does.
    client_root = plan.root == "chroot" and plan.chroot_pin is not None

    def point(path: str) -> tuple[str, int]:  # (a mount point of ours at ``path``, and its fd to close)
        if not client_root:
            _mkdirs(R, path, made)
            return R + path, -1
        fd = _client_target(rfd, path, True, "/")
        return f"/proc/self/fd/{fd}", fd

    if plan.tmp:
        where, fd = point("/tmp")
        try:
            _sys.mount("tmpfs", where, "tmpfs", _NS,
                       f"size={plan.tmpfs_bytes},nr_inodes={_inodes(plan.tmpfs_bytes)},mode=1777")
        except OSError as e:
            raise _err("mount /tmp", e) from None
        finally:
            _close_fd(fd)
    if plan.dev:
        where, fd = point("/dev")
        try:
            _dev(R, where, plan.dev_pts, min(plan.tmpfs_bytes, SHM_MAX))
        finally:
            _close_fd(fd)
    if plan.proc:
        # No hidepid: every process in this pid namespace is the sandbox's own, ps/psutil keep
        # working, and PID 1's sensitive entries (environ, fd, root) need ptrace access, which the
        # privilege drop removes. No /sys at all: it has no per-namespace view of the host.
        where, fd = point("/proc")
        try:
            _sys.mount("proc", where, "proc", _PROC)
        except OSError as e:
            raise _err("mount a fresh /proc", e, _HINT_PROC if e.errno == _errno.EPERM else "") from None
        finally:
            _close_fd(fd)
    for path, data in plan.etc_files.items():
        _mkdirs(R, path.rpartition("/")[0], made)
        _write(R + path, data)
    # What each sandbox path lies on: (mount point, whether a client's host directory backs it).
    layers = [("/", client_root)] + ([("/tmp", False)] if plan.tmp else [])
    for spec in plan.binds:
        fd = spec.tree if spec.tree >= 0 else srcs.get(spec.source)
        if fd is None:
            continue  # optional and missing (open_sources already failed the required ones)
        target = R + spec.target
        try:
            is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        except OSError as e:
            raise _err(f"stat bind source {spec.source}", e) from None
        layer, theirs = max((lay for lay in layers if _under(spec.target, lay[0])), key=lambda lay: len(lay[0]))
        tfd = -1
        if theirs:  # (see _client_target)
            tfd = _client_target(rfd, spec.target, is_dir, layer)
            target = f"/proc/self/fd/{tfd}"
        else:
            _mkdirs(R, spec.target.rpartition("/")[0], made)
            if is_dir:
                _mkdirs(R, spec.target, made)
            else:
                _touch(target)
        layers.append((spec.target, spec.pin is not None))
        try:
            if spec.tree >= 0:  # (its flags set by the daemon: nosuid, nodev, read-only as asked)
                _sys.syscall("move_mount", fd, b"", _AT_FDCWD if tfd < 0 else tfd,
                             target.encode() if tfd < 0 else b"",
                             _MOVE_MOUNT_F_EMPTY_PATH | (_MOVE_MOUNT_T_EMPTY_PATH if tfd >= 0 else 0))
            else:
                _bind(fd, target)
                if tfd >= 0:  # (the bind is the fd's mount now, whatever the path leads to)
                    _setattr(f"/proc/self/fd/{tfd}", _ATTR_RO if spec.readonly else _ATTR_RW)
                else:
                    _setattr(target, _ATTR_RO if spec.readonly else _ATTR_RW)
        except OSError as e:
            raise _err(f"bind {spec.source} on {spec.target}", e) from None
        finally:
            if tfd >= 0:
                os.close(tfd)
        made.add(spec.target)
    for t in plan.tmpfs:
        # The workspace and the export directory: capped, owned by the sandbox uid (tmpfs(5)).
        _mkdirs(R, t.target, made)
        opts = f"size={t.size},mode=0755,uid={t.uid},gid={t.gid}" + (f",nr_inodes={t.inodes}" if t.inodes else "")
        try:
            _sys.mount("zygote-files", R + t.target, "tmpfs", _NS, opts)
        except OSError as e:
            raise _err(f"mount a tmpfs on {t.target}", e) from None
    for path, text in plan.symlinks.items():
        # Made last: no mountpoint above was created through one of them.
        _mkdirs(R, path.rpartition("/")[0], made)
        try:
            os.symlink(text, R + path)
        except OSError as e:
            raise _err(f"symlink {path}", e) from None
    if plan.root == "tmpfs":
        try:
            _sys.mount(None, R, None, _sys.MS_REMOUNT | _sys.MS_BIND | _sys.MS_RDONLY | _NS)
        except OSError as e:
            raise _err("make the root read-only", e) from None
    _pivot(R)


def idmapped_tree(spec: MountSpec, userns_fd: int) -> int:
    """Daemon side: a detached copy (open_tree) of a client's bind source and every mount under
    it, whose file ownership passes through the maps of ``userns_fd`` (mount_setattr(2),
    MOUNT_ATTR_IDMAP), nosuid, nodev, read-only when ``spec`` is, and private (a copy of a shared
    mount would otherwise be a peer of the host's, and a mount the child made under it would
    appear on the host). The child attaches it (move_mount) in place of a bind of the path.

    Needs CAP_SYS_ADMIN over the source's file system (the host's: only a root daemon) and a
    file system that allows idmapped mounts (ext4, xfs, btrfs, tmpfs from Linux 6.3, ...; the
    whole tree: one submount that does not refuses it). The source must be what the client's
    check found (``spec.pin``), walked without following a symlink.

    Raises:
        OSError: the kernel refused (the caller binds the path as before).
        SetupError: the source is not what was checked (the child refuses it too).
    """
    fd = _sys.openat2(spec.source, os.O_PATH | os.O_CLOEXEC, _sys.RESOLVE_NO_SYMLINKS | _sys.RESOLVE_NO_MAGICLINKS)
    try:
        _check_pin(fd, spec.source, spec.pin)
        tree = _sys.syscall("open_tree", fd, b"", _sys.AT_EMPTY_PATH | _OPEN_TREE_CLONE | os.O_CLOEXEC | _AT_RECURSIVE)
    finally:
        os.close(fd)
    try:
        attr = _MountAttr(_MOUNT_ATTR_IDMAP | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV
                          | (_MOUNT_ATTR_RDONLY if spec.readonly else 0), 0, _sys.MS_PRIVATE, userns_fd)
        _sys.syscall("mount_setattr", tree, b"", _sys.AT_EMPTY_PATH | _AT_RECURSIVE, ctypes.byref(attr), _ATTR_SIZE)
    except BaseException:
        os.close(tree)
        raise
    return tree


def _bind(fd: int, target: str) -> None:
    # MS_REC: a non-recursive bind of a tree holding locked submounts is refused in a user
    # namespace (it would reveal what they cover), and the child should see them anyway.
    _sys.mount(f"/proc/self/fd/{fd}", target, None, _sys.MS_BIND | _sys.MS_REC)


def _setattr(path: str, attr: _MountAttr) -> None:
    """Apply ``attr`` to the mount at ``path`` and every mount below it.

    mount_setattr(2) with AT_RECURSIVE also reaches the submounts a recursive bind copied (a plain
    MS_REMOUNT changes one mount only), and it only adds flags, so locked atime/noexec flags of
    host mounts need no care. Older kernels: one MS_REMOUNT per mount, locked flags preserved.
    """
    global _use_mount_setattr
    if _use_mount_setattr:
        r = _sys.libc.syscall(ctypes.c_long(_sys.NR["mount_setattr"]), ctypes.c_long(_AT_FDCWD),
                              ctypes.c_char_p(path.encode()), ctypes.c_long(_AT_RECURSIVE),
                              ctypes.byref(attr), _ATTR_SIZE)
        if r == 0:
            return
        err = ctypes.get_errno()
        if err != _errno.ENOSYS:
            raise OSError(err, os.strerror(err))
        _use_mount_setattr = False
    _remount_tree(path, attr.attr_set & _MOUNT_ATTR_RDONLY != 0)


def _remount_tree(path: str, readonly: bool) -> None:
    with open("/proc/self/mountinfo", "rb") as f:
        lines = f.read().decode("utf-8", "surrogateescape").splitlines()
    points = []
    for line in lines:
        mp = line.split(" ", 5)[4]
        mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), mp)
        if _under(mp, path):
            points.append(mp)
    for mp in points or [path]:
        # In a user namespace a remount must keep the flags the host mount had locked
        # (mount(2), EPERM): carry over noexec and the atime mode.
        f = os.statvfs(mp).f_flag
        flags = _sys.MS_REMOUNT | _sys.MS_BIND | _NS | (_sys.MS_RDONLY if readonly else 0)
        flags |= _sys.MS_NOEXEC if f & os.ST_NOEXEC else 0
        flags |= _MS_NOATIME if f & os.ST_NOATIME else 0
        flags |= _MS_NODIRATIME if f & os.ST_NODIRATIME else 0
        flags |= _MS_RELATIME if f & os.ST_RELATIME else 0
        _sys.mount(None, mp, None, flags)


def _mkdirs(R: str, path: str, made: set[str]) -> None:
    """mkdir -p of a sandbox path inside the new root, remembering what exists."""
    if not path or path in made:
        return
    cur = ""
    for part in path.split("/")[1:]:
        cur += "/" + part
        if cur in made:
            continue
        try:
            os.mkdir(R + cur, 0o755)
        except FileExistsError:
            pass  # already there: a directory inside a bind, or one made for an earlier target
        except OSError as e:
            raise _err(f"create mountpoint {cur}", e) from None
        made.add(cur)


_HINT_KEEP = "leave the paths a request names in place until its child has started"


def _client_target(rfd: int, target: str, is_dir: bool, layer: str) -> int:
    """O_PATH fd of a mount point inside a directory of the client's (its bind, its chroot_dir),
    to mount on (through /proc/self/fd). It must be there as the request's check found it
    (_user_binds, _prepare_chroot): nothing is ever made in a host directory, and it is walked
    from the new root without following a symlink or leaving it. In an idmapped bind the
    client's files are the sandbox's, whose root still has its capabilities here: the first
    version made a target the client deleted after the check, on the host, as that root, and
    followed a directory the client swapped for a symlink (its own mounts, then the rest of the
    root, landed in the client's directory; two helpers' reviews)."""
    try:
        fd = _sys.openat2(target.lstrip("/") or ".", os.O_PATH | os.O_CLOEXEC,
                          _sys.RESOLVE_NO_SYMLINKS | _sys.RESOLVE_BENEATH, dirfd=rfd)
    except OSError as e:
        raise SetupError("mounts", f"mount point {target}: {e.strerror} (inside {layer}, a directory of the "
                         "client's, it must exist on the host, with no symlink on the way)", e.errno or 0,
                         _HINT_KEEP) from None
    if stat.S_ISDIR(os.fstat(fd).st_mode) != is_dir:
        os.close(fd)
        raise SetupError("mounts", f"mount point {target} (inside {layer}) is no longer a "
                         f"{'directory' if is_dir else 'file'}", _errno.ENOTDIR if is_dir else _errno.EISDIR,
                         _HINT_KEEP)
    return fd


def _close_fd(fd: int) -> None:
    if fd >= 0:
        os.close(fd)


def _touch(path: str) -> None:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
    except FileExistsError:
        pass
    except OSError as e:
        raise _err(f"create mountpoint {path}", e) from None


def _write(path: str, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    except OSError as e:
        raise _err(f"write {path}", e) from None


def _dev(R: str, where: str, dev_pts: bool, shm_bytes: int) -> None:
    """A minimal /dev: a small tmpfs mounted on ``where`` (R/dev, or an fd of it), then filled."""
    d = R + "/dev"
    try:
        _sys.mount("zygote-dev", where, "tmpfs", _NS | _sys.MS_NOEXEC, "size=64k,nr_inodes=64,mode=0755")
        for name in _DEV_NODES:
            node = f"{d}/{name}"
            _touch(node)
            try:
                _sys.mount("/dev/" + name, node, None, _sys.MS_BIND)
            except OSError as e:
                if name != "tty" or e.errno != _errno.ENOENT:
                    raise
                os.unlink(node)  # a host without /dev/tty: leave it out rather than fail
        for name, text in _DEV_LINKS:
            os.symlink(text, f"{d}/{name}")
        os.mkdir(d + "/shm", 0o755)
        _sys.mount("zygote-shm", d + "/shm", "tmpfs", _NS | _sys.MS_NOEXEC,
                   f"size={shm_bytes},nr_inodes={_inodes(shm_bytes)},mode=1777")
        if dev_pts:
            os.mkdir(d + "/pts", 0o755)
            # newinstance: a private pty set, never the host's ptys (devpts(5)); ptmxmode so an
            # unprivileged payload can open /dev/ptmx.
            _sys.mount("devpts", d + "/pts", "devpts", _sys.MS_NOSUID | _sys.MS_NOEXEC,
                       "newinstance,ptmxmode=0666,mode=0620")
            os.symlink("pts/ptmx", d + "/ptmx")
        _sys.mount(None, d, None, _sys.MS_REMOUNT | _sys.MS_BIND | _sys.MS_RDONLY | _NS | _sys.MS_NOEXEC)
    except OSError as e:
        raise _err("set up /dev", e) from None


def _pivot(R: str) -> None:
    # pivot_root(".", ".") stacks the old root on the new one; unmounting "." then detaches it, so
    # no directory for the old root is needed (pivot_root(2), NOTES).
    try:
        os.chdir(R)
        _sys.syscall("pivot_root", ctypes.c_char_p(b"."), ctypes.c_char_p(b"."))
        _sys.umount2(".", _sys.MNT_DETACH)
        os.chdir("/")
    except OSError as e:
        raise _err("pivot_root into the new root", e) from None
