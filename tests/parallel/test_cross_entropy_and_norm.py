"""Vocab-parallel cross-entropy and argmax versus F.cross_entropy / torch.argmax with masking and
padding, out-of-range labels and token ids raising (TP 1, 2, 4); the global gradient norm with
every gradient 1 equal to sqrt(parameter count of the TP=1 model) at TP 1, 2 and 4."""

import pytest
import torch
import torch.nn.functional as F

from model.config import param_count
from parallel.cross_entropy import argmax, cross_entropy
from parallel.data_parallel import GradBuffer
from parallel.dims import ParallelDims
from parallel.grad_norm import (
    CPU_NORM_CHUNK,
    clip_coefficient,
    global_grad_norm,
    sharded_grad_norm,
    sharded_norm_segments,
)
from parallel.parallelize import parallelize
from tests.parallel._harness import CFG, NORM_CFG, full_model


def test_cross_entropy_tp1_excludes_padding():
    vocab, padded, T = 300, 384, 29
    logits = torch.randn(T, padded, requires_grad=True)
    with torch.no_grad():
        logits[:, vocab:] = 40.0
    labels = torch.randint(0, vocab, (T,))
    mask = (torch.rand(T) < 0.5).float()
    loss = cross_entropy(logits, labels, None, vocab_size=vocab)
    ref_in = logits.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(ref_in[:, :vocab], labels, reduction="none")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    (loss * mask).sum().backward()
    (ref * mask).sum().backward()
    torch.testing.assert_close(logits.grad, ref_in.grad, rtol=1e-5, atol=1e-8)
    assert logits.grad[:, vocab:].abs().max() == 0
    assert torch.equal(argmax(logits.detach(), None, vocab), logits.detach()[:, :vocab].argmax(-1))
    with pytest.raises(ValueError, match="labels must lie in"):
        cross_entropy(logits, torch.full((T,), -100), None, vocab_size=vocab)


def test_cross_entropy_bf16_logits_return_fp32():
    logits = torch.randn(8, 128).bfloat16().requires_grad_(True)
    labels = torch.randint(0, 100, (8,))
    loss = cross_entropy(logits, labels, None, vocab_size=100)
    assert loss.dtype == torch.float32
    ref = F.cross_entropy(logits.float()[:, :100], labels, reduction="none")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    loss.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_embedding_out_of_range_raises_tp1():
    model = parallelize(full_model(), ParallelDims())
    pos, cu = torch.arange(4), torch.tensor([0, 4], dtype=torch.int32)
    model(torch.tensor([0, 1, 2, CFG.vocab_size - 1]), pos, cu, 4)
    for wrong in (CFG.vocab_size, -1):
        with pytest.raises(ValueError, match="outside the model's vocabulary"):
            model(torch.tensor([0, 1, wrong, 3]), pos, cu, 4)


@pytest.mark.slow
@pytest.mark.parametrize("job", ["ce-tp2", "ce-tp4"])
def test_vocab_parallel_cross_entropy(dist_job, job):
    dist_job(job)


def test_grad_norm_all_ones_tp1():
    model = parallelize(full_model(NORM_CFG), ParallelDims())
    params = list(model.parameters())
    GradBuffer(params, None).buffer.fill_(1.0)
    count = param_count(NORM_CFG, NORM_CFG.padded_vocab_size(1))
    assert sum(p.numel() for p in params) == count
    assert global_grad_norm(params) == pytest.approx(count**0.5, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("job", ["norm-tp2", "norm-tp4"])
def test_grad_norm_all_ones(dist_job, job):
    dist_job(job)


def test_clip_coefficient():
    assert clip_coefficient(0.5, 1.0) == 1.0
    assert clip_coefficient(4.0, 1.0) == pytest.approx(0.25, rel=1e-5)
    assert clip_coefficient(float("inf"), 1.0) == 1.0
    assert clip_coefficient(4.0, 0.0) == 1.0


def test_cross_entropy_of_an_unpadded_vocabulary():
    """A vocabulary that needs no padding (Llama-2's 32000 is a multiple of 128): vocab_size
    equal to the width, or None, is every column -- accepted, and the same loss as
    F.cross_entropy; argmax without vocab_size looks at every column too."""
    g = torch.Generator().manual_seed(11)
    logits, labels = torch.randn(9, 64, generator=g) * 3, torch.randint(0, 64, (9,), generator=g)
    want = F.cross_entropy(logits, labels, reduction="none")
    for vocab in (64, None):
        torch.testing.assert_close(cross_entropy(logits, labels, None, vocab), want)
    assert torch.equal(argmax(logits), logits.argmax(-1))


def test_cross_entropy_refuses_what_it_cannot_compute():
    """-1 is out of range as much as -100 (a label of -1 would silently lose its picked logit);
    labels of another length than the logits' rows, and vocab_size 0, are errors naming the
    problem."""
    logits, labels = torch.randn(5, 16), torch.tensor([0, 3, 15, 2, 7])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 16\).*-1\.\.15"):
        cross_entropy(logits, torch.tensor([0, 3, 15, -1, 7]), None, vocab_size=16)
    with pytest.raises(ValueError, match="wants logits"):
        cross_entropy(logits, labels[:4], None, vocab_size=16)
    with pytest.raises(ValueError, match="vocab_size 0 must be in"):
        cross_entropy(logits, labels, None, vocab_size=0)


