"""Plain-PyTorch reference of every kernel family.

Tests, benchmarks and the CPU training path all use these. `upcast=True` computes in fp32 and
casts the result back to the input dtype (what the kernels do); `upcast=False` computes in the
input dtype, which is the "low-precision PyTorch" error baseline the kernel tests compare with.
"""

import math

import torch
import torch.nn.functional as F


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, upcast: bool = True):
    """y = x / sqrt(mean(x^2) + eps) * weight.   x: (..., hidden), weight: (hidden,)."""
    dtype = x.dtype
    if upcast:
        x, weight = x.float(), weight.float()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
    return y.to(dtype)


def swiglu(gate_up: torch.Tensor, upcast: bool = True) -> torch.Tensor:
    """silu(gate) * up.   gate_up: (..., 2*ffn) laid out [gate | up] -> (..., ffn)."""
    dtype = gate_up.dtype
    gate, up = gate_up.chunk(2, dim=-1)
    if upcast:
        gate, up = gate.float(), up.float()
    return (F.silu(gate) * up).to(dtype)


def rotary_inv_freq(head_dim: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """fp32 rotary frequencies theta^(-2i/head_dim), i < head_dim/2: (head_dim/2,).

    The Triton kernel takes this same vector, so kernel and reference angles agree bit for bit."""
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    return 1.0 / (theta**exponents)


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float = 10000.0, scaling_factor: float = 1.0
):
    """fp32 cos/sin for integer positions.   positions: (tokens,) -> cos, sin: (tokens, head_dim/2).

    `scaling_factor` is linear position interpolation: positions are divided by it.
    """
    inv_freq = rotary_inv_freq(head_dim, theta, positions.device)
    angles = (positions.to(torch.float32) / scaling_factor)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def rotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, upcast: bool = True
) -> torch.Tensor:
    """x: (tokens, heads, head_dim) rotated by fp32 cos, sin: (tokens, head_dim/2)."""
    # Half-split ("rotate_half", GPT-NeoX / Hugging Face) layout: pairs are (i, i + head_dim/2).
    dtype = x.dtype
    if upcast:
        x = x.float()
    else:
        cos, sin = cos.to(dtype), sin.to(dtype)
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(dtype)


def rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    theta: float = 10000.0,
    scaling_factor: float = 1.0,
    upcast: bool = True,
):
    """Rotary embedding of q and k.   q: (tokens, heads, head_dim), k: (tokens, kv_heads, head_dim),
    positions: (tokens,) integer positions (restarting at 0 for each packed document)."""
    cos, sin = rotary_cos_sin(positions, q.shape[-1], theta, scaling_factor)
    return rotate(q, cos, sin, upcast), rotate(k, cos, sin, upcast)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    softmax_scale: float | None = None,
    upcast: bool = True,
    return_lse: bool = False,
):
    """Causal attention inside each packed document, GQA by head groups.

    q: (tokens, heads, head_dim); k, v: (tokens, kv_heads, head_dim); cu_seqlens: (docs + 1,)
    int32 document boundaries. Returns out: (tokens, heads, head_dim) and, with `return_lse`,
    lse: (heads, tokens) fp32, the natural-log log-sum-exp of the scaled scores per query.
    """
    tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    rep = heads // kv_heads
    outs, lses = [], []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qd = q[start:end].transpose(0, 1)  # (heads, n, head_dim)
        kd = k[start:end].transpose(0, 1).repeat_interleave(rep, dim=0)  # (heads, n, head_dim)
        vd = v[start:end].transpose(0, 1).repeat_interleave(rep, dim=0)
        if not return_lse:
            od = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale)
        else:
            scores = (qd @ kd.transpose(-1, -2)) * scale  # (heads, n, n)
            n = end - start
            causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
            lses.append(torch.logsumexp(scores.float(), dim=-1))
            od = scores.softmax(dim=-1) @ vd
        outs.append(od.transpose(0, 1))
    if not outs:  # zero tokens: empty results, still attached to q's graph
        outs.append(q[:0])
        lses.append(torch.zeros(heads, 0, device=q.device))
    out = torch.cat(outs, dim=0).to(dtype)
    if return_lse:
        return out, torch.cat(lses, dim=1)
    return out


