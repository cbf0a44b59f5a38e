"""The quality table of benchmarks/RESULTS.md: the demo model converted at 8/4/3/2 bits (and float), scored
by flashmoe-eval on demo/heldout.txt against the 8-bit bundle, and the 8-bit bundle at smaller K.

    python demo/quality.py [--out out/quality]      # prints a markdown table (~10 min on a busy 2-core VM)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


TEXT = HERE / "heldout.txt"


def evaluate(bundle: Path, *extra: str) -> dict:
    r = subprocess.run(["flashmoe-eval", str(bundle), "--text", str(TEXT), "--json", "-q", *extra],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def main() -> int:
    global TEXT
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out/quality"), help="where the bundles are written")
    p.add_argument("--text", type=Path, default=TEXT, help="text to score (default demo/heldout.txt; "
                   "demo/seen.txt holds four training topics)")
    a = p.parse_args()
    TEXT = a.text
    bundles = {}
    for bits in ("none", "8", "4", "3", "2"):
        out = a.out / f"b{bits}"
        if not (out / "flashmoe.json").exists():
            subprocess.run(["flashmoe-convert", str(HERE / "model"), "-o", str(out), "--bits", bits, "-q"], check=True)
        bundles[bits] = out
    ref = bundles["8"]
    base = evaluate(ref)
    k = int(base["experts"].split("K=")[1])
    rows = [("8-bit experts (reference)", f"K={k}", base, None)]
    for bits, label in (("none", "bfloat16 experts (unquantized)"), ("4", "4-bit experts"), ("3", "3-bit experts"),
                        ("2", "2-bit experts")):
        rows.append((label, f"K={k}", None, evaluate(bundles[bits], "--compare", str(ref))))
    for kk, label in ((k * 3 // 4, "3/4"), (k // 2, "1/2")):
        rows.append((f"8-bit experts, {label} of K", f"K={kk}", None,
                     evaluate(ref, "--experts-per-token", str(kk), "--compare", str(ref))))
    print(f"text: {TEXT.name}, {base['tokens']} tokens predicted\n")
    print("| bundle | K | perplexity | vs 8-bit | mean KL(8-bit \\|\\| bundle), nats/token | largest KL | same top token |")
    print("|---|---|---|---|---|---|---|")
    for label, kcol, single, cmp in rows:
        if cmp is None:
            print(f"| {label} | {kcol} | {single['ppl']:.3f} | | 0 | 0 | 100 % |")
        else:
            print(f"| {label} | {kcol} | {cmp['ppl']:.3f} | {100 * (cmp['ppl'] / base['ppl'] - 1):+.1f} % | "
                  f"{cmp['kl']:.4f} | {cmp['kl_max']:.3f} | {100 * cmp['top1_agreement']:.1f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
