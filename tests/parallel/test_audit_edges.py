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
#   memory-tp2     the activation measurement holds a rank's token shard under SP
@pytest.mark.slow
@pytest.mark.parametrize(
    "job", ["align-dp3", "none-group-w3", "ce-edges-tp3", "padding-tp2", "memory-tp2"]
)
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


def test_take_shard_refuses_fewer_rows_than_the_vocabulary():
    p = torch.nn.Parameter(torch.empty(512, 8))
    mark_sharded(p, 0, [(0, 512)], (512, 8), 0)
    p.vocab_rows = 300
    with pytest.raises(ValueError, match="has 299 rows, fewer than vocab_size 300"):
        take_shard(torch.zeros(299, 8), p)


def test_tp1_marks_the_layout_of_any_tp_and_ignores_sequence_parallel():
    """At TP 1 the matrices carry the dim TP would split (rows of wqkv and w13 per segment,
    columns of wo and w2), so a checkpoint's metadata is the same at every TP size."""
    from model.config import ModelConfig
    from model.llama import Llama
    from parallel.dims import ParallelDims
    from parallel.parallelize import parallelize

    cfg = ModelConfig(name="t", vocab_size=100, hidden_size=32, ffn_hidden_size=48, num_layers=1,
                      num_attention_heads=4, num_kv_heads=2)  # fmt: skip
    model = parallelize(Llama(cfg), ParallelDims(), sequence_parallel=True)
    assert model.sequence_parallel is False and model.tp == 1
    block = next(iter(model.layers.values()))
    layout = lambda p: (p.tp_dim, p.tp_pieces)  # noqa: E731
    assert layout(block.attention.wqkv.weight) == (0, [(0, 32), (32, 16), (48, 16)])
    assert layout(block.attention.wo.weight) == (1, [(0, 32)])
    assert layout(block.mlp.w13.weight) == (0, [(0, 48), (48, 48)])
    assert layout(block.mlp.w2.weight) == (1, [(0, 48)])
    assert layout(block.attention_norm.weight) == (None, [])
    assert model.output.weight.vocab_rows == 100 and model.output.weight.tp_dim == 0
