"""Rotary kernels against reference.rotary: forward, dq, dk, every dtype, GQA, packed positions,
every launch setting a tuning sweep may pick, and the cos/sin table path."""

import zlib

import pytest
import torch

from kernels import reference, tuning
from kernels import rotary as rot_mod
from kernels.rotary import _rotary_apply, rotary, rotary_cos_sin
from tests.kernels.conftest import (
    ATOL,
    OUT_EDGE,
    assert_close_to_ref,
    frame_intact,
    framed,
    poisoned_empty,
)

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


def _check_fused_grads(leaf, q_out, k_out, q0, k0, dq_out, dk_out, positions, theta, factor):
    """Backward from (q_out, k_out) into `leaf`, the fused (tokens, q | k | v) producer: dq and dk
    land in their columns (checked against the reference), v's columns get no gradient."""
    tokens, heads, head_dim = q0.shape
    kv_heads = k0.shape[1]
    hq, hk = heads * head_dim, kv_heads * head_dim
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
    _check_fused_grads(leaf, q_out, k_out, q0, k0, dq_out, dk_out, positions, theta, factor)


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


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_many_heads_loop(device, monkeypatch, inplace):
    """More heads than one tile holds: the kernel loops over head blocks (shrink the tile to 2),
    8 tokens per program over 37 tokens; in place, each step still loads before it stores."""
    monkeypatch.setattr(rot_mod, "_MAX_TILE", 64)
    case = (6, 3, 64, 10000.0, 1.0)
    cfg = rot_mod._heuristic(6, 3, 64)
    assert (cfg.block_hq, cfg.block_hk, cfg.block_t) == (2, 2, 8)
    q, k, dq_out, dk_out, theta, factor = _case_inputs(case, torch.bfloat16, device)
    positions = _positions(device)
    if inplace:
        q_out, k_out = q.clone(), k.clone()
        _rotary_apply(q_out, k_out, positions, theta, factor, q_out=q_out, k_out=k_out)
    else:
        q_out, k_out = (
            poisoned_empty(*t.shape, dtype=torch.bfloat16, device=device) for t in (q, k)
        )
        _rotary_apply(q, k, positions, theta, factor, q_out=q_out, k_out=k_out)
    _check(("q_out", "k_out"), (q_out, k_out), q, k, dq_out, dk_out, positions, theta, factor)


# Odd small shapes whose heads (3 of 4) and half (12 of 16) leave masked lanes in every tile, and
# two real ones, where the candidates span 1-8 tokens per program: a 70B tensor-parallel shard
# (8 q / 1 kv head) and Llama-3 8B (32 / 8). Few tokens keep the interpreter quick.
SWEEP_SHAPES = [(4, 2, 16), (3, 1, 24), (8, 1, 128), (32, 8, 128)]
SWEEP = [
    pytest.param(shape, cfg, id=f"{shape}-t{cfg.block_t}-w{cfg.warps}")
    for shape in SWEEP_SHAPES
    for cfg in rot_mod.candidates(*shape)
]


@pytest.mark.parametrize("shape,cfg", SWEEP)
def test_candidates(device, shape, cfg):
    """Every setting `bench.tune` may commit is correct: forward and backward, 7 tokens (not a
    multiple of the tokens per program) and 1, into poisoned outputs and in place, on strided
    views of a fused qkv buffer; cos/sin from the table when the setting reads it."""
    heads, kv_heads, head_dim = shape
    theta, factor, dtype = 10000.0, 2.0, torch.bfloat16
    table = rotary_cos_sin(64, head_dim, theta, factor, device)
    for tokens in (7, 1):
        seed = zlib.crc32(f"{shape}{tokens}".encode())
        g = torch.Generator().manual_seed(seed)
        positions = torch.randint(0, 64, (tokens,), generator=g, dtype=torch.int32).to(device)
        _, q, k, _ = _qkv_views(tokens, heads, kv_heads, head_dim, dtype, device, seed)
        _, dq_out, dk_out, _ = _qkv_views(
            tokens, heads, kv_heads, head_dim, dtype, device, seed + 1
        )
        ref32 = _reference(q, k, dq_out, dk_out, positions, theta, factor, upcast=True)
        reflp = _reference(q, k, dq_out, dk_out, positions, theta, factor, upcast=False)
        for backward in (False, True):
            names = ("dq", "dk") if backward else ("q_out", "k_out")
            want32, wantlp = (r[2:] if backward else r[:2] for r in (ref32, reflp))
            for inplace in (False, True):
                # a fresh fused buffer each time: the in-place call overwrites its input
                _, x, y, v = _qkv_views(
                    tokens, heads, kv_heads, head_dim, dtype, device, seed + backward
                )
                v0 = v.clone()
                if inplace:
                    x_out, y_out = x, y
                else:
                    x_out, y_out = (
                        poisoned_empty(*t.shape, dtype=dtype, device=device) for t in (x, y)
                    )
                _rotary_apply(
                    x,
                    y,
                    positions,
                    theta,
                    factor,
                    backward,
                    q_out=x_out,
                    k_out=y_out,
                    cfg=cfg,
                    cos_sin=table,
                )
                assert torch.equal(v, v0), "v changed"
                for name, out, r32, rlp in zip(names, (x_out, y_out), want32, wantlp):
                    where = f"{name} tokens={tokens} {'in place' if inplace else 'out'}"
                    assert_close_to_ref(out, r32, rlp, atol=ATOL[dtype], name=where)


