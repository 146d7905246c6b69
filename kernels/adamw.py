"""Fused AdamW over flat buffers, plus the device-side gradient checks the optimizer step needs.

One launch per flat buffer updates the fp32 master weights and both moments in place, reads fp32
or bf16/fp16 gradients, folds in a gradient scale (the clipping coefficient, a float or a device
scalar) and writes the low-precision model copy in the same pass. A (1,) fp32 `found_inf` flag on
the device skips the whole update without a host sync.

Bytes per element of one step (the floor the benchmark compares against): read params, exp_avg,
exp_avg_sq (4 + 4 + 4) and grads (4 or 2); write params, exp_avg, exp_avg_sq (4 + 4 + 4) and the
model copy (2, optional). fp32 grads without a copy: 28 B; bf16 grads with a bf16 copy: 28 B too.

Numerics follow torch.optim.AdamW (single-tensor path) operation for operation, in fp32:
    p <- p * (1 - lr * wd)
    m <- m + (1 - beta1) * (g - m)                 (torch's lerp for weight < 0.5)
    v <- v * beta2 + (1 - beta2) * g * g
    p <- p + (-lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
with bc1 = 1 - beta1**step, bc2 = 1 - beta2**step computed on the host in float64. The
denominator takes sqrt(v) first, so eps = 1e-12 is added to a value of the same scale as the
gradient, never to v itself (1e-24 would be lost against any normal v). Square root and
division are the IEEE round-to-nearest ones (`sqrt_rn`, `div_rn`), as in torch's CUDA kernel,
not the approximate defaults.

Skipped steps: the trainer does not advance `step` after a step skipped through `found_inf`, so
the next real step passes the same `step` again (torch.optim never counts a step it did not take).
"""

import math

import torch

