"""Global gradient norm and clipping coefficient."""

import math

import torch
import torch.distributed as dist
import torch.nn as nn

from parallel.comm import group_size


def global_grad_norm(params: list[nn.Parameter], groups: tuple = ()) -> float:
    """L2 norm of all main grads (p.grad where there is none), every logical parameter once.

    Each rank sums the squares of its own shards; parameters replicated over TP (norm weights,
    `p.tp_replicated`) count on TP rank 0 only. The sum is then all-reduced over `groups`: pass
    the TP and PP groups, (dims.tp_group, dims.pp_group). Not the DP group: after
    GradBuffer.finish() every DP rank holds the same, already-reduced gradients, and nothing is
    sharded over DP (no distributed optimizer), so a DP sum would count each gradient dp times.
    Padded vocabulary rows are included; their gradients are zero (never looked up, excluded
    from the loss), so they do not change the norm. One host sync (the returned float).
    """
    grads = []
    for p in params:
        if getattr(p, "tp_replicated", False) and getattr(p, "tp_rank", 0) != 0:
            continue
        g = getattr(p, "main_grad", None)
        g = p.grad if g is None else g
        if g is not None:
            grads.append(g)
    if grads:
        norms = torch._foreach_norm([g.float() if g.dtype != torch.float32 else g for g in grads])
        sq = torch.stack(norms).double().pow(2).sum()  # fp64: exact-enough sum over many tensors
    else:
        device = params[0].device if params else torch.device("cpu")
        sq = torch.zeros((), dtype=torch.float64, device=device)
    for g in groups:
        if group_size(g) > 1:
            dist.all_reduce(sq, group=g)
    return math.sqrt(sq.item())


def clip_coefficient(norm: float, max_norm: float) -> float:
    """Megatron's clip factor: max_norm / (norm + 1e-6) when the norm exceeds max_norm, else 1."""
    if max_norm <= 0 or not math.isfinite(norm):
        return 1.0
    return min(1.0, max_norm / (norm + 1e-6))
