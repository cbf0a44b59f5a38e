"""flashmoe-bench: synthetic full-shape bundles and an honest performance report.

    flashmoe-bench make --shape qwen3.5-397b-a17b --layers 4 --bits 4 -o DIR
    flashmoe-bench run DIR [--tokens 32] [--passes 5] [--experts-per-token K] [--io pread|mmap|direct]
                       [--gpu-cache-gb GB | --slots N] [--json FILE] [--chart FILE.png] [--peer]
                       [--prefetch-recall [R1,R2,...]]
    flashmoe-bench run DIR --batch 1,8,32,128 [--routing uniform,calibrated]
    flashmoe-bench recall BUNDLE --text FILE [--tokens 512] [--json FILE]
    flashmoe-bench doctor [--dir PATH]
    flashmoe-bench plan --shape qwen3.5-397b-a17b --machine h200|mac48|mac128 | --memory-gb GB | --table
                        [--context 2048] [--state-dtype bfloat16] [--expert-cache-gb GB] [--json FILE]
"""

from __future__ import annotations

import argparse
import sys

from flashmoe.cli import add_common_arguments, run_cli
from flashmoe.errors import InputError

from .prefetch import MEASURED_RECALL
from .presets import PRESETS
from .routing import MODELS as ROUTING_MODELS

PROG = "flashmoe-bench"


def _sizes(text: str) -> list[int]:
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give batch sizes as comma-separated integers, e.g. 1,8,32") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: batch sizes must be positive integers, e.g. 1,8,32")
    return out


def _routings(text: str) -> list[str]:
    out = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in out if v not in ROUTING_MODELS]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"{text!r}: routing models are {', '.join(ROUTING_MODELS)} (comma-separated)")
    return out


