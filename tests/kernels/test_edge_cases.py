"""Edge cases of the kernel wrappers that the per-family tests do not reach: a platform without
Triton, strided (tokens,) vectors handed to the cross-entropy kernels, and attention over zero
tokens (an empty document list, or documents that are all empty) on both paths."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels.attention as attn
import kernels.rmsnorm
import kernels.rotary
import kernels.swiglu
from kernels import reference
from kernels.attention import attention, attention_padded
from kernels.cross_entropy import ce_grad, ce_stats

ROOT = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter where `import triton` fails, as on macOS or Windows (pyproject.toml
# installs triton on Linux only; kernels/_triton.py promises every op its reference there).
_NO_TRITON = """
import sys
sys.modules["triton"] = None  # any `import triton` now raises ImportError
import torch
import kernels.adamw, kernels.cross_entropy, kernels.linear, kernels.rmsnorm, kernels.rotary
import kernels.swiglu
from kernels._triton import HAS_TRITON
from kernels.attention import attention, attention_padded
assert not HAS_TRITON
q = torch.randn(7, 2, 16)
cu = torch.tensor([0, 3, 7], dtype=torch.int32)
assert attention(q, q[:, :1], q[:, :1], cu, 4).shape == (7, 2, 16)
assert attention_padded(q[None], q[None, :, :1], q[None, :, :1]).shape == (1, 7, 2, 16)
print("ok")
"""


def test_every_kernel_module_imports_without_triton():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-c", _NO_TRITON], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_cross_entropy_reads_strided_token_vectors(device):
    """labels, m and s as strided (tokens,) views (a column of a (tokens, 2) tensor): the kernels
    index them by row, so they must see them densely, not read every other element."""
    g = torch.Generator().manual_seed(0)
    tokens, local = 5, 40
    logits = torch.randn(tokens, local, generator=g).to(device)
    labels = torch.randint(0, local, (tokens, 2), generator=g).to(device)[:, 0]
    assert labels.stride() == (2,)
    m, s, picked = ce_stats(logits, labels, 0, local)
    rm, rs, rp = reference.ce_stats(logits, labels, 0, local)
    torch.testing.assert_close(picked, rp, rtol=0, atol=0)
    torch.testing.assert_close(m, rm, rtol=0, atol=0)
    torch.testing.assert_close(s, rs, rtol=1e-5, atol=0)
    ms = torch.stack([rm, rs], dim=1)  # (tokens, 2): m and s strided
    dloss = torch.rand(tokens, generator=g).to(device) + 0.5
    grad = ce_grad(logits, labels, 0, local, ms[:, 0], ms[:, 1], dloss)
    want = reference.ce_grad(logits, labels, 0, local, rm, rs, dloss)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cu", [[0, 0], [0, 0, 0], [0]], ids=["one-empty", "two-empty", "no-doc"])
@pytest.mark.parametrize("path", ["kernels", "reference"])
def test_attention_zero_tokens(device, monkeypatch, cu, path):
    """Zero tokens: (0, heads, head_dim) out, (heads, 0) lse, empty gradients, on both paths; an
    empty document list (cu_seqlens = [0]) is a valid description of zero tokens."""
    if path == "reference":
        monkeypatch.setattr(attn, "use_triton", lambda x: False)
    q = torch.randn(0, 4, 32, device=device, requires_grad=True)
    kv = torch.randn(0, 2, 32, device=device, requires_grad=True)
    cu_seqlens = torch.tensor(cu, dtype=torch.int32, device=device)
    out, lse = attention(q, kv, kv, cu_seqlens, 0, return_lse=True)
    assert out.shape == (0, 4, 32) and lse.shape == (4, 0)
    out.sum().backward()
    assert q.grad.shape == q.shape
    # nothing of zero tokens depends on k, v: an empty gradient or none (the reference) is right
    assert kv.grad is None or kv.grad.shape == kv.shape


@pytest.mark.parametrize("batch,seq", [(2, 0), (0, 5)])
def test_attention_padded_zero_size(device, batch, seq):
    q = torch.randn(batch, seq, 4, 32, device=device)
    kv = torch.randn(batch, seq, 2, 32, device=device)
    out, lse = attention_padded(q, kv, kv, return_lse=True)
    assert out.shape == (batch, seq, 4, 32) and lse.shape == (batch, 4, seq)


@pytest.mark.parametrize("cu", [[0, 3, 3, 10], [0], [0, 0]], ids=["docs", "no-doc", "empty"])
def test_attention_max_seqlen_defaults_to_longest_document(device, cu):
    """max_seqlen may be left out (as flash-attn users often do not know it): it is read from
    cu_seqlens and the result is the one with the true longest document given."""
    g = torch.Generator().manual_seed(1)
    tokens = cu[-1]
    q = torch.randn(tokens, 4, 32, generator=g).to(device)
    kv = torch.randn(tokens, 2, 32, generator=g).to(device)
    cu_seqlens = torch.tensor(cu, dtype=torch.int32, device=device)
    longest = max([b - a for a, b in zip(cu[:-1], cu[1:])], default=0)
    out = attention(q, kv, kv, cu_seqlens)
    torch.testing.assert_close(out, attention(q, kv, kv, cu_seqlens, longest), rtol=0, atol=0)


def _families(device):
    """(name, inputs, loss of the kernel op) per autograd Function, tiny shapes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, generator=g).to(device)
    qkv = torch.randn(5, 4, 16, generator=g).to(device)
    pos = torch.arange(5, device=device)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
    w = torch.randn(16, generator=g).to(device)
    rotary = kernels.rotary.rotary
    return [
        ("rmsnorm", x, lambda t: kernels.rmsnorm.rmsnorm(t, w).pow(3).sum()),
        ("swiglu", x, lambda t: kernels.swiglu.swiglu(t).pow(3).sum()),
        ("rotary", qkv, lambda t: sum(r.pow(3).sum() for r in rotary(t[:, :2], t[:, 2:], pos))),
        (
            "rotary-inplace",
            qkv,
            lambda t: rotary(t[:, :2] * 1, t[:, 2:] * 1, pos, inplace=True)[0].pow(3).sum(),
        ),  # fmt: skip
        ("attention", qkv, lambda t: attention(t[:, :2], t[:, 2:3], t[:, 3:], cu, 3).pow(3).sum()),
    ]


