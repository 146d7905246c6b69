"""Causal varlen GQA attention. (Triton kernel pending: issue 5; reference path for now.)"""

import torch

from kernels import reference


def attention(q, k, v, cu_seqlens: torch.Tensor, max_seqlen: int, softmax_scale: float | None = None):
    """q: (tokens, heads, head_dim); k, v: (tokens, kv_heads, head_dim); cu_seqlens: (docs+1,) int32."""
    return reference.attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale)
