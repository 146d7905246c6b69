"""Tensor/sequence-parallel communication as autograd functions (Megatron's "mappings").

Every function takes its process group explicitly. `group=None` means "no parallelism" (that is
what ParallelDims holds at size 1) and, like a group of size 1, returns the input untouched:
never pass None meaning the default world group.

Names say what the forward does to the activation; each pairs with its adjoint in the backward:

  copy_to_tp            fwd: identity                 / bwd: all-reduce
  reduce_from_tp        fwd: all-reduce               / bwd: identity
  scatter_to_tp         fwd: split the last dim       / bwd: all-gather the last dim
  gather_from_tp        fwd: all-gather the last dim  / bwd: split the last dim
  scatter_to_sp         fwd: split dim 0 (tokens)     / bwd: all-gather dim 0
  gather_from_sp        fwd: all-gather dim 0         / bwd: reduce-scatter dim 0
  reduce_scatter_to_sp  fwd: reduce-scatter dim 0     / bwd: all-gather dim 0

Sequence parallelism splits the flattened token dimension (dim 0 of (tokens, hidden)), so the
SP collectives are contiguous along dim 0 and need no transposes.
"""

import torch
import torch.distributed as dist

# torch >= 2.13 names the single-tensor collectives *_single (the *_tensor names are deprecated
# and warn on every rank); older builds (a GPU machine's own torch) only have the *_tensor ones.
# Call these two wherever a flat buffer is gathered or reduce-scattered in place.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group) -> int:
    """World size of `group`; 1 for None (no parallelism)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    """This process's rank inside `group`; 0 for None."""
    return 0 if group is None else dist.get_rank(group)


def all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    """In-place sum of `t` over `group` (no autograd); e.g. the loss-mask token count over DP."""
    if group_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def _check_divisible(n: int, size: int, what: str) -> None:
    if n % size:
        raise ValueError(
            f"{what}: {n} is not divisible by the tensor-parallel size {size}; with "
            "--sequence_parallel the tokens of a micro-batch (micro_batch_size x seq_length) "
            "must be a multiple of the tensor_model_parallel_size"
        )


def all_gather_dim0(x: torch.Tensor, group, async_op: bool = False):
    """(n, ...) per rank -> (size * n, ...) in rank order. With async_op returns (out, work);
    at size 1 (group None) `x` itself and work None: None must not reach torch.distributed,
    which would read it as the world group."""
    size = group_size(group)
    if size == 1:
        return (x, None) if async_op else x
    x = x.contiguous()
    out = torch.empty((size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    work = all_gather_single(out, x, group=group, async_op=async_op)
    return (out, work) if async_op else out


def reduce_scatter_dim0(x: torch.Tensor, group, async_op: bool = False):
    """(size * n, ...) per rank -> (n, ...): rank r gets Σ_ranks of rows [r n, (r + 1) n).
    At size 1 `x` itself (and work None), as all_gather_dim0."""
    size = group_size(group)
    if size == 1:
        return (x, None) if async_op else x
    _check_divisible(x.shape[0], size, "reduce-scatter over tokens")
    x = x.contiguous()
    out = torch.empty((x.shape[0] // size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    work = reduce_scatter_single(out, x, op=dist.ReduceOp.SUM, group=group, async_op=async_op)
    return (out, work) if async_op else out


def _split_dim0(x: torch.Tensor, group) -> torch.Tensor:
    size = group_size(group)
    _check_divisible(x.shape[0], size, "split over tokens")
    n = x.shape[0] // size
    r = group_rank(group)
    return x[r * n : (r + 1) * n].contiguous()


def _split_last(x: torch.Tensor, group) -> torch.Tensor:
    size = group_size(group)
    if x.shape[-1] % size:
        raise ValueError(
            f"last dim {x.shape[-1]} is not divisible by the tensor-parallel size {size}"
        )
    n = x.shape[-1] // size
    r = group_rank(group)
    return x[..., r * n : (r + 1) * n].contiguous()


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    size = group_size(group)
    flat = all_gather_dim0(x.unsqueeze(0), group)  # (size, ..., n)
    return flat.movedim(0, -2).reshape(*x.shape[:-1], size * x.shape[-1])


class _CopyToTP(torch.autograd.Function):
    """fwd: identity / bwd: all-reduce."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromTP(torch.autograd.Function):
    """fwd: all-reduce / bwd: identity."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToTP(torch.autograd.Function):
    """fwd: split the last dim / bwd: all-gather the last dim."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, g):
        return _gather_last(g, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    """fwd: all-gather the last dim / bwd: split the last dim."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, g):
        return _split_last(g, ctx.group), None


class _ScatterToSP(torch.autograd.Function):
    """fwd: split dim 0 / bwd: all-gather dim 0."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_dim0(x, group)

    @staticmethod
    def backward(ctx, g):
        return all_gather_dim0(g, ctx.group), None


class _GatherFromSP(torch.autograd.Function):
    """fwd: all-gather dim 0 / bwd: reduce-scatter dim 0."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_dim0(x, group)

    @staticmethod
    def backward(ctx, g):
        return reduce_scatter_dim0(g, ctx.group), None


class _ReduceScatterToSP(torch.autograd.Function):
    """fwd: reduce-scatter dim 0 / bwd: all-gather dim 0."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_dim0(x, group)

    @staticmethod
    def backward(ctx, g):
        return all_gather_dim0(g, ctx.group), None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """fwd: identity / bwd: all-reduce. Input of a column-parallel layer (replicated input)."""
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """fwd: all-reduce / bwd: identity. Output of a row-parallel layer without SP."""
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """fwd: split the last dim / bwd: all-gather it. (..., d) -> (..., d / size)."""
    return x if group_size(group) == 1 else _ScatterToTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """fwd: all-gather the last dim / bwd: split it. (..., d) -> (..., size * d)."""
    return x if group_size(group) == 1 else _GatherFromTP.apply(x, group)


def scatter_to_sp(x: torch.Tensor, group) -> torch.Tensor:
    """fwd: split tokens / bwd: all-gather tokens. (T, ...) -> (T / size, ...)."""
    return x if group_size(group) == 1 else _ScatterToSP.apply(x, group)


def gather_from_sp(x: torch.Tensor, group) -> torch.Tensor:
    """fwd: all-gather tokens / bwd: reduce-scatter. (T / size, ...) -> (T, ...); the input of a
    column-parallel layer under SP, whose input gradient is a partial sum on every rank."""
    return x if group_size(group) == 1 else _GatherFromSP.apply(x, group)


def reduce_scatter_to_sp(x: torch.Tensor, group) -> torch.Tensor:
    """fwd: reduce-scatter tokens / bwd: all-gather. (T, ...) partial sums -> (T / size, ...);
    the output of a row-parallel layer (or the vocab-parallel embedding) under SP."""
    return x if group_size(group) == 1 else _ReduceScatterToSP.apply(x, group)
