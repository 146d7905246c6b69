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
from tests.kernels.conftest import (
    ATOL,
    OUT_EDGE,
    assert_close_to_ref,
    frame_intact,
    framed,
    poisoned_empty,
)

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


def test_every_tuning_candidate(device):
    """Each setting a tuning sweep may pick gives the same statistics and gradient (a shard that
    several steps cover, with a ragged real end, so pipelined settings loop)."""
    from kernels import cross_entropy as m

    # On CUDA a TP 8 shard of Llama-2's vocabulary: its candidates are the pipelined ones too,
    # and the sweep checks the 32128-column ones against the heuristic on the card itself.
    cpu = device == "cpu"
    tokens, local, valid, start = (6, 3072, 3000, 1000) if cpu else (300, 4016, 3895, 0)
    logits, labels, dloss = _inputs(tokens, local, valid, start, torch.bfloat16, device, seed=5)
    stats_cands, grad_cands = m.candidates_stats(local), m.candidates_grad(local)
    assert any(c.stages > 1 for c in stats_cands) and len(grad_cands) > 2
    want = reference.ce_stats(logits.float(), labels, start, valid)
    for cfg in stats_cands:
        out = tuple(poisoned_empty(tokens, dtype=torch.float32, device=device) for _ in range(3))
        got = ce_stats(logits, labels, start, valid, out=out, cfg=cfg)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=0, msg=lambda e, c=cfg: f"{c}: {e}")
    m_, s_, _ = want
    ref = reference.ce_grad(logits.float(), labels, start, valid, m_, s_, dloss)
    for cfg in grad_cands:
        grad = poisoned_empty(tokens, local, dtype=torch.bfloat16, device=device)
        ce_grad(logits, labels, start, valid, m_, s_, dloss, grad=grad, cfg=cfg)
        torch.testing.assert_close(grad.float(), ref, rtol=1e-2, atol=1e-6)


def test_tuned_table_per_kernel(monkeypatch):
    from kernels import cross_entropy as m
    from kernels import tuning

    entries = {("cross_entropy_stats", "vocab=32128"): {"block": 8192, "warps": 16, "stages": 2}}
    monkeypatch.setattr(tuning, "lookup", lambda op, key, device: entries.get((op, key)))
    cuda = torch.device("cuda", 0)  # only its type is read
    assert m._stats_config(32128, cuda) == m.StatsConfig(8192, 16, 2)
    assert m._grad_config(32128, cuda) == m._grad_heuristic(32128)


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


def test_reference_shards_combine_to_the_full_loss_at_every_shard_edge():
    """The reference itself, without a kernel or a process group: the per-shard statistics of a
    vocabulary split in 3 shards (the last partly padding), combined as the TP all-reduces do,
    give F.cross_entropy, with labels on every shard's first and last column. A label that is
    the next shard's first id must count nowhere but there (`local < valid`): counted twice,
    the loss at TP > 1 would be silently wrong for those tokens."""
    g = torch.Generator().manual_seed(5)
    vocab, local = 10, 4  # shards [0, 4), [4, 8), [8, 10) + 2 padding columns
    labels = torch.tensor([0, 3, 4, 7, 8, 9, 5])
    logits = torch.randn(labels.numel(), 3 * local, generator=g) * 3
    stats = [
        reference.ce_stats(logits[:, r * local : (r + 1) * local], labels, r * local,
                           max(0, min(local, vocab - r * local)))
        for r in range(3)
    ]  # fmt: skip
    m = torch.stack([st[0] for st in stats]).max(dim=0).values
    s = sum(st[1] * torch.exp(st[0] - m) for st in stats)
    picked = sum(st[2] for st in stats)
    want = F.cross_entropy(logits[:, :vocab], labels, reduction="none")
    torch.testing.assert_close(s.log() + m - picked, want)


def test_shard_edges_masked_steps_and_nan_frames(device):
    """Labels on both sides of both edges of the shard [start, start + local), the next shard's
    first id among them (not this shard's: picked 0); rows whose first steps are all -inf (the
    running max stays -inf for a whole step, as under a vocabulary mask); logits and gradient
    in NaN frames (conftest.framed): no read or write past a row, in every candidate and with
    32-column steps."""
    from kernels import cross_entropy as ce_mod

    tokens, local, start = 6, 100, 300
    g = torch.Generator().manual_seed(41)
    logits = torch.randn(tokens, local, generator=g) * 4
    logits[:2, :70] = float("-inf")
    labels = torch.tensor([start + 80, start + local - 1, start - 1, start + local, start, 0])
    dloss = torch.rand(tokens, generator=g) + 0.5
    logits, labels, dloss = logits.to(device), labels.to(device), dloss.to(device)
    frame, view = framed(tokens, local, torch.float32, device, logits)
    rm, rs, rp = reference.ce_stats(logits, labels, start, local)
    for cfg in [*ce_mod.candidates_stats(local), ce_mod.StatsConfig(32, 4)]:
        out = tuple(poisoned_empty(tokens, dtype=torch.float32, device=device) for _ in range(3))
        m, s, picked = ce_stats(view, labels, start, local, out=out, cfg=cfg)
        torch.testing.assert_close(m, rm, rtol=0, atol=0, msg=str(cfg))
        torch.testing.assert_close(s, rs, rtol=1e-5, atol=0, msg=str(cfg))
        torch.testing.assert_close(picked, rp, rtol=0, atol=0, msg=str(cfg))
    want = reference.ce_grad(logits, labels, start, local, rm, rs, dloss)
    for cfg in ce_mod.candidates_grad(local):
        gframe, grad = framed(tokens, local, torch.float32, device, edge=OUT_EDGE)
        ce_grad(view, labels, start, local, rm, rs, dloss, grad=grad, cfg=cfg)
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6, msg=str(cfg))
        assert frame_intact(gframe, tokens, local, OUT_EDGE), cfg
    assert frame_intact(frame, tokens, local)
