"""Seccomp-BPF, the last confinement step: a syscall filter compiled once, loaded in the child.

Daemon side (``load_profile``, ``compile_profile``, ``compile_cached``): read a profile in Docker's
seccomp JSON format (or an OCI runtime spec's ``linux.seccomp`` object), validate it strictly, and
compile it with libseccomp (through pyseccomp) into a raw classic-BPF program, once per profile and
before any clone. Child side (``apply``): hand those bytes to seccomp(2). The child never loads
libseccomp: it only builds a ``struct sock_fprog`` over bytes it already holds.

Decisions, each fail-closed:

* Only the native architecture (x86_64 or aarch64) is compiled in, whatever the profile's
  ``architectures`` / ``archMap`` say (they are validated, then ignored). A syscall made through any
  other ABI (x86-32 ``int 0x80``, x32 numbers with ``__X32_SYSCALL_BIT``) hits libseccomp's bad-arch
  action, which we set to KILL_PROCESS: a program that switches ABI to dodge a filter written for
  the native syscall table must not get to run further. (libseccomp treats x32 numbers as a foreign
  ABI when the x32 arch is not in the filter; tests/test_layers_seccomp.py checks both.)
* ``SCMP_ACT_KILL`` means kill the *process* here (libseccomp and runc kill only the thread). A
  Python thread killed mid-interpreter can die holding the GIL, leaving a hung process instead of
  an exit status; ``SCMP_ACT_KILL_THREAD`` is still available when that is really wanted.
* ``SCMP_ACT_TRACE`` and ``SCMP_ACT_NOTIFY`` are refused: nothing traces the child or listens on a
  notification fd, so they would behave as an unexplained ENOSYS or hang.
* Syscall names unknown to libseccomp: first looked up in ``_NEW_SYSCALLS`` (numbers newer than the
  libseccomp on Debian 12 knows). A name still unknown is skipped in a rule that *allows* (an
  allow-list that misses an entry only denies more, which is what Docker does too) and is an error
  in any other rule (a deny rule that silently vanished would be a hole; usually it is a typo).
  Names that exist only on another architecture (``vm86``, ``_llseek``) are skipped quietly.
* A rule whose action equals ``defaultAction`` is skipped (libseccomp refuses it; runc skips it).
* Several conditions on the *same* argument in one rule are refused: libseccomp cannot AND them,
  and splitting them into separate rules (runc's way) silently turns AND into OR.
* A profile's ``flags`` are accepted and ignored: the loader always uses exactly
  SECCOMP_FILTER_FLAG_TSYNC (see ``apply``). A ``listenerPath`` is refused (no notify support).
* Docker's ``includes`` / ``excludes``: ``arches`` and ``minKernel`` are evaluated for this host;
  ``caps`` are evaluated for a child holding no capabilities (zygote empties every set), so a rule
  that ``includes`` a capability never applies and one that ``excludes`` it always does.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import functools
import json
import os
import platform
import re
import struct
import sys
from pathlib import Path
from typing import Any

from zygote_client._errors import quoted

from . import SetupError
from . import _sys

STEP = "seccomp"


class ProfileError(ValueError):
    """A seccomp profile could not be found, parsed or compiled (daemon side, before any clone).

    A ValueError with the attributes of ``zygote_client.SandboxError`` (``step``, ``errno``,
    ``hint``) so the daemon can forward it as one.
    """

    def __init__(self, message: str, hint: str = "", errno: int = 0) -> None:
        super().__init__(message + (f" (fix: {hint})" if hint else ""))
        self.step = STEP
        self.layer = STEP
        self.message = message
        self.errno = errno
        self.hint = hint


INSTALLED_PROFILES = "share/zygote/seccomp-profiles"  # under sys.prefix: the wheel's data-files (pyproject.toml)


@functools.lru_cache(maxsize=1)
def _profile_dirs() -> tuple[Path, ...]:
    # Looked up once per process: resolving them took ~0.3 ms, on every spawn (compile_cached).
    here = Path(__file__).resolve().parent.parent.parent / "seccomp-profiles"  # source tree
    installed = Path(sys.prefix) / INSTALLED_PROFILES                          # a wheel's install
    return tuple(d for d in (here, installed) if d.is_dir()) or (here,)


PROFILE_DIR: Path = _profile_dirs()[0]
"""Where profiles named by ``load_profile("default")`` live (first existing of the source tree's
``seccomp-profiles/`` and ``sys.prefix/share/zygote/seccomp-profiles``)."""

# ---- vocabulary ---------------------------------------------------------------------------------

_ARCH = platform.machine()
_NATIVE_SCMP_ARCH = {"x86_64": "SCMP_ARCH_X86_64", "aarch64": "SCMP_ARCH_AARCH64"}.get(_ARCH)
_DOCKER_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(_ARCH)  # includes.arches uses Go names

_KNOWN_ARCHES = {
    "SCMP_ARCH_X86", "SCMP_ARCH_X86_64", "SCMP_ARCH_X32", "SCMP_ARCH_ARM", "SCMP_ARCH_AARCH64",
    "SCMP_ARCH_MIPS", "SCMP_ARCH_MIPS64", "SCMP_ARCH_MIPS64N32", "SCMP_ARCH_MIPSEL",
    "SCMP_ARCH_MIPSEL64", "SCMP_ARCH_MIPSEL64N32", "SCMP_ARCH_PPC", "SCMP_ARCH_PPC64",
    "SCMP_ARCH_PPC64LE", "SCMP_ARCH_S390", "SCMP_ARCH_S390X", "SCMP_ARCH_PARISC",
    "SCMP_ARCH_PARISC64", "SCMP_ARCH_RISCV64", "SCMP_ARCH_LOONGARCH64", "SCMP_ARCH_M68K",
    "SCMP_ARCH_SH", "SCMP_ARCH_SHEB",
}

# Action values are the kernel's SECCOMP_RET_* (include/uapi/linux/seccomp.h), which libseccomp
# passes through unchanged; defining them here keeps libseccomp out of processes that only apply().
_RET_KILL_PROCESS, _RET_KILL_THREAD, _RET_TRAP = 0x80000000, 0x00000000, 0x00030000
_RET_ERRNO, _RET_LOG, _RET_ALLOW = 0x00050000, 0x7FFC0000, 0x7FFF0000
_ACTIONS: dict[str, Any] = {  # name -> action value for a given errno
    "SCMP_ACT_ALLOW": lambda e: _RET_ALLOW,
    "SCMP_ACT_ERRNO": lambda e: _RET_ERRNO | (e & 0xFFFF),
    "SCMP_ACT_KILL": lambda e: _RET_KILL_PROCESS,  # see the module docstring
    "SCMP_ACT_KILL_PROCESS": lambda e: _RET_KILL_PROCESS,
    "SCMP_ACT_KILL_THREAD": lambda e: _RET_KILL_THREAD,
    "SCMP_ACT_TRAP": lambda e: _RET_TRAP,
    "SCMP_ACT_LOG": lambda e: _RET_LOG,
}
_REFUSED_ACTIONS = {
    "SCMP_ACT_TRACE": "nothing ptraces a zygote child, so the call would fail with ENOSYS",
    "SCMP_ACT_NOTIFY": "zygote has no seccomp user-notification listener",
}
_OPS = {  # libseccomp's enum scmp_compare (seccomp.h), part of its stable ABI
    "SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5, "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7,
}

# Syscalls newer than what libseccomp 2.5.4 (Debian 12) can name. Since Linux 5.1 every
# architecture but alpha uses one shared table for new syscalls (numbers 424 and up, see
# include/uapi/asm-generic/unistd.h and arch/x86/entry/syscalls/syscall_64.tbl), so one number
# serves x86_64 and aarch64. Checked against the kernel's syscall tables up to 6.18.
_NEW_SYSCALLS = {
    "futex_waitv": 449, "set_mempolicy_home_node": 450, "cachestat": 451, "fchmodat2": 452,
    "map_shadow_stack": 453, "futex_wake": 454, "futex_wait": 455, "futex_requeue": 456,
    "statmount": 457, "listmount": 458, "lsm_get_self_attr": 459, "lsm_set_self_attr": 460,
    "lsm_list_modules": 461, "mseal": 462, "setxattrat": 463, "getxattrat": 464,
    "listxattrat": 465, "removexattrat": 466, "open_tree_attr": 467, "file_getattr": 468,
    "file_setattr": 469,
}
if _ARCH == "x86_64":
    _NEW_SYSCALLS["uretprobe"] = 335  # x86_64 only, Linux 6.11

NEWEST_REVIEWED = max(_NEW_SYSCALLS.values())
"""The highest syscall number the profiles were reviewed against. Under a profile whose
``defaultAction`` allows (a deny-list, as ``default``), a higher number gets ENOSYS from the
filter (see ``compile_profile``): a syscall added by a later kernel is not let through unread."""

_NR_SCMP_ERROR = -1  # libseccomp's answer for a name it does not know on any architecture


def _libseccomp():
    """pyseccomp, imported on first use by the daemon: a zygote or child that imports this module
    only to apply() never loads libseccomp (nor runs the ldconfig that ctypes.util.find_library
    spawns to locate it)."""
    import pyseccomp
    return pyseccomp


def _resolve(name: str) -> int | None:
    """The native syscall number; None when the name exists only on other architectures; raises
    KeyError when nobody knows it."""
    sc = _libseccomp()
    nr = sc.resolve_syscall(sc.Arch.NATIVE, name)
    if nr >= 0:
        return nr
    if name in _NEW_SYSCALLS:
        return _NEW_SYSCALLS[name]
    if nr == _NR_SCMP_ERROR:
        raise KeyError(name)
    return None  # a pseudo number: a real syscall, just not on this architecture


# ---- loading and validation ---------------------------------------------------------------------

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


def _profile_path(name_or_path: str) -> Path:
    if os.path.isabs(name_or_path):
        return Path(name_or_path)
    if _NAME_RE.match(name_or_path) and not name_or_path.endswith(".json"):
        for d in _profile_dirs():
            if (d / f"{name_or_path}.json").is_file():
                return d / f"{name_or_path}.json"
        known = sorted({p.stem for d in _profile_dirs() for p in d.glob("*.json")})
        raise ProfileError(f"unknown seccomp profile {quoted(name_or_path)}",
                           f"use one of {', '.join(known) or '(none installed)'} or an absolute "
                           f"path to a JSON profile")
    raise ProfileError(f"seccomp profile {quoted(name_or_path)}: expected a profile name (no '.json', "
                       f"no '/') or an absolute path to a JSON file")


def load_profile(name_or_path: str) -> dict:
    """Read and validate a profile; return it normalised (see ``normalize``).

    Args:
        name_or_path: a profile name in ``PROFILE_DIR`` without ``.json`` ("default", "strict"),
            or an absolute path to a JSON file.

    Raises:
        ProfileError (a ValueError): unknown name, unreadable file, invalid JSON, or an invalid
            profile (unknown action, operator, architecture or syscall name, ...).
    """
    path = _profile_path(name_or_path)
    try:
        text = path.read_bytes()
    except OSError as e:
        raise ProfileError(f"cannot read seccomp profile {str(path)!r}: {e.strerror}",
                           errno=e.errno or 0) from None
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProfileError(f"seccomp profile {str(path)!r} is not valid JSON: {e}") from None
    try:
        return normalize(data)
    except ProfileError as e:
        raise ProfileError(f"seccomp profile {str(path)!r}: {e.message}", e.hint) from None


def _int(v: Any, what: str, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ProfileError(f"{what}: expected an integer in {lo}..{hi}, got {v!r}")
    return v


def _kernel_at_least(version: str) -> bool:
    def nums(s: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", s)[:2])
    return nums(os.uname().release) >= nums(version)


def _applies(rule: dict, where: str) -> bool:
    """Docker's includes/excludes, evaluated for this host and a capability-less child."""
    inc, exc = rule.get("includes") or {}, rule.get("excludes") or {}
    for key, cond in (("includes", inc), ("excludes", exc)):
        if not isinstance(cond, dict) or set(cond) - {"arches", "caps", "minKernel"}:
            raise ProfileError(f"{where}.{key}: expected an object with arches, caps or minKernel")
    if inc.get("arches") and _DOCKER_ARCH not in inc["arches"]:
        return False
    if inc.get("caps"):
        return False  # the child holds no capability
    if inc.get("minKernel") and not _kernel_at_least(str(inc["minKernel"])):
        return False
    if exc.get("arches") and _DOCKER_ARCH in exc["arches"]:
        return False
    if exc.get("minKernel") and _kernel_at_least(str(exc["minKernel"])):
        return False
    return True


