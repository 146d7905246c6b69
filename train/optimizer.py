"""AdamW over flat fp32 master buffers, driven by `kernels.adamw.fused_adamw`.

Two groups: matrices get weight decay, 1-D parameters (the RMSNorm weights; this model has no
biases) get none, as Megatron's no-weight-decay rule. Each group owns one flat buffer of the
model dtype and the model's parameters are re-pointed to views of it, so one kernel launch per
group updates everything:

- fp32 model (CPU): the flat model buffer *is* the master buffer; nothing is copied.
- bf16 model (GPU): an fp32 master copy, fp32 moments; the kernel writes the new bf16 weights
  into the model buffer in the same pass (`model_out`).

Gradients come from `p.main_grad` (the fp32 GradBuffer). When the parameters were handed to the
GradBuffer in `params_in_order()` order, each group's gradients are one contiguous slice of it
and are used in place; otherwise they are gathered into a flat copy.
"""

import torch
import torch.nn as nn

from kernels import reference as kernels_reference
from kernels.adamw import fused_adamw
from parallel.comm import all_gather_single
from parallel.data_parallel import GradBuffer
from train.config import OptimizerConfig

KINDS = ("master", "exp_avg", "exp_avg_sq")


def no_weight_decay(name: str, p: torch.Tensor) -> bool:
    """Norm weights (and biases, were there any): every parameter with fewer than 2 dims."""
    return p.ndim < 2


def split_by_decay(named_params: list[tuple[str, nn.Parameter]]) -> tuple[list, list]:
    """(weight-decayed, not decayed) (name, parameter) pairs, each in the given order."""
    decay = [(n, p) for n, p in named_params if not no_weight_decay(n, p)]
    return decay, [(n, p) for n, p in named_params if no_weight_decay(n, p)]


def param_order(named_params: list[tuple[str, nn.Parameter]]) -> list[tuple[str, nn.Parameter]]:
    """The order both optimizers lay parameters out in: the decayed group, then the rest."""
    decay, no_decay = split_by_decay(named_params)
    return decay + no_decay


def _read_flat(read, kind: str, name: str, p: nn.Parameter) -> torch.Tensor:
    """`read(kind, name, p)` (a checkpoint's whole tensor), checked against p's shape, flat."""
    t = read(kind, name, p)
    if tuple(t.shape) != tuple(p.shape):
        raise ValueError(
            f"optimizer state {kind}/{name}: shape {tuple(t.shape)}, parameter has {tuple(p.shape)}"
        )
    return t.reshape(-1)


def _flat_view(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """A 1-D view over `tensors` when they lie back to back in one storage, else None."""
    first = tensors[0]
    storage = first.untyped_storage()
    expected = first.data_ptr()
    total = 0
    for t in tensors:
        if (
            not t.is_contiguous()
            or t.dtype != first.dtype
            or t.untyped_storage().data_ptr() != storage.data_ptr()
        ):
            return None
        if t.data_ptr() != expected:
            return None
        expected += t.numel() * t.element_size()
        total += t.numel()
    flat = torch.empty(0, dtype=first.dtype, device=first.device)
    flat.set_(storage, first.storage_offset(), (total,), (1,))
    return flat


class _Group:
    def __init__(self, named: list[tuple[str, nn.Parameter]], weight_decay: float):
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.weight_decay = weight_decay
        self.numel = sum(p.numel() for p in self.params)
        dtype = self.params[0].dtype
        device = self.params[0].device
        self.model_flat = torch.empty(self.numel, dtype=dtype, device=device)
        offset = 0
        self.offsets = []
        with torch.no_grad():
            for p in self.params:
                view = self.model_flat[offset : offset + p.numel()].view_as(p)
                view.copy_(p.data)
                p.data = view
                self.offsets.append(offset)
                offset += p.numel()
        if dtype == torch.float32:
            self.master = self.model_flat
            self.model_out = None
        else:
            self.master = self.model_flat.float()
            self.model_out = self.model_flat
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)

    def buffer(self, kind: str) -> torch.Tensor:
        return {"master": self.master, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}[kind]

    def grads(self) -> torch.Tensor:
        grads = [p.main_grad for p in self.params]
        flat = _flat_view(grads)
        return flat if flat is not None else torch.cat([g.reshape(-1) for g in grads])