def test_candidate_tiles():
    """The sweep's list: the heuristic first, no duplicates, tiles that do not spill, and
    more tokens per program when a token has few heads (a 70B shard at tensor-parallel 8)."""
    for shape in [(32, 8, 128), (64, 8, 128), (8, 1, 128), (40, 40, 128), (4, 2, 16)]:
        cands = rot_mod.candidates(*shape)
        assert cands[0] == rot_mod._heuristic(*shape)
        assert len(cands) == len(set(cands)) and len(cands) <= 32, (shape, len(cands))
        if shape[2] == 128:
            assert len(cands) >= 10, (shape, len(cands))
        # each setting with cos/sin from the table and computed: the sweep measures both
        assert set(cands) == {c._replace(cached=b) for c in cands for b in (True, False)}
        for c in cands[1:]:  # at most 32 elements per thread per load: no spills on sm_90
            assert c.block_t * max(c.block_hq, c.block_hk) * c.block_d <= 32 * 32 * c.warps
    assert rot_mod._heuristic(32, 8, 128).cached  # the table by default (see kernels/rotary.py)
    assert rot_mod._heuristic(32, 8, 128).block_t == 1
    assert rot_mod._heuristic(8, 1, 128).block_t == 4


def test_config_reads_tuning_table(monkeypatch):
    """`_config` takes the card's table entry (faked here: tables exist only for CUDA devices)
    and skips an entry with an unknown field (a warning; the heuristic runs)."""
    entry = {}

    def lookup(op, key, device, directory=tuning.TUNED_DIR):
        assert (op, key) == ("rotary", "heads=4,kv_heads=2,head_dim=16")
        return entry

    monkeypatch.setattr(tuning, "lookup", lookup)
    cpu = torch.device("cpu")
    heuristic = rot_mod._heuristic(4, 2, 16)
    assert rot_mod._config(4, 2, 16, cpu) == heuristic
    entry.update(block_t=2, warps=4)
    assert rot_mod._config(4, 2, 16, cpu) == heuristic._replace(block_t=2, warps=4)
    entry.update(rows=4)
    with pytest.warns(UserWarning, match="unknown parameter"):
        assert rot_mod._config(4, 2, 16, cpu) == heuristic


def test_bad_launch_settings(device):
    """A table entry whose block_d would not cover head_dim/2 fails instead of rotating half."""
    _, q, k, _ = _qkv_views(3, 4, 2, 16, torch.float32, device, seed=5)
    bad = rot_mod._heuristic(4, 2, 16)._replace(block_d=4)
    with pytest.raises(ValueError, match="block_d >= 8"):
        _rotary_apply(q, k, torch.arange(3, device=device), 10000.0, 1.0, cfg=bad)
    with pytest.raises(ValueError, match="power of two"):
        _rotary_apply(
            q,
            k,
            torch.arange(3, device=device),
            10000.0,
            1.0,
            cfg=bad._replace(block_d=8, block_t=3),
        )


def test_cos_sin_table():
    """Row p of the table is [cos | sin] of position p, the same values as the reference's."""
    positions = torch.tensor([0, 5, 4095, 17])
    table = rotary_cos_sin(4096, 96, 500000.0, 2.5)
    assert table.shape == (4096, 96) and table.dtype == torch.float32
    cos, sin = reference.rotary_cos_sin(positions, 96, 500000.0, 2.5)
    assert torch.equal(table[positions], torch.cat((cos, sin), dim=-1))


