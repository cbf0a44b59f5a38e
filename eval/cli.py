"""flashmoe-eval BUNDLE --text FILE [--compare REF]: perplexity over a text, and the KL divergence from a
reference bundle's next-token distributions (the quality meter for bits and experts per token).

    flashmoe-eval out/q4 --text wiki.txt                       perplexity
    flashmoe-eval out/q2 --text wiki.txt --compare out/q8      side by side, KL(q8 || q2)
    flashmoe-eval out/q4 --text wiki.txt --experts-per-token 5 --compare out/q4   the cost of a smaller K
    flashmoe-eval out/q4 --text wiki.txt --state-dtype bfloat16 --chunk 1 --compare out/q4
                                                               the cost of bfloat16 delta-net state
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from flashmoe.cli import add_common_arguments, add_runtime_flags, run_cli, runtime_config_from_args
from flashmoe.errors import InputError

PROG = "flashmoe-eval"


def _parser() -> argparse.ArgumentParser:
    from flashmoe.eval.perplexity import CHUNK, WINDOW

    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                epilog="\n".join(__doc__.split("\n\n")[1].splitlines()),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", metavar="BUNDLE", help="bundle directory or Hub repo id to measure")
    p.add_argument("--text", required=True, metavar="FILE",
                   help="UTF-8 text to score ('-' reads stdin); plain text, no chat template")
    p.add_argument("--compare", metavar="REF",
                   help="reference bundle of the same model: report both side by side and the mean "
                        "KL(REF || BUNDLE) of their next-token distributions")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help="score only the first N tokens of the text (default: all)")
    p.add_argument("--window", type=int, default=WINDOW, metavar="N",
                   help=f"tokens per window; each window starts with an empty cache (default {WINDOW}, "
                        "capped by the model's context)")
    p.add_argument("--chunk", type=int, default=CHUNK, metavar="N",
                   help=f"tokens per forward pass; memory holds N x vocab logits (default {CHUNK})")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_runtime_flags(p)  # --experts-per-token and --state-dtype apply to BUNDLE only (REF: its own K, float32 state)
    add_common_arguments(p)
    return p


def _describe(model) -> str:
    e = model.bundle.manifest["experts"]
    bits = "float" if e["bits"] is None else f"{e['bits']}-bit"
    return f"{bits} experts, K={model.experts_per_token}, {model.runtime_config.state_dtype} state"


def _body(a: argparse.Namespace) -> int:
    import flashmoe
    from flashmoe.eval import compare, perplexity
    from flashmoe.runtime.cli import read_text

    text = read_text(a.text, "--text")
    if a.max_tokens is not None and a.max_tokens < 2:
        raise InputError(f"--max-tokens must be >= 2 (got {a.max_tokens})")
    config = runtime_config_from_args(a)
    model, tok = flashmoe.load(a.bundle, config)
    ids = tok.encode(text)[: a.max_tokens]
    ref = None
    if a.compare:
        ref, ref_tok = flashmoe.load(a.compare, dataclasses.replace(config, experts_per_token=None,
                                                                    state_dtype="float32"))
        if ref_tok.encode(text)[: len(ids)] != ids:
            raise InputError(f"{a.compare} tokenizes the text differently from {a.bundle}; "
                             "compare bundles of the same model")
    from tqdm.auto import tqdm

    with tqdm(total=max(len(ids) - 1, 0), unit="tok", desc="scoring", disable=a.quiet, file=sys.stderr) as bar:
        if ref is None:
            r = perplexity(model, ids, window=a.window, chunk=a.chunk, progress=bar.update)
        else:
            r, rr, d = compare(model, ref, ids, window=a.window, chunk=a.chunk, progress=bar.update)
    out = {"bundle": str(a.bundle), "experts": _describe(model), "tokens": r.tokens, "ppl": r.ppl,
           "nll": r.nll, "seconds": r.seconds}
    if ref is not None:
        out["reference"] = {"bundle": str(a.compare), "experts": _describe(ref), "ppl": rr.ppl, "nll": rr.nll,
                            "seconds": rr.seconds}
        out.update(kl=d.kl, kl_max=d.kl_max, top1_agreement=d.top1)
    if a.json:
        print(json.dumps(out))
        return 0
    print(f"text        {a.text}: {len(ids)} tokens, {r.tokens} predicted")
    if ref is None:
        print(f"bundle      {a.bundle} ({out['experts']})")
        print(f"perplexity  {r.ppl:.4f}  (mean NLL {r.nll:.4f} nats/token)")
        print(f"time        {r.seconds:.1f} s ({r.tokens / max(r.seconds, 1e-9):.0f} tok/s)")
        return 0
    rows = [("", "BUNDLE", "REF"), ("bundle", str(a.bundle), str(a.compare)),
            ("experts", out["experts"], out["reference"]["experts"]),
            ("perplexity", f"{r.ppl:.4f}", f"{rr.ppl:.4f}"),
            ("mean NLL", f"{r.nll:.4f}", f"{rr.nll:.4f}"),
            ("time", f"{r.seconds:.1f} s", f"{rr.seconds:.1f} s")]
    w0 = max(len(x[0]) for x in rows)
    w1 = max(len(x[1]) for x in rows)
    for x in rows:
        print(f"{x[0]:<{w0}}  {x[1]:<{w1}}  {x[2]}")
    print(f"KL(REF || BUNDLE)  {d.kl:.5f} nats/token (mean), {d.kl_max:.4f} (largest)")
    print(f"same top token     {100 * d.top1:.1f} % of positions")
    print(f"perplexity change  {100 * (r.ppl / rr.ppl - 1):+.2f} % vs REF")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, _parser(), _body, argv)


if __name__ == "__main__":
    sys.exit(main())
