"""Rotary kernels against reference.rotary: forward, dq, dk, every dtype, GQA, packed positions."""

import zlib

import pytest
import torch

from kernels import reference
from kernels import rotary as rot_mod
from kernels.rotary import _rotary_apply, rotary
from tests.kernels.conftest import ATOL, assert_close_to_ref, poisoned_empty

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DOC_LENGTHS = (19, 1, 11, 6)  # packed documents: positions restart at 0 at each one
# (heads, kv_heads, head_dim, theta, scaling_factor): Llama-2 head dims, an odd-but-even 96
# (half = 48, not a power of two), GQA 8/2 and plain multi-head, linear position interpolation.
CASES = [
    (8, 2, 128, 10000.0, 1.0),
    (8, 2, 64, 10000.0, 4.0),
    (8, 2, 96, 500000.0, 2.5),
    (4, 4, 128, 10000.0, 1.0),
]


def _positions(device, dtype=torch.int64):
    return torch.cat([torch.arange(n) for n in DOC_LENGTHS]).to(dtype=dtype, device=device)


def _qkv_views(tokens, heads, kv_heads, head_dim, dtype, device, seed):
    """q, k as the model makes them: views split out of one fused (tokens, (h + 2 kv) * d) output,
    so their token stride is the fused width. Returns (qkv, q, k, v)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(
        dtype=dtype, device=device
    )
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return qkv, q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim), v


def _reference(q, k, dq_out, dk_out, positions, theta, factor, upcast):
    """(q_out, k_out, dq, dk) of the reference: fp32 inputs and math if `upcast`, else q's dtype."""
    if upcast:
        q, k, dq_out, dk_out = q.float(), k.float(), dq_out.float(), dk_out.float()
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_()
    q_out, k_out = reference.rotary(q, k, positions, theta, factor, upcast=upcast)
    torch.autograd.backward((q_out, k_out), (dq_out, dk_out))
    return q_out.detach(), k_out.detach(), q.grad, k.grad


def _check(names, outs, q, k, dq_out, dk_out, positions, theta, factor):
    ref32 = _reference(q, k, dq_out, dk_out, positions, theta, factor, upcast=True)
    reflp = _reference(q, k, dq_out, dk_out, positions, theta, factor, upcast=False)
    for name, out, r32, rlp in zip(names, outs, ref32, reflp):
        if out is not None:
            assert out.dtype == rlp.dtype, f"{name}: dtype {out.dtype} != {rlp.dtype}"
            assert_close_to_ref(out, r32, rlp, atol=ATOL[q.dtype], name=name)