def _action(name: Any, where: str) -> str:
    if not isinstance(name, str):
        raise ProfileError(f"{where}: expected an action name such as SCMP_ACT_ERRNO, got {name!r}")
    if name in _REFUSED_ACTIONS:
        raise ProfileError(f"{where}: {name} is not supported: {_REFUSED_ACTIONS[name]}",
                           "use SCMP_ACT_ERRNO or SCMP_ACT_KILL_PROCESS")
    if name not in _ACTIONS:
        raise ProfileError(f"{where}: unknown action {name!r}",
                           f"use one of {', '.join(sorted(_ACTIONS))}")
    return name


def normalize(profile: Any) -> dict:
    """Validate a Docker profile or OCI ``linux.seccomp`` object and return a plain form:

    ``{"defaultAction", "defaultErrnoRet", "architectures": [native], "syscalls": [{"names",
    "action", "errnoRet", "args": [{"index", "value", "valueTwo", "op"}]}]}`` with includes/excludes
    already evaluated and every listed name known (or knowingly skipped). Idempotent.
    """
    if not isinstance(profile, dict):
        raise ProfileError(f"expected a JSON object, got {type(profile).__name__}")
    if "linux" in profile:  # a whole OCI runtime config.json
        linux = profile["linux"]
        if not isinstance(linux, dict) or not isinstance(linux.get("seccomp"), dict):
            raise ProfileError("an OCI config must have a linux.seccomp object")
        profile = linux["seccomp"]
    if _NATIVE_SCMP_ARCH is None:
        raise ProfileError(f"seccomp filters are not supported on {_ARCH}",
                           "run zygote on x86_64 or aarch64")
    known_keys = {"defaultAction", "defaultErrnoRet", "architectures", "archMap", "syscalls",
                  "flags", "listenerPath", "listenerMetadata", "comment"}
    unknown = set(profile) - known_keys
    if unknown:
        raise ProfileError(f"unknown top-level keys {sorted(unknown)}",
                           f"a profile has {', '.join(sorted(known_keys))}")
    if profile.get("listenerPath"):
        raise ProfileError("listenerPath is not supported (no seccomp user-notification listener)")
    if "defaultAction" not in profile:
        raise ProfileError("missing defaultAction", "add e.g. \"defaultAction\": \"SCMP_ACT_ERRNO\"")
    default = _action(profile["defaultAction"], "defaultAction")
    default_errno = _int(profile.get("defaultErrnoRet", _errno.EPERM), "defaultErrnoRet", 0, 4095)

    arches = list(profile.get("architectures") or [])
    for entry in profile.get("archMap") or []:
        if not isinstance(entry, dict) or "architecture" not in entry:
            raise ProfileError(f"archMap: expected objects with 'architecture', got {entry!r}")
        arches.append(entry["architecture"])
        arches.extend(entry.get("subArchitectures") or [])
    for a in arches:
        if a not in _KNOWN_ARCHES:
            raise ProfileError(f"unknown architecture {a!r}",
                               f"this host is {_NATIVE_SCMP_ARCH}; only it is compiled in")

    flags = profile.get("flags") or []
    if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        raise ProfileError(f"flags: expected a list of SECCOMP_FILTER_FLAG_* names, got {flags!r}")

    rules = profile.get("syscalls") or []
    if not isinstance(rules, list):
        raise ProfileError("syscalls: expected a list of rules")
    out_rules = []
    for i, rule in enumerate(rules):
        where = f"syscalls[{i}]"
        if not isinstance(rule, dict):
            raise ProfileError(f"{where}: expected an object, got {rule!r}")
        extra = set(rule) - {"names", "name", "action", "errnoRet", "args", "comment", "includes",
                             "excludes"}
        if extra:
            raise ProfileError(f"{where}: unknown keys {sorted(extra)}")
        names = list(rule.get("names") or []) + ([rule["name"]] if rule.get("name") else [])
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ProfileError(f"{where}: expected a non-empty 'names' list of syscall names")
        action = _action(rule.get("action"), f"{where}.action")
        errno_ret = _int(rule.get("errnoRet", _errno.EPERM), f"{where}.errnoRet", 0, 4095)
        args, seen = [], set()
        for j, a in enumerate(rule.get("args") or []):
            aw = f"{where}.args[{j}]"
            if not isinstance(a, dict) or set(a) - {"index", "value", "valueTwo", "op"}:
                raise ProfileError(f"{aw}: expected an object with index, value, valueTwo, op")
            idx = _int(a.get("index"), f"{aw}.index", 0, 5)
            if idx in seen:
                raise ProfileError(f"{aw}: a second condition on argument {idx} in one rule",
                                   "libseccomp cannot AND two conditions on one argument; "
                                   "express it as separate rules with their own actions")
            seen.add(idx)
            if a.get("op") not in _OPS:
                raise ProfileError(f"{aw}: unknown operator {a.get('op')!r}",
                                   f"use one of {', '.join(sorted(_OPS))}")
            args.append({"index": idx, "value": _int(a.get("value", 0), f"{aw}.value"),
                         "valueTwo": _int(a.get("valueTwo", 0), f"{aw}.valueTwo"), "op": a["op"]})
        if not _applies(rule, where):
            continue
        allows = _ACTIONS[action](0) in (_RET_ALLOW, _RET_LOG)
        kept = []
        for n in names:
            try:
                _resolve(n)
            except KeyError:
                if allows:
                    continue  # an allow-list entry nobody can name only denies more
                raise ProfileError(f"{where}: unknown syscall {n!r} in a {action} rule",
                                   "fix the name; a deny rule for an unknown name would not deny "
                                   "anything") from None
            kept.append(n)
        if kept:
            out_rules.append({"names": kept, "action": action, "errnoRet": errno_ret, "args": args})
    return {"defaultAction": default, "defaultErrnoRet": default_errno,
            "architectures": [_NATIVE_SCMP_ARCH], "syscalls": out_rules}


