"""zygote_client: ask a zygote daemon for sandboxed children and stream their output.

Pure Python. The public names are re-exported here from underscored modules; tests pin this list.
"""

from ._async import DEVNULL, PIPE, AsyncChild, AsyncClient, open_client, open_embedded
from ._blocking import ChildProcess, Client, CompletedChild
from ._config import ExitStatus, NetworkConfig, SandboxConfig
from ._errors import (BrokenError, ChildFailed, ClosedError, DaemonError, ProtocolError, RemoteError, ResultError,
                      SandboxError, SandboxUnavailable, ZygoteError)
from ._executor import SandboxExecutor
from ._workspace import Export, ExportError, ExportResult, Workspace, WorkspaceError

__version__ = "0.1.0"

__all__ = [
    "AsyncChild", "AsyncClient", "BrokenError", "ChildFailed", "ChildProcess", "Client", "ClosedError",
    "CompletedChild", "DEVNULL", "DaemonError", "ExitStatus", "Export", "ExportError", "ExportResult",
    "NetworkConfig", "PIPE", "ProtocolError", "RemoteError", "ResultError", "SandboxConfig", "SandboxError",
    "SandboxExecutor", "SandboxUnavailable", "Workspace", "WorkspaceError", "ZygoteError", "open_client",
    "open_embedded",
]
