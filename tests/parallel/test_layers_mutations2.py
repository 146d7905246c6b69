"""More gaps found by mutation testing of parallel/layers.py, checked in one process: the layout
each layer marks on its weight (shape, pieces, global shape, rank) at a TP rank other than 0,
the argument checks, the sequence-parallel flag, the vocab-parallel embedding's masking of ids
other ranks own, the token-id check, and the layers at TP 1.

The layers are only built at TP > 1 (parallelize leaves a TP 1 model alone), so the multi-process
tests were the only ones to reach them. Here `group_size` / `group_rank` as parallel.layers sees
them are replaced to fake rank 2 of a TP group of 4, and the embedding's final reduction by a
stand-in that returns this rank's partial lookup."""

import pytest
import torch
import torch.nn.functional as F

import parallel.layers as layers
from parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    check_token_ids,
    mark_sharded,
)

GROUP = object()  # stands in for a TP process group of 4
TP, RANK = 4, 2


@pytest.fixture
def rank2(monkeypatch):
    """parallel.layers sees rank 2 of 4 for GROUP; the embedding's reductions return their input
    and record which one ran."""
    monkeypatch.setattr(layers, "group_size", lambda g: TP if g is GROUP else 1)
    monkeypatch.setattr(layers, "group_rank", lambda g: RANK if g is GROUP else 0)
    calls = []

    def reduce(kind):
        def fn(x, group):
            calls.append((kind, group))
            return x

        return fn

    monkeypatch.setattr(layers, "reduce_from_tp", reduce("all-reduce"))
    monkeypatch.setattr(layers, "reduce_scatter_to_sp", reduce("reduce-scatter"))
    return calls


def _layout(p) -> tuple:
    return p.tp_dim, p.tp_pieces, p.global_shape, p.tp_rank, p.tp_replicated


def test_mark_sharded_stores_tuples_and_replication():
    """Pieces become tuples whatever sequence they came as (JSON gives lists); a weight without
    a TP dim is replicated."""
    p = torch.nn.Parameter(torch.zeros(2, 3))
    mark_sharded(p, 0, [[4, 2]], [8, 3], 1)
    assert _layout(p) == (0, [(4, 2)], (8, 3), 1, False)
    mark_sharded(p, None, [], torch.Size([2, 3]), 3)
    assert _layout(p) == (None, [], (2, 3), 3, True)


def test_column_parallel_takes_rank_2s_share_of_every_segment(rank2):
    """[q | k | v] = [16 | 8 | 8] over 4 ranks: rank 2 holds q rows 8..11, k rows 20..21 and v
    rows 28..29 of the full 32, fused locally in that order."""
    layer = ColumnParallelLinear(6, [16, 8, 8], GROUP)
    assert layer.weight.shape == (8, 6)
    assert _layout(layer.weight) == (0, [(8, 4), (20, 2), (28, 2)], (32, 6), RANK, False)


def test_row_parallel_takes_rank_2s_input_columns(rank2):
    layer = RowParallelLinear(16, 6, GROUP)
    assert layer.weight.shape == (6, 4)
    assert _layout(layer.weight) == (1, [(8, 4)], (6, 16), RANK, False)


def test_vocab_parallel_embedding_takes_rank_2s_rows(rank2):
    emb = VocabParallelEmbedding(16, 3, 14, GROUP)
    assert emb.weight.shape == (4, 3) and emb.start == 8
    assert _layout(emb.weight) == (0, [(8, 4)], (16, 3), RANK, False)
    assert emb.weight.vocab_rows == 14  # the real vocabulary, not the padded rows


def test_sizes_that_do_not_split_over_tp_are_refused(rank2):
    with pytest.raises(ValueError, match="output segment 6 is not divisible by the TP size 4"):
        ColumnParallelLinear(6, [16, 6, 6], GROUP)
    with pytest.raises(ValueError, match="input features 18 are not divisible by the TP size 4"):
        RowParallelLinear(18, 6, GROUP)
    with pytest.raises(ValueError, match="padded vocabulary 18 is not divisible by the TP size 4"):
        VocabParallelEmbedding(18, 3, 14, GROUP)


