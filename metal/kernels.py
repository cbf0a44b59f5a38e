"""Dequant-FMA expert kernels: one backend-neutral body, two thin preludes (Metal, CUDA).

Layout consumed (format/SPEC.md 3.1-3.2): a weight ``[rows, in*BITS/32]`` uint32, each row a
little-endian bit stream (input ``i`` at bits ``[i*BITS, (i+1)*BITS)``), ``w = s*q + z`` per group of
``GS`` inputs with ``scales``/``biases`` ``[rows, in/GS]``. Experts are stacked on a leading axis.

Why the body compiles unchanged on both backends
-------------------------------------------------
Apple SIMD-groups and NVIDIA warps are both 32 lanes, so every kernel below is written once against a
handful of names that each prelude defines:

===================  ===========================================  ===========================================
name                 Metal prelude                                CUDA prelude
===================  ===========================================  ===========================================
FM_TG_X, FM_TG_Y     threadgroup_position_in_grid.x/.y            blockIdx.x/.y
FM_TID               thread_index_in_threadgroup                  threadIdx.x
FM_LANE, FM_WARP     thread_index_in_simdgroup, simdgroup_index…  threadIdx.x & 31, threadIdx.x >> 5
FM_GID               thread_position_in_grid.x                    blockIdx.x*blockDim.x + threadIdx.x
FM_DEV               ``device`` (address space)                   (empty)
FM_TG_MEM            ``threadgroup``                              ``__shared__``
FM_BARRIER           threadgroup_barrier(mem_threadgroup)         __syncthreads()
FM_SHFL_XOR(v, m)    simd_shuffle_xor                             __shfl_xor_sync(0xffffffff, …)
FM_AS_FLOAT(u)       as_type<float>                               __uint_as_float
FM_FMA, FM_EXP       metal::fma, metal::exp                       fmaf, __expf
===================  ===========================================  ===========================================

Each prelude has a header part (macros, before the generated signature) and a body part (first lines
of the function body; Metal's custom-kernel generator adds ``[[thread_position_in_grid]]``-style
parameters only for attribute names that appear in the *body*, so the index bindings must live there).
``uint4``/``float4`` and ``unsigned int`` (typedef ``fm_u32``) exist under the same names on both.
``render()`` assembles the text; tests/test_kernels.py checks that neither instantiation carries the
other backend's identifiers, and compiles the CUDA one with nvcc where available.

Arithmetic: the dequant-FMA form, factored
------------------------------------------
For one row and one group ``g`` of a lane's inputs, ``sum_i (s*q_i + z)*x_i`` is evaluated as
``fma(s, sum_i q_i*x_i, z*sum_i x_i)``: the per-group products ``s*x`` and ``z*x`` of the Flash-MoE
form ``fma(q, s*x, z*x)`` are hoisted out of the element loop (``s`` multiplies the group's ``q.x``
once, ``z*x`` collapses to ``z * sum(x)`` which is shared by every row the lane handles), leaving one
fma per weight. ``LITERAL=True`` instantiates the per-element form ``acc += fma(q, s*x, z*x)`` for A/B.

Integer-to-float: ``q`` is never shifted down and converted with I2F (a quarter-rate instruction on
NVIDIA). The field is masked *in place* (``w & (mask << sh)``, ``sh < 16``, after at most one
``w >> 16``) and ORed into the mantissa of 2^23: ``as_float(0x4B000000 | bits) - 2^23 = q * 2^sh``
exactly. The matching ``x`` is pre-scaled by ``2^-sh`` (exact, once per x value and shared across rows).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# --------------------------------------------------------------------------------------------------
# Preludes: the only backend-specific text.
# --------------------------------------------------------------------------------------------------

METAL_HEADER = r"""
// ---- flashmoe Metal prelude ----
#include <metal_stdlib>
using namespace metal;
typedef unsigned int fm_u32;
#define FM_DEV device
#define FM_TG_MEM threadgroup
#define FM_BARRIER threadgroup_barrier(mem_flags::mem_threadgroup)
#define FM_SHFL_XOR(v, m) simd_shuffle_xor((v), (ushort)(m))
#define FM_AS_FLOAT(u) as_type<float>((fm_u32)(u))
#define FM_FMA(a, b, c) metal::fma((a), (b), (c))
#define FM_EXP(a) metal::exp(a)
#define FM_UNROLL _Pragma("unroll")
"""

METAL_BODY = r"""
  // ---- flashmoe Metal index bindings ----
  const int FM_TG_X = int(threadgroup_position_in_grid.x);
  const int FM_TG_Y = int(threadgroup_position_in_grid.y);
  const int FM_TID = int(thread_index_in_threadgroup);
  const int FM_LANE = int(thread_index_in_simdgroup);
  const int FM_WARP = int(simdgroup_index_in_threadgroup);
  const int FM_GID = int(thread_position_in_grid.x);
