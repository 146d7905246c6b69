"""Audit of the kernel wrappers: odd layouts (transposed, expanded, offset views), zero and one
row, partial requires_grad, aliasing in-place rotary, AdamW corner cases, and the tuning table's
fall back to the heuristics."""

import json
import re
import warnings

import pytest
import torch

from kernels import reference, tuning
from kernels.adamw import found_nonfinite, fused_adamw
from kernels.rmsnorm import rmsnorm
from kernels.rotary import rotary
from kernels.swiglu import swiglu


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- rmsnorm


def _rms_layouts(device):
    g = _g(1)
    base = torch.randn(24, 40, generator=g).to(device)
    return {
        "transposed": torch.randn(100, 6, generator=g).to(device).t(),  # (6, 100), stride (1, 6)
        "offset": base[3:9, 5:35],  # storage offset, row stride 40
        "expanded": torch.randn(1, 100, generator=g).to(device).expand(5, 100),  # row stride 0
        "one-row": torch.randn(1, 100, generator=g).to(device),
        "col-strided": base[:, ::2],  # (24, 20), column stride 2
    }


@pytest.mark.parametrize("chunked", [False, True], ids=["one-block", "chunked"])
@pytest.mark.parametrize("layout", ["transposed", "offset", "expanded", "one-row", "col-strided"])
@pytest.mark.parametrize("frozen", ["none", "weight", "x"])
def test_rmsnorm_layouts_and_frozen_inputs(device, monkeypatch, layout, frozen, chunked):
    """Strided, offset and broadcast rows; a frozen weight or input gets no gradient (None), the
    other one the reference's. `chunked` shrinks the register limits so hidden 100 (not a power
    of two) runs the column-chunk forward, the row-dot kernel and the chunked backward."""
    if chunked:
        import kernels.rmsnorm as rms_mod

        monkeypatch.setattr(rms_mod, "_MAX_FWD_BLOCK", 32)
        monkeypatch.setattr(rms_mod, "_MAX_BWD_BLOCK", 32)
        monkeypatch.setattr(rms_mod, "_CHUNK", 16)
    x0 = _rms_layouts(device)[layout]
    w0 = torch.randn(x0.shape[-1], generator=_g(2)).to(device)
    dy = torch.randn(x0.shape, generator=_g(3)).to(device)
    outs = []
    for fn in (rmsnorm, reference.rmsnorm):
        x = x0.detach().requires_grad_(frozen != "x")  # a leaf with x0's strides and offset
        assert x.stride() == x0.stride() and x.storage_offset() == x0.storage_offset()
        w = w0.clone().requires_grad_(frozen != "weight")
        y = fn(x, w, 1e-5)
        y.backward(dy)
        outs.append((y.detach(), x.grad, w.grad))
    (y, dx, dw), (ry, rdx, rdw) = outs
    torch.testing.assert_close(y, ry, rtol=1e-5, atol=1e-5)
    assert (dx is None) == (rdx is None) and (dw is None) == (rdw is None)
    if dx is not None:
        torch.testing.assert_close(dx, rdx, rtol=1e-4, atol=1e-5)
    if dw is not None:
        torch.testing.assert_close(dw, rdw, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [0, 1, 3])
def test_rmsnorm_bf16_input_fp32_weight_odd_hidden(device, rows):
    x = torch.randn(rows, 2, 77, generator=_g(4)).to(device, torch.bfloat16).requires_grad_()
    w = (torch.rand(77, generator=_g(5)) + 0.5).to(device).requires_grad_()
    y = rmsnorm(x, w, 1e-6)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    ry = reference.rmsnorm(x.detach(), w.detach(), 1e-6)
    torch.testing.assert_close(y.detach(), ry, rtol=0, atol=0.02)
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    if rows == 0:
        assert torch.equal(w.grad, torch.zeros_like(w))


# ---------------------------------------------------------------- swiglu


