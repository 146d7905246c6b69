"""RMSNorm kernels against reference.rmsnorm: forward, dx and dweight, every dtype, odd shapes."""

import zlib

import pytest
import torch

from kernels import reference
from kernels import rmsnorm as rms_mod
from kernels.rmsnorm import _rmsnorm_bwd, _rmsnorm_fwd, rmsnorm
from tests.kernels.conftest import (
    ATOL,
    OUT_EDGE,
    assert_close_to_ref,
    frame_intact,
    framed,
    poisoned_empty,
)

EPS = 1e-5
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rows..., hidden): odd hidden, one row, Llama hidden sizes at few rows, a 3-D batch, and enough
# rows that backward programs walk several rows each.
SHAPES = [(5, 123), (1, 123), (3, 4096), (2, 5120), (1, 8192), (2, 3, 123), (37, 96)]


def _inputs(shape, dtype, device, seed):
    """Fresh x, weight, dy: drawn on the CPU (same values on every device), then moved."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    w = 1.0 + 0.5 * torch.randn(shape[-1], generator=g)
    dy = torch.randn(shape, generator=g)
    return (t.to(dtype=dtype, device=device) for t in (x, w, dy))


def _reference(x, w, dy, upcast):
    """(y, dx, dweight) of the reference: fp32 inputs and math when `upcast`, else x's dtype."""
    if upcast:
        x, w, dy = x.float(), w.float(), dy.float()
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = reference.rmsnorm(x, w, EPS, upcast=upcast)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def _check(names, outs, x, w, dy):
    ref32 = _reference(x, w, dy, upcast=True)
    reflp = _reference(x, w, dy, upcast=False)
    for name, out, r32, rlp in zip(names, outs, ref32, reflp):
        if out is not None:
            assert out.dtype == rlp.dtype, f"{name}: dtype {out.dtype} != {rlp.dtype}"
            assert_close_to_ref(out, r32, rlp, atol=ATOL[x.dtype], name=name)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_backward_kernels(device, dtype, shape):
    x, w, dy = _inputs(shape, dtype, device, seed=zlib.crc32(f"{shape}{dtype}".encode()))
    hidden = shape[-1]
    x2, dy2 = x.reshape(-1, hidden), dy.reshape(-1, hidden)
    rows = x2.shape[0]
    y = poisoned_empty(rows, hidden, dtype=dtype, device=device)
    rstd = poisoned_empty(rows, dtype=torch.float32, device=device)
    _rmsnorm_fwd(x2, w, EPS, out=y, rstd=rstd)
    want_rstd = torch.rsqrt(x2.float().pow(2).mean(-1) + EPS)
    torch.testing.assert_close(rstd, want_rstd, rtol=1e-5, atol=1e-6)
    dx = poisoned_empty(rows, hidden, dtype=dtype, device=device)
    dw = poisoned_empty(hidden, dtype=dtype, device=device)
    _rmsnorm_bwd(dy2, x2, w, rstd, dx=dx, dweight=dw)
    _check(("y", "dx", "dweight"), (y.view(shape), dx.view(shape), dw), x, w, dy)


