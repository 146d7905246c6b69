"""Audit of the optimizer step outside the trainer: the gradient norm that sets the clip factor,
and the offloaded update's chunk pipeline at chunk sizes the trainer-level tests do not reach."""

import pytest
import torch
import torch.nn as nn

from parallel.data_parallel import GradBuffer
from parallel.grad_norm import global_grad_norm, sharded_grad_norm, sharded_norm_segments
from train.config import OptimizerConfig
from train.optimizer import FlatAdamW, ShardedAdamW, param_order

SHAPES = {"a.w": (7, 13), "n1": (13,), "b.w": (5, 3), "n2": (11,), "c.w": (17, 4)}  # 198 values


def _named(seed: int = 0) -> list[tuple[str, nn.Parameter]]:
    g = torch.Generator().manual_seed(seed)
    return param_order([(n, nn.Parameter(torch.randn(s, generator=g))) for n, s in SHAPES.items()])


def test_replicated_grad_norm_is_accurate_for_a_large_cpu_gradient():
    """On CPU a norm sums its squares sequentially in fp32: a 4M-element gradient came out
    9e-5 relative off (16M: 7e-4), and the clip factor with it, where the distributed
    optimizer's chunked norm of the same gradients is exact to fp32 rounding."""
    n = 1 << 22
    p = nn.Parameter(torch.empty(n))
    buf = GradBuffer([p], shard_over_dp=True)
    p.main_grad.copy_(torch.randn(n, generator=torch.Generator().manual_seed(0)) * 1e-3)
    want = p.main_grad.double().norm().item()
    assert global_grad_norm([p]) == pytest.approx(want, rel=1e-6)
    assert sharded_grad_norm(sharded_norm_segments(buf)) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("chunk", [1, 3, 64, 198, 1 << 22])  # all but one, odd, larger than all
def test_offloaded_update_follows_flat_adamw_at_any_chunk(monkeypatch, chunk):
    """DP 1, --optimizer_cpu_offload: the host update in `chunk`-sized pieces (the last one
    short, or a single piece smaller than the chunk) against FlatAdamW, step by step with the
    lr changing, clip factors folded in, eps 1e-12 and gradients down to 1e-20; the saved
    state too."""
    monkeypatch.setattr(ShardedAdamW, "OFFLOAD_CHUNK", chunk)
    kw = dict(beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.5, clip_grad=1.0)
    flat = FlatAdamW(_named(), OptimizerConfig(**kw))
    flat_buf = GradBuffer(flat.params_in_order())
    named = _named()
    off_buf = GradBuffer([p for _, p in named], shard_over_dp=True)
    off = ShardedAdamW(named, OptimizerConfig(**kw, distributed=True, cpu_offload=True), off_buf)
    assert len(off._grad_host[0]) == min(chunk, 198)
    gen = torch.Generator().manual_seed(1)
    for step, scale in enumerate((1.0, 1e-3, 1e-20, 10.0)):
        grads = {n: torch.randn(s, generator=gen) * scale for n, s in SHAPES.items()}
        for opt, buf in ((flat, flat_buf), (off, off_buf)):
            buf.zero()
            for n, p in opt.named_params():
                p.main_grad.copy_(grads[n])
            opt.step(lr=1e-2 * (step + 1), grad_scale=0.5 if step % 2 else 1.0)
        for (n, p), (_, q) in zip(flat.named_params(), off.named_params()):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=f"{step} {n}")
    assert flat.step_count == off.step_count == 4
    a, b = flat.state_tensors(), off.state_tensors()
    for kind in a:
        for n, t in a[kind].items():
            atol = 1e-7 if kind == "master" else 1e-12  # masters: the weights' tolerance
            torch.testing.assert_close(b[kind][n], t, rtol=1e-5, atol=atol, msg=f"{kind} {n}")