# ---- compiling ----------------------------------------------------------------------------------

def compile_profile(profile: dict, newest: int = NEWEST_REVIEWED) -> bytes:
    """Compile a profile (raw or normalised) to a classic-BPF program: ``struct sock_filter[]``.

    Only the native architecture is in the filter; other ABIs get KILL_PROCESS. When the
    default action allows, syscall numbers above ``newest`` get ENOSYS (what runc does too: a
    caller falls back as on an older kernel), from a few instructions put before libseccomp's
    program (``_ceiling``).

    Raises:
        ProfileError: the profile is invalid or libseccomp refused a rule.
    """
    p = normalize(profile)
    sc = _libseccomp()
    default = _ACTIONS[p["defaultAction"]](p["defaultErrnoRet"])
    try:
        filt = sc.SyscallFilter(default)
        filt.set_attr(sc.Attr.ACT_BADARCH, _RET_KILL_PROCESS)
    except OSError as e:
        raise ProfileError(f"libseccomp refused the default action: {e.strerror}",
                           errno=e.errno or 0) from None
    for i, rule in enumerate(p["syscalls"]):
        action = _ACTIONS[rule["action"]](rule["errnoRet"])
        if action == default:
            continue  # libseccomp refuses these (EACCES); they change nothing
        conds = [sc.Arg(a["index"], _OPS[a["op"]], a["value"], a["valueTwo"]) for a in rule["args"]]
        for name in rule["names"]:
            nr = _resolve(name)
            if nr is None:
                continue  # exists, but not on this architecture
            try:
                filt.add_rule(action, nr, *conds)
            except OSError as e:
                raise ProfileError(f"syscalls[{i}]: libseccomp refused the rule for {name!r}: "
                                   f"{e.strerror}", errno=e.errno or 0) from None
    # seccomp_export_bpf writes to an fd; a memfd has no pipe-buffer limit to deadlock on.
    fd = os.memfd_create("zygote-seccomp", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "rb", closefd=True) as f:
            filt.export_bpf(f)
        size = os.fstat(fd).st_size
        bpf = os.pread(fd, size, 0)
    except OSError as e:
        raise ProfileError(f"libseccomp could not export the filter: {e.strerror}",
                           errno=e.errno or 0) from None
    finally:
        os.close(fd)
    if default in (_RET_ALLOW, _RET_LOG):
        bpf = _ceiling(newest) + bpf
    if not bpf or len(bpf) % _SOCK_FILTER_SIZE or len(bpf) // _SOCK_FILTER_SIZE > _BPF_MAXINSNS:
        raise ProfileError(f"the compiled filter has {len(bpf)} bytes, not 1..{_BPF_MAXINSNS} "
                           f"instructions", "make the profile smaller")
    return bpf


