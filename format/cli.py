"""flashmoe-inspect BUNDLE [--verify]: a human summary of a bundle; --verify checks every sha256."""

from __future__ import annotations

import argparse
import sys

from flashmoe.cli import add_common_arguments, run_cli

PROG = "flashmoe-inspect"


def token_reads(b) -> dict:
    """The bytes one decoded token needs from disk, from the bundle's layout (no cache hits): experts (K routed
    records in every layer) and, for a bundle with n-gram tables, tables=None otherwise: each table gives a token
    (ngram_size-1) x heads_per_ngram rows; cold = each row's whole CRC block (read and checked the first time it
    is touched; at most, as rows may share a block), warm = the rows alone."""
    from .tables import parse_tables

    c, e = b.config, b.manifest["experts"]
    out = {"experts": c.num_experts_per_tok * e["record_size"] * c.num_hidden_layers,
           "experts_per_token": c.num_experts_per_tok, "record_size": e["record_size"], "tables": None}
    infos = [info for _, info in parse_tables(b.manifest)]
    if infos:
        rows = [(i.hash.ngram_size - 1) * i.hash.heads_per_ngram for i in infos]
        out["tables"] = {"layers": [i.layer for i in infos], "rows": sum(rows),
                         "cold": sum(r * i.block_stride for r, i in zip(rows, infos)),
                         "warm": sum(r * i.row_bytes for r, i in zip(rows, infos))}
    return out


def summary(b) -> str:
    c, m = b.config, b.manifest
    e = m["experts"]
    q = "float " + e["dtype"] if e["bits"] is None else f"{e['bits']}-bit, group {e['group_size']}, {e['dtype']} scales"
    lin = sum(c.is_linear(i) for i in range(c.num_hidden_layers))
    exp_bytes = b.total_bytes("experts/")
    dense_bytes = b.total_bytes("dense/")
    src = m.get("source", {})
    reads = token_reads(b)
    t = reads["tables"]
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
        f"per token   experts {reads['experts']:,} bytes ({reads['experts'] / 1e6:,.1f} MB: K={c.num_experts_per_tok} x "
        f"{c.num_hidden_layers} layers x {e['record_size']:,}-byte records, no cache hits)",
        "per token   tables none" if t is None else
        f"per token   tables cold {t['cold']:,} bytes (at most: {t['rows']} rows x their whole 16 KiB-aligned CRC "
        f"block, first touch), warm {t['warm']:,} bytes ({t['rows']} rows x row bytes); "
        f"{len(t['layers'])} table(s), layers {', '.join(map(str, t['layers']))}",
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
