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

from kernels.adamw import fused_adamw
from train.config import OptimizerConfig

KINDS = ("master", "exp_avg", "exp_avg_sq")


def no_weight_decay(name: str, p: torch.Tensor) -> bool:
    """Norm weights (and biases, were there any): every parameter with fewer than 2 dims."""
    return p.ndim < 2


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
        decay = [(n, p) for n, p in named_params if not no_weight_decay(n, p)]
        no_decay = [(n, p) for n, p in named_params if no_weight_decay(n, p)]
        self.groups = [
            g for g in (_Group(decay, cfg.weight_decay), _Group(no_decay, 0.0)) if g.numel
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
                    t = read(kind, name, p)
                    if tuple(t.shape) != tuple(p.shape):
                        raise ValueError(
                            f"optimizer state {kind}/{name}: shape {tuple(t.shape)}, parameter "
                            f"has {tuple(p.shape)}"
                        )
                    g.buffer(kind)[off : off + p.numel()].copy_(t.reshape(-1))
            if g.model_out is not None:
                g.model_out.copy_(g.master)

    @torch.no_grad()
    def sync_master_from_model(self) -> None:
        """After the model weights were overwritten (a weights-only load): masters = weights."""
        for g in self.groups:
            if g.model_out is not None:
                g.master.copy_(g.model_flat)
