"""Flash attention kernels (kernels/attention.py) against kernels.reference.attention.

Pass rule (flash-attention's): the kernel's max error against an accurate reference is at most
twice the error of the same reference computed in the input dtype, plus ATOL[dtype]. The accurate
reference is the fp32 upcast for fp16/bf16 inputs and fp64 for fp32 inputs (an fp32 reference
against itself would make the allowance exactly zero). Checked: out, LSE, dQ, dK, dV. Every
buffer the kernels write is NaN-filled first; inputs are fresh random draws (seed printed).
On CPU the kernels run in the Triton interpreter (fp32, fp16; bf16 `tl.dot` is wrong there,
triton-lang/triton#11584); bf16 and the long shapes run on CUDA only (`gpu` marker).
"""

import math
import os

import pytest
import torch

import kernels.attention as attn
from kernels import reference
from kernels.attention import attention, attention_padded
from tests.kernels.conftest import ATOL, OUT_EDGE, assert_close_to_ref, poisoned_empty

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """NaN-fill every output and scratch buffer (out, lse, delta, dq, dk, dv) before the kernels
    run, so an element they fail to write shows up as a non-finite value."""
    monkeypatch.setattr(
        attn,
        "_empty",
        lambda shape, dtype, device: poisoned_empty(*shape, dtype=dtype, device=device),
    )


@pytest.fixture
def seed() -> int:
    s = int.from_bytes(os.urandom(4), "little")
    print(f"seed {s}")  # shown by pytest on failure, to replay a draw
    torch.manual_seed(s)
    return s


