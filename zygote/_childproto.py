"""Messages between the daemon and one child, over the child's two private pipes.

The daemon writes one ChildPlan on the child's control pipe ("go": everything the child needs to
confine itself, then the opaque payload). The child answers on its status pipe with Ready or Failed,
and its PID 1 later with ExitReport. Frames are a 4-byte big-endian length and a msgpack body; the
child never sees a pickle until it is fully confined, and the daemon never unpickles anything.

The payload process (PID 1, or PID 2 under a reaper) alone holds a third pipe, the result pipe:
one record, a kind byte and an 8-byte length, then the encoded return value (or the exception's
description). It is separate from the status pipe, which the payload process closes before any
payload code runs, so the payload can never forge a Ready or an ExitReport (and the daemon ignores
an ExitReport from a child without a reaper). The daemon checks only the kind byte and the length,
and forwards the bytes unopened.
"""

from __future__ import annotations

import struct

import msgspec

from zygote_client._errors import quoted
from zygote_client._protocol import JOB_LEN as LEN, KINDS as JOB_KINDS, Job  # one framing for every child pipe
from zygote_client._workspace import Entry

MAX_STATUS_FRAME = 1 << 20
TREE_FD = 6  # the child's first idmapped tree (fds 0-5: stdio, control, status, result)
MAX_TREES = 64  # idmapped trees one child gets (a request's further binds are plain)
RESULT_HEADER = struct.Struct("!cQ")  # kind, length of the body that follows
# result-pipe kind byte -> the kind name the client sees in Exited.result_kind
RESULT_KINDS = {
    b"j": "json",         # the return value, JSON text
    b"p": "pickle",       # the return value, cloudpickle (only when the plan says result_pickle)
    b"e": "error",        # the payload raised: JSON {"type", "message", "traceback"}
    b"u": "unencodable",  # the value could not be encoded: JSON {"type", "message"}
}


class MountSpec(msgspec.Struct, frozen=True, array_like=True):
    """One bind: host source (opened inside the child's mount namespace), target, read-only flag,
    and whether a missing source is an error."""

    source: str
    target: str
    readonly: bool = True
    required: bool = True
    # A source the client named: (st_dev, st_ino, file handle) of what the daemon checked against
    # the client's ids (the handle, _sys.file_handle, holds the inode's generation where the file
    # system keeps one: "" where it gives none). The child binds that file or none.
    pin: tuple[int, int, str] | None = None
    # The child's fd (TREE_FD and up) of a detached, idmapped copy of the source the daemon made
    # (mounts.idmapped_tree): attached as it is, instead of a bind of the path. -1: none.
    tree: int = -1


class TmpfsSpec(msgspec.Struct, frozen=True, array_like=True):
    """A size-capped tmpfs of the child's own at ``target`` (workspace, export), owned by the
    sandbox uid/gid; ``inodes`` 0 leaves the kernel's default."""

    target: str
    size: int
    inodes: int = 0
    uid: int = 0
    gid: int = 0


JOB_FIELDS = tuple(Job.__struct_fields__)


class ChildPlan(Job, frozen=True, kw_only=True, forbid_unknown_fields=True):
    hostname: str = "zygote"
    cwd: str | None = None
    # mounts: None keeps the host tree (only /proc is replaced); otherwise a generated root
    root: str = "host"  # "host" | "tmpfs" | "chroot"
    chroot_dir: str | None = None
    tmpfs_bytes: int = 64 << 20
    binds: list[MountSpec] = []
    proc: bool = True
    dev_pts: bool = False
    etc_files: dict[str, bytes] = {}
    symlinks: dict[str, str] = {}  # path in the new root -> link text (e.g. /bin -> usr/bin)
    scratch: str = "/mnt"  # existing host dir the new root is assembled on (hidden only for the child)
    dev: bool = True  # minimal /dev (chroot mode: only where the chroot has a /dev directory)
    tmp: bool = True  # capped /tmp tmpfs (chroot mode: only where the chroot has a /tmp directory)
    rlimits: list[tuple[int, int, int]] = []
    landlock: str = "off"  # "off" | "auto" | "required"
    landlock_ro: list[str] = []
    landlock_rw: list[str] = []
    landlock_abi: int = 1  # the lowest ABI "required" accepts
    landlock_net: bool = False  # deny TCP bind/connect where the ABI has it
    uid: int = 0
    gid: int = 0
    drop_privileges: bool = False
    seccomp_bpf: bytes = b""
    # userns.no_nested_namespaces must hold (an unconfined or custom seccomp profile); False: the
    # profile refuses new user namespaces itself, and a read-only /proc/sys may keep the limit out
    nested_limit_required: bool = True
    cgroupns: bool = False  # re-root the cgroup namespace at the child's own cgroup (attached by now)
    tmpfs: list[TmpfsSpec] = []  # extra tmpfs mounts in the generated root (workspace, export)
    workspace_path: str | None = None  # where workspace_entries are unpacked (a TmpfsSpec target)
    workspace_entries: list[Entry] = []  # validated by the daemon, parents first
    export_path: str | None = None  # PID 1 packs this directory after the payload ended
    export_limits: tuple[int, int, int] = (0, 0, 0)  # (files, bytes per file, bytes): PID 1 reads no further
    test_fail_step: str | None = None
    test_pause_sources: str | None = None  # (--test-hooks) wait for this path before opening bind sources
    chroot_pin: tuple[int, int, str] | None = None  # as MountSpec.pin, for a chroot_dir the client named
    data_args: bool = False  # target/child_main arguments are plain data (a pool without callables)
    # A reserve child (pool reserve): confined with the pool's default config and no request; its
    # payload process reports Ready, then waits on the control pipe for one Job.
    deferred: bool = False
    prewarm: bool = True  # a reserve child takes a fake request's faults while it waits (child._prewarm)
    # PID 1 forks the payload and stays as its reaper (SandboxConfig.reaper; always with an
    # export, which PID 1 packs after the payload ended). False: the payload is PID 1 itself.
    reaper: bool = False