# Classic BPF (include/uapi/linux/filter.h, bpf_common.h) and struct seccomp_data's offsets.
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_JGE_K, _BPF_JGT_K, _BPF_RET_K = 0x20, 0x15, 0x35, 0x25, 0x06
_DATA_NR, _DATA_ARCH = 0, 4
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_X32_SYSCALL_BIT = 0x40000000


def _ceiling(newest: int) -> bytes:
    """Instructions to run before libseccomp's program: a native call numbered above
    ``newest`` returns ENOSYS; anything else goes on to that program (which kills other ABIs;
    on x86_64 x32 numbers too, which carry a bit above any native number; aarch64 has no such
    ABI, and a number that high gets the profile's answer there, then the kernel's ENOSYS).
    Jumps in classic BPF are relative, so the program after needs no change."""
    def ins(code: int, jt: int, jf: int, k: int) -> bytes:
        return struct.pack("=HBBI", code, jt, jf, k)
    return b"".join((
        ins(_BPF_LD_W_ABS, 0, 0, _DATA_ARCH),
        ins(_BPF_JEQ_K, 0, 4, _AUDIT_ARCH[_ARCH]),           # another ABI: to libseccomp's program
        ins(_BPF_LD_W_ABS, 0, 0, _DATA_NR),
        ins(_BPF_JGE_K, 2, 0, _X32_SYSCALL_BIT),             # x32 (x86_64): likewise (it kills)
        ins(_BPF_JGT_K, 0, 1, newest),
        ins(_BPF_RET_K, 0, 0, _RET_ERRNO | _errno.ENOSYS),
    ))


