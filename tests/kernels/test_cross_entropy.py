"""Cross-entropy kernels (kernels/cross_entropy.py) against the reference and F.cross_entropy:
softmax statistics and gradient per vocabulary shard, every dtype, odd and real vocabulary
sizes, shards holding the label or not, a shard of padding only, poisoned outputs; the whole
loss at TP 1 here and at TP 2 and 4 through gloo ranks on the same kernels."""

import pytest
import torch
import torch.nn.functional as F

from kernels import reference
from kernels.cross_entropy import ce_grad, ce_stats
from parallel.cross_entropy import cross_entropy
from tests.kernels.conftest import ATOL, assert_close_to_ref, poisoned_empty

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (tokens, local columns, real columns, shard start): odd sizes; Llama-2's vocabulary padded to
# 32128 at TP 1; a TP 8 shard of it (the last one, partly padding); a shard of padding only.
CASES = [(5, 123, 123, 0), (3, 32128, 32007, 0), (4, 4016, 3895, 7 * 4016), (3, 200, 0, 400)]


def _inputs(tokens, local, valid, start, dtype, device, seed, vocab=32007):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, local, generator=g) * 4
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    if valid:
        labels[0] = start  # at least one label inside this shard
    dloss = torch.rand(tokens, generator=g) + 0.5
    return logits.to(device=device, dtype=dtype), labels.to(device), dloss.to(device)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stats_and_grad(device, dtype, case):
    tokens, local, valid, start = case
    logits, labels, dloss = _inputs(tokens, local, valid, start, dtype, device, seed=local + valid)
    out = tuple(poisoned_empty(tokens, dtype=torch.float32, device=device) for _ in range(3))
    m, s, picked = ce_stats(logits, labels, start, valid, out=out)
    rm, rs, rp = reference.ce_stats(logits.float(), labels, start, valid)
    torch.testing.assert_close(m, rm, rtol=0, atol=0)  # a max of the same values
    torch.testing.assert_close(s, rs, rtol=1e-5, atol=0)
    torch.testing.assert_close(picked, rp, rtol=0, atol=0)
    if valid == 0:
        assert bool((m == float("-inf")).all()) and not s.any() and not picked.any()
        m, s = torch.zeros_like(m), torch.ones_like(s)  # a global max and sum from other ranks
    grad = poisoned_empty(tokens, local, dtype=dtype, device=device)
    ce_grad(logits, labels, start, valid, m, s, dloss, grad=grad)
    g32 = reference.ce_grad(logits.float(), labels, start, valid, m, s, dloss)
    glp = reference.ce_grad(logits, labels, start, valid, m, s, dloss)
    assert grad.dtype == dtype
    assert_close_to_ref(grad, g32, glp, atol=ATOL[dtype], name="grad")
    assert not grad[:, valid:].any()  # padding columns: exactly 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_loss_and_grad_match_f_cross_entropy(device, dtype):
    """The whole loss on the kernels (TP 1, vocabulary padded) against F.cross_entropy on the real
    columns, with large padding logits that must not leak in, and a strided logits view."""
    tokens, vocab, padded = 37, 1000, 1024
    wide = torch.randn(tokens, padded + 8, generator=torch.Generator().manual_seed(3)) * 3
    wide[:, vocab:padded] = 50.0
    logits = wide.to(device=device, dtype=dtype)[:, :padded].requires_grad_()  # row stride 1032
    labels = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(4))
    labels = labels.to(device)
    mask = (torch.arange(tokens, device=device) % 3 != 0).float()
    loss = cross_entropy(logits, labels, vocab_size=vocab)
    (loss * mask).sum().backward()
    ref_in = logits.detach().float()[:, :vocab].requires_grad_()
    ref = F.cross_entropy(ref_in, labels, reduction="none")
    (ref * mask).sum().backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-5)
    want = torch.zeros(tokens, padded, device=device)
    want[:, :vocab] = ref_in.grad
    low = (want.to(dtype) - want).abs().max().item()  # the output dtype's own rounding
    assert (logits.grad.float() - want).abs().max().item() <= 2 * low + ATOL[dtype]


@pytest.mark.slow
def test_vocab_parallel_on_the_kernels(tmp_path):
    """The TP 2 and TP 4 cross-entropy jobs (a rank of padding only at TP 4) on gloo ranks, which
    inherit this run's TRITON_INTERPRET=1 and so run the kernels."""
    from tests.parallel._harness import job_outcome, run_jobs
    from tests.parallel.jobs import JOBS

    for name in ("ce-tp2", "ce-tp4"):
        job = JOBS[name]()
        why = job_outcome(name, str(tmp_path), run_jobs([job], str(tmp_path)))
        assert why is None, why
