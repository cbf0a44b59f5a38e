"""A projection to more layers checked against a measurement: the cold single-stream decode of a shallow
bundle (e.g. 4 layers) projected to a deeper bundle's layers (e.g. 12 or 16, same shapes, same default expert
cache), against what the deeper bundle measured (bench.method.projection_check).

    python benchmarks/bench_projection.py SHALLOW.json DEEP.json [--json OUT]

SHALLOW.json and DEEP.json are `flashmoe-bench run --json` reports (cold phase; per-pass medians). Besides
the plain projection (per-layer time x layers), the shallow report's read-adjusted projection (its cold
reads scaled by the simulated extra reads a deeper model makes with the same slots) is compared too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def phase_figures(rep: dict) -> dict:
    cold = rep["decode"].get("cold")
    if cold is None:
        raise SystemExit(f"bench_projection: {rep['bundle']}: the report has no cold phase (pages could not be evicted)")
    tokens = rep["tokens"]
    return {"layers": rep["layers"], "seconds_per_token": 1.0 / cold["tok_s"], "head_s_per_token": cold["head"] / tokens,
            "expert_bytes_per_token": cold["expert_bytes_per_token"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shallow")
    p.add_argument("deep")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    from flashmoe.bench import method

    s, d = (json.loads(Path(x).read_text()) for x in (a.shallow, a.deep))
    for key in ("preset", "bits", "experts_per_token", "expert_slots"):
        if s.get(key) != d.get(key):
            raise SystemExit(f"bench_projection: the runs differ in {key} ({s.get(key)} vs {d.get(key)}): not comparable")
    out = method.projection_check(phase_figures(s), phase_figures(d))
    adj = s["decode"]["cold"].get("projected_full_model_tok_s_read_adjusted")
    if adj and s["full_model_layers"] == d["layers"]:
        out["read_adjusted_time_error"] = (1.0 / adj) / out["measured_seconds_per_token"] - 1.0
    out["shallow"], out["deep"] = a.shallow, a.deep
    out["metadata"] = method.metadata()
    print(f"projection {out['shallow_layers']} -> {out['deep_layers']} layers: projected "
          f"{out['projected_seconds_per_token']:.3f} s/token, measured {out['measured_seconds_per_token']:.3f} "
          f"({out['time_error']:+.1%}); expert bytes per token projected {out['projected_expert_bytes_per_token'] / 1e9:.2f} "
          f"GB, measured {out['measured_expert_bytes_per_token'] / 1e9:.2f} GB ({out['bytes_error']:+.1%})")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
