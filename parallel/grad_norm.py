"""Global gradient norm and clipping coefficient."""

import math

import torch
import torch.distributed as dist
import torch.nn as nn

from parallel.comm import group_size

# The CPU sums a norm's squares sequentially in fp32, whose error grows with the length (a 4M-
# element gradient's norm was off by 9e-5 relative, 16M by 7e-4, and the clip factor with it):
# on CPU both norms below take chunks of this many values and sum the chunk norms in fp64.
CPU_NORM_CHUNK = 1 << 12


def global_grad_norm(params: list[nn.Parameter], groups: tuple = ()) -> float:
    """`global_grad_norm_sq`'s square root on the host: one host sync."""
    return math.sqrt(global_grad_norm_sq(params, groups).item())


def global_grad_norm_sq(params: list[nn.Parameter], groups: tuple = ()) -> torch.Tensor:
    """Squared L2 norm of all main grads (p.grad where there is none), every logical parameter
    once: a 0-d fp64 tensor on the gradients' device, not read, so a caller can read it together
    with its other scalars (one host sync for all).

    Each rank sums the squares of its own shards; parameters replicated over TP (norm weights,
    `p.tp_replicated`) count on TP rank 0 only. The sum is then all-reduced over `groups`: pass
    the TP and PP groups, (dims.tp_group, dims.pp_group). Not the DP group: after
    GradBuffer.finish() every DP rank holds the same, already-reduced gradients, so a DP sum
    would count each gradient dp times (with the distributed optimizer use `sharded_grad_norm`).
    Padded vocabulary rows are included; their gradients are zero (never looked up, excluded
    from the loss), so they do not change the norm.
    """
    grads = []
    for p in params:
        if getattr(p, "tp_replicated", False) and getattr(p, "tp_rank", 0) != 0:
            continue
        g = getattr(p, "main_grad", None)
        g = p.grad if g is None else g
        if g is not None:
            g = g.float() if g.dtype != torch.float32 else g
            on_cpu = g.device.type == "cpu" and g.numel() > CPU_NORM_CHUNK
            grads.extend(g.reshape(-1).split(CPU_NORM_CHUNK) if on_cpu else [g])
    if grads:
        norms = torch._foreach_norm(grads)
        sq = torch.stack(norms).double().pow(2).sum()  # fp64: exact-enough sum over many tensors
    else:
        device = params[0].device if params else torch.device("cpu")
        sq = torch.zeros((), dtype=torch.float64, device=device)
    for g in groups:
        if group_size(g) > 1:
            dist.all_reduce(sq, group=g)
    return sq


def sharded_norm_segments(buf) -> list[torch.Tensor]:
    """The views of a `GradBuffer(..., shard_over_dp=True)`'s `local_grad` that
    `sharded_grad_norm` counts: all of this rank's reduced pieces but those of TP-replicated
    parameters on TP ranks other than 0 (padding is zero either way). Cut into chunks, whose
    norms are summed in fp64 (on CPU, CPU_NORM_CHUNK values: see there). Build once: the views
    stay valid."""
    skip = sorted(
        where[:2]
        for p in buf.params
        if getattr(p, "tp_replicated", False) and getattr(p, "tp_rank", 0) != 0
        for where in [buf.shard_slice(p)]
        if where is not None
    )
    chunk = CPU_NORM_CHUNK if buf.local_grad.device.type == "cpu" else 1 << 22
    segments, at = [], 0
    for lo, hi in [*skip, (buf.shard_numel, buf.shard_numel)]:
        for start in range(at, lo, chunk):
            segments.append(buf.local_grad[start : min(start + chunk, lo)])
        at = max(at, hi)
    return segments or [buf.local_grad[:0]]  # never empty: the norm needs the device


def sharded_grad_norm(segments: list[torch.Tensor], groups: tuple = ()) -> float:
    """`sharded_grad_norm_sq`'s square root on the host: one host sync."""
    return math.sqrt(sharded_grad_norm_sq(segments, groups).item())


def sharded_grad_norm_sq(segments: list[torch.Tensor], groups: tuple = ()) -> torch.Tensor:
    """`global_grad_norm_sq` with the distributed optimizer, after GradBuffer.finish(): the sum of
    squares of `segments` (sharded_norm_segments: this rank's reduced pieces, each logical
    parameter once), all-reduced over `groups`: pass (dims.dp_group, dims.tp_group,
    dims.pp_group) -- the DP ranks' pieces are disjoint, so here the DP sum counts every
    gradient once. No host sync."""
    sq = torch.stack(torch._foreach_norm(segments)).double().pow(2).sum()
    for g in groups:
        if group_size(g) > 1:
            dist.all_reduce(sq, group=g)
    return sq


def clip_coefficient(norm: float, max_norm: float) -> float:
    """Megatron's clip factor: max_norm / (norm + 1e-6) when the norm exceeds max_norm, else 1."""
    if max_norm <= 0 or not math.isfinite(norm):
        return 1.0
    return min(1.0, max_norm / (norm + 1e-6))
