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
from parallel.grad_norm import clip_coefficient, global_grad_norm
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
