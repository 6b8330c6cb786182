"""`zygote run`: exit statuses follow the shell's conventions; stdio passes straight through."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

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


# ---- a terminal: `zygote run` in its foreground process group -----------------------------------

_STARTED: list[subprocess.Popen] = []


def _as_a_login(_=None) -> None:
    """In the child, before exec: the terminal's signals at their defaults, as for a shell a
    terminal starts. (A suite run in the background of a non-interactive shell, as CI may be,
    inherits SIGINT and SIGQUIT ignored; a shell that ignored SIGINT from its start cannot
    catch it, and went on with its loop after Ctrl-C.)"""
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_DFL)


@pytest.fixture(autouse=True)
def _end_what_a_test_started():
    """A terminal test that fails midway leaves its `zygote run` (and its payload) running: end it
    here, as its user would (SIGTERM is forwarded to the child), then by force, and reap it."""
    yield
    while _STARTED:
        p = _STARTED.pop()
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _at_terminal(argv: list[str]):
    """Start ``argv`` with a fresh pty as its controlling terminal (its own session, so it is the
    terminal's foreground process group, as a program started from a shell). Returns (Popen,
    master fd); the test's teardown ends the process if the test did not."""
    import fcntl
    import pty
    import termios
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                             preexec_fn=lambda: _as_a_login(fcntl.ioctl(0, termios.TIOCSCTTY, 0)))
    finally:
        os.close(slave)
    _STARTED.append(p)
    return p, master


class _Screen:
    """What was written to a pty, read from its master as it comes."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.out = b""

    def read_for(self, seconds: float) -> None:
        import select
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if select.select([self.master], [], [], min(left, 0.1))[0]:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # EIO: every writer closed its end
                    return
                if not data:
                    return
                self.out += data

    def wait_for(self, text: bytes, seconds: float = 60) -> None:
        end = time.monotonic() + seconds
        while text not in self.out and time.monotonic() < end:
            self.read_for(0.1)
        assert text in self.out, self.out.decode(errors="replace")

    def finish(self, p: subprocess.Popen, seconds: float = 60) -> int:
        """Read until ``p`` ends; its exit status (the pty is closed after)."""
        try:
            end = time.monotonic() + seconds
            while p.poll() is None and time.monotonic() < end:
                self.read_for(0.1)
            if p.poll() is None:
                p.kill()
                p.wait()
                raise AssertionError("still running:\n" + self.out.decode(errors="replace"))
            self.read_for(0.3)
            return p.returncode
        finally:
            os.close(self.master)


_HANDLES_SIGINT = """\
import os, signal, sys, time
def on(signum, frame):
    print("payload: got", signal.Signals(signum).name, flush=True)
    if signum == signal.SIGINT:
        sys.exit(7)