def test_shared_cos_sin_table():
    """`cos_sin_table` builds one table per settings and device, which every caller shares; the
    settings' `cached` flag decides whether a passed table is read."""
    a = rot_mod.cos_sin_table(128, 16, 10000.0, 1.0, torch.device("cpu"))
    assert a is rot_mod.cos_sin_table(128, 16, 10000.0, 1.0, torch.device("cpu"))
    assert a is not rot_mod.cos_sin_table(128, 16, 10000.0, 2.0, torch.device("cpu"))
    assert torch.equal(a, rotary_cos_sin(128, 16, 10000.0, 1.0))


def test_table_ignored_when_settings_compute(device):
    """With `cached=False` a passed table is not read: a table of garbage changes nothing."""
    _, q, k, _ = _qkv_views(5, 4, 2, 16, torch.float32, device, seed=9)
    positions = torch.tensor([0, 3, 1, 7, 2], device=device)
    cfg = rot_mod._heuristic(4, 2, 16)._replace(cached=False)
    garbage = torch.full((8, 16), float("nan"), device=device)
    got = _rotary_apply(q, k, positions, 10000.0, 1.0, cfg=cfg, cos_sin=garbage)
    want = _rotary_apply(q, k, positions, 10000.0, 1.0, cfg=cfg)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    read = _rotary_apply(
        q, k, positions, 10000.0, 1.0, cfg=cfg._replace(cached=True), cos_sin=garbage
    )
    assert torch.isnan(read[0]).all()


