"""The largest batch a machine holds, from the engine's memory plan (runtime/engine.py MemoryPlan): no hardware,
only arithmetic on a model's shapes (bench/presets.py).

    flashmoe-bench plan --shape qwen3.5-397b-a17b --machine mac48 --context 2048 --state-dtype bfloat16
    flashmoe-bench plan --shape qwen3.5-397b-a17b --memory-gb 96 --expert-cache-gb 8
    flashmoe-bench plan --shape qwen3.5-397b-a17b --table       every machine below, float32 and bfloat16 state

Memory the run may use = memory x usable share (macOS lets the GPU wire about 75% of unified memory by default;
a discrete GPU all of its own). From it go, once: the dense weights (resident: quantized at --dense-bits like
flashmoe-convert's default, routers at 8 bits, norms float32, conv weights bfloat16), the stated expert cache
(a CUDA GPU's expert cache; on unified memory the runtime's read slots, the page cache taking what is left)
and a fixed workspace (prefill activations). Per sequence: the plan's state (delta-net state in the state
dtype + conv inputs + keys and values for `context` tokens) and its decode workspace (the last position's
logits in the activation dtype and in float32, and one delta-net layer's state in float32 twice, the
kernel's input and output, while that layer runs). B = what is left // per sequence.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from flashmoe.errors import InputError

STATE_BYTES = {"float32": 4, "bfloat16": 2}
GIB = 1 << 30


@dataclass(frozen=True)
class Machine:
    name: str
    memory_bytes: int
    usable_share: float  # of memory_bytes the run may use
    expert_cache_gb: float  # the expert cache the table states for it
    act_bytes: int = 2  # activations: bfloat16 on a GPU


# "48 GB" Macs have 48 GiB; the H200's 141 GB is decimal. The Macs' expert cache: the runtime's 32 read slots
# (216 MiB for the 397B at 4 bits, runtime/experts.py DEFAULT_SLOTS); the H200's: the runtime's default 16 GB.
MACHINES = {
    "h200": Machine("NVIDIA H200 (141 GB)", 141 * 10**9, 1.0, 16.0),
    "mac48": Machine("Mac, 48 GB unified memory", 48 * GIB, 0.75, 0.25),
    "mac128": Machine("Mac, 128 GB unified memory", 128 * GIB, 0.75, 0.25),
}
WORKSPACE_GB = 2.0  # fixed: prefill activations of a 2048-token forward and the runtime's own buffers
CONTEXT = 2048  # tokens per sequence the table plans for (prompt + answer)


def dense_bytes(cfg, bits: int | None = 8, group_size: int = 64, dtype_bytes: int = 2) -> int:
    """Bytes of a model's dense weights as flashmoe loads them (format/SPEC.md section 4): every 2-D weight of
    the Model (Linear and embedding) quantized at `bits` with bfloat16 scales and biases per `group_size`
    inputs (routers at no fewer than 8 bits), or in `dtype_bytes` when bits is None; the delta net's conv
    weight in `dtype_bytes`; norms, dt_bias and A_log in float32."""
    from mlx.utils import tree_flatten

    from flashmoe.format.layout import dense_module_bits
    from flashmoe.runtime.model import Model

    total = 0
    for name, a in tree_flatten(Model(cfg).parameters()):  # lazy: shapes only, nothing is allocated
        module = name.rsplit(".", 1)[0]
        n = a.size
        if a.ndim == 2 and not module.endswith("conv1d") and bits is not None:
            out_f, in_f = a.shape
            total += n * dense_module_bits(module, bits) // 8 + 2 * out_f * (in_f // group_size) * 2
        elif a.ndim == 2:
            total += n * dtype_bytes
        else:
            total += n * 4
    return total


@dataclass(frozen=True)
class BatchPlan:
    shape: str
    machine: str
    state_dtype: str
    context: int
    usable_bytes: int
    dense_bytes: int
    expert_cache_bytes: int
    workspace_bytes: int
    state_bytes: int  # per sequence: delta-net state + conv inputs
    kv_bytes: int  # per sequence: keys and values for `context` tokens
    decode_workspace_bytes: int  # per sequence
    batch: int  # the largest B

    @property
    def per_sequence_bytes(self) -> int:
        return self.state_bytes + self.kv_bytes + self.decode_workspace_bytes

    @property
    def left_bytes(self) -> int:
        return self.usable_bytes - self.dense_bytes - self.expert_cache_bytes - self.workspace_bytes

    def as_dict(self) -> dict:
        return dict(asdict(self), per_sequence_bytes=self.per_sequence_bytes, left_bytes=self.left_bytes)

    def describe(self) -> str:
        from flashmoe.runtime.engine import MAX_BATCH

        gb = 1e9
        rows = [("usable memory", self.usable_bytes), ("- dense weights (resident)", self.dense_bytes),
                ("- expert cache", self.expert_cache_bytes), ("- workspace", self.workspace_bytes),
                ("= for sequences", self.left_bytes)]
        out = [f"{self.shape} on {self.machine}, {self.state_dtype} delta-net state, "
               f"{self.context} tokens per sequence"]
        out += [f"  {k:<28}{v / gb:9.2f} GB" for k, v in rows]
        out.append(f"  per sequence {self.per_sequence_bytes / 1e6:.1f} MB = {self.state_bytes / 1e6:.1f} MB delta-net "
                   f"state + {self.kv_bytes / 1e6:.1f} MB KV + {self.decode_workspace_bytes / 1e6:.1f} MB decode "
                   "workspace")
        out.append(f"  largest batch B = {self.batch}")
        budget = math.ceil(self.batch * (self.state_bytes + self.kv_bytes) / 1e7) / 100
        out.append(f"  run with --state-dtype {self.state_dtype} --max-batch {max(1, self.batch)} --memory-budget-gb "
                   f"{budget:g} (the engine's memory budget counts state and KV; by default it caps B at {MAX_BATCH})")
        return "\n".join(out)


def largest_batch(shape: str | dict, machine: Machine, state_dtype: str = "float32", context: int = CONTEXT,
                  expert_cache_gb: float | None = None, workspace_gb: float = WORKSPACE_GB,
                  dense_bits: int | None = 8) -> BatchPlan:
    """The largest B of `shape` (a bench/presets.py name, or a dict of shape fields) on `machine`;
    `expert_cache_gb` None: the machine's."""
    from flashmoe.runtime.engine import MemoryPlan

    from .presets import config

    if state_dtype not in STATE_BYTES:
        raise InputError(f"state dtype {state_dtype!r} is unknown: choose one of {', '.join(STATE_BYTES)}")
    if context < 1:
        raise InputError(f"--context must be at least 1 token (got {context})")
    cache_gb = machine.expert_cache_gb if expert_cache_gb is None else expert_cache_gb
    if cache_gb < 0 or workspace_gb < 0:
        raise InputError("the expert cache and the workspace are sizes >= 0 GB")
    cfg = config(shape)
    if str(cfg.model_type).startswith("qwen4_exp"):
        raise InputError("the plan knows the Qwen3.5/Qwen3-Next layout; Qwen4-Exp's n-gram tables and indexer keys "
                         "are not in it")
    mp = MemoryPlan.for_shapes(cfg, machine.act_bytes, STATE_BYTES[state_dtype], 0, None, context)
    layer_state = cfg.linear_num_value_heads * cfg.linear_value_head_dim * cfg.linear_key_head_dim * 4
    decode_ws = cfg.vocab_size * (machine.act_bytes + 4) + 2 * layer_state
    usable = int(machine.memory_bytes * machine.usable_share)
    plan = BatchPlan(shape if isinstance(shape, str) else "custom", machine.name, state_dtype, mp.reference_context,
                     usable, dense_bytes(cfg, dense_bits), int(cache_gb * 1e9), int(workspace_gb * 1e9),
                     mp.state_bytes, mp.kv_bytes_per_token * mp.reference_context, decode_ws, 0)
    return BatchPlan(**{**asdict(plan), "batch": max(0, plan.left_bytes // plan.per_sequence_bytes)})


def table(shape: str, context: int = CONTEXT, expert_cache_gb: float | None = None,
          workspace_gb: float = WORKSPACE_GB) -> list[BatchPlan]:
    return [largest_batch(shape, m, sd, context, expert_cache_gb, workspace_gb)
            for m in MACHINES.values() for sd in STATE_BYTES]


def format_table(plans: list[BatchPlan]) -> str:
    from flashmoe.runtime.engine import MAX_BATCH

    head = f"{'machine':<30} {'state':<9} {'usable GB':>9} {'dense GB':>8} {'cache GB':>8} {'MB/seq':>7} {'B':>5}"
    lines = [f"{plans[0].shape}, {plans[0].context} tokens per sequence", head]
    for p in plans:
        lines.append(f"{p.machine:<30} {p.state_dtype:<9} {p.usable_bytes / 1e9:9.1f} {p.dense_bytes / 1e9:8.2f} "
                     f"{p.expert_cache_bytes / 1e9:8.2f} {p.per_sequence_bytes / 1e6:7.1f} {p.batch:5d}")
    lines.append(f"(B past {MAX_BATCH}, the engine's default cap, needs --max-batch B; every B needs "
                 "--memory-budget-gb, whose default is half the free memory)")
    return "\n".join(lines)


__all__ = ["BatchPlan", "MACHINES", "Machine", "dense_bytes", "format_table", "largest_batch", "table"]