def _recalls(text: str) -> list[float]:
    try:
        out = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give recalls as comma-separated numbers from 0 to 1, "
                                         "e.g. 0,0.5,0.84,1") from None
    if not out or any(not 0.0 <= v <= 1.0 for v in out):
        raise argparse.ArgumentTypeError(f"{text!r}: a recall is a share from 0 to 1, e.g. 0,0.5,0.84,1")
    return list(dict.fromkeys(out))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{make,run,recall,doctor,plan}")
    m = sub.add_parser("make", help="write a bundle with a real model's shapes and random weights")
    m.add_argument("--shape", required=True, choices=sorted(PRESETS), help="which model's shapes to copy")
    m.add_argument("--layers", type=int, default=4, help="layers to write (the full model's pattern; default 4)")
    m.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8), help="bits per expert weight (default 4)")
    m.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128),
                   help="weights sharing one scale and bias (default 64)")
    m.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    m.add_argument("-o", "--output", required=True, help="directory to write the bundle to")
    r = sub.add_parser("run", help="decode through the runtime, cold and warm, against this machine's limits")
    r.add_argument("bundle", help="bundle directory (flashmoe-bench make writes one)")
    r.add_argument("--tokens", type=int, default=32,
                   help="tokens to time per pass (default 32; fewer than 16 gives noisy figures)")
    r.add_argument("--experts-per-token", type=int, default=None,
                   help="experts each token uses (default: the model's own)")
    r.add_argument("--io", choices=("pread", "mmap", "direct"), default="pread",
                   help="how expert records are read: pread (default), mmap, or direct (O_DIRECT, bypassing the page "
                        "cache; needs a runtime that has it)")
    r.add_argument("--passes", type=int, default=5, help="timed passes per phase; figures are their median and "
                                                         "spread (default 5, at least 5 to be reported as such)")
    r.add_argument("--sweep-seconds", type=float, default=1.0,
                   help="seconds per queue depth of the disk-limit sweep (1..64 reads in flight; default 1.0)")
    r.add_argument("--gpu-cache-gb", type=float, default=None,
                   help="GPU expert cache size in GB (CUDA; default the runtime's); the report reads back what took effect")
    r.add_argument("--slots", type=int, default=None, help="expert cache slots (default the runtime's); read back")
    r.add_argument("--stickiness", type=float, default=0.2, help="uniform synthetic routing: share of experts kept from "
                                                                  "the previous token (default 0.2)")
    r.add_argument("--seed", type=int, default=0, help="random seed of the synthetic routing (default 0)")
    r.add_argument("--peer", action="store_true", help="also decode the same weights with mlx-lm in memory "
                                                        "(needs mlx-lm, RAM for the whole bundle, and 4 or more layers)")
    r.add_argument("--prefill", type=int, default=0, metavar="N",
                   help="also time a batched prefill of an N-token prompt (cold), e.g. 512")
    r.add_argument("--batch", type=_sizes, default=None, metavar="B1,B2,...",
                   help="also decode B sequences together through the batched engine for each batch size, "
                        "against the read-sharing bound and the compute ceiling, e.g. 1,8,32,128")
    r.add_argument("--batch-tokens", type=int, default=16, metavar="N",
                   help="with --batch: tokens generated per sequence (default 16)")
    r.add_argument("--batch-prompt-tokens", type=int, default=256, metavar="N",
                   help="with --batch: prompt tokens per sequence; more than the largest batch (default 256)")
    r.add_argument("--routing", type=_routings, default=list(ROUTING_MODELS), metavar="MODELS",
                   help="with --batch: synthetic routing models to run, comma-separated: uniform (random, sticky) "
                        "and/or calibrated (matches real models' cache hit rates); default both")
    r.add_argument("--prefetch-recall", type=_recalls, nargs="?", const=[MEASURED_RECALL], default=None,
                   metavar="R1,R2,...",
                   help="also run cold decode with speculative prefetch on, interleaved pass by pass with it off over "
                        "the same routes, the model handed guesses of layer L+1's experts with this recall (each "
                        f"right expert kept with that probability); the flag alone: {MEASURED_RECALL}, the recall "
                        "measured on the trained demo model (bench/prefetch.py); several values give a measured "
                        "curve, e.g. 0,0.5,0.84,1")
    r.add_argument("--json", default=None, metavar="FILE", help="also write the full report as JSON")
    r.add_argument("--chart", default=None, metavar="FILE.png", help="also draw a chart of time per layer (needs matplotlib)")
    c = sub.add_parser("recall", help="how often a layer's router, applied a layer early, names the experts the "
                                      "next layer will use (speculative prefetch)")
    c.add_argument("bundle", help="bundle directory of a trained model (random weights route at chance)")
    c.add_argument("--text", required=True, metavar="FILE", help="text to run through the model (UTF-8)")
    c.add_argument("--tokens", type=int, default=512, help="tokens of the text to use (default 512)")
    c.add_argument("--experts-per-token", type=int, default=None, help="experts each token uses (default: the model's)")
    c.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    d = sub.add_parser("doctor", help="what this machine can run, and how fast, before downloading")
    d.add_argument("--dir", default=".", help="where bundles would live (its disk is measured)")
    d.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    _plan_parser(sub)
    return p


def _plan_parser(sub) -> None:
    from .plan import CONTEXT, MACHINES, STATE_BYTES, WORKSPACE_GB

    pl = sub.add_parser("plan", help="the largest batch a machine holds, from the engine's memory plan (no hardware)")
    pl.add_argument("--shape", default="qwen3.5-397b-a17b", choices=sorted(PRESETS),
                    help="which model's shapes (default qwen3.5-397b-a17b)")
    m = pl.add_mutually_exclusive_group(required=True)
    m.add_argument("--machine", choices=sorted(MACHINES),
                   help="h200 (141 GB), mac48 or mac128 (48/128 GiB unified memory, 75%% usable by the GPU)")
    m.add_argument("--memory-gb", type=float, metavar="GB", help="a machine of this much memory (GB = 1e9 bytes)")
    m.add_argument("--table", action="store_true", help="every --machine, float32 and bfloat16 state")
    pl.add_argument("--usable-share", type=float, default=None, metavar="F",
                    help="share of --memory-gb the run may use (default 1.0; a Mac's GPU wires about 0.75)")
    pl.add_argument("--expert-cache-gb", type=float, default=None, metavar="GB",
                    help="expert cache to keep (default: the machine's: 16 on the H200, 0.25 on a Mac, 0 for "
                         "--memory-gb)")
    pl.add_argument("--context", type=int, default=CONTEXT, metavar="N",
                    help=f"tokens per sequence, prompt and answer (default {CONTEXT})")
    pl.add_argument("--state-dtype", choices=sorted(STATE_BYTES), default="float32",
                    help="delta-net state dtype (default float32; the runtime's --state-dtype)")
    pl.add_argument("--workspace-gb", type=float, default=WORKSPACE_GB, metavar="GB",
                    help=f"fixed workspace (prefill activations, buffers; default {WORKSPACE_GB:g})")
    pl.add_argument("--json", default=None, metavar="FILE", help="also write the plan(s) as JSON")