"""

CUDA_HEADER = r"""
// ---- flashmoe CUDA prelude ----
typedef unsigned int fm_u32;
#define FM_DEV
#define FM_TG_MEM __shared__
#define FM_BARRIER __syncthreads()
#define FM_SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m))
#define FM_AS_FLOAT(u) __uint_as_float((fm_u32)(u))
#define FM_FMA(a, b, c) fmaf((a), (b), (c))
#define FM_EXP(a) __expf(a)
#define FM_UNROLL _Pragma("unroll")
"""

CUDA_BODY = r"""
  // ---- flashmoe CUDA index bindings ----
  const int FM_TG_X = int(blockIdx.x);
  const int FM_TG_Y = int(blockIdx.y);
  const int FM_TID = int(threadIdx.x);
  const int FM_LANE = int(threadIdx.x & 31u);
  const int FM_WARP = int(threadIdx.x >> 5);
  const int FM_GID = int(blockIdx.x * blockDim.x + threadIdx.x);
"""

PRELUDES = {"metal": (METAL_HEADER, METAL_BODY), "cuda": (CUDA_HEADER, CUDA_BODY)}

# Identifiers that must never appear in the other backend's instantiation (nor in a shared body).
CUDA_ONLY = ("__global__", "__shared__", "__syncthreads", "__shfl", "__uint_as_float", "__expf",
             "fmaf", "blockIdx", "threadIdx", "blockDim", "gridDim", "cooperative_groups", "__device__")
METAL_ONLY = ("threadgroup", "simdgroup", "simd_", "thread_position", "thread_index", "as_type",
              "metal::", "metal_stdlib", "mem_flags", "[[", "ushort", r"\bdevice\b", r"\buint\b",
              r"\bconstant\b", "bfloat16_t")

# --------------------------------------------------------------------------------------------------
# Shared building blocks of the fast bodies (plain text, spliced into each body).
# --------------------------------------------------------------------------------------------------

# Derived constants; the kernel's template args give BITS, GS, IN_DIM, OUT_DIM, R, LPR, NWARP, TB.
_CONSTS = r"""
  constexpr int VPW = 32 / BITS;                 // values per uint32 word
  constexpr int WPR = IN_DIM * BITS / 32;        // words per row
  constexpr int GPR = IN_DIM / GS;               // groups per row
  constexpr int WPG = GS * BITS / 32;            // words per group (>= 2 for every supported combo)
  constexpr int NGC = (WPG >= 4) ? 1 : 4 / WPG;  // groups inside one lane's 4-word chunk
  constexpr int WPC = 4 / NGC;                   // words per such group piece
  constexpr int RS = 32 / LPR;                   // rows handled side by side by one warp
  constexpr int ROWS_TG = NWARP * RS * R;        // rows per block of warps
  constexpr int STEP_W = LPR * 4;                // words a row's lanes consume per step
  constexpr int NSTEP = (WPR + STEP_W - 1) / STEP_W;
  constexpr fm_u32 QMASK = (1u << BITS) - 1u;
  const int sub = FM_LANE % LPR;
  const int row0 = FM_TG_X * ROWS_TG + (FM_WARP * RS + FM_LANE / LPR) * R;
"""

# Load the lane's 4*VPW activations of vector `xsrc` (float32, 16-byte aligned), pre-scale each by
# 2^-sh (sh = the in-window shift of its bit field) and sum each group piece.
_LOAD_X = r"""
        float xp[4 * VPW];
        float xsum[NGC];
        {
          const FM_DEV float4* x4 = (const FM_DEV float4*)(xsrc);
          FM_UNROLL for (int j = 0; j < VPW; ++j) {
            const float4 f = x4[j];
            xp[4 * j + 0] = f.x; xp[4 * j + 1] = f.y; xp[4 * j + 2] = f.z; xp[4 * j + 3] = f.w;
          }
          FM_UNROLL for (int c = 0; c < NGC; ++c) xsum[c] = 0.0f;
          FM_UNROLL for (int wi = 0; wi < 4; ++wi) {
            FM_UNROLL for (int v = 0; v < VPW; ++v) {
              const int sh = (v * BITS) & 15;
              xsum[wi / WPC] += xp[wi * VPW + v];
              xp[wi * VPW + v] *= 1.0f / float(1 << sh);
            }
          }
        }