_cache: dict[tuple, bytes] = {}


def compile_cached(name_or_path: str) -> bytes:
    """``compile_profile(load_profile(name_or_path))``, remembered per file (path, size, mtime)."""
    path = _profile_path(name_or_path)
    try:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    except OSError:
        key = (str(path),)
    bpf = _cache.get(key)
    if bpf is None:
        bpf = _cache[key] = compile_profile(load_profile(name_or_path))
    return bpf


def prepare(profile: str | None) -> bytes:
    """Daemon side verb: the BPF for a pool's or request's profile; b"" for None / "unconfined"."""
    if profile in (None, "", "unconfined"):
        return b""
    return compile_cached(profile)


# ---- child side ---------------------------------------------------------------------------------

_SOCK_FILTER_SIZE = 8      # struct sock_filter { u16 code; u8 jt; u8 jf; u32 k; }
_BPF_MAXINSNS = 4096       # include/uapi/linux/bpf_common.h: the kernel's limit per program
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
PR_GET_NO_NEW_PRIVS = 39


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def apply(bpf: bytes) -> None:
    """Child side: load a program from ``compile_profile`` into this process, irrevocably.

    Sets no_new_privs first when it is not set yet: seccomp(2) refuses an unprivileged filter
    without it (EACCES), and no_new_privs is what stops a setuid exec from outliving the filter.
    Uses SECCOMP_FILTER_FLAG_TSYNC: the child should be single-threaded (clone copies only the
    calling thread), and TSYNC turns that assumption into a check — if any other thread existed
    the load fails instead of leaving that thread unfiltered.

    Raises:
        SetupError("seccomp", ...): the program is malformed or the kernel refused it.
    """
    n = len(bpf)
    if n == 0 or n % _SOCK_FILTER_SIZE or n // _SOCK_FILTER_SIZE > _BPF_MAXINSNS:
        raise SetupError(STEP, f"malformed BPF program of {n} bytes", _errno.EINVAL,
                         "compile it with zygote.layers.seccomp.compile_profile")
    if _sys.libc.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1:
        if _sys.libc.prctl(_sys.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise SetupError(STEP, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}", err,
                             "the host's own seccomp policy forbids prctl; in Docker use "
                             "--security-opt seccomp=docker/seccomp-zygote.json")
    buf = ctypes.create_string_buffer(bpf, n)
    prog = _SockFprog(n // _SOCK_FILTER_SIZE, ctypes.cast(buf, ctypes.c_void_p))
    try:
        ret = _sys.syscall("seccomp", SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC,
                           ctypes.byref(prog))
    except OSError as e:
        raise SetupError(STEP, f"seccomp(SECCOMP_SET_MODE_FILTER): {e.strerror}", e.errno or 0,
                         _HINTS.get(e.errno, "")) from None
    if ret != 0:  # TSYNC: the id of a thread that could not take the filter
        raise SetupError(STEP, f"seccomp: thread {ret} could not be synchronised", _errno.EBUSY,
                         "the child must be single-threaded when the filter is loaded")


_HINTS = {
    _errno.EINVAL: "the kernel lacks CONFIG_SECCOMP_FILTER, or the program is invalid for it",
    _errno.ENOSYS: "the kernel lacks seccomp, or a container's own seccomp policy hides it; in "
                   "Docker use --security-opt seccomp=docker/seccomp-zygote.json",
    _errno.EACCES: "no_new_privs is not set and the process lacks CAP_SYS_ADMIN",
    _errno.ENOMEM: "too many stacked filters (the kernel caps their total at 32768 instructions); "
                   "the container runtime's own filter plus this one may be too large",
    _errno.EPERM: "a container's own seccomp policy forbids seccomp(2); in Docker use "
                  "--security-opt seccomp=docker/seccomp-zygote.json",
}
