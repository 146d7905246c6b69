"""Tensor-parallel layers: column/row-parallel linear, vocab-parallel embedding, and the dropout
that runs on sequence-parallel shards.

Each layer takes a handful of arguments, returns one tensor, and marks its weight with where it
sits in the full (TP=1) tensor, which is what sharding, gathering and checkpoints read:
  p.tp_dim        the partitioned dim (int) or None
  p.tp_pieces     [(global_start, length), ...] along tp_dim, in local order; each piece is this
                  rank's even share of one segment: rank r's = mine + (r - my_rank) * length
  p.global_shape  shape of the full tensor
Activations are flattened tokens: x: (tokens, hidden); under sequence parallelism the residual
stream is the token shard (tokens / tp, hidden).
"""

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from kernels.linear import fused, linear, weight_grad
from parallel.comm import (
    all_gather_dim0,
    group_rank,
    group_size,
    reduce_from_tp,
    reduce_scatter_dim0,
    reduce_scatter_to_sp,
)

# Every attribute parallelize may put on a parameter (what `materialize` carries over).
LAYOUT_ATTRS = (
    "tp_dim",
    "tp_pieces",
    "global_shape",
    "tp_rank",
    "tp_replicated",
    "vocab_rows",
    "sequence_parallel",
    "tp_size",
)


def mark_sharded(p: nn.Parameter, tp_dim: int | None, pieces, global_shape, tp_rank: int) -> None:
    """Attach the TP layout attributes (see the module docstring) to `p`."""
    p.tp_dim = tp_dim
    p.tp_pieces = [tuple(x) for x in pieces]
    p.global_shape = tuple(global_shape)
    p.tp_rank = tp_rank
    p.tp_replicated = tp_dim is None


class _ColumnLinear(torch.autograd.Function):
    """y = gather(x) Wᵀ with the backward communication overlapped with the weight gradient.

    SP: fwd all-gathers the token shard; only the shard is saved and the backward re-gathers it
    (asynchronously, behind the input-gradient GEMM) -- Megatron's trade of one extra all-gather
    for (tp - 1) / tp of the input activation memory. The input gradient is reduce-scattered
    (SP) or all-reduced (TP) asynchronously behind the weight-gradient GEMM.
    """

    @staticmethod
    def forward(ctx, x, weight, group, sequence_parallel, fuse):
        ctx.group, ctx.sp = group, sequence_parallel
        ctx.weight, ctx.fused = weight, fuse
        ctx.save_for_backward(x, weight)
        x_full = all_gather_dim0(x, group) if sequence_parallel else x
        return F.linear(x_full, weight)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        group, sp = ctx.group, ctx.sp
        dy = dy.contiguous()
        gather = None
        if sp:
            x_full, gather = all_gather_dim0(x, group, async_op=True)
        else:
            x_full = x
        grad_x = reduce = None
        if ctx.needs_input_grad[0]:
            grad_x = dy.matmul(weight)  # (T, in), a partial sum on every rank
        if gather is not None:
            gather.wait()
        if grad_x is not None:
            if sp:
                grad_x, reduce = reduce_scatter_dim0(grad_x, group, async_op=True)
            else:
                reduce = dist.all_reduce(grad_x, group=group, async_op=True)
        grad_w = weight_grad(ctx.weight, dy, x_full, ctx.fused) if ctx.needs_input_grad[1] else None
        if reduce is not None:
            reduce.wait()
        return grad_x, grad_w, None, None, None


class _RowLinear(torch.autograd.Function):
    """y = reduce(x Wᵀ): all-reduce (TP) or reduce-scatter over tokens (SP), done in place on the
    fresh GEMM output (no extra copy)."""

    @staticmethod
    def forward(ctx, x, weight, group, sequence_parallel, fuse):
        ctx.group, ctx.sp = group, sequence_parallel
        ctx.weight, ctx.fused = weight, fuse
        ctx.save_for_backward(x, weight)
        y = F.linear(x, weight)
        if sequence_parallel:
            return reduce_scatter_dim0(y, group)
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy = all_gather_dim0(dy, ctx.group) if ctx.sp else dy.contiguous()
        grad_x = dy.matmul(weight) if ctx.needs_input_grad[0] else None
        grad_w = weight_grad(ctx.weight, dy, x, ctx.fused) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None, None, None