def _plan(a: argparse.Namespace) -> None:
    from .plan import MACHINES, Machine, format_table, largest_batch, table

    if a.table:
        plans = table(a.shape, a.context, a.expert_cache_gb, a.workspace_gb)
        print(format_table(plans))
    else:
        if a.machine:
            machine = MACHINES[a.machine]
            if a.usable_share is not None:
                raise InputError("--usable-share goes with --memory-gb (a --machine has its own)")
        else:
            share = 1.0 if a.usable_share is None else a.usable_share
            if not (a.memory_gb > 0 and 0 < share <= 1):
                raise InputError("--memory-gb must be positive and --usable-share in (0, 1]")
            machine = Machine(f"{a.memory_gb:g} GB x {share:g}", int(a.memory_gb * 1e9), share, 0.0)
        plans = [largest_batch(a.shape, machine, a.state_dtype, a.context, a.expert_cache_gb, a.workspace_gb)]
        print(plans[0].describe())
    if a.json:
        import json

        from flashmoe.hub.common import write_new

        write_new(a.json, (json.dumps({"plans": [p.as_dict() for p in plans]}, indent=1) + "\n").encode())


def body(a: argparse.Namespace) -> int:
    if a.cmd == "make":
        from .synth import make_bundle

        make_bundle(a.shape, a.layers, a.bits, a.output, group_size=a.group_size, seed=a.seed)
    elif a.cmd == "run":
        from .probe import peak_rss_mb
        from .run import chart, format_table, run, write_json

        if a.tokens < 1:
            raise InputError("--tokens must be at least 1")
        if a.passes < 1:
            raise InputError("--passes must be at least 1 (5 or more for a median with a spread)")
        if a.chart:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise InputError("--chart needs matplotlib: pip install 'flashmoe[bench]'") from None
        rep = run(a.bundle, tokens=a.tokens, experts_per_token=a.experts_per_token, io=a.io,
                  stickiness=a.stickiness, seed=a.seed, peer=a.peer, prefill=a.prefill, batch=a.batch,
                  batch_tokens=a.batch_tokens, batch_prompt_tokens=a.batch_prompt_tokens, routing=a.routing,
                  passes=a.passes, sweep_seconds=a.sweep_seconds, gpu_cache_gb=a.gpu_cache_gb, slots=a.slots,
                  prefetch_recalls=a.prefetch_recall or ())
        rep["peak_rss_mb"] = peak_rss_mb()
        print(format_table(rep))
        if a.json:
            write_json(rep, a.json)
        if a.chart:
            chart(rep, a.chart)
    elif a.cmd == "recall":
        from .recall import format_recall, recall, write

        try:
            text = open(a.text, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--text {a.text}: cannot read it as UTF-8 text ({e})") from None
        if a.tokens < 2:
            raise InputError("--tokens must be at least 2")
        rep = recall(a.bundle, text, a.tokens, a.experts_per_token)
        print(format_recall(rep))
        if a.json:
            write(rep, a.json)
    elif a.cmd == "plan":
        _plan(a)
    else:
        from .doctor import doctor, format_report

        rep = doctor(a.dir)
        print(format_report(rep))
        if a.json:
            from .run import write_json

            write_json(rep, a.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main())
