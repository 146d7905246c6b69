"""Edge cases of the parallel layer found in an audit: the distributed optimizer's bucket
alignment at an odd DP size, `group=None` in the plain collectives of a multi-rank run, the
padded vocabulary rows (re-padding, and through training at TP 2), and vocab-parallel
cross-entropy on bf16 logits at TP 3 (a rank partly padding, an all-masked micro-batch, argmax
ties across ranks)."""

import pytest
import torch

from parallel.layers import mark_sharded
from parallel.parallelize import take_shard


# Each job (tests/parallel/jobs.py) checks one fix on gloo ranks:
#   align-dp3      sharded buckets are 128-aligned at an odd DP size
#   none-group-w3  group=None never means the world group in the plain collectives
#   ce-edges-tp3   vocab-parallel cross-entropy edges at TP 3 (partial padding, all masked, ties)
#   padding-tp2    padding rows get no gradient and never win argmax, through training
@pytest.mark.slow
@pytest.mark.parametrize("job", ["align-dp3", "none-group-w3", "ce-edges-tp3", "padding-tp2"])
def test_parallel_audit_job(dist_job, job):
    dist_job(job)


@pytest.mark.parametrize("source_rows", [384, 640])  # re-padded up from TP 1, down from TP 5
def test_take_shard_repads_the_vocabulary_with_zero_rows(source_rows):
    """A vocabulary matrix saved at another padding: the real rows are copied and every padding
    row of the result is zero, whatever the source held in its own padding rows (a randomly
    initialised TP=1 model has noise there)."""
    vocab, rows, dim = 300, 512, 8
    full = torch.randn(source_rows, dim, generator=torch.Generator().manual_seed(0))
    for rank in range(2):  # the two halves of a TP 2 model
        p = torch.nn.Parameter(torch.empty(rows // 2, dim))
        mark_sharded(p, 0, [(rank * rows // 2, rows // 2)], (rows, dim), rank)
        p.vocab_rows = vocab
        got = take_shard(full, p)
        real = max(0, min(rows // 2, vocab - rank * rows // 2))
        assert torch.equal(got[:real], full[rank * rows // 2 :][:real])
        assert not got[real:].any(), f"rank {rank}: padding rows copied from the source"
