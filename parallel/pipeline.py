"""Pipeline-parallel executor: runs one rank's `schedule` (parallel/pipeline_schedule.py).

Each pipeline rank holds `v` stage modules (one per virtual chunk, built with `stage_spec`) and the
same list of micro-batches. The executor walks its action table: forwards and backwards on the
stage modules, and every run of communication actions as one `dist.batch_isend_irecv` over the
pipeline group's global ranks; its receives are waited at once, its sends at the next batch.
`simulate` proves the tables deadlock-free under the stricter rule that a whole batch blocks
(NCCL's), which deferring send waits only relaxes. `forward` runs the forward-only table
(evaluation).

Micro-batch metadata. Every pipeline rank of a data-parallel replica reads the *same* micro-batches
from its own loader (same DP rank, same deterministic sampler), so `cu_seqlens`, `position_ids`
and `max_seqlen` are on every stage without any message: the loader's packing is cheap CPU index
work on an mmap, far cheaper than a variable-length P2P exchange per micro-batch, which would add
a latency-bound message to the critical path. Middle stages never touch `tokens` or labels; only
stage 0 reads the tokens and only the last stage the labels / loss mask (through `loss_fn`).

Shapes are known up front: every boundary tensor has `tensor_shape` ((tokens, hidden), or
(tokens / tp, hidden) with sequence parallelism: each TP rank exchanges its own shard with the
same TP rank of the neighbouring stage, since `pp_ranks` fixes the TP and DP ranks) and the
model's dtype, so receive buffers are allocated without a shape handshake. A stage returning
another shape fails with a message, instead of corrupting its neighbour.

Memory: the (input, output) pair of a micro-batch is dropped the moment its backward ran and its
input gradient is dropped once sent, so at most the schedule's in-flight bound (`max_in_flight`:
pp - rank for 1F1B) of stage activations is alive; `check=True` asserts that bound at run time.
"""

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from parallel.dims import ParallelDims
from parallel.pipeline_schedule import (
    BACKWARD,
    FORWARD,
    RECV_BWD,
    RECV_FWD,
    SEND_BWD,
    SEND_FWD,
    Action,
    max_in_flight,
    schedule,
    split_batches,
)

ForwardFn = Callable[[nn.Module, torch.Tensor | None, dict], torch.Tensor]
LossFn = Callable[[torch.Tensor, dict], torch.Tensor]


def llama_stage_forward(stage: nn.Module, x: torch.Tensor | None, mb: dict) -> torch.Tensor:
    """Call a `model.llama.Llama` stage. x: (tokens, hidden) from the previous stage, or None on
    stage 0, which reads mb["tokens"]. Uses mb["position_ids"], mb["cu_seqlens"], mb["max_seqlen"].
    Returns logits (tokens, vocab) on the last stage, else hidden (tokens, hidden)."""
    inp = mb["tokens"] if x is None else x
    return stage(inp, mb["position_ids"], mb["cu_seqlens"], mb["max_seqlen"])


