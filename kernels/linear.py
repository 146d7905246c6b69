"""Linear layers whose weight gradient goes straight into an fp32 accumulation buffer
(Megatron's gradient-accumulation fusion). cuBLAS does the work; there is no Triton kernel here.

Unfused, every micro-batch's backward writes each weight gradient in the activation dtype (bf16:
2 bytes a parameter, rounded), and a second pass adds it to the fp32 buffer (10 bytes more: read
both, write fp32). Fused, the weight-gradient GEMM accumulates into the fp32 buffer in its
epilogue (beta = 1): no bf16 gradient exists, the product is never rounded to bf16, and the extra
traffic is the epilogue's fp32 read and write, under a GEMM that is compute-bound.

A weight takes the fused path when it carries `accumulate_weight_grad`, a callable the gradient
buffer (`parallel.data_parallel.GradBuffer(..., fuse_weight_grads=True)`) attaches: the backward
hands it (dy, x), and the buffer adds dyᵀ x into the weight's `main_grad` and does its bookkeeping
(bucket counting, all-reduce launch). Such a weight's `.grad` stays None. Without the attribute
(inference, tests of plain modules, an unfused buffer) `linear` is `F.linear`.
"""

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F


@functools.cache
def fp32_out_addmm(device: torch.device) -> bool:
    """Whether torch can add a bf16 product into an fp32 tensor in one call on `device`
    (`torch.addmm(c, a, b, out_dtype=torch.float32, out=c)`; CUDA, recent torch versions only).
    Checked once per device against the two-step result; False on any error."""
    if device.type != "cuda":
        return False
    try:
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(64, 48, device=device, generator=g).to(torch.bfloat16)
        b = torch.randn(48, 32, device=device, generator=g).to(torch.bfloat16)
        c = torch.randn(64, 32, device=device, generator=g)
        want = c + a.float() @ b.float()
        torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
        return bool(torch.allclose(c, want, rtol=1e-3, atol=1e-3))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def accumulate_weight_grad(main_grad: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> None:
    """main_grad += dyᵀ x over every token, in main_grad's precision.

    main_grad: (out, in), fp32 (or the activations' dtype); dy: (..., out); x: (..., in)."""
    dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
    if main_grad.dtype == dy2.dtype:
        main_grad.addmm_(dy2.t(), x2)
    elif main_grad.dtype == torch.float32 and fp32_out_addmm(main_grad.device):
        torch.addmm(main_grad, dy2.t(), x2, out_dtype=torch.float32, out=main_grad)
    else:  # the unfused two steps, for a torch without out_dtype
        main_grad.add_(dy2.t().matmul(x2))


def weight_grad(
    weight: torch.Tensor, dy: torch.Tensor, x: torch.Tensor, fuse: bool = True
) -> torch.Tensor | None:
    """A linear layer's backward for its weight: dyᵀ x (out, in) over all tokens. With `fuse`
    and an accumulator on the weight it goes there (None is returned); otherwise it is returned
    for autograd (also when the accumulator was removed between the forward and this backward).
    `fuse` is decided at the forward (`fused`): the backward runs with grad mode off."""
    sink = getattr(weight, "accumulate_weight_grad", None) if fuse else None
    if sink is not None:
        sink(dy, x)
        return None
    return dy.reshape(-1, dy.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]))


class _Linear(torch.autograd.Function):
    """y = x Wᵀ; the backward hands (dy, x) to the weight's accumulator instead of returning dW."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x)
        ctx.weight = weight  # the Parameter itself: its accumulator is an attribute of it
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        weight = ctx.weight
        grad_x = dy.matmul(weight) if ctx.needs_input_grad[0] else None
        return grad_x, weight_grad(weight, dy, x) if ctx.needs_input_grad[1] else None


def fused(weight: torch.Tensor) -> bool:
    """True when a backward through `weight` should accumulate into its buffer directly."""
    return (
        getattr(weight, "accumulate_weight_grad", None) is not None
        and weight.requires_grad
        and torch.is_grad_enabled()
    )


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: (..., in), weight: (out, in) -> (..., out), no bias; fused weight gradient when the
    weight carries an accumulator (see the module docstring)."""
    return _Linear.apply(x, weight) if fused(weight) else F.linear(x, weight)


class Linear(nn.Linear):
    """`nn.Linear` without bias whose forward is `linear` (same parameters, same state dict)."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)
