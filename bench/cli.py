"""flashmoe-bench: synthetic full-shape bundles and an honest performance report.

    flashmoe-bench make --shape qwen3.5-397b-a17b --layers 4 --bits 4 -o DIR
    flashmoe-bench run DIR [--tokens 32] [--experts-per-token K] [--json FILE] [--chart FILE.png] [--peer]
    flashmoe-bench doctor [--dir PATH]
"""

from __future__ import annotations

import argparse
import sys

from .presets import PRESETS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flashmoe-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="write a bundle with a real model's shapes and random weights")
    m.add_argument("--shape", required=True, choices=sorted(PRESETS))
    m.add_argument("--layers", type=int, default=4, help="layers to write (the full model's pattern; default 4)")
    m.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    m.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("-o", "--output", required=True)
    r = sub.add_parser("run", help="decode through the runtime, cold and warm, against this machine's limits")
    r.add_argument("bundle")
    r.add_argument("--tokens", type=int, default=32)
    r.add_argument("--experts-per-token", type=int, default=None)
    r.add_argument("--io", choices=("pread", "mmap"), default="pread")
    r.add_argument("--stickiness", type=float, default=0.2, help="synthetic routing: share of experts kept from the "
                                                                  "previous token (default 0.2)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--peer", action="store_true", help="also decode the same weights with mlx-lm in memory "
                                                        "(needs mlx-lm and RAM for the whole bundle)")
    r.add_argument("--prefill", type=int, default=0, metavar="N",
                   help="also time a batched prefill of an N-token prompt (cold), e.g. 512")
    r.add_argument("--json", default=None, metavar="FILE")
    r.add_argument("--chart", default=None, metavar="FILE.png")
    d = sub.add_parser("doctor", help="what this machine can run, and how fast, before downloading")
    d.add_argument("--dir", default=".", help="where bundles would live (its disk is measured)")
    d.add_argument("--json", default=None, metavar="FILE")
    a = p.parse_args(argv)
    from flashmoe.format import BundleError

    try:
        if a.cmd == "make":
            from .synth import make_bundle

            make_bundle(a.shape, a.layers, a.bits, a.output, group_size=a.group_size, seed=a.seed)
        elif a.cmd == "run":
            from .probe import peak_rss_mb
            from .run import chart, format_table, run, write_json

            rep = run(a.bundle, tokens=a.tokens, experts_per_token=a.experts_per_token, io=a.io,
                      stickiness=a.stickiness, seed=a.seed, peer=a.peer, prefill=a.prefill)
            rep["peak_rss_mb"] = peak_rss_mb()
            print(format_table(rep))
            if a.json:
                write_json(rep, a.json)
            if a.chart:
                try:
                    chart(rep, a.chart)
                except ImportError:
                    print("flashmoe-bench: --chart needs matplotlib (pip install 'flashmoe[bench]')", file=sys.stderr)
                    return 2
        else:
            from .doctor import doctor, format_report

            rep = doctor(a.dir)
            print(format_report(rep))
            if a.json:
                import json

                with open(a.json, "w") as f:
                    json.dump(rep, f, indent=1)
    except BundleError as e:
        print(f"flashmoe-bench: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