class PipelineExecutor:
    """Runs forward and backward of one training step over a pipeline.

    stages: this rank's stage modules, chunk 0 first (len = virtual pipeline stages);
    tensor_shape: shape of every activation / gradient crossing a stage boundary;
    dtype: their dtype (default: the dtype of the first stage's parameters);
    forward_fn(stage, x_or_None, microbatch) -> tensor: how a stage is called;
    grad_sync(enabled): called before every backward, True only for the last backward of each
        chunk in the step (pass `GradBuffer.set_sync`, so the bucketed data-parallel all-reduce
        overlaps the final backwards and earlier micro-batches only accumulate);
    check: assert the in-flight bound after every forward (tests / debugging).

    With dims.pp == 1 the schedule is F0 B0 F1 B1 ... with no messages and no process group, so a
    trainer can always go through the executor.
    """

    def __init__(
        self,
        stages: list[nn.Module],
        dims: ParallelDims,
        tensor_shape: tuple[int, ...],
        dtype: torch.dtype | None = None,
        forward_fn: ForwardFn = llama_stage_forward,
        grad_sync: Callable[[bool], None] | None = None,
        check: bool = False,
    ):
        self.stages = list(stages)
        if not self.stages:
            raise ValueError("PipelineExecutor needs at least one stage module")
        self.dims = dims
        self.pp, self.rank, self.v = dims.pp, dims.pp_rank, len(self.stages)
        if self.v > 1 and self.pp == 1:
            raise ValueError(
                f"{self.v} stage modules given at pipeline size 1: virtual stages need "
                "pipeline_model_parallel_size > 1"
            )
        params = [p for s in self.stages for p in s.parameters() if p.is_floating_point()]
        if not params:
            raise ValueError("stage modules have no floating-point parameters to train")
        self.device = params[0].device
        self.dtype = dtype if dtype is not None else params[0].dtype
        self.tensor_shape = tuple(int(d) for d in tensor_shape)
        self.forward_fn = forward_fn
        self.grad_sync = grad_sync
        self.check = check
        self.group = dims.pp_group
        if self.pp > 1:
            if self.group is None or not dist.is_initialized():
                raise ValueError(
                    f"pipeline size {self.pp} needs torch.distributed and dims.pp_group; build "
                    "dims with ParallelDims.build(tp, pp) under torchrun"
                )
            ranks = dims.pp_ranks
            self.next_rank = ranks[(self.rank + 1) % self.pp]
            self.prev_rank = ranks[(self.rank - 1) % self.pp]
            # A batched P2P that is the first operation on a NCCL group must involve every rank of
            # the group (torch.distributed.batch_isend_irecv docs); one tiny collective sets it up.
            dist.all_reduce(torch.zeros(1, device=self.device), group=self.group)

    def _stage(self, chunk: int) -> int:
        return chunk * self.pp + self.rank

    @property
    def num_stages(self) -> int:
        return self.pp * self.v

    def _exchange(
        self, batch: list[Action], outputs, grads, fwd_in, bwd_in, sends: list, keep: bool = True
    ) -> None:
        """Post one fused batch of sends/receives in table order and wait for its receives.

        Sends are waited at the next batch (or the end of the step) instead, so a rank computes
        while its neighbour drains the message; `sends` holds those requests (and, through them,
        the buffers). Deferring a wait can only relax the simulator's blocking rule, so a table it
        proved deadlock-free stays so. With NCCL the batch is one coalesced request whose wait
        only orders streams, so it is waited at once. keep=False drops a sent output (no
        backward will need it)."""
        ops = []
        for a in batch:
            key = (a.microbatch, a.chunk)
            if a.kind == SEND_FWD:
                out = (outputs[key] if keep else outputs.pop(key)).detach()
                ops.append(dist.P2POp(dist.isend, out, self.next_rank, self.group))
            elif a.kind == SEND_BWD:
                ops.append(dist.P2POp(dist.isend, grads.pop(key), self.prev_rank, self.group))
            else:
                buf = torch.empty(self.tensor_shape, dtype=self.dtype, device=self.device)
                if a.kind == RECV_FWD:
                    fwd_in[key] = buf
                    ops.append(dist.P2POp(dist.irecv, buf, self.prev_rank, self.group))
                elif a.kind == RECV_BWD:
                    bwd_in[key] = buf
                    ops.append(dist.P2POp(dist.irecv, buf, self.next_rank, self.group))
                else:
                    raise ValueError(f"unknown communication action {a.kind!r}")
        reqs = dist.batch_isend_irecv(ops)
        for req, _ in sends:
            req.wait()
        sends.clear()
        if len(reqs) != len(ops):  # coalesced (NCCL): one request for the whole batch
            for req in reqs:
                req.wait()
            return
        for req, op in zip(reqs, ops):
            if op.op is dist.isend:
                sends.append((req, op.tensor))  # the buffer lives until the send is waited
            else:
                req.wait()

    def _check_boundary(self, t: torch.Tensor, what: str, key: tuple[int, int]) -> torch.Tensor:
        if tuple(t.shape) != self.tensor_shape or t.dtype != self.dtype:
            raise ValueError(
                f"pipeline rank {self.rank}, chunk {key[1]}, micro-batch {key[0]}: {what} has "
                f"shape {tuple(t.shape)} {t.dtype}, but the executor was built for "
                f"{self.tensor_shape} {self.dtype}; pass tensor_shape = (micro_batch_size x "
                "seq_length [/ tp with sequence parallelism], hidden) and the model dtype"
            )
        return t.contiguous()

    def step(self, microbatches: list[dict], loss_fn: LossFn) -> list[torch.Tensor]:
        """Forward and backward of every micro-batch; gradients accumulate in the parameters.

        loss_fn(logits, microbatch) -> scalar, called on the last stage only; the trainer's
        normalisation (global token count) belongs inside it. Returns the detached per-micro-batch
        losses on the last pipeline stage, [] on the others (see `pipeline_loss`)."""
        m = len(microbatches)
        table = schedule(self.pp, self.rank, m, self.v)
        bound = max_in_flight(self.pp, self.rank, m, self.v)
        last = self.num_stages - 1
        # Backwards run chunk by chunk in micro-batch order; a chunk's gradients are final after
        # its last one, which is when the data-parallel reduction of that chunk may start.
        final_bwd = {(a.microbatch, a.chunk) for a in table if a.kind == BACKWARD}
        final_bwd = {max(k for k in final_bwd if k[1] == c) for c in range(self.v)}
        inputs: dict = {}  # (mb, chunk) -> received activation (leaf, requires grad) or None
        outputs: dict = {}  # (mb, chunk) -> stage output, or the loss on the last stage
        grads: dict = {}  # (mb, chunk) -> input gradient awaiting its send
        fwd_in: dict = {}  # (mb, chunk) -> received activation not yet consumed
        bwd_in: dict = {}  # (mb, chunk) -> received output gradient not yet consumed
        sends: list = []  # (request, buffer) of the last batch's sends, waited at the next one
        losses: list[torch.Tensor] = []
        for item in split_batches(table):
            if isinstance(item, list):
                self._exchange(item, outputs, grads, fwd_in, bwd_in, sends)
                continue
            key = (item.microbatch, item.chunk)
            stage = self._stage(item.chunk)
            if item.kind == FORWARD:
                x = fwd_in.pop(key).requires_grad_() if stage > 0 else None
                out = self.forward_fn(self.stages[item.chunk], x, microbatches[item.microbatch])
                if stage == last:
                    out = loss_fn(out, microbatches[item.microbatch])
                    if out.dim() != 0:
                        raise ValueError(f"loss_fn must return a scalar, got shape {out.shape}")
                    losses.append(out.detach())
                else:
                    out = self._check_boundary(out, "stage output", key)
                inputs[key], outputs[key] = x, out
                if self.check and len(outputs) > bound:
                    raise AssertionError(
                        f"pipeline rank {self.rank}: {len(outputs)} micro-batches in flight, "
                        f"schedule bound {bound}"
                    )
            elif item.kind == BACKWARD:
                x, out = inputs.pop(key), outputs.pop(key)
                grad = None if stage == last else bwd_in.pop(key)
                if self.grad_sync is not None:
                    self.grad_sync(key in final_bwd)
                torch.autograd.backward(out, grad_tensors=grad)
                del out, grad
                if stage > 0:
                    if x.grad is None:
                        raise RuntimeError(
                            f"pipeline stage {stage}: the output does not depend on the input "
                            "activation, so no gradient can flow to the previous stage"
                        )
                    grads[key] = self._check_boundary(x.grad, "input gradient", key)
                del x
            else:
                raise ValueError(f"unknown compute action {item.kind!r}")
        for req, _ in sends:
            req.wait()
        leftover = {
            n: len(d)
            for n, d in [
                ("inputs", inputs),
                ("outputs", outputs),
                ("grads", grads),
                ("fwd_in", fwd_in),
                ("bwd_in", bwd_in),
            ]
            if d
        }
        if leftover:
            raise RuntimeError(f"pipeline step ended with unconsumed tensors: {leftover}")
        return losses

    @torch.no_grad()
    def forward(self, microbatches: list[dict], fn: Callable[[torch.Tensor, dict], object]) -> list:
        """Forward-only pass over the pipeline (evaluation; put the stages in eval mode first).

        fn(logits, microbatch) -> anything (a loss, a dict of metric sums), called on the last
        stage; returns its results in micro-batch order there, [] elsewhere. Activations are
        dropped as soon as they are sent."""
        table = schedule(self.pp, self.rank, len(microbatches), self.v, forward_only=True)
        last = self.num_stages - 1
        outputs: dict = {}  # (mb, chunk) -> output awaiting its send
        fwd_in: dict = {}  # (mb, chunk) -> received activation
        sends: list = []
        results = []
        for item in split_batches(table):
            if isinstance(item, list):
                self._exchange(item, outputs, {}, fwd_in, {}, sends, keep=False)
                continue
            key = (item.microbatch, item.chunk)
            stage = self._stage(item.chunk)
            x = fwd_in.pop(key) if stage > 0 else None
            mb = microbatches[item.microbatch]
            out = self.forward_fn(self.stages[item.chunk], x, mb)
            if stage == last:
                results.append(fn(out, mb))
            else:
                outputs[key] = self._check_boundary(out, "stage output", key)
        for req, _ in sends:
            req.wait()
        if outputs or fwd_in:
            raise RuntimeError(f"forward pass ended with {len(outputs) + len(fwd_in)} tensors left")
        return results


def run_pipeline_step(
    stages: list[nn.Module],
    microbatches: list[dict],
    loss_fn: LossFn,
    dims: ParallelDims,
    tensor_shape: tuple[int, ...],
    **kwargs,
) -> list[torch.Tensor]:
    """One-off form of `PipelineExecutor(stages, dims, tensor_shape, **kwargs).step(...)`; a
    trainer should keep the executor (its constructor runs one collective on the pipeline group)."""
    return PipelineExecutor(stages, dims, tensor_shape, **kwargs).step(microbatches, loss_fn)


def pipeline_loss(
    losses: list[torch.Tensor], dims: ParallelDims, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Sum of the step's micro-batch losses, made available on every pipeline rank (broadcast
    from the last stage over the pipeline group). Reduction over DP stays with the caller."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for loss in losses:
        total += loss.double().to(device)
    if dims.pp > 1:
        dist.broadcast(total, src=dims.pp_ranks[-1], group=dims.pp_group)
    return total
