"""Error types users see. Every one says what is wrong and how to fix it; CLIs print it as one line
without a traceback and exit with status 2. Callers tell the kinds apart by class:

    FlashmoeError        the base: any error a user can cause or fix
      InputError         a bad argument, prompt, request or input file
      BundleError        a missing, corrupt or incompatible bundle or checkpoint
        ...              (hub.HubError: the Hub or the network)
      CapacityError      the request does not fit: memory budget, context length, a full queue

Anything else that escapes is an internal fault (a bug): CLIs show it as "internal error", with the
traceback behind --debug.
"""

__all__ = ["BundleError", "CapacityError", "FlashmoeError", "InputError"]


class FlashmoeError(Exception):
    """Base of every error a user can cause or fix; str() says what and how."""


class InputError(FlashmoeError, ValueError):
    """A bad argument, prompt, request or input line."""


class BundleError(FlashmoeError):
    """Something about a bundle or a checkpoint is wrong; str() says what and how to fix it."""


class CapacityError(FlashmoeError):
    """The work does not fit: the memory budget, the context length or a bounded queue."""