def found_nonfinite(grads: torch.Tensor, found_inf: torch.Tensor) -> torch.Tensor:
    """Set found_inf (1,) fp32 to 1 if any element of grads is inf/NaN (never clears it)."""
    found_inf.copy_(torch.maximum(found_inf, (~torch.isfinite(grads)).any().float().reshape(1)))
    return found_inf


def grad_sq_norm_and_nonfinite(grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of squares of grads (n,) and a non-finite flag: ((1,) fp32, (1,) fp32 in {0, 1})."""
    g = grads.float()
    sq = g.square().sum(dtype=torch.float32).reshape(1)
    found = (~torch.isfinite(g)).any().float().reshape(1)
    return sq, found


@torch.no_grad()
def adamw(
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
    """torch.optim.AdamW's update (decoupled weight decay, bias correction) on flat (n,) buffers.

    params/exp_avg/exp_avg_sq: fp32, updated in place; grads: fp32 or bf16, multiplied by
    grad_scale first (the clipping coefficient); found_inf: (1,) flag, non-zero skips the whole
    update; model_out: low-precision copy of the new params, written in the same pass.
    """
    if found_inf is not None and bool(found_inf.item()):
        return
    if isinstance(grad_scale, torch.Tensor):
        # a number in fp32, as the kernel reads it: an fp64 (1,) tensor would promote g to fp64
        grad_scale = grad_scale.float()
    g = grads.float() * grad_scale
    params.mul_(1.0 - lr * weight_decay)
    exp_avg.lerp_(g, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    # torch's order: sqrt(v) / sqrt(bc2) + eps, so eps meets a gradient-scale value, not v.
    denom = exp_avg_sq.sqrt().div_(math.sqrt(bc2)).add_(eps)
    params.addcdiv_(exp_avg, denom, value=-lr / bc1)
    if model_out is not None:
        model_out.copy_(params)


def ce_stats(
    logits: torch.Tensor, labels: torch.Tensor, start: int, valid: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax statistics of a vocabulary shard, fp32 (kernels/cross_entropy.py).

    logits: (tokens, local), of which columns [0, valid) are real; labels: (tokens,) global ids.
    Returns (max, sum of exp(z - max), the label's logit or 0 when it is not in this shard's
    [start, start + valid)), each (tokens,); a shard with no real column gives (-inf, 0, 0)."""
    tokens = logits.shape[0]
    if valid == 0:
        m = torch.full((tokens,), float("-inf"), device=logits.device)
        return m, torch.zeros_like(m), torch.zeros_like(m)
    z = logits[:, :valid].float()
    m = z.max(dim=-1).values
    s = torch.exp(z - m[:, None]).sum(dim=-1)
    local = labels - start
    mine = (local >= 0) & (local < valid)
    picked = z.gather(1, local.clamp(0, valid - 1)[:, None]).squeeze(1)
    return m, s, torch.where(mine, picked, 0.0)


def ce_grad(
    logits: torch.Tensor,
    labels: torch.Tensor,
    start: int,
    valid: int,
    m: torch.Tensor,
    s: torch.Tensor,
    dloss: torch.Tensor,
) -> torch.Tensor:
    """(softmax - one-hot) * dloss over the real columns, 0 on padding, in the logits' dtype.
    m, s: the global max and sum of exp (tokens,) fp32; dloss: (tokens,)."""
    grad = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    if valid:
        g = torch.exp(logits[:, :valid].float() - m[:, None]) / s[:, None]
        local = labels - start
        mine = ((local >= 0) & (local < valid)).to(g.dtype)
        g.scatter_add_(1, local.clamp(0, valid - 1)[:, None], -mine[:, None])
        grad[:, :valid] = g * dloss.float()[:, None]
    return grad.to(logits.dtype)
