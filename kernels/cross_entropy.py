"""Cross-entropy pieces over (a shard of) the vocabulary, in Triton: softmax statistics per token
in one read of the logits, and the gradient written straight in the logits' dtype.

The logits stay in their dtype (bf16) and are read twice in all: once by `ce_stats` (an online
max and sum of exponentials per row, and the label's logit) and once by `ce_grad` (softmax minus
one-hot, times the upstream gradient). The plain-PyTorch path upcasts the whole (tokens, vocab)
matrix to fp32, keeps the fp32 softmax for the backward and makes about eight passes over it.

Vocabulary-parallel use (`parallel.cross_entropy`): each rank holds columns [start, start +
local) of the padded vocabulary, of which the first `valid` are real (padding columns are left
out of the softmax). A rank computes its (max, sum) pair; the global pair is max M over ranks
and sum of s_r * exp(m_r - M); the label's logit is on one rank only. Those (tokens,) vectors are
all the communication, as before.

Launch settings (columns per step, warps, and for the statistics how many steps' loads the
compiler pipelines) come from a heuristic unless the card's tuning table (kernels/tuning.py)
names measured ones; the statistics' block size sets its summation order, hence a fixed table.

Triton for CUDA tensors (and CPU under the interpreter); the reference otherwise.
"""

from typing import NamedTuple

import torch

