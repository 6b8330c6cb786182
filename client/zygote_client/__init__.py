"""zygote_client: ask a zygote daemon for sandboxed children and stream their output.

Pure Python. The public names are re-exported here from underscored modules. The clients and the
executor (with anyio, asyncio and concurrent.futures behind them) are imported on first use: the
daemon's zygotes import this package for its protocol and sandbox configuration only, and every
module a zygote holds is memory each of its clones copies the page tables of and unmaps at its
exit (eagerly, they were 3 MiB and 56 modules of every zygote, and a fork hook in every child).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._config import ExitStatus, NetworkConfig, SandboxConfig
from ._errors import (BrokenError, ChildFailed, ClosedError, DaemonError, ProtocolError, RemoteError, ResultError,
                      SandboxError, SandboxUnavailable, ZygoteError)
from ._workspace import Export, ExportError, ExportResult, Workspace, WorkspaceError

if TYPE_CHECKING:
    from ._async import DEVNULL, PIPE, AsyncChild, AsyncClient, open_client, open_embedded
    from ._blocking import ChildProcess, Client, CompletedChild
    from ._executor import SandboxExecutor

__version__ = "0.1.0"

__all__ = [
    "AsyncChild", "AsyncClient", "BrokenError", "ChildFailed", "ChildProcess", "Client", "ClosedError",
    "CompletedChild", "DEVNULL", "DaemonError", "ExitStatus", "Export", "ExportError", "ExportResult",
    "NetworkConfig", "PIPE", "ProtocolError", "RemoteError", "ResultError", "SandboxConfig", "SandboxError",
    "SandboxExecutor", "SandboxUnavailable", "Workspace", "WorkspaceError", "ZygoteError", "open_client",
    "open_embedded",
]

_ON_FIRST_USE = {
    "DEVNULL": "_async", "PIPE": "_async", "AsyncChild": "_async", "AsyncClient": "_async",
    "open_client": "_async", "open_embedded": "_async",
    "ChildProcess": "_blocking", "Client": "_blocking", "CompletedChild": "_blocking",
    "SandboxExecutor": "_executor",
}


def __getattr__(name: str):
    module = _ON_FIRST_USE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # (the next lookup finds it without this function)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
