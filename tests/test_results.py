"""The result channel: return values, remote exceptions, trusted pickles, caps, and who unpickles."""

from __future__ import annotations

import os
import sys
import time

import anyio
import pytest

from zygote_client import ChildFailed, Client, RemoteError, ResultError, SandboxConfig, open_embedded

from conftest import start_daemon, stop_daemon, wait_socket


@pytest.mark.parametrize("value", [
    {"a": 1, "nested": {"list": [1, 2.5, None, True, False], "text": "héllo ☃"}},
    [1, "two", 3.0, [], {}],
    "a string",
    -(2 ** 62),
    3.25,
    True,
    None,
])
def test_json_values_round_trip(client, value):
    assert client.call(lambda: value) == value


def test_args_kwargs_and_tuples_arrive_as_lists(client):
    def f(a, b, *, c):
        return (a, b, c)

    assert client.call(f, 1, "x", c={"k": [1]}) == [1, "x", {"k": [1]}]


def test_non_json_value_is_a_result_error_not_a_crash(client):
    r = client.run(lambda: {1, 2, 3})
    assert r.returncode == 0, r.stderr
    with pytest.raises(ResultError) as ei:
        r.value
    assert ei.value.reason == "unencodable"
    assert "set" in str(ei.value) and "trusted_results" in str(ei.value)
    assert not isinstance(ei.value, (RemoteError, ChildFailed))
    assert client.call(lambda: 7) == 7  # the daemon is fine


def test_trusted_results_round_trip_a_custom_object(client):
    class Point:
        def __init__(self, x, y):
            self.x, self.y = x, y

    def make():
        return Point(3, {4, 5})

    child = client.spawn_child(make, trusted_results=True)
    p = child.result(timeout=60)
    assert type(p).__name__ == "Point" and (p.x, p.y) == (3, {4, 5})
    assert client.run(make, trusted_results=True).value.x == 3


def test_raise_is_remote_error_with_the_remote_traceback(client):
    class QuotaError(Exception):
        pass

    def compute_the_answer(n):
        if n > 1:
            raise QuotaError(f"too many: {n}")

    with pytest.raises(RemoteError) as ei:
        client.call(compute_the_answer, 5)
    err = ei.value
    assert err.type_name.endswith("QuotaError")
    assert err.message == "too many: 5"
    assert "compute_the_answer" in err.traceback_text
    assert err.traceback_text.rstrip().endswith("QuotaError: too many: 5")
    assert "compute_the_answer" in str(err)  # the remote traceback is what the caller sees
    assert "zygote/child.py" not in err.traceback_text  # it starts at the payload


@pytest.mark.parametrize("profile", ["default", "strict"])
def test_results_under_every_seccomp_profile(client, profile):
    cfg = SandboxConfig(seccomp_profile=profile)
    assert client.run(lambda: {"ok": [1]}, sandbox_config=cfg).value == {"ok": [1]}
    with pytest.raises(RemoteError):
        client.run(lambda: 1 / 0, sandbox_config=cfg).value


def test_run_does_not_raise_value_does(client):
    r = client.run(lambda: 1 / 0)
    assert r.returncode == 1
    assert b"ZeroDivisionError" in r.stderr  # stderr still shows it, as before
    with pytest.raises(RemoteError) as ei:
        r.value
    assert ei.value.type_name == "ZeroDivisionError"


def test_builtin_exception_with_a_hostile_str(client):
    class Weird(Exception):
        def __str__(self):
            raise RuntimeError("no str for you")

    def payload():
        raise Weird()

    with pytest.raises(RemoteError) as ei:
        client.call(payload)
    assert ei.value.type_name.endswith("Weird")
    assert "unprintable" in ei.value.message


def test_sys_exit_has_no_result_and_keeps_the_code(client):
    r = client.run(lambda: sys.exit(3))
    assert r.returncode == 3
    with pytest.raises(ChildFailed) as ei:
        r.value
    assert ei.value.reason == "exit" and ei.value.status.returncode == 3
    with pytest.raises(ChildFailed):
        client.call(lambda: os._exit(0))


def test_killed_child_has_no_result(client):
    child = client.spawn_child(lambda: __import__("time").sleep(60))
    child.kill()
    with pytest.raises(ChildFailed) as ei:
        child.result(timeout=30)
    assert ei.value.reason == "signal" and ei.value.status.returncode == -9