"""

# One row's contribution from the 4-word chunk `wq` (uint4) with the group scales/biases at `sp`/`bp`
# (first group of the chunk; the next piece, if any, is +1). Adds into `acc`.
_DOT = r"""
          {
            const fm_u32 wv[4] = {wq.x, wq.y, wq.z, wq.w};
            FM_UNROLL for (int c = 0; c < NGC; ++c) {
              const float s = static_cast<float>(sp[c]);
              const float z = static_cast<float>(bp[c]);
              float qx = 0.0f;
              FM_UNROLL for (int wj = 0; wj < WPC; ++wj) {
                const int wi = c * WPC + wj;
                const fm_u32 lo = wv[wi];
                const fm_u32 hi = wv[wi] >> 16;
                FM_UNROLL for (int v = 0; v < VPW; ++v) {
                  const int bit = v * BITS;
                  const int sh = bit & 15;
                  const fm_u32 src = (bit >= 16) ? hi : lo;
                  const float q = FM_AS_FLOAT((src & (QMASK << sh)) | 0x4B000000u) - 8388608.0f;
                  if (LITERAL) {
                    // Flash-MoE's per-element form: fma(q, s*x, z*x) (x here pre-scaled by 2^-sh).
                    const float xr = xp[wi * VPW + v] * float(1 << sh);
                    acc = acc + FM_FMA(q, s * xp[wi * VPW + v], z * xr);
                  } else {
                    qx = FM_FMA(q, xp[wi * VPW + v], qx);
                  }
                }
              }
              if (!LITERAL) acc = FM_FMA(s, qx, FM_FMA(z, xsum[c], acc));
            }
          }
"""

_REDUCE = r"""
  FM_UNROLL for (int m = LPR / 2; m >= 1; m /= 2) {
    RED_VALUE += FM_SHFL_XOR(RED_VALUE, m);
  }