def _skip_unsupported(device: str, dtype: torch.dtype) -> None:
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 tl.dot is wrong in the Triton interpreter (triton-lang/triton#11584)")


def _cu(lens: list[int], device: str) -> torch.Tensor:
    bounds = [0]
    for n in lens:
        bounds.append(bounds[-1] + n)
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def _inputs(tokens, heads, kv_heads, head_dim, dtype, device):
    q = torch.randn(tokens, heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    return q, k, v


def _reference(q, k, v, do, cu, scale, accurate: bool):
    """(out, lse, dq, dk, dv) of the reference: accurate (fp32 upcast, fp64 for fp32 inputs) or in
    the inputs' own dtype (the low-precision baseline)."""
    if accurate:
        ref_dtype = torch.float64 if q.dtype == torch.float32 else torch.float32
    else:
        ref_dtype = q.dtype
    leaves = [x.detach().to(ref_dtype).requires_grad_() for x in (q, k, v)]
    out, lse = reference.attention(*leaves, cu, None, scale, upcast=False, return_lse=True)
    out.backward(do.to(ref_dtype))
    return out.detach(), lse.detach(), *(x.grad for x in leaves)


def _check_against_reference(q, k, v, cu, max_seqlen, scale=None):
    """Run the kernels forward and backward on (q, k, v) and compare all five results."""
    dtype = q.dtype
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = attention(*leaves, cu, max_seqlen, softmax_scale=scale, return_lse=True)
    do = torch.randn_like(out)
    out.backward(do)
    ours = (out, lse, *(x.grad for x in leaves))
    ref = _reference(q, k, v, do, cu, scale, accurate=True)
    lowp = _reference(q, k, v, do, cu, scale, accurate=False)
    for name, a, r, lp in zip(("out", "lse", "dq", "dk", "dv"), ours, ref, lowp):
        # The atol term scales with the result's magnitude: fp32 rounding is relative, and dK/dV
        # of a GQA group sum over its heads (|dv| ~ 10 at ratio 8), where the exp2 recomputation
        # of P from the saved LSE costs a few fp32 ulps more than PyTorch's one-pass softmax.
        atol = ATOL[dtype] * max(1.0, r.abs().max().item())
        assert_close_to_ref(a, r, lp, atol=atol, name=name)
    return ours


# GQA ratios 1, 4 and 8.
GQA = [pytest.param(2, 2, id="mha"), pytest.param(4, 1, id="gqa4"), pytest.param(8, 1, id="gqa8")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", GQA)
def test_packed_documents(device, dtype, heads, kv_heads, seed):
    """Documents of lengths 1, 17, 64, 200 and a longer odd one, packed, in a shuffled order so
    tiny documents fall inside blocks, at block edges and next to long ones."""
    _skip_unsupported(device, dtype)
    lens = [200, 1, 17, 301, 64]
    q, k, v = _inputs(sum(lens), heads, kv_heads, 32, dtype, device)
    _check_against_reference(q, k, v, _cu(lens, device), max(lens))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [16, 48, 64, 128])
def test_head_dims(device, dtype, head_dim, seed):
    """Head dims 16..128 (48: not a power of two, so the column mask path runs)."""
    _skip_unsupported(device, dtype)
    if device == "cuda" and dtype != torch.bfloat16:
        pytest.skip("on CUDA bf16 covers the head dims (each dtype x dim is a compile)")
    lens = [37, 90]
    q, k, v = _inputs(sum(lens), 4, 2, head_dim, dtype, device)
    _check_against_reference(q, k, v, _cu(lens, device), max(lens))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_softmax_scale_single_document(device, dtype, seed):
    lens = [133]
    q, k, v = _inputs(133, 2, 1, 32, dtype, device)
    _check_against_reference(q, k, v, _cu(lens, device), 133, scale=0.3)


def test_tiny_and_empty_documents(device, seed):
    """Length-1 documents only, and zero-length documents anywhere in cu_seqlens."""
    q, k, v = _inputs(5, 2, 1, 16, torch.float32, device)
    _check_against_reference(q, k, v, _cu([1, 1, 1, 1, 1], device), 1)
    q, k, v = _inputs(50, 2, 1, 16, torch.float32, device)
    _check_against_reference(q, k, v, _cu([0, 3, 0, 40, 7, 0], device), 40)


def test_document_starts_per_token(device):
    """`_doc_starts`: every token's document start, with empty documents anywhere and more tokens
    than one program covers."""
    lens = [0, 3, 0, 1, 90, 0, 7, 60, 0]
    start = attn._doc_starts(_cu(lens, device), sum(lens))
    real = torch.tensor([n for n in lens if n])
    firsts = torch.cumsum(real, 0) - real
    assert start.dtype == torch.int32
    assert torch.equal(start.cpu().long(), torch.repeat_interleave(firsts, real))


def test_padded_layout(device, seed):
    """(batch, seq, heads, head_dim), each row its own causal sequence; lse (batch, heads, seq)."""
    batch, seq, heads, kv_heads, head_dim = 3, 45, 4, 2, 32
    q = torch.randn(batch, seq, heads, head_dim, device=device)
    k = torch.randn(batch, seq, kv_heads, head_dim, device=device)
    v = torch.randn(batch, seq, kv_heads, head_dim, device=device)
    out, lse = attention_padded(q, k, v, return_lse=True)
    assert out.shape == (batch, seq, heads, head_dim) and lse.shape == (batch, heads, seq)
    scale = 1.0 / math.sqrt(head_dim)
    for b in range(batch):
        cu = _cu([seq], device)
        ref = reference.attention(
            q[b].double(), k[b].double(), v[b].double(), cu, seq, scale, return_lse=True
        )
        low = reference.attention(q[b], k[b], v[b], cu, seq, scale, upcast=False, return_lse=True)
        assert_close_to_ref(out[b], ref[0], low[0], atol=ATOL[torch.float32], name=f"out[{b}]")
        assert_close_to_ref(lse[b], ref[1], low[1], atol=ATOL[torch.float32], name=f"lse[{b}]")


def test_fused_qkv_views_as_in_model(device, seed):
    """model/llama.py's call: q, k, v are non-contiguous views split out of the fused qkv
    projection (tokens, (heads + 2 kv_heads) * head_dim); the output reshapes to
    (tokens, heads * head_dim) and the gradient reaches the fused tensor."""
    heads, kv_heads, head_dim = 4, 2, 32
    lens = [70, 1, 58]
    tokens = sum(lens)
    cu = _cu(lens, device)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=device, requires_grad=True)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.view(-1, heads, head_dim)  # (T, nh, hd), row stride (heads + 2 kv_heads) * hd
    k = k.view(-1, kv_heads, head_dim)
    v = v.view(-1, kv_heads, head_dim)
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    out = attention(q, k, v, cu, max(lens))
    flat = out.reshape(tokens, heads * head_dim)
    assert flat.data_ptr() == out.data_ptr()  # a view: no copy on the model's hot path
    do = torch.randn_like(flat)
    flat.backward(do)

    ref_qkv = qkv.detach().double().requires_grad_()
    rq, rk, rv = ref_qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    rq, rk, rv = (x.reshape(tokens, -1, head_dim) for x in (rq, rk, rv))
    ref = reference.attention(rq, rk, rv, cu, max(lens)).reshape(tokens, -1)
    ref.backward(do.double())
    low_qkv = qkv.detach().clone().requires_grad_()
    lq, lk, lv = low_qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    lq, lk, lv = (x.reshape(tokens, -1, head_dim) for x in (lq, lk, lv))
    low = reference.attention(lq, lk, lv, cu, max(lens), upcast=False).reshape(tokens, -1)
    low.backward(do)
    assert_close_to_ref(flat, ref, low, atol=ATOL[torch.float32], name="out")
    assert_close_to_ref(qkv.grad, ref_qkv.grad, low_qkv.grad, atol=ATOL[torch.float32], name="dqkv")


def test_backward_is_deterministic(device, seed):
    """No atomics: two backward passes on the same inputs give bitwise equal gradients."""
    lens = [90, 3, 40]
    q, k, v = _inputs(sum(lens), 4, 1, 32, torch.float16, device)
    cu = _cu(lens, device)
    do = torch.randn(sum(lens), 4, 32, dtype=torch.float16, device=device)
    grads = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        attention(*leaves, cu, max(lens)).backward(do)
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_backward_launches_reproduce_the_backward(device, seed, monkeypatch):
    """bench_attention times the backward's two kernels apart (`backward_launches`): each
    launch alone gives its share of the autograd backward bit for bit, and delta is
    rowsum(dO * O) per head."""
    lens = [70, 1, 33]
    q, k, v = _inputs(sum(lens), 4, 2, 32, torch.float16, device)
    cu = _cu(lens, device)
    do = torch.randn(sum(lens), 4, 32, dtype=torch.float16, device=device)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = attention(*leaves, cu, max(lens))
    out.backward(do)
    dq_launch, dkdv_launch = attn.backward_launches(q, k, v, cu, max(lens), do)
    dk, dv = dkdv_launch()  # first: it reads the delta of backward_launches' own dQ launch
    dq, delta = dq_launch()
    for got, want in zip((dq, dk, dv), (x.grad for x in leaves)):
        assert torch.equal(got, want)
    want_delta = (do.float() * out.detach().float()).sum(-1).T
    torch.testing.assert_close(delta, want_delta, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="dout shaped like q"):
        attn.backward_launches(q, k, v, cu, max(lens), do[:, :2])
    with pytest.raises(ValueError, match="backward_launches: dout is torch.float32"):
        attn.backward_launches(q, k, v, cu, max(lens), do.float())
    monkeypatch.setattr(attn, "use_triton", lambda x: False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        attn.backward_launches(q, k, v, cu, max(lens), do)


def test_rejects_bad_input(device):
    cu = _cu([8], device)
    q = torch.randn(8, 2, 24, device=device)
    with pytest.raises(ValueError, match="head_dim must be a multiple of 16"):
        attention(q, q[:, :1], q[:, :1], cu, 8)
    q = torch.randn(8, 3, 32, device=device)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        attention(q, q[:, :2], q[:, :2], cu, 8)


# Long shapes: CUDA only (the interpreter would take minutes).


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "lens",
    [
        pytest.param([2048], id="seq2k"),
        pytest.param([4096], id="seq4k"),
        pytest.param([1, 17, 64, 200, 1500, 2314], id="packed4k"),
    ],
)
def test_long_sequences_cuda(dtype, lens, seed):
    q, k, v = _inputs(sum(lens), 16, 2, 128, dtype, "cuda")
    _check_against_reference(q, k, v, _cu(lens, "cuda"), max(lens))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_padded_long_cuda(seed):
    """attention_padded at batch 2 x 2048, d=128, bf16, against SDPA's flash backend."""
    q = torch.randn(2, 2048, 16, 128, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(2, 2048, 4, 128, dtype=torch.bfloat16, device="cuda")
    v = torch.randn(2, 2048, 4, 128, dtype=torch.bfloat16, device="cuda")
    out = attention_padded(q, k, v)
    t = lambda x: x.transpose(1, 2).float()
    ref = torch.nn.functional.scaled_dot_product_attention(
        t(q), t(k).repeat_interleave(4, 1), t(v).repeat_interleave(4, 1), is_causal=True
    ).transpose(1, 2)
    low = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2).repeat_interleave(4, 1),
        v.transpose(1, 2).repeat_interleave(4, 1),
        is_causal=True,
    ).transpose(1, 2)
    assert_close_to_ref(out, ref, low, atol=ATOL[torch.bfloat16], name="out")


