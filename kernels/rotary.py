"""Rotary position embedding of q and k (half-split / rotate_half layout), forward and backward.

One program per token rotates every q head and every k head of that token (GQA: the head counts
differ), so the token's cos/sin row is computed once and shared by all heads. cos/sin are
computed on the fly in fp32 from the position and the (head_dim/2,) frequency vector rather than
read from a (positions, head_dim/2) cache: the kernel is memory-bound, a cache read adds
2 * 4 * head_dim/2 bytes per token (about 10% more traffic at 8 q + 1 kv heads of 128, a
70B tensor-parallel shard) while the sin/cos math is amortised over all heads of the token.
A cache variant only needs `_cos_sin` to load instead of compute. The frequencies come from
`reference.rotary_inv_freq`, so angles match the reference bit for bit.

The backward is the same kernel rotating by -angle (sin negated); it needs only the positions,
so the forward saves nothing else and may run in place (`inplace=True`).
"""

import functools
from typing import NamedTuple

import torch

from kernels import reference
from kernels._triton import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernels._triton import to_out as _to_out


def rotary_bytes(
    tokens: int, heads: int, kv_heads: int, head_dim: int, dtype_bytes: int, backward: bool = False
) -> int:
    """Bytes a kernel must move (the GB/s denominator); the same for forward and backward.

    read q, k (or dq_out, dk_out) and positions (int64); write q_out, k_out (or dq, dk):
        2 * T * (heads + kv_heads) * head_dim * b + 8 * T
    """
    del backward  # the backward is the same rotation by -angle
    return 2 * tokens * (heads + kv_heads) * head_dim * dtype_bytes + 8 * tokens


