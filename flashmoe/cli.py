"""What every flashmoe command shares: --version, --debug, one way to end, and one flag vocabulary.

    def main(argv=None):
        return run_cli(PROG, _parser(), _body, argv)

User errors (FlashmoeError and its kinds, a missing file) print one line `PROG: error: ...` on stderr
and exit 2; Ctrl-C exits 130; anything else is a bug: one line `PROG: internal error: ...` and exit 1,
with the traceback when --debug (or FLASHMOE_DEBUG=1) is given. Environment variables are read here
and in each CLI's body, never deeper in the library.

The flags every command that runs a model spells the same way:
    add_runtime_flags   --io --kernels --gpu-cache-gb --upload --prefetch --dtype --state-dtype --experts-per-token
    add_engine_flags    --max-batch --memory-budget-gb --prompt-cache-gb
    add_sampling_flags  --max-tokens --temperature --top-p --top-k --seed --stop
and runtime_config_from_args / engine_config_from_args / sampling_params_from_args turn them into a
RuntimeConfig, an EngineConfig and a SamplingParams.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable

from flashmoe import __version__
from flashmoe.errors import FlashmoeError


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


# ----------------------------------------------------------------------------------------------
# the shared flags


def add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    from flashmoe.runtime.config import DTYPES, IO_MODES, KERNELS, PREFETCH_MODES, STATE_DTYPES, UPLOADS

    g = parser.add_argument_group("runtime")
    g.add_argument("--io", choices=IO_MODES, default=None,
                   help="expert read method: pread, mmap, or direct (O_DIRECT, past the page cache) (default pread)")
    g.add_argument("--kernels", choices=KERNELS, default=None,
                   help="expert kernels: custom dequant-FMA kernels (GPU), MLX built-ins, or auto "
                        "(default: $FLASHMOE_KERNELS or auto)")
    g.add_argument("--gpu-cache-gb", type=float, default=None, metavar="GB",
                   help="CUDA GPU expert cache size, 0 = none (default: $FLASHMOE_GPU_CACHE_GB, else 16 GB or 40%% "
                        "of a smaller GPU)")
    g.add_argument("--upload", choices=UPLOADS, default=None,
                   help="how records reach a CUDA GPU: pinned host staging, direct, or auto "
                        "(default: $FLASHMOE_UPLOAD or auto: pinned on CUDA, else direct)")
    g.add_argument("--prefetch", choices=PREFETCH_MODES, default=None,
                   help="read the next layer's likely experts while this one computes (decode guesses, and a "
                        "prefill's next layer) (default auto: off; it did not pay where measured)")
    g.add_argument("--dtype", choices=DTYPES, default=None,
                   help="activation dtype (default: $FLASHMOE_DTYPE, else float32 on the CPU and the bundle's "
                        "dtype on a GPU)")
    g.add_argument("--state-dtype", choices=STATE_DTYPES, default=None,
                   help="delta-net state between steps: float32, or bfloat16 for half the memory per sequence, so "
                        "about twice the batch (default: $FLASHMOE_STATE_DTYPE or float32; quality cost in "
                        "docs/batch.md)")
    g.add_argument("--experts-per-token", type=int, default=None, metavar="K",
                   help="routed experts per token (default: the model's own); fewer reads less from disk and "
                        "costs some quality (measure it with flashmoe-eval)")


def runtime_config_from_args(args: argparse.Namespace, environ=None):
    """The RuntimeConfig of add_runtime_flags' flags over the FLASHMOE_* environment (flags win)."""
    from flashmoe.runtime.config import RuntimeConfig

    return RuntimeConfig.from_env(environ, io=args.io, kernels=args.kernels, gpu_cache_gb=args.gpu_cache_gb,
                                  upload=args.upload, dtype=args.dtype, experts_per_token=args.experts_per_token,
                                  prefetch=args.prefetch, state_dtype=args.state_dtype)


def _max_batch(s: str) -> int | None:
    if s == "auto":
        return None
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give a whole number >= 1 or 'auto' (got {s!r})") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"give a whole number >= 1 or 'auto' (got {s!r})")
    return n


def add_engine_flags(parser: argparse.ArgumentParser, max_batch: int | None = None,
                     prompt_cache_gb: float = 0.0) -> None:
    """The batched engine's flags; `max_batch` / `prompt_cache_gb`: this command's defaults."""
    g = parser.add_argument_group("engine")
    g.add_argument("--max-batch", type=_max_batch, default=max_batch, metavar="N",
                   help="sequences decoded together at most, or 'auto': as many as the memory budget holds "
                        f"(default {'auto' if max_batch is None else max_batch})")
    g.add_argument("--memory-budget-gb", type=float, default=None, metavar="GB",
                   help="memory for the running sequences' state (default: half the available memory)")
    g.add_argument("--prompt-cache-gb", type=float, default=prompt_cache_gb, metavar="GB",
                   help="keep finished sequences' state up to GB, so prompts that extend them prefill only the "
                        f"rest (default {prompt_cache_gb:g}{' = off' if not prompt_cache_gb else ''})")


def engine_config_from_args(args: argparse.Namespace):
    from flashmoe.runtime.config import EngineConfig

    return EngineConfig(max_batch=args.max_batch, memory_budget_gb=args.memory_budget_gb,
                        prompt_cache_gb=args.prompt_cache_gb).check()


def add_sampling_flags(parser: argparse.ArgumentParser, max_tokens: int = 512) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, metavar="N",
                   help=f"tokens to generate at most per reply (default {max_tokens})")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature; 0 = greedy, always the likeliest token (default 0)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="sample from the smallest set of tokens whose probability reaches P (default 1.0 = off)")
    g.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample among the K likeliest tokens (default 0 = off)")
    g.add_argument("--seed", type=int, default=None, metavar="N",
                   help="random seed, for repeatable sampling (default: a fresh one per run)")
    g.add_argument("--stop", action="append", default=None, metavar="STR",
                   help="stop when this string appears (repeat the flag for several: --stop A --stop B)")


def sampling_params_from_args(args: argparse.Namespace):
    """A checked SamplingParams of add_sampling_flags' flags (InputError on a bad value)."""
    from flashmoe.runtime.sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=tuple(args.stop or ())).check()
