"""RMSNorm. (Triton kernel pending: issue 4; reference path for now.)"""

import torch

from kernels import reference


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x: (..., hidden), weight: (hidden,) -> (..., hidden) in x's dtype."""
    return reference.rmsnorm(x, weight, eps)