if HAS_TRITON:

    @triton.jit
    def _cos_sin(
        POS,  # positions (tokens,), integer
        INV_FREQ,  # fp32 frequencies (head_dim/2,)
        tok,  # this token (int64)
        stride_pos,  # elements between positions
        d,  # (BLOCK_D,) frequency indices
        dmask,  # d < head_dim/2
        scaling_factor,  # linear position interpolation: angle = pos / factor * inv_freq
    ):
        # Same operations as reference.rotary_cos_sin: (pos / factor) * inv_freq in fp32, with an
        # IEEE division (Triton's `/` is approximate), so the angle matches the reference exactly.
        pos = tl.math.div_rn(tl.load(POS + tok * stride_pos).to(tl.float32), scaling_factor)
        inv_freq = tl.load(INV_FREQ + d, mask=dmask, other=0.0)
        angle = pos * inv_freq
        return tl.cos(angle), tl.sin(angle)

    @triton.jit
    def _rotate_heads(
        X,  # this token's first head (heads, head_dim) of the input
        O,  # this token's first head of the output (may equal X: in place)
        stride_x_head,  # elements between heads of X
        stride_x_dim,  # elements between head_dim entries of X
        stride_o_head,  # elements between heads of O
        stride_o_dim,  # elements between head_dim entries of O
        n_heads,  # heads to rotate
        half,  # head_dim / 2
        cos,  # (BLOCK_D,) fp32
        sin,  # (BLOCK_D,) fp32, negated for the backward
        d,  # (BLOCK_D,) indices into the first half
        dmask,  # d < half
        BLOCK_H: tl.constexpr,  # heads per step
    ):
        c = cos[None, :]
        s = sin[None, :]
        for h0 in range(0, n_heads, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            mask = (h < n_heads)[:, None] & dmask[None, :]
            x_off = h[:, None] * stride_x_head + d[None, :] * stride_x_dim
            o_off = h[:, None] * stride_o_head + d[None, :] * stride_o_dim
            # Pairs are (i, i + half): both halves are loaded before anything is stored, so
            # O == X is safe.
            x1 = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(X + x_off + half * stride_x_dim, mask=mask, other=0.0).to(tl.float32)
            o1 = x1 * c - x2 * s
            o2 = x2 * c + x1 * s
            tl.store(O + o_off, _to_out(o1, O.dtype.element_ty), mask=mask)
            tl.store(O + o_off + half * stride_o_dim, _to_out(o2, O.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_kernel(
        Q,  # q (tokens, heads, head_dim), any strides
        K,  # k (tokens, kv_heads, head_dim), any strides
        QO,  # out: rotated q (tokens, heads, head_dim); Q itself when in place
        KO,  # out: rotated k (tokens, kv_heads, head_dim); K itself when in place
        POS,  # positions (tokens,), integer, restarting at 0 per packed document
        INV_FREQ,  # fp32 frequencies (head_dim/2,)
        stride_q_tok,
        stride_q_head,
        stride_q_dim,  # strides of Q
        stride_k_tok,
        stride_k_head,
        stride_k_dim,  # strides of K
        stride_qo_tok,
        stride_qo_head,
        stride_qo_dim,  # strides of QO
        stride_ko_tok,
        stride_ko_head,
        stride_ko_dim,  # strides of KO
        stride_pos,  # elements between positions
        n_heads,  # q heads
        n_kv_heads,  # k heads
        half,  # head_dim / 2
        scaling_factor,  # linear position interpolation factor
        BLOCK_HQ: tl.constexpr,  # q heads per step
        BLOCK_HK: tl.constexpr,  # k heads per step
        BLOCK_D: tl.constexpr,  # next power of two >= head_dim / 2
        BACKWARD: tl.constexpr,  # rotate by -angle (the gradient of the rotation)
    ):
        tok = tl.program_id(0).to(tl.int64)  # int64: tokens * stride can pass 2^31
        d = tl.arange(0, BLOCK_D)
        dmask = d < half
        cos, sin = _cos_sin(POS, INV_FREQ, tok, stride_pos, d, dmask, scaling_factor)
        if BACKWARD:
            sin = -sin
        _rotate_heads(
            Q + tok * stride_q_tok,
            QO + tok * stride_qo_tok,
            stride_q_head,
            stride_q_dim,
            stride_qo_head,
            stride_qo_dim,
            n_heads,
            half,
            cos,
            sin,
            d,
            dmask,
            BLOCK_HQ,
        )
        _rotate_heads(
            K + tok * stride_k_tok,
            KO + tok * stride_ko_tok,
            stride_k_head,
            stride_k_dim,
            stride_ko_head,
            stride_ko_dim,
            n_kv_heads,
            half,
            cos,
            sin,
            d,
            dmask,
            BLOCK_HK,
        )


class _Config(NamedTuple):
    block_hq: int  # q heads per step
    block_hk: int  # k heads per step
    block_d: int  # head_dim / 2, padded to a power of two
    warps: int


_MAX_TILE = 4096  # elements of one half-tile (heads x head_dim/2) per step


def _config(n_heads: int, n_kv_heads: int, head_dim: int) -> _Config:
    """Launch settings of the whole family (forward and backward): a function of the head shape.

    Warps are sized for about 8 elements (16 bytes of bf16) per thread per load of the q tile."""
    block_d = triton.next_power_of_2(head_dim // 2)
    cap = max(1, _MAX_TILE // block_d)
    block_hq = min(triton.next_power_of_2(max(1, n_heads)), cap)
    block_hk = min(triton.next_power_of_2(max(1, n_kv_heads)), cap)
    warps = max(1, min(8, max(block_hq, block_hk) * block_d // 256))
    return _Config(block_hq, block_hk, block_d, warps)


@functools.lru_cache(maxsize=32)
def _inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    # Built once per (head_dim, theta, device) instead of three small launches per layer call.
    return reference.rotary_inv_freq(head_dim, theta, device)


def _check(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(
            f"rotary: q and k must be (tokens, heads, head_dim), got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[2] % 2:
        raise ValueError(
            f"rotary: q {tuple(q.shape)} and k {tuple(k.shape)} need the same tokens and the same "
            "even head_dim"
        )
    if positions.shape != (q.shape[0],) or positions.is_floating_point():
        raise ValueError(
            f"rotary: positions must be integer (tokens,) = ({q.shape[0]},), got "
            f"{positions.dtype} {tuple(positions.shape)}"
        )


def _rotary_apply(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    theta: float,
    scaling_factor: float,
    backward: bool = False,
    q_out: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q: (tokens, heads, head_dim) and k: (tokens, kv_heads, head_dim) by +angle (or -angle
    when `backward`). Outputs default to new contiguous tensors; pass q_out=q, k_out=k for in place."""
    _check(q, k, positions)
    tokens, n_heads, head_dim = q.shape
    if q_out is None:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if k_out is None:
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if tokens == 0:
        return q_out, k_out
    inv_freq = _inv_freq(head_dim, float(theta), q.device)
    cfg = _config(n_heads, k.shape[1], head_dim)
    _rotary_kernel[(tokens,)](
        q,
        k,
        q_out,
        k_out,
        positions,
        inv_freq,
        *q.stride(),
        *k.stride(),
        *q_out.stride(),
        *k_out.stride(),
        positions.stride(0),
        n_heads,
        k.shape[1],
        head_dim // 2,
        float(scaling_factor),
        BLOCK_HQ=cfg.block_hq,
        BLOCK_HK=cfg.block_hk,
        BLOCK_D=cfg.block_d,
        BACKWARD=backward,
        num_warps=cfg.warps,
    )
    return q_out, k_out


class _Rotary(torch.autograd.Function):
    """fwd: rotate q and k by +angle into new tensors / bwd: rotate dq_out, dk_out by -angle."""

    @staticmethod
    def forward(ctx, q, k, positions, theta: float, scaling_factor: float):
        ctx.save_for_backward(positions)
        ctx.theta, ctx.scaling_factor = theta, scaling_factor
        return _rotary_apply(q, k, positions, theta, scaling_factor)

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        (positions,) = ctx.saved_tensors
        # New gradient buffers: the upstream gradients may be shared and are never overwritten.
        dq, dk = _rotary_apply(
            dq_out, dk_out, positions, ctx.theta, ctx.scaling_factor, backward=True
        )
        return dq, dk, None, None, None


class _RotaryInplace(torch.autograd.Function):
    """fwd: rotate x by +angle in place / bwd: rotate dx_out by -angle into a new tensor.

    One tensor per Function: autograd rejects a Function that writes into a view and returns
    more than one tensor, and q, k are views of the fused qkv output."""

    @staticmethod
    def forward(ctx, x, positions, theta: float, scaling_factor: float):
        ctx.mark_dirty(x)
        ctx.save_for_backward(positions)
        ctx.theta, ctx.scaling_factor = theta, scaling_factor
        none = x[:, :0]  # (tokens, 0, head_dim): the kernel's k loop runs zero times
        _rotary_apply(x, none, positions, theta, scaling_factor, q_out=x, k_out=none)
        return x

    @staticmethod
    def backward(ctx, dx_out):
        (positions,) = ctx.saved_tensors
        none = dx_out[:, :0]
        dx, _ = _rotary_apply(
            dx_out, none, positions, ctx.theta, ctx.scaling_factor, backward=True, k_out=none
        )
        return dx, None, None, None


def rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    theta: float = 10000.0,
    scaling_factor: float = 1.0,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (tokens, heads, head_dim), k: (tokens, kv_heads, head_dim), positions: (tokens,) integer
    -> rotated (q, k) in their dtypes. Any token/head strides (views of the fused qkv output) are
    read without a copy.

    `inplace=True` writes into q and k and returns them. Under autograd, q and k must then be
    single-output views (qkv[:, a:b] or narrow): autograd forbids writing into `split` outputs."""
    if not use_triton(q):
        q_out, k_out = reference.rotary(q, k, positions, theta, scaling_factor)
        if not inplace:
            return q_out, k_out
        return q.copy_(q_out), k.copy_(k_out)
    if not inplace:
        return _Rotary.apply(q, k, positions, theta, scaling_factor)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return (
            _RotaryInplace.apply(q, positions, theta, scaling_factor),
            _RotaryInplace.apply(k, positions, theta, scaling_factor),
        )
    return _rotary_apply(q, k, positions, theta, scaling_factor, q_out=q, k_out=k)  # one launch
