"""ShardedAdamW's load of a checkpoint's optimizer state on 2 gloo DP ranks where a rank's piece
starts inside a parameter and a bucket ends with a parameter's last value, not padding
(tests/parallel3d/test_optimizer_audit.py's parameters all fit in DP rank 0's 128-aligned
pieces, followed by padding): each rank takes its part of the whole tensors from the part's own
offset, the model's weights on every rank become the loaded masters, and the state saved back
is the state loaded, to the last value -- with the state on the device and offloaded to the
host (where the weights go back through the device staging buffer). This file is also the
worker: the test runs it as each rank."""

import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

from tests.gloo_ranks import run_ranks

WORLD = 2
# 512 values in one bucket, no padding: DP rank 1's piece [256, 512) starts at a.w's 257th
# value and ends at n2's last, the bucket's last
SHAPES = {"a.w": (20, 13), "n1": (13,), "b.w": (9, 7), "n2": (176,)}


def test_sharded_state_loads_into_pieces_that_cut_a_parameter_at_dp2(tmp_path):
    run_ranks(os.path.abspath(__file__), [str(tmp_path / "rendezvous")], WORLD, 120, "DP 2 load")


def _check(offload: bool, rank: int) -> None:
    from parallel.data_parallel import GradBuffer
    from train.config import OptimizerConfig
    from train.optimizer import KINDS, ShardedAdamW, param_order

    g = torch.Generator().manual_seed(0)
    named = param_order([(n, nn.Parameter(torch.randn(s, generator=g))) for n, s in SHAPES.items()])
    buf = GradBuffer([p for _, p in named], dist.group.WORLD, shard_over_dp=True)
    assert buf.buffer.numel() == 512 and buf.shard_slice(named[0][1])[2] == 256 * rank
    cfg = OptimizerConfig(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, clip_grad=1.0,
                          distributed=True, cpu_offload=offload)  # fmt: skip
    opt = ShardedAdamW(named, cfg, buf)
    g = torch.Generator().manual_seed(1)  # the same state on every rank, unlike the weights
    state = {k: {n: torch.randn(s, generator=g).abs() for n, s in SHAPES.items()} for k in KINDS}
    opt.load_state_tensors(lambda kind, name, p: state[kind][name])
    for n, p in opt.named_params():
        assert torch.equal(p.detach(), state["master"][n]), (offload, rank, n)
    saved = opt.state_tensors()  # whole tensors on DP rank 0 only
    for kind in KINDS if rank == 0 else ():
        for n, t in state[kind].items():
            assert torch.equal(saved[kind][n], t), (offload, kind, n)


def worker(rendezvous: str) -> None:
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))  # fmt: skip
    torch.set_num_threads(1)
    for offload in (False, True):
        _check(offload, rank)
    dist.barrier()
    # Leave without tearing gloo down, as test_optimizer_audit.py's worker (a teardown abort
    # after passing would fail the test for nothing it checks).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    worker(sys.argv[1])