"""


def _reduce(name: str) -> str:
    return _REDUCE.replace("RED_VALUE", name)


# --------------------------------------------------------------------------------------------------
# Fast kernel 1: gate + up + SwiGLU for every (token, k) routed to one expert slot.
#   inputs : x [NT, IN_DIM] f32, gw/gs/gb, uw/us/ub (stacked over NE slots: a step's experts or a whole
#            cache pool), idx [NT, KS] int32 slot ids (a token's KS ids must be distinct)
#   output : h [NT, KS, OUT_DIM] f32 = silu(gate(x_t)) * up(x_t) for slot idx[t, k]
#   grid   : (OUT_DIM / ROWS_TG) x (NT*KS) threadgroups of NWARP*32 threads; FM_TG_Y = pair p = t*KS + k.
# The threadgroups of the first pair naming a slot do the work for every token routed to that slot (each
# expert row is read once per TB tokens); those of later pairs naming the same slot exit at once. The
# cost is O(NT*KS), independent of NE: slots nobody routed to are never visited.
# --------------------------------------------------------------------------------------------------

GATE_UP_BODY = (
    _CONSTS
    + r"""
  const int p = FM_TG_Y;
  const int e = idx[p];
  FM_TG_MEM int kk_tab[NT];  // kk_tab[t] = k with idx[t, k] == e, else -1
  FM_TG_MEM int dup;         // 1: an earlier pair names slot e, whose blocks of warps do the work
  if (FM_TID == 0) dup = 0;
  FM_BARRIER;
  for (int q = FM_TID; q < p; q += NWARP * 32) {
    if (idx[q] == e) dup = 1;
  }
  for (int t = FM_TID; t < NT; t += NWARP * 32) {
    int kk = -1;
    for (int k = 0; k < KS; ++k) {
      if (idx[t * KS + k] == e) kk = k;
    }
    kk_tab[t] = kk;
  }
  FM_BARRIER;
  if (dup != 0 || e < 0 || e >= NE) return;  // uniform across the block of warps; out-of-range slots: no work

  for (int t0 = 0; t0 < NT; t0 += TB) {
    bool any = false;
    for (int tb = 0; tb < TB; ++tb) {
      if (t0 + tb < NT && kk_tab[t0 + tb] >= 0) any = true;
    }
    if (!any) continue;  // uniform across the block of warps
    float ag[TB][R];
    float au[TB][R];
    FM_UNROLL for (int tb = 0; tb < TB; ++tb) {
      FM_UNROLL for (int r = 0; r < R; ++r) { ag[tb][r] = 0.0f; au[tb][r] = 0.0f; }
    }
    for (int st = 0; st < NSTEP; ++st) {
      const int w0 = st * STEP_W + sub * 4;
      if (w0 >= WPR) continue;  // ragged tail: this lane has no words left
      const int g0 = w0 / WPG;
      uint4 wgq[R];
      uint4 wuq[R];
      FM_UNROLL for (int r = 0; r < R; ++r) {
        const size_t row = size_t(e) * OUT_DIM + row0 + r;  // 64-bit: a cache pool can pass 2^31 words
        wgq[r] = ((const FM_DEV uint4*)(gw))[(row * WPR + w0) / 4];
        wuq[r] = ((const FM_DEV uint4*)(uw))[(row * WPR + w0) / 4];
      }
      FM_UNROLL for (int tb = 0; tb < TB; ++tb) {
        const int t = t0 + tb;
        if (t >= NT || kk_tab[t] < 0) continue;
        const FM_DEV float* xsrc = x + t * IN_DIM + w0 * VPW;
"""
    + _LOAD_X
    + r"""
        FM_UNROLL for (int r = 0; r < R; ++r) {
          const size_t row = size_t(e) * OUT_DIM + row0 + r;  // 64-bit: a cache pool can pass 2^31 words
          {
            float acc = ag[tb][r];
            const uint4 wq = wgq[r];
            const FM_DEV SCALE_T* sp = gs + row * GPR + g0;
            const FM_DEV SCALE_T* bp = gb + row * GPR + g0;
"""
    + _DOT
    + r"""
            ag[tb][r] = acc;
          }
          {
            float acc = au[tb][r];
            const uint4 wq = wuq[r];
            const FM_DEV SCALE_T* sp = us + row * GPR + g0;
            const FM_DEV SCALE_T* bp = ub + row * GPR + g0;
"""
    + _DOT
    + r"""
            au[tb][r] = acc;
          }
        }
      }
    }
    FM_UNROLL for (int tb = 0; tb < TB; ++tb) {
      const int t = t0 + tb;
      if (t >= NT || kk_tab[t] < 0) continue;
      FM_UNROLL for (int r = 0; r < R; ++r) {
        float gsum = ag[tb][r];
        float usum = au[tb][r];
"""
    + _reduce("gsum")
    + _reduce("usum")
    + r"""
        if (sub == 0) {
          const float silu = gsum / (1.0f + FM_EXP(-gsum));
          h[(t * KS + kk_tab[t]) * OUT_DIM + row0 + r] = silu * usum;
        }
      }
    }
  }
