"""zygote: a daemon of warm, preloaded Python interpreters that clone sandboxed children.

Deliberately tiny: the zygote process imports this package, and nothing here may start threads or
import trio. The daemon lives in zygote.daemon, the CLI in zygote.cli.
"""

__version__ = "0.1.0"
