"""Resource limits, child side: setrlimit for each (resource, soft, hard) the daemon computed.

Always includes RLIMIT_CORE = 1 byte (no core files with the sandbox's memory: a file needs a
page; and the kernel refuses a core_pattern pipe at exactly 1, while it ignores 0 for a pipe, so
a payload that made itself dumpable and crashed ran the host's crash handler, as root, outside
its cgroup, with its memory on stdin: a helper's review), and RLIMIT_NPROC =
DEFAULT_PROCESSES when the child has no ``pids`` limit (a cgroup's): the kernel counts a task's
processes and threads per user *in its user namespace*, which is the child's own, so this bounds
one child's fork bomb without a cgroup (the host's pid_max is often 32768, shared by everything).
RLIMIT_CPU is per process, so for ``cpu_time`` it is only a backstop: the daemon holds the whole
child (every process) to ``cpu_time`` from its cgroup's usage (``Daemon._cpu_guard``). Limits are
set before the privilege drop because raising a hard limit needs CAP_SYS_RESOURCE; lowering never
does.
"""

from __future__ import annotations

import resource

from . import SetupError

NAMES = {
    resource.RLIMIT_AS: "address space", resource.RLIMIT_CPU: "cpu_time", resource.RLIMIT_FSIZE: "file_size",
    resource.RLIMIT_NOFILE: "open_files", resource.RLIMIT_NPROC: "processes", resource.RLIMIT_CORE: "core",
}


DEFAULT_PROCESSES = 1024  # processes and threads of a child without a pids limit


def cpu_seconds(cpu_time: float) -> tuple[int, int]:
    """RLIMIT_CPU's (soft, hard) for ``cpu_time``: soft at the limit rounded up (SIGXCPU), hard one
    second later (SIGKILL). Whole seconds: the kernel's unit for it."""
    soft = max(1, int(-(-cpu_time // 1)))
    return soft, soft + 1


def plan(*, cpu_time: float | None = None, file_size: int | None = None, open_files: int | None = None,
         address_space: int | None = None, pids: int | None = None) -> list[tuple[int, int, int]]:
    """Daemon side: the rlimit triples for a request (``pids``: its cgroup's limit, if any)."""
    out = [(resource.RLIMIT_CORE, 1, 1)]  # (1, not 0: see the module docstring)
    if pids is None:  # (with one, the cgroup refuses first and reports pids_exceeded)
        out.append((resource.RLIMIT_NPROC, DEFAULT_PROCESSES, DEFAULT_PROCESSES))
    if cpu_time is not None:
        out.append((resource.RLIMIT_CPU, *cpu_seconds(cpu_time)))
    if file_size is not None:
        out.append((resource.RLIMIT_FSIZE, file_size, file_size))
    if open_files is not None:
        out.append((resource.RLIMIT_NOFILE, open_files, open_files))
    if address_space is not None:
        out.append((resource.RLIMIT_AS, address_space, address_space))
    return out


def apply(limits: list[tuple[int, int, int]]) -> None:
    for res, soft, hard in limits:
        try:
            resource.setrlimit(res, (soft, hard))
        except (OSError, ValueError) as e:
            raise SetupError("rlimits", f"setrlimit({NAMES.get(res, res)}, {soft}, {hard}): {e}",
                             getattr(e, "errno", 0) or 0) from None
