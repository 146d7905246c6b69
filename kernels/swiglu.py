"""SwiGLU. (Triton kernel pending: issue 4; reference path for now.)"""

import torch

from kernels import reference


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: (..., 2*ffn) laid out [gate | up] -> silu(gate) * up: (..., ffn)."""
    return reference.swiglu(gate_up)
