"""flashmoe-run: generate text from a bundle, or chat with it.

    flashmoe-run BUNDLE --prompt "Hello"        stdout carries only the generated text
    flashmoe-run BUNDLE --prompt - < q.txt      the prompt from stdin (or --prompt-file q.txt)
    flashmoe-run BUNDLE                         interactive chat (type /help there)

Logs and --stats go to stderr. User errors (missing or corrupt bundle, bad arguments, a prompt past the
context limit, an empty or non-UTF-8 prompt) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flashmoe.cli import (add_common_arguments, add_runtime_flags, add_sampling_flags, run_cli,
                          runtime_config_from_args, sampling_params_from_args)
from flashmoe.errors import InputError

from .config import EngineConfig
from .generate import PREFILL_CHUNK
from .report import fmt_stats
from .runner import PromptCache
from .text import prompt_ids

PROG = "flashmoe-run"
EPILOG = """examples:
  flashmoe-run ~/models/qwen-q4 --prompt "Explain MoE routing" --max-tokens 200
  flashmoe-run ~/models/qwen-q4 --prompt-file question.txt --stop "</answer>" --stop "\\n\\n"
  echo "Summarise: ..." | flashmoe-run ~/models/qwen-q4 --prompt -
  flashmoe-run ~/models/qwen-q4 --system-prompt "Answer in one sentence."     (chat)"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Run a flashmoe bundle, streaming experts from SSD.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle directory (from flashmoe-convert or flashmoe-pull) or a Hub repo id")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", metavar="TEXT",
                     help="generate once for this prompt and exit ('-' reads it from stdin until end of input); "
                          "without --prompt or --prompt-file: interactive chat")
    src.add_argument("--prompt-file", metavar="FILE", help="generate once for the UTF-8 text in FILE and exit")
    p.add_argument("--system-prompt", metavar="TEXT",
                   help="system message put before the conversation (needs the chat template)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="feed the prompt as raw text instead of wrapping it in the model's chat template")
    p.add_argument("--stats", action="store_true",
                   help="print speed, time per stage, I/O and memory to stderr (the first run's kernel "
                        "compilation is timed on its own, not in the speed)")
    add_sampling_flags(p, max_tokens=512)
    add_runtime_flags(p)
    add_common_arguments(p)
    return p


# ----------------------------------------------------------------------------------------------
# inputs shared by the commands that take text (flashmoe-run, flashmoe-eval)


def decode_utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{what} is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                         "save it as UTF-8") from None


def read_text(src: str, what: str) -> str:
    """The text of a file, or of stdin for '-', strictly UTF-8."""
    if src == "-":
        return decode_utf8(sys.stdin.buffer.read(), f"{what} (stdin)")
    path = Path(src).expanduser()
    if not path.is_file():
        raise InputError(f"{what} {src}: no such file")
    return decode_utf8(path.read_bytes(), f"{what} {src}")


def check_arg_text(s: str | None, what: str) -> str | None:
    """Command-line text arrives with undecodable bytes as lone surrogates: refuse them clearly."""
    if s is None:
        return None
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{what} is not valid UTF-8; pass UTF-8 text (or use --prompt-file)") from None
    return s


def check_kernels_fit(model) -> None:
    """After loading: custom kernels support only some bit widths and group sizes."""
    from flashmoe.metal import dispatch

    if model.runtime_config.kernels != "custom":
        return
    e, c = model.bundle.manifest["experts"], model.config
    if not dispatch.custom_supported(e["bits"], e["group_size"], c.hidden_size, c.moe_intermediate_size):
        raise InputError(f"custom expert kernels take bits {dispatch.CUSTOM_BITS} and group sizes "
                         f"{dispatch.CUSTOM_GROUPS}; this bundle has bits={e['bits']}, group "
                         f"{e['group_size']}: use --kernels auto")


# ----------------------------------------------------------------------------------------------
# one prompt


