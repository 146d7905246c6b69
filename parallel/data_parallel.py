"""fp32 gradient buffer with data-parallel reduction."""

import torch
import torch.distributed as dist
import torch.nn as nn


class GradBuffer:
    """Flat fp32 gradient accumulation for `params` (in order); `p.main_grad` is a view into it.

    A post-accumulate hook adds each p.grad into p.main_grad and frees p.grad, so bf16 models
    accumulate micro-batches in fp32. `finish()` sums main grads over the data-parallel group
    (the loss is already normalised by the global token count, so a sum is the right reduction).
    """

    def __init__(self, params: list[nn.Parameter], dp_group=None):
        self.params = list(params)
        self.dp_group = dp_group
        device = self.params[0].device if self.params else torch.device("cpu")
        numel = sum(p.numel() for p in self.params)
        self.buffer = torch.zeros(numel, dtype=torch.float32, device=device)
        offset = 0
        for p in self.params:
            p.main_grad = self.buffer[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            p.register_post_accumulate_grad_hook(self._accumulate)

    @staticmethod
    def _accumulate(p: nn.Parameter) -> None:
        p.main_grad.add_(p.grad)
        p.grad = None

    def zero(self) -> None:
        self.buffer.zero_()

    def finish(self) -> None:
        if self.dp_group is not None and dist.get_world_size(self.dp_group) > 1:
            dist.all_reduce(self.buffer, group=self.dp_group)
