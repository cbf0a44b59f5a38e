"""flashmoe.metal: dequant-FMA expert kernels (Metal and CUDA from one body) and their dispatch.

Public API (stable; the runtime calls only this)
-----------------------------------------------

``flashmoe.metal.dispatch.expert_block(x, experts, indices, scores, bits, group_size, backend=None,
residual=None) -> y``

* ``x``: ``[T, H]`` (or ``[..., H]``) activations, float16 / bfloat16 / float32.
* ``experts``: dict of stacked arrays over ``S`` slots (the experts loaded this step, or a whole GPU
  expert cache: the kernels touch only the slots ``indices`` names, so the cost does not grow with
  ``S``), named as in the bundle record (format/SPEC.md 3.1): ``"gate_proj.weight"`` ``[S, I, H*bits/32]`` uint32,
  ``"gate_proj.scales"`` / ``"gate_proj.biases"`` ``[S, I, H/G]``; the same for ``up_proj``;
  ``"down_proj.weight"`` ``[S, H, I*bits/32]``, ``"down_proj.scales"``/``"biases"`` ``[S, H, I/G]``.
* ``indices``: ``[T, K]`` int32 slot ids INTO ``experts`` (not global expert ids); a token's K ids
  are distinct (as top-k routing gives them); a slot outside ``[0, S)`` contributes nothing on the
  custom path and is an error on the built-in one.
* ``scores``: ``[T, K]`` routing weights (already normalised as the model wants).
* ``bits``, ``group_size``: the routed experts' quantization (manifest ``experts.bits/group_size``).
  The shared expert is not part of it: the model applies it (runtime/model.py).
* ``residual``: optional ``[T, H]`` added to the result (the custom path fuses it into the down
  kernel's combine, so ``h + moe(h)`` costs no extra pass).
* returns ``y`` ``[T, H]`` in ``x.dtype``:
  ``residual + sum_k scores[t,k] * down_e(silu(gate_e(x_t)) * up_e(x_t))``
  with ``e = indices[t, k]``.
* ``backend``: one of ``{auto, builtin, custom}`` (default ``auto``; the runtime passes its
  RuntimeConfig's ``kernels``, which the CLIs take from ``--kernels`` or ``FLASHMOE_KERNELS``). ``auto`` = custom kernels where
  ``dispatch.AUTO_CUSTOM`` allows them for the GPU backend (today: nowhere; on CUDA they win in
  isolation but not yet end to end, see dispatch.py and benchmarks/RESULTS.md), with bits in (2, 4, 8),
  group_size in (32, 64, 128) and ``T <= AUTO_MAX_T``; MLX's built-ins (``mx.gather_qmm`` /
  ``mx.quantized_matmul``) otherwise.
  ``custom`` forces the kernels on Metal or CUDA (error on CPU);
  ``builtin`` forces MLX's ops.

Helpers: ``dispatch.add_cli_argument(parser)`` (adds ``--kernels {auto,builtin,custom}`` to a CLI),
``dispatch.which_backend(T, bits, group_size, hidden, inter, backend)``.

Shared expert on the custom path: when it is quantized with bits 2/4/8 (bundles store it at 8 bits
or as float), it runs through the same two kernels (K=1, score = its sigmoid gate) and its result is
the addend that the routed down kernel combines into; a float shared expert runs through MLX matmuls
and is fused the same way. Launches per layer at decode: 2 (routed) + 2 (quantized shared) + the
gate's matvec and the casts.

Kernels: flashmoe.metal.kernels (one body per kernel, Metal and CUDA preludes, plain reference
kernels beside the fast ones). Results: benchmarks/RESULTS.md.
"""

from . import dispatch, kernels  # noqa: F401
from .dispatch import expert_block  # noqa: F401

__all__ = ["expert_block", "dispatch", "kernels"]