@pytest.mark.parametrize("shape", [(5, 123), (2, 3, 4096)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autograd(device, dtype, shape):
    x, w, dy = _inputs(shape, dtype, device, seed=7 + len(shape))
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = rmsnorm(xg, wg, EPS)
    y.backward(dy)
    _check(("y", "dx", "dweight"), (y.detach(), xg.grad, wg.grad), x, w, dy)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_rows(device, dtype):
    """x and dy are column slices of wider tensors (row stride > hidden): no copy, right answer."""
    rows, hidden, width = 6, 123, 200
    x, w, dy = _inputs((rows, width), dtype, device, seed=11)
    w = w[:hidden].contiguous()
    wide = x.clone().requires_grad_()
    xs = wide[:, 40 : 40 + hidden]  # (rows, hidden), stride (width, 1)
    dys = dy[:, 10 : 10 + hidden]
    assert not xs.is_contiguous() and not dys.is_contiguous()
    wg = w.clone().requires_grad_()
    y = rmsnorm(xs, wg, EPS)
    y.backward(dys)
    _check(
        ("y", "dx", "dweight"),
        (y.detach(), wide.grad[:, 40 : 40 + hidden], wg.grad),
        xs.detach(),
        w,
        dys,
    )
    assert (wide.grad[:, :40] == 0).all() and (wide.grad[:, 40 + hidden :] == 0).all()


def test_fp32_weight_with_bf16_input(device):
    """Mixed dtypes: y and dx follow x (bf16), dweight follows the weight (fp32)."""
    x, _, dy = _inputs((5, 123), torch.bfloat16, device, seed=19)
    _, w, _ = _inputs((5, 123), torch.float32, device, seed=20)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = rmsnorm(xg, wg, EPS)
    y.backward(dy)
    assert y.dtype == xg.grad.dtype == torch.bfloat16 and wg.grad.dtype == torch.float32
    _check(("y", "dx", "dweight"), (y.detach(), xg.grad, wg.grad), x, w, dy)


def test_broadcast_grad(device):
    """y.sum().backward() hands the kernel a dy with stride 0 in both dims."""
    x, w, _ = _inputs((4, 123), torch.float32, device, seed=3)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    rmsnorm(xg, wg, EPS).sum().backward()
    _check((None, "dx", "dweight"), (None, xg.grad, wg.grad), x, w, torch.ones_like(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_wide_rows_chunked(device, dtype, monkeypatch):
    """Rows wider than the register limit go through column chunks and the row-dot kernel; shrink
    the limits so hidden 123 takes that path (4 chunks of 32)."""
    monkeypatch.setattr(rms_mod, "_MAX_FWD_BLOCK", 64)
    monkeypatch.setattr(rms_mod, "_MAX_BWD_BLOCK", 64)
    monkeypatch.setattr(rms_mod, "_CHUNK", 32)
    blocks = rms_mod._blocks(123)
    assert not blocks.fwd_single and not blocks.bwd_inline_dot
    x, w, dy = _inputs((9, 123), dtype, device, seed=5)
    y = poisoned_empty(9, 123, dtype=dtype, device=device)
    rstd = poisoned_empty(9, dtype=torch.float32, device=device)
    _rmsnorm_fwd(x, w, EPS, out=y, rstd=rstd)
    dx = poisoned_empty(9, 123, dtype=dtype, device=device)
    dw = poisoned_empty(123, dtype=dtype, device=device)
    _rmsnorm_bwd(dy, x, w, rstd, dx=dx, dweight=dw)
    _check(("y", "dx", "dweight"), (y, dx, dw), x, w, dy)


def test_dweight_is_deterministic(device):
    """The dweight partials are reduced in a fixed order: two runs agree bit for bit."""
    x, w, dy = _inputs((1200, 96), torch.bfloat16, device, seed=13)
    rstd = torch.rsqrt(x.float().pow(2).mean(-1) + EPS)
    cfg = rms_mod._bwd_config(96, torch.device(device))
    _, rows_per_program = rms_mod._bwd_layout(1200, cfg, torch.device(device))
    assert rows_per_program > 1  # several rows per program, several programs
    dws = [_rmsnorm_bwd(dy, x, w, rstd)[1] for _ in range(2)]
    assert torch.equal(dws[0], dws[1])
    _check((None, None, "dweight"), (None, None, dws[0]), x, w, dy)


@pytest.mark.parametrize("hidden", [123, 4096])
def test_every_tuning_candidate(device, hidden):
    """Each setting a tuning sweep may pick computes the same function: rows per step that do
    not divide the rows of a program, several warps and row groups. On CUDA with enough rows
    that every program loops over many (the pipelined settings' steady state, not only their
    first step)."""
    dtype = torch.bfloat16
    rows = 11 if device == "cpu" else 2 * 132 * 8 + 37
    x, w, dy = _inputs((rows, hidden), dtype, device, seed=17)
    for cfg in rms_mod.candidates_fwd(hidden):
        y = poisoned_empty(rows, hidden, dtype=dtype, device=device)
        rstd = poisoned_empty(rows, dtype=torch.float32, device=device)
        _rmsnorm_fwd(x, w, EPS, out=y, rstd=rstd, cfg=cfg)
        _check(("y",), (y,), x, w, dy)
    rstd = torch.rsqrt(x.float().pow(2).mean(-1) + EPS)
    for cfg in rms_mod.candidates_bwd(hidden):
        dx = poisoned_empty(rows, hidden, dtype=dtype, device=device)
        dw = poisoned_empty(hidden, dtype=dtype, device=device)
        _rmsnorm_bwd(dy, x, w, rstd, dx=dx, dweight=dw, cfg=cfg)
        _check((None, "dx", "dweight"), (None, dx, dw), x, w, dy)


@pytest.mark.parametrize("hidden", [8200])
def test_every_forward_candidate_at_wide_rows(device, hidden):
    """The forward's candidates at about Llama-2-70B's width, the chunked two-pass ones
    included, with a ragged last chunk (the tuning sweep checks 8192 itself against the
    heuristic on the card)."""
    cands = rms_mod.candidates_fwd(hidden)
    assert any(c.chunk for c in cands) and not cands[0].chunk
    rows = 7 if device == "cpu" else 3 * 132 + 5
    x, w, dy = _inputs((rows, hidden), torch.bfloat16, device, seed=19)
    for cfg in cands:
        y = poisoned_empty(rows, hidden, dtype=torch.bfloat16, device=device)
        rstd = poisoned_empty(rows, dtype=torch.float32, device=device)
        _rmsnorm_fwd(x, w, EPS, out=y, rstd=rstd, cfg=cfg)
        _check(("y",), (y,), x, w, dy)


def test_tuned_table_overrides_heuristic(monkeypatch):
    """A card's table entry replaces the heuristic; a stale entry is skipped with a warning that
    names the op and key, and the heuristic runs."""
    from kernels import tuning

    entries = {("rmsnorm_bwd", "hidden=4096"): {"warps": 4, "rows": 2, "programs_per_sm": 1}}
    monkeypatch.setattr(tuning, "lookup", lambda op, key, device: entries.get((op, key)))
    cuda = torch.device("cuda", 0)  # only its type is read: tables are for CUDA devices
    assert rms_mod._bwd_config(4096, cuda) == rms_mod.BwdConfig(4, 2, 1)
    assert rms_mod._bwd_config(8192, cuda) == rms_mod.BwdConfig(16, 1, rms_mod._PROGRAMS_PER_SM)
    entries[("rmsnorm_fwd", "hidden=4096")] = {"warps": 8, "block": 64}
    with pytest.warns(UserWarning, match="rmsnorm_fwd.*unknown parameter.*block"):
        assert rms_mod._fwd_config(4096, cuda) == rms_mod.FwdConfig(8, 1)


@pytest.mark.parametrize("chunked", [False, True], ids=["one-block", "chunked"])
def test_nothing_read_or_written_outside_the_rows(device, chunked, monkeypatch):
    """Every tensor, read or written, sits in a NaN frame (a band after each row, a row after the
    last, a tail after each vector): a masked load that reaches one column or row too far reads
    NaN, a store that does writes into the frame, in every tuning candidate. `chunked` shrinks
    the register limits as test_wide_rows_chunked does (column chunks and the row-dot kernel)."""
    if chunked:
        monkeypatch.setattr(rms_mod, "_MAX_FWD_BLOCK", 64)
        monkeypatch.setattr(rms_mod, "_MAX_BWD_BLOCK", 64)
        monkeypatch.setattr(rms_mod, "_CHUNK", 32)
    rows, hidden, dtype = 5, 123, torch.float32
    x, w, dy = _inputs((rows, hidden), dtype, device, seed=23)
    (xb, xv), (dyb, dyv) = (framed(rows, hidden, dtype, device, t) for t in (x, dy))
    wb, wv = framed(1, hidden, dtype, device, w)
    for cfg in rms_mod.candidates_fwd(hidden):
        yb, y = framed(rows, hidden, dtype, device, edge=OUT_EDGE)
        rb, rstd = framed(1, rows, torch.float32, device, edge=OUT_EDGE)
        _rmsnorm_fwd(xv, wv[0], EPS, out=y, rstd=rstd[0], cfg=cfg)
        _check(("y",), (y,), x, w, dy)
        assert frame_intact(yb, rows, hidden, OUT_EDGE), cfg
        assert frame_intact(rb, 1, rows, OUT_EDGE), cfg
    for cfg in rms_mod.candidates_bwd(hidden):
        dxb, dx = framed(rows, hidden, dtype, device, edge=OUT_EDGE)
        dwb, dw = framed(1, hidden, dtype, device, edge=OUT_EDGE)
        _rmsnorm_bwd(dyv, xv, wv[0], rstd[0], dx=dx, dweight=dw[0], cfg=cfg)
        _check((None, "dx", "dweight"), (None, dx, dw[0]), x, w, dy)
        assert frame_intact(dxb, rows, hidden, OUT_EDGE), cfg
        assert frame_intact(dwb, 1, hidden, OUT_EDGE), cfg
    for buf, r, c in ((xb, rows, hidden), (dyb, rows, hidden), (wb, 1, hidden)):
        assert frame_intact(buf, r, c)