class FlatAdamW:
    """AdamW with fp32 master weights and moments in flat buffers (see the module docstring).

    named_params: (global name, parameter) of this rank, model dtype already set (fp32 or bf16).
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], cfg: OptimizerConfig):
        self.cfg = cfg
        decay, no_decay = split_by_decay(named_params)
        self.groups = [  # an empty group is left out (a _Group needs a parameter)
            _Group(named, wd) for named, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)) if named
        ]
        self.step_count = 0  # optimizer steps taken (skipped steps do not count)

    def params_in_order(self) -> list[nn.Parameter]:
        """The order to give the GradBuffer, so each group's gradients are one contiguous slice."""
        return [p for g in self.groups for p in g.params]

    def named_params(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for g in self.groups for n, p in zip(g.names, g.params)]

    @torch.no_grad()
    def step(self, lr: float, grad_scale: float = 1.0) -> None:
        """One update of every group; grad_scale multiplies the gradients (the clip factor)."""
        self.step_count += 1
        for g in self.groups:
            fused_adamw(
                g.master, g.grads(), g.exp_avg, g.exp_avg_sq,
                lr=lr, beta1=self.cfg.beta1, beta2=self.cfg.beta2, eps=self.cfg.eps,
                weight_decay=g.weight_decay, step=self.step_count, grad_scale=grad_scale,
                model_out=g.model_out,
            )  # fmt: skip

    def state_bytes(self) -> int:
        """Bytes of state this optimizer holds beyond the model's weights (masters, moments)."""
        total = 0
        for g in self.groups:
            own = [g.exp_avg, g.exp_avg_sq] + ([g.master] if g.model_out is not None else [])
            total += sum(t.numel() * t.element_size() for t in own)
        return total

    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """kind -> global name -> fp32 tensor of the parameter's local shape (views, no copy)."""
        out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in KINDS}
        for g in self.groups:
            for name, p, off in zip(g.names, g.params, g.offsets):
                for kind in KINDS:
                    out[kind][name] = g.buffer(kind)[off : off + p.numel()].view(p.shape)
        return out

    @torch.no_grad()
    def load_state_tensors(self, read) -> None:
        """Fill master weights and moments from `read(kind, name, param) -> tensor` and refresh
        the model weights from the masters."""
        for g in self.groups:
            for name, p, off in zip(g.names, g.params, g.offsets):
                for kind in KINDS:
                    g.buffer(kind)[off : off + p.numel()].copy_(_read_flat(read, kind, name, p))
            if g.model_out is not None:
                g.model_out.copy_(g.master)

    @torch.no_grad()
    def sync_master_from_model(self) -> None:
        """After the model weights were overwritten (a weights-only load): masters = weights."""
        for g in self.groups:
            if g.model_out is not None:
                g.master.copy_(g.model_flat)


def host_adamw(params: torch.Tensor, grads: torch.Tensor, exp_avg: torch.Tensor,
               exp_avg_sq: torch.Tensor, *, step: torch.Tensor, lr: float, beta1: float,
               beta2: float, eps: float, weight_decay: float) -> None:  # fmt: skip
    """The AdamW update of `kernels.reference.adamw` on CPU tensors, in one pass where torch has
    its fused CPU kernel (the reference makes eight; measured here, 0.29 against 1.39 ms per
    million fp32 values). step: the 1-based step count as a 0-d float tensor."""
    fused = getattr(torch, "_fused_adamw_", None)
    if fused is None:
        kernels_reference.adamw(params, grads, exp_avg, exp_avg_sq, lr=lr, beta1=beta1,
                                beta2=beta2, eps=eps, weight_decay=weight_decay,
                                step=int(step))  # fmt: skip
        return
    fused([params], [grads], [exp_avg], [exp_avg_sq], [], [step], lr=lr, beta1=beta1,
          beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False,
          grad_scale=None, found_inf=None)  # fmt: skip


