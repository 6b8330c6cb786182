"""Exceptions raised by the client and, by name, by the daemon.

Every error that concerns confinement names the layer or step that failed, so callers can branch on
``err.step`` / ``err.errno`` and never on message text.
"""

from __future__ import annotations


class ZygoteError(Exception):
    """Base class of every error this package raises."""


class ProtocolError(ZygoteError):
    """A frame could not be decoded, or the peer broke the protocol."""


class ClosedError(ZygoteError):
    """The client (or one of its children's handles) was closed by this side."""


class BrokenError(ZygoteError):
    """The connection to the daemon was lost (the daemon or its socket went away)."""


class DaemonError(ZygoteError):
    """The daemon refused a request (bad input, not allowed, unknown child).

    Attributes:
        code: a short machine-readable code such as ``"bad-request"`` or ``"unknown-child"``.
        retriable: True when the same request may succeed if sent again (e.g. a zygote restarted).
    """

    def __init__(self, message: str, *, code: str = "error", retriable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.retriable = retriable


class SandboxError(ZygoteError):
    """A confinement step could not be established; the payload never ran.

    Attributes:
        step: the pipeline step or layer that failed, e.g. ``"userns"``, ``"mounts"``, ``"seccomp"``.
        errno: the kernel's errno for the failing call, or 0 when none applies.
        hint: what to change on the host or in the request to make the step work.
    """

    def __init__(self, step: str, message: str, *, errno: int = 0, hint: str = "") -> None:
        self.step = step
        self.layer = step
        self.errno = errno
        self.hint = hint
        text = f"sandbox step {step!r} failed: {message}"
        if hint:
            text += f" (fix: {hint})"
        super().__init__(text)


class SandboxUnavailable(SandboxError):
    """The host cannot enforce a requested layer at all (kernel, sysctl, capability, delegation)."""


class RemoteError(ZygoteError):
    """The payload raised; carries the remote exception's type name, message and traceback text.

    The exception object itself is never unpickled (not even with ``trusted_results``): what
    comes back is its description, so catching it never runs code from the child. ``str()`` shows
    the remote traceback.

    Attributes:
        type_name: the exception's class, ``"ValueError"`` or ``"module.QualName"``.
        message: ``str()`` of the remote exception.
        traceback_text: the remote traceback, formatted as Python prints it.
    """

    def __init__(self, type_name: str, message: str, traceback_text: str) -> None:
        text = f"{type_name}: {message}" if message else type_name
        if traceback_text:
            text += "\n\nRemote traceback:\n" + traceback_text.rstrip()
        super().__init__(text)
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text


class ResultError(ZygoteError):
    """The payload finished but its return value cannot be had.

    Attributes:
        reason: ``"unencodable"`` (not JSON-compatible, or cloudpickle failed with
            ``trusted_results``), ``"too-large"`` (over the daemon's ``max_result_bytes``),
            ``"invalid"`` (the child wrote a malformed record), ``"undecodable"`` (this side could
            not decode it), ``"no-result"`` (an exec or script child), or, for ChildFailed, why
            the child ended without one.
        status: the child's ExitStatus.
    """

    def __init__(self, message: str, *, reason: str, status: object = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


class ChildFailed(ResultError):
    """The child ended without returning: killed by a limit or a signal, or it exited.

    ``reason`` is the first that applies of ``"memory"`` (cgroup OOM kill, ``status.memory_exceeded``),
    ``"pids"``, ``"timeout"``, ``"cpu-time"``, ``"output"``, ``"reload"`` (a reload of the pool
    killed the leased child, ``status.pool_reloaded``; its payload may have started),
    ``"signal"`` and ``"exit"`` (sys.exit or os._exit in the payload). ``status`` has the details.
    """


def cut(text: str, most: int) -> str:
    """``text`` cut to ``most`` characters, marked "... (cut)" when it was."""
    return text if len(text) <= most else f"{text[:most]}... (cut)"


def one_of(value: str, choices: tuple[str, ...], field: str, most: int = 200) -> None:
    """Raise ValueError unless ``value`` is one of ``choices``, quoting it cut to ``most``. The
    protocol's fields with a fixed set of values are plain strings checked by this, never
    ``Literal``s: msgspec's own error for one quotes a peer's whole value, escaped (a 70 MiB
    value: 1-2 s of the daemon's event loop and 700 MiB of its memory)."""
    if value not in choices:
        raise ValueError(f"{field}: expected one of {', '.join(choices)}, got {quoted(value, most)}")


def quoted(value: object, most: int = 200) -> str:
    """``repr`` of a value a peer sent, a string cut to ``most`` characters before quoting: an
    error quoting a 70 MiB name whole cost over a second and hundreds of MB before it was cut."""
    if isinstance(value, str) and len(value) > most:
        return f"{value[:most]!r}... ({len(value)} characters)"
    return repr(value)