def _force(monkeypatch, specs: dict):
    """Run the kinds named in `specs` with those (BLOCK_M, BLOCK_N, warps, stages), the rest
    with their usual fixed settings (never autotune: a test must know what ran)."""
    usual = attn._fixed_spec

    def fixed(kind, dclass, bucket):
        return specs.get(kind) or usual(kind, dclass, 0)

    monkeypatch.setattr(attn, "_fixed_spec", fixed)


@pytest.mark.skipif(not attn.INTERPRET, reason="interpreter test; on CUDA: every_candidate")
def test_dkdv_sixteen_query_steps(monkeypatch, seed):
    """The spill-free d=128 dK/dV setting steps 16 queries at a time under 128-key blocks: eight
    masked diagonal steps per block, documents ending inside a step. (On CUDA the same block
    shapes run in test_every_candidate_cuda.)"""
    _force(monkeypatch, {"dkdv": (16, 128, 4, 1)})
    lens = [150, 1, 17, 90]
    q, k, v = _inputs(sum(lens), 4, 1, 32, torch.float32, "cpu")
    _check_against_reference(q, k, v, _cu(lens, "cpu"), max(lens))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["fwd", "dq", "dkdv"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(
    "lens",
    [
        pytest.param([1, 17, 64, 200, 1500, 2314], id="4096"),  # the last block ends at the end
        pytest.param([1, 17, 64, 200, 1500, 2314, 37], id="4133"),  # every last block is ragged
    ],
)
def test_every_candidate_cuda(kind, head_dim, lens, monkeypatch, seed):
    """Autotuning may pick any candidate on long sequences: each one is right in bf16 on a packed
    batch with documents of 1 to 2314 tokens, and stores nothing past the end of a buffer."""
    q, k, v = _inputs(sum(lens), 8, 2, head_dim, torch.bfloat16, "cuda")
    dclass = 64 if head_dim <= 64 else 128
    guarded = _guard_writes(monkeypatch)
    for spec in attn._CANDIDATES[kind][dclass]:
        _force(monkeypatch, {kind: spec})
        _check_against_reference(q, k, v, _cu(lens, "cuda"), max(lens))
        _assert_no_write_past(guarded, spec)


@pytest.mark.parametrize("lens", [[2, 157, 31, 97], [1, 94, 33, 126]], ids=str)
def test_document_edges_off_the_block_grid(device, lens, seed):
    """Documents starting and ending one or two tokens past a key or query block edge (starts
    1, 2; ends 159, 287, 95 = -1 mod 32), long enough that blocks inside them take the unmasked
    path: the last unmasked key block must end at the diagonal, and a key block's unmasked
    queries at its document's end, exactly."""
    q, k, v = _inputs(sum(lens), 2, 1, 32, torch.float32, device)
    _check_against_reference(q, k, v, _cu(lens, device), max(lens))


def test_scores_far_below_zero(device, seed):
    """Every key scores about -360 (-520 in log2 units) against every query: the online softmax
    must shift by the running row max, not by a fixed start of 0 (exp2 would underflow to 0/0)."""
    tokens, head_dim = 100, 32
    u = torch.randn(head_dim, device=device)
    u = 6.0 * u / u.norm()
    q = u + 0.05 * torch.randn(tokens, 2, head_dim, device=device)
    k = -u + 0.05 * torch.randn(tokens, 1, head_dim, device=device)
    v = torch.randn(tokens, 1, head_dim, device=device)
    cu = _cu([60, 40], device)
    # Forward only: at |scores| ~ 360 the backward's recomputation of P from the saved LSE is
    # ill-conditioned in fp32 (relative error ~ |LSE| * eps), beyond the pass rule's allowance.
    out, lse = attention(q, k, v, cu, 60, softmax_scale=10.0, return_lse=True)
    do = torch.zeros_like(out)
    ref = _reference(q, k, v, do, cu, 10.0, accurate=True)
    lowp = _reference(q, k, v, do, cu, 10.0, accurate=False)
    for name, a, r, lp in zip(("out", "lse"), (out, lse), ref, lowp):
        atol = ATOL[torch.float32] * max(1.0, r.abs().max().item())
        assert_close_to_ref(a, r, lp, atol=atol, name=name)


def _guard_writes(monkeypatch) -> list:
    """Make every buffer the kernels write (row starts, out, lse, delta, dq, dk, dv) the front of
    a longer allocation whose rest holds a sentinel; `_assert_no_write_past` then checks that
    rest. (A store past the end can land in a tensor the caching allocator placed next to it.)
    The guard is as long as the buffer plus 4096 elements: no block runs further past the end.
    Returns the list the (allocation, length) pairs are appended to."""
    guarded = []

    def empty(shape, dtype, device):
        n = math.prod(shape)
        buf = poisoned_empty(2 * n + 4096, dtype=dtype, device=device)
        buf[n:] = OUT_EDGE if dtype.is_floating_point else 777
        guarded.append((buf, n))
        return buf[:n].view(shape)

    monkeypatch.setattr(attn, "_empty", empty)
    return guarded


def _assert_no_write_past(guarded: list, what: object = "") -> None:
    assert len(guarded) >= 7, f"{len(guarded)} guarded buffers: the kernels did not all run"
    for buf, n in guarded:
        sentinel = OUT_EDGE if buf.is_floating_point() else 777
        assert (buf[n:] == sentinel).all(), (
            f"a store past the end of a {buf.dtype} buffer of {n} {what}"
        )
    guarded.clear()


def test_no_write_past_any_buffer(device, monkeypatch, seed):
    """Nothing is stored past the end of any buffer the kernels write, even where a kernel
    stores NaN (see _guard_writes); on CUDA every autotune candidate is checked the same way in
    test_every_candidate_cuda."""
    guarded = _guard_writes(monkeypatch)
    lens = [37, 1, 93]  # 131 tokens: the last block of every kernel runs past the end
    q, k, v = _inputs(sum(lens), 4, 2, 48, torch.float32, device)
    _check_against_reference(q, k, v, _cu(lens, device), max(lens))
    _assert_no_write_past(guarded)
