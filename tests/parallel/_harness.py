"""Shared pieces of the TP/SP/DP tests: a tiny Llama, packed micro-batches, a minimal training
step (model + GradBuffer + grad-norm clipping + AdamW on main grads) and a gloo launcher.

Workers run in spawned processes (one per rank, one thread each) and assert inside; a failing
job records its traceback, which the test that asked for the job reports.
"""

import datetime
import os
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.config import ModelConfig
from model.llama import Llama
from parallel.cross_entropy import cross_entropy
from parallel.data_parallel import GradBuffer
from parallel.dims import ParallelDims
from parallel.grad_norm import clip_coefficient, global_grad_norm
from parallel.parallelize import full_state_dict, load_full_state_dict, parallelize

# head_dim 16, GQA 8 q / 4 kv heads (TP 4 -> 2 q heads + 1 kv head per rank), vocab 300 padded to
# 384 at TP 1 and 512 at TP 2 and 4 -- so the padding differs between the layouts compared.
CFG = ModelConfig(
    name="tp-test",
    vocab_size=300,
    hidden_size=128,
    ffn_hidden_size=192,
    num_layers=2,
    num_attention_heads=8,
    num_kv_heads=4,
    max_position_embeddings=64,
)
# vocab 500 pads to 512 at TP 1, 2 and 4, so "the TP=1 model" has the same rows at every size.
NORM_CFG = CFG.replace(vocab_size=500)
SEQ = 32  # tokens per micro-batch (one packed row)
STEPS = 10
LR = 3e-3
CLIP = 1.0
SEED = 1234


def full_model(cfg: ModelConfig = CFG, seed: int = SEED) -> Llama:
    model = Llama(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def full_state(cfg: ModelConfig = CFG, seed: int = SEED) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in full_model(cfg, seed).state_dict().items()}


def microbatch(step: int, index: int, cfg: ModelConfig = CFG) -> dict:
    """SEQ tokens packed from 1-4 documents, positions restarting per document, a random loss
    mask; deterministic in (step, index) on every rank."""
    g = torch.Generator().manual_seed(10_000 * step + index)
    n_docs = int(torch.randint(1, 5, (1,), generator=g))
    cuts = sorted(torch.randperm(SEQ - 1, generator=g)[: n_docs - 1].add(1).tolist())
    bounds = [0, *cuts, SEQ]
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    return {
        "tokens": torch.randint(0, cfg.vocab_size, (SEQ,), generator=g),
        "labels": torch.randint(0, cfg.vocab_size, (SEQ,), generator=g),
        "loss_mask": (torch.rand(SEQ, generator=g) < 0.7).float(),
        "position_ids": torch.cat([torch.arange(n) for n in lengths]),
        "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
        "max_seqlen": max(lengths),
    }


def micro_loss(model: Llama, mb: dict, tp_group, total_tokens: torch.Tensor) -> torch.Tensor:
    """This micro-batch's share of the global-batch mean loss."""
    logits = model(mb["tokens"], mb["position_ids"], mb["cu_seqlens"], mb["max_seqlen"])
    per_token = cross_entropy(logits, mb["labels"], tp_group, vocab_size=model.cfg.vocab_size)
    return (per_token * mb["loss_mask"]).sum() / total_tokens


class Trainer:
    """The minimal training step the layouts are compared with."""

    def __init__(self, model: Llama, dims: ParallelDims, fuse: bool = True):
        self.model, self.dims = model, dims
        self.params = [p for p in model.parameters() if p.requires_grad]
        # Layouts run with fused weight-gradient accumulation; the one-process reference without.
        self.buf = GradBuffer(self.params, dims.dp_group, tp_group=dims.tp_group, bucket_mb=0.05,
                              fuse_weight_grads=fuse)  # fmt: skip
        self.opt = torch.optim.AdamW(
            self.params, lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01
        )

    def forward_backward(self, batch: list[dict]) -> float:
        """Gradients of the global-batch mean loss into main_grad; returns the global loss."""
        dims = self.dims
        mine = batch[dims.dp_rank :: dims.dp]  # this DP rank's micro-batches
        total = torch.stack([mb["loss_mask"].sum() for mb in mine]).sum()
        dist_sum = lambda t: dist.all_reduce(t, group=dims.dp_group) if dims.dp > 1 else None
        dist_sum(total)
        self.buf.zero()
        loss = torch.zeros(())
        for i, mb in enumerate(mine):
            self.buf.set_sync(i == len(mine) - 1)
            part = micro_loss(self.model, mb, dims.tp_group, total)
            part.backward()
            loss += part.detach()
        self.buf.finish()
        dist_sum(loss)
        return float(loss)

    def step(self, batch: list[dict]) -> tuple[float, float]:
        loss = self.forward_backward(batch)
        norm = global_grad_norm(self.params, (self.dims.tp_group, self.dims.pp_group))
        coef = clip_coefficient(norm, CLIP)
        for p in self.params:
            p.grad = p.main_grad * coef
        self.opt.step()
        for p in self.params:
            p.grad = None
        return loss, norm


