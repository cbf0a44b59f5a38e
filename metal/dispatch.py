"""Expert-block dispatch: custom dequant-FMA kernels (Metal, CUDA) or MLX built-ins.

See flashmoe.metal (``__init__``) for the public contract of :func:`expert_block`.
"""

from __future__ import annotations

import warnings

import mlx.core as mx

from . import kernels as K

CHOICES = ("auto", "builtin", "custom")
CUSTOM_BITS = (2, 4, 8)
CUSTOM_GROUPS = (32, 64, 128)
# Largest token count auto hands to the custom kernels (where AUTO_CUSTOM allows them). With slot ids into a
# 2260-slot (16 GB) pool they measured 1.43x / 1.51x / 1.36x / 1.24x faster than the built-ins at T = 1 / 4 /
# 16 / 64 on an H100 (397B shapes, 4-bit, K=10; benchmarks/RESULTS.md, 2026-11-25); not measured above 64.
AUTO_MAX_T = 64
# Where auto picks the custom kernels, per GPU backend; set from benchmarks/RESULTS.md.
# CUDA: off. The kernels win in isolation at every measured T, but end to end through the runtime with the
# GPU expert cache (397B shapes, 4 layers, K=10, warm, one run each on an H100, 2026-11-25) the built-ins
# decoded 124.1 tok/s and the custom kernels 107.2 (expert stage 0.37 vs 0.43 ms per layer; the kernel-
# independent attention stage was also 14% slower in the custom run, so part of the gap is the machine).
# Flip it when `benchmarks/gpu_session.sh kernels` shows an end-to-end win. Metal: the same body, neither
# compiled by Apple's compiler nor timed on Apple hardware yet. FLASHMOE_KERNELS=custom (or --kernels
# custom) runs the kernels on either.
AUTO_CUSTOM = {"cuda": False, "metal": False}

# Launch shapes (tunable; benchmarks/bench_kernels.py sweeps them).
#  R: rows per lane group, NWARP: warps per threadgroup, TB: tokens per pass (register blocking).
TUNING = {"gate_up": {"R": 4, "NWARP": 2, "TB": 4}, "down": {"R": 4, "NWARP": 2, "TB": 4}}  # best of the sweep in RESULTS.md
LITERAL_FMA = False  # True: per-element fma(q, s*x, z*x) instead of the factored form (A/B only)
POISON = None  # tests set float("nan"): outputs start poisoned, so an unwritten element shows up
# Largest T the custom kernels take: the gate/up kernel keeps a T-int table in threadgroup memory (16 KiB
# at 4096, under Apple's 32 KiB) and launches T*K rows of threadgroups (CUDA's grid.y limit is 65535).
CUSTOM_MAX_TOKENS = 4096
CUSTOM_MAX_PAIRS = 65535

# ------------------------------------------------------------------------------------------------
# backend selection
# ------------------------------------------------------------------------------------------------

def add_cli_argument(parser) -> None:
    """Add ``--kernels {auto,builtin,custom}`` to an argparse parser. The CLI passes the choice on in its
    RuntimeConfig (``RuntimeConfig.from_env`` also reads FLASHMOE_KERNELS); nothing here is process-wide."""
    parser.add_argument("--kernels", choices=CHOICES, default=None,
                        help="expert kernels: custom dequant-FMA kernels, MLX built-ins, or auto "
                             "(default: $FLASHMOE_KERNELS or auto)")


def gpu_backend() -> str | None:
    """'metal' or 'cuda' when MLX's default device is a GPU of that kind, else None."""
    if mx.default_device() != mx.gpu:
        return None
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return None


def custom_supported(bits, group_size, hidden, inter) -> bool:
    if bits not in CUSTOM_BITS or group_size not in CUSTOM_GROUPS:
        return False
    for n in (hidden, inter):
        wpr = n * bits // 32
        if n % group_size or wpr % 4:
            return False
        lpr = 32 if wpr >= 128 else wpr // 4
        if lpr & (lpr - 1):
            return False
    return True


def resolve(backend: str, T, bits, group_size, hidden, inter) -> str:
    """'builtin' or 'custom' for one call. The number of slots in the expert table plays no part: the
    kernels visit only the slots the indices name."""
    choice = backend
    if choice not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, not {choice!r}")
    gpu = gpu_backend()
    ok = gpu is not None and custom_supported(bits, group_size, hidden, inter)
    if choice == "custom":
        if not ok:
            raise RuntimeError(f"custom expert kernels need a Metal or CUDA GPU as MLX's default device "
                               f"and bits in {CUSTOM_BITS}, group_size in {CUSTOM_GROUPS} (got gpu={gpu}, "
                               f"bits={bits}, group_size={group_size})")
        return "custom"
    if choice == "builtin":
        return "builtin"
    auto_ok = AUTO_CUSTOM.get(gpu, False) and T <= AUTO_MAX_T
    return "custom" if ok and auto_ok else "builtin"