def test_a_vocabulary_larger_than_its_padding_is_refused_and_an_equal_one_is_not(rank2):
    with pytest.raises(ValueError, match="vocab_size 17 exceeds the padded vocabulary 16"):
        VocabParallelEmbedding(16, 3, 17, GROUP)
    assert VocabParallelEmbedding(16, 3, 16, GROUP).vocab_size == 16


def test_sequence_parallel_is_on_only_above_tp_1(rank2):
    """At TP 1 sequence parallelism is a no-op (as in Megatron): the flag is off whatever is
    asked, on at TP 4 when asked."""
    makers = [
        lambda g, sp: ColumnParallelLinear(8, [8], g, sp),
        lambda g, sp: RowParallelLinear(8, 8, g, sp),
        lambda g, sp: VocabParallelEmbedding(16, 3, 14, g, sp),
    ]
    for make in makers:
        assert make(GROUP, True).sequence_parallel is True
        assert make(GROUP, False).sequence_parallel is False
        assert make(None, True).sequence_parallel is False


@pytest.mark.parametrize("sp", [False, True])
def test_embedding_looks_up_only_its_own_rows_and_zeroes_the_others(rank2, sp):
    """Rank 2 owns ids 8..11: those rows come from its shard (id - 8), every other id (below,
    at the shard's end, in the padding past the real vocabulary's 14) gives a zero row, the
    partial that the reduction over TP completes; SP reduce-scatters it instead."""
    emb = VocabParallelEmbedding(16, 3, 14, GROUP, sequence_parallel=sp)
    with torch.no_grad():
        emb.weight.copy_(torch.arange(1.0, 13.0).reshape(4, 3))
    ids = torch.tensor([0, 7, 8, 9, 11, 12, 13])
    out = emb(ids)
    want = torch.zeros(7, 3)
    want[2:5] = emb.weight.detach()[[0, 1, 3]]
    assert torch.equal(out, want)
    assert rank2 == [("reduce-scatter" if sp else "all-reduce", GROUP)]


def test_embedding_refuses_ids_past_the_vocabulary_unless_told_they_were_checked(rank2):
    emb = VocabParallelEmbedding(16, 3, 14, GROUP)
    with pytest.raises(ValueError, match=r"token id 14 at flattened position 1"):
        emb(torch.tensor([1, 14]))
    emb.check_ids = False  # the trainer checked the host copy
    assert not emb(torch.tensor([1, 14])).any()  # padding row 14 is not rank 2's


def test_check_token_ids_accepts_no_ids_and_names_a_negative_one():
    check_token_ids(torch.zeros(0, dtype=torch.int64), 10)  # an empty batch: nothing to check
    with pytest.raises(ValueError, match=r"token id -1 at flattened position 2 .*\(ids seen: "):
        check_token_ids(torch.tensor([[3, 4], [-1, 5]]), 10)


def test_linear_layers_at_tp_1_are_plain_linears_forward_and_backward():
    """group None (TP 1): no communication at all, the plain GEMM and its gradients (a
    collective here would fail: no process group exists)."""
    torch.manual_seed(0)
    x = torch.randn(5, 8, requires_grad=True)
    for layer in (ColumnParallelLinear(8, [4, 2], None), RowParallelLinear(8, 6, None)):
        torch.nn.init.normal_(layer.weight)
        w = layer.weight.detach().clone().requires_grad_(True)
        x.grad = None
        layer(x).square().sum().backward()
        gx = x.grad.clone()
        x.grad = None
        F.linear(x, w).square().sum().backward()
        assert torch.allclose(gx, x.grad) and torch.allclose(layer.weight.grad, w.grad)
