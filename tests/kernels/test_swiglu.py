"""SwiGLU kernels against reference.swiglu: forward and d(gate_up), every dtype, Llama FFN sizes."""

import zlib

import pytest
import torch

from kernels import reference
from kernels.swiglu import _swiglu_bwd, _swiglu_fwd, swiglu
from tests.kernels.conftest import (
    ATOL,
    OUT_EDGE,
    assert_close_to_ref,
    frame_intact,
    framed,
    poisoned_empty,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rows..., ffn): odd ffn, Llama-2 7B/13B/70B FFN sizes at 1-2 rows, a 3-D batch.
SHAPES = [(5, 123), (1, 11008), (2, 13824), (1, 28672), (2, 3, 64)]


def _inputs(shape, dtype, device, seed):
    """Fresh gate_up (..., 2*ffn) and dout (..., ffn), drawn on the CPU then moved."""
    g = torch.Generator().manual_seed(seed)
    *lead, ffn = shape
    gate_up = torch.randn(*lead, 2 * ffn, generator=g)
    dout = torch.randn(*lead, ffn, generator=g)
    return gate_up.to(dtype=dtype, device=device), dout.to(dtype=dtype, device=device)


def _reference(gate_up, dout, upcast):
    """(out, d(gate_up)) of the reference: fp32 inputs and math if `upcast`, else the input
    dtype."""
    if upcast:
        gate_up, dout = gate_up.float(), dout.float()
    gu = gate_up.detach().clone().requires_grad_()
    out = reference.swiglu(gu, upcast=upcast)
    out.backward(dout)
    return out.detach(), gu.grad


def _check(out, dgate_up, gate_up, dout):
    atol = ATOL[gate_up.dtype]
    (o32, d32), (olp, dlp) = _reference(gate_up, dout, True), _reference(gate_up, dout, False)
    if out is not None:
        assert out.dtype == gate_up.dtype
        assert_close_to_ref(out, o32, olp, atol=atol, name="out")
    assert dgate_up.dtype == gate_up.dtype
    assert_close_to_ref(dgate_up, d32, dlp, atol=atol, name="d(gate_up)")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_backward_kernels(device, dtype, shape):
    gate_up, dout = _inputs(shape, dtype, device, seed=zlib.crc32(f"{shape}{dtype}".encode()))
    ffn = shape[-1]
    gu2, dout2 = gate_up.reshape(-1, 2 * ffn), dout.reshape(-1, ffn)
    out = poisoned_empty(gu2.shape[0], ffn, dtype=dtype, device=device)
    _swiglu_fwd(gu2, out=out)
    dgu = poisoned_empty(*gu2.shape, dtype=dtype, device=device)
    _swiglu_bwd(dout2, gu2, dgate_up=dgu)
    _check(out.view(shape), dgu.view(gate_up.shape), gate_up, dout)


