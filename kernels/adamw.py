"""Fused AdamW over flat fp32 buffers. (Triton kernel pending: issue 4; reference path for now.)"""

import torch

from kernels import reference


def fused_adamw(
    params: torch.Tensor,
    grads: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: float | torch.Tensor = 1.0,
    found_inf: torch.Tensor | None = None,
    model_out: torch.Tensor | None = None,
) -> None:
    """One AdamW step in place over flat (n,) buffers; see reference.adamw for the semantics."""
    reference.adamw(
        params, grads, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, step=step, grad_scale=grad_scale, found_inf=found_inf,
        model_out=model_out,
    )