@pytest.mark.parametrize("layout", ["transposed", "offset", "expanded", "one-row", "zero-rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_swiglu_layouts(device, layout, dtype):
    g = _g(6)
    if layout == "transposed":
        gu = torch.randn(50, 7, generator=g).t()
    elif layout == "offset":
        gu = torch.randn(9, 80, generator=g)[2:7, 10:60]
    elif layout == "expanded":
        gu = torch.randn(1, 50, generator=g).expand(4, 50)
    elif layout == "one-row":
        gu = torch.randn(1, 1, 50, generator=g)
    else:
        gu = torch.randn(0, 3, 50, generator=g)
    gu = gu.to(device, dtype)
    x = gu.detach().clone().requires_grad_()
    xr = gu.detach().float().clone().requires_grad_()
    out = swiglu(x)
    ref = reference.swiglu(xr)
    dout = torch.randn(out.shape, generator=_g(7)).to(device, dtype)
    out.backward(dout)
    ref.backward(dout.float())
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.float(), ref.detach(), **tol)
    torch.testing.assert_close(x.grad.float(), xr.grad, **tol)


# ---------------------------------------------------------------- rotary


@pytest.mark.parametrize("grad", [False, True])
def test_rotary_inplace_on_fused_qkv_and_cache_slices(device, grad):
    """q and k narrowed out of one fused qkv tensor, k written into a slice of a k cache: in place
    must equal the out-of-place reference and leave the rest untouched."""
    tokens, h, kvh, d = 6, 4, 2, 16
    qkv0 = torch.randn(tokens, (h + 2 * kvh) * d, generator=_g(8)).to(device)
    pos = torch.tensor([5, 0, 1, 2, 9, 3], device=device, dtype=torch.int32)
    leaf = qkv0.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        fused = leaf * 1.0
        q = fused[:, : h * d].view(tokens, h, d)
        k = fused[:, h * d : (h + kvh) * d].view(tokens, kvh, d)
        rq, rk = reference.rotary(q.detach().clone(), k.detach().clone(), pos, 10000.0, 2.0)
        qo, ko = rotary(q, k, pos, 10000.0, 2.0, inplace=True)
    torch.testing.assert_close(qo.detach(), rq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ko.detach(), rk, rtol=1e-5, atol=1e-5)
    assert torch.equal(fused.detach()[:, (h + kvh) * d :], qkv0[:, (h + kvh) * d :])
    if grad:
        (qo.sum() + 2 * ko.sum()).backward()
        assert leaf.grad is not None and (leaf.grad[:, (h + kvh) * d :] == 0).all()
    # a k cache: (layers, max_tokens, kv_heads, d); rotate a token range in place, no autograd
    cache = torch.randn(2, 10, kvh, d, generator=_g(9)).to(device)
    before = cache.clone()
    kc = cache[1, 2:8]
    qc = torch.randn(tokens, h, d, generator=_g(10)).to(device)
    rq, rk = reference.rotary(qc.clone(), kc.clone(), pos)
    rotary(qc, kc, pos, inplace=True)
    torch.testing.assert_close(cache[1, 2:8], rk, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qc, rq, rtol=1e-5, atol=1e-5)
    mask = torch.ones_like(cache, dtype=torch.bool)
    mask[1, 2:8] = False
    assert torch.equal(cache[mask], before[mask])


@pytest.mark.parametrize("frozen", ["q", "k"])
def test_rotary_partial_requires_grad(device, frozen):
    tokens, d = 5, 8
    q = torch.randn(tokens, 2, d, generator=_g(11)).to(device).requires_grad_(frozen != "q")
    k = torch.randn(tokens, 1, d, generator=_g(12)).to(device).requires_grad_(frozen != "k")
    pos = torch.arange(tokens, device=device).flip(0)
    qo, ko = rotary(q, k, pos)
    ((qo if frozen == "k" else ko) * 3).sum().backward()
    live, dead = (q, k) if frozen == "k" else (k, q)
    assert dead.grad is None and live.grad is not None
    ref_live = live.detach().clone().requires_grad_()
    rq, rk = reference.rotary(
        ref_live if frozen == "k" else q.detach(), k.detach() if frozen == "k" else ref_live, pos
    )
    ((rq if frozen == "k" else rk) * 3).sum().backward()
    torch.testing.assert_close(live.grad, ref_live.grad, rtol=1e-5, atol=1e-5)


def test_rotary_strided_positions_fp16_scaling(device):
    tokens, d = 7, 32
    q = torch.randn(tokens, 3, d, generator=_g(13)).to(device, torch.float16)
    k = torch.randn(tokens, 3, 2 * d, generator=_g(14)).to(device, torch.float16)[:, :, ::2]
    pos = torch.randint(0, 50, (tokens, 2), generator=_g(15)).to(device)[:, 1]
    qo, ko = rotary(q, k, pos, 500000.0, 4.0)
    rq, rk = reference.rotary(q, k, pos, 500000.0, 4.0)
    torch.testing.assert_close(qo, rq, rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(ko, rk, rtol=1e-3, atol=2e-3)


# ---------------------------------------------------------------- adamw


def _adam_bufs(n, device, seed=16):
    g = _g(seed)
    p, grad, m = (torch.randn(n, generator=g) for _ in range(3))
    return [t.to(device) for t in (p, grad, m * 0.1, torch.rand(n, generator=g))]


def test_adamw_step1_matches_torch(device):
    p, grad, _, _ = _adam_bufs(37, device)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    tp = torch.nn.Parameter(p.clone())
    opt = torch.optim.AdamW([tp], lr=1e-2, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.1)
    tp.grad = grad.clone()
    opt.step()
    fused_adamw(p, grad, m, v, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.1, step=1)
    torch.testing.assert_close(p, tp.detach(), rtol=1e-6, atol=1e-7)


def test_adamw_lr_zero_leaves_params(device):
    p, grad, m, v = _adam_bufs(33, device)
    p0 = p.clone()
    fused_adamw(p, grad, m, v, lr=0.0, beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.1, step=3)
    assert torch.equal(p, p0)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_adamw_scale_tensor_dtypes_and_paths_agree(device, monkeypatch, scale_dtype):
    """A grad-scale tensor of any float dtype is a number: the kernel path and the reference path
    give the same update."""
    import kernels.adamw as adamw_mod

    res = []
    for path in ("kernel", "reference"):
        if path == "reference":
            monkeypatch.setattr(adamw_mod, "use_triton", lambda t: False)
        p, grad, m, v = _adam_bufs(35, device)
        scale = torch.tensor([0.25], dtype=scale_dtype, device=device)
        fused_adamw(p, grad, m, v, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
                    step=2, grad_scale=scale)  # fmt: skip
        res.append((p, m, v))
    for a, b in zip(*res):
        assert a.dtype == torch.float32 and b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_adamw_nan_in_one_buffer_skips_all(device):
    bufs1, bufs2 = _adam_bufs(40, device, 17), _adam_bufs(24, device, 18)
    bufs2[1][5] = float("nan")
    flag = torch.zeros(1, device=device)
    for b in (bufs1, bufs2):
        found_nonfinite(b[1], flag)
    assert flag.item() == 1.0
    for b in (bufs1, bufs2):
        before = [t.clone() for t in b]
        fused_adamw(*b, **dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.1),
                    step=1, found_inf=flag)  # fmt: skip
        for x, y in zip(before, b):
            assert torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0))


