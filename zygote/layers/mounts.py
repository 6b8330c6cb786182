"""Mount namespace, child side: a private mount tree, a fresh /proc, and (issue 3) a new root.

Mode "host" keeps the host's tree (made private so nothing propagates back) and only replaces
/proc with one for the child's pid namespace.
"""

from __future__ import annotations

from . import SetupError
from . import _sys


def apply(plan) -> None:  # plan: ChildPlan
    try:
        # Private propagation first: without it our mounts would propagate to the host's tree.
        _sys.mount(None, "/", None, _sys.MS_REC | _sys.MS_PRIVATE)
    except OSError as e:
        raise SetupError("mounts", f"make / private: {e.strerror}", e.errno or 0) from None
    if plan.root == "host":
        if plan.proc:
            try:
                _sys.mount("proc", "/proc", "proc", _sys.MS_NOSUID | _sys.MS_NODEV | _sys.MS_NOEXEC)
            except OSError as e:
                raise SetupError("mounts", f"mount a fresh /proc: {e.strerror}", e.errno or 0,
                                 "the host's /proc must be fully visible (no masked paths); in Docker "
                                 "run with --security-opt systempaths=unconfined") from None
        return
    raise SetupError("mounts", f"root mode {plan.root!r} is not supported by this build", 95)