class ColumnParallelLinear(nn.Module):
    """y_local = x W_localᵀ, no bias. The output features are a concatenation of `segments`
    (e.g. [q | k | v] or [gate | up]); each segment is split evenly over TP, so rank r holds
    [seg0_r | seg1_r | ...] and a fused projection stays fused locally.

    x: (tokens, in) replicated, or the token shard (tokens / tp, in) with sequence_parallel;
    returns (tokens, sum(segments) / tp) on every rank.
    """

    def __init__(
        self,
        in_features: int,
        segments: Sequence[int],
        group,
        sequence_parallel: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        tp, rank = group_size(group), group_rank(group)
        for s in segments:
            if s % tp:
                raise ValueError(f"output segment {s} is not divisible by the TP size {tp}")
        self.group, self.sequence_parallel = group, sequence_parallel and tp > 1
        local = [s // tp for s in segments]
        self.weight = nn.Parameter(torch.empty(sum(local), in_features, device=device, dtype=dtype))
        pieces, start = [], 0
        for s, n in zip(segments, local):
            pieces.append((start + rank * n, n))
            start += s
        mark_sharded(self.weight, 0, pieces, (sum(segments), in_features), rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if group_size(self.group) == 1:
            return linear(x, self.weight)
        # `fused` is read here: Function.forward runs with grad mode off
        return _ColumnLinear.apply(
            x, self.weight, self.group, self.sequence_parallel, fused(self.weight)
        )


class RowParallelLinear(nn.Module):
    """y = Σ_ranks x_local W_localᵀ, no bias: the input features are split over TP.

    x: (tokens, in / tp); returns (tokens, out) replicated (all-reduce), or the token shard
    (tokens / tp, out) with sequence_parallel (reduce-scatter).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group,
        sequence_parallel: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        tp, rank = group_size(group), group_rank(group)
        if in_features % tp:
            raise ValueError(f"input features {in_features} are not divisible by the TP size {tp}")
        self.group, self.sequence_parallel = group, sequence_parallel and tp > 1
        n = in_features // tp
        self.weight = nn.Parameter(torch.empty(out_features, n, device=device, dtype=dtype))
        mark_sharded(self.weight, 1, [(rank * n, n)], (out_features, in_features), rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if group_size(self.group) == 1:
            return linear(x, self.weight)
        return _RowLinear.apply(
            x, self.weight, self.group, self.sequence_parallel, fused(self.weight)
        )


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """Raise ValueError when any id is outside [0, vocab_size). One host sync (min/max)."""
    if ids.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(ids))
    if lo >= 0 and hi < vocab_size:
        return
    bad = ((ids < 0) | (ids >= vocab_size)).reshape(-1).nonzero()[0].item()
    raise ValueError(
        f"token id {int(ids.reshape(-1)[bad])} at flattened position {bad} is outside the model's "
        f"vocabulary [0, {vocab_size}) (ids seen: {lo}..{hi}); the data was tokenized with a "
        "different tokenizer or --vocab_extra_ids_list than the model was built with: "
        "re-run the pretokenizer, or build the model with the tokenizer's vocab size"
    )


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (the padded vocabulary) are split over TP.

    ids: (tokens,) int -> (tokens, dim) replicated, or the token shard (tokens / tp, dim) with
    sequence_parallel (the partial lookups are reduce-scattered instead of all-reduced). Ids
    outside [0, vocab_size) raise -- Megatron zeroes them silently.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        vocab_size: int,
        group,
        sequence_parallel: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        tp, rank = group_size(group), group_rank(group)
        if num_embeddings % tp:
            raise ValueError(
                f"padded vocabulary {num_embeddings} is not divisible by the TP size {tp}"
            )
        if vocab_size > num_embeddings:
            raise ValueError(
                f"vocab_size {vocab_size} exceeds the padded vocabulary {num_embeddings}"
            )
        self.group, self.sequence_parallel = group, sequence_parallel and tp > 1
        self.vocab_size = vocab_size
        n = num_embeddings // tp
        self.start = rank * n
        self.weight = nn.Parameter(torch.empty(n, embedding_dim, device=device, dtype=dtype))
        mark_sharded(self.weight, 0, [(self.start, n)], (num_embeddings, embedding_dim), rank)
        self.weight.vocab_rows = vocab_size
        # The id check reads the ids' range on the host: on a GPU one synchronisation per call.
        # A caller that checked the host copy already (the trainer) sets this to False.
        self.check_ids = True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.check_ids:
            check_token_ids(ids, self.vocab_size)
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)  # (T, dim) partial: rows of other ranks 0
        if self.sequence_parallel:
            return reduce_scatter_to_sp(out, self.group)
        return reduce_from_tp(out, self.group)


class SequenceParallelDropout(nn.Module):
    """Dropout on a token shard: each TP rank draws its own mask stream.

    The stream's seed is drawn from the CPU default generator -- identical on every TP rank when
    the trainer seeds them alike -- and mixed with the TP rank. So the masks differ across ranks
    (they cover different tokens), the default generators stay in lock-step (replicated dropout
    elsewhere keeps drawing identical masks), the same seed gives the same run, and activation
    recompute (torch.utils.checkpoint restores the CPU RNG state) redraws the same mask. The CPU
    draw costs no device sync.
    """

    def __init__(self, p: float, tp_rank: int):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability {p} must be in [0, 1)")
        self.p, self.tp_rank = p, tp_rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        seed = int(torch.randint(0, 2**62, (1,)).item())
        gen = torch.Generator(device=x.device)
        gen.manual_seed((seed + 0x9E3779B97F4A7C15 * (self.tp_rank + 1)) % 2**63)
        keep = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(
            1.0 - self.p, generator=gen
        )
        # torch.where saves only the bool mask for the backward (like F.dropout).
        return torch.where(keep, x * (1.0 / (1.0 - self.p)), 0.0)

    def extra_repr(self) -> str:
        return f"p={self.p}, tp_rank={self.tp_rank}"