# ---------------------------------------------------------------- tuning table


def _tuned(path):
    from kernels.rmsnorm import FwdConfig

    default = FwdConfig(4, 1)
    return default, tuning.tuned_config(
        "rmsnorm_fwd", "hidden=64", torch.device("cuda", 0), default
    )


def test_good_table_applies(fake_card):
    ops = {"rmsnorm_fwd": {"hidden=64": {"warps": 8}}}
    fake_card.write_text(json.dumps({"card": "NVIDIA Fake", "ops": ops}))
    default, cfg = _tuned(fake_card)
    assert cfg == default._replace(warps=8)


@pytest.mark.parametrize(
    "content",
    [
        b'{"ops": {"rmsnorm_fwd": ',  # truncated JSON
        b"\xff\xfe\x00garbage",  # not even text
        b'{"ops": {"rmsnorm_fwd": [1]}}',  # wrong layout
        b'{"card": "NVIDIA Fake", "ops": {"rmsnorm_fwd": {"hidden=64": {"wraps": 8}}}}',
        b'{"card": "NVIDIA Fake", "ops": {"rmsnorm_fwd": {"hidden=64": {"warps": "8"}}}}',
        b'{"card": "NVIDIA Other", "ops": {"rmsnorm_fwd": {"hidden=64": {"warps": 8}}}}',
        None,  # a directory where the file should be: unreadable
    ],
    ids=["truncated", "binary", "layout", "unknown-param", "bad-type", "other-card", "unreadable"],
)
def test_bad_table_falls_back_with_a_note(fake_card, content):
    if content is None:
        fake_card.mkdir()
    else:
        fake_card.write_bytes(content)
    with pytest.warns(UserWarning, match="nvidia-fake.json") as rec:
        default, cfg = _tuned(fake_card)
    assert cfg == default
    assert "heuristic" in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per problem, not at every launch
        assert _tuned(fake_card)[1] == default


