"""One gloo rank for test_dims: ParallelDims.build hands --distributed_timeout_minutes to the
default process group and to every group it creates (argv: port, minutes)."""

import datetime
import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from parallel.dims import ParallelDims  # noqa: E402


def main() -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
    minutes = float(sys.argv[2])
    seen = []
    init, new = dist.init_process_group, dist.new_group

    def record_init(*args, **kwargs):
        seen.append(kwargs.get("timeout"))
        return init(*args, **kwargs)

    def record_new(*args, **kwargs):
        seen.append(kwargs.get("timeout"))
        return new(*args, **kwargs)

    dist.init_process_group, dist.new_group = record_init, record_new
    dims = ParallelDims.build(tp=2, pp=1, backend="gloo", timeout_minutes=minutes)
    want = datetime.timedelta(minutes=minutes)
    assert len(seen) > 1 and all(t == want for t in seen), seen
    dist.barrier(group=dims.tp_group)
    print(f"rank {dims.rank}: {len(seen)} groups with timeout {want}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
