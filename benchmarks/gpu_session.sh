#!/usr/bin/env bash
# Checks and benchmarks on an NVIDIA GPU machine (MLX's CUDA build), each mode sized to fit one device
# call (<= 9 minutes). Results (JSON + logs) go to $OUT (or ./out/gpu).
#
# A fresh machine has no MLX: stage it here with `bash ../shared/gpu/stage-mlx-cuda.sh` (and, for the mlx-lm
# peer, `pip download --no-deps -d .whl/part2 mlx-lm==0.32.2`), then
#   call 1 (carry .whl/part1):  mkdir -p /tmp/stage && cp .whl/part1/* /tmp/stage/
#   call 2 (carry .whl/part2, within 30 s):  bash benchmarks/gpu_session.sh setup && bash benchmarks/gpu_session.sh MODE
# Later calls on the same warm machine need only `bash benchmarks/gpu_session.sh MODE ...` (setup is kept).
#
# Modes (the issue-9 table is single + batch for both shapes, four calls; bundles stay in $BENCH_DIR
# between calls on a warm machine and are made again on a fresh one):
#   setup                 install the staged MLX wheels, mlx-lm if staged, and flashmoe (editable, no deps)
#   tests                 runtime + kernel + bench tests on the GPU
#   kernels               kernel tests; custom vs built-in over a 16 GB cache pool by batch size; end to end
#                         through the runtime (397B shapes, warm GPU cache), builtin vs custom
#   single SHAPE          SHAPE = 397b | 35b: single-stream decode, cold (honestly timed: compiled first, pages
#                         evicted) vs the disk roofline, warm; 35b adds the mlx-lm peer on the same weights
#   batch SHAPE           --batch 1,8,32,128 (uniform and calibrated routing) vs the read-sharing bound and the
#                         compute ceiling; 512-token prompts, so B=128 is a batched prefill of 65536 tokens
#   prefill SHAPE         cold single-prompt prefill of 128 and 512 tokens
#   upload SHAPE          single, once per way records reach the GPU cache (FLASHMOE_UPLOAD=direct, pinned)
#   optimistic SHAPE      warm decode with the model's own router (benchmarks/gpu_optimistic.py): host-routed,
#                         optimistic, flashmoe.generate (pipelined); 35b adds mlx-lm on the same weights
#   newtests              the GPU-only runtime/engine tests of the pinned upload and the pipelined decode
#   serve                 benchmarks/bench_serve.py on the 397b bundle, 1/4/16/64 clients (installs the wheels
#                         in .whl/serve first: fastapi, uvicorn, ...; the device has no registry)
#
# The measured modes of issue #19 (bench/method.py: disk limit by an O_DIRECT queue-depth sweep in the same run,
# rooflines on needed bytes, per-pass median and spread, bounds checked, settings read back into every JSON):
#   prepare SHAPE LAYERS  make a bundle once per machine (e.g. `prepare 35b 40` before warm35, `prepare 397b 12`
#                         before regime/project), so a mode's call is not spent writing tens of GB
#   prepare-warm35        the 40-layer 35B bundle (20 GB) and its mlx-lm copy (20 GB, benchmarks/bench_warm.py
#                         --export-only), so that warm35 spends its call measuring
#   warm35                warm decode of the full 40-layer 35B shapes (4-bit, every expert in the GPU cache) vs
#                         mlx-lm on the same weights (benchmarks/bench_warm.py): per-pass median and spread of
#                         PASSES (10) interleaved passes of 256 tokens after a 512-token prompt, prefill ratio,
#                         greedy agreement and max logit difference; B=8 and B=32 greedy vs mlx-lm's BatchGenerator
#                         (BATCH_PASSES, 5). Within LIMIT (540) s: the run's --budget-s is LIMIT - 30, so it takes
#                         fewer passes when 10 do not fit (and says so), and warm35.json is rewritten after every pass
#   all-b                 warm35 in one call of at most LIMIT (560) s, whatever is missing made first (bundle, mlx-lm
#                         copy): the budget is what is left of LIMIT after that, less 30 s
#   grammar               benchmarks/bench_grammar.py on the 4-layer 35B bundle, B=1 and 32, 64 tokens (installs the
#                         llguidance wheel in .whl/lg first when there is one)
#   disk [SHAPE]          the QD sweep + cold single-stream decode vs the needed-bytes roofline, K=10 and K=4,
#                         IO (default direct: O_DIRECT reads), 4 layers of SHAPE (default both: 397b then 35b;
#                         give one shape per call if both do not fit in 9 minutes)
#   project               the projection checked: cold decode of the 4-layer and DEEP-layer (default 12) 397b
#                         bundles with the default cache, benchmarks/bench_projection.py on the two
#   regime                the disk-bound batch regime: 397b shapes, DEEP layers (12: 41 GB) with the GPU expert
#                         cache capped at GPU_CACHE_GB (default 8: the bundle is 5x its cache), IO direct:
#                         bench_batch.py, a loop sample of 8 of DOCS (32) documents, every batch step reported
#   regime-steps          the same bundle and cache through flashmoe-bench run --batch 1,8,32 (uniform routing)
#   clean                 delete the bundles in $BENCH_DIR (the 64 GiB disk holds either the 35B x40 bundle with its
#                         mlx-lm copy, 36 GB, or the 397B x4 + x12 bundles, 58 GB, not both)
# Suggested order on one machine: prepare-warm35; warm35 (or all-b alone); clean; disk 397b; disk 35b; prepare 397b 12;
# project; regime; regime-steps.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
D=${BENCH_DIR:-/tmp/flashmoe-bench}
LAYERS=${LAYERS:-4}
TOKENS=${TOKENS:-32}
LOG="$OUT/log.txt"