def test_unusable_entry_falls_back(fake_card):
    """Entries of the right types that cannot launch (a warps that is not a power of two; rotary
    tiles that would leave columns unrotated) are skipped with a note, not launched."""
    from kernels import rotary as rot_mod

    ops = {
        "rmsnorm_fwd": {"hidden=64": {"warps": 3}},
        "rotary": {rot_mod.tune_key(4, 2, 16): {"block_d": 4}},
    }
    fake_card.write_text(json.dumps({"card": "NVIDIA Fake", "ops": ops}))
    with pytest.warns(UserWarning, match="warps=3"):
        default, cfg = _tuned(fake_card)
    assert cfg == default
    cuda = torch.device("cuda", 0)
    with pytest.warns(UserWarning, match="block_d >= 8"):
        assert rot_mod._config(4, 2, 16, cuda) == rot_mod._heuristic(4, 2, 16)


# ---------------------------------------------------------------- int32 offsets

# Each case builds views whose offsets within one row (or one program's tokens) pass 2^31
# elements, though the view itself is tiny: a (2, 4) view with column stride ~2^31 / 3 over a
# 4 GiB fp16 buffer. Run in a subprocess: int32 offsets that wrap read outside the buffer and
# can kill the process instead of failing an assertion.
_OVERFLOW_PRELUDE = """
import torch
from kernels import reference
S = 2**31 // 3 + 64  # 3 * S > 2^31, S itself < 2^31 (an int32 stride)
buf = torch.zeros(3 * S + 64, dtype=torch.float16)
def view(shape, strides, seed, offset=0):
    v = buf.as_strided(shape, strides, offset)
    v.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))
    return v
def close(a, b):
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-3, atol=2e-3)
"""

