"""One module per isolation layer, each with the same shape.

* ``prepare(...)``   daemon side, before any clone: validate, compile, precompute (may raise
  SandboxError / SandboxUnavailable with a remedy).
* ``outside(...)``   daemon side, after clone and before "go": what the parent does to the child's pid.
* ``apply(plan)``    child side, in the pipeline order of zygote/child.py; raises SetupError.
* ``cleanup(...)``   daemon side, after reaping.

A layer provides only the verbs it needs. No layer imports another.
"""

from __future__ import annotations


class SetupError(Exception):
    """A child-side confinement step failed; reported to the daemon as Failed(step, errno, hint)."""

    def __init__(self, step: str, message: str, errno: int = 0, hint: str = "") -> None:
        super().__init__(message)
        self.step = step
        self.errno = errno
        self.message = message
        self.hint = hint