def test_exec_child_has_no_result(client):
    child = client.spawn_child(_argv=[sys.executable, "-c", "pass"], stdin=None)
    with pytest.raises(ResultError) as ei:
        child.result(timeout=60)
    assert ei.value.reason == "no-result" and ei.value.status.returncode == 0


def test_garbage_on_the_result_pipe_is_invalid_and_harmless(client):
    def payload():
        import os
        os.write(5, b"not a result record at all")
        os._exit(0)

    with pytest.raises(ResultError) as ei:
        client.call(payload)
    assert ei.value.reason == "invalid"
    assert client.call(lambda: "still serving") == "still serving"


@pytest.mark.parametrize("record", [b"p", b"ABCDEFGH"], ids=["one-byte", "one-short-of-a-header"])
def test_SECURITY_a_result_shorter_than_its_header_cannot_take_the_daemon_down(client, record):
    """The result pipe is written by untrusted code: eight bytes (one short of a header) once
    made the daemon look up an empty kind and die with every child it held."""
    def payload():
        import os
        os.write(5, record)
        os._exit(0)

    with pytest.raises(ResultError) as ei:
        client.call(payload)
    assert ei.value.reason == "invalid"
    assert client.call(lambda: "still serving") == "still serving"


def test_oversize_result_is_dropped_and_the_child_is_not_blocked(client):
    t0 = time.monotonic()
    r = client.run(lambda: "x" * (17 << 20))  # past the default 16 MiB cap
    assert time.monotonic() - t0 < 30
    with pytest.raises(ResultError) as ei:
        r.value
    assert ei.value.reason == "too-large"
    assert client.call(lambda: [1]) == [1]


@pytest.fixture
def capped_client(tmp_path):
    """A socket daemon whose result cap is 4 KiB (``--max-result-bytes``)."""
    path = str(tmp_path / "z.sock")
    proc = start_daemon("--socket", path, "--max-result-bytes", "4K")
    try:
        wait_socket(path, proc)
        with Client.connect(path) as c:
            yield c
    finally:
        stop_daemon(proc)


def test_large_results_ending_together_reach_a_reading_client(client):
    """Eight results near the 16 MiB cap, ready at the same moment, are more than one
    connection's send queue (64 MiB): a client that reads them is not a slow reader and gets
    every one (it was dropped, and every child then ended "killed")."""
    def big(i):
        import sys
        sys.stdin.read(1)  # (all eight go at once, when the test says so)
        return str(i) * (15 << 20)

    children = [client.spawn_child(big, (i,)) for i in range(8)]
    for child in children:
        child.stdin.write(b"g")
        child.stdin.flush()
    for i, child in enumerate(children):
        value = child.result(timeout=120)
        assert len(value) == 15 << 20 and value[:1] == str(i)
    assert client.call(lambda: "still serving") == "still serving"


def test_a_result_larger_than_the_send_queue_reaches_its_client(tmp_path):
    """max_result_bytes may be set past the 64 MiB a connection may have waiting: the queue grows
    with it, so such a result is delivered, not taken for a slow reader (the client was dropped)."""
    path = str(tmp_path / "z.sock")
    proc = start_daemon("--socket", path, "--max-result-bytes", "100M")
    try:
        wait_socket(path, proc)
        with Client.connect(path) as c:
            assert len(c.call(lambda: "r" * (70 << 20))) == 70 << 20
    finally:
        stop_daemon(proc)


def test_result_cap_is_configurable(capped_client):
    assert capped_client.call(lambda: "y" * 4000) == "y" * 4000
    # A payload that keeps writing after the cap: its write fails (EPIPE), it does not hang.
    def flood():
        import os
        os.write(5, b"j" + (1 << 40).to_bytes(8, "big"))
        while True:
            os.write(5, b"z" * 65536)

    with pytest.raises(ResultError) as ei:
        capped_client.call(lambda: "y" * 5000)
    assert ei.value.reason == "too-large"
    child = capped_client.spawn_child(flood, stdin=None)
    with pytest.raises(ResultError) as ei:
        child.result(timeout=30)
    assert ei.value.reason == "too-large"
    assert child.returncode == 1  # BrokenPipeError in the payload once the daemon stopped reading