@pytest.mark.parametrize("family", range(5), ids=lambda i: ["rmsnorm", "swiglu", "rotary",
                         "rotary-inplace", "attention"][i])  # fmt: skip
def test_double_backward_is_refused_not_silently_zero(device, family):
    """The backward kernels are not differentiable. A second derivative (a gradient penalty,
    torch.autograd.gradgradcheck) must fail loudly, not treat the first gradient as a constant
    (which gives a wrong, finite answer)."""
    _, inp, loss_of = _families(device)[family]
    t = inp.clone().requires_grad_()
    # t^3 keeps the first gradient differentiable elsewhere: the silent case of a real loss
    (grad,) = torch.autograd.grad(loss_of(t) + t.pow(3).sum(), t, create_graph=True)
    # .backward(), as a gradient-penalty loss is run (torch.autograd.grad(..., inputs) prunes the
    # refusing node away and stays silent: a limit of torch's once_differentiable)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.square().sum().backward()


@pytest.mark.parametrize("given", [None, "0"])
def test_fp_fusion_stays_on_unless_the_environment_chooses(given):
    """Triton 3.10 turns FMA contraction off by default; the kernels keep Triton <= 3.9's
    default (on) unless TRITON_DEFAULT_FP_FUSION is set by the user."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_DEFAULT_FP_FUSION"}
    env["PYTHONPATH"] = str(ROOT)
    if given is not None:
        env["TRITON_DEFAULT_FP_FUSION"] = given
    code = "import os, kernels.rmsnorm; print(os.environ['TRITON_DEFAULT_FP_FUSION'])"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == (given or "1")
