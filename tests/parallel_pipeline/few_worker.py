"""One gloo rank of the few-micro-batches test (test_few_microbatches.py): pp_worker's run_layout
for the layouts named on the command line, each `name:pp:virtual_stages:microbatches`."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.parallel_pipeline.common import full_state  # noqa: E402
from tests.parallel_pipeline.pp_worker import run_layout  # noqa: E402


def main() -> None:
    out_dir, layouts = sys.argv[1], sys.argv[2:]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world
    )
    state = full_state()
    for spec in layouts:
        name, pp, v, m = spec.split(":")
        run_layout(name, int(pp), int(v), int(m), state, out_dir)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
