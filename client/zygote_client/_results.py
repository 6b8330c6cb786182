"""Decoding a child's result, in the client: JSON by default, a pickle only when trusted.

The daemon relays the payload's outcome as ``(result_kind, bytes)`` without opening it (see
``Exited`` in ``_protocol``). This is the one place those bytes are turned back into a value, and
the only ``pickle.loads`` of child-made bytes in the client, behind ``trusted_results``.
"""

from __future__ import annotations

import json
import pickle
from typing import Any, NamedTuple

from ._config import ExitStatus
from ._errors import ChildFailed, RemoteError, ResultError


class Outcome(NamedTuple):
    """What came back for one child: the daemon's ``(result_kind, result)`` and how to read it."""

    kind: str
    data: bytes
    status: ExitStatus
    trusted: bool  # the spawn asked for trusted_results: a pickle may be loaded
    has_result: bool  # a callable/target/child_main payload (exec and script return nothing)

    def value(self) -> Any:
        if not self.has_result:
            raise ResultError("exec and script children have no return value", reason="no-result",
                              status=self.status)
        return decode(self.kind, self.data, self.status, self.trusted)

_FAILURES = (  # (flag on ExitStatus, reason, what to tell the caller), the first that applies wins
    ("memory_exceeded", "memory", "was killed for exceeding its memory limit (cgroup OOM)"),
    ("pids_exceeded", "pids", "hit its pids limit"),
    ("timed_out", "timeout", "was killed at its wall-clock timeout"),
    ("cpu_time_exceeded", "cpu-time", "exceeded its CPU time limit"),
    ("output_exceeded", "output", "wrote more than max_output_bytes (cut there; killed if still running)"),
    ("pool_reloaded", "reload", "was killed by a reload that replaced its pool (a leased child; run it again)"),
)


def decode(kind: str, data: bytes, status: ExitStatus, trusted: bool) -> Any:
    """Return the payload's value, or raise what stands in for it.

    Raises:
        RemoteError: the payload raised.
        ChildFailed: the child ended without a result (a limit, a signal, sys.exit).
        ResultError: the value could not be encoded, was too large, or is undecodable here.
    """
    if kind == "json":
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as e:  # (arrays nested 100000 deep: a payload's own record)
            raise ResultError(f"the child's JSON result is undecodable: {e}", reason="undecodable",
                              status=status) from None
    if kind == "pickle":
        if not trusted:  # a daemon or peer that sends a pickle unasked gets it refused, unopened
            raise ResultError("the child sent a pickled result but trusted_results is off",
                              reason="undecodable", status=status)
        try:
            return pickle.loads(data)  # SECURITY: the caller opted in (trusted_results=True)
        except Exception as e:  # e.g. a class from a module this process does not have
            raise ResultError(f"the child's pickled result cannot be loaded here: {type(e).__name__}: {e}",
                              reason="undecodable", status=status) from e
    if kind == "error":
        doc = _json_doc(data, status)
        raise RemoteError(str(doc.get("type", "Exception")), str(doc.get("message", "")),
                          str(doc.get("traceback", "")))
    if kind == "unencodable":
        doc = _json_doc(data, status)
        raise ResultError(f"the payload returned a value of type {doc.get('type', '?')} that cannot be sent back: "
                          f"{doc.get('message', '')} (return JSON-compatible values, or spawn with "
                          "trusted_results=True to receive pickles)", reason="unencodable", status=status)
    if kind == "too-large":
        raise ResultError("the payload's result exceeds the daemon's max_result_bytes",
                          reason="too-large", status=status)
    raise _no_result(kind, status)


def _no_result(kind: str, status: ExitStatus) -> ResultError:
    for flag, reason, text in _FAILURES:
        if getattr(status, flag):
            return ChildFailed(f"the child {text}; no result", reason=reason, status=status)
    rc = status.returncode
    if rc < 0:
        return ChildFailed(f"the child was killed by signal {-rc}; no result", reason="signal", status=status)
    if kind == "invalid":
        return ResultError("the child wrote a malformed result record", reason="invalid", status=status)
    return ChildFailed(f"the payload exited with code {rc} without returning (sys.exit or os._exit); "
                       "no result", reason="exit", status=status)


def _json_doc(data: bytes, status: ExitStatus) -> dict:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        raise ResultError("the child's error record is undecodable", reason="undecodable", status=status)
    return doc
