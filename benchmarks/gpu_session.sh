#!/usr/bin/env bash
# Runtime checks and benchmarks on an NVIDIA GPU machine with MLX's CUDA build installed
# (see ../shared/gpu/stage-mlx-cuda.sh for getting it onto a machine without package access).
#   bash benchmarks/gpu_session.sh tests            runtime + kernel tests on the GPU
#   bash benchmarks/gpu_session.sh bench397 BITS    397B-shaped bundle: decode K=4 and K=10, cold and warm
#   bash benchmarks/gpu_session.sh prefill BITS     397B-shaped bundle: cold batched prefill of 128 and 512 tokens
#   bash benchmarks/gpu_session.sh peer             35B-shaped bundle vs mlx-lm in memory (needs mlx-lm)
# Results go to $OUT (or ./out/gpu).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
D=${BENCH_DIR:-/tmp/flashmoe-bench}
LAYERS=${LAYERS:-8}
TOKENS=${TOKENS:-32}
case "${1:-}" in
  tests)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())" | tee -a "$OUT/gpu.txt"
    python3 -m pytest -q tests/test_runtime.py tests/test_convert.py tests/test_bench.py 2>&1 | tail -25 | tee "$OUT/tests.txt"
    ;;
  bench397)
    bits=${2:-4}
    rm -rf "$D/q$bits"
    /usr/bin/time -v flashmoe-bench make --shape qwen3.5-397b-a17b --layers "$LAYERS" --bits "$bits" -o "$D/q$bits" \
      2> "$OUT/make-q$bits.txt" || { tail "$OUT/make-q$bits.txt"; exit 1; }
    grep -E "Elapsed|Maximum resident" "$OUT/make-q$bits.txt"
    for k in 4 10; do
      for kern in ${KERNS:-auto builtin}; do
        FLASHMOE_KERNELS=$kern flashmoe-bench run "$D/q$bits" --tokens "$TOKENS" --experts-per-token "$k" \
          --json "$OUT/397b-q$bits-k$k-$kern.json" | tee "$OUT/397b-q$bits-k$k-$kern.txt"
      done
    done
    rm -rf "$D/q$bits"
    ;;
  prefill)
    bits=${2:-4}
    rm -rf "$D/f$bits"
    flashmoe-bench make --shape qwen3.5-397b-a17b --layers "$LAYERS" --bits "$bits" -o "$D/f$bits" 2>/dev/null
    for n in 128 512; do
      flashmoe-bench run "$D/f$bits" --tokens 8 --prefill "$n" --json "$OUT/397b-q$bits-prefill$n.json" \
        | tee "$OUT/397b-q$bits-prefill$n.txt"
    done
    rm -rf "$D/f$bits"
    ;;
  peer)
    rm -rf "$D/p4"
    flashmoe-bench make --shape qwen3.5-35b-a3b --layers "$LAYERS" --bits 4 -o "$D/p4"
    flashmoe-bench run "$D/p4" --tokens "$TOKENS" --peer --json "$OUT/35b-peer.json" | tee "$OUT/35b-peer.txt"
    rm -rf "$D/p4"
    ;;
  *) echo "usage: $0 tests|bench397 BITS|prefill BITS|peer"; exit 2 ;;
esac