class ShardedAdamW:
    """The distributed optimizer (ZeRO stage 1, Megatron's `--use_distributed_optimizer`): the
    fp32 master weights and both moments are split over the data-parallel ranks, so each rank
    keeps 12 / DP bytes of optimizer state per parameter instead of 12.

    It adopts the layout of `grads`, a `GradBuffer(..., shard_over_dp=True)` built over
    `param_order(named_params)`: the model's parameters are re-pointed to views of one flat
    buffer laid out exactly like the gradient buffer (buckets padded to a multiple of 128 x DP,
    so every rank's piece starts 128-aligned), and DP rank r updates piece r of every bucket --
    the pieces whose reduced gradients the buffer's reduce-scatter left in `grads.local_grad`.
    The new weights of each piece are then all-gathered into every rank's model buffer, one
    collective per bucket. The update is the same kernel as `FlatAdamW`'s (two launches: the
    decayed elements come first in the local order, the norm weights after): the two agree to
    the last bit at DP 1, and at DP > 1 up to the order in which the reduce-scatter and the
    all-reduce sum the ranks' gradients.

    `state_tensors()` and `load_state_tensors()` use the checkpoint format of `FlatAdamW` (whole
    per-parameter tensors), so a checkpoint moves freely between the two and across DP sizes.

    With `cfg.cpu_offload` (`--optimizer_cpu_offload`) the masters and moments live in host
    memory and the update runs on the CPU (torch's fused CPU AdamW, one pass), chunk by chunk:
    the reduced fp32 gradients come over in pinned chunks, the next chunk's copy running while
    the CPU updates this one, and the new weights go back in the model dtype. The GPU then holds
    only the weights and the gradient buffer: 6 B per parameter at DP 1, so Llama-2-7B's states
    take 38 GiB of an 80 GB card instead of 113 GiB.
    """

    OFFLOAD_CHUNK = 1 << 22  # elements per host round trip: 16 MB of fp32 gradient

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], cfg: OptimizerConfig,
                 grads: GradBuffer):  # fmt: skip
        if [id(p) for _, p in named_params] != [id(p) for p in grads.params]:
            raise ValueError(
                "ShardedAdamW needs the GradBuffer built over the same parameters in the same "
                "order: GradBuffer([p for _, p in param_order(named)], ..., shard_over_dp=True)"
            )
        if not grads.sharded:
            raise ValueError("ShardedAdamW needs a GradBuffer built with shard_over_dp=True")
        self.cfg, self.grads = cfg, grads
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.step_count = 0
        self.group, self.dp = grads.dp_group, grads.dp_size
        self.dp_rank = grads.dp_rank
        first = self.params[0]
        dtype, device = first.dtype, first.device
        self.model_flat = torch.zeros(grads.buffer.numel(), dtype=dtype, device=device)
        with torch.no_grad():
            for p in self.params:
                off = grads.offset(p)
                view = self.model_flat[off : off + p.numel()].view_as(p)
                view.copy_(p.data)
                p.data = view
        self.pieces = grads.bucket_pieces()
        self.offload = cfg.cpu_offload
        if self.dp == 1 and not self.offload:
            # the shard is everything: FlatAdamW's arrangement, nothing to gather
            self.master = self.model_flat if dtype == torch.float32 else self.model_flat.float()
            self.model_out = None if dtype == torch.float32 else self.model_flat
        else:
            state_device = torch.device("cpu") if self.offload else device
            self.master = torch.empty(grads.shard_numel, dtype=torch.float32, device=state_device)
            if self.dp == 1:  # offloaded: the host writes the weights straight into the model
                self.model_out = self.model_flat
            elif dtype == torch.float32 and not self.offload:
                self.model_out = None  # the masters are gathered themselves
            else:  # the pieces' new weights, on the device, for the all-gather
                self.model_out = torch.empty(grads.shard_numel, dtype=dtype, device=device)
            self.sync_master_from_model()
        if self.offload:
            pin = device.type == "cuda"  # pinned: the copies run asynchronously, at full speed
            self.chunk = self.OFFLOAD_CHUNK
            n = min(self.chunk, grads.shard_numel)
            self._grad_host = [torch.empty(n, pin_memory=pin) for _ in range(2)]
            self._out_host = [torch.empty(n, dtype=dtype, pin_memory=pin) for _ in range(2)]
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)

        # The local order follows the buffer, so the decayed elements come first: cut at the
        # first no-decay parameter's offset (padding before it is zero and stays zero).
        no_decay = [p for n, p in named_params if no_weight_decay(n, p)]
        cut = grads.offset(no_decay[0]) if no_decay else grads.buffer.numel()
        split = sum(min(max(cut - first, 0), n) for _, _, first, _, n in self.pieces)
        self.segments = [
            (lo, hi, wd)
            for lo, hi, wd in ((0, split, cfg.weight_decay), (split, grads.shard_numel, 0.0))
            if hi > lo
        ]

    def params_in_order(self) -> list[nn.Parameter]:
        return list(self.params)

    def named_params(self) -> list[tuple[str, nn.Parameter]]:
        return list(zip(self.names, self.params))

    def buffer(self, kind: str) -> torch.Tensor:
        return {"master": self.master, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}[kind]

    def state_bytes(self) -> int:
        """Bytes of state this optimizer holds on the model's device beyond the weights: this
        rank's share of masters and moments (unless offloaded), and the staging copy of its new
        weights."""
        own = [] if self.offload else [self.exp_avg, self.exp_avg_sq]
        if not self.offload and self.master.data_ptr() != self.model_flat.data_ptr():
            own.append(self.master)
        if self.model_out is not None and self.model_out.data_ptr() != self.model_flat.data_ptr():
            own.append(self.model_out)
        return sum(t.numel() * t.element_size() for t in own)

    def host_state_bytes(self) -> int:
        """Bytes in host memory: the offloaded masters and moments, and the pinned chunks."""
        if not self.offload:
            return 0
        own = [self.master, self.exp_avg, self.exp_avg_sq, *self._grad_host, *self._out_host]
        return sum(t.numel() * t.element_size() for t in own)

    @torch.no_grad()
    def step(self, lr: float, grad_scale: float = 1.0) -> None:
        """Update this rank's shard from `grads.local_grad`, then all-gather the new weights.
        Collective over the DP group (every DP rank steps, or none)."""
        self.step_count += 1
        if self.offload:
            self._step_on_host(lr, grad_scale)
            self._gather_weights()
            return
        grad = self.grads.local_grad
        for lo, hi, wd in self.segments:
            fused_adamw(
                self.master[lo:hi], grad[lo:hi], self.exp_avg[lo:hi], self.exp_avg_sq[lo:hi],
                lr=lr, beta1=self.cfg.beta1, beta2=self.cfg.beta2, eps=self.cfg.eps,
                weight_decay=wd, step=self.step_count, grad_scale=grad_scale,
                model_out=None if self.model_out is None else self.model_out[lo:hi],
            )  # fmt: skip
        self._gather_weights()

    def _step_on_host(self, lr: float, grad_scale: float) -> None:
        """The offloaded update, chunk by chunk (class docstring). Two pinned slots each way: the
        gradient copy of chunk i + 1 is issued before chunk i is updated, and a slot's outgoing
        weights are overwritten only after their copy to the device has finished."""
        grad, out = self.grads.local_grad, self.model_out
        cuda = grad.is_cuda
        chunks = [(a, min(a + self.chunk, hi), wd) for lo, hi, wd in self.segments
                  for a in range(lo, hi, self.chunk)]  # fmt: skip
        arrived: list = [None, None]  # per slot: the event after its gradient copy
        sent: list = [None, None]  # per slot: the event after its weights' copy

        def fetch(i: int) -> None:
            a, b, _ = chunks[i]
            self._grad_host[i % 2][: b - a].copy_(grad[a:b], non_blocking=cuda)
            if cuda:  # on the stream the copy went to: grad's device's, whichever is current
                arrived[i % 2] = torch.cuda.Event()
                arrived[i % 2].record(torch.cuda.current_stream(grad.device))

        fetch(0)
        step = torch.tensor(float(self.step_count))
        for i, (a, b, wd) in enumerate(chunks):
            slot, n = i % 2, b - a
            if cuda:
                arrived[slot].synchronize()
            if i + 1 < len(chunks):
                fetch(i + 1)  # the other slot: its chunk i - 1 was updated already
            g = self._grad_host[slot][:n]
            if grad_scale != 1.0:
                g.mul_(grad_scale)
            host_adamw(self.master[a:b], g, self.exp_avg[a:b], self.exp_avg_sq[a:b], step=step,
                       lr=lr, beta1=self.cfg.beta1, beta2=self.cfg.beta2, eps=self.cfg.eps,
                       weight_decay=wd)  # fmt: skip
            if sent[slot] is not None:
                sent[slot].synchronize()
            staged = self._out_host[slot][:n]
            staged.copy_(self.master[a:b])
            out[a:b].copy_(staged, non_blocking=cuda)
            if cuda:
                sent[slot] = torch.cuda.Event()
                sent[slot].record(torch.cuda.current_stream(out.device))
        for ev in sent:  # the slots are free again before the next step writes them
            if ev is not None:
                ev.synchronize()

    def _gather_weights(self) -> None:
        """Every rank's new pieces into every rank's model buffer (nothing to do at DP 1)."""
        if self.dp == 1:
            return
        source = self.master if self.model_out is None else self.model_out
        works = [
            all_gather_single(
                self.model_flat[start:end],
                source[local : local + n],
                group=self.group,
                async_op=True,
            )  # fmt: skip
            for start, end, _, local, n in self.pieces
        ]
        for w in works:
            w.wait()

    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """kind -> global name -> fp32 tensor of the parameter's local shape, as FlatAdamW's,
        on DP rank 0 (in host memory; the other DP ranks get empty dicts: the checkpoint writes
        the optimizer state from DP rank 0). Collective over the DP group: each kind is
        all-gathered one bucket at a time, so the device holds one extra bucket at most."""
        out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in KINDS}
        if self.dp == 1:
            for kind in KINDS:
                buf = self.buffer(kind)
                for name, p in zip(self.names, self.params):
                    off = self.grads.offset(p)
                    out[kind][name] = buf[off : off + p.numel()].view(p.shape)
            return out
        longest = max(end - start for start, end, _, _, _ in self.pieces)
        staging = torch.empty(longest, dtype=torch.float32, device=self.model_flat.device)
        for kind in KINDS:
            local = self.buffer(kind)
            full = torch.empty(self.model_flat.numel(), dtype=torch.float32) if (
                self.dp_rank == 0
            ) else None  # fmt: skip
            for start, end, _, lo, n in self.pieces:
                tmp = staging[: end - start]
                piece = local[lo : lo + n].to(staging.device)  # offloaded: via the device
                all_gather_single(tmp, piece, group=self.group)
                if full is not None:
                    full[start:end].copy_(tmp)
            if full is not None:
                for name, p in zip(self.names, self.params):
                    off = self.grads.offset(p)
                    out[kind][name] = full[off : off + p.numel()].view(p.shape)
        return out

    @torch.no_grad()
    def load_state_tensors(self, read) -> None:
        """Fill this rank's shard of the master weights and moments from
        `read(kind, name, param) -> whole tensor` (parameters this shard has no piece of are not
        read), then refresh the model weights from the masters (collective over DP)."""
        for name, p in zip(self.names, self.params):
            where = self.grads.shard_slice(p)
            if where is None:
                continue
            lo, hi, first = where
            for kind in KINDS:
                piece = _read_flat(read, kind, name, p)[first : first + hi - lo]
                self.buffer(kind)[lo:hi].copy_(piece)
        if self.model_out is not None:
            self.model_out.copy_(self.master)
        self._gather_weights()

    @torch.no_grad()
    def sync_master_from_model(self) -> None:
        """After the model weights were overwritten (a weights-only load): masters = weights."""
        if self.dp == 1 and not self.offload:
            if self.model_out is not None:
                self.master.copy_(self.model_flat)
            return
        for _, _, first, local, n in self.pieces:
            self.master[local : local + n].copy_(self.model_flat[first : first + n])
