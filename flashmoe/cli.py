"""What every flashmoe command shares: --version, --debug, and one way to end.

    def main(argv=None):
        return run_cli(PROG, _parser(), _body, argv)

User errors (FlashmoeError and its kinds, a missing file) print one line `PROG: error: ...` on stderr
and exit 2; Ctrl-C exits 130; anything else is a bug: one line `PROG: internal error: ...` and exit 1,
with the traceback when --debug (or FLASHMOE_DEBUG=1) is given. Environment variables are read here
and in each CLI's body, never deeper in the library.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable

from flashmoe import __version__
from flashmoe.format.errors import FlashmoeError


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the flashmoe version and exit")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an internal error (also FLASHMOE_DEBUG=1)")


def error_line(prog: str, e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return f"{prog}: error: {msg}"


def run_cli(prog: str, parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int | None],
            argv: list[str] | None = None) -> int:
    """Parse argv (argparse exits 2 on bad flags), run body(args), map errors to exit codes."""
    if not any(a.dest == "debug" for a in parser._actions):
        add_common_arguments(parser)
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False) or os.environ.get("FLASHMOE_DEBUG"))
    try:
        rc = body(args)
        return 0 if rc is None else int(rc)
    except FlashmoeError as e:
        if debug:
            traceback.print_exc()
        print(error_line(prog, e), file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        if debug:
            traceback.print_exc()
        print(error_line(prog, e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `flashmoe-run ... | head`: the reader left; not an error
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except Exception as e:  # a bug: one line, the traceback behind --debug
        if debug:
            traceback.print_exc()
        print(f"{prog}: internal error: {type(e).__name__}: {e} (run with --debug for the traceback, "
              "and please report it)", file=sys.stderr)
        return 1
