"""ParallelDims rank layout, checked without any process group."""

import pytest

from parallel.dims import AXES, ParallelDims


@pytest.mark.parametrize("tp,dp,pp", [(1, 1, 1), (2, 2, 2), (4, 2, 1), (2, 1, 4), (1, 3, 2)])
def test_axis_groups_partition_the_world_in_megatron_order(tp, dp, pp):
    dims = ParallelDims(tp=tp, dp=dp, pp=pp)
    world = set(range(dims.world_size))
    for axis in AXES:
        groups = dims.axis_groups(axis)
        assert sorted(r for g in groups for r in g) == sorted(world)
        assert all(len(g) == getattr(dims, axis) for g in groups)
        for g in groups:  # members differ only along `axis`
            members = [ParallelDims(tp=tp, dp=dp, pp=pp, rank=r) for r in g]
            for other in AXES:
                ranks = {getattr(m, f"{other}_rank") for m in members}
                assert len(ranks) == (getattr(dims, axis) if other == axis else 1)
    # TP innermost: a TP group is consecutive ranks (stays inside a node).
    assert dims.axis_groups("tp")[0] == list(range(tp))


def test_world_size_check_names_the_fix():
    with pytest.raises(ValueError, match="multiple of 4"):
        ParallelDims.check(6, tp=2, pp=2)


def test_gloo_with_gpus_and_pipeline_stages_is_refused_before_connecting(monkeypatch):
    """gloo cannot send CUDA tensors: with GPUs and PP > 1 the run is refused by name before
    init_process_group (which would otherwise wait for every rank, then fail at the first
    send); TP/DP-only gloo runs and CPU runs go on."""
    import torch.distributed as dist

    def no_connect(*args, **kwargs):
        raise AssertionError("init_process_group must not be reached")

    monkeypatch.setattr(dist, "init_process_group", no_connect)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    with pytest.raises(
        ValueError, match=r"backend gloo .* pipeline_model_parallel_size 2: .* nccl"
    ):
        ParallelDims.build(tp=2, pp=2, backend="gloo")
    ParallelDims.check_backend("gloo", cuda=True, pp=1)  # TP/DP collectives: supported
    ParallelDims.check_backend("gloo", cuda=False, pp=4)  # CPU: the CI's own setup
    ParallelDims.check_backend("nccl", cuda=True, pp=4)
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES="):
        ParallelDims.check_backend("gloo", cuda=True, pp=2)
    # nccl without a GPU is named as such (it used to reach local_cuda_device: "sees 0 GPUs")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ValueError, match=r"backend nccl, but torch sees no GPU.*backend gloo"):
        ParallelDims.build(tp=4, backend="nccl")


def test_the_distributed_timeout_reaches_every_group():
    """--distributed_timeout_minutes: the default group and every TP/PP/DP group wait that long
    for the slowest rank (a 70B checkpoint's save can outlast the default 10 minutes)."""
    import os
    import socket

    from tests.gloo_ranks import REPO, run_ranks
    from tests.train.helpers import tiny_run
    from train.args import ArgsError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = os.path.join(REPO, "tests", "parallel", "timeout_worker.py")
    logs = run_ranks(worker, [str(port), "0.5"], 2, 120, "timeout job")
    assert all("timeout 0:00:30" in log for log in logs), logs
    rc, _, _ = tiny_run(["--distributed_timeout_minutes", "45"])
    assert rc.parallel.timeout_minutes == 45
    with pytest.raises(ArgsError, match="--distributed_timeout_minutes 0.0: must be > 0"):
        tiny_run(["--distributed_timeout_minutes", "0"])


def test_the_local_gpu_is_local_rank_or_the_only_one_visible(monkeypatch):
    """torchrun: cuda:LOCAL_RANK. One GPU per process (srun --gpus-per-task=1 sets
    CUDA_VISIBLE_DEVICES per task while LOCAL_RANK counts the node's tasks): cuda:0. A
    LOCAL_RANK past several visible GPUs is refused by name instead of CUDA's "invalid device
    ordinal" at the first allocation."""
    import torch

    from parallel.dims import local_cuda_device

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert local_cuda_device() == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert local_cuda_device() == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with pytest.raises(ValueError, match=r"LOCAL_RANK 3, .* 2 GPUs \(CUDA_VISIBLE_DEVICES=4,5\)"):
        local_cuda_device()
    monkeypatch.delenv("LOCAL_RANK")
    assert local_cuda_device() == torch.device("cuda", 0)
    # torchrun --nproc_per_node 2 on a one-GPU machine: both would take cuda:0 (NCCL refuses a
    # GPU twice in one communicator); refused by name instead, on every local rank
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("LOCAL_RANK", rank)
        with pytest.raises(ValueError, match=r"^2 processes on this node .* sees 1 GPUs: .* 1 per"):
            local_cuda_device()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process, the one GPU
    assert local_cuda_device() == torch.device("cuda", 0)
