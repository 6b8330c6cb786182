"""`zygote run`: exit statuses follow the shell's conventions; stdio passes straight through."""

from __future__ import annotations

import subprocess
import sys

ZYGOTE = [sys.executable, "-m", "zygote"]


def run(*args: str, input: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*ZYGOTE, "run", *args], input=input, capture_output=True, timeout=timeout)


def test_echo():
    r = run("--", "/bin/echo", "hi")
    assert (r.returncode, r.stdout) == (0, b"hi\n")


def test_exit_code():
    assert run("--", "sh", "-c", "exit 3").returncode == 3


def test_sigsegv_is_139():
    assert run("--", "sh", "-c", "kill -SEGV $$").returncode == 139


def test_python_file_signalling_itself(tmp_path):
    """A script is PID 1 of its namespace by default (its own SIGTERM does not end it);
    --reaper puts a reaper in front and the script dies of the signal (exit 128+15)."""
    script = tmp_path / "self.py"
    script.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\nprint('still here')\n")
    plain = run("--python", str(script))
    assert (plain.returncode, plain.stdout) == (0, b"still here\n"), plain.stderr
    reaped = run("--reaper", "--python", str(script))
    assert (reaped.returncode, reaped.stdout) == (143, b""), reaped.stderr


def test_missing_program_is_127():
    r = run("--", "/no/such/program")
    assert r.returncode == 127
    assert b"not found" in r.stderr


def test_timeout_is_124():
    r = run("--timeout", "1", "--", "sleep", "30", timeout=20)
    assert r.returncode == 124


def test_stdin_passes_through():
    assert run("--", "cat", input=b"through\n").stdout == b"through\n"


def test_python_file(tmp_path):
    f = tmp_path / "prog.py"
    f.write_text("import sys\nprint('args', sys.argv[1:])\nsys.exit(4)\n")
    r = run("--preload", "json", "--python", str(f), "x", "y")
    assert r.returncode == 4
    assert r.stdout == b"args ['x', 'y']\n"


def test_nothing_to_run_is_usage_error():
    assert run().returncode == 2


def test_memory_flag_kills_hog():
    r = run("--memory", "50M", "--", "python3", "-c", "b = bytearray(200 << 20); print('survived')")
    assert r.returncode == 137 and b"survived" not in r.stdout


def test_bad_limit_is_usage_error():
    assert run("--memory", "lots", "--", "/bin/true").returncode == 2


def test_max_output_into_a_socket_stdout():
    """With --max-output the daemon writes the counted output itself, never into a socket (the
    receiver would see the daemon as its sender): `zygote run` copies through a pipe of its own,
    so a stdout that is a socket (a journal stream) still gets everything."""
    import socket

    ours, theirs = socket.socketpair()
    p = subprocess.Popen([*ZYGOTE, "run", "--max-output", "1M", "--", "sh", "-c", "echo out; echo err >&2"],
                         stdout=theirs, stderr=theirs)
    theirs.close()
    ours.settimeout(60)
    data = b""
    try:
        while chunk := ours.recv(4096):
            data += chunk
    finally:
        ours.close()
    assert p.wait(timeout=60) == 0
    assert sorted(data.splitlines()) == [b"err", b"out"]
