"""flashmoe-run: generate text from a bundle, or chat with it.

    flashmoe-run BUNDLE --prompt "Hello"        stdout carries only the generated text
    flashmoe-run BUNDLE                         interactive chat with history (/reset, /exit)

Logs and --stats go to stderr. User errors (missing or corrupt bundle, bad arguments, a prompt past the
context limit, an empty prompt) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from flashmoe.format import BundleError

PROG = "flashmoe-run"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Run a flashmoe bundle, streaming experts from SSD.")
    p.add_argument("bundle", help="bundle directory (from flashmoe-convert or flashmoe-pull)")
    p.add_argument("--prompt", help="generate once for this prompt and exit (default: interactive chat)")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens to generate at most (default 512)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--experts-per-token", type=int, default=None, metavar="K",
                   help="routed experts per token (default: the model's own)")
    p.add_argument("--stop", nargs="+", default=None, metavar="STR", help="stop when any of these strings appear")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--stats", action="store_true", help="print speed, time per stage, I/O and memory to stderr")
    p.add_argument("--io", choices=("pread", "mmap"), default="pread", help="expert read method (default pread)")
    from flashmoe.metal.dispatch import add_cli_argument

    add_cli_argument(p)  # --kernels auto|builtin|custom
    return p


def _fmt_stats(s: dict) -> str:
    pf, dc = s["prefill"], s["decode"]
    mb = 1 << 20
    lines = [
        f"prefill: {s['prompt_tokens'] - s.get('cached_prompt_tokens', 0)} tokens in {s['prefill_s']:.2f} s "
        f"({s['prefill_tps']:.1f} tok/s{', ' + str(s['cached_prompt_tokens']) + ' more from the chat cache' if s.get('cached_prompt_tokens') else ''})",
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


def _run_once(model, tok, prompt, args, out=None, session=None) -> str:
    from .generate import generate

    out = out or sys.stdout
    text = []
    for chunk in generate(model, tok, prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop,
                          chat_template=not args.no_chat_template, session=session):
        if chunk.text:
            out.write(chunk.text)
            out.flush()
            text.append(chunk.text)
        if chunk.finish_reason is not None and args.stats:
            print("\n" + _fmt_stats(chunk.stats), file=sys.stderr, flush=True)
    return "".join(text)


def _chat(model, tok, args) -> None:
    use_template = not args.no_chat_template and tok.chat_template is not None
    print(f"{PROG}: chat with {args.bundle} (/reset clears history, /exit or Ctrl-D quits)", file=sys.stderr)
    from .generate import Session

    history: list[dict] = []
    raw = ""
    session = Session()  # earlier turns stay in the cache: each turn prefills only its new tokens
    while True:
        sys.stderr.write(">>> ")
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history, raw = [], ""
            session.reset()
            continue
        if not line.strip():
            continue
        try:
            if use_template:
                history.append({"role": "user", "content": line})
                reply = _run_once(model, tok, history, args, session=session)
                history.append({"role": "assistant", "content": reply})
            else:
                raw += line + "\n"
                raw += _run_once(model, tok, raw, args, session=session)
        except BundleError as e:
            if use_template and history and history[-1]["role"] == "user":
                history.pop()
            print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.stdout.write("\n")
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from flashmoe.metal.dispatch import apply_cli_args

    apply_cli_args(args)
    try:
        if args.max_tokens < 0:
            raise BundleError(f"--max-tokens must be >= 0 (got {args.max_tokens})")
        if args.prompt is not None and not args.prompt.strip():
            raise BundleError("the prompt is empty: give some text with --prompt")
        from .generate import make_sampler
        from .loader import load

        make_sampler(args.temperature, args.top_p, args.top_k, args.seed)  # validate before loading
        model, tok = load(args.bundle, experts_per_token=args.experts_per_token, io=args.io)
        model.stats.enabled = args.stats
        if args.prompt is not None:
            _run_once(model, tok, args.prompt, args)
            sys.stdout.write("\n") if sys.stdout.isatty() else None
        else:
            _chat(model, tok, args)
        return 0
    except BundleError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not a user error: one line unless FLASHMOE_DEBUG asks for the traceback
        if os.environ.get("FLASHMOE_DEBUG"):
            raise
        print(f"{PROG}: internal error: {type(e).__name__}: {e} (set FLASHMOE_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
