"""Data parallel: DP=2 and TP=2 x DP=2 (with SP) versus one process on the same global batch
(4 micro-batches, global-token loss); bucketed all-reduce launched from the backward hooks;
GradBuffer layout and misuse errors in one process."""

import pytest
import torch

from parallel.data_parallel import GradBuffer
from parallel.dims import ParallelDims
from parallel.parallelize import parallelize
from tests.parallel._harness import full_model


@pytest.mark.slow
@pytest.mark.parametrize("job", ["dp2", "tp2dp2-sp"])
def test_dp_layouts_match_single_process(dist_job, job):
    dist_job(job)


@pytest.mark.slow
@pytest.mark.parametrize("job", ["buckets-dp2", "buckets-dp2-fused"])
def test_buckets_launch_from_backward_hooks(dist_job, job):
    dist_job(job)


def test_grad_buffer_layout_and_buckets():
    model = parallelize(full_model(), ParallelDims())
    params = list(model.parameters())
    buf = GradBuffer(params, None, bucket_mb=0.05)
    assert buf.params == params
    offset = 0
    for p in params:  # main grads lie back to back in the given order
        assert p.main_grad.data_ptr() == buf.buffer[offset:].data_ptr()
        offset += p.numel()
    assert offset == buf.buffer.numel()
    ranges = buf._ranges  # bucket 0 is the buffer's tail (the first gradients of the backward)
    assert ranges[0][1] == buf.buffer.numel() and ranges[-1][0] == 0
    assert all(a[0] == b[1] for a, b in zip(ranges, ranges[1:]))
    assert all(end - start >= 0.05 * 2**20 / 4 for start, end in ranges[:-1])
    assert sum(buf._counts) == len(params)


@pytest.mark.parametrize("fuse", [False, True])
def test_grad_buffer_accumulates_and_rejects_resync(fuse):
    model = parallelize(full_model(), ParallelDims())
    buf = GradBuffer(list(model.parameters()), None, fuse_weight_grads=fuse)
    ids = torch.arange(16)
    pos, cu = torch.arange(16), torch.tensor([0, 16], dtype=torch.int32)
    buf.set_sync(False)
    model(ids, pos, cu, 16).sum().backward()
    once = buf.buffer.clone()
    assert once.abs().sum() > 0 and all(p.grad is None for p in model.parameters())
    buf.set_sync(True)
    model(ids, pos, cu, 16).sum().backward()
    torch.testing.assert_close(buf.buffer, 2 * once)
    with pytest.raises(RuntimeError, match="already all-reduced"):
        model(ids, pos, cu, 16).sum().backward()
    buf.finish()
    with pytest.raises(RuntimeError, match="call zero"):
        model(ids, pos, cu, 16).sum().backward()
    buf.zero()
    assert buf.buffer.abs().sum() == 0
    model(ids, pos, cu, 16).sum().backward()
    torch.testing.assert_close(buf.buffer, once)


def test_sequence_parallel_params_need_tp_group():
    p = torch.nn.Parameter(torch.ones(4))
    p.sequence_parallel, p.tp_size = True, 2
    with pytest.raises(ValueError, match="tp_group=dims.tp_group"):
        GradBuffer([p], None)


def test_grad_buffer_rejects_a_backward_after_the_synced_one():
    """The synced micro-batch must be the last: a backward after it (synced or not) would add to
    buckets whose all-reduce is already launched, so that rank's gradient would miss the others'
    reduction and the replicas would drift apart without a word."""
    model = parallelize(full_model(), ParallelDims())
    buf = GradBuffer(list(model.parameters()), None)
    ids = torch.arange(16)
    pos, cu = torch.arange(16), torch.tensor([0, 16], dtype=torch.int32)
    model(ids, pos, cu, 16).sum().backward()  # synced: every bucket launched
    buf.set_sync(False)
    with pytest.raises(RuntimeError, match="already all-reduced"):
        model(ids, pos, cu, 16).sum().backward()


def test_grad_buffer_bucket_boundary_no_sync_and_shard_slice():
    params = [torch.nn.Parameter(torch.zeros(256)) for _ in range(3)]
    # A bucket closes once it holds bucket_mb: parameters of exactly that size get one each.
    assert GradBuffer(params, None, bucket_mb=256 * 4 / 2**20).num_buckets == 3
    empty, p = torch.nn.Parameter(torch.zeros(0)), torch.nn.Parameter(torch.zeros(3))
    buf = GradBuffer([empty, p], None)
    assert buf.shard_slice(empty) is None and buf.shard_slice(p) == (0, 3, 0)
    # no_sync() restores what was set before it, also when its block raises.
    buf.set_sync(False)
    with buf.no_sync():
        pass
    assert buf._sync is False
    buf.set_sync(True)
    with pytest.raises(KeyError), buf.no_sync():
        raise KeyError
    assert buf._sync is True
