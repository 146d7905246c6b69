"""Rank-side bodies of tests/parallel/test_audit_edges.py (run by tests.parallel._harness)."""

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from parallel import comm
from parallel.cross_entropy import argmax, cross_entropy
from parallel.data_parallel import GRAD_ALIGN, GradBuffer
from parallel.dims import ParallelDims
from tests.parallel._harness import assert_close


def sharded_alignment_worker(dims: ParallelDims) -> None:
    """The distributed optimizer's buckets at an odd DP size: every bucket and every DP piece
    starts on a GRAD_ALIGN-element boundary, in `buffer` and in `local_grad`, and the
    reduce-scatter still leaves the DP sum of each rank's own gradients in `local_grad`."""
    g, dp, r = dims.dp_group, dims.dp, dims.dp_rank
    # odd sizes whose bucket sums are no multiple of anything: 7 x 13, 5, 17 x 3, 11, 9 x 29
    shapes = [(7, 13), (5,), (17, 3), (11,), (9, 29), (3,)]
    params = [nn.Parameter(torch.zeros(s)) for s in shapes]
    buf = GradBuffer(params, g, bucket_mb=50 * 4 / 2**20, shard_over_dp=True)
    assert buf.num_buckets >= 3, buf.num_buckets
    pieces = buf.bucket_pieces()
    for start, end, first, local, n in pieces:
        assert (end - start) % (GRAD_ALIGN * dp) == 0, (start, end)
        assert start % GRAD_ALIGN == 0 and first % GRAD_ALIGN == 0, (start, first)
        assert local % GRAD_ALIGN == 0 and n % GRAD_ALIGN == 0, (local, n)
        assert n * dp == end - start and first == start + r * n
    # the parameters stay inside their bucket's range, the padding after them
    for p in params:
        off = buf.offset(p)
        assert any(s <= off and off + p.numel() <= e for s, e, *_ in pieces), off
    gen = torch.Generator().manual_seed(100 + r)  # each rank its own contribution
    buf.zero()
    for p in params:
        p.main_grad.copy_(torch.randn(p.shape, generator=gen))
    mine = buf.buffer.clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        buf.finish()
    # the deprecated torch.distributed *_tensor collectives warn on every rank
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], caught[0].message
    every = comm.all_gather_dim0(mine.unsqueeze(0), g).sum(0)
    for _, _, first, local, n in pieces:
        got = buf.local_grad[local : local + n]
        assert_close(f"piece at {first}", got, every[first : first + n], 1e-6, atol=1e-7)
    for p in params:
        where = buf.shard_slice(p)
        if where is not None:
            lo, hi, at = where
            want = every[buf.offset(p) + at : buf.offset(p) + at + hi - lo]
            assert_close("shard_slice", buf.local_grad[lo:hi], want, 1e-6, atol=1e-7)


def cross_entropy_edges_worker(dims: ParallelDims) -> None:
    """Vocab-parallel CE on bf16 logits (fp32 math, fp32 loss, bf16 gradient) against
    F.cross_entropy on the same values upcast, with a TP rank holding padding only; an
    all-masked micro-batch gives zero (not NaN) gradients; argmax ties across ranks go to the
    lowest id and padding columns never win, even when every real logit is very negative."""
    g, n, r = dims.tp_group, dims.tp, dims.tp_rank
    vocab, local_vocab, T = 131 * n - 67, 131, 23  # the last rank: 64 real columns of 131
    padded = local_vocab * n
    gen = torch.Generator().manual_seed(11)
    full = (torch.randn(T, padded, generator=gen) * 6).bfloat16()
    full[:, vocab:] = 80.0  # padding logits: must not reach the softmax
    labels = torch.randint(0, vocab, (T,), generator=gen)
    labels[:3] = torch.tensor([0, vocab - 1, local_vocab])  # first, last, a shard boundary
    cols = slice(r * local_vocab, (r + 1) * local_vocab)
    mask = (torch.rand(T, generator=gen) < 0.5).float()

    ref_in = full.float().requires_grad_(True)
    ref = F.cross_entropy(ref_in[:, :vocab], labels, reduction="none")
    (ref * mask).sum().backward()
    local = full[:, cols].clone().requires_grad_(True)
    loss = cross_entropy(local, labels, g, vocab_size=vocab)
    assert loss.dtype == torch.float32
    assert_close("bf16 CE", loss.detach(), ref.detach(), 2e-6, atol=2e-6)
    (loss * mask).sum().backward()
    assert local.grad.dtype == torch.bfloat16
    # the gradient is rounded to bf16 once: within half a bf16 ulp of the fp32 one
    want = ref_in.grad[:, cols]
    assert_close("bf16 CE grad", local.grad.float(), want, 2**-8, atol=1e-30)
    if r == n - 1:
        assert local.grad[:, vocab - r * local_vocab :].abs().max() == 0

    local = full[:, cols].clone().requires_grad_(True)
    (cross_entropy(local, labels, g, vocab_size=vocab) * torch.zeros(T)).sum().backward()
    assert torch.isfinite(local.grad).all() and local.grad.abs().max() == 0

    tie = torch.full((4, padded), -1e30)
    tie[:, vocab:] = 0.0  # padding above every real logit
    tie[:, local_vocab + 5] = -1.0
    tie[:, 5] = -1.0  # the same value on rank 0 (id 5) and rank 1 (id local_vocab + 5)
    got = argmax(tie[:, cols], g, vocab)
    assert got.tolist() == [5] * 4, got


