"""Rotary position embedding of q and k (half-split / rotate_half layout), forward and backward.

One program rotates every q head and every k head (GQA: the head counts differ) of BLOCK_T
consecutive tokens, as 3-D (tokens, heads, head_dim/2) tiles. The first kernel ran one token per
program (10 KB read, 10 KB written at 32 + 8 heads of 128) and went position -> cos/sin -> q load
-> q store -> k load -> k store, so each program waited on several DRAM round trips in a row:
46-75% of copy bandwidth on an H200 at (16384 tokens, 32/8 heads, 128) and (8192, 64/8, 128),
against a goal of 80%. Now every load of a program (positions, both halves of the q and k heads)
is issued before the first store, so they share one round trip, and cos/sin are computed while
the loads are in flight. Loads before stores is also what makes the in-place call (q_out is q)
safe. Tokens with few heads (a 70B tensor-parallel shard has 8 q and 1 kv head: 2.3 KB read per
token) get more tokens per program.

cos/sin come from one of two places. On the fly: computed in fp32 from the position and the
(head_dim/2,) frequencies of `reference.rotary_inv_freq` with an IEEE division, so the angles
match the reference bit for bit. Or from a [cos | sin] table (`rotary_cos_sin`; the model passes
the `cos_sin_table` of its max_position_embeddings, shared by every layer): 4 * head_dim more
bytes per token, but mostly L2 hits (2 MB at 4096 positions x 128), and no sin/cos math. That
math is not shared across heads: each thread evaluates sin and cos for the (token, frequency)
pairs of the elements it holds, so a token's cos/sin are recomputed for every head. Compiled for
sm_90 at 32 + 8 heads of 128 (the heuristic's one token per program, 8 warps), the on-the-fly
kernel is 2320 SASS instructions with ten libdevice argument reductions per thread and a 32-byte
stack, the table kernel 608 instructions. By that count the sin/cos work per program is about
as long as the program's DRAM traffic, which would explain the 60% of copy bandwidth measured
on an H200. The table is therefore the default (`_Config.cached`), pending measurement.

Which one runs, and the launch settings, are tuned per card: `candidates` lists the settings
`bench.tune` times (each with and without the table), the fastest is committed to
kernels/tuned/<card>.json and `_config` reads it back (see kernels/tuning.py). Without an entry,
`_heuristic` decides.

The backward is the same kernel rotating by -angle (sin negated); it needs only the positions,
so the forward saves nothing else and may run in place (`inplace=True`).
"""

import functools
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from kernels import reference, tuning
from kernels._triton import HAS_TRITON, on_tensor_device, use_triton, wide_offsets

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