from kernels import reference, tuning
from kernels._triton import HAS_TRITON, on_tensor_device, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernels._triton import to_out as _to_out

    @triton.jit
    def _ce_stats_kernel(
        LOGITS,  # (tokens, local) any row stride, unit column stride
        LABELS,  # (tokens,) int64: global label ids
        M,  # out: (tokens,) fp32 max over this shard's valid columns (-inf if none)
        S,  # out: (tokens,) fp32 sum of exp(z - M) over them
        PICKED,  # out: (tokens,) fp32 the label's logit when this shard holds it, else 0
        stride_row,  # elements between rows of LOGITS
        start,  # first global column of this shard
        valid,  # real (non-padding) columns of this shard
        local,  # all columns of this shard (a multiple of 128 in a model: vector loads)
        BLOCK: tl.constexpr,  # columns per step
        STAGES: tl.constexpr,  # > 1: the compiler pipelines the next steps' loads (cp.async)
    ):
        row = tl.program_id(0).to(tl.int64)
        base = LOGITS + row * stride_row
        cols = tl.arange(0, BLOCK)
        # A running max for the row and a running sum per lane: one exponential per value
        # (the special-function unit's rate is about the bandwidth's at 2 bytes a value, so a
        # second, per-lane rescaling exponential would bound the kernel), one block max per
        # step, and the lanes' sums added once at the end.
        m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
        s = tl.zeros([BLOCK], dtype=tl.float32)
        for c0 in tl.range(0, valid, BLOCK, num_stages=STAGES):
            c = c0 + cols
            # Loads are masked by the row's end, whose alignment the compiler knows (16-byte
            # vectors); padding columns are set aside afterwards.
            z = tl.load(base + c, mask=c < local, other=float("-inf")).to(tl.float32)
            z = tl.where(c < valid, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            # While every value seen is -inf, shift by 0: -inf - -inf (NaN) is never formed.
            shift = tl.where(m_new > float("-inf"), m_new, 0.0)
            s = s * tl.exp(tl.where(m > float("-inf"), m, shift) - shift) + tl.exp(z - shift)
            m = m_new
        m_row = m  # -inf for a shard of padding only (its sum stays 0)
        s_row = tl.sum(s, axis=0)
        label = tl.load(LABELS + row) - start
        mine = (label >= 0) & (label < valid)
        z_label = tl.load(base + tl.where(mine, label, 0), mask=mine, other=0.0).to(tl.float32)
        tl.store(M + row, m_row)
        tl.store(S + row, s_row)
        tl.store(PICKED + row, tl.where(mine, z_label, 0.0))

    @triton.jit
    def _ce_grad_kernel(
        LOGITS,  # (tokens, local) any row stride, unit column stride
        LABELS,  # (tokens,) int64: global label ids
        M,  # (tokens,) fp32 global max
        S,  # (tokens,) fp32 global sum of exp(z - M)
        DLOSS,  # (tokens,) fp32 upstream gradient of each token's loss
        GRAD,  # out: (tokens, local) in the logits' dtype, unit column stride
        stride_row,  # elements between rows of LOGITS
        stride_grad_row,  # elements between rows of GRAD
        start,  # first global column of this shard
        valid,  # real columns of this shard
        local,  # all columns of this shard (padding gets gradient 0)
        BLOCK: tl.constexpr,  # columns per program
    ):
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        z = tl.load(LOGITS + row * stride_row + c, mask=c < local, other=float("-inf"))
        z = tl.where(c < valid, z.to(tl.float32), float("-inf"))  # padding: gradient 0
        m = tl.load(M + row)
        # d loss / d z_v = softmax_v - [v == label]; 1/S once per row, not a division per value
        scale = tl.load(DLOSS + row) / tl.load(S + row)
        g = tl.exp(z - m) * scale
        label = tl.load(LABELS + row) - start
        g = tl.where((c == label) & (c < valid), g - tl.load(DLOSS + row), g)
        tl.store(
            GRAD + row * stride_grad_row + c, _to_out(g, GRAD.dtype.element_ty), mask=c < local
        )


class StatsConfig(NamedTuple):
    """Statistics launch settings (tunable per card, see kernels/tuning.py)."""

    block: int  # columns per step (one step covers the whole shard when >= its width)
    warps: int  # num_warps
    stages: int = 1  # > 1: software-pipelined loads, stages - 1 steps ahead in shared memory


class GradConfig(NamedTuple):
    """Gradient launch settings (tunable per card). Elementwise: they never change the result."""

    block: int  # columns per program
    warps: int  # num_warps


def tune_key(local: int) -> str:
    """The tuning table's key of a shard width (the same for both kernels)."""
    return f"vocab={local}"


def _stats_heuristic(local: int) -> StatsConfig:
    # 16 bf16 values (two 16-byte vectors) a thread per step at 8 warps
    return StatsConfig(min(4096, triton.next_power_of_2(max(local, 1))), 8)


def _grad_heuristic(local: int) -> GradConfig:
    # 8 values (one 16-byte vector) a thread at 8 warps
    return GradConfig(min(2048, triton.next_power_of_2(max(local, 1))), 8)


def candidates_stats(local: int) -> list[StatsConfig]:
    """Statistics settings a sweep should time, likeliest first (a sweep cut short keeps what it
    timed): the heuristic, its loads pipelined 1 or 2 steps ahead, the whole shard in one step at
    32 warps when that is at most 16 values a thread (Liger-Kernel's shape; at 32128 columns it
    spills), then 8 to 32 values a thread per step at each pipelining depth."""
    width = triton.next_power_of_2(max(local, 1))
    heuristic = _stats_heuristic(local)
    out = [heuristic]
    if heuristic.block < width:  # several steps: pipelining can apply
        out += [heuristic._replace(stages=2), heuristic._replace(stages=3)]
    if width <= 16384:  # at most 16 values a thread: wider shards spill at 32 warps
        out.append(StatsConfig(width, 32))
    for block in (2048, 4096, 8192):
        for warps in (8, 16):
            if block < width and 8 <= block // (32 * warps) <= 32:
                out += [StatsConfig(block, warps, stages) for stages in (1, 2, 3)]
    return list(dict.fromkeys(out))


def candidates_grad(local: int) -> list[GradConfig]:
    """Gradient settings a sweep should time, the heuristic first: 8 or 16 values a thread."""
    out = [_grad_heuristic(local)]
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            if (
                block <= 2 * triton.next_power_of_2(max(local, 1))
                and 8 <= block // (32 * warps) <= 16
            ):
                out.append(GradConfig(block, warps))
    return list(dict.fromkeys(out))


def _stats_config(local: int, device: torch.device) -> StatsConfig:
    return tuning.tuned_config(
        "cross_entropy_stats", tune_key(local), device, _stats_heuristic(local)
    )


def _grad_config(local: int, device: torch.device) -> GradConfig:
    return tuning.tuned_config(
        "cross_entropy_grad", tune_key(local), device, _grad_heuristic(local)
    )


def cross_entropy_bytes(tokens: int, local: int, dtype_bytes: int, backward: bool) -> int:
    """Minimum bytes moved: the forward reads the logits once; the backward reads them again and
    writes their gradient (the (tokens,) vectors are noise next to that)."""
    return tokens * local * dtype_bytes * (2 if backward else 1)


def _check(
    logits: torch.Tensor, labels: torch.Tensor, valid: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits with unit column stride, dense labels): the kernels index labels (and the other
    (tokens,) vectors) by row alone, so a strided view, e.g. a column of (tokens, 2), is copied."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"cross-entropy kernels want logits (tokens, vocab) and labels (tokens,), got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if not 0 <= valid <= logits.shape[1]:
        raise ValueError(f"valid columns {valid} outside [0, {logits.shape[1]}]")
    return (logits if logits.stride(1) == 1 else logits.contiguous()), labels.contiguous()


@on_tensor_device
def ce_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    start: int,
    valid: int,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    cfg: StatsConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token over this shard's first `valid` columns: (max, sum of exp(z - max), the label's
    logit or 0 when the label is not in [start, start + valid)), each (tokens,) fp32; -inf, 0, 0
    for a shard of padding only.

    logits: (tokens, local) any float dtype; labels: (tokens,) global ids. `out` may give the
    three fp32 outputs (tests pass NaN-filled ones); `cfg` overrides the launch settings (the
    tuning sweep times each candidate)."""
    logits, labels = _check(logits, labels, valid)
    if not use_triton(logits):
        return reference.ce_stats(logits, labels, start, valid)
    tokens = logits.shape[0]
    m, s, picked = out or tuple(
        torch.empty(tokens, dtype=torch.float32, device=logits.device) for _ in range(3)
    )
    if tokens:
        cfg = cfg or _stats_config(logits.shape[1], logits.device)
        _ce_stats_kernel[(tokens,)](logits, labels, m, s, picked, logits.stride(0), start, valid,
                                    logits.shape[1], BLOCK=cfg.block, STAGES=cfg.stages,
                                    num_warps=cfg.warps)  # fmt: skip
    return m, s, picked


@on_tensor_device
def ce_grad(
    logits: torch.Tensor,
    labels: torch.Tensor,
    start: int,
    valid: int,
    m: torch.Tensor,
    s: torch.Tensor,
    dloss: torch.Tensor,
    grad: torch.Tensor | None = None,
    cfg: GradConfig | None = None,
) -> torch.Tensor:
    """d loss / d logits in the logits' dtype: (exp(z - m) / s - [column == label]) * dloss for
    the valid columns, 0 for padding columns. m, s: the global statistics (tokens,) fp32.
    `grad` may be given (unit column stride; tests pass a NaN-filled one); `cfg` overrides the
    launch settings."""
    logits, labels = _check(logits, labels, valid)
    tokens = logits.shape[0]
    if m.shape != (tokens,) or s.shape != (tokens,):
        raise ValueError(
            f"ce_grad: m and s must be ({tokens},) like the labels, got {tuple(m.shape)} and "
            f"{tuple(s.shape)}"
        )
    if dloss.shape != (tokens,):
        # one upstream gradient for every token ((1,) or 0-dim): the kernel reads it per row
        if dloss.numel() != 1:
            raise ValueError(
                f"ce_grad: dloss must be ({tokens},) or a single number, got {tuple(dloss.shape)}"
            )
        dloss = dloss.reshape(1).expand(tokens)
    if not use_triton(logits):
        return reference.ce_grad(logits, labels, start, valid, m, s, dloss)
    m, s = m.contiguous(), s.contiguous()  # read by row, as labels
    local = logits.shape[1]
    if grad is None:
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if tokens and local:
        cfg = cfg or _grad_config(local, logits.device)
        grid = (tokens, triton.cdiv(local, cfg.block))
        _ce_grad_kernel[grid](logits, labels, m, s, dloss.float().contiguous(), grad,
                              logits.stride(0), grad.stride(0), start, valid, local,
                              BLOCK=cfg.block, num_warps=cfg.warps)  # fmt: skip
    return grad
