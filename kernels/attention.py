"""Causal flash attention over packed documents, with GQA: Triton forward and backward.

Layout: tokens are flattened, q (tokens, heads, head_dim), k/v (tokens, kv_heads, head_dim), and
`cu_seqlens` (docs + 1,) int32 marks the documents; a token attends to the tokens of its own
document up to itself. Query head h reads KV head h // (heads // kv_heads); K/V are never repeated.
The padded layout (batch, seq, heads, head_dim) is the same thing with equal documents.

Scheduling. Programs tile the *flattened* token axis, not each document: a query block may hold
the tail of one document and the head of the next, and each row masks by its own document's start.
So the grid has no empty programs however the lengths are mixed (a per-document grid over
max_seqlen launches docs x max_seqlen / BLOCK_M programs, mostly empty for the seed's ~473-token
documents in 4096-token rows), and a short document shares a block with its neighbour instead of
padding one. A block that straddles documents runs the key range of its earliest row, which its
own rows need anyway. Key ranges are split in three: masked blocks below the latest row's
document start, unmasked full blocks, masked blocks on the diagonal; fully masked keys are never
visited. `max_seqlen` only picks the launch settings (it never affects correctness).

Document starts. Each token's document start is found once per call, by a small kernel that
binary-searches `cu_seqlens` for every token (`_doc_starts`); the forward and dQ programs load
their rows' starts, and a block's first and last from two scalar loads (the tokens are sorted).
A search inside each of those programs was a chain of dependent loads (4 rounds at 4 documents,
7 at the seed's ~35 per row) followed by two block reductions, all before the first K/V load of
a program that is alone on its SM (bench/NOTES.md). The dK/dV programs still search for their
keys' document ends (see there why).

Forward (FlashAttention-2, Dao 2023, Alg. 1): online softmax in base 2 (exp2 with the scale
folded into log2(e)), fp32 accumulators, saves the natural-log LSE (heads, tokens) fp32.
Backward (Alg. 2, split in two deterministic kernels, no atomics): a dQ kernel per query block
that also computes delta = rowsum(dO * O) for its rows, then a dK/dV kernel per KV head and key
block that loops over the query heads of its group, so GQA gradients are summed in registers.
Offsets that can pass 2^31 elements (token x stride) are formed in int64.

Measured before the document-starts change (H200, torch 2.11, Triton 3.6,
bench/bench_attention.py, d=128, 32/8 heads, bf16):
fwd 284 / 378 / 425 / 457 TFLOP/s at seq 1k / 2k / 4k / 8k, 1.06-1.39x SDPA's flash backend;
bwd 206 / 286 / 334 / 360, 1.04-1.21x.
"""

import math
from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

from kernels import reference
from kernels._triton import HAS_TRITON, INTERPRET, on_tensor_device, use_triton

if HAS_TRITON:  # elsewhere (no Triton wheel) `attention` runs the reference
    import triton
    import triton.language as tl

LOG2E = 1.4426950408889634

# Integer arguments that vary from batch to batch: not specialized (Triton would otherwise compile
# a variant for each value equal to 1 or divisible by 16). Strides stay specialized: a unit or
# 16-divisible stride is what makes loads vector-wide.
_NO_SPEC = ["num_docs", "search_steps", "tokens", "heads", "kv_heads", "group", "seq_bucket"]
_NO_SPEC_ROWS = ["num_docs", "search_steps", "tokens"]


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
# fmt: off
# (Kernel signatures keep related arguments on one line with a trailing comment, as in the
# Triton tutorials; the formatter would put each of the ~40 arguments on its own line.)


