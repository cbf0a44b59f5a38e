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

from flashmoe.cli import add_common_arguments, run_cli
from flashmoe.format.errors import InputError

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
                     help="generate once for this prompt and exit ('-' reads it from stdin); "
                          "without --prompt or --prompt-file: interactive chat")
    src.add_argument("--prompt-file", metavar="FILE", help="generate once for the UTF-8 text in FILE and exit")
    p.add_argument("--system-prompt", metavar="TEXT",
                   help="system message put before the conversation (needs the chat template)")
    p.add_argument("--max-tokens", type=int, default=512, metavar="N",
                   help="tokens to generate at most per reply (default 512)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature; 0 = greedy, always the likeliest token (default 0)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="sample from the smallest set of tokens whose probability reaches P (default 1.0 = off)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample among the K likeliest tokens (default 0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed, for repeatable sampling")
    p.add_argument("--experts-per-token", type=int, default=None, metavar="K",
                   help="routed experts per token (default: the model's own); fewer reads less from disk "
                        "and costs some quality (measure it with flashmoe-eval)")
    p.add_argument("--stop", action="append", default=None, metavar="STR",
                   help="stop when this string appears (repeat the flag for several: --stop A --stop B)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="feed the prompt as raw text instead of wrapping it in the model's chat template")
    p.add_argument("--stats", action="store_true", help="print speed, time per stage, I/O and memory to stderr")
    p.add_argument("--io", choices=("pread", "mmap"), default="pread", help="expert read method (default pread)")
    from flashmoe.metal.dispatch import add_cli_argument

    add_cli_argument(p)  # --kernels auto|builtin|custom
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


def fmt_stats(s: dict) -> str:
    pf, dc = s["prefill"], s["decode"]
    mb = 1 << 20
    cached = s.get("cached_prompt_tokens", 0)
    lines = [
        f"prefill: {s['prompt_tokens'] - cached} new tokens in {s['prefill_s']:.2f} s "
        f"({s['prefill_tps']:.1f} tok/s{f', {cached} more from the chat cache' if cached else ''})",
        f"decode:  {s['generated_tokens']} tokens in {s['decode_s']:.2f} s ({s['decode_tps']:.2f} tok/s)",
        "time per stage (prefill | decode): " + ", ".join(
            f"{name} {pf[k]:.3f} | {dc[k]:.3f} s" for name, k in
            (("attention", "attention"), ("routing", "routing"), ("expert I/O", "expert_io"),
             ("expert compute", "expert_compute"), ("lm head", "head"))),
        f"experts read: {pf['expert_reads'] + dc['expert_reads']} records, {s['expert_bytes'] / mb:.1f} MiB "
        f"at {s['expert_gbps']:.2f} GB/s effective (prefill {pf['expert_bytes'] / mb:.1f} MiB, "
        f"decode {dc['expert_bytes'] / mb:.1f} MiB)",
        f"peak RSS: {s['peak_rss_bytes'] / mb:.1f} MiB",
    ]
    return "\n".join(lines)


def gen_kwargs(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                seed=args.seed, stop=args.stop)


def run_once(model, tok, prompt: str, args, out=None) -> str:
    from .generate import generate

    out = out or sys.stdout
    use_template = not args.no_chat_template
    if args.system_prompt is not None:
        prompt = [{"role": "system", "content": args.system_prompt}, {"role": "user", "content": prompt}]
    text = []
    for chunk in generate(model, tok, prompt, chat_template=use_template, **gen_kwargs(args)):
        if chunk.text:
            out.write(chunk.text)
            out.flush()
            text.append(chunk.text)
        if chunk.finish_reason is not None and args.stats:
            print("\n" + fmt_stats(chunk.stats), file=sys.stderr, flush=True)
    return "".join(text)


def _body(args: argparse.Namespace) -> int:
    from .config import RuntimeConfig

    config = RuntimeConfig.from_env(experts_per_token=args.experts_per_token, io=args.io, kernels=args.kernels)
    if args.max_tokens < 0:
        raise InputError(f"--max-tokens must be >= 0 (got {args.max_tokens})")
    prompt = check_arg_text(args.prompt, "--prompt")
    check_arg_text(args.system_prompt, "--system-prompt")
    for s in args.stop or []:
        check_arg_text(s, "--stop")
    from .distributed import run_model, start_from_env

    dist = start_from_env(PROG)  # under mlx.launch: this rank's place (runtime/distributed.py); else size 1
    if not dist.leader:  # the other ranks read no input: they run rank 0's model calls
        prompt = None
    elif prompt == "-":
        if dist.size > 1:
            raise InputError("--prompt - reads stdin to its end, and mlx.launch never passes the end of its input "
                             "on to the ranks: use --prompt-file FILE (a path on rank 0's host)")
        prompt = read_text("-", "--prompt")
    elif args.prompt_file is not None:
        prompt = read_text(args.prompt_file, "--prompt-file")
    if prompt is not None and not prompt.strip():
        raise InputError("the prompt is empty: give some text with --prompt or --prompt-file")
    if args.system_prompt is not None and args.no_chat_template:
        raise InputError("--system-prompt needs the chat template; drop --no-chat-template")
    from .generate import make_sampler
    from .loader import load

    make_sampler(args.temperature, args.top_p, args.top_k, args.seed)  # validate before loading
    dist.check_bundle(args.bundle, args.experts_per_token)
    model, tok = load(args.bundle, config)
    dist.attach(model)
    check_kernels_fit(model)
    if args.system_prompt is not None and tok.chat_template is None:
        raise InputError(f"{args.bundle} has no chat template, so --system-prompt cannot be placed; drop it")
    model.stats.enabled = args.stats

    def body(model) -> int:  # rank 0 only (the other ranks follow its model calls)
        if prompt is not None:
            run_once(model, tok, prompt, args)
            if sys.stdout.isatty():
                sys.stdout.write("\n")
            return 0
        from .chat import chat

        chat(model, tok, args)
        return 0

    return run_model(dist, model, body)


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, _parser(), _body, argv)


if __name__ == "__main__":
    sys.exit(main())