"""
)

# --------------------------------------------------------------------------------------------------
# Fast kernel 2: down projection + weighted combine of the K experts (+ addend) per token.
#   inputs : h [NT, KS, IN_DIM] f32, dw/ds/db (stacked over NE slots), idx [NT, KS] int32 slot ids,
#            sc [NT, KS] f32, add [NT, OUT_DIM] (read only when HAS_ADD)
#   output : y [NT, OUT_DIM] OutT = add + sum_k sc[t,k] * down_{idx[t,k]}(h[t,k])
#   grid   : (OUT_DIM / ROWS_TG) threadgroups; each walks the tokens in blocks of TB and, per block, the
#            distinct slots those TB tokens name (a table of TB*KS pairs built in threadgroup memory), so
#            each expert row is read once per block and the combine happens in registers (score folded
#            into each lane's partial sum, one reduction per token at the end). Cost O(NT*KS), whatever NE.
# --------------------------------------------------------------------------------------------------

DOWN_BODY = (
    _CONSTS
    + r"""
  constexpr int NP = TB * KS;      // (token, k) pairs of one block of TB tokens: idx[t0*KS + j], j < NP
  FM_TG_MEM int blk_e[NP];         // slot of pair j if it is the first pair of the block naming it, else -1
  FM_TG_MEM int blk_kk[NP * TB];   // blk_kk[j*TB + tb] = k with idx[t0+tb, k] == blk_e[j], else -1

  for (int t0 = 0; t0 < NT; t0 += TB) {
    FM_BARRIER;  // every warp is done with the previous block's tables
    for (int j = FM_TID; j < NP; j += NWARP * 32) {
      const int np = (NT - t0 < TB ? NT - t0 : TB) * KS;  // pairs that exist in this block
      int e = (j < np) ? idx[t0 * KS + j] : -1;
      if (e >= NE) e = -1;                                  // out-of-range slots are ignored
      for (int j2 = 0; j2 < j && e >= 0; ++j2) {
        if (idx[t0 * KS + j2] == e) e = -1;                 // an earlier pair of the block has it
      }
      blk_e[j] = e;
      for (int tb = 0; tb < TB; ++tb) {
        int kk = -1;
        if (e >= 0 && t0 + tb < NT) {
          for (int k = 0; k < KS; ++k) {
            if (idx[(t0 + tb) * KS + k] == e) kk = k;
          }
        }
        blk_kk[j * TB + tb] = kk;
      }
    }
    FM_BARRIER;
    float acc_y[TB][R];
    FM_UNROLL for (int tb = 0; tb < TB; ++tb) {
      FM_UNROLL for (int r = 0; r < R; ++r) acc_y[tb][r] = 0.0f;
    }
    for (int j = 0; j < NP; ++j) {
      const int e = blk_e[j];
      if (e < 0) continue;  // uniform across the block of warps
      float part[TB][R];
      FM_UNROLL for (int tb = 0; tb < TB; ++tb) {
        FM_UNROLL for (int r = 0; r < R; ++r) part[tb][r] = 0.0f;
      }
      for (int st = 0; st < NSTEP; ++st) {
        const int w0 = st * STEP_W + sub * 4;
        if (w0 >= WPR) continue;
        const int g0 = w0 / WPG;
        uint4 wdq[R];
        FM_UNROLL for (int r = 0; r < R; ++r) {
          const size_t row = size_t(e) * OUT_DIM + row0 + r;  // 64-bit: a cache pool can pass 2^31 words
          wdq[r] = ((const FM_DEV uint4*)(dw))[(row * WPR + w0) / 4];
        }
        FM_UNROLL for (int tb = 0; tb < TB; ++tb) {
          const int t = t0 + tb;
          if (t >= NT) continue;
          const int kk = blk_kk[j * TB + tb];
          if (kk < 0) continue;
          const FM_DEV float* xsrc = h + (t * KS + kk) * IN_DIM + w0 * VPW;
"""
    + _LOAD_X
    + r"""
          FM_UNROLL for (int r = 0; r < R; ++r) {
            const size_t row = size_t(e) * OUT_DIM + row0 + r;  // 64-bit: a cache pool can pass 2^31 words
            float acc = part[tb][r];
            const uint4 wq = wdq[r];
            const FM_DEV SCALE_T* sp = ds + row * GPR + g0;
            const FM_DEV SCALE_T* bp = db + row * GPR + g0;
"""
    + _DOT
    + r"""
            part[tb][r] = acc;
          }
        }
      }
      FM_UNROLL for (int tb = 0; tb < TB; ++tb) {
        const int t = t0 + tb;
        if (t >= NT) continue;
        const int kk = blk_kk[j * TB + tb];
        if (kk < 0) continue;
        const float w = sc[t * KS + kk];
        FM_UNROLL for (int r = 0; r < R; ++r) acc_y[tb][r] = FM_FMA(w, part[tb][r], acc_y[tb][r]);
      }
    }
    FM_UNROLL for (int tb = 0; tb < TB; ++tb) {
      const int t = t0 + tb;
      if (t >= NT) continue;
      FM_UNROLL for (int r = 0; r < R; ++r) {
        float ysum = acc_y[tb][r];
"""
    + _reduce("ysum")
    + r"""
        if (sub == 0) {
          const int o = t * OUT_DIM + row0 + r;
          if (HAS_ADD) ysum += static_cast<float>(add[o]);
          y[o] = static_cast<OutT>(ysum);
        }
      }
    }
  }