from kernels import reference
from kernels._triton import HAS_TRITON, on_tensor_device, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _adamw_kernel(
        p_ptr,  # fp32 (n,) master weights, updated in place
        g_ptr,  # fp32/bf16/fp16 (n,) gradients, read only
        m_ptr,  # fp32 (n,) exp_avg, updated in place
        v_ptr,  # fp32 (n,) exp_avg_sq, updated in place
        out_ptr,  # bf16/fp16 (n,) model copy of the new weights (used when HAS_OUT)
        scale_ptr,  # (1,) device grad scale (used when SCALE_IS_PTR)
        inf_ptr,  # (1,) fp32 found-non-finite flag (used when HAS_INF); non-zero skips all
        n,  # number of elements
        grad_scale,  # host grad scale (used when not SCALE_IS_PTR)
        decay,  # 1 - lr * weight_decay
        one_minus_beta1,  # 1 - beta1
        beta2,  # beta2
        one_minus_beta2,  # 1 - beta2
        neg_step_size,  # -lr / (1 - beta1**step)
        bc2_sqrt,  # sqrt(1 - beta2**step)
        eps,  # added to sqrt(v) / sqrt(bc2)
        BLOCK: tl.constexpr,  # elements per program
        SCALE_IS_PTR: tl.constexpr,
        HAS_INF: tl.constexpr,
        HAS_OUT: tl.constexpr,
    ):
        if HAS_INF:
            # A skipped step costs one 4-byte read per program. (Folding the flag into the mask
            # would hide n's divisibility from the compiler and narrow every access.)
            if tl.load(inf_ptr).to(tl.float32) != 0.0:
                return
        # int64: flat optimizer buffers of large models pass 2^31 elements.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if SCALE_IS_PTR:
            g = g * tl.load(scale_ptr).to(tl.float32)
        else:
            g = g * grad_scale
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)

        p = p * decay
        # torch's lerp, m + w * (g - m), is one fma on both its CPU and CUDA paths.
        m = tl.fma(one_minus_beta1, g - m, m)
        v = v * beta2 + one_minus_beta2 * g * g
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p + tl.div_rn(neg_step_size * m, denom)

        tl.store(p_ptr + offs, p, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        if HAS_OUT:
            tl.store(
                out_ptr + offs,
                p.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
                mask=mask,
            )

    @triton.jit
    def _found_nonfinite_kernel(
        g_ptr,  # (n,) gradients, any float dtype
        inf_ptr,  # (1,) fp32 flag, set to 1 when a non-finite element is seen (never cleared)
        n,  # number of elements
        BLOCK: tl.constexpr,  # elements per program
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        # NaN compares false, so |x| < inf is exactly "finite". Every writer stores the same 1.0,
        # so the concurrent stores race harmlessly. (tl.where rather than `~` on the comparison:
        # Triton 3.0's interpreter cannot invert a boolean tensor.)
        bad = tl.max(tl.where(tl.abs(x) < float("inf"), 0, 1), axis=0)
        tl.store(inf_ptr, 1.0, mask=bad > 0)

    @triton.jit
    def _sq_norm_partial_kernel(
        g_ptr,  # (n,) gradients, any float dtype
        part_sq_ptr,  # (programs,) fp32 partial sums of squares
        part_bad_ptr,  # (programs,) int32 partial "non-finite seen" flags
        n,  # number of elements
        BLOCK: tl.constexpr,  # elements per tile
        TILES: tl.constexpr,  # tiles per program
    ):
        pid = tl.program_id(0).to(tl.int64)
        base = pid * (BLOCK * TILES)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        bad = tl.zeros([BLOCK], dtype=tl.int32)
        for t in range(TILES):
            offs = base + t * BLOCK + tl.arange(0, BLOCK)
            x = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
            acc += x * x
            bad = tl.maximum(bad, tl.where(tl.abs(x) < float("inf"), 0, 1))  # 1: not finite
        tl.store(part_sq_ptr + pid, tl.sum(acc, axis=0))
        tl.store(part_bad_ptr + pid, tl.max(bad, axis=0))

    @triton.jit
    def _sq_norm_final_kernel(
        part_sq_ptr,  # (parts,) fp32 partial sums of squares
        part_bad_ptr,  # (parts,) int32 partial flags
        sq_ptr,  # (1,) fp32 out: sum of squares
        inf_ptr,  # (1,) fp32 out: 1.0 if any element was non-finite else 0.0
        parts,  # number of partials
        BLOCK: tl.constexpr,  # partials per iteration
    ):
        # One program in a fixed order: the result does not depend on scheduling (no atomics).
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        bad = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(0, parts, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < parts
            acc += tl.load(part_sq_ptr + offs, mask=mask, other=0.0).to(tl.float64)
            bad = tl.maximum(bad, tl.load(part_bad_ptr + offs, mask=mask, other=0))
        tl.store(sq_ptr, tl.sum(acc, axis=0).to(tl.float32))
        tl.store(inf_ptr, tl.max(bad, axis=0).to(tl.float32))


_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def adamw_bytes(n: int, grad_bytes: int = 2, out_bytes: int = 2) -> int:
    """Bytes one step must move (the GB/s denominator) over n elements:
    read params, exp_avg, exp_avg_sq (3 * 4) and grads (grad_bytes); write params, exp_avg,
    exp_avg_sq (3 * 4) and the model copy (out_bytes, 0 without one)   = n * (24 + g + o)."""
    return n * (24 + grad_bytes + out_bytes)


def _launch_config(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of the AdamW and non-finite kernels: 8 fp32 per thread, two 16-byte
    accesses per stream; deterministic, never autotuned (the update is in place).

    Accesses are 16 bytes wide only when n is a multiple of 16 (Triton then knows the tail mask
    is constant over each vector): the trainer's buffers, sums of Llama parameter sizes, are."""
    return 2048, 8


def _sq_norm_config(n: int) -> tuple[int, int, int]:
    """(BLOCK, TILES, num_warps) of the sum-of-squares partial kernel: 32K elements per program
    keeps the partials few (15K at 500M elements) for the one-program second stage."""
    return 4096, 8, 8


def _check_flat(name: str, t: torch.Tensor, n: int, dtypes: tuple, device: torch.device) -> None:
    if t.dim() != 1 or t.numel() != n or not t.is_contiguous():
        raise ValueError(
            f"fused_adamw: {name} must be a contiguous flat ({n},) buffer like params, "
            f"got shape {tuple(t.shape)} with strides {t.stride()}; pass the optimizer's flat buffer"
        )
    if t.dtype not in dtypes:
        raise ValueError(
            f"fused_adamw: {name} has dtype {t.dtype}, expected one of {[str(d) for d in dtypes]}"
        )
    if t.device != device:
        raise ValueError(
            f"fused_adamw: {name} is on {t.device}, params on {device}; keep them together"
        )


def _flag_ptr(name: str, t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if t.numel() != 1 or not t.is_floating_point() or t.device != device:
        raise ValueError(
            f"fused_adamw: {name} must be a 1-element float tensor on {device}, "
            f"got shape {tuple(t.shape)}, {t.dtype} on {t.device}"
        )
    return t


@on_tensor_device
def _adamw_triton(
    params,
    grads,
    exp_avg,
    exp_avg_sq,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    step,
    grad_scale,
    found_inf,
    model_out,
    block=None,
    num_warps=None,
) -> None:
    n = params.numel()
    dev = params.device
    _check_flat("params", params, n, (torch.float32,), dev)
    _check_flat("grads", grads, n, _FLOAT_DTYPES, dev)
    _check_flat("exp_avg", exp_avg, n, (torch.float32,), dev)
    _check_flat("exp_avg_sq", exp_avg_sq, n, (torch.float32,), dev)
    if model_out is not None:
        _check_flat("model_out", model_out, n, (torch.bfloat16, torch.float16), dev)
    if step < 1:
        raise ValueError(f"fused_adamw: step counts from 1 (bias correction), got {step}")
    if n == 0:
        return

    scale_is_ptr = isinstance(grad_scale, torch.Tensor)
    if scale_is_ptr and grad_scale.device.type == "cpu" and dev.type != "cpu":
        # A host tensor is a host number: read it without touching the device stream.
        grad_scale, scale_is_ptr = float(grad_scale.item()), False
    scale_t = _flag_ptr("grad_scale", grad_scale, dev) if scale_is_ptr else params
    inf_t = _flag_ptr("found_inf", found_inf, dev) if found_inf is not None else params

    # Host constants in float64, rounded once to fp32 at the launch, as torch's scalar ops do.
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    cfg_block, cfg_warps = _launch_config(n)
    block, num_warps = block or cfg_block, num_warps or cfg_warps
    out = model_out if model_out is not None else params
    consts = (
        1.0 if scale_is_ptr else float(grad_scale),
        1.0 - lr * weight_decay,
        1.0 - beta1,
        beta2,
        1.0 - beta2,
        -lr / bc1,
        math.sqrt(bc2),
        eps,
    )
    # The bulk (a multiple of 16 elements) and the few left over in a second launch: with n a
    # multiple of 16 the compiler keeps every access 16 bytes wide; with any other n it would
    # narrow all of them to one element. Buffers of Llama parameters need only the first.
    bulk = n - n % 16
    for lo, hi in ((0, bulk), (bulk, n)):
        if hi == lo:
            continue
        _adamw_kernel[(triton.cdiv(hi - lo, block),)](
            params[lo:hi],
            grads[lo:hi],
            exp_avg[lo:hi],
            exp_avg_sq[lo:hi],
            out[lo:hi],
            scale_t,
            inf_t,
            hi - lo,
            *consts,
            BLOCK=block,
            SCALE_IS_PTR=scale_is_ptr,
            HAS_INF=found_inf is not None,
            HAS_OUT=model_out is not None,
            num_warps=num_warps,
        )


def fused_adamw(
    params: torch.Tensor,
    grads: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: float | torch.Tensor = 1.0,
    found_inf: torch.Tensor | None = None,
    model_out: torch.Tensor | None = None,
) -> None:
    """One AdamW step in place over flat (n,) buffers, in one launch (two when n is not a
    multiple of 16: the last n % 16 elements go separately, see _adamw_triton).

    params, exp_avg, exp_avg_sq: (n,) fp32, updated in place. grads: (n,) fp32/bf16/fp16, read
    and multiplied by grad_scale (a float, or a 1-element device tensor such as the clipping
    coefficient). found_inf: (1,) fp32 device flag; non-zero skips the update of every element
    (params, moments and model_out stay as they were). model_out: (n,) bf16/fp16, receives the
    new params. step: 1-based count of steps taken (not advanced by skipped steps).
    """
    kwargs = dict(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        step=step,
        grad_scale=grad_scale,
        found_inf=found_inf,
        model_out=model_out,
    )
    if use_triton(params):
        _adamw_triton(params, grads, exp_avg, exp_avg_sq, **kwargs)
    else:
        reference.adamw(params, grads, exp_avg, exp_avg_sq, **kwargs)


@on_tensor_device
def found_nonfinite(grads: torch.Tensor, found_inf: torch.Tensor) -> torch.Tensor:
    """Set found_inf (1,) fp32 to 1.0 if any element of grads (n,) is inf or NaN; never clears
    it, so one flag can collect several buffers. Device-side: no host sync. Returns found_inf."""
    if not use_triton(grads):
        return reference.found_nonfinite(grads, found_inf)
    n = grads.numel()
    _check_flat("grads", grads, n, _FLOAT_DTYPES, grads.device)
    _flag_ptr("found_inf", found_inf, grads.device)
    if n:
        block, num_warps = _launch_config(n)
        _found_nonfinite_kernel[(triton.cdiv(n, block),)](
            grads, found_inf, n, BLOCK=block, num_warps=num_warps
        )
    return found_inf


@on_tensor_device
def grad_sq_norm_and_nonfinite(grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of squares of grads (n,) and a non-finite flag, in one read of the buffer.

    Returns (sq_norm (1,) fp32, found_inf (1,) fp32 = 1.0 if any element is inf/NaN else 0.0),
    both on grads' device, no host sync. Two stages with a fixed partition and a one-program
    second stage (fp64 accumulation of the fp32 partials): the same input gives the same bits on
    every run. A finite buffer whose squares overflow fp32 gives sq_norm = inf with found_inf = 0.
    """
    if not use_triton(grads):
        return reference.grad_sq_norm_and_nonfinite(grads)
    n = grads.numel()
    _check_flat("grads", grads, n, _FLOAT_DTYPES, grads.device)
    sq = torch.zeros(1, dtype=torch.float32, device=grads.device)
    found = torch.zeros(1, dtype=torch.float32, device=grads.device)
    if n == 0:
        return sq, found
    block, tiles, num_warps = _sq_norm_config(n)
    parts = triton.cdiv(n, block * tiles)
    part_sq = torch.empty(parts, dtype=torch.float32, device=grads.device)
    part_bad = torch.empty(parts, dtype=torch.int32, device=grads.device)
    _sq_norm_partial_kernel[(parts,)](
        grads, part_sq, part_bad, n, BLOCK=block, TILES=tiles, num_warps=num_warps
    )
    _sq_norm_final_kernel[(1,)](part_sq, part_bad, sq, found, parts, BLOCK=1024, num_warps=4)
    return sq, found