def padding_rows_worker(dims: ParallelDims) -> None:
    """The padded vocabulary (300 real rows of 512 at TP 2) after a training backward, with and
    without SP, fused weight gradients and not: the padding rows of the embedding and of the
    output head get exactly zero gradient and stay exactly zero through AdamW steps, and the
    padding logits are zero, never the argmax."""
    from tests.parallel._harness import CFG, STEPS, Trainer, build, microbatch

    vocab, tp, r = CFG.vocab_size, dims.tp, dims.tp_rank
    for sp, fuse in ((False, False), (True, True)):
        model = build(dims, sp)
        trainer = Trainer(model, dims, fuse=fuse)
        for s in range(STEPS // 2):
            trainer.step([microbatch(s, i) for i in range(2)])
            for p in (model.embed.weight, model.output.weight):
                rows = p.shape[0]  # 256: rank 0 all real, rank 1 rows 256..299 real, 212 padding
                pad = slice(min(rows, max(0, vocab - r * rows)), rows)
                assert pad.stop - pad.start == (212 if r == 1 else 0)
                assert not p.main_grad[pad].any(), f"sp={sp} step {s}: padding grad"
                assert not p[pad].any(), f"sp={sp} step {s}: padding rows moved"
                assert p.main_grad[: pad.start].any()  # the real rows do learn
        mb = microbatch(99, 0)
        with torch.no_grad():
            logits = model(mb["tokens"], mb["position_ids"], mb["cu_seqlens"], mb["max_seqlen"])
        local = logits.shape[1]
        assert local * tp == CFG.padded_vocab_size(tp)
        assert not logits[:, min(local, max(0, vocab - r * local)) :].any()
        assert int(argmax(logits, dims.tp_group, vocab).max()) < vocab


def none_group_worker(dims: ParallelDims) -> None:
    """group=None means "no parallelism" in parallel.comm (what ParallelDims holds at size 1),
    also for the plain collectives, in a process group of 3 ranks: the input comes back as it
    is, never gathered or reduced over the default (world) group."""
    x = torch.arange(6.0).reshape(3, 2) + 10 * dims.rank
    for fn in (comm.all_gather_dim0, comm.reduce_scatter_dim0):
        assert torch.equal(fn(x, None), x), fn.__name__
        out, work = fn(x, None, async_op=True)
        assert work is None and torch.equal(out, x), fn.__name__
    t = x.clone()
    assert torch.equal(comm.all_reduce_sum(t, None), x)


def activation_memory_worker(dims: ParallelDims) -> None:
    """train.memory's measurement on a TP 2 rank: with sequence parallelism the residual stream
    a rank holds (and a fully recomputed block keeps) is its token shard, without it every
    token; and sequence parallelism shrinks what a stored block keeps."""
    from tests.parallel._harness import CFG, build
    from train.memory import saved_bytes

    tokens, h = 64, CFG.hidden_size
    stored = {}
    for sp in (False, True):
        block = next(iter(build(dims, sp).layers.values()))
        held = tokens // dims.tp if sp else tokens
        # hidden states (fp32), positions (int64), cu_seqlens (3 x int32)
        full = saved_bytes(block, tokens, "full", "cpu", torch.float32, dims.tp, sp)
        assert full == held * h * 4 + tokens * 8 + 3 * 4, (sp, full)
        stored[sp] = saved_bytes(block, tokens, "none", "cpu", torch.float32, dims.tp, sp)
    assert stored[True] < stored[False], stored
