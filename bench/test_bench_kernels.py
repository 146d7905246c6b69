"""pytest-benchmark timings of the public kernel functions at small shapes (`make bench`).

On a CPU machine the public functions run the plain-PyTorch reference path (the kernels run only
under CUDA or the interpreter), so these numbers time the CPU path the tiny trainer uses; on a
CUDA machine they time the Triton kernels, synchronising after each call. GB/s at the op's
minimum byte count goes into each benchmark's extra_info. The GPU measurements at training
shapes are `python3 -m bench.gpu_check`.
"""

import pytest
import torch

from bench.bench_kernels import DTYPE, EPS, THETA
from kernels.adamw import adamw_bytes, fused_adamw, grad_sq_norm_and_nonfinite

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _run(benchmark, fn, nbytes: int | None):
    def call():
        out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark(call)
    median = getattr(getattr(benchmark, "stats", None), "stats", None)
    if nbytes and median is not None and median.median > 0:
        benchmark.extra_info["gbps"] = nbytes / median.median / 1e9
    benchmark.extra_info["device"] = DEVICE


def _randn(*shape, dtype=DTYPE):
    return torch.randn(*shape, device=DEVICE, dtype=torch.float32).to(dtype)


@pytest.mark.parametrize("tokens,hidden", [(256, 4096)])
def test_rmsnorm_fwd(benchmark, tokens, hidden):
    from kernels.rmsnorm import rmsnorm, rmsnorm_bytes

    x, w = _randn(tokens, hidden), _randn(hidden)
    _run(benchmark, lambda: rmsnorm(x, w, EPS), rmsnorm_bytes(tokens, hidden, 2, False))


@pytest.mark.parametrize("tokens,ffn", [(256, 11008)])
def test_swiglu_fwd(benchmark, tokens, ffn):
    from kernels.swiglu import swiglu, swiglu_bytes

    gate_up = _randn(tokens, 2 * ffn)
    _run(benchmark, lambda: swiglu(gate_up), swiglu_bytes(tokens, ffn, 2, False))


@pytest.mark.parametrize("tokens,heads,kv_heads", [(256, 32, 8)])
def test_rotary_fwd(benchmark, tokens, heads, kv_heads):
    from kernels.rotary import rotary, rotary_bytes

    q, k = _randn(tokens, heads, 128), _randn(tokens, kv_heads, 128)
    pos = torch.arange(tokens, device=DEVICE)
    _run(
        benchmark,
        lambda: rotary(q, k, pos, THETA),
        rotary_bytes(tokens, heads, kv_heads, 128, 2, False),
    )


@pytest.mark.parametrize("tokens,vocab", [(256, 32007)])
def test_cross_entropy_fwd(benchmark, tokens, vocab):
    from kernels.cross_entropy import cross_entropy_bytes
    from parallel.cross_entropy import cross_entropy

    padded = -(-vocab // 128) * 128
    logits = _randn(tokens, padded)
    labels = torch.randint(0, vocab, (tokens,), device=DEVICE)
    _run(
        benchmark,
        lambda: cross_entropy(logits, labels, vocab_size=vocab, labels_checked=True),
        cross_entropy_bytes(tokens, padded, 2, False),
    )


@pytest.mark.parametrize("n", [1 << 20])
def test_adamw_step(benchmark, n):
    p, m = _randn(n, dtype=torch.float32), _randn(n, dtype=torch.float32)
    v, g = m.square(), _randn(n)
    out = torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    hp = dict(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.1, step=1)
    _run(benchmark, lambda: fused_adamw(p, g, m, v, **hp, model_out=out), adamw_bytes(n, 2, 2))


@pytest.mark.parametrize("n", [1 << 20])
def test_grad_sq_norm(benchmark, n):
    g = _randn(n, dtype=torch.float32)
    _run(benchmark, lambda: grad_sq_norm_and_nonfinite(g), 4 * n)
