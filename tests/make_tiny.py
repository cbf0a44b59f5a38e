"""Make a tiny checkpoint locally (no network): python tests/make_tiny.py OUT [--arch A] [--dtype D] [--layout L]

Used by `make demo` (README) to have something to convert and run on a fresh machine. --arch picks the
architecture: qwen3_5_moe (default; Qwen3.5 / Qwen3.6 MoE, text model) or qwen3_next (Qwen3-Next, with its
fused delta-net projections). The weights are random: for a trained one see tests/tiny_models.py."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402
import tiny_models  # noqa: E402

BUILDERS = {"qwen3_5_moe": ("Qwen3.5-MoE", tiny.build_model), "qwen3_next": ("Qwen3-Next", tiny_models.build_next)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out")
    p.add_argument("--arch", default="qwen3_5_moe", choices=sorted(BUILDERS))
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--layout", default="per_expert", choices=("per_expert", "fused"))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    a = p.parse_args()
    name, build = BUILDERS[a.arch]
    model = build(num_hidden_layers=a.layers, num_experts=a.experts)
    tiny.save_checkpoint(model, Path(a.out), a.dtype, a.layout)
    print(f"tiny {name} checkpoint ({a.layers} layers, {a.experts} experts) written to {a.out}")


if __name__ == "__main__":
    main()
