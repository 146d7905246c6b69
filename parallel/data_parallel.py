"""fp32 gradient buffer with bucketed data-parallel all-reduce overlapped with the backward.

    buf = GradBuffer(params, dims.dp_group, tp_group=dims.tp_group)
    buf.zero()
    for i, mb in enumerate(micro_batches):
        buf.set_sync(i == len(micro_batches) - 1)  # or `with buf.no_sync():` but for the last
        loss(mb).backward()                        # the last backward launches the all-reduces
    buf.finish()                                   # waits; every p.main_grad is now reduced

Layout: one flat fp32 buffer, parameters in the given order (so an optimizer's parameter groups
can be contiguous slices of it), cut into buckets of about `bucket_mb` MB taken from the *end*:
bucket 0 holds the last parameters, whose gradients the backward produces first. On the synced
micro-batch each parameter's post-accumulate hook adds p.grad into p.main_grad; when a bucket's
last parameter is in, its asynchronous all-reduce starts while the backward goes on. Every DP
rank runs the same graph, so the hooks fire -- and the collectives are issued -- in the same
order on all of them (the rule NCCL and gloo need, and what Megatron relies on too).

The reduction is a SUM: the trainer divides the loss by the global batch's loss-mask token count
(all micro-batches, all DP ranks; `all_reduce_sum` that count over DP first), so summing the
ranks' gradients gives the gradient of the global mean.

With `fuse_weight_grads=True` each parameter also gets `p.accumulate_weight_grad(dy, x)`: linear
layers (`kernels.linear`, `parallel.layers`) call it from their backward, and the weight-gradient
GEMM accumulates into p.main_grad in fp32 directly (Megatron's gradient-accumulation fusion); no
bf16 p.grad is made, and the bucket bookkeeping is the hook's. Parameters that are not linear
weights (embedding, norms) keep the hook path.

Sequence-parallel norm weights (`p.sequence_parallel`) hold per-token-shard partial gradients on
each TP rank; `finish()` sums them over `tp_group` in one coalesced all-reduce per step (instead
of one per norm per micro-batch).

With `shard_over_dp=True` (the distributed optimizer, `train.optimizer.ShardedAdamW`) each
bucket is padded to a multiple of GRAD_ALIGN x DP elements (at DP > 1) and cut into DP equal
pieces, each starting on a GRAD_ALIGN boundary; DP rank r owns piece r of every bucket. A bucket
is *reduce-scattered* instead of all-reduced: the summed piece lands in `local_grad` (the rank's
pieces back to back, in buffer order), which is all the optimizer of that rank reads. Half the
bytes of an all-reduce; but afterwards `p.main_grad` holds only this rank's own, unreduced
contribution: read the reduced gradients through `local_grad` / `shard_slice(p)`.
"""

import contextlib
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn

from kernels.linear import accumulate_weight_grad
from parallel.comm import group_size, reduce_scatter_single

# Sharded buckets are padded so that each DP piece is a multiple of this many elements: every
# piece then starts 512-byte aligned (fp32) in `buffer` and in `local_grad`, where the
# reduce-scatter (NCCL's vectorised path wants 16-byte-aligned pointers) and the fused AdamW
# (Triton specialises on 16-byte-divisible pointers) read it. Padding to a multiple of DP alone
# put the pieces at arbitrary offsets (any odd DP size). Megatron pads to lcm(DP, 128), which
# aligns the buckets; 128 x DP aligns every piece too, for at most 512 x DP bytes per bucket.
GRAD_ALIGN = 128


