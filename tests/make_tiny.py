"""Make a tiny Qwen3.5-MoE checkpoint locally (no network): python tests/make_tiny.py OUT [--dtype D] [--layout L]

Used by `make demo` (README) to have something to convert and run on a fresh machine."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--layout", default="per_expert", choices=("per_expert", "fused"))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    a = p.parse_args()
    model = tiny.build_model(num_hidden_layers=a.layers, num_experts=a.experts)
    tiny.save_checkpoint(model, Path(a.out), a.dtype, a.layout)
    print(f"tiny Qwen3.5-MoE checkpoint ({a.layers} layers, {a.experts} experts) written to {a.out}")


if __name__ == "__main__":
    main()