"""
)

# --------------------------------------------------------------------------------------------------
# Reference kernels: one thread per output, the textbook dequantize-then-multiply, (s*q + z) * x.
# --------------------------------------------------------------------------------------------------

REF_GATE_UP_BODY = r"""
  // one thread per (t, k, row); grid = NT*KS*OUT_DIM threads
  constexpr int WPR = IN_DIM * BITS / 32;
  constexpr int GPR = IN_DIM / GS;
  constexpr fm_u32 QMASK = (1u << BITS) - 1u;
  const int gid = FM_GID;
  if (gid < NT * KS * OUT_DIM) {
    const int row = gid % OUT_DIM;
    const int tk = gid / OUT_DIM;
    const int t = tk / KS;
    const int e = idx[tk];
    const size_t wrow = (size_t(e) * OUT_DIM + row) * WPR;
    const size_t srow = (size_t(e) * OUT_DIM + row) * GPR;
    float g = 0.0f;
    float u = 0.0f;
    for (int i = 0; i < IN_DIM; ++i) {
      const int bit = i * BITS;
      const fm_u32 qg = (gw[wrow + bit / 32] >> (bit % 32)) & QMASK;
      const fm_u32 qu = (uw[wrow + bit / 32] >> (bit % 32)) & QMASK;
      const float wg = static_cast<float>(gs[srow + i / GS]) * float(qg) + static_cast<float>(gb[srow + i / GS]);
      const float wu = static_cast<float>(us[srow + i / GS]) * float(qu) + static_cast<float>(ub[srow + i / GS]);
      g += wg * x[t * IN_DIM + i];
      u += wu * x[t * IN_DIM + i];
    }
    h[gid] = g / (1.0f + FM_EXP(-g)) * u;
  }
"""

REF_DOWN_BODY = r"""
  // one thread per (t, row); grid = NT*OUT_DIM threads
  constexpr int WPR = IN_DIM * BITS / 32;
  constexpr int GPR = IN_DIM / GS;
  constexpr fm_u32 QMASK = (1u << BITS) - 1u;
  const int gid = FM_GID;
  if (gid < NT * OUT_DIM) {
    const int row = gid % OUT_DIM;
    const int t = gid / OUT_DIM;
    float yv = 0.0f;
    for (int k = 0; k < KS; ++k) {
      const int e = idx[t * KS + k];
      const size_t wrow = (size_t(e) * OUT_DIM + row) * WPR;
      const size_t srow = (size_t(e) * OUT_DIM + row) * GPR;
      float d = 0.0f;
      for (int i = 0; i < IN_DIM; ++i) {
        const int bit = i * BITS;
        const fm_u32 q = (dw[wrow + bit / 32] >> (bit % 32)) & QMASK;
        const float wv = static_cast<float>(ds[srow + i / GS]) * float(q) + static_cast<float>(db[srow + i / GS]);
        d += wv * h[(t * KS + k) * IN_DIM + i];
      }
      yv += sc[t * KS + k] * d;
    }
    if (HAS_ADD) yv += static_cast<float>(add[gid]);
    y[gid] = static_cast<OutT>(yv);
  }
