"""Rotary embeddings. (Triton kernel pending: issue 4; reference path for now.)"""

import torch

from kernels import reference


def rotary(q, k, positions, theta: float = 10000.0, scaling_factor: float = 1.0, inplace: bool = False):
    """q: (tokens, heads, head_dim), k: (tokens, kv_heads, head_dim), positions: (tokens,)."""
    return reference.rotary(q, k, positions, theta, scaling_factor)