def test_SECURITY_results_daemon_never_unpickles(client, tmp_path):
    """Pickled result bytes pass the daemon unopened; a default client refuses them; only a client
    that opted in (trusted_results) loads them, in its own process."""
    marker = tmp_path / "unpickled-by"
    code = f"import os; open({str(marker)!r}, 'a').write(str(os.getpid()) + '\\n')"

    class Bomb:
        def __reduce__(self):
            return (exec, (code,))

    def forged_pickle():  # a hostile child writes a pickle record although nobody asked for one
        import os, pickle, struct
        body = pickle.dumps(Bomb())
        os.write(5, struct.pack("!cQ", b"p", len(body)) + body)
        os._exit(0)

    with pytest.raises(ResultError) as ei:
        client.call(forged_pickle)
    assert ei.value.reason == "undecodable"
    assert not marker.exists(), "a pickle from the child was loaded without trusted_results"

    # Opted in: the one process that loads the pickle is this one (never the daemon, pid differs).
    client.run(lambda: Bomb(), trusted_results=True).value
    assert marker.read_text().split() == [str(os.getpid())]
    from conftest import daemon_pid
    assert str(daemon_pid(client)) not in marker.read_text()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_async_call_and_result(backend):
    async def main():
        async with await open_embedded() as c:
            assert await c.call(lambda x: {"sq": x * x}, 7) == {"sq": 49}
            with pytest.raises(RemoteError) as ei:
                await c.call(lambda: [][1])
            assert ei.value.type_name == "IndexError"
            child = await c.spawn_child(lambda: 5)
            assert await child.result() == 5
            # cancelling a call kills its child
            with anyio.move_on_after(0.5):
                await c.call(lambda: __import__("time").sleep(60))
            assert await c.call(lambda: "after") == "after"

    anyio.run(main, backend=backend)


def test_call_forwards_output(client, capfd):
    def chatty():
        print("to stdout")
        print("to stderr", file=sys.stderr)
        return 1

    assert client.call(chatty) == 1
    out, err = capfd.readouterr()
    assert "to stdout" in out and "to stderr" in err


def test_SECURITY_results_held_for_one_user_are_capped(tmp_path, monkeypatch):
    """A payload may write its result record and go on running: the daemon holds the record
    until the child ends. What it holds for one peer uid is capped (RESULTS_PER_UID, 256 MiB;
    5 MiB here under test hooks): past it the next child's write waits, as on any full pipe,
    until a holder ends. Without the cap one user's children held max_result_bytes each (4 GiB
    at the defaults) in the daemon for as long as they liked."""
    import select

    monkeypatch.setenv("ZYGOTE_TEST_RESULTS_PER_UID", str(5 << 20))
    path = str(tmp_path / "z.sock")
    proc = start_daemon("--socket", path, "--preload", "json", "--test-hooks")

    def hold():
        import os
        import struct
        import time
        body = b'"' + b"r" * (2 << 20) + b'"'  # 2 MiB: more than a pipe holds, so the write waits
        view = memoryview(struct.pack("!cQ", b"j", len(body)) + body)
        while view:
            view = view[os.write(5, view):]
        os.close(5)
        print("wrote", flush=True)
        time.sleep(600)

    def said_wrote(kids, timeout):
        """Those of ``kids`` that print "wrote" within ``timeout`` seconds (all at once)."""
        ready, _, _ = select.select([k.stdout for k in kids], [], [], timeout)
        out = [k for k in kids if k.stdout in ready]
        assert all(k.stdout.readline() == b"wrote\n" for k in out)
        return out

    try:
        wait_socket(path, proc)
        with Client.connect(path) as c:
            kids = [c.spawn_child(hold, stdin=None) for _ in range(3)]
            try:
                done, deadline = [], time.monotonic() + 30
                while len(done) < 2 and time.monotonic() < deadline:
                    done += said_wrote([k for k in kids if k not in done], 1)
                assert len(done) == 2, f"{len(done)} of 3 records went in; the uid's budget holds two"
                waiting = [k for k in kids if k not in done]
                assert not said_wrote(waiting, 3), "a third record went past the uid's budget"
                done[0].kill()
                assert done[0].wait(timeout=30).returncode < 0
                assert len(done[0].result(timeout=30)) == 2 << 20  # its record, whole
                assert said_wrote(waiting, 30), "the waiting child got room once a holder ended"
            finally:
                for k in kids:
                    k.kill()
                    k.wait(timeout=30)
            assert c.call(lambda: "still serving") == "still serving"
    finally:
        stop_daemon(proc)