@pytest.mark.parametrize("case", CASES[1:3], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cos_sin_cache(device, dtype, case):
    """cos/sin read from the table: forward and backward match the reference. In the interpreter
    (no FMA contraction) they are exactly the reference's rotation of the same fp32 values."""
    q, k, dq_out, dk_out, theta, factor = _case_inputs(case, dtype, device)
    positions = _positions(device)
    table = rotary_cos_sin(32, q.shape[2], theta, factor, device)
    outs = []
    for x, y, backward in ((q, k, False), (dq_out, dk_out, True)):
        x_out, y_out = (poisoned_empty(*t.shape, dtype=dtype, device=device) for t in (x, y))
        _rotary_apply(
            x, y, positions, theta, factor, backward, q_out=x_out, k_out=y_out, cos_sin=table
        )
        outs += [x_out, y_out]
    names = ("q_out", "k_out", "dq", "dk")
    _check(names, outs, q, k, dq_out, dk_out, positions, theta, factor)
    if device == "cpu":
        ref32 = _reference(q, k, dq_out, dk_out, positions, theta, factor, upcast=True)
        for name, out, r32 in zip(names, outs, ref32):
            assert torch.equal(out, r32.to(dtype)), name


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_cos_sin_cache_autograd(device, inplace):
    """The table reaches the backward too, through both autograd Functions."""
    heads, kv_heads, head_dim, theta, factor = CASES[1]
    tokens, hq, hk = sum(DOC_LENGTHS), heads * head_dim, kv_heads * head_dim
    qkv0, q0, k0, _ = _qkv_views(tokens, heads, kv_heads, head_dim, torch.bfloat16, device, 47)
    _, dq_out, dk_out, _ = _qkv_views(tokens, heads, kv_heads, head_dim, torch.bfloat16, device, 48)
    leaf = qkv0.clone().requires_grad_()
    fused = leaf * 1.0
    q = fused[:, :hq].view(tokens, heads, head_dim)
    k = fused[:, hq : hq + hk].view(tokens, kv_heads, head_dim)
    positions = _positions(device)
    table = rotary_cos_sin(20, head_dim, theta, factor, device)
    q_out, k_out = rotary(q, k, positions, theta, factor, inplace=inplace, cos_sin=table)
    _check_fused_grads(leaf, q_out, k_out, q0, k0, dq_out, dk_out, positions, theta, factor)


def _bad_tables(device):
    good = rotary_cos_sin(8, 64, device=device)
    return good, (good.to(torch.bfloat16), good[:, :32], good[None], good.double())


def test_cos_sin_cache_errors(device):
    """A table of the wrong dtype or width is a clear error."""
    _, q, k, _ = _qkv_views(5, 2, 1, 64, torch.float32, device, seed=53)
    positions = torch.arange(5, device=device)
    _, bad = _bad_tables(device)
    for table in bad:
        with pytest.raises(
            ValueError, match=r"cos_sin must be an fp32 \(max_positions, head_dim=64\)"
        ):
            rotary(q, k, positions, cos_sin=table)


def test_reference_path_cos_sin(monkeypatch):
    """Without Triton the table is checked the same way, and the result is the reference's (which
    computes the values the table holds)."""
    monkeypatch.setattr(rot_mod, "use_triton", lambda x: False)
    _, q, k, _ = _qkv_views(5, 2, 1, 64, torch.float32, "cpu", seed=53)
    positions = torch.arange(5)
    good, bad = _bad_tables("cpu")
    for table in bad:
        with pytest.raises(
            ValueError, match=r"cos_sin must be an fp32 \(max_positions, head_dim=64\)"
        ):
            rotary(q, k, positions, cos_sin=table)
    want = reference.rotary(q, k, positions)
    got = rotary(q, k, positions, cos_sin=good)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_reference_path_reads_the_table(monkeypatch):
    """Without Triton the table's rows are what rotates, as in the kernel: a table built with other
    settings changes the result, and a position past its end is a clear error, not a silent
    recomputation (the model's table length is then checked on the CPU too)."""
    monkeypatch.setattr(rot_mod, "use_triton", lambda x: False)
    _, q, k, _ = _qkv_views(5, 2, 1, 64, torch.float32, "cpu", seed=59)
    positions = torch.tensor([0, 1, 2, 0, 7])
    other = rotary_cos_sin(8, 64, 500000.0, 2.0)
    want = reference.rotary(q, k, positions, 500000.0, 2.0)
    got = rotary(q, k, positions, cos_sin=other)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    short = rotary_cos_sin(7, 64)
    with pytest.raises(
        ValueError, match=r"index 7 is out of bounds .* the cos_sin table has 7 rows"
    ):
        rotary(q, k, positions, cos_sin=short)


def test_reference_path_inplace(monkeypatch):
    """Without Triton (plain CPU), inplace=True still writes into q and k."""
    monkeypatch.setattr(rot_mod, "use_triton", lambda x: False)
    _, q, k, _ = _qkv_views(5, 2, 1, 64, torch.float32, "cpu", seed=41)
    positions = torch.arange(5)
    want_q, want_k = reference.rotary(q, k, positions)
    q_out, k_out = rotary(q, k, positions, inplace=True)
    assert q_out is q and k_out is k
    assert torch.equal(q, want_q) and torch.equal(k, want_k)


def test_candidates_in_nan_frames_with_a_strided_table(device):
    """q, k and both outputs in NaN frames (conftest.framed: a band after each token's heads, a
    token after the last), 3 of 4 heads per tile and 12 of 16 frequencies: no candidate reads or
    writes outside the tensors. The cos/sin table is a view with column stride 2 whose other
    columns are NaN, so its column stride must be honoured."""
    heads, kv_heads, head_dim = 3, 1, 24
    tokens, theta, factor, dtype = 7, 10000.0, 2.0, torch.float32
    table = torch.full((64, 2 * head_dim), float("nan"), device=device)[:, ::2]
    table.copy_(rotary_cos_sin(64, head_dim, theta, factor, device))
    positions = torch.tensor([5, 0, 1, 2, 63, 3, 9], device=device)
    q, k, *_ = _case_inputs((heads, kv_heads, head_dim, 0, 0), dtype, device)
    q, k = q[:tokens], k[:tokens]

    def frame(t, like=None):  # an input's frame (NaN) when `like` is given, else an output's
        edge = None if like is not None else OUT_EDGE
        buf, view = framed(tokens, t.shape[1] * head_dim, dtype, device, like, edge)
        return buf, view.view(tokens, t.shape[1], head_dim)

    (qb, qv), (kb, kv) = frame(q, q), frame(k, k)
    for cfg in rot_mod.candidates(heads, kv_heads, head_dim):
        (qob, qo), (kob, ko) = frame(q), frame(k)
        _rotary_apply(qv, kv, positions, theta, factor, q_out=qo, k_out=ko, cfg=cfg, cos_sin=table)
        _check(("q_out", "k_out"), (qo, ko), q, k, q, k, positions, theta, factor)
        for buf, t, edge in ((qob, q, OUT_EDGE), (kob, k, OUT_EDGE), (qb, q, None), (kb, k, None)):
            assert frame_intact(buf, tokens, t.shape[1] * head_dim, edge), cfg
