"""Container entrypoint for the zygote daemon: make the cgroup tree writable, shed every capability
the daemon does not need, then exec `zygote serve` with the given arguments.

Why a separate step: Docker and Kubernetes mount /sys/fs/cgroup read-only in unprivileged containers.
Remounting it read-write needs CAP_SYS_ADMIN, which the long-running daemon must not keep. So the
container is granted SYS_ADMIN for this one remount; the daemon runs with DAEMON_CAPS only (the
bounding set is cut too, so nothing it execs can regain the others).

Not run in a real container on the machine this was written on (no Docker engine there); the
capability set and the seccomp profile are exercised by tests/test_docker_files.py on the host.
"""

from __future__ import annotations

import ctypes
import os
import sys

import prctl

# What the daemon needs, and why (README in this directory has the long form):
DAEMON_CAPS = {
    "SETUID": "write a child's uid_map to an unprivileged host id range (not the daemon's own id)",
    "SETGID": "the same for gid_map, and setgroups([]) in the zygote",
    "DAC_OVERRIDE": "create directories in cgroupfs, whose roots are mode 0555 on many hosts",
    "NET_ADMIN": "veth pairs, addresses and the nftables egress policy for networked children",
}

# Capability numbers from linux/capability.h, by name.
_CAP_NAMES = ["CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
              "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
              "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
              "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
              "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
              "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE"]

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT, _MS_BIND = 1, 2, 4, 8, 32, 4096
_ST_RDONLY = 1
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4


def remount_cgroup_rw(path: str = "/sys/fs/cgroup") -> bool:
    """Clear the read-only flag of the container's cgroup mount; True if a remount was done."""
    if not os.statvfs(path).f_flag & _ST_RDONLY:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    flags = _MS_REMOUNT | _MS_BIND | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    if libc.mount(None, path.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise SystemExit(f"zygote entrypoint: cannot remount {path} read-write: {os.strerror(err)} "
                         "(fix: grant CAP_SYS_ADMIN to the container and run it with apparmor=unconfined, "
                         "or run the daemon without cgroup limits)")
    return True


def drop_to(keep: set[str]) -> None:
    """Cut the bounding set to ``keep`` and empty the inheritable and ambient sets; root's next
    exec then starts with exactly these.

    The inheritable set matters: at exec, root gets inheritable | (bounding & all), so a
    capability left inheritable survives the bounding cut (runtimes before the CVE-2022-24769
    fixes, e.g. Docker < 20.10.14, put the container's capabilities there)."""
    unknown = keep - set(_CAP_NAMES)
    if unknown:
        raise ValueError(f"unknown capabilities: {sorted(unknown)}")
    last = int(open("/proc/sys/kernel/cap_last_cap").read())
    for number, name in enumerate(_CAP_NAMES[: last + 1]):
        if name not in keep:
            prctl.capbset.drop(number)
    prctl.cap_inheritable.limit()  # no arguments: none kept
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_CAP_AMBIENT_CLEAR_ALL")


def main(argv: list[str]) -> None:
    if os.environ.get("ZYGOTE_REMOUNT_CGROUP", "1") == "1":
        remount_cgroup_rw()
    drop_to(set(DAEMON_CAPS))
    os.execvp("zygote", ["zygote", "serve", *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