signal.signal(signal.SIGINT, on)
signal.signal(signal.SIGWINCH, on)
print("payload: waiting", flush=True)
time.sleep(60)
print("payload: no signal came", flush=True)
"""


def test_ctrl_c_and_a_resize_at_a_terminal_reach_the_payload(tmp_path):
    """Children have sessions of their own, so the terminal's signals reach only `zygote run`
    (the terminal's foreground group): it forwards them to the child. A resize (SIGWINCH: full-screen
    programs redraw) reaches the payload's handler; so does Ctrl-C (SIGINT), and the payload's exit
    status is the command's, with no KeyboardInterrupt traceback (neither `zygote run`'s nor its
    embedded daemon's or zygote's: those have a session of their own).

    The resize comes first for a second reason: the payload may print before `zygote run` has the
    daemon's word that it started, and a Ctrl-C in that window ends `zygote run` and the child
    being made (_SignalProxy) instead of reaching the payload; a resize in that window is held and
    forwarded once the child is known, so its arrival says the window is over."""
    import fcntl
    import struct
    import termios
    script = tmp_path / "p.py"
    script.write_text(_HANDLES_SIGINT)
    p, master = _at_terminal([*ZYGOTE, "run", "--python", str(script)])
    screen = _Screen(master)
    screen.wait_for(b"payload: waiting")
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))  # the kernel sends SIGWINCH
    screen.wait_for(b"payload: got SIGWINCH", seconds=20)
    os.write(master, b"\x03")  # Ctrl-C
    rc = screen.finish(p)
    text = screen.out.decode(errors="replace")
    assert rc == 7, text
    assert "payload: got SIGINT" in text and "no signal came" not in text, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text


_SPOILS_THE_TERMINAL = """\
import fcntl, os, termios
a = termios.tcgetattr(0)
a[3] &= ~(termios.ECHO | termios.ICANON)
termios.tcsetattr(0, termios.TCSANOW, a)
fcntl.fcntl(0, fcntl.F_SETFL, fcntl.fcntl(0, fcntl.F_GETFL) | os.O_NONBLOCK)
fcntl.ioctl(0, termios.TIOCEXCL)
print("payload: spoiled", flush=True)
"""


def test_what_a_child_sets_on_the_terminal_does_not_outlive_it(tmp_path):
    """`zygote run` shares its terminal with the child (its stdin, and its stdout and stderr
    without max_output_bytes): the child's O_NONBLOCK on the shared file description (the shell's
    next read failed with EAGAIN), its termios modes (echo and line editing off) and TIOCEXCL
    (nobody but root could open the terminal) outlived it (a helper's review). Each is put back
    once the child ended. Fails without _TerminalState (all three stay)."""
    import fcntl
    import pty
    import termios
    from zygote.cli import _TerminalState
    script = tmp_path / "p.py"
    script.write_text(_SPOILS_THE_TERMINAL)
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    assert before[3] & termios.ECHO and before[3] & termios.ICANON
    try:
        p = subprocess.Popen([*ZYGOTE, "run", "--python", str(script)], stdin=slave, stdout=slave, stderr=slave,
                             start_new_session=True,
                             preexec_fn=lambda: _as_a_login(fcntl.ioctl(0, termios.TIOCSCTTY, 0)))
        _STARTED.append(p)
        screen = _Screen(os.dup(master))
        assert screen.finish(p) == 0, screen.out.decode(errors="replace")
        assert b"payload: spoiled" in screen.out, screen.out
        assert not fcntl.fcntl(slave, fcntl.F_GETFL) & os.O_NONBLOCK  # (the same open file description)
        assert termios.tcgetattr(slave) == before
        assert not _TerminalState((slave,)).saved[0][3], "the terminal stayed exclusive"
    finally:
        os.close(master)
        os.close(slave)


def test_ctrl_c_at_a_terminal_ends_a_program_that_does_not_handle_it_and_zygote_run_by_sigint():
    """A program with SIGINT's default action dies of it, and `zygote run` then dies of SIGINT
    too (not exit 130): bash stops a loop only for a command that died of SIGINT."""
    rc, text = _ctrl_c_once_started([*ZYGOTE, "run", "--", "sh", "-c", "echo started 1; exec sleep 60"])
    assert rc == -signal.SIGINT, text
    assert "Traceback" not in text, text


def _ctrl_c_once_started(argv: list[str]) -> tuple[int, str]:
    """Run ``argv`` at a terminal, press Ctrl-C once "started 1" is shown (and its sleep is
    exec'd); its exit status and the screen."""
    p, master = _at_terminal(argv)
    screen = _Screen(master)
    screen.wait_for(b"started 1")
    time.sleep(0.3)  # (the exec of sleep)
    os.write(master, b"\x03")
    rc = screen.finish(p, seconds=60)
    return rc, screen.out.decode(errors="replace")


def test_ctrl_c_ends_a_shell_loop_of_zygote_runs():
    """bash (no job control: the loop and `zygote run` share the terminal's foreground group)
    goes on with a loop after a command that exited 130, as if it had handled Ctrl-C, and ends
    it only when the command died of SIGINT: so `zygote run` must die of it."""
    loop = f"for i in 1 2; do {' '.join(ZYGOTE)} run -- sh -c 'echo started $0; exec sleep 60' $i; echo after $i: status $?; done"
    rc, text = _ctrl_c_once_started(["bash", "-c", loop])
    assert rc == -signal.SIGINT and "after 1" not in text and "started 2" not in text, text


class _FakeChild:
    """What _SignalProxy forwards to: the signals it was sent, in order."""

    returncode = None

    def __init__(self) -> None:
        self.sent: list[int] = []

    def send_signal(self, signum: int) -> None:
        self.sent.append(signum)


def test_a_resize_during_the_spawn_is_forwarded_once_the_child_is_known():
    """spawn_child returns after the payload started (it may have printed already): a SIGWINCH
    that came before `zygote run` knew its child is forwarded then, not lost (a CI run lost one)."""
    from zygote.cli import _SignalProxy

    proxy = _SignalProxy()
    proxy._on_signal(signal.SIGWINCH, None)
    proxy._on_signal(signal.SIGWINCH, None)  # (one redraw is enough)
    proxy._on_signal(signal.SIGCONT, None)
    child = _FakeChild()
    proxy.started(child)
    assert child.sent == [signal.SIGWINCH, signal.SIGCONT]
    proxy._on_signal(signal.SIGWINCH, None)
    assert child.sent == [signal.SIGWINCH, signal.SIGCONT, signal.SIGWINCH]
    with pytest.raises(BaseException) as e:  # an ending signal before the child: 128+signum
        _SignalProxy()._on_signal(signal.SIGINT, None)
    assert e.value.signum == signal.SIGINT


def test_a_signal_during_a_forward_waits_for_it():
    """A handler runs on the main thread between two bytecodes of what it interrupted: one that
    comes while a forward is under way (its client call holds a lock that is not reentrant)
    must not forward inside it, but right after it."""
    from zygote.cli import _SignalProxy

    proxy = _SignalProxy()

    class Child(_FakeChild):
        inside = False

        def send_signal(self, signum: int) -> None:
            assert not self.inside, "a forward inside a forward"
            self.inside = True
            try:
                if not self.sent:
                    proxy._on_signal(signal.SIGWINCH, None)  # (as a handler would, mid-call)
                    proxy._on_signal(signal.SIGTSTP, None)  # Ctrl-Z now is dropped, not nested
                super().send_signal(signum)
            finally:
                self.inside = False

    proxy.started(Child())
    proxy._on_signal(signal.SIGINT, None)
    assert proxy.child.sent == [signal.SIGINT, signal.SIGWINCH]


_JOB_SHELL = """\
# A job-control shell in miniature: runs argv in a process group of its own as the terminal's
# foreground job; reports when it stops; on b"fg" from the test resumes it in the foreground.
import os, signal, subprocess, sys
signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # (tcsetpgrp from the background)
p = subprocess.Popen(sys.argv[1:], process_group=0)
os.tcsetpgrp(0, p.pid)
while True:
    _, status = os.waitpid(p.pid, os.WUNTRACED)
    if os.WIFSTOPPED(status):
        os.tcsetpgrp(0, os.getpgrp())
        print("shell: stopped by", signal.Signals(os.WSTOPSIG(status)).name, flush=True)
        assert sys.stdin.readline() == "fg\\n"
        os.tcsetpgrp(0, p.pid)
        os.killpg(p.pid, signal.SIGCONT)
        print("shell: continued", flush=True)
        continue
    print("shell: exit", os.waitstatus_to_exitcode(status), flush=True)
    break
"""

_TICKS = """\
import itertools, sys, time
for i in itertools.count():
    print("tick", i, flush=True)
    time.sleep(0.1)
"""


def test_ctrl_z_stops_the_child_and_fg_resumes_it(tmp_path):
    """Ctrl-Z at a job-control shell: `zygote run` stops its child, then itself (the shell sees a
    stopped job); the shell's SIGCONT (fg) resumes both. Then Ctrl-C ends it (by SIGINT)."""
    shell, ticks = tmp_path / "shell.py", tmp_path / "ticks.py"
    shell.write_text(_JOB_SHELL)
    ticks.write_text(_TICKS)
    for args in (["--python", str(ticks)], ["--", "python3", "-c", _TICKS]):  # PID 1 / under the reaper
        p, master = _at_terminal([sys.executable, str(shell), *ZYGOTE, "run", *args])
        screen = _Screen(master)
        screen.wait_for(b"tick 3")
        os.write(master, b"\x1a")  # Ctrl-Z
        screen.wait_for(b"shell: stopped by", seconds=20)
        screen.read_for(0.3)
        before = screen.out.count(b"tick")
        screen.read_for(0.5)  # (a tick every 0.1 s if it ran: five)
        assert screen.out.count(b"tick") == before, (args, screen.out.decode(errors="replace"))  # stopped
        os.write(master, b"fg\n")
        screen.wait_for(b"shell: continued", seconds=20)
        end = time.monotonic() + 10
        while screen.out.count(b"tick") <= before + 3 and time.monotonic() < end:
            screen.read_for(0.1)
        assert screen.out.count(b"tick") > before + 3, screen.out.decode(errors="replace")  # running again
        os.write(master, b"\x03")
        screen.wait_for(b"shell: exit", seconds=30)
        rc = screen.finish(p)
        text = screen.out.decode(errors="replace")
        assert rc == 0 and "shell: exit -2" in text, text
        assert "zygote" not in text, text  # no traceback of ours (the python3 payload prints its own)


def test_the_embedded_daemon_has_a_session_of_its_own():
    """An embedded daemon (and its zygotes) must not share its caller's session: the terminal's
    signals are for the caller's program, and `zygote run` forwards them to the child itself."""
    from zygote_client import Client
    with Client.embedded() as c:
        daemon_pid = c.status().daemon_pid
        assert os.getsid(daemon_pid) != os.getsid(0)
        assert os.getsid(daemon_pid) == daemon_pid  # its own session, not some other one