_OVERFLOW_CASES = {
    "rmsnorm": """
from kernels.rmsnorm import rmsnorm
x = view((2, 4), (1, S), 0).requires_grad_()  # a transposed view: columns S apart
w = torch.rand(4, dtype=torch.float16) + 0.5
y = rmsnorm(x, w)
dy = torch.randn(2, 4).half()
(dx,) = torch.autograd.grad(y, x, dy)
xr = x.detach().float().requires_grad_()
yr = reference.rmsnorm(xr, w.float())
(dxr,) = torch.autograd.grad(yr, xr, dy.float())
close(y, yr); close(dx, dxr)
""",
    "swiglu": """
from kernels.swiglu import swiglu
gu = view((2, 4), (1, S), 1).requires_grad_()
out = swiglu(gu)
dout = torch.randn(2, 2).half()
(dgu,) = torch.autograd.grad(out, gu, dout)
gr = gu.detach().float().requires_grad_()
outr = reference.swiglu(gr)
(dgr,) = torch.autograd.grad(outr, gr, dout.float())
close(out, outr); close(dgu, dgr)
""",
    "rotary": """
from kernels.rotary import rotary
# head-major q and k cache: heads S apart, so head 3 starts past 2^31; k beside q
q = view((2, 4, 4), (4, S, 1), 2)
k = view((2, 4, 4), (4, S, 1), 3, offset=8)
pos = torch.tensor([3, 7])
rq, rk = reference.rotary(q.clone(), k.clone(), pos)
qo, ko = rotary(q, k, pos)
close(qo, rq); close(ko, rk)
q2 = q.clone().requires_grad_()
(dq,) = torch.autograd.grad(rotary(q2, k, pos)[0], q2, q)  # dq_out: the head-major view
q3 = q.clone().float().requires_grad_()
(dqr,) = torch.autograd.grad(reference.rotary(q3, k.float(), pos)[0], q3, q.float())
close(dq, dqr)
rotary(q, k, pos, inplace=True)  # in place into the head-major buffers
close(q, rq); close(k, rk)
""",
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(_OVERFLOW_CASES))
def test_offsets_past_2_pow_31_within_a_row(case):
    """Column (or head) offsets past 2^31 inside one row come out right (the launchers rotate or
    normalise a dense copy of such a view), not wrapped around in int32. In the interpreter, in
    a subprocess (a wrapped offset segfaults): the decision to copy is the launchers' Python,
    the same on a GPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        avail = int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo.read_text()).group(1))
        if avail < 8 * 2**20:
            pytest.skip(f"needs 8 GiB of free memory (a 4 GiB buffer), has {avail / 2**20:.1f}")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "TRITON_INTERPRET": "1"}
    code = _OVERFLOW_PRELUDE + _OVERFLOW_CASES[case] + "\nprint('ok')\n"
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), (
        f"rc={res.returncode}\n{res.stderr[-3000:]}"
    )


# ---------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_ce_grad_scalar_upstream_gradient(device, monkeypatch, path):
    """dloss may be one number for every token ((1,) or 0-dim, e.g. the gradient of a sum); the
    kernel reads dloss per row, so it must see it broadcast, not read past its one element. A
    dloss or m/s of another length is refused with a message on both paths."""
    import kernels.cross_entropy as ce_mod

    if path == "reference":
        monkeypatch.setattr(ce_mod, "use_triton", lambda t: False)
    logits = torch.randn(5, 12, generator=_g(20)).to(device)
    labels = torch.tensor([1, 0, 11, 3, 7], device=device)
    m, s, _ = reference.ce_stats(logits, labels, 0, 12)
    want = reference.ce_grad(logits, labels, 0, 12, m, s, torch.full((5,), 2.5, device=device))
    for dloss in (torch.tensor([2.5], device=device), torch.tensor(2.5, device=device)):
        got = ce_mod.ce_grad(logits, labels, 0, 12, m, s, dloss)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="dloss"):
        ce_mod.ce_grad(logits, labels, 0, 12, m, s, torch.ones(4, device=device))
    with pytest.raises(ValueError, match="m and s"):
        ce_mod.ce_grad(logits, labels, 0, 12, m[:1], s[:1], torch.ones(5, device=device))


# ---------------------------------------------------------------- bad shapes, both paths


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_bad_shapes_refused_on_both_paths(device, monkeypatch, path):
    """A weight that only broadcasts (one element, or one per row) and an odd [gate | up] width are
    refused with the same message on the reference path as on the kernel path, not computed."""
    import kernels.rmsnorm as rms_mod
    import kernels.swiglu as swiglu_mod

    if path == "reference":
        monkeypatch.setattr(rms_mod, "use_triton", lambda t: False)
        monkeypatch.setattr(swiglu_mod, "use_triton", lambda t: False)
    x = torch.randn(4, 8, device=device)
    for w in (torch.ones(1, device=device), torch.ones(4, 8, device=device)):
        with pytest.raises(ValueError, match=r"rmsnorm: weight has shape"):
            rms_mod.rmsnorm(x, w)
    for width in (1, 5):
        with pytest.raises(ValueError, match="odd width"):
            swiglu_mod.swiglu(torch.randn(3, width, device=device))
