#!/usr/bin/env bash
# Expert-parallel ranks on one host with two NVIDIA GPUs (nvidia-h100-x2): 397B shapes at 1 rank vs 2 ranks,
# cold and warm, each rank reading its own copy of the bundle on local disk. Each mode fits one device call
# (<= 9 minutes). Results (JSON + log) go to $OUT (default out/gpu-dist).
#
# Needs MLX's CUDA build and flashmoe installed: `bash benchmarks/gpu_session.sh setup` first (see there).
#   bash benchmarks/gpu_distributed.sh make         397B-shaped 4-bit bundle ($LAYERS layers) + a second copy
#   bash benchmarks/gpu_distributed.sh backend      which mlx.launch backend runs here: nccl, else ring
#   bash benchmarks/gpu_distributed.sh disk         random 6.75 MiB reads, cold: one reader vs two at once
#                                                   (both copies share this host's disk: the real I/O ceiling)
#   bash benchmarks/gpu_distributed.sh collective   all_sum per MoE layer [T, 4096] bf16 and the plan broadcast
#   bash benchmarks/gpu_distributed.sh decode [K]   decode at 1 and 2 ranks, cold then warm (K: experts per
#                                                   token, default the model's 10; run again with 4)
# The speed-up to compare against: 2x of the I/O-bound rate when each rank has its own disk; on one host
# with one disk, the `disk` mode's two-reader aggregate over the one-reader rate.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu-dist}
mkdir -p "$OUT"
D=${BENCH_DIR:-/tmp/flashmoe-bench}
LAYERS=${LAYERS:-4}
TOKENS=${TOKENS:-32}
LOG="$OUT/log.txt"
B0="$D/397b-q4-r0"
B1="$D/397b-q4-r1"

backend() {  # the first backend whose 2-rank all_sum works on this host
  if [ -f "$OUT/backend" ]; then cat "$OUT/backend"; return; fi
  local check='import mlx.core as mx; g = mx.distributed.init(strict=True); x = mx.distributed.all_sum(mx.ones((4,)), group=g); mx.eval(x); assert x.tolist() == [2.0] * 4; print("rank", g.rank(), "ok on", mx.default_device())'
  for b in nccl ring; do
    if timeout 120 mlx.launch --backend "$b" -n 2 -- python3 -c "$check" >>"$LOG" 2>&1 \
       && [ "$(grep -c ' ok on ' "$LOG")" -ge 2 ]; then echo "$b" | tee "$OUT/backend"; return; fi
    echo "backend $b failed (see $LOG)" >&2
    sed -i '/ ok on /d' "$LOG"
  done
  echo none
}

case "${1:-}" in
  make)
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$LOG"; date -u | tee -a "$LOG"
    if [ ! -f "$B0/flashmoe.json" ]; then
      rm -rf "$B0"
      /usr/bin/time -f "make: %e s" flashmoe-bench make --shape qwen3.5-397b-a17b --layers "$LAYERS" --bits 4 \
        -o "$B0" 2>&1 | tail -3 | tee -a "$LOG"
    fi
    if [ ! -f "$B1/flashmoe.json" ]; then
      rm -rf "$B1.tmp" && cp -r "$B0" "$B1.tmp" && mv "$B1.tmp" "$B1"  # rank 1's own copy (same bytes)
    fi
    du -sh "$B0" "$B1" | tee -a "$LOG"; df -h "$D" | tail -1 | tee -a "$LOG"
    ;;
  backend)
    backend
    ;;
  disk)
    python3 - "$B0" "$B1" <<'PY' 2>&1 | tee -a "$LOG" "$OUT/disk.txt"
import sys, time
from concurrent.futures import ProcessPoolExecutor
from flashmoe.bench import probe
from flashmoe.format import Bundle
def one(path, seed):
    b = Bundle.open(path); i = b.expert_info(0); files = probe.file_list(b)
    probe.evict(files)
    return probe.random_reads(files, i.data_offset, i.record_stride, i.record_size, 256, b.config.num_experts, seed=seed)
alone = one(sys.argv[1], 1)
with ProcessPoolExecutor(2) as ex:
    both = list(ex.map(one, sys.argv[1:3], [2, 3]))
print(f"cold random reads: one reader {alone:.2f} GB/s; two readers at once {both[0]:.2f} + {both[1]:.2f} = "
      f"{sum(both):.2f} GB/s ({sum(both) / alone:.2f}x)")
PY
    ;;
  collective)
    b=$(backend)
    python3 benchmarks/bench_distributed.py collective --ranks 2 --backend "$b" --gpu-per-rank \
      --json "$OUT/collective-$b.json" 2>&1 | tail -25 | tee -a "$LOG"
    ;;
  decode)
    b=$(backend); k=${2:-10}
    python3 benchmarks/bench_distributed.py decode "$D/397b-q4-r{rank}" --ranks 1,2 --tokens "$TOKENS" \
      --experts-per-token "$k" --backend "$b" --gpu-per-rank --json "$OUT/decode-k$k-$b.json" 2>&1 \
      | tail -60 | tee -a "$LOG"
    ;;
  *)
    sed -n 2,17p "$0"; exit 2 ;;
esac
