"""Test oracles: a readable numpy forward pass of the Llama family (see ``llama_ref``)."""

from .llama_ref import LlamaRef, RefParams, dequantize_tensor, rope_inv_freq

__all__ = ["LlamaRef", "RefParams", "dequantize_tensor", "rope_inv_freq"]
