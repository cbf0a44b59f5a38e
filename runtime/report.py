"""The figures of a finished generation as text (flashmoe-run --stats, the chat's /stats)."""

from __future__ import annotations


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