@pytest.mark.parametrize("shape", [(5, 123), (2, 3, 1000)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autograd(device, dtype, shape):
    gate_up, dout = _inputs(shape, dtype, device, seed=17 + len(shape))
    gu = gate_up.clone().requires_grad_()
    out = swiglu(gu)
    assert out.shape == dout.shape
    out.backward(dout)
    _check(out.detach(), gu.grad, gate_up, dout)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_rows(device, dtype):
    """gate_up is a column slice of a wider tensor (row stride > 2*ffn) and dout is strided too."""
    rows, ffn = 4, 300
    wide_in, wide_dout = _inputs((rows, ffn + 50), dtype, device, seed=23)
    base = wide_in.clone().requires_grad_()  # (rows, 2*ffn + 100)
    gate_up = base[:, 30 : 30 + 2 * ffn]
    dout = wide_dout[:, 20 : 20 + ffn]
    assert not gate_up.is_contiguous() and not dout.is_contiguous()
    out = swiglu(gate_up)
    out.backward(dout)
    _check(out.detach(), base.grad[:, 30 : 30 + 2 * ffn], gate_up.detach(), dout)
    assert (base.grad[:, :30] == 0).all() and (base.grad[:, 30 + 2 * ffn :] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_saturated_gate(device, dtype):
    """Gates far into both tails (exp(-g) overflows fp32 for g < -88) stay finite and exact."""
    ffn = 8
    gate = torch.tensor([-1e4, -500.0, -90.0, -20.0, 20.0, 90.0, 500.0, 1e4])
    up = torch.linspace(-2.0, 2.0, ffn)
    gate_up = torch.cat([gate, up]).repeat(2, 1).to(dtype=dtype, device=device)  # (2, 16)
    dout = torch.ones(2, ffn, dtype=dtype, device=device)
    out = poisoned_empty(2, ffn, dtype=dtype, device=device)
    dgu = poisoned_empty(2, 2 * ffn, dtype=dtype, device=device)
    _swiglu_fwd(gate_up, out=out)
    _swiglu_bwd(dout, gate_up, dgate_up=dgu)
    _check(out, dgu, gate_up, dout)


def test_broadcast_grad(device):
    """out.sum().backward() hands the kernel a dout with stride 0."""
    gate_up, _ = _inputs((3, 123), torch.float32, device, seed=29)
    gu = gate_up.clone().requires_grad_()
    swiglu(gu).sum().backward()
    _check(None, gu.grad, gate_up, torch.ones(3, 123, device=device))


def test_every_tuning_candidate(device):
    """Each setting a tuning sweep may pick computes the same function (ffn not a multiple of
    any block, so every setting has a ragged last block, and flat blocks span rows), on
    contiguous rows and on rows of a wider buffer."""
    from kernels import swiglu as swiglu_mod

    dtype = torch.bfloat16
    shape = (3, 1000)
    gate_up, dout = _inputs(shape, dtype, device, seed=31)
    wide = torch.full((3, 2100), float("nan"), dtype=dtype, device=device)
    wide[:, :2000] = gate_up
    strided = wide[:, :2000]  # row stride 2100
    cands = swiglu_mod.candidates(1000)
    assert cands[0] == swiglu_mod._heuristic(1000) and len(cands) > 3
    assert {c.linear for c in cands} == {False, True}  # every grid order is swept
    assert {c.flat for c in cands} == {False, True}
    for cfg in cands:
        for gu in (gate_up, strided):
            out = poisoned_empty(*shape, dtype=dtype, device=device)
            dgu = poisoned_empty(*gate_up.shape, dtype=dtype, device=device)
            swiglu_mod._swiglu_fwd(gu, out=out, cfg=cfg)
            swiglu_mod._swiglu_bwd(dout, gu, dgate_up=dgu, cfg=cfg)
            _check(out, dgu, gate_up, dout)


def test_grid_falls_back_where_a_setting_cannot_apply():
    """Flat blocks need every offset in int32 and the 1-D grid at most 2^31 - 1 programs;
    otherwise the launch takes the 2-D grid (same result, other order). Meta tensors: only
    shapes and strides are read."""
    from kernels.swiglu import Config, _launch

    def t(rows, cols, row_stride):
        return torch.empty_strided((rows, cols), (row_stride, 1), device="meta")

    flat, linear = Config(1024, 4, flat=True), Config(1024, 4, linear=True)
    small = (t(8, 200, 200), t(8, 100, 100))
    assert _launch(8, 100, flat, small) == ((1,), {"BLOCK": 1024, "LINEAR": False,
                                                   "FLAT_FFN": 100})  # fmt: skip
    huge_stride = (t(8, 200, 2**29), t(8, 100, 100))  # last row starts at 7 * 2^29 > 2^31
    grid, meta = _launch(8, 100, flat, huge_stride)
    assert grid == (8, 1) and meta["FLAT_FFN"] == 0 and not meta["LINEAR"]
    assert _launch(8, 100, linear, small)[1]["LINEAR"]
    assert _launch(2**31, 4096, linear, small)[0] == (2**31, 4)


def test_tuned_table_per_pass(monkeypatch):
    """The forward and the backward read their own table entries."""
    from kernels import swiglu as swiglu_mod
    from kernels import tuning

    entries = {("swiglu_bwd", "ffn=3584"): {"block": 1024, "warps": 4}}
    monkeypatch.setattr(tuning, "lookup", lambda op, key, device: entries.get((op, key)))
    cuda = torch.device("cuda", 0)  # only its type is read
    assert swiglu_mod._config(3584, cuda, backward=True) == swiglu_mod.Config(1024, 4)
    assert swiglu_mod._config(3584, cuda, backward=False) == swiglu_mod._heuristic(3584)


@pytest.mark.parametrize("ffn", [1000, 2048])
def test_every_candidate_in_a_nan_frame(device, ffn):
    """Each tuning candidate on tensors in NaN frames (see conftest.framed): nothing read or
    written past a row's end or the last row, at a ragged ffn (flat blocks span rows and the
    last one runs past the last row) and at 2048, a multiple of every block (as Llama-3's 14336
    is of 512, 1024 and 2048). Then a d(gate_up) with a column stride."""
    from kernels import swiglu as swiglu_mod

    rows, dtype = 3, torch.float32
    gate_up, dout = _inputs((rows, ffn), dtype, device, seed=37)
    gub, gu = framed(rows, 2 * ffn, dtype, device, gate_up)
    db, dv = framed(rows, ffn, dtype, device, dout)
    for cfg in swiglu_mod.candidates(ffn):
        ob, out = framed(rows, ffn, dtype, device, edge=OUT_EDGE)
        dgb, dgu = framed(rows, 2 * ffn, dtype, device, edge=OUT_EDGE)
        swiglu_mod._swiglu_fwd(gu, out=out, cfg=cfg)
        swiglu_mod._swiglu_bwd(dv, gu, dgate_up=dgu, cfg=cfg)
        _check(out, dgu, gate_up, dout)
        assert frame_intact(ob, rows, ffn, OUT_EDGE), cfg
        assert frame_intact(dgb, rows, 2 * ffn, OUT_EDGE), cfg
    assert frame_intact(gub, rows, 2 * ffn) and frame_intact(db, rows, ffn)
    # d(gate_up) given with a column stride (a transposed buffer): dup's columns are strided too
    dgu = poisoned_empty(2 * ffn, rows, dtype=dtype, device=device).t()
    swiglu_mod._swiglu_bwd(dv, gu, dgate_up=dgu)
    _check(None, dgu, gate_up, dout)