shape_name() { case "$1" in 397b) echo qwen3.5-397b-a17b ;; 35b) echo qwen3.5-35b-a3b ;; *) echo "unknown shape $1 (397b|35b)" >&2; exit 2 ;; esac; }

bundle() {  # bundle SHAPE BITS [LAYERS] -> path (made once per machine)
  local layers=${3:-$LAYERS}
  local dir="$D/$1-q$2"
  [ "$layers" = 4 ] || dir="$D/$1-q$2-l$layers"
  if [ ! -f "$dir/flashmoe.json" ]; then
    rm -rf "$dir" "$dir-mlxlm"  # (an mlx-lm copy of an earlier bundle would be refused)
    /usr/bin/time -f "make $1 q$2 $layers layers: %e s, %M KB peak RSS" flashmoe-bench make --shape "$(shape_name "$1")" \
      --layers "$layers" --bits "$2" -o "$dir" >>"$LOG" 2>&1 || { tail -5 "$LOG"; exit 1; }
  fi
  echo "$dir"
}
IO=${IO:-direct}
DEEP=${DEEP:-12}
io_ok() {  # the runtime must have the io mode asked for (io=direct lands with the iofmt work)
  python3 -c "from flashmoe.runtime.config import IO_MODES; import sys; sys.exit('$IO' not in IO_MODES)" || {
    echo "this flashmoe has no io mode '$IO' (RuntimeConfig IO_MODES lacks it): merge the O_DIRECT reader first, or run with IO=pread" | tee -a "$LOG"; exit 2; }
}

warm_run() {  # warm_run SECONDS BUNDLE: bench_warm.py within SECONDS (its budget 30 s less: the last pass and exit)
  local left=$1 b=$2
  [ "$left" -gt 60 ] || { echo "only $left s left for warm35: nothing measured" | tee -a "$LOG"; return 1; }
  timeout "$left" python3 benchmarks/bench_warm.py "$b" --prompt-tokens "${PROMPT_WARM:-512}" --tokens "${TOKENS_WARM:-256}" \
    --passes "${PASSES:-10}" --batch "${BATCH:-8,32}" --batch-tokens "${BATCH_TOKENS:-64}" \
    --batch-passes "${BATCH_PASSES:-5}" --budget-s $((left - 30)) --peer-dir "$b-mlxlm" --json "$OUT/warm35.json" 2>&1 \
    | tee -a "$LOG"
}

gpu_info() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
  python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())" 2>&1 | tee -a "$LOG"
  date -u | tee -a "$LOG"
}

