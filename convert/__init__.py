"""flashmoe.convert: Qwen3.5-MoE checkpoints (Hub or local; float, FP8 or MLX-quantized) to bundles."""

from .converter import convert_checkpoint

__all__ = ["convert_checkpoint"]