class GradBuffer:
    """Flat fp32 gradient accumulation for `params`; `p.main_grad` is a view into `.buffer`,
    parameters back to back in the given order."""

    def __init__(
        self,
        params: list[nn.Parameter],
        dp_group=None,
        tp_group=None,
        bucket_mb: float = 25.0,
        fuse_weight_grads: bool = False,
        shard_over_dp: bool = False,
    ):
        self.params = [p for p in params if p.requires_grad]
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("GradBuffer got the same parameter twice")
        self._sp = [p for p in self.params if getattr(p, "sequence_parallel", False)]
        if self._sp and group_size(tp_group) != self._sp[0].tp_size:
            raise ValueError(
                f"{len(self._sp)} sequence-parallel norm weights need their gradients summed over "
                f"the tensor-parallel group (size {self._sp[0].tp_size}): build the buffer as "
                "GradBuffer(params, dims.dp_group, tp_group=dims.tp_group)"
            )
        self.dp_group, self.tp_group = dp_group, tp_group
        self.sharded = shard_over_dp
        self.dp_size = group_size(dp_group)
        self.dp_rank = dist.get_rank(dp_group) if self.dp_size > 1 else 0
        device = self.params[0].device if self.params else torch.device("cpu")

        # Buckets: runs of parameters of about `bucket_mb` MB taken from the end (bucket 0 holds
        # the last parameters); when sharded over DP > 1 each bucket's [start, end) range is
        # padded to a multiple of GRAD_ALIGN x DP, so it splits into DP equal aligned pieces.
        # Unsharded (and DP 1) buckets stay back to back: FlatAdamW reads the gradients in place.
        cap = max(1, int(bucket_mb * 2**20 / 4))
        members: list[list[int]] = []
        size = 0
        for i in reversed(range(len(self.params))):
            if size == 0:
                members.append([])
            members[-1].append(i)
            size += self.params[i].numel()
            if size >= cap:
                size = 0
        pad = GRAD_ALIGN * self.dp_size if shard_over_dp and self.dp_size > 1 else 1
        self._offsets = [0] * len(self.params)
        self._ranges: list[tuple[int, int]] = [(0, 0)] * len(members)
        self._counts = [len(m) for m in members]
        self._bucket_of: dict[int, int] = {}
        offset = 0
        for b in reversed(range(len(members))):  # buffer order: the first parameters first
            start = offset
            for i in reversed(members[b]):
                self._offsets[i] = offset
                self._bucket_of[id(self.params[i])] = b
                offset += self.params[i].numel()
            offset += -(offset - start) % pad
            self._ranges[b] = (start, offset)
        self.buffer = torch.zeros(offset, dtype=torch.float32, device=device)
        self._offset_of = {id(p): o for p, o in zip(self.params, self._offsets)}
        for p, o in zip(self.params, self._offsets):
            p.main_grad = self.buffer[o : o + p.numel()].view_as(p)
            p.register_post_accumulate_grad_hook(self._on_grad)

        # This rank's piece of each bucket: (global start, global end, start in local_grad).
        self._pieces: list[tuple[int, int, int]] = [(0, 0, 0)] * len(members)
        local = 0
        for b in sorted(range(len(members)), key=lambda b: self._ranges[b][0]):
            start, end = self._ranges[b]
            n = (end - start) // self.dp_size if shard_over_dp else end - start
            first = start + (self.dp_rank * n if shard_over_dp else 0)
            self._pieces[b] = (first, first + n, local)
            local += n
        self.shard_numel = local
        if shard_over_dp and self.dp_size > 1:
            self.local_grad = torch.zeros(local, dtype=torch.float32, device=device)
        else:  # the whole buffer is this rank's (not sharded, or DP 1)
            self.local_grad = self.buffer
        self._sp_local = [s for s in map(self.shard_slice, self._sp) if s is not None]
        self.set_fuse_weight_grads(fuse_weight_grads)
        self._sync = True
        self._reset()

    def offset(self, p: nn.Parameter) -> int:
        """Where p's gradient starts in `buffer` (a parameter of the model buffer laid out the
        same way starts there too)."""
        return self._offset_of[id(p)]

    def bucket_pieces(self) -> list[tuple[int, int, int, int, int]]:
        """(bucket start, bucket end, piece start, local start, piece length) of every bucket, in
        buffer order: this rank's piece `buffer[piece : piece + length]` of bucket [start, end)
        is reduced into `local_grad[local : local + length]`."""
        out = []
        for b in sorted(range(len(self._ranges)), key=lambda b: self._ranges[b][0]):
            first, last, local = self._pieces[b]
            out.append((*self._ranges[b], first, local, last - first))
        return out

    def shard_slice(self, p: nn.Parameter) -> tuple[int, int, int] | None:
        """(local start, local end, start in p's flat elements) of the part of p whose reduced
        gradient this rank holds in `local_grad`; None when its shard has none of p."""
        first, last, local = self._pieces[self._bucket_of[id(p)]]
        off = self._offset_of[id(p)]
        lo, hi = max(off, first), min(off + p.numel(), last)
        if lo >= hi:
            return None
        return local + lo - first, local + hi - first, lo - off

    def set_fuse_weight_grads(self, enabled: bool) -> None:
        """Attach (or remove) every parameter's `accumulate_weight_grad` (module docstring);
        takes effect at the next forward."""
        for p in self.params:
            if enabled:
                p.accumulate_weight_grad = partial(self._accumulate_product, p)
            elif hasattr(p, "accumulate_weight_grad"):
                del p.accumulate_weight_grad

    @property
    def num_buckets(self) -> int:
        return len(self._ranges)

    def _reset(self) -> None:
        self._finished = False
        self._pending = list(self._counts)
        self._launched = [False] * len(self._ranges)
        self._works: list = []

    def _on_grad(self, p: nn.Parameter) -> None:
        """The post-accumulate hook: add p.grad into p.main_grad, free it, count it."""
        if p.grad is None:  # nothing arrived through autograd (a fused weight-gradient GEMM)
            return
        self._check_arrival(p)
        p.main_grad.add_(p.grad)
        p.grad = None
        self._arrived(p)

    def _accumulate_product(self, p: nn.Parameter, dy: torch.Tensor, x: torch.Tensor) -> None:
        """A fused linear's backward: p.main_grad += dyᵀ x in fp32, then count it."""
        self._check_arrival(p)
        accumulate_weight_grad(p.main_grad, dy, x)
        self._arrived(p)

    def _check_arrival(self, p: nn.Parameter) -> None:
        problem = None
        b = self._bucket_of[id(p)]
        if self._finished:
            problem = (
                "a backward after GradBuffer.finish(): the gradients were already reduced for "
                "this step; call zero() before the next step's backward"
            )
        elif self._launched[b]:  # synced or not: that reduction would go without it
            problem = (
                "a gradient arrived for a bucket that was already all-reduced this step: call "
                "GradBuffer.set_sync(False) (or use `with buf.no_sync():`) for every micro-batch "
                "but the last"
            )
        if problem is not None:
            p.grad = None  # leave no stale .grad behind to leak into a later backward
            raise RuntimeError(problem)

    def _arrived(self, p: nn.Parameter) -> None:
        b = self._bucket_of[id(p)]
        if self._sync:
            self._pending[b] -= 1
            if self._pending[b] == 0:
                self._launch(b)

    def _launch(self, b: int) -> None:
        self._launched[b] = True
        if self.dp_size > 1:
            start, end = self._ranges[b]
            if self.sharded:
                first, last, local = self._pieces[b]
                out = self.local_grad[local : local + last - first]
                work = reduce_scatter_single(
                    out, self.buffer[start:end], group=self.dp_group, async_op=True
                )
            else:
                work = dist.all_reduce(self.buffer[start:end], group=self.dp_group, async_op=True)
            self._works.append(work)

    def set_sync(self, sync: bool) -> None:
        """False: the following backwards only accumulate (micro-batches before the last)."""
        self._sync = sync

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate without reducing inside the block (micro-batches before the last)."""
        before = self._sync
        self._sync = False
        try:
            yield
        finally:
            self._sync = before

    def zero(self) -> None:
        """Clear the gradients for a new step."""
        if self._works:
            raise RuntimeError("GradBuffer.zero() with all-reduces in flight: call finish() first")
        self.buffer.zero_()
        self._reset()

    def finish(self) -> None:
        """Launch what the hooks did not (no synced micro-batch, or parameters that got no
        gradient), in bucket order; wait for every bucket; then sum the sequence-parallel norm
        grads over TP. Afterwards every main_grad holds the step's reduced gradient (sharded:
        `local_grad` holds this rank's pieces of it, see the module docstring)."""
        for b in range(len(self._ranges)):
            if not self._launched[b]:
                self._launch(b)
        for work in self._works:
            work.wait()
        if self._sp and group_size(self.tp_group) > 1 and (self._sp_local or not self.sharded):
            # Sharded: the pieces of the norm weights this rank holds. Every TP rank of a stage
            # has the same parameter shapes, so the same layout and the same slices.
            grads = [self.local_grad[a:b] for a, b, _ in self._sp_local] if self.sharded else [
                p.main_grad for p in self._sp
            ]  # fmt: skip
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.tp_group)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        self._reset()
        self._finished = True