def test_SECURITY_a_result_header_claiming_the_budget_loses_no_siblings_result(tmp_path, monkeypatch):
    """Room for a result is taken at its header, for the length the header gives: a payload
    writing only a header that claims the whole budget made a sibling's small result (already
    in its pipe, the sibling ended) wait for room past the exit's grace, and it was lost ("the
    payload exited with code 0 without returning"). A child that ended waits for nothing."""
    monkeypatch.setenv("ZYGOTE_TEST_RESULTS_PER_UID", str(5 << 20))
    path = str(tmp_path / "z.sock")
    proc = start_daemon("--socket", path, "--preload", "json", "--test-hooks")

    def claim():
        import os
        import struct
        import time
        os.write(5, struct.pack("!cQ", b"j", 5 << 20))  # the header only: 5 MiB claimed, 9 bytes sent
        print("claimed", flush=True)
        time.sleep(600)

    try:
        wait_socket(path, proc)
        with Client.connect(path) as c:
            squatter = c.spawn_child(claim, stdin=None)
            try:
                assert squatter.stdout.readline() == b"claimed\n"
                time.sleep(0.5)  # (the daemon has read the header)
                assert c.call(lambda: 42) == 42
            finally:
                squatter.kill()
                squatter.wait(timeout=30)
    finally:
        stop_daemon(proc)


def test_a_callable_pickled_by_another_python_is_refused_not_run(client, monkeypatch):
    """cloudpickle sends a function defined by value (a lambda, one from __main__) as bytecode,
    which only its own Python version runs: a 3.11 client's lambda in a 3.12 zygote ran as
    garbage (the child died of SIGSEGV). The client says which Python pickled a callable; the
    daemon refuses one from another version, naming both. Targets and callables sent by name
    (no bytecode in the pickle) still run."""
    from zygote_client import DaemonError
    from zygote_client import _async
    monkeypatch.setattr(_async, "_PY", "3.99")
    with pytest.raises(DaemonError) as ei:
        client.call(lambda: 1)
    here = "%d.%d" % sys.version_info[:2]
    assert ei.value.code == "bad-request" and "3.99" in str(ei.value) and here in str(ei.value), ei.value
    assert client.run("builtins:len", ("abc",)).value == 3
    assert client.call(len, "abcd") == 4  # a callable sent by name holds no bytecode: it runs
    # nor does an argument holding the name of the type of bytecode (a scan of the pickle's bytes
    # for "CodeType" refused these)
    assert client.call(len, "CodeType") == 8
    assert client.call(len, [b"CodeType"]) == 1


def test_a_leased_child_refuses_a_callable_pickled_by_another_python(monkeypatch):
    """A leased child's Job comes from the client, which the daemon never sees: the child itself
    refuses a callable pickled by another Python version, before unpickling it."""
    from zygote_client import _async
    with Client.embedded(preload_imports=["json"], daemon_args=["--reserve", "1"], leases=1) as c:
        deadline = time.monotonic() + 30
        while not c._aclient._leases and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c._aclient._leases, "no child was leased"
        monkeypatch.setattr(_async, "_PY", "3.99")
        with pytest.raises(RemoteError) as ei:
            c.call(lambda: 1)
        assert "pickled by Python 3.99" in str(ei.value), ei.value


def test_a_result_record_nested_too_deep_is_undecodable_not_a_recursion_error():
    """A payload may write its own record on the result pipe: JSON arrays nested 100000 deep made
    json.loads raise RecursionError, which reached the caller of call(), .value or an executor's
    future instead of the documented ResultError (a helper's review)."""
    from zygote_client import ExitStatus
    from zygote_client._results import decode
    deep = b"[" * 100_000 + b"]" * 100_000
    status = ExitStatus(returncode=0)
    for kind in ("json", "error", "unencodable"):
        with pytest.raises(ResultError) as e:
            decode(kind, deep, status, trusted=False)
        assert e.value.reason == "undecodable", (kind, e.value)