class Ready(msgspec.Struct, frozen=True, tag="ready"):
    landlock_abi: int = 0


class Failed(msgspec.Struct, frozen=True, tag="failed"):
    step: str
    errno: int
    message: str
    hint: str = ""


class Started(msgspec.Struct, frozen=True, tag="started"):
    """A reserve child read its Job and runs it now (sent before any payload code runs, so it
    cannot be forged by the payload): the kind, the Job's own timeout, which the daemon caps at
    the pool's, and ``at``, when the child read the Job (``time.monotonic()``: the host's
    CLOCK_MONOTONIC, children have no time namespace), from which the daemon arms that
    deadline: it reads a leased child's report when it needs it, not when it is written (see
    daemon._park_status), and the deadline must not move with that."""

    kind: str
    timeout: float | None = None
    at: float = 0.0


class ExitReport(msgspec.Struct, frozen=True, tag="exit"):
    """The payload process's raw wait status, as seen by PID 1."""

    wait_status: int


class Out(msgspec.Struct, frozen=True, tag="out"):
    """One export entry from PID 1: a directory, or a chunk of a file (consecutive chunks of one
    path append). Untrusted: the daemon checks names, kinds and limits."""

    path: str
    kind: str
    mode: int = 0o644
    data: bytes = b""


class OutSkip(msgspec.Struct, frozen=True, tag="out-skip"):
    """An entry PID 1 did not export (symlink, fifo, device, socket, unreadable, over a limit)."""

    path: str
    reason: str


class OutEnd(msgspec.Struct, frozen=True, tag="out-end"):
    """PID 1 finished packing (``error``: why it could not)."""

    error: str = ""


StatusMessage = Ready | Failed | Started | ExitReport | Out | OutSkip | OutEnd

_enc = msgspec.msgpack.Encoder()
plan_decoder = msgspec.msgpack.Decoder(ChildPlan)
job_decoder = msgspec.msgpack.Decoder(Job)
status_decoder = msgspec.msgpack.Decoder(StatusMessage)


def job_problem(kind: str, target: str | None, argv: list[str] | None, timeout: float | None) -> str:
    """What is wrong with a Job's own fields ("" when nothing): checked by the daemon for a Spawn
    and by a reserve child for the Job it reads (a leased child's comes from the client)."""
    if kind not in JOB_KINDS:
        return f"kind must be one of {', '.join(JOB_KINDS)}, got {quoted(kind, 60)}"
    if kind in ("target", "child_main") and (not target or ":" not in target):
        return f"target must be 'module:function', got {quoted(target, 200)}"
    if kind in ("exec", "script") and not argv:
        return f"{kind} needs a non-empty argv"
    if timeout is not None and not (timeout > 0 and timeout < 1e9):
        return f"timeout must be a positive number of seconds below 1e9, got {timeout!r}"
    return ""


def frame(msg: msgspec.Struct) -> bytearray:
    """Length and body in one buffer: one copy of a large payload, not two."""
    buf = bytearray(LEN.size)
    _enc.encode_into(msg, buf, LEN.size)
    LEN.pack_into(buf, 0, len(buf) - LEN.size)
    return buf