def rotary_cos_sin(
    max_positions: int,
    head_dim: int,
    theta: float = 10000.0,
    scaling_factor: float = 1.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The optional cos/sin table of `rotary`: fp32 (max_positions, head_dim) = [cos | sin], each
    head_dim/2 wide, row p for position p. The same math as `reference.rotary_cos_sin`."""
    positions = torch.arange(max_positions, device=device)
    cos, sin = reference.rotary_cos_sin(positions, head_dim, theta, scaling_factor)
    return torch.cat((cos, sin), dim=-1)


if HAS_TRITON:

    @triton.jit
    def _cos_sin(
        pos,  # (BLOCK_T,) positions, integer
        CS,  # fp32 [cos | sin] table (max_positions, head_dim), read if CACHED
        stride_cs_pos,  # elements between rows of CS
        stride_cs_dim,  # elements between columns of CS
        INV_FREQ,  # fp32 frequencies (head_dim/2,), read if not CACHED
        d,  # (BLOCK_D,) frequency indices
        dmask,  # d < head_dim/2
        half,  # head_dim / 2
        scaling_factor,  # linear position interpolation: angle = pos / factor * inv_freq
        CACHED: tl.constexpr,  # read cos/sin from CS instead of computing them
    ):
        """(BLOCK_T, BLOCK_D) fp32 cos and sin of the tokens' angles."""
        if CACHED:
            # int64: max_positions * head_dim may pass 2^31 for long-context tables
            off = pos.to(tl.int64)[:, None] * stride_cs_pos + d[None, :] * stride_cs_dim
            mask = dmask[None, :]
            cos = tl.load(CS + off, mask=mask, other=0.0)
            sin = tl.load(CS + off + half * stride_cs_dim, mask=mask, other=0.0)
            return cos, sin
        # Same operations as reference.rotary_cos_sin: (pos / factor) * inv_freq in fp32, with an
        # IEEE division (Triton's `/` is approximate), so the angle matches the reference exactly.
        p = tl.math.div_rn(pos.to(tl.float32), scaling_factor)
        inv_freq = tl.load(INV_FREQ + d, mask=dmask, other=0.0)
        angle = p[:, None] * inv_freq[None, :]
        return tl.cos(angle), tl.sin(angle)

    @triton.jit
    def _tile(
        t,  # (BLOCK_T,) token indices within the program
        tmask,  # (BLOCK_T,) token exists
        h0,  # first head of the tile
        n_heads,  # heads of the tensor
        d,  # (BLOCK_D,) indices into the first half
        dmask,  # d < half
        stride_tok,
        stride_head,
        stride_dim,  # strides of the tensor
        BLOCK_H: tl.constexpr,  # heads per tile
    ):
        """(BLOCK_T, BLOCK_H, BLOCK_D) offsets of the first half of heads h0.. and their mask.

        int32 is enough: the program's base pointer already holds the int64 token offset, and
        `_rotary_apply` copies a view whose head or dim offsets would pass 2^31 to a dense one."""
        h = h0 + tl.arange(0, BLOCK_H)
        off = (
            t[:, None, None] * stride_tok
            + h[None, :, None] * stride_head
            + d[None, None, :] * stride_dim
        )
        mask = tmask[:, None, None] & (h < n_heads)[None, :, None] & dmask[None, None, :]
        return off, mask

    @triton.jit
    def _rotate_store(
        O,  # output base (this program's first token)
        off,  # offsets of the first half in O
        half_off,  # half * stride of O's head_dim
        mask,
        x1,  # first half, input dtype
        x2,  # second half, input dtype
        c,  # (BLOCK_T, 1, BLOCK_D) fp32 cos
        s,  # (BLOCK_T, 1, BLOCK_D) fp32 sin, negated for the backward
    ):
        # Pairs are (i, i + half): (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
        o1 = x1 * c - x2 * s
        o2 = x2 * c + x1 * s
        tl.store(O + off, _to_out(o1, O.dtype.element_ty), mask=mask)
        tl.store(O + off + half_off, _to_out(o2, O.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotate_rest(
        X,  # input base (this program's first token); may equal O
        O,  # output base
        t,
        tmask,
        d,
        dmask,
        c,
        s,
        n_heads,
        half,
        stride_x_tok,
        stride_x_head,
        stride_x_dim,  # strides of X
        stride_o_tok,
        stride_o_head,
        stride_o_dim,  # strides of O
        BLOCK_H: tl.constexpr,
    ):
        """Heads BLOCK_H.. when they do not fit one tile; each step loads both halves before
        storing, so O == X stays safe."""
        for h0 in range(BLOCK_H, n_heads, BLOCK_H):
            x_off, mask = _tile(
                t, tmask, h0, n_heads, d, dmask, stride_x_tok, stride_x_head, stride_x_dim, BLOCK_H
            )
            o_off, _ = _tile(
                t, tmask, h0, n_heads, d, dmask, stride_o_tok, stride_o_head, stride_o_dim, BLOCK_H
            )
            x1 = tl.load(X + x_off, mask=mask, other=0.0)
            x2 = tl.load(X + x_off + half * stride_x_dim, mask=mask, other=0.0)
            _rotate_store(O, o_off, half * stride_o_dim, mask, x1, x2, c, s)

    @triton.jit
    def _rotary_kernel(
        Q,  # q (tokens, heads, head_dim), any strides
        K,  # k (tokens, kv_heads, head_dim), any strides
        QO,  # out: rotated q (tokens, heads, head_dim); Q itself when in place
        KO,  # out: rotated k (tokens, kv_heads, head_dim); K itself when in place
        POS,  # positions (tokens,), integer, restarting at 0 per packed document
        INV_FREQ,  # fp32 frequencies (head_dim/2,)
        CS,  # fp32 [cos | sin] table (max_positions, head_dim) if CACHED, else unused
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
        stride_cs_pos,
        stride_cs_dim,  # strides of CS
        n_tokens,  # tokens
        n_heads,  # q heads
        n_kv_heads,  # k heads
        half,  # head_dim / 2
        scaling_factor,  # linear position interpolation factor
        BLOCK_T: tl.constexpr,  # tokens per program
        BLOCK_HQ: tl.constexpr,  # q heads per tile
        BLOCK_HK: tl.constexpr,  # k heads per tile
        BLOCK_D: tl.constexpr,  # next power of two >= head_dim / 2
        CACHED: tl.constexpr,  # cos/sin from CS instead of computed
        BACKWARD: tl.constexpr,  # rotate by -angle (the gradient of the rotation)
    ):
        t0 = tl.program_id(0).to(tl.int64) * BLOCK_T  # int64: tokens * stride can pass 2^31
        Q += t0 * stride_q_tok
        K += t0 * stride_k_tok
        QO += t0 * stride_qo_tok
        KO += t0 * stride_ko_tok
        t = tl.arange(0, BLOCK_T)
        tmask = t < n_tokens - t0
        d = tl.arange(0, BLOCK_D)
        dmask = d < half

        # Every load first (one DRAM round trip for all of them), then the math, then the stores.
        pos = tl.load(POS + (t0 + t) * stride_pos, mask=tmask, other=0)
        q_off, q_mask = _tile(
            t, tmask, 0, n_heads, d, dmask, stride_q_tok, stride_q_head, stride_q_dim, BLOCK_HQ
        )
        q1 = tl.load(Q + q_off, mask=q_mask, other=0.0)
        q2 = tl.load(Q + q_off + half * stride_q_dim, mask=q_mask, other=0.0)
        k_off, k_mask = _tile(
            t, tmask, 0, n_kv_heads, d, dmask, stride_k_tok, stride_k_head, stride_k_dim, BLOCK_HK
        )
        k1 = tl.load(K + k_off, mask=k_mask, other=0.0)
        k2 = tl.load(K + k_off + half * stride_k_dim, mask=k_mask, other=0.0)

        cos, sin = _cos_sin(
            pos, CS, stride_cs_pos, stride_cs_dim, INV_FREQ, d, dmask, half, scaling_factor, CACHED
        )
        if BACKWARD:
            sin = -sin
        c = cos[:, None, :]  # (BLOCK_T, 1, BLOCK_D): shared by every head of the token
        s = sin[:, None, :]

        qo_off, _ = _tile(
            t, tmask, 0, n_heads, d, dmask, stride_qo_tok, stride_qo_head, stride_qo_dim, BLOCK_HQ
        )
        _rotate_store(QO, qo_off, half * stride_qo_dim, q_mask, q1, q2, c, s)
        ko_off, _ = _tile(
            t, tmask, 0, n_kv_heads, d, dmask, stride_ko_tok, stride_ko_head, stride_ko_dim,
            BLOCK_HK,
        )  # fmt: skip
        _rotate_store(KO, ko_off, half * stride_ko_dim, k_mask, k1, k2, c, s)

        # More heads than one tile holds (zero steps for the usual shapes)
        _rotate_rest(
            Q, QO, t, tmask, d, dmask, c, s, n_heads, half,
            stride_q_tok, stride_q_head, stride_q_dim,
            stride_qo_tok, stride_qo_head, stride_qo_dim,
            BLOCK_HQ,
        )  # fmt: skip
        _rotate_rest(
            K, KO, t, tmask, d, dmask, c, s, n_kv_heads, half,
            stride_k_tok, stride_k_head, stride_k_dim,
            stride_ko_tok, stride_ko_head, stride_ko_dim,
            BLOCK_HK,
        )  # fmt: skip


class _Config(NamedTuple):
    """Launch settings of the family, forward and backward (tunable per card: kernels/tuning.py)."""

    block_t: int  # tokens per program
    block_hq: int  # q heads per tile, a power of two
    block_hk: int  # k heads per tile, a power of two
    block_d: int  # head_dim / 2 padded to a power of two (never smaller)
    warps: int  # num_warps
    cached: bool = True  # read cos/sin from the caller's table when one is passed


_MAX_TILE = 4096  # elements of one half-tile (heads x head_dim/2) per token
_PROGRAM_ELEMS = 8192  # q and k elements loaded per program: 16 KB of bf16
_MAX_BLOCK_T = 8


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def tune_key(n_heads: int, n_kv_heads: int, head_dim: int) -> str:
    """The tuning table's key of a head shape (the same for the forward and the backward)."""
    return f"heads={n_heads},kv_heads={n_kv_heads},head_dim={head_dim}"


def _heuristic(n_heads: int, n_kv_heads: int, head_dim: int) -> _Config:
    """Default launch settings: a function of the head shape.

    All heads of a token in one tile; tokens per program doubled while the program loads at most
    16 KB of bf16 (one token of 32 + 8 heads of 128 is already 10 KB: 1 token; one of 8 + 1 heads
    2.3 KB: 4 tokens); warps for about 8 elements (16 bytes of bf16) per thread per load of the q
    half-tile."""
    block_d = _pow2(head_dim // 2)
    cap = max(1, _MAX_TILE // block_d)
    block_hq = min(_pow2(max(1, n_heads)), cap)
    block_hk = min(_pow2(max(1, n_kv_heads)), cap)
    per_token = 2 * (block_hq + block_hk) * block_d
    block_t = 1
    while block_t < _MAX_BLOCK_T and 2 * block_t * per_token <= _PROGRAM_ELEMS:
        block_t *= 2
    warps = max(1, min(8, block_t * block_hq * block_d // 256))
    return _Config(block_t, block_hq, block_hk, block_d, warps)


def _config(n_heads: int, n_kv_heads: int, head_dim: int, device: torch.device) -> _Config:
    """The card's tuned settings for this head shape, else the heuristic (always on CPU)."""
    default = _heuristic(n_heads, n_kv_heads, head_dim)
    key = tune_key(n_heads, n_kv_heads, head_dim)

    def check(cfg: _Config) -> None:  # an unusable entry: the heuristic runs, with a warning
        _check_config(cfg, n_heads, n_kv_heads, head_dim)

    return tuning.tuned_config("rotary", key, device, default, check)


def candidates(n_heads: int, n_kv_heads: int, head_dim: int) -> list[_Config]:
    """Settings a sweep on a card should time (the heuristic first): 1-8 tokens per program and
    2-16 warps around the heuristic's head tiles, where a thread holds 4-32 elements of each
    half-tile load (16 at 16 warps), each with cos/sin from the table and computed: the sweep
    answers "cache or on the fly" per card and shape.

    The bounds come from compiling for sm_90: at 64 elements per thread (or 32 at 16 warps, a
    128-register cap) the four live half-tiles spill; below 4 a thread has no vector load."""
    base = _heuristic(n_heads, n_kv_heads, head_dim)
    out = [base]
    for block_t in (1, 2, 4, 8):
        tile = block_t * max(base.block_hq, base.block_hk) * base.block_d
        for warps in (2, 4, 8, 16):
            per_thread = tile // (32 * warps)
            if 4 <= per_thread <= (16 if warps == 16 else 32):
                out.append(base._replace(block_t=block_t, warps=warps))
    out += [c._replace(cached=not c.cached) for c in out]
    return list(dict.fromkeys(out))


def _check_config(cfg: _Config, n_heads: int, n_kv_heads: int, head_dim: int) -> None:
    # A table entry with block_d below head_dim/2 would leave columns unrotated, silently.
    tiles = (cfg.block_t, cfg.block_hq, cfg.block_hk, cfg.block_d, cfg.warps)
    if any(v < 1 or v & (v - 1) for v in tiles) or cfg.block_d < head_dim // 2:
        raise ValueError(
            f"rotary: launch settings {cfg} for head_dim {head_dim}: every tile field must be a "
            f"power of two and block_d >= {head_dim // 2}. If they come from kernels/tuned/<card>.json "
            f"ops['rotary'][{tune_key(n_heads, n_kv_heads, head_dim)!r}], fix or delete that "
            "entry and rerun `python -m bench.tune`"
        )


@functools.lru_cache(maxsize=8)
def cos_sin_table(
    max_positions: int, head_dim: int, theta: float, scaling_factor: float, device: torch.device
) -> torch.Tensor:
    """The `rotary_cos_sin` table, built once per (shape, rope settings, device) and shared by
    every caller: a model's layers all pass the same one (fp32 max_positions x head_dim, 2 MB at
    4096 x 128) instead of one each."""
    return rotary_cos_sin(max_positions, head_dim, theta, scaling_factor, device)


@functools.lru_cache(maxsize=32)
def _inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    # Built once per (head_dim, theta, device) instead of three small launches per layer call.
    return reference.rotary_inv_freq(head_dim, theta, device)


def _check(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor | None
) -> None:
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
    if cos_sin is not None and (
        cos_sin.dtype != torch.float32
        or cos_sin.dim() != 2
        or cos_sin.shape[1] != q.shape[2]
        or cos_sin.device != q.device
    ):
        raise ValueError(
            f"rotary: cos_sin must be an fp32 (max_positions, head_dim={q.shape[2]}) [cos | sin] "
            f"table on {q.device}, got {cos_sin.dtype} {tuple(cos_sin.shape)} on "
            f"{cos_sin.device}; build it with kernels.rotary.rotary_cos_sin(max_positions, "
            f"{q.shape[2]}, theta, scaling_factor, device)"
        )


@on_tensor_device
def _rotary_apply(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    theta: float,
    scaling_factor: float,
    backward: bool = False,
    q_out: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
    cfg: _Config | None = None,
    cos_sin: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q: (tokens, heads, head_dim) and k: (tokens, kv_heads, head_dim) by +angle (or -angle
    when `backward`). Outputs default to new contiguous tensors; pass q_out=q, k_out=k for in place.

    `cfg` overrides the launch settings (the tuning sweep times each candidate). `cos_sin`, the
    `rotary_cos_sin` table, replaces the on-the-fly cos/sin when the settings say so
    (`cfg.cached`); positions must be below its length (not checked: that would cost a device
    sync)."""
    _check(q, k, positions, cos_sin)
    tokens, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    if q_out is None:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if k_out is None:
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if cfg is None:
        cfg = _config(n_heads, n_kv_heads, head_dim, q.device)
    _check_config(cfg, n_heads, n_kv_heads, head_dim)
    if tokens == 0:
        return q_out, k_out

    def wide(t: torch.Tensor) -> bool:  # a program's offsets: its tokens, every head, head_dim
        return wide_offsets(t, (1, 2), (min(cfg.block_t, tokens) - 1) * abs(t.stride(0)))

    if wide(q) or wide(k) or wide(q_out) or wide(k_out):
        # Head or dim offsets past int32 (e.g. a head-major buffer of long sequences): rotate
        # dense copies (loads stay ahead of stores: safe when q_out is q), then write back.
        qo, ko = _rotary_apply(
            q.contiguous(), k.contiguous(), positions, theta, scaling_factor, backward,
            cfg=cfg, cos_sin=cos_sin,
        )  # fmt: skip
        return q_out.copy_(qo), k_out.copy_(ko)
    inv_freq = _inv_freq(head_dim, float(theta), q.device)
    cached = cos_sin is not None and cfg.cached
    cs = cos_sin if cached else inv_freq  # a pointer the kernel never reads when unused
    _rotary_kernel[(triton.cdiv(tokens, cfg.block_t),)](
        q,
        k,
        q_out,
        k_out,
        positions,
        inv_freq,
        cs,
        *q.stride(),
        *k.stride(),
        *q_out.stride(),
        *k_out.stride(),
        positions.stride(0),
        cs.stride(0),
        cs.stride(-1),
        tokens,
        n_heads,
        n_kv_heads,
        head_dim // 2,
        float(scaling_factor),
        BLOCK_T=cfg.block_t,
        BLOCK_HQ=cfg.block_hq,
        BLOCK_HK=cfg.block_hk,
        BLOCK_D=cfg.block_d,
        CACHED=cached,
        BACKWARD=backward,
        num_warps=cfg.warps,
    )
    return q_out, k_out


class _Rotary(torch.autograd.Function):
    """fwd: rotate q and k by +angle into new tensors / bwd: rotate dq_out, dk_out by -angle."""

    @staticmethod
    def forward(ctx, q, k, positions, theta: float, scaling_factor: float, cos_sin):
        ctx.save_for_backward(positions)
        ctx.theta, ctx.scaling_factor, ctx.cos_sin = theta, scaling_factor, cos_sin
        return _rotary_apply(q, k, positions, theta, scaling_factor, cos_sin=cos_sin)

    @staticmethod
    @once_differentiable  # else create_graph would take these gradients as constants, silently
    def backward(ctx, dq_out, dk_out):
        (positions,) = ctx.saved_tensors
        # New gradient buffers: the upstream gradients may be shared and are never overwritten.
        dq, dk = _rotary_apply(
            dq_out,
            dk_out,
            positions,
            ctx.theta,
            ctx.scaling_factor,
            backward=True,
            cos_sin=ctx.cos_sin,
        )
        return dq, dk, None, None, None, None


class _RotaryInplace(torch.autograd.Function):
    """fwd: rotate x by +angle in place / bwd: rotate dx_out by -angle into a new tensor.

    One tensor per Function: autograd rejects a Function that writes into a view and returns
    more than one tensor, and q, k are views of the fused qkv output."""

    @staticmethod
    def forward(ctx, x, positions, theta: float, scaling_factor: float, cos_sin):
        ctx.mark_dirty(x)
        ctx.save_for_backward(positions)
        ctx.theta, ctx.scaling_factor, ctx.cos_sin = theta, scaling_factor, cos_sin
        none = x[:, :0]  # (tokens, 0, head_dim): the kernel's k tile is all masked
        _rotary_apply(
            x, none, positions, theta, scaling_factor, q_out=x, k_out=none, cos_sin=cos_sin
        )
        return x

    @staticmethod
    @once_differentiable  # else create_graph would take these gradients as constants, silently
    def backward(ctx, dx_out):
        (positions,) = ctx.saved_tensors
        none = dx_out[:, :0]
        dx, _ = _rotary_apply(
            dx_out,
            none,
            positions,
            ctx.theta,
            ctx.scaling_factor,
            backward=True,
            k_out=none,
            cos_sin=ctx.cos_sin,
        )
        return dx, None, None, None, None


def _reference_from_table(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.rotary` with cos/sin read from the table's rows, as the kernel reads them."""
    try:
        rows = cos_sin[positions]
    except IndexError as e:  # CPU indexing checks the bounds itself: no host read of positions
        raise ValueError(
            f"rotary: {e}: the cos_sin table has {cos_sin.shape[0]} rows (max_positions); a "
            "sequence must stay below the model's max_position_embeddings"
        ) from None
    cos, sin = rows.chunk(2, dim=-1)
    return reference.rotate(q, cos, sin), reference.rotate(k, cos, sin)


def rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    theta: float = 10000.0,
    scaling_factor: float = 1.0,
    inplace: bool = False,
    cos_sin: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (tokens, heads, head_dim), k: (tokens, kv_heads, head_dim), positions: (tokens,) integer
    -> rotated (q, k) in their dtypes. Any token/head strides (views of the fused qkv output) are
    read without a copy.

    `inplace=True` writes into q and k and returns them. Under autograd, q and k must then be
    single-output views (qkv[:, a:b] or narrow): autograd forbids writing into `split` outputs.

    `cos_sin`: optional fp32 (max_positions, head_dim) table from `rotary_cos_sin` (or the shared
    `cos_sin_table`) with the same theta and scaling_factor; the kernel reads cos/sin from it
    instead of computing them unless the card's tuned settings say computing is faster. Every
    position must be below max_positions: that is not checked (it would cost a device sync), and
    a position past the table reads out of bounds. The reference path (CPU without the
    interpreter) reads the same table rows, so a table that is too short or wrong shows on the CPU
    too, and there a position past its end is an error."""
    if not use_triton(q):
        _check(q, k, positions, cos_sin)
        if cos_sin is None:
            q_out, k_out = reference.rotary(q, k, positions, theta, scaling_factor)
        else:
            q_out, k_out = _reference_from_table(q, k, positions, cos_sin)
        if not inplace:
            return q_out, k_out
        return q.copy_(q_out), k.copy_(k_out)
    if not inplace:
        return _Rotary.apply(q, k, positions, theta, scaling_factor, cos_sin)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return (
            _RotaryInplace.apply(q, positions, theta, scaling_factor, cos_sin),
            _RotaryInplace.apply(k, positions, theta, scaling_factor, cos_sin),
        )
    # no autograd: one launch for q and k
    return _rotary_apply(q, k, positions, theta, scaling_factor, q_out=q, k_out=k, cos_sin=cos_sin)