def warm_up(engine, ids: list[int], err=None) -> None:
    """Compile the kernels before anything is timed: one short generation (a prefill of two tokens and a
    decode step) whose figures are not reported; says how long it took. Its tokens start differently from
    `ids`, so what it leaves in the prompt cache is never taken for the prompt's prefix."""
    import time

    from .generate import stream
    from .sampling import SamplingParams

    err = err or sys.stderr
    other = (ids[0] + 1) % engine.model.config.vocab_size
    t0 = time.perf_counter()
    for _ in stream(engine, [other, other], SamplingParams(max_tokens=2)):
        pass
    print(f"first run: compiling kernels ({time.perf_counter() - t0:.1f} s)", file=err, flush=True)


def run_once(engine, tok, prompt: str, args, out=None) -> str:
    from .generate import generate

    out = out or sys.stdout
    use_template = not args.no_chat_template
    if args.system_prompt is not None:
        prompt = [{"role": "system", "content": args.system_prompt}, {"role": "user", "content": prompt}]
    if args.stats:
        warm_up(engine, prompt_ids(tok, prompt, use_template))
    text = []
    for chunk in generate(engine.model, tok, prompt, chat_template=use_template, engine=engine,
                          params=sampling_params_from_args(args)):
        if chunk.text:
            out.write(chunk.text)
            out.flush()
            text.append(chunk.text)
        if chunk.finish_reason is not None:
            if not "".join(text).endswith("\n"):  # the output ends a line (a shell prompt starts on its own)
                out.write("\n")
                out.flush()
            if args.stats:
                print(fmt_stats(chunk.stats), file=sys.stderr, flush=True)
    return "".join(text)


def _body(args: argparse.Namespace) -> int:
    config = runtime_config_from_args(args)
    if args.max_tokens < 0:
        raise InputError(f"--max-tokens must be >= 0 (got {args.max_tokens})")
    prompt = check_arg_text(args.prompt, "--prompt")
    check_arg_text(args.system_prompt, "--system-prompt")
    for s in args.stop or []:
        check_arg_text(s, "--stop")
    from .distributed import make_engine, run_engine, start_from_env

    dist = start_from_env(PROG)  # under mlx.launch: this rank's place (runtime/distributed.py); else size 1
    if not dist.leader:  # the other ranks read no input: they run rank 0's model calls
        prompt = None
    elif prompt == "-":
        if dist.size > 1:
            raise InputError("--prompt - reads stdin to its end, and mlx.launch never passes the end of its input "
                             "on to the ranks: use --prompt-file FILE (a path on rank 0's host)")
        if sys.stdin.isatty():
            print(f"{PROG}: reading the prompt from stdin until end of input (Ctrl-D)", file=sys.stderr, flush=True)
        prompt = read_text("-", "--prompt")
    elif args.prompt_file is not None:
        prompt = read_text(args.prompt_file, "--prompt-file")
    if prompt is not None and not prompt.strip():
        raise InputError("the prompt is empty: give some text with --prompt or --prompt-file")
    if args.system_prompt is not None and args.no_chat_template:
        raise InputError("--system-prompt needs the chat template; drop --no-chat-template")
    from .loader import load

    sampling_params_from_args(args)  # validate before loading
    dist.check_bundle(args.bundle, config.experts_per_token)
    model, tok = load(args.bundle, config, shard=dist.expert_shard())
    dist.attach(model)
    check_kernels_fit(model)
    if args.system_prompt is not None and tok.chat_template is None:
        raise InputError(f"{args.bundle} has no chat template, so --system-prompt cannot be placed; drop it")
    model.stats.enabled = args.stats
    # one sequence at a time, its state kept between the chat's turns (on every rank alike)
    engine = make_engine(dist, model, tok, EngineConfig(max_batch=1, prefill_tokens=PREFILL_CHUNK), PromptCache())

    def body(engine) -> int:  # rank 0 only (the other ranks follow its model calls)
        if prompt is not None:
            run_once(engine, tok, prompt, args)
            return 0
        from .chat import chat

        chat(model, tok, args, engine)
        return 0

    return run_engine(dist, engine, body)


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, _parser(), _body, argv)


if __name__ == "__main__":
    sys.exit(main())