"""


@dataclass(frozen=True)
class KernelSpec:
    body: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


KERNELS: dict[str, KernelSpec] = {
    "fm_gate_up": KernelSpec(GATE_UP_BODY, ("x", "gw", "gs", "gb", "uw", "us", "ub", "idx"), ("h",)),
    "fm_down": KernelSpec(DOWN_BODY, ("h", "dw", "ds", "db", "idx", "sc", "add"), ("y",)),
    "fm_ref_gate_up": KernelSpec(REF_GATE_UP_BODY, ("x", "gw", "gs", "gb", "uw", "us", "ub", "idx"), ("h",)),
    "fm_ref_down": KernelSpec(REF_DOWN_BODY, ("h", "dw", "ds", "db", "idx", "sc", "add"), ("y",)),
}

BACKENDS = ("metal", "cuda")


def render(name: str, backend: str) -> tuple[str, str]:
    """(header, body) text handed to mx.fast.{metal,cuda}_kernel for kernel `name` on `backend`."""
    if backend not in PRELUDES:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    head, bind = PRELUDES[backend]
    return head, bind + KERNELS[name].body


def foreign_identifiers(text: str, backend: str) -> list[str]:
    """Identifiers of the *other* backend found in `text` (empty = clean)."""
    banned = METAL_ONLY if backend == "cuda" else CUDA_ONLY if backend == "metal" else METAL_ONLY + CUDA_ONLY
    return [b for b in banned if re.search(b if b.startswith(r"\b") else re.escape(b), text)]


_CACHE: dict[tuple[str, str], object] = {}


def get_kernel(name: str, backend: str):
    """The mx.fast kernel object for `name` on `backend` (built once, cached)."""
    import mlx.core as mx

    key = (name, backend)
    if key not in _CACHE:
        spec = KERNELS[name]
        header, body = render(name, backend)
        make = mx.fast.metal_kernel if backend == "metal" else mx.fast.cuda_kernel
        _CACHE[key] = make(name=name, input_names=list(spec.inputs), output_names=list(spec.outputs),
                           source=body, header=header, ensure_row_contiguous=True)
    return _CACHE[key]


# --------------------------------------------------------------------------------------------------
# Whole-source assembly as MLX 0.32 does it (for CPU-side checks: the text a GPU would compile).
# --------------------------------------------------------------------------------------------------

_CUDA_TYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16", "uint32": "uint32_t",
               "int32": "int32_t", "bool": "bool"}
_METAL_TYPES = {"float32": "float", "float16": "float16_t", "bfloat16": "bfloat16_t", "uint32": "uint32_t",
                "int32": "int32_t", "bool": "bool"}


def full_source(name: str, backend: str, input_dtypes, output_dtypes, template, input_sizes=None) -> str:
    """The complete kernel text MLX would generate for `name` (dtypes given as names, e.g. 'bfloat16').

    Mirrors mlx/backend/cuda/custom_kernel.cpp (build_kernel) and mlx/backend/common/metal_kernel.cpp
    (write_signature) of MLX 0.32, minus MLX's own default includes (which the caller supplies)."""
    spec = KERNELS[name]
    header, body = render(name, backend)
    ins = list(zip(spec.inputs, input_dtypes))
    outs = list(zip(spec.outputs, output_dtypes))
    sizes = input_sizes or [1 << 20] * len(ins)

    if backend == "cuda":
        params = [f"    const {_CUDA_TYPES[d]}* {n}" for n, d in ins] + [f"    {_CUDA_TYPES[d]}* {n}" for n, d in outs]
        consts = []
        for k, v in template:
            if isinstance(v, bool):
                consts.append(f"  constexpr bool {k} = {'true' if v else 'false'};")
            elif isinstance(v, int):
                consts.append(f"  constexpr int {k} = {v};")
            else:
                consts.append(f"  using {k} = {_CUDA_TYPES[v]};")
        return (header + "namespace mlx::core::cu {\n\n__global__ void custom_kernel_" + name + "(\n"
                + ",\n".join(params) + ") {\n" + "\n".join(consts) + "\n\n" + body + "\n}\n\n}\n")
    attrs = [("thread_position_in_grid", "uint3"), ("thread_index_in_simdgroup", "uint"),
             ("thread_index_in_threadgroup", "uint"), ("threadgroup_position_in_grid", "uint3"),
             ("simdgroup_index_in_threadgroup", "uint")]
    params = []
    for (n, d), size in zip(ins, sizes):
        loc = "constant" if size < 8 else "device"
        params.append(f"  const {loc} {_METAL_TYPES[d]}* {n} [[buffer({len(params)})]]")
    for n, d in outs:
        params.append(f"  device {_METAL_TYPES[d]}* {n} [[buffer({len(params)})]]")
    params += [f"  {t} {a} [[{a}]]" for a, t in attrs if a in body]
    tparams = ", ".join(("bool " if isinstance(v, bool) else "int " if isinstance(v, int) else "typename ") + k
                        for k, v in template)
    targs = ", ".join(("true" if v else "false") if isinstance(v, bool) else str(v) if isinstance(v, int)
                      else _METAL_TYPES[v] for k, v in template)
    kname = "custom_kernel_" + name
    return (header + f"template <{tparams}>\n[[kernel]] void {kname}(\n" + ",\n".join(params) + ") {\n"
            + body + "\n}\n" + f'\ntemplate [[host_name("{kname}_inst")]] [[kernel]] decltype({kname}<{targs}>) '
            f"{kname}<{targs}>;\n")
