"""Whether Triton is importable, and whether a tensor should take the Triton path."""

import functools
import os

import torch

# FMA contraction ("fp fusion") is on by default up to Triton 3.9, which warns that 3.10 turns it
# off. The kernels were written, tested against their tolerances and tuned with it on: keep it
# on, unless the environment chooses (set before any kernel compiles; Triton reads it then).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

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


def on_tensor_device(launcher):
    """Decorator for a function that launches Triton kernels: runs it with the CUDA device of its
    first tensor argument current. A Triton launch goes to the *current* device and its current
    stream, not to its tensors' device: with x on cuda:1 while cuda:0 is current (`--device
    cuda:1` without set_device, a second model copy) the kernel would run on cuda:0 against
    cuda:1 memory -- an illegal address, or a race with cuda:1's stream where peer access is on.
    CPU tensors (the interpreter) run the function as it is."""

    @functools.wraps(launcher)
    def guarded(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is None or not first.is_cuda:
            return launcher(*args, **kwargs)
        with torch.cuda.device(first.device):
            return launcher(*args, **kwargs)

    return guarded


def wide_offsets(t: torch.Tensor, dims: tuple[int, ...] = (1,), extra: int = 0) -> bool:
    """True when an offset a kernel forms from int32 indices over `dims` of `t` can pass 2^31
    elements: sum of (size - 1) * |stride| over `dims`, plus `extra` (what else the kernel adds
    in int32, e.g. a few tokens). The kernels index rows (tokens) in int64 but columns and heads
    in int32, which is exact for any dense layout; a view with a column or head stride in the
    millions (a transposed or head-major tensor) is the exception, and the launchers copy it to
    a dense layout instead of paying int64 index math on every launch."""
    off = sum((t.shape[d] - 1) * abs(t.stride(d)) for d in dims if t.shape[d] > 0)
    return off + extra >= 2**31


if HAS_TRITON:
    import triton.language as tl

    _INTERPRET = tl.constexpr(INTERPRET)

    @triton.jit
    def to_out(x, dtype: tl.constexpr):
        """Cast fp32 `x` to the output dtype for a store.

        The GPU rounds fp32 -> bf16 to nearest even (cvt.rn); the interpreter's cast truncates,
        which would make CPU tests see up to 1 ulp of bf16 error that the GPU never makes. Round
        by hand under the interpreter only; compiled kernels take the plain cast.
        """
        if _INTERPRET:
            if dtype == tl.bfloat16:
                bits = x.to(tl.uint32, bitcast=True)
                bits = tl.where(x == x, bits, 0x7FC00000)  # any NaN -> the quiet NaN: no carry out
                bits = bits + 0x7FFF + ((bits >> 16) & 1)
                return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return x.to(dtype)
