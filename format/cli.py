"""flashmoe-inspect BUNDLE [--verify]: a human summary of a bundle; --verify checks every sha256."""

from __future__ import annotations

import argparse
import sys

from flashmoe.cli import add_common_arguments, run_cli

PROG = "flashmoe-inspect"


def summary(b) -> str:
    c, m = b.config, b.manifest
    e = m["experts"]
    q = "float " + e["dtype"] if e["bits"] is None else f"{e['bits']}-bit, group {e['group_size']}, {e['dtype']} scales"
    lin = sum(c.is_linear(i) for i in range(c.num_hidden_layers))
    exp_bytes = b.total_bytes("experts/")
    dense_bytes = b.total_bytes("dense/")
    src = m.get("source", {})
    lines = [
        f"bundle      {b.path}",
        f"format      {m['format']} v{m['format_version']}",
        f"source      {src.get('repo') or src.get('path') or '?'}"
        + (f" @ {src['revision'][:12]}" if src.get("revision") else "") + f" ({src.get('kind', '?')})",
        f"model       {m.get('model_type')}: {c.num_hidden_layers} layers ({lin} linear-attention, "
        f"{c.num_hidden_layers - lin} full-attention), hidden {c.hidden_size}, vocab {c.vocab_size}",
        f"experts     {c.num_experts} per layer, {c.num_experts_per_tok} routed per token, intermediate "
        f"{c.moe_intermediate_size}; {q}",
        f"record      {e['record_size']:,} bytes, stride {e['record_stride']:,} (16 KiB aligned)",
        f"per token   {c.num_experts_per_tok * e['record_size'] * c.num_hidden_layers / 1e6:,.1f} MB of expert reads "
        f"(K={c.num_experts_per_tok}, all layers, no cache hits)",
        f"dense       {dense_bytes / 1e9:.3f} GB resident ({m['dense']['bits'] or 'float'}"
        f"{'-bit' if m['dense']['bits'] else ''} Linear weights, {len(m['dense'].get('quantized', {}))} quantized modules)",
        f"experts     {exp_bytes / 1e9:.3f} GB on disk in {c.num_hidden_layers} files",
        f"skipped     {m.get('skipped', {})}",
        f"files       {len(b.files)}, {b.total_bytes() / 1e9:.3f} GB total",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Summarise a flashmoe bundle and check it.")
    p.add_argument("bundle", metavar="BUNDLE", help="bundle directory")
    p.add_argument("--verify", action="store_true",
                   help="check every file's sha256 against the manifest (exit 1 if any differs)")
    add_common_arguments(p)
    return p


def _body(args: argparse.Namespace) -> int:
    from flashmoe.format import Bundle

    b = Bundle.open(args.bundle)
    for layer in range(b.config.num_hidden_layers):
        b.expert_file(layer).close()  # header, size and layout checks of every expert file
    print(summary(b))
    if args.verify:
        bad = b.verify(progress=True)
        if bad:
            print(f"{PROG}: {len(bad)} file(s) fail their sha256: {', '.join(bad)}. "
                  "Re-pull (flashmoe-pull repairs them) or re-convert.", file=sys.stderr)
            return 1
        print("verify      all files match their sha256")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, _parser(), _body, argv)


if __name__ == "__main__":
    sys.exit(main())
