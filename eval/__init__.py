"""flashmoe.eval: how good is a bundle? Perplexity over a text, and the KL divergence of its next-token
distributions from another bundle's (a higher-precision conversion, or the same bundle at its own K)."""

from .perplexity import Divergence, Perplexity, compare, perplexity

__all__ = ["Perplexity", "Divergence", "perplexity", "compare"]
