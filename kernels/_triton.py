"""Whether Triton is importable, and whether a tensor should take the Triton path."""

import os

import torch

try:  # Triton ships for Linux only; elsewhere every op runs its reference.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the platform
    HAS_TRITON = False

# Read once: the interpreter is chosen by the environment before triton is imported anyway.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(x: torch.Tensor) -> bool:
    """True when `x` should go through a Triton kernel: CUDA tensors, or CPU under the interpreter."""
    return HAS_TRITON and (x.is_cuda or INTERPRET)