def test_cross_entropy_of_no_tokens_is_empty():
    """Zero tokens (an empty shard of a batch): an empty loss and gradient, not an error from
    reading the range of no labels."""
    logits = torch.randn(0, 32, requires_grad=True)
    loss = cross_entropy(logits, torch.zeros(0, dtype=torch.long), None, vocab_size=30)
    assert loss.shape == (0,) and loss.dtype == torch.float32
    loss.sum().backward()
    assert logits.grad.shape == (0, 32)


def test_grad_norms_count_replicated_weights_on_tp_rank_0_only():
    """Both norms in one process: a TP-replicated norm weight (`tp_replicated`, the same
    gradient on every TP rank) counts on TP rank 0 and nowhere else, whether it lies between
    sharded weights or at the end of the buffer -- here its gradient is 100, so counted by a
    rank other than 0 the norm would be off by far more than rounding."""
    for tp_rank in (0, 1):
        w1, norm_w = torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(4))
        w2, last = torch.nn.Parameter(torch.zeros(5, 2)), torch.nn.Parameter(torch.zeros(6))
        for p in (norm_w, last):
            p.tp_replicated, p.tp_rank = True, tp_rank
        params = [w1, norm_w, w2, last]
        for sharded in (False, True):
            buf = GradBuffer(params, shard_over_dp=sharded)
            for p, v in zip(params, (1.0, 100.0, 2.0, 100.0)):
                p.main_grad.fill_(v)
            want = (12 * 1.0 + 10 * 4.0 + (0 if tp_rank else 10 * 10_000.0)) ** 0.5
            if sharded:
                got = sharded_grad_norm(sharded_norm_segments(buf))
            else:
                got = global_grad_norm(params)
            assert got == pytest.approx(want, rel=1e-6), (tp_rank, sharded)


def test_a_shard_of_replicated_weights_only_counts_zero():
    """A TP rank other than 0 whose shard holds nothing but TP-replicated norm weights has no
    values to count: the sharded norm is 0 (on the buffer's device), not an error from norming
    an empty list of segments."""
    p = torch.nn.Parameter(torch.zeros(256))
    p.tp_replicated, p.tp_rank = True, 1
    buf = GradBuffer([p], shard_over_dp=True)
    p.main_grad.fill_(3.0)
    assert sharded_grad_norm(sharded_norm_segments(buf)) == 0.0


def test_grad_norms_sum_the_squares_in_fp64():
    """Gradients whose norm is finite but whose squared norm is not in fp32 (> 3.4e38): the
    tensors' (and chunks') norms are summed as squares in fp64, so the norm stays finite -- the
    step is clipped, not skipped as non-finite. (One tensor's or chunk's own norm is torch's
    fp32 kernel, which overflows by itself past 1.8e19: here each holds one large value.)"""
    params = [torch.nn.Parameter(torch.zeros(CPU_NORM_CHUNK)) for _ in range(4)]
    buf = GradBuffer(params, shard_over_dp=True)
    for p in params:
        p.main_grad[7] = 1.5e19  # each square 2.25e38: fp32 holds one, not their sum
    assert len(sharded_norm_segments(buf)) == 4
    for got in (global_grad_norm(params), sharded_grad_norm(sharded_norm_segments(buf))):
        assert got == pytest.approx(3e19, rel=1e-6)


def test_clip_coefficient_adds_megatrons_epsilon_to_the_norm():
    """max_norm / (norm + 1e-6), as Megatron: visible where the norm itself is tiny."""
    assert clip_coefficient(3e-6, 1e-6) == pytest.approx(0.25, rel=1e-9)


def test_grad_norm_of_bf16_grads_without_main_grad_is_taken_in_fp32():
    """Parameters without a GradBuffer's main_grad count their .grad; a bf16 .grad is widened to
    fp32 first, so the norm is not rounded to bf16's 3 significant digits."""
    g = torch.Generator().manual_seed(2)
    params = [torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16)) for n in (300, 7)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).bfloat16()
    want = torch.cat([p.grad.double() for p in params]).norm().item()
    assert global_grad_norm(params) == pytest.approx(want, rel=1e-6)