if HAS_TRITON:

    @triton.jit
    def _col_mask(BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
        """Columns inside head_dim. All-true as a constant when head_dim is a power of two, so the
        compiler drops the mask instead of testing it on every load."""
        if HEAD_DIM == BLOCK_D:
            ok = tl.full([BLOCK_D], 1, tl.int1)
        else:
            ok = tl.arange(0, BLOCK_D) < HEAD_DIM
        return ok


    @triton.jit
    def _doc_bounds(cu_seqlens, tok, num_docs, search_steps):
        """Start and end of the document holding each token.   tok: int32 vector, all < tokens.

        Finds the largest d with cu_seqlens[d] <= tok; empty documents are skipped by construction.
        Extra steps past convergence keep lo fixed, so search_steps >= ceil(log2(num_docs)) is enough.
        """
        lo = tl.zeros_like(tok)
        hi = tl.zeros_like(tok) + num_docs
        for _ in range(search_steps):
            mid = (lo + hi) // 2
            right = tl.load(cu_seqlens + mid) <= tok
            lo = tl.where(right, mid, lo)
            hi = tl.where(right, hi, mid)
        return tl.load(cu_seqlens + lo), tl.load(cu_seqlens + lo + 1)


    @triton.jit(do_not_specialize=_NO_SPEC_ROWS)
    def _doc_starts_kernel(
        cu_seqlens, num_docs, search_steps,  # (docs + 1,) int32 boundaries; binary-search depth
        ROW_START,  # out: (tokens,) int32, the first token of each token's document
        tokens,
        BLOCK: tl.constexpr,
    ):
        tok = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        start, _ = _doc_bounds(cu_seqlens, tl.minimum(tok, tokens - 1), num_docs, search_steps)
        tl.store(ROW_START + tok, start, mask=tok < tokens)


    @triton.jit
    def _fwd_inner(
        acc, l_i, m_i, q,  # running output (BLOCK_M, BLOCK_D) fp32, row sum, row max (log2 units)
        k_head, v_head,  # K/V pointers at token 0 of this KV head
        rows, doc_start, d_ok,  # (BLOCK_M,) query tokens and their documents' first token
        n_lo, n_hi, tokens, qk_scale,
        stride_kt, stride_kd, stride_vt, stride_vd,
        MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        tile_k = offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
        tile_v = offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
        # Block pointers advance by a scalar step; only the start is formed in int64.
        k_blk = k_head + n_lo.to(tl.int64) * stride_kt
        v_blk = v_head + n_lo.to(tl.int64) * stride_vt
        for n in range(n_lo, n_hi, BLOCK_N):
            cols = n + offs_n
            if MASKED:
                mask = (cols < tokens)[:, None] & d_ok[None, :]
            else:
                mask = d_ok[None, :]
            k = tl.load(k_blk + tile_k, mask=mask, other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
            if MASKED:
                ok = (cols[None, :] <= rows[:, None]) & (cols[None, :] >= doc_start[:, None])
                qk = tl.where(ok, qk, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                # A row may see no key of this block (a later document's row): keep exp2 finite.
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                m_use = m_new
            p = tl.math.exp2(qk * qk_scale - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_blk + tile_v, mask=mask, other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
            m_i = m_new
            k_blk += BLOCK_N * stride_kt
            v_blk += BLOCK_N * stride_vt
        return acc, l_i, m_i


    @triton.jit(do_not_specialize=_NO_SPEC)
    def _fwd_kernel(
        Q, K, V, O, LSE,  # q (T, H, D), k/v (T, KVH, D), out (T, H, D), lse (H, T) fp32
        ROW_START,  # (T,) int32: first token of each token's document (_doc_starts_kernel)
        qk_scale,  # softmax scale * log2(e)
        stride_qt, stride_qh, stride_qd,
        stride_kt, stride_kh, stride_kd,
        stride_vt, stride_vh, stride_vd,
        stride_ot, stride_oh, stride_od,
        stride_lh,  # lse head stride (token stride is 1)
        tokens, heads, group,  # group = heads // kv_heads
        seq_bucket,  # bucketed max_seqlen: autotune key only
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        h = pid % heads  # heads of a group are neighbours in launch order: K/V stay in L2
        # Late blocks first: within a document they have the most keys, so the tail wave is light.
        m0 = (tl.cdiv(tokens, BLOCK_M) - 1 - pid // heads) * BLOCK_M
        kvh = h // group
        offs_i = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = _col_mask(BLOCK_D, HEAD_DIM)
        rows = m0 + offs_i
        rows_ok = rows < tokens
        n_hi = tl.minimum(m0 + BLOCK_M, tokens)

        m64 = m0.to(tl.int64)
        h64 = h.to(tl.int64)
        row_mask = rows_ok[:, None] & d_ok[None, :]
        q_ptrs = Q + m64 * stride_qt + h64 * stride_qh + offs_i[:, None] * stride_qt + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=row_mask, other=0.0)
        # Issued with q's load: one round trip, no search. Rows are sorted, so the block's smallest
        # and largest document starts are its first and last row's (scalar loads, no reduction).
        doc_start = tl.load(ROW_START + rows, mask=rows_ok, other=0)
        n_lo = tl.load(ROW_START + m0)
        start_last = tl.load(ROW_START + n_hi - 1)
        k_head = K + kvh.to(tl.int64) * stride_kh
        v_head = V + kvh.to(tl.int64) * stride_vh

        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        # Keys [n_lo, n_pre): some row's document starts later; [n_pre, n_full): every pair is
        # visible, no mask; [n_full, n_hi): the causal diagonal.
        n_pre = tl.minimum(n_lo + tl.cdiv(start_last - n_lo, BLOCK_N) * BLOCK_N, n_hi)
        n_full = n_pre + tl.maximum(m0 + 1 - n_pre, 0) // BLOCK_N * BLOCK_N
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_head, v_head, rows, doc_start, d_ok, n_lo, n_pre, tokens, qk_scale,
                                   stride_kt, stride_kd, stride_vt, stride_vd, True, BLOCK_N, BLOCK_D, PRECISION)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_head, v_head, rows, doc_start, d_ok, n_pre, n_full, tokens, qk_scale,
                                   stride_kt, stride_kd, stride_vt, stride_vd, False, BLOCK_N, BLOCK_D, PRECISION)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_head, v_head, rows, doc_start, d_ok, n_full, n_hi, tokens, qk_scale,
                                   stride_kt, stride_kd, stride_vt, stride_vd, True, BLOCK_N, BLOCK_D, PRECISION)

        out = acc / l_i[:, None]
        o_ptrs = O + m64 * stride_ot + h64 * stride_oh + offs_i[:, None] * stride_ot + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_mask)
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # back to natural log
        tl.store(LSE + h64 * stride_lh + rows, lse, mask=rows_ok)


    @triton.jit
    def _dq_inner(
        dq, q, do, lse2, delta,  # dq (BLOCK_M, BLOCK_D) fp32; lse2 = lse * log2(e); delta (BLOCK_M,)
        k_head, v_head, rows, doc_start, d_ok, n_lo, n_hi, tokens, qk_scale,
        stride_kt, stride_kd, stride_vt, stride_vd,
        MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        tile_k = offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
        tile_v = offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
        k_blk = k_head + n_lo.to(tl.int64) * stride_kt
        v_blk = v_head + n_lo.to(tl.int64) * stride_vt
        for n in range(n_lo, n_hi, BLOCK_N):
            cols = n + offs_n
            if MASKED:
                mask = (cols < tokens)[:, None] & d_ok[None, :]
            else:
                mask = d_ok[None, :]
            k = tl.load(k_blk + tile_k, mask=mask, other=0.0)
            v = tl.load(v_blk + tile_v, mask=mask, other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
            p = tl.math.exp2(qk * qk_scale - lse2[:, None])
            if MASKED:
                ok = (cols[None, :] <= rows[:, None]) & (cols[None, :] >= doc_start[:, None])
                p = tl.where(ok, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
            k_blk += BLOCK_N * stride_kt
            v_blk += BLOCK_N * stride_vt
        return dq


    @triton.jit(do_not_specialize=_NO_SPEC)
    def _dq_kernel(
        Q, K, V, O, DO, DQ, LSE, DELTA,  # DELTA (H, T) fp32 is written here for the dK/dV kernel
        ROW_START,  # (T,) int32: first token of each token's document
        qk_scale, sm_scale,
        stride_qt, stride_qh, stride_qd,
        stride_kt, stride_kh, stride_kd,
        stride_vt, stride_vh, stride_vd,
        stride_ot, stride_oh, stride_od,
        stride_dot, stride_doh, stride_dod,
        stride_dqt, stride_dqh, stride_dqd,
        stride_lh,  # lse and delta head stride (token stride is 1)
        tokens, heads, group,
        seq_bucket,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        h = pid % heads
        m0 = (tl.cdiv(tokens, BLOCK_M) - 1 - pid // heads) * BLOCK_M
        kvh = h // group
        offs_i = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = _col_mask(BLOCK_D, HEAD_DIM)
        rows = m0 + offs_i
        rows_ok = rows < tokens
        n_hi = tl.minimum(m0 + BLOCK_M, tokens)
        # First, so the key range is known when delta is: as in the forward
        doc_start = tl.load(ROW_START + rows, mask=rows_ok, other=0)
        n_lo = tl.load(ROW_START + m0)
        start_last = tl.load(ROW_START + n_hi - 1)

        m64 = m0.to(tl.int64)
        h64 = h.to(tl.int64)
        row_mask = rows_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + m64 * stride_qt + h64 * stride_qh + offs_i[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=row_mask, other=0.0)
        do = tl.load(DO + m64 * stride_dot + h64 * stride_doh + offs_i[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=row_mask, other=0.0)
        o = tl.load(O + m64 * stride_ot + h64 * stride_oh + offs_i[:, None] * stride_ot + offs_d[None, :] * stride_od, mask=row_mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # rowsum(dO * O), FA2 Alg. 2 line 4
        tl.store(DELTA + h64 * stride_lh + rows, delta, mask=rows_ok)
        lse2 = tl.load(LSE + h64 * stride_lh + rows, mask=rows_ok, other=0.0) * 1.4426950408889634

        k_head = K + kvh.to(tl.int64) * stride_kh
        v_head = V + kvh.to(tl.int64) * stride_vh
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        n_pre = tl.minimum(n_lo + tl.cdiv(start_last - n_lo, BLOCK_N) * BLOCK_N, n_hi)
        n_full = n_pre + tl.maximum(m0 + 1 - n_pre, 0) // BLOCK_N * BLOCK_N
        dq = _dq_inner(dq, q, do, lse2, delta, k_head, v_head, rows, doc_start, d_ok, n_lo, n_pre, tokens, qk_scale,
                       stride_kt, stride_kd, stride_vt, stride_vd, True, BLOCK_N, BLOCK_D, PRECISION)
        dq = _dq_inner(dq, q, do, lse2, delta, k_head, v_head, rows, doc_start, d_ok, n_pre, n_full, tokens, qk_scale,
                       stride_kt, stride_kd, stride_vt, stride_vd, False, BLOCK_N, BLOCK_D, PRECISION)
        dq = _dq_inner(dq, q, do, lse2, delta, k_head, v_head, rows, doc_start, d_ok, n_full, n_hi, tokens, qk_scale,
                       stride_kt, stride_kd, stride_vt, stride_vd, True, BLOCK_N, BLOCK_D, PRECISION)

        dq_ptrs = DQ + m64 * stride_dqt + h64 * stride_dqh + offs_i[:, None] * stride_dqt + offs_d[None, :] * stride_dqd
        tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_mask)


    @triton.jit
    def _dkdv_inner(
        dk, dv, k, v,  # dk/dv (BLOCK_N, BLOCK_D) fp32 accumulators; k/v this program's key block
        q_head, do_head, lse_head, delta_head,  # pointers at token 0 of one query head
        cols, doc_end, d_ok,  # (BLOCK_N,) key tokens and their documents' end
        m_lo, m_hi, tokens, qk_scale,
        stride_qt, stride_qd, stride_dot, stride_dod,
        MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):
        offs_i = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        tile_q = offs_i[:, None] * stride_qt + offs_d[None, :] * stride_qd
        tile_do = offs_i[:, None] * stride_dot + offs_d[None, :] * stride_dod
        q_blk = q_head + m_lo.to(tl.int64) * stride_qt
        do_blk = do_head + m_lo.to(tl.int64) * stride_dot
        for m in range(m_lo, m_hi, BLOCK_M):
            rows = m + offs_i
            if MASKED:
                rows_ok = rows < tokens
                mask = rows_ok[:, None] & d_ok[None, :]
                lse2 = tl.load(lse_head + rows, mask=rows_ok, other=0.0) * 1.4426950408889634
                delta = tl.load(delta_head + rows, mask=rows_ok, other=0.0)
            else:
                mask = d_ok[None, :]
                lse2 = tl.load(lse_head + rows) * 1.4426950408889634
                delta = tl.load(delta_head + rows)
            q = tl.load(q_blk + tile_q, mask=mask, other=0.0)
            do = tl.load(do_blk + tile_do, mask=mask, other=0.0)
            qkt = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
            pt = tl.math.exp2(qkt * qk_scale - lse2[None, :])  # P^T
            if MASKED:
                ok = (rows[None, :] >= cols[:, None]) & (rows[None, :] < doc_end[:, None])
                pt = tl.where(ok, pt, 0.0)
            dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dst = pt * (dpt - delta[None, :])
            dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PRECISION)
            q_blk += BLOCK_M * stride_qt
            do_blk += BLOCK_M * stride_dot
        return dk, dv


    @triton.jit(do_not_specialize=_NO_SPEC)
    def _dkdv_kernel(
        Q, K, V, DO, DK, DV, LSE, DELTA,
        cu_seqlens, num_docs, search_steps,  # (docs + 1,) int32 boundaries; binary-search depth
        qk_scale, sm_scale,
        stride_qt, stride_qh, stride_qd,
        stride_kt, stride_kh, stride_kd,
        stride_vt, stride_vh, stride_vd,
        stride_dot, stride_doh, stride_dod,
        stride_dkt, stride_dkh, stride_dkd,
        stride_dvt, stride_dvh, stride_dvd,
        stride_lh,
        tokens, kv_heads, group,
        seq_bucket,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        kvh = pid % kv_heads
        n0 = (pid // kv_heads) * BLOCK_N  # early keys first: they have the most queries
        offs_j = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = _col_mask(BLOCK_D, HEAD_DIM)
        cols = n0 + offs_j
        cols_ok = cols < tokens
        # Searched here, unlike the forward and dQ programs' loaded starts: a dK/dV program runs the
        # whole query range of a KV head's group, so its prologue is a small share, and the compiled
        # search spills less at 64x128 than the loaded form (976 against 1296 B of stack, Triton 3.6).
        _, doc_end = _doc_bounds(cu_seqlens, tl.minimum(cols, tokens - 1), num_docs, search_steps)
        end_first = tl.min(doc_end, 0)
        end_last = tl.max(doc_end, 0)

        n64 = n0.to(tl.int64)
        kvh64 = kvh.to(tl.int64)
        col_mask = cols_ok[:, None] & d_ok[None, :]
        k = tl.load(K + n64 * stride_kt + kvh64 * stride_kh + offs_j[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=col_mask, other=0.0)
        v = tl.load(V + n64 * stride_vt + kvh64 * stride_vh + offs_j[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=col_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        # Queries [n0, m_pre): the causal diagonal; [m_pre, m_full): every pair visible, no mask;
        # [m_full, end_last): past the first key's document end.
        m_pre = tl.minimum(n0 + tl.cdiv(BLOCK_N - 1, BLOCK_M) * BLOCK_M, end_last)
        m_full = m_pre + tl.maximum(end_first - m_pre, 0) // BLOCK_M * BLOCK_M
        for g in range(group):  # the query heads sharing this KV head: dK/dV sum over them here
            h64 = (kvh * group + g).to(tl.int64)
            q_head = Q + h64 * stride_qh
            do_head = DO + h64 * stride_doh
            lse_head = LSE + h64 * stride_lh
            delta_head = DELTA + h64 * stride_lh
            dk, dv = _dkdv_inner(dk, dv, k, v, q_head, do_head, lse_head, delta_head, cols, doc_end, d_ok, n0, m_pre, tokens, qk_scale,
                                 stride_qt, stride_qd, stride_dot, stride_dod, True, BLOCK_M, BLOCK_D, PRECISION)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_head, do_head, lse_head, delta_head, cols, doc_end, d_ok, m_pre, m_full, tokens, qk_scale,
                                 stride_qt, stride_qd, stride_dot, stride_dod, False, BLOCK_M, BLOCK_D, PRECISION)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_head, do_head, lse_head, delta_head, cols, doc_end, d_ok, m_full, end_last, tokens, qk_scale,
                                 stride_qt, stride_qd, stride_dot, stride_dod, True, BLOCK_M, BLOCK_D, PRECISION)

        dk_ptrs = DK + n64 * stride_dkt + kvh64 * stride_dkh + offs_j[:, None] * stride_dkt + offs_d[None, :] * stride_dkd
        tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_mask)
        dv_ptrs = DV + n64 * stride_dvt + kvh64 * stride_dvh + offs_j[:, None] * stride_dvt + offs_d[None, :] * stride_dvd
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_mask)


# fmt: on


# --------------------------------------------------------------------------------------------
# Launch settings
# --------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M is the query block, BLOCK_N the key block,
# in every kernel. The first entry is the fixed choice for short sequences; longer ones autotune
# over the list (two or three, so a cold start costs a few seconds per kernel). d=128 entries come from a
# sweep on an H200 (B4 S4096 H32/8, bf16, each kernel alone, TFLOP/s executed): fwd 128x64 w8 s3
# 436, s4 441, s5 435, 128x128 w8 s3 444, s2 419, 64x128 w4 287; dq 128x64 w8 s3 600, s4 583,
# s2 498, 128x128 w8 s2 452, 64x64 w4 s3 442; dkdv 64x128 w8 s3 418, s2 398, s4 378, 128x64 w8
# 211, 32x128 w4 170. Four warps on 128-row tiles at d=128 spill (100-150 TFLOP/s).
# sm_90 resource report (`python -m bench.resources --family attention_dkdv`, no GPU): at d=128
# every dkdv setting above spills, since a program holds its dK and dV accumulators (128
# regs/thread at 8 warps) and K, V besides: 64x128 w8 s3 uses 255 registers + 344 B of stack with
# Triton 3.9, 976 B with 3.6 (the GPU image's); s2 384 / 592 B. 16-query steps shrink the P and dP
# tiles: 16x128 w8 s3 spills 0 / 120 B, s2 0 / 8 B. Both join the d=128 dkdv autotune list in
# place of 64x128 s2: untimed yet, kept only where they measure faster.
_CANDIDATES = {
    "fwd": {
        64: [(128, 64, 4, 3), (128, 128, 8, 3)],
        128: [(128, 64, 8, 3), (128, 128, 8, 3)],
    },
    "dq": {
        64: [(128, 64, 8, 3), (64, 64, 4, 3)],
        128: [(128, 64, 8, 3), (64, 64, 4, 3)],
    },
    "dkdv": {
        64: [(64, 128, 8, 3), (32, 128, 4, 3)],
        128: [(64, 128, 8, 3), (16, 128, 8, 3), (16, 128, 8, 2)],
    },
}
# The interpreter runs programs one by one in numpy: few, mid-sized blocks; BLOCK_M != BLOCK_N so
# the diagonal and document-boundary paths are exercised with unequal tiles.
_INTERPRET_CONFIG = {"fwd": (64, 32, 4, 1), "dq": (64, 32, 4, 1), "dkdv": (32, 64, 4, 1)}
_AUTOTUNE_FROM = 2048  # bucketed max_seqlen at which autotuning starts


def _config(spec) -> "triton.Config":
    block_m, block_n, warps, stages = spec
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages
    )


def _bucket(max_seqlen: int) -> int:
    return max(64, min(16384, triton.next_power_of_2(max(int(max_seqlen), 1))))


_TUNED: dict = {}


def _fixed_spec(kind: str, dclass: int, bucket: int) -> tuple | None:
    """The fixed (BLOCK_M, BLOCK_N, warps, stages) of a launch, or None to autotune: fixed in
    the interpreter and for short sequences, autotuned (cached per head-dim class, bucket and
    dtypes) for long ones, where the choice is worth the few seconds."""
    if INTERPRET:
        return _INTERPRET_CONFIG[kind]
    if bucket < _AUTOTUNE_FROM:
        return _CANDIDATES[kind][dclass][0]
    return None


def _launch(kind: str, kernel, grid, args: tuple, head_dim: int, bucket: int, **meta) -> None:
    dclass = 64 if head_dim <= 64 else 128
    spec = _fixed_spec(kind, dclass, bucket)
    if spec is None:
        key = (kind, dclass)
        if key not in _TUNED:
            configs = [_config(s) for s in _CANDIDATES[kind][dclass]]
            _TUNED[key] = triton.autotune(configs, key=["seq_bucket", "HEAD_DIM"])(kernel)
        _TUNED[key][grid](*args, **meta)
        return
    block_m, block_n, warps, stages = spec
    kernel[grid](
        *args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages
    )


def _search_steps(num_docs: int) -> int:
    return max(1, int(num_docs).bit_length())  # >= ceil(log2(num_docs))


_STARTS_BLOCK = 64 if INTERPRET else 1024  # tokens per program of _doc_starts_kernel


@on_tensor_device
def _doc_starts(cu_seqlens: torch.Tensor, tokens: int) -> torch.Tensor:
    """(tokens,) int32: the first token of each token's document."""
    start = _empty((tokens,), torch.int32, cu_seqlens.device)
    if tokens == 0:
        return start
    num_docs = cu_seqlens.numel() - 1
    _doc_starts_kernel[(triton.cdiv(tokens, _STARTS_BLOCK),)](
        cu_seqlens, num_docs, _search_steps(num_docs), start, tokens,
        BLOCK=_STARTS_BLOCK, num_warps=4,
    )  # fmt: skip
    return start


# --------------------------------------------------------------------------------------------
# Launchers and autograd
# --------------------------------------------------------------------------------------------


def _empty(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the kernels write comes from here, so tests can NaN-fill them (poisoning)."""
    return torch.empty(shape, dtype=dtype, device=device)


@on_tensor_device
def _forward(q, k, v, row_start, max_seqlen: int, scale: float):
    """row_start: `_doc_starts(cu_seqlens, tokens)`."""
    tokens, heads, head_dim = q.shape
    out = _empty((tokens, heads, head_dim), q.dtype, q.device)
    lse = _empty((heads, tokens), torch.float32, q.device)
    if tokens == 0:
        return out, lse
    grid = lambda meta: (triton.cdiv(tokens, meta["BLOCK_M"]) * heads,)
    args = (
        q, k, v, out, lse, row_start, scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), lse.stride(0),
        tokens, heads, heads // k.shape[1], _bucket(max_seqlen),
    )  # fmt: skip
    _launch("fwd", _fwd_kernel, grid, args, head_dim, _bucket(max_seqlen), **_meta(q))
    return out, lse


def _meta(q: torch.Tensor) -> dict:
    head_dim = q.shape[-1]
    return dict(
        HEAD_DIM=head_dim,
        BLOCK_D=_block_d(head_dim),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


@on_tensor_device
def _dq_pass(do, q, k, v, out, lse, row_start, max_seqlen: int, scale: float):
    """The backward's first launch: dQ, and delta = rowsum(dO * O) (heads, tokens) fp32 for the
    dK/dV launch. tokens > 0."""
    tokens, heads, head_dim = q.shape
    dq = _empty((tokens, heads, head_dim), q.dtype, q.device)
    delta = _empty((heads, tokens), torch.float32, q.device)
    bucket = _bucket(max_seqlen)
    dq_args = (
        q, k, v, out, do, dq, lse, delta, row_start, scale * LOG2E, scale,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *do.stride(), *dq.stride(),
        lse.stride(0), tokens, heads, heads // k.shape[1], bucket,
    )  # fmt: skip
    dq_grid = lambda m: (triton.cdiv(tokens, m["BLOCK_M"]) * heads,)
    _launch("dq", _dq_kernel, dq_grid, dq_args, head_dim, bucket, **_meta(q))
    return dq, delta


@on_tensor_device
def _dkdv_pass(do, q, k, v, lse, delta, cu_seqlens, max_seqlen: int, scale: float):
    """The backward's second launch: dK and dV, each KV head's summed over its query heads."""
    tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    dk = _empty((tokens, kv_heads, head_dim), k.dtype, k.device)
    dv = _empty((tokens, kv_heads, head_dim), v.dtype, v.device)
    num_docs = cu_seqlens.numel() - 1
    bucket = _bucket(max_seqlen)
    dkdv_args = (
        q, k, v, do, dk, dv, lse, delta, cu_seqlens, num_docs, _search_steps(num_docs),
        scale * LOG2E, scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        lse.stride(0), tokens, kv_heads, heads // kv_heads, bucket,
    )  # fmt: skip
    dkdv_grid = lambda m: (triton.cdiv(tokens, m["BLOCK_N"]) * kv_heads,)
    _launch("dkdv", _dkdv_kernel, dkdv_grid, dkdv_args, head_dim, bucket, **_meta(q))
    return dk, dv


def _backward(do, q, k, v, out, lse, row_start, cu_seqlens, max_seqlen: int, scale: float):
    if q.shape[0] == 0:
        return tuple(_empty(x.shape, x.dtype, x.device) for x in (q, k, v))
    dq, delta = _dq_pass(do, q, k, v, out, lse, row_start, max_seqlen, scale)
    dk, dv = _dkdv_pass(do, q, k, v, lse, delta, cu_seqlens, max_seqlen, scale)
    return dq, dk, dv


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale):
        row_start = _doc_starts(cu_seqlens, q.shape[0])
        out, lse = _forward(q, k, v, row_start, max_seqlen, scale)
        ctx.save_for_backward(q, k, v, out, lse, row_start, cu_seqlens)
        ctx.max_seqlen, ctx.scale = max_seqlen, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable  # else create_graph would take these gradients as constants, silently
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, row_start, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _backward(
            dout, q, k, v, out, lse, row_start, cu_seqlens, ctx.max_seqlen, ctx.scale
        )
        return dq, dk, dv, None, None, None


def _check(q, k, v, cu_seqlens, where: str = "kernels.attention.attention") -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"{where}: expected q (tokens, heads, head_dim) and k, v (tokens, kv_heads, head_dim); "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    tokens, heads, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != tokens or k.shape[2] != head_dim:
        raise ValueError(
            f"{where}: k and v must both be (tokens={tokens}, kv_heads, head_dim={head_dim}); "
            f"got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[1] == 0 or heads % k.shape[1] != 0:
        raise ValueError(f"{where}: heads ({heads}) must be a multiple of kv_heads ({k.shape[1]})")
    if head_dim % 16 != 0 or not 16 <= head_dim <= 128:
        raise ValueError(
            f"{where}: head_dim must be a multiple of 16 from 16 to 128, got {head_dim}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{where}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    # Zero tokens may have zero documents ([0]); any token needs a document to search for.
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < (2 if tokens else 1):
        raise ValueError(
            f"{where}: cu_seqlens must be (docs + 1,) document boundaries starting at 0 and ending "
            f"at tokens={tokens}; got shape {tuple(cu_seqlens.shape)}"
        )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
):
    """Causal attention inside each packed document, GQA by head groups.

    q: (tokens, heads, head_dim); k, v: (tokens, kv_heads, head_dim), any strides (e.g. views
    split out of a fused qkv projection); cu_seqlens: (docs + 1,) int32 boundaries, 0 first and
    tokens last, empty documents allowed; max_seqlen: longest document (picks launch settings
    only; None reads it from cu_seqlens, one device-to-host copy, so pass it when known). softmax_scale defaults to head_dim ** -0.5. Returns out: (tokens, heads, head_dim)
    contiguous, and with `return_lse` also lse: (heads, tokens) fp32, the natural-log
    log-sum-exp of the scaled scores per query (not differentiable). There is no dropout.
    """
    _check(q, k, v, cu_seqlens)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if not use_triton(q):
        return reference.attention(q, k, v, cu_seqlens, max_seqlen, scale, return_lse=return_lse)
    if cu_seqlens.dtype != torch.int32 or not cu_seqlens.is_contiguous():
        cu_seqlens = cu_seqlens.to(torch.int32).contiguous()
    if max_seqlen is None:
        max_seqlen = int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0
    out, lse = _FlashAttention.apply(q, k, v, cu_seqlens, int(max_seqlen), float(scale))
    return (out, lse) if return_lse else out


def attention_padded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    return_lse: bool = False,
):
    """Causal attention on equal-length sequences, GQA by head groups.

    q: (batch, seq, heads, head_dim); k, v: (batch, seq, kv_heads, head_dim). Returns out:
    (batch, seq, heads, head_dim) and with `return_lse` also lse: (batch, heads, seq) fp32.
    Runs the packed kernels with `batch` documents of `seq` tokens (no copy when the batch and
    sequence dimensions flatten to a view, as for contiguous tensors).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "kernels.attention.attention_padded: expected q (batch, seq, heads, head_dim) and "
            f"k, v (batch, seq, kv_heads, head_dim); got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    batch, seq, heads, head_dim = q.shape
    cu_seqlens = torch.arange(batch + 1, dtype=torch.int32, device=q.device) * seq
    res = attention(
        q.flatten(0, 1),
        k.flatten(0, 1),
        v.flatten(0, 1),
        cu_seqlens,
        seq,
        softmax_scale,
        return_lse,
    )
    # head_dim, not -1: a view of zero elements cannot infer a dimension
    if not return_lse:
        return res.view(batch, seq, heads, head_dim)
    out, lse = res
    return out.view(batch, seq, heads, head_dim), lse.view(heads, batch, seq).transpose(0, 1)


def backward_launches(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dout: torch.Tensor,
    softmax_scale: float | None = None,
) -> tuple[Callable[[], tuple], Callable[[], tuple]]:
    """The backward's two launches as separate calls, for benchmarks and profiles (`attention`'s
    backward runs both; its time alone does not say which kernel to work on).

    Shapes as for `attention`; dout: (tokens, heads, head_dim). Runs the forward and the dQ
    launch once here, because the dK/dV launch reads the dQ launch's delta; then returns
    `dq_launch()` -> (dq, delta) and `dkdv_launch()` -> (dk, dv), each running its kernel alone
    on the same inputs. Triton path only: CUDA tensors, or CPU under TRITON_INTERPRET=1.
    """
    where = "kernels.attention.backward_launches"
    _check(q, k, v, cu_seqlens, where)
    if not use_triton(q):
        raise ValueError(
            f"{where}: times the Triton kernels, so it needs CUDA tensors (or TRITON_INTERPRET=1 "
            "on CPU)"
        )
    if q.shape[0] == 0 or dout.shape != q.shape:
        raise ValueError(
            f"{where}: expected at least one token and dout shaped like q {tuple(q.shape)}; got "
            f"dout {tuple(dout.shape)}"
        )
    if dout.dtype != q.dtype or dout.device != q.device:
        raise ValueError(
            f"{where}: dout is {dout.dtype} on {dout.device}; q is {q.dtype} on {q.device}: give "
            "dout the same dtype and device"
        )
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    cu = cu_seqlens.to(torch.int32).contiguous()
    row_start = _doc_starts(cu, q.shape[0])
    out, lse = _forward(q, k, v, row_start, max_seqlen, scale)
    _, delta = _dq_pass(dout, q, k, v, out, lse, row_start, max_seqlen, scale)

    def dq_launch() -> tuple:
        return _dq_pass(dout, q, k, v, out, lse, row_start, max_seqlen, scale)

    def dkdv_launch() -> tuple:
        return _dkdv_pass(dout, q, k, v, lse, delta, cu, max_seqlen, scale)

    return dq_launch, dkdv_launch
