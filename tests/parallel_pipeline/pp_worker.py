"""One gloo rank of the pipeline equivalence test (launched by common.launch).

Runs every layout of LAYOUTS that fits the world size, STEPS training steps each, through
PipelineExecutor, then one forward-only pass, and saves this rank's per-step losses, first-step
gradients, final weights and the evaluation loss to OUT_DIR/{layout}-rank{r}.pt for the test to
compare with the single-process reference.
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from parallel.data_parallel import GradBuffer  # noqa: E402
from parallel.dims import ParallelDims  # noqa: E402
from parallel.pipeline import PipelineExecutor, pipeline_loss  # noqa: E402
from parallel.pipeline_schedule import stage_spec  # noqa: E402
from tests.parallel_pipeline.common import (  # noqa: E402
    CFG,
    EVAL_STEP,
    SEQ,
    STEPS,
    build_stage,
    eval_fn,
    full_state,
    global_batch,
    make_loss_fn,
    make_optimizer,
)

# name: (world, pp, virtual stages, micro-batches per pipeline). dp = world / pp.
LAYOUTS = {
    "pp2": (2, 2, 1, 4),
    "pp2v2": (2, 2, 2, 4),
    "pp4": (4, 4, 1, 8),
    "pp4v2": (4, 4, 2, 8),
    "pp2dp2": (4, 2, 1, 4),
}


def run_layout(name: str, pp: int, v: int, m: int, state: dict, out_dir: str) -> None:
    dims = ParallelDims.build(tp=1, pp=pp, backend="gloo")
    specs = [stage_spec(CFG.num_layers, pp, dims.pp_rank, v, c) for c in range(v)]
    stages = [build_stage(state, s.layers, s.pre, s.post) for s in specs]
    params = [p for s in stages for p in s.parameters()]
    names = [n for s in stages for n, _ in s.named_parameters()]
    buffer = GradBuffer(params, dims.dp_group)
    opt = make_optimizer(params)
    executor = PipelineExecutor(
        stages, dims, (SEQ, CFG.hidden_size), grad_sync=buffer.set_sync, check=True
    )
    losses, grads = [], None
    for step in range(STEPS):
        batch = global_batch(step, m * dims.dp)  # the whole global batch, for the normaliser
        mine = batch[dims.dp_rank * m : (dims.dp_rank + 1) * m]  # this DP replica's share
        buffer.zero()
        step_losses = executor.step(mine, make_loss_fn(batch))
        assert len(step_losses) == (m if dims.is_last_stage else 0)
        buffer.finish()
        total = pipeline_loss(step_losses, dims)
        if dims.dp_group is not None:
            dist.all_reduce(total, group=dims.dp_group)
        losses.append(float(total))
        if step == 0:
            grads = {n: p.main_grad.clone() for n, p in zip(names, params)}
        for p in params:
            p.grad = p.main_grad
        opt.step()
        for p in params:
            p.grad = None
    final = {n: p.detach().clone() for n, p in zip(names, params)}
    for s in stages:
        s.eval()
    batch = global_batch(EVAL_STEP, m * dims.dp)
    sums = executor.forward(batch[dims.dp_rank * m : (dims.dp_rank + 1) * m], eval_fn)
    assert len(sums) == (m if dims.is_last_stage else 0)
    eval_loss = pipeline_loss(sums, dims)
    if dims.dp_group is not None:
        dist.all_reduce(eval_loss, group=dims.dp_group)
    torch.save(
        {"losses": losses, "grads": grads, "params": final, "eval": float(eval_loss)},
        os.path.join(out_dir, f"{name}-rank{dims.rank}.pt"),
    )


def main() -> None:
    out_dir = sys.argv[1]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world
    )
    state = full_state()
    for name, (w, pp, v, m) in LAYOUTS.items():
        if w == world:
            run_layout(name, pp, v, m, state, out_dir)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
