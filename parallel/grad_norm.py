"""Global gradient norm and clipping coefficient."""

import math

import torch
import torch.distributed as dist
import torch.nn as nn


def global_grad_norm(params: list[nn.Parameter], groups: tuple = ()) -> float:
    """L2 norm of all main grads, every logical parameter counted once.

    Parameters replicated across tensor-parallel ranks (norm weights) carry
    `p.tp_replicated = True` and are counted on TP rank 0 only; sums are then all-reduced over
    `groups` (the TP and PP groups: DP ranks hold identical, already-reduced gradients).
    """
    sq = torch.zeros((), dtype=torch.float32, device=params[0].main_grad.device)
    for p in params:
        if getattr(p, "tp_replicated", False) and getattr(p, "tp_rank", 0) != 0:
            continue
        sq += p.main_grad.float().pow(2).sum()
    for g in groups:
        if g is not None and dist.get_world_size(g) > 1:
            dist.all_reduce(sq, group=g)
    return math.sqrt(sq.item())


def clip_coefficient(norm: float, max_norm: float) -> float:
    """Megatron's clip factor: max_norm / (norm + 1e-6) when the norm exceeds max_norm, else 1."""
    if max_norm <= 0 or not math.isfinite(norm):
        return 1.0
    return min(1.0, max_norm / (norm + 1e-6))