# ------------------------------------------------------------------------------------------------
# built-in path (MLX gather_qmm / quantized_matmul); also the reference on GPU
# ------------------------------------------------------------------------------------------------

def _gather_sort(x, indices):
    m = indices.shape[-1]
    flat = indices.flatten()
    order = mx.argsort(flat)
    inv = mx.argsort(order)
    return x.flatten(0, -3)[order // m], flat[order], inv


def _builtin_routed(x, ex, indices, scores, bits, group_size):
    """MLX built-ins: gather_qmm for quantized experts, gather_mm for float ones (bits=None)."""
    T = x.shape[0]
    xe = mx.expand_dims(x, (-2, -3))  # [T, 1, 1, H]
    do_sort = indices.size >= 64
    idx = indices
    if do_sort:
        xe, idx, inv = _gather_sort(xe, indices)

    def qmm(a, name):
        if bits is None:
            return mx.gather_mm(a, ex[f"{name}.weight"].swapaxes(-1, -2), rhs_indices=idx, sorted_indices=do_sort)
        return mx.gather_qmm(a, ex[f"{name}.weight"], ex[f"{name}.scales"], ex[f"{name}.biases"],
                             rhs_indices=idx, transpose=True, group_size=group_size, bits=bits,
                             sorted_indices=do_sort)

    g = qmm(xe, "gate_proj")
    u = qmm(xe, "up_proj")
    d = qmm((nn_silu(g) * u).astype(x.dtype), "down_proj")
    if do_sort:
        d = d[inv].reshape(*indices.shape, 1, -1)
    d = d.squeeze(-2)  # [T, K, H]
    return (d * scores[..., None].astype(d.dtype)).sum(axis=-2).astype(x.dtype).reshape(T, -1)


def nn_silu(a):
    return a * mx.sigmoid(a)


def _as(a, dtype):
    """astype that adds no graph node when the dtype already matches."""
    return a if a.dtype == dtype else a.astype(dtype)


_CONST: dict = {}


def _zeros(T):
    """A cached [T, 1] int32 zeros array (the kernels' placeholder for an absent addend)."""
    if T not in _CONST:
        _CONST[T] = mx.zeros((T, 1), mx.int32)
    return _CONST[T]


# ------------------------------------------------------------------------------------------------
# custom path
# ------------------------------------------------------------------------------------------------

def _shape_cfg(kind, out_dim, in_dim, bits, T):
    tun = TUNING[kind]
    wpr = in_dim * bits // 32
    lpr = 32 if wpr >= 128 else wpr // 4
    nwarp, r = tun["NWARP"], tun["R"]
    while out_dim % (nwarp * (32 // lpr) * r):
        if r > 1:
            r //= 2
        elif nwarp > 1:
            nwarp //= 2
        else:
            raise ValueError(f"no launch shape divides {out_dim} rows")
    return {"R": r, "LPR": lpr, "NWARP": nwarp, "TB": max(1, min(T, tun["TB"]))}


def gate_up(x32, ex, indices, bits, group_size, reference=False, prefix=""):
    """h [T, K, I] float32 = silu(gate(x)) * up(x) for the expert slot indices[t, k] (custom kernel).
    `ex` may hold any number of slots (a whole cache pool): only the slots `indices` names are touched."""
    backend = gpu_backend()
    gw, gs, gb = (ex[prefix + "gate_proj." + n] for n in ("weight", "scales", "biases"))
    uw, us, ub = (ex[prefix + "up_proj." + n] for n in ("weight", "scales", "biases"))
    if gw.ndim == 2:
        gw, gs, gb, uw, us, ub = (a[None] for a in (gw, gs, gb, uw, us, ub))
    T, H = x32.shape
    NE, I = gw.shape[0], gw.shape[1]
    KS = indices.shape[1]
    tmpl = [("BITS", bits), ("GS", group_size), ("IN_DIM", H), ("OUT_DIM", I), ("NT", T), ("KS", KS)]
    args = [x32, gw, gs, gb, uw, us, ub, indices]
    if reference:
        n = T * KS * I
        return K.get_kernel("fm_ref_gate_up", backend)(
            inputs=args, template=tmpl + [("SCALE_T", gs.dtype)], grid=(n, 1, 1), threadgroup=(256, 1, 1),
            output_shapes=[(T, KS, I)], output_dtypes=[mx.float32], init_value=POISON)[0]
    c = _shape_cfg("gate_up", I, H, bits, T)
    rows_tg = c["NWARP"] * (32 // c["LPR"]) * c["R"]
    tmpl += [(k, c[k]) for k in ("R", "LPR", "NWARP", "TB")]
    tmpl += [("NE", NE), ("LITERAL", bool(LITERAL_FMA)), ("SCALE_T", gs.dtype)]
    nt = c["NWARP"] * 32
    # one row of threadgroups per (token, k) pair: the cost follows T*K, not the NE slots of the table
    return K.get_kernel("fm_gate_up", backend)(
        inputs=args, template=tmpl, grid=(I // rows_tg * nt, T * KS, 1), threadgroup=(nt, 1, 1),
        output_shapes=[(T, KS, I)], output_dtypes=[mx.float32], init_value=POISON)[0]


def down(h, ex, indices, scores32, bits, group_size, out_dtype, add=None, reference=False, prefix=""):
    """y [T, H] = add + sum_k scores[t,k] * down_{indices[t,k]}(h[t,k]) (custom kernel)."""
    backend = gpu_backend()
    dw, ds, db = (ex[prefix + "down_proj." + n] for n in ("weight", "scales", "biases"))
    if dw.ndim == 2:
        dw, ds, db = (a[None] for a in (dw, ds, db))
    T, KS, I = h.shape
    NE, H = dw.shape[0], dw.shape[1]
    has_add = add is not None
    addv = add if has_add else _zeros(1)
    tmpl = [("BITS", bits), ("GS", group_size), ("IN_DIM", I), ("OUT_DIM", H), ("NT", T), ("KS", KS)]
    args = [h, dw, ds, db, indices, scores32, addv]
    tail = [("HAS_ADD", has_add), ("SCALE_T", ds.dtype), ("OutT", out_dtype)]
    if reference:
        n = T * H
        return K.get_kernel("fm_ref_down", backend)(
            inputs=args, template=tmpl + tail, grid=(n, 1, 1), threadgroup=(256, 1, 1),
            output_shapes=[(T, H)], output_dtypes=[out_dtype], init_value=POISON)[0]
    c = _shape_cfg("down", H, I, bits, T)
    rows_tg = c["NWARP"] * (32 // c["LPR"]) * c["R"]
    tmpl += [(k, c[k]) for k in ("R", "LPR", "NWARP", "TB")] + [("NE", NE), ("LITERAL", bool(LITERAL_FMA))]
    nt = c["NWARP"] * 32
    return K.get_kernel("fm_down", backend)(
        inputs=args, template=tmpl + tail, grid=(H // rows_tg * nt, 1, 1), threadgroup=(nt, 1, 1),
        output_shapes=[(T, H)], output_dtypes=[out_dtype], init_value=POISON)[0]


def _custom(x, ex, indices, scores, bits, group_size, residual, reference=False):
    x32 = _as(x, mx.float32)
    idx = _as(indices, mx.int32)
    h = gate_up(x32, ex, idx, bits, group_size, reference=reference)
    return down(h, ex, idx, _as(scores, mx.float32), bits, group_size, x.dtype, add=residual, reference=reference)


# ------------------------------------------------------------------------------------------------
# public entry point
# ------------------------------------------------------------------------------------------------

def expert_block(x, experts, indices, scores, bits, group_size, backend: str = "auto", residual=None):
    """y = [residual +] sum_k scores[t,k] * expert_{indices[t,k]}(x_t).

    See the package docstring (flashmoe.metal) for shapes. backend: None (env/CLI), "auto",
    "builtin", "custom", or "reference" (the plain one-thread-per-output custom kernels; tests only).
    """
    lead = x.shape[:-1]
    H = x.shape[-1]
    x2 = x.reshape(-1, H)
    idx = indices.reshape(-1, indices.shape[-1])
    sc = scores.reshape(-1, scores.shape[-1])
    res = None if residual is None else residual.reshape(-1, H)
    T = x2.shape[0]
    inter = experts["gate_proj.weight"].shape[-2]
    if backend == "reference":
        y = _custom(x2, experts, idx, sc, bits, group_size, res, reference=True)
        return y.reshape(*lead, H)
    # float experts (bits=None) have no custom kernel: always the built-in path
    which = "builtin" if bits is None else resolve(backend, T, bits, group_size, H, inter)
    if which == "custom" and (T > CUSTOM_MAX_TOKENS or T * idx.shape[-1] > CUSTOM_MAX_PAIRS):
        _warn(f"{T} tokens x {idx.shape[-1]} experts is more than the custom kernels take "
              f"({CUSTOM_MAX_TOKENS} tokens, {CUSTOM_MAX_PAIRS} pairs); using the built-in path")
        which = "builtin"
    if which == "custom":
        y = _custom(x2, experts, idx, sc, bits, group_size, res)
    else:
        y = _builtin_routed(x2, experts, idx, sc, bits, group_size)
        if res is not None:
            y = y + res.astype(y.dtype)
    return y.reshape(*lead, H)


def which_backend(T=1, bits=4, group_size=64, hidden=4096, inter=1024, backend: str = "auto") -> str:
    """What expert_block would run for these parameters ('builtin' or 'custom')."""
    return resolve(backend, T, bits, group_size, hidden, inter)


def _warn(msg):
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
