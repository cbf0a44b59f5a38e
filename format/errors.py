"""The one error type users see from bundle, converter and runtime code: a message that says what is
wrong and how to fix it. CLIs print it without a traceback and exit with status 2."""


class BundleError(Exception):
    """Something about a bundle, a checkpoint or an argument is wrong; str() says what and how to fix it."""