def build(dims: ParallelDims, sequence_parallel: bool, cfg: ModelConfig = CFG) -> Llama:
    """A TP model holding the slices of the full state made from SEED."""
    model = parallelize(full_model(cfg), dims, sequence_parallel)
    load_full_state_dict(model, full_state(cfg))  # identical to the slicing parallelize did
    return model


def reference(n_micro: int) -> dict:
    """One process, TP=1, unfused weight gradients: step-0 gradients (vocabulary rows trimmed),
    STEPS losses and norms."""
    dims = ParallelDims()
    trainer = Trainer(build(dims, False), dims, fuse=False)
    trainer.forward_backward([microbatch(0, i) for i in range(n_micro)])
    grads = gathered_grads(trainer.model, dims, CFG.vocab_size)
    trainer = Trainer(build(dims, False), dims, fuse=False)
    run = [trainer.step([microbatch(s, i) for i in range(n_micro)]) for s in range(STEPS)]
    losses, norms = zip(*run)
    return {"losses": list(losses), "norms": list(norms), "grads": grads}


def gathered_grads(model: Llama, dims: ParallelDims, vocab: int) -> dict[str, torch.Tensor]:
    """Full main grads with vocabulary tensors trimmed to the real rows."""
    out = full_state_dict(model, dims.tp_group, grads=True)
    return {k: (v[:vocab] if k in ("embed.weight", "output.weight") else v) for k, v in out.items()}


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float = 0.0):
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    err = (got - want).abs()
    bound = atol + rtol * want.abs()
    if not bool((err <= bound).all()):
        i = int((err - bound).argmax())
        raise AssertionError(
            f"{name}: |got - want| = {err.reshape(-1)[i]:.3e} > {bound.reshape(-1)[i]:.3e} at flat "
            f"index {i} (got {got.reshape(-1)[i]:.8e}, want {want.reshape(-1)[i]:.8e})"
        )


# ---------------------------------------------------------------------------------------------
# launcher: every selected job of one world size runs in a single launch (process start-up and
# gloo rendezvous dominate on 2 shared cores); each job builds its own ParallelDims.


@dataclass(frozen=True)
class Job:
    """fn(dims, *args) on `world` ranks with TP size `tp` (DP = world / tp)."""

    name: str
    world: int
    tp: int
    fn: Callable
    args: tuple = ()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, jobs: list[Job], out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    # A short timeout turns a collective mismatch into an error instead of a hung test run.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        for job in jobs:
            dims = ParallelDims.build(tp=job.tp, pp=1, backend="gloo")
            try:
                job.fn(dims, *job.args)
                dist.barrier()
            except BaseException:
                with open(os.path.join(out_dir, f"{job.name}.rank{rank}.err"), "w") as f:
                    f.write(traceback.format_exc())
                raise
            if rank == 0:
                open(os.path.join(out_dir, f"{job.name}.ok"), "w").close()
    finally:
        dist.destroy_process_group()


def run_jobs(jobs: list[Job], out_dir: str) -> str | None:
    """Run `jobs` (all of one world size) in one launch; marks land in out_dir. Returns the
    launch's error text, or None."""
    worlds = {j.world for j in jobs}
    if len(worlds) != 1:
        raise ValueError(f"one world size per launch, got {sorted(worlds)}")
    world = worlds.pop()
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # read by each child's torch import
    try:
        mp.start_processes(
            _entry, args=(world, _free_port(), jobs, out_dir), nprocs=world, start_method="spawn"
        )
    except Exception as e:  # the failing job's traceback is in its .err file
        return f"{type(e).__name__}: {str(e)[-2000:]}"
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    return None


def job_outcome(name: str, out_dir: str, launch_error: str | None) -> str | None:
    """None if job `name` passed on every rank, else why not."""
    if os.path.exists(os.path.join(out_dir, f"{name}.ok")):
        return None
    errors = sorted(f for f in os.listdir(out_dir) if f.startswith(f"{name}.rank"))
    if errors:
        with open(os.path.join(out_dir, errors[0])) as f:
            return f"{errors[0]}:\n{f.read()}"
    return f"job {name} did not complete (an earlier job of its launch failed?): {launch_error}"
