"""Prediction recall (flashmoe.bench.recall) on the two trained models this repository has: the demo model
(demo/model, converted with flashmoe-convert, scored on demo/heldout.txt and demo/seen.txt) and the tests'
trained tiny model (tests/conftest.py `trained`: 60 AdamW steps on its TEXT, written as a float bundle).

    python benchmarks/recall_models.py --out benchmarks/results/2026-12 [--tokens 512]

Writes recall-demo-heldout.json, recall-demo-seen.json and recall-tiny.json to --out.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for the JSON files")
    p.add_argument("--tokens", type=int, default=512, help="tokens of each text (default 512)")
    a = p.parse_args(argv)
    from flashmoe.bench.recall import format_recall, recall, write

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flashmoe-recall-") as d:
        demo = Path(d) / "demo"
        subprocess.run([sys.executable, "-m", "flashmoe.convert.cli", str(ROOT / "demo" / "model"), "-o", str(demo),
                        "-q"], check=True, timeout=600)
        for name in ("heldout", "seen"):
            r = recall(demo, (ROOT / "demo" / f"{name}.txt").read_text(), a.tokens)
            r["model"] = f"demo/model (converted, 4-bit experts), text demo/{name}.txt"
            print(format_recall(r))
            write(r, out / f"recall-demo-{name}.json")
        # the tests' trained tiny model, built exactly as the test fixtures build it
        sys.path.insert(0, str(ROOT / "tests"))
        import conftest
        from runtime_bundle import write_bundle
        from tiny import save_tokenizer
        from tokenizers import Tokenizer as HFTok

        tok_dir = Path(d) / "tok"
        tok_dir.mkdir()
        save_tokenizer(tok_dir, 512)
        ids = HFTok.from_file(str(tok_dir / "tokenizer.json")).encode(conftest.TEXT).ids
        model = conftest.trained.__wrapped__(ids)
        tiny = write_bundle(model, Path(d) / "tiny")
        r = recall(tiny, conftest.TEXT, a.tokens)
        r["model"] = f"tests/conftest.py trained tiny model ({conftest.STEPS} steps), float bundle, its training text"
        print(format_recall(r))
        write(r, out / "recall-tiny.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
