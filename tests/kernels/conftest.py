"""Shared helpers for kernel tests.

Devices: "cpu" runs the Triton kernels in the interpreter (only when TRITON_INTERPRET=1, which
`make test` sets for tests/kernels); "cuda" runs them on a GPU and carries the `gpu` marker
(`make test-gpu`). Use the `device` fixture and the helpers below in every kernel test.
"""

import pytest
import torch

from kernels import tuning
from kernels._triton import HAS_TRITON, INTERPRET


def _devices():
    params = []
    if HAS_TRITON and INTERPRET:
        params.append(pytest.param("cpu", id="cpu-interpret"))
    params.append(
        pytest.param(
            "cuda",
            id="cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
            ],
        )
    )
    return params


@pytest.fixture(params=_devices())
def device(request) -> str:
    return request.param


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill `t` with NaN (floating) or a sentinel (integer) so an unwritten element fails a test."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(-(2**30))


def poisoned_empty(*shape, dtype, device) -> torch.Tensor:
    return poison(torch.empty(*shape, dtype=dtype, device=device))


def framed(rows: int, cols: int, dtype, device, like: torch.Tensor | None = None, edge=None):
    """(buffer, view): a (rows, cols) view at the front of a (rows + 1, cols + 5) buffer whose
    rest (a band after each row, a row after the last) holds `edge`. The view holds `like`, or
    NaN for an output. Inputs take the default edge, NaN, so a read past a row's end or past the
    last row shows up in the result; outputs take a finite edge, so that `frame_intact` sees any
    write there, a NaN read from an input's frame included. `view[0]` of a one-row frame is a
    1-D buffer with the edge behind its end."""
    buf = poisoned_empty(rows + 1, cols + 5, dtype=dtype, device=device)
    if edge is not None:
        buf.fill_(edge)
    view = buf[:rows, :cols]
    if like is None:
        poison(view)
    else:
        view.copy_(like.reshape(rows, cols))
    return buf, view


# The `edge` of an output's frame: a value no kernel here writes, exact in fp16 and bf16 (so a
# bf16 buffer filled with it compares equal to it however the comparison promotes).
OUT_EDGE = -768.0


def frame_intact(buf: torch.Tensor, rows: int, cols: int, edge=None) -> bool:
    """Every element of `framed`'s buffer outside its (rows, cols) view still holds `edge`."""
    outside = torch.ones(buf.shape, dtype=torch.bool, device=buf.device)
    outside[:rows, :cols] = False
    rest = buf[outside]
    return bool((rest.isnan() if edge is None else rest == edge).all())


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_close_to_ref(
    out: torch.Tensor,
    ref_fp32: torch.Tensor,
    ref_lowp: torch.Tensor,
    atol: float = 1e-5,
    name: str = "out",
):
    """The flash-attention rule: the kernel's error against the fp32 reference is at most twice the
    low-precision PyTorch reference's own error, plus a small atol. NaNs anywhere fail."""
    assert out.shape == ref_fp32.shape, (
        f"{name}: shape {tuple(out.shape)} != {tuple(ref_fp32.shape)}"
    )
    assert torch.isfinite(out.float()).all(), f"{name}: non-finite values (unwritten output?)"
    err = max_err(out, ref_fp32)
    base = max_err(ref_lowp, ref_fp32)
    assert err <= 2 * base + atol, (
        f"{name}: kernel error {err:.3e} > 2 x reference error {base:.3e} + {atol:.1e}"
    )


# Tolerances for the `atol` term per dtype (the "small atol" of the pass rule).
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.fixture
def fake_card(tmp_path, monkeypatch):
    """A CUDA card 'NVIDIA Fake' whose table is tmp_path/nvidia-fake.json (no GPU needed: only the
    lookup runs)."""
    path = tmp_path / "nvidia-fake.json"
    monkeypatch.setattr(tuning, "_card_table_path", lambda index, directory: path)
    monkeypatch.setattr(tuning, "_card_name", lambda index: "NVIDIA Fake", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    tuning.load_table.cache_clear()
    yield path
    tuning.load_table.cache_clear()
