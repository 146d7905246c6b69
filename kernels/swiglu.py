"""SwiGLU: silu(gate) * up on the fused w13 projection output [gate | up], forward and backward.

Gate and up are read straight out of the fused (..., 2*ffn) tensor through one row stride (no
chunk/contiguous copies), and the backward writes d(gate_up) in the same fused layout, so the
w13 backward consumes it directly. The backward recomputes sigmoid(gate) from the saved input
instead of saving silu(gate): no extra (tokens, ffn) activation is kept for backward.

Launch settings (columns per program, warps) come from a heuristic unless the card's tuning table
(kernels/tuning.py, written by `python -m bench.tune`) names measured ones.
"""

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from kernels import reference, tuning
from kernels._triton import HAS_TRITON, on_tensor_device, use_triton, wide_offsets

if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernels._triton import to_out as _to_out


def swiglu_bytes(tokens: int, ffn: int, dtype_bytes: int, backward: bool = False) -> int:
    """Bytes a kernel must move (the GB/s denominator).

    forward:  read gate, up; write out                      = 3 * T * ffn * b
    backward: read dout, gate, up; write dgate, dup         = 5 * T * ffn * b
    """
    return (5 if backward else 3) * tokens * ffn * dtype_bytes


if HAS_TRITON:

    @triton.jit
    def _sigmoid(g):
        # exp of -|g| never overflows, so no inf intermediate even for |g| in the thousands (fp16
        # and bf16 gates can get there); exact 0/1 saturation keeps silu and its derivative finite.
        # One reciprocal shared by both branches: sigmoid is exp + rcp on the special-function
        # unit, whose rate (not memory) would otherwise bound the forward on an H100/H200.
        e = tl.exp(-tl.abs(g))
        r = 1.0 / (1.0 + e)
        return tl.where(g >= 0, r, e * r)

    @triton.jit
    def _program_block(
        n_ffn, n_rows, BLOCK: tl.constexpr, LINEAR: tl.constexpr, FLAT_FFN: tl.constexpr
    ):
        """(rows, columns, mask) of this program's elements.

        FLAT_FFN > 0 (= ffn, a compile-time constant): the rows x ffn outputs as one flat range
        cut into blocks of BLOCK, each element's row and column split off by a multiply and shift,
        as torch.compile's pointwise kernel does; a block may span two rows, and only the last
        one is masked. The launcher takes it only when every offset fits in int32.
        LINEAR: one row per program, column blocks in row-major order on a 1-D grid, so programs
        that run together cover consecutive addresses.
        Otherwise rows on grid axis 0 (up to 2^31 - 1) and column blocks on axis 1, so programs
        that run together cover the same columns of consecutive rows."""
        if FLAT_FFN > 0:
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            row = offs // FLAT_FFN
            cols = offs % FLAT_FFN
            mask = row < n_rows
        elif LINEAR:
            n_blocks = tl.cdiv(n_ffn, BLOCK)
            pid = tl.program_id(0)
            row = (pid // n_blocks).to(tl.int64)  # int64: rows * stride can pass 2^31
            cols = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
            mask = cols < n_ffn
        else:
            row = tl.program_id(0).to(tl.int64)
            cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
            mask = cols < n_ffn
        return row, cols, mask

    @triton.jit
    def _swiglu_fwd_kernel(
        GU,  # fused input (rows, 2*ffn): gate in columns [0, ffn), up in [ffn, 2*ffn)
        OUT,  # output (rows, ffn)
        stride_gu_row,  # elements between rows of GU
        stride_gu_col,  # elements between columns of GU
        stride_out_row,  # elements between rows of OUT
        stride_out_col,  # elements between columns of OUT
        n_ffn,  # ffn (half the width of GU)
        n_rows,  # rows
        BLOCK: tl.constexpr,  # elements per program (columns of one row unless flat)
        LINEAR: tl.constexpr,  # 1-D row-major grid (see _program_block)
        FLAT_FFN: tl.constexpr,  # > 0: flat blocks over rows x ffn (see _program_block)
    ):
        row, cols, mask = _program_block(n_ffn, n_rows, BLOCK, LINEAR, FLAT_FFN)
        gu = GU + row * stride_gu_row
        g = tl.load(gu + cols * stride_gu_col, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu + (cols + n_ffn) * stride_gu_col, mask=mask, other=0.0).to(tl.float32)
        out = g * _sigmoid(g) * u
        tl.store(
            OUT + row * stride_out_row + cols * stride_out_col,
            _to_out(out, OUT.dtype.element_ty),
            mask=mask,
        )

    @triton.jit
    def _swiglu_bwd_kernel(
        DOUT,  # upstream gradient (rows, ffn), any strides
        GU,  # saved fused input (rows, 2*ffn)
        DGU,  # out: fused gradient (rows, 2*ffn): dgate in [0, ffn), dup in [ffn, 2*ffn)
        stride_dout_row,  # elements between rows of DOUT
        stride_dout_col,  # elements between columns of DOUT
        stride_gu_row,  # elements between rows of GU
        stride_gu_col,  # elements between columns of GU
        stride_dgu_row,  # elements between rows of DGU
        stride_dgu_col,  # elements between columns of DGU
        n_ffn,  # ffn
        n_rows,  # rows
        BLOCK: tl.constexpr,  # elements per program (columns of one row unless flat)
        LINEAR: tl.constexpr,  # 1-D row-major grid (see _program_block)
        FLAT_FFN: tl.constexpr,  # > 0: flat blocks over rows x ffn (see _program_block)
    ):
        row, cols, mask = _program_block(n_ffn, n_rows, BLOCK, LINEAR, FLAT_FFN)
        gu = GU + row * stride_gu_row
        g = tl.load(gu + cols * stride_gu_col, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu + (cols + n_ffn) * stride_gu_col, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(
            DOUT + row * stride_dout_row + cols * stride_dout_col, mask=mask, other=0.0
        ).to(tl.float32)
        sig = _sigmoid(g)
        silu = g * sig
        # silu'(g) = sig * (1 + g * (1 - sig)); finite for any finite g (sig saturates to 0 or 1).
        dg = dout * u * (sig * (1.0 + g * (1.0 - sig)))
        du = dout * silu
        dgu = DGU + row * stride_dgu_row
        tl.store(dgu + cols * stride_dgu_col, _to_out(dg, DGU.dtype.element_ty), mask=mask)
        tl.store(
            dgu + (cols + n_ffn) * stride_dgu_col, _to_out(du, DGU.dtype.element_ty), mask=mask
        )


class Config(NamedTuple):
    """Launch settings of one pass (tunable per card, see kernels/tuning.py)."""

    block: int  # columns per program (elements per program when flat)
    warps: int  # num_warps
    linear: bool = False  # 1-D row-major grid instead of (rows, column blocks)
    flat: bool = False  # flat blocks over rows x ffn, ffn compiled in (torch.compile's layout)


def _heuristic(n_ffn: int) -> Config:
    # 2048 columns over 8 warps is 8 elements (16 bytes of bf16) per thread per tensor: vector
    # loads, and enough programs (rows x ffn/2048) to fill every SM many times over.
    block = min(2048, max(128, triton.next_power_of_2(n_ffn)))
    return Config(block, max(1, min(8, block // 256)))


def tune_key(n_ffn: int) -> str:
    """The tuning table's key of an ffn width (the same for the forward and the backward)."""
    return f"ffn={n_ffn}"


def _config(n_ffn: int, device: torch.device, backward: bool) -> Config:
    """The card's tuned settings for this pass and width, else the heuristic. Elementwise: the
    settings never change the result, only the speed."""
    op = "swiglu_bwd" if backward else "swiglu_fwd"
    return tuning.tuned_config(op, tune_key(n_ffn), device, _heuristic(n_ffn))


def candidates(n_ffn: int) -> list[Config]:
    """Settings a sweep on a card should time, likeliest first (a sweep cut short by its budget
    keeps what it timed): the heuristic, the flat layout at 8 elements (one 16-byte bf16 vector)
    per thread per tensor, torch.compile's usual shape of this kernel, the heuristic on the 1-D
    row-major grid, then every block and warps on the (rows, column blocks) grid and on the 1-D
    grid. The flat layout compiles once per ffn width, so it gets those few settings only."""
    heuristic = _heuristic(n_ffn)
    out = [heuristic] + [Config(b, b // 256, flat=True) for b in (1024, 2048, 512)]
    out.append(heuristic._replace(linear=True))
    grid = []
    for block in (512, 1024, 2048, 4096):
        for warps in (2, 4, 8, 16):
            # 4..16 elements per thread per tensor: 8- to 32-byte bf16 vectors
            if block <= 2 * triton.next_power_of_2(n_ffn) and 4 <= block // (32 * warps) <= 16:
                grid.append(Config(block, warps))
    out += grid + [c._replace(linear=True) for c in grid]
    return list(dict.fromkeys(out))


def _launch(
    n_rows: int, n_ffn: int, cfg: Config, tensors: tuple[torch.Tensor, ...]
) -> tuple[tuple[int, ...], dict]:
    """(grid, constexprs) of a launch. The grid order only changes which programs run together,
    never the result, so where a setting cannot apply the 2-D grid is used instead: the flat
    layout needs every element offset in int32, the 1-D grid at most 2^31 - 1 programs."""
    if cfg.flat:
        # the largest offset any tensor sees, and the flat index of the last block's end
        last = max((n_rows - 1) * t.stride(0) + (t.shape[1] - 1) * t.stride(1) for t in tensors)
        if max(last, n_rows * n_ffn + cfg.block) < 2**31:
            grid = (triton.cdiv(n_rows * n_ffn, cfg.block),)
            return grid, {"BLOCK": cfg.block, "LINEAR": False, "FLAT_FFN": n_ffn}
    blocks = triton.cdiv(n_ffn, cfg.block)
    if cfg.linear and n_rows * blocks < 2**31:
        return (n_rows * blocks,), {"BLOCK": cfg.block, "LINEAR": True, "FLAT_FFN": 0}
    # rows up to 2^31 - 1 on axis 0; column blocks up to 65535 on axis 1
    return (n_rows, blocks), {"BLOCK": cfg.block, "LINEAR": False, "FLAT_FFN": 0}


def _split_width(gate_up: torch.Tensor) -> int:
    width = gate_up.shape[-1]
    if width % 2:
        raise ValueError(
            f"swiglu: the last dim of gate_up must be 2*ffn laid out [gate | up], got odd width {width}"
        )
    return width // 2


@on_tensor_device
def _swiglu_fwd(
    gate_up: torch.Tensor, out: torch.Tensor | None = None, cfg: Config | None = None
) -> torch.Tensor:
    """gate_up: (rows, 2*ffn) -> out: (rows, ffn) in gate_up's dtype. `out` may be given; `cfg`
    overrides the launch settings (the tuning sweep times each candidate)."""
    n_ffn = _split_width(gate_up)
    n_rows = gate_up.shape[0]
    if out is None:
        out = torch.empty(n_rows, n_ffn, dtype=gate_up.dtype, device=gate_up.device)
    if n_rows == 0 or n_ffn == 0:
        return out
    if wide_offsets(gate_up):  # column offsets past int32 (see wide_offsets): a dense copy
        gate_up = gate_up.contiguous()
    if wide_offsets(out):
        return out.copy_(_swiglu_fwd(gate_up, None, cfg))
    cfg = cfg or _config(n_ffn, gate_up.device, backward=False)
    grid, meta = _launch(n_rows, n_ffn, cfg, (gate_up, out))
    _swiglu_fwd_kernel[grid](
        gate_up,
        out,
        gate_up.stride(0),
        gate_up.stride(1),
        out.stride(0),
        out.stride(1),
        n_ffn,
        n_rows,
        **meta,
        num_warps=cfg.warps,
    )
    return out


@on_tensor_device
def _swiglu_bwd(
    dout: torch.Tensor,
    gate_up: torch.Tensor,
    dgate_up: torch.Tensor | None = None,
    cfg: Config | None = None,
) -> torch.Tensor:
    """dout: (rows, ffn), gate_up: (rows, 2*ffn) -> d(gate_up): (rows, 2*ffn). `dgate_up` may be
    given; `cfg` overrides the launch settings."""
    n_ffn = _split_width(gate_up)
    n_rows = gate_up.shape[0]
    if dgate_up is None:
        dgate_up = torch.empty(n_rows, 2 * n_ffn, dtype=gate_up.dtype, device=gate_up.device)
    if n_rows == 0 or n_ffn == 0:
        return dgate_up
    # column offsets past int32 (see wide_offsets): dense copies of the inputs, a dense output
    dout = dout.contiguous() if wide_offsets(dout) else dout
    gate_up = gate_up.contiguous() if wide_offsets(gate_up) else gate_up
    if wide_offsets(dgate_up):
        return dgate_up.copy_(_swiglu_bwd(dout, gate_up, None, cfg))
    cfg = cfg or _config(n_ffn, gate_up.device, backward=True)
    grid, meta = _launch(n_rows, n_ffn, cfg, (dout, gate_up, dgate_up))
    _swiglu_bwd_kernel[grid](
        dout,
        gate_up,
        dgate_up,
        dout.stride(0),
        dout.stride(1),
        gate_up.stride(0),
        gate_up.stride(1),
        dgate_up.stride(0),
        dgate_up.stride(1),
        n_ffn,
        n_rows,
        **meta,
        num_warps=cfg.warps,
    )
    return dgate_up


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        gu = gate_up.reshape(-1, gate_up.shape[-1])  # (rows, 2*ffn), a view when strides allow
        out = _swiglu_fwd(gu)
        ctx.save_for_backward(gu)
        ctx.shape = gate_up.shape
        return out.view(*gate_up.shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable  # else create_graph would take these gradients as constants, silently
    def backward(ctx, dout: torch.Tensor) -> torch.Tensor:
        (gu,) = ctx.saved_tensors
        dgu = _swiglu_bwd(dout.reshape(-1, dout.shape[-1]), gu)
        return dgu.view(ctx.shape)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: (..., 2*ffn) laid out [gate | up] -> silu(gate) * up: (..., ffn)."""
    if use_triton(gate_up):
        return _SwiGLU.apply(gate_up)
    _split_width(gate_up)  # the reference's chunk would split an odd width unevenly
    return reference.swiglu(gate_up)