case "${1:-}" in
  setup)
    name=$(cat /tmp/stage/mlx.wheelname)
    cat /tmp/stage/mlxcuda.part.aa .whl/part2/mlxcuda.part.ab > "/tmp/stage/$name"
    python3 -m pip install -q --no-deps --no-index /tmp/stage/mlx-*.whl "/tmp/stage/$name" 2>&1 | grep -v WARNING
    ls .whl/part2/mlx_lm-*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-deps --no-index .whl/part2/mlx_lm-*.whl 2>&1 | grep -v WARNING
    python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING
    gpu_info
    ;;
  tests)
    gpu_info
    timeout 520 python3 -m pytest -q -s tests/test_kernels.py tests/test_runtime.py tests/test_bench.py tests/test_bench_*.py \
      -k "not nvcc and not stub" 2>&1 \
      | grep -E "^ERR|passed|failed|Error|error" | tee "$OUT/tests.txt"
    ;;
  kernels)
    gpu_info
    # the slot-id GPU tests only (NVRTC compiles each configuration in ~5-30 s, so the full file takes
    # longer than one call; `tests` runs it)
    timeout 200 python3 -m pytest -q -s tests/test_kernels.py -k "pool or out_of_range or auto" 2>&1 \
      | grep -E "^ERR|passed|failed|Error" | tee -a "$LOG"
    timeout 150 python3 benchmarks/bench_kernels.py --pool 2260 --K 10 --bits 4 --T 1 4 16 64 \
      --json "$OUT/kernels-pool.json" 2>&1 | grep -E "^\||bandwidth|pool" | tee -a "$LOG"
    b=$(bundle 397b 4)
    for kern in builtin custom; do
      echo "== end to end, FLASHMOE_KERNELS=$kern" | tee -a "$LOG"
      FLASHMOE_KERNELS=$kern timeout 150 flashmoe-bench run "$b" --tokens "$TOKENS" \
        --json "$OUT/e2e-397b-k10-$kern.json" 2>&1 | tee -a "$LOG"
    done
    ;;
  single)
    s=${2:?shape: 397b or 35b}
    gpu_info
    b=$(bundle "$s" 4)
    peer=""; [ "$s" = 35b ] && peer="--peer"
    timeout 480 flashmoe-bench run "$b" --tokens "$TOKENS" $peer --json "$OUT/single-$s.json" 2>&1 | tee -a "$LOG"
    ;;
  batch)
    s=${2:?shape: 397b or 35b}
    gpu_info
    b=$(bundle "$s" 4)
    timeout "${LIMIT:-500}" flashmoe-bench run "$b" --tokens 16 --batch "${BATCH:-1,8,32,128}" --batch-tokens "${BATCH_TOKENS:-16}" \
      --batch-prompt-tokens "${BATCH_PROMPT:-512}" --routing "${ROUTING:-uniform,calibrated}" \
      --json "$OUT/batch-$s-${ROUTING:-both}-${BATCH:-all}.json" 2>&1 | tee -a "$LOG"
    ;;
  prefill)
    s=${2:?shape: 397b or 35b}
    b=$(bundle "$s" 4)
    for n in 128 512; do
      timeout 240 flashmoe-bench run "$b" --tokens 8 --prefill "$n" --json "$OUT/prefill-$s-$n.json" 2>&1 | tee -a "$LOG"
    done
    ;;
  upload)
    s=${2:?shape: 397b or 35b}
    gpu_info
    b=$(bundle "$s" 4)
    for u in direct pinned; do
      echo "== FLASHMOE_UPLOAD=$u" | tee -a "$LOG"
      FLASHMOE_UPLOAD=$u timeout 240 flashmoe-bench run "$b" --tokens "$TOKENS" --json "$OUT/single-$s-$u.json" 2>&1 | tee -a "$LOG"
    done
    ;;
  optimistic)
    s=${2:?shape: 397b or 35b}
    b=$(bundle "$s" 4)
    peer=""; [ "$s" = 35b ] && peer="--peer"
    timeout 300 python3 benchmarks/gpu_optimistic.py "$b" --tokens 64 --reps 5 $peer --json "$OUT/optimistic-$s.json" 2>&1 | tee -a "$LOG"
    ;;
  newtests)
    timeout 300 python3 -m pytest -q tests/test_runtime.py tests/test_engine.py -k "upload or pipelined or optimistic" 2>&1 \
      | grep -E "^ERR|passed|failed|Error|error" | tee -a "$LOG"
    ;;
  serve)
    python3 -m pip install -q --no-deps --no-index .whl/serve/*.whl 2>&1 | grep -v WARNING
    b=$(bundle 397b 4)
    timeout 540 python3 benchmarks/bench_serve.py "$b" --clients ${CLIENTS:-1 4 16 64} --max-tokens 32 \
      --json "$OUT/serve-397b.json" 2>&1 | tee -a "$LOG"
    ;;
  prepare)
    s=${2:?shape: 397b or 35b}
    b=$(bundle "$s" 4 "${3:-4}")
    du -sh "$b" | tee -a "$LOG"; df -h "$D" | tail -1 | tee -a "$LOG"
    ;;
  prepare-warm35)
    gpu_info
    b=$(bundle 35b 4 40)
    timeout "${LIMIT:-540}" python3 benchmarks/bench_warm.py "$b" --peer-dir "$b-mlxlm" --export-only 2>&1 | tee -a "$LOG"
    du -sh "$b" "$b-mlxlm" | tee -a "$LOG"; df -h "$D" | tail -1 | tee -a "$LOG"
    ;;
  warm35)
    gpu_info
    b=${WARM_BUNDLE:-$(bundle 35b 4 40)}  # WARM_BUNDLE: another bundle (a test's tiny one)
    warm_run "${LIMIT:-540}" "$b"
    ;;
  all-b)
    t0=$SECONDS
    gpu_info
    b=${WARM_BUNDLE:-$(bundle 35b 4 40)}
    warm_run $(( ${LIMIT:-560} - (SECONDS - t0) )) "$b"
    ;;
  grammar)
    gpu_info
    if ls .whl/lg/*.whl >/dev/null 2>&1; then
      python3 -m pip install -q --no-deps --no-index .whl/lg/*.whl 2>&1 | grep -v WARNING
    fi
    b=$(bundle 35b 4)
    timeout "${LIMIT:-520}" python3 benchmarks/bench_grammar.py "$b" --batch "${BATCH:-1,32}" --tokens "${GRAMMAR_TOKENS:-64}" \
      --json "$OUT/grammar.json" 2>&1 | tee -a "$LOG"
    ;;
  disk)
    gpu_info
    io_ok
    for s in ${2:-397b 35b}; do
      b=$(bundle "$s" 4)
      for k in 10 4; do
        timeout "${LIMIT:-240}" flashmoe-bench run "$b" --tokens 32 --passes 5 --experts-per-token "$k" --io "$IO" \
          --json "$OUT/disk-$s-k$k.json" 2>&1 | tee -a "$LOG"
      done
    done
    ;;
  project)
    gpu_info
    io_ok
    for layers in 4 "$DEEP"; do
      b=$(bundle 397b 4 "$layers")
      timeout "${LIMIT:-240}" flashmoe-bench run "$b" --tokens 16 --passes 5 --io "$IO" \
        --json "$OUT/project-397b-l$layers.json" 2>&1 | tee -a "$LOG"
    done
    python3 benchmarks/bench_projection.py "$OUT/project-397b-l4.json" "$OUT/project-397b-l$DEEP.json" \
      --json "$OUT/project-397b-4-vs-$DEEP.json" 2>&1 | tee -a "$LOG"
    ;;
  regime)
    gpu_info
    io_ok
    b=$(bundle 397b 4 "$DEEP")
    timeout "${LIMIT:-520}" python3 benchmarks/bench_batch.py "$b" --docs "${DOCS:-32}" --loop-docs 8 \
      --prompt-tokens "${PROMPT:-128}" --gen-tokens "${GEN:-32}" --gpu-cache-gb "${GPU_CACHE_GB:-8}" --io "$IO" \
      --routing "${ROUTING:-calibrated}" -q --out "$OUT/regime" 2>&1 | tee -a "$LOG"
    ;;
  regime-steps)
    gpu_info
    io_ok
    b=$(bundle 397b 4 "$DEEP")
    timeout "${LIMIT:-520}" flashmoe-bench run "$b" --tokens 16 --passes 5 --io "$IO" --gpu-cache-gb "${GPU_CACHE_GB:-8}" \
      --batch "${BATCH:-1,8,32}" --batch-tokens 16 --batch-prompt-tokens "${BATCH_PROMPT:-128}" \
      --routing "${ROUTING:-uniform}" --json "$OUT/regime-steps.json" 2>&1 | tee -a "$LOG"
    ;;
  clean)
    rm -rf "${D:?}"/* && df -h "$D" | tail -1
    ;;
  *) echo "usage: $0 setup|tests|kernels|single|batch|prefill|upload|optimistic SHAPE|newtests|serve|prepare SHAPE LAYERS|prepare-warm35|warm35|all-b|grammar|disk [SHAPE]|project|regime|regime-steps|clean  (SHAPE: 397b|35b)"; exit 2 ;;
esac
