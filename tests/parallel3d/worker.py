"""One gloo rank of a trainer-level 3-D parallel job (launched by common.launch).

The job (a JSON file, argv[1]) names the layout and what to do: train through
`train.run.run_training` (optionally saving / loading a checkpoint), dump the gathered weights
and optimizer state, check the gradient norm. The last rank writes {name}.result.json; rank
(tp 0, dp 0) of each pipeline stage writes that stage's gathered tensors.
"""

import datetime
import functools
import json
import math
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from safetensors.torch import save_file  # noqa: E402

from model.config import param_count  # noqa: E402
from parallel.data_parallel import GradBuffer  # noqa: E402
from parallel.dims import ParallelDims  # noqa: E402
from parallel.grad_norm import (  # noqa: E402
    global_grad_norm,
    sharded_grad_norm,
    sharded_norm_segments,
)
from parallel.parallelize import gather_full  # noqa: E402
from tests.parallel3d.common import run_config  # noqa: E402
from tests.train.helpers import SyntheticLoader  # noqa: E402
from train.loop import Trainer  # noqa: E402
from train.run import run_training  # noqa: E402

MICRO, SEQ = 2, 32


class DPSlice:
    """SyntheticLoader's global batch (all DP ranks' micro-batches), this DP rank's share: the
    global batches are the same at any DP size, as with data.loader.BatchLoader."""

    def __init__(self, global_batch: int, dp_rank: int, dp: int, seed: int,
                 cuts: list[int] | None = None):  # fmt: skip
        """cuts: the micro-batch index where each DP rank's share starts (uneven shares, as
        global batches of samples give); default: equal shares."""
        self.inner = SyntheticLoader(MICRO, SEQ, global_batch // MICRO, seed=seed)
        per = global_batch // (MICRO * dp)
        bounds = [*(cuts or range(0, per * dp, per)), global_batch // MICRO]
        self.lo, self.per_rank = bounds[dp_rank], bounds[dp_rank + 1] - bounds[dp_rank]

    def next_global_batch(self) -> list[dict]:
        return self.inner.next_global_batch()[self.lo : self.lo + self.per_rank]

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def dump_state(trainer: Trainer, dims: ParallelDims, path: str, grads: bool = False) -> None:
    """This stage's weights and optimizer state (or, with grads, the step's reduced gradients)
    gathered over TP, vocabulary rows trimmed to the real vocabulary (the padding depends on the
    layout), written by (tp 0, dp 0)."""
    vocab = trainer.rc.model.vocab_size
    params = dict(trainer.named_parameters())
    out = {}
    if grads:
        assert not trainer.grads.sharded, "main_grad is not the reduced gradient when sharded"
        kinds = {"grad": {n: p.main_grad for n, p in params.items()}}
    else:
        kinds = {"model": {n: p.detach() for n, p in params.items()}}
        kinds.update(trainer.optimizer.state_tensors())
    for kind, tensors in kinds.items():
        for n, t in tensors.items():
            full = gather_full(t.contiguous(), params[n], dims.tp_group)
            if getattr(params[n], "vocab_rows", None) is not None:
                full = full[:vocab]
            out[f"{kind}/{n}"] = full.contiguous().clone()
    if dims.tp_rank == 0 and dims.dp_rank == 0:
        save_file(out, path)


def main() -> None:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    out_dir, name = os.path.dirname(sys.argv[1]), job["name"]
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"file://{os.path.join(out_dir, name + '.rdzv')}",
            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=150),
        )  # fmt: skip
    torch.set_num_threads(1)
    tp, pp = job.get("tp", 1), job.get("pp", 1)
    rc, tok = run_config(tp, pp, world, job["global_batch"], job.get("args", []))
    dims = ParallelDims.build(tp, pp, backend="gloo")
    torch.manual_seed(rc.loop.seed + 100 * dims.pp_rank)  # as train.main
    if job.get("bucket_mb"):  # small buckets: several all-reduces, chunks sharing a bucket
        import train.loop

        train.loop.GradBuffer = functools.partial(GradBuffer, bucket_mb=job["bucket_mb"])
    trainer = Trainer(rc, dims, tok)
    if job.get("bucket_mb"):
        assert trainer.grads.num_buckets > 4, trainer.grads.num_buckets
    loader = DPSlice(rc.loop.global_batch_size, dims.dp_rank, dims.dp, seed=5,
                     cuts=job.get("dp_cuts"))  # fmt: skip
    result: dict = {"dp": dims.dp}
    masters = [trainer.optimizer.buffer("master")] if trainer.grads.sharded else [
        g.master for g in trainer.optimizer.groups
    ]  # fmt: skip
    result["optimizer_shares"] = {
        "dp": dims.dp, "params": sum(p.numel() for p in trainer.params),
        "local": sum(m.numel() for m in masters), "buckets": trainer.grads.num_buckets,
    }  # fmt: skip
    if rc.ckpt.load:
        state = trainer.load(rc.ckpt.load)
        loader.load_state_dict(state)
        result["loaded_iteration"] = trainer.iteration
        result["loaded_consumed_samples"] = trainer.consumed_samples
        result["loaded_loader"] = state
    if job.get("dump_after_load"):
        dump_state(trainer, dims, os.path.join(out_dir, f"{name}_state_pp{dims.pp_rank}.st"))

    def eval_factory():
        gbs = rc.loop.global_batch_size
        return DPSlice(gbs, dims.dp_rank, dims.dp, seed=77).next_global_batch()

    def first_factory():  # one micro-batch in all, on DP rank 0: fewer than the interleaved
        return eval_factory()[:1] if dims.dp_rank == 0 else []  # table's multiple of pp

    evals = {"all": eval_factory, "first": first_factory} if rc.eval.iters > 0 else {}
    history = []
    if job.get("grads_at"):  # stop there, keep that step's gradients, then go on
        end = rc.loop.train_iters
        rc.loop = type(rc.loop)(**{**rc.loop.__dict__, "train_iters": job["grads_at"]})
        history += run_training(rc, dims, trainer, loader, evals, None)
        path = os.path.join(out_dir, f"{name}_grads_pp{dims.pp_rank}.st")
        dump_state(trainer, dims, path, grads=True)
        rc.loop = type(rc.loop)(**{**rc.loop.__dict__, "train_iters": end})
    history += run_training(rc, dims, trainer, loader, evals, None)
    if job.get("dump_after_train"):  # the state of the first run_training (= what was saved)
        dump_state(trainer, dims, os.path.join(out_dir, f"{name}_state_pp{dims.pp_rank}.st"))
    if job.get("continue_to"):
        rc.loop = type(rc.loop)(**{**rc.loop.__dict__, "train_iters": job["continue_to"]})
        history += run_training(rc, dims, trainer, loader, evals, None)
    result["history"] = history
    if job.get("grad_norm_check"):
        if trainer.grads.sharded:  # ones in this rank's reduced pieces (padding stays zero)
            trainer.grads.local_grad.zero_()
            for p in trainer.params:
                where = trainer.grads.shard_slice(p)
                if where is not None:
                    trainer.grads.local_grad[where[0] : where[1]] = 1.0
            groups = (dims.dp_group, dims.tp_group, dims.pp_group)
            norm = sharded_grad_norm(sharded_norm_segments(trainer.grads), groups)
        else:
            for p in trainer.params:
                p.main_grad.fill_(1.0)
            norm = global_grad_norm(trainer.params, groups=(dims.tp_group, dims.pp_group))
        count = param_count(rc.model, rc.model.padded_vocab_size(tp))
        result["grad_norm_ones"] = [norm, math.sqrt(count), count]
    if rank == world - 1:
        with open(os.path.join(out_dir, f"{name}.result.json"), "w") as f:
            json.dump(result, f)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
