"""Shared fixtures: real daemons, real namespaces, no mocks of the kernel."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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
    return c._aclient._proc.pid  # the embedded daemon's pid (tests only)


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


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def socket_daemon(tmp_path):
    """A `zygote serve --socket` daemon in its own process; yields the socket path."""
    path = str(tmp_path / "zygote.sock")
    proc = subprocess.Popen([sys.executable, "-m", "zygote", "serve", "--socket", path, "--preload", "json"])
    deadline = time.monotonic() + 60
    while True:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            s.close()
            break
        except OSError:
            s.close()
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("daemon did not start")
            time.sleep(0.05)
    try:
        yield path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.returncode == 0, f"daemon exited {proc.returncode} on SIGTERM"
        assert not os.path.exists(path), "daemon left its socket file"