def _case_inputs(case, dtype, device):
    heads, kv_heads, head_dim, theta, factor = case
    tokens = sum(DOC_LENGTHS)
    seed = zlib.crc32(f"{case}{dtype}".encode())
    _, q, k, _ = _qkv_views(tokens, heads, kv_heads, head_dim, dtype, device, seed)
    _, dq_out, dk_out, _ = _qkv_views(tokens, heads, kv_heads, head_dim, dtype, device, seed + 1)
    return q, k, dq_out, dk_out, theta, factor


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_backward_kernels(device, dtype, case):
    q, k, dq_out, dk_out, theta, factor = _case_inputs(case, dtype, device)
    assert not q.is_contiguous() and not k.is_contiguous()  # strided token dim, read in place
    positions = _positions(device)
    q_out, k_out = (poisoned_empty(*t.shape, dtype=dtype, device=device) for t in (q, k))
    _rotary_apply(q, k, positions, theta, factor, q_out=q_out, k_out=k_out)
    dq, dk = (poisoned_empty(*t.shape, dtype=dtype, device=device) for t in (q, k))
    # Strided upstream gradients too: the backward reads any layout.
    _rotary_apply(dq_out, dk_out, positions, theta, factor, backward=True, q_out=dq, k_out=dk)
    _check(
        ("q_out", "k_out", "dq", "dk"),
        (q_out, k_out, dq, dk),
        q,
        k,
        dq_out,
        dk_out,
        positions,
        theta,
        factor,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autograd(device, dtype):
    q, k, dq_out, dk_out, theta, factor = _case_inputs(CASES[2], dtype, device)
    positions = _positions(device, torch.int32)
    qg, kg = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    q_out, k_out = rotary(qg, kg, positions, theta, factor)
    assert q_out.is_contiguous() and k_out.is_contiguous()
    torch.autograd.backward((q_out, k_out), (dq_out, dk_out))
    _check(
        ("q_out", "k_out", "dq", "dk"),
        (q_out.detach(), k_out.detach(), qg.grad, kg.grad),
        q,
        k,
        dq_out,
        dk_out,
        positions,
        theta,
        factor,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace(device, dtype):
    """inplace=True rotates the q/k views of the fused qkv buffer and leaves v alone."""
    heads, kv_heads, head_dim, theta, factor = CASES[0]
    tokens = sum(DOC_LENGTHS)
    qkv, q, k, v = _qkv_views(tokens, heads, kv_heads, head_dim, dtype, device, seed=31)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    positions = _positions(device)
    q_out, k_out = rotary(q, k, positions, theta, factor, inplace=True)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    assert torch.equal(v, v0)
    ref32 = reference.rotary(q0.float(), k0.float(), positions, theta, factor)
    reflp = reference.rotary(q0, k0, positions, theta, factor, upcast=False)
    assert_close_to_ref(q, ref32[0], reflp[0], atol=ATOL[dtype], name="q in place")
    assert_close_to_ref(k, ref32[1], reflp[1], atol=ATOL[dtype], name="k in place")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_autograd(device, dtype):
    """In place under autograd, on q/k sliced out of a fused qkv activation (single-output views):
    the rotation lands in the fused buffer and the gradient reaches the fused tensor's producer."""
    heads, kv_heads, head_dim, theta, factor = CASES[1]
    tokens, hq, hk = sum(DOC_LENGTHS), heads * head_dim, kv_heads * head_dim
    qkv0, q0, k0, _ = _qkv_views(tokens, heads, kv_heads, head_dim, dtype, device, seed=43)
    _, dq_out, dk_out, _ = _qkv_views(tokens, heads, kv_heads, head_dim, dtype, device, seed=44)
    leaf = qkv0.clone().requires_grad_()
    fused = leaf * 1.0  # the w_qkv output: a non-leaf autograd may write into
    q = fused[:, :hq].view(tokens, heads, head_dim)
    k = fused[:, hq : hq + hk].view(tokens, kv_heads, head_dim)
    positions = _positions(device)
    q_out, k_out = rotary(q, k, positions, theta, factor, inplace=True)
    assert q_out.data_ptr() == fused.data_ptr()  # written into the fused buffer
    assert torch.equal(fused[:, hq : hq + hk], k_out.reshape(tokens, hk))
    torch.autograd.backward((q_out, k_out), (dq_out, dk_out))
    assert (leaf.grad[:, hq + hk :] == 0).all()
    dq = leaf.grad[:, :hq].view(tokens, heads, head_dim)
    dk = leaf.grad[:, hq : hq + hk].view(tokens, kv_heads, head_dim)
    _check(
        ("q_out", "k_out", "dq", "dk"),
        (q_out.detach(), k_out.detach(), dq, dk),
        q0,
        k0,
        dq_out,
        dk_out,
        positions,
        theta,
        factor,
    )


def test_far_positions(device):
    """Positions up to 4095 (angles of thousands of radians) still match the fp32 reference."""
    tokens = sum(DOC_LENGTHS)
    _, q, k, _ = _qkv_views(tokens, 2, 1, 128, torch.float32, device, seed=37)
    g = torch.Generator().manual_seed(37)
    positions = torch.randint(0, 4096, (tokens,), generator=g).to(device)
    q_out, k_out = (poisoned_empty(*t.shape, dtype=torch.float32, device=device) for t in (q, k))
    _rotary_apply(q, k, positions, 10000.0, 1.0, q_out=q_out, k_out=k_out)
    ref = reference.rotary(q, k, positions, 10000.0, 1.0)
    assert_close_to_ref(q_out, ref[0], ref[0], atol=ATOL[torch.float32], name="q_out")
    assert_close_to_ref(k_out, ref[1], ref[1], atol=ATOL[torch.float32], name="k_out")


def test_many_heads_loop(device, monkeypatch):
    """More heads than one step holds: the kernel loops over head blocks (shrink the tile to 2)."""
    monkeypatch.setattr(rot_mod, "_MAX_TILE", 64)
    case = (6, 3, 64, 10000.0, 1.0)
    assert rot_mod._config(6, 3, 64).block_hq == 2
    q, k, dq_out, dk_out, theta, factor = _case_inputs(case, torch.bfloat16, device)
    positions = _positions(device)
    q_out, k_out = (poisoned_empty(*t.shape, dtype=torch.bfloat16, device=device) for t in (q, k))
    _rotary_apply(q, k, positions, theta, factor, q_out=q_out, k_out=k_out)
    _check(("q_out", "k_out"), (q_out, k_out), q, k, dq_out, dk_out, positions, theta, factor)


def test_reference_path_inplace(monkeypatch):
    """Without Triton (plain CPU), inplace=True still writes into q and k."""
    monkeypatch.setattr(rot_mod, "use_triton", lambda x: False)
    _, q, k, _ = _qkv_views(5, 2, 1, 64, torch.float32, "cpu", seed=41)
    positions = torch.arange(5)
    want_q, want_k = reference.rotary(q, k, positions)
    q_out, k_out = rotary(q, k, positions, inplace=True)
    assert q_out is q and k_out is k
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
