"""Triton launches go to the *current* CUDA device, not their tensors' device: every launcher in
kernels/ runs under `on_tensor_device` (the first tensor's device made current). On CPU the
decorator is checked with a tensor that claims to be on cuda:1, and every launch site is checked
in the source; on a machine with two GPUs the kernels run on cuda:1 while cuda:0 is current."""

import ast
import contextlib
from pathlib import Path

import pytest
import torch

from kernels import _triton, reference
from kernels._triton import on_tensor_device

KERNELS = Path(__file__).resolve().parents[2] / "kernels"


class _OnCuda1(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1 (what the guard reads)."""

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", 1)


def _record_device(monkeypatch) -> list:
    entered = []

    @contextlib.contextmanager
    def fake_device(d):
        entered.append(torch.device(d))
        yield

    monkeypatch.setattr(_triton.torch.cuda, "device", fake_device)
    return entered


def test_guard_makes_the_first_tensors_device_current(monkeypatch):
    entered = _record_device(monkeypatch)
    seen = []
    launch = on_tensor_device(lambda n, x, y=None: seen.append((n, x, y)) or "done")
    x = torch.Tensor._make_subclass(_OnCuda1, torch.zeros(3))
    assert launch(7, x) == "done"
    assert entered == [torch.device("cuda", 1)]
    assert launch(7, y=None, x=x) == "done"  # keyword tensors count too
    assert len(entered) == 2 and len(seen) == 2


def test_guard_leaves_cpu_and_tensorless_calls_alone(monkeypatch):
    entered = _record_device(monkeypatch)
    launch = on_tensor_device(lambda *a, **k: "done")
    assert launch(torch.zeros(2), torch.zeros(2)) == "done"
    assert launch(3, scale=1.0) == "done"
    assert entered == []


def _is_launch(node: ast.AST) -> bool:
    """`kernel[grid](...)` (also `_TUNED[key][grid](...)`)."""
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)


def _decorated(fn: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "on_tensor_device" for d in fn.decorator_list)


@pytest.mark.parametrize("path", sorted(KERNELS.glob("*.py")), ids=lambda p: p.name)
def test_every_launch_runs_under_the_guard(path):
    tree = ast.parse(path.read_text())
    funcs = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    jitted = {
        name
        for name, fn in funcs.items()
        if any("jit" in ast.unparse(d) or "autotune" in ast.unparse(d) for d in fn.decorator_list)
    }
    callers: dict[str, set[str]] = {}
    for name, fn in funcs.items():
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                callers.setdefault(node.func.id, set()).add(name)

    def guarded(name: str, seen: frozenset = frozenset()) -> bool:
        # decorated, or called (in this file) only from guarded functions
        if _decorated(funcs[name]):
            return True
        up = callers.get(name, set()) - {name}
        return bool(up) and all(
            c in funcs and c not in seen and guarded(c, seen | {name}) for c in up
        )

    bad = [
        f"{path.name}:{node.lineno} in {name}()"
        for name, fn in funcs.items()
        if name not in jitted
        for node in ast.walk(fn)
        if _is_launch(node) and not guarded(name)
    ]
    assert not bad, f"Triton launches outside an @on_tensor_device launcher: {bad}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_launches_enter_their_tensors_device(monkeypatch):
    """One GPU is enough to see every launcher of a training step go through the guard."""
    from kernels.adamw import fused_adamw, grad_sq_norm_and_nonfinite
    from kernels.cross_entropy import ce_grad, ce_stats
    from kernels.rmsnorm import rmsnorm
    from kernels.swiglu import swiglu

    real, entered = torch.cuda.device, []

    def recording(d):
        if isinstance(d, torch.device):  # the guard passes a device (torch may pass ints)
            entered.append(d)
        return real(d)

    monkeypatch.setattr(_triton.torch.cuda, "device", recording)
    dev = torch.device("cuda", torch.cuda.current_device())
    x = torch.randn(33, 256, device=dev, requires_grad=True)
    w = torch.ones(256, device=dev, requires_grad=True)
    swiglu(rmsnorm(x, w).repeat(1, 2)).sum().backward()
    logits = torch.randn(8, 100, device=dev)
    labels = torch.randint(0, 100, (8,), device=dev)
    m, s, _ = ce_stats(logits, labels, 0, 100)
    ce_grad(logits, labels, 0, 100, m, s, torch.ones(8, device=dev))
    p = torch.randn(512, device=dev)
    fused_adamw(p, torch.randn_like(p), torch.zeros_like(p), torch.zeros_like(p), lr=1e-3,
                beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, step=1)  # fmt: skip
    grad_sq_norm_and_nonfinite(p)
    torch.cuda.synchronize()
    assert len(entered) >= 7 and set(entered) == {dev}


two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices"
)


@pytest.mark.gpu
@two_gpus
def test_kernels_run_on_their_tensors_device_not_the_current_one():
    from kernels.adamw import fused_adamw
    from kernels.cross_entropy import ce_stats
    from kernels.rmsnorm import rmsnorm
    from kernels.swiglu import swiglu

    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(257, 1024, device=dev, dtype=torch.bfloat16, generator=g)
    w = torch.randn(1024, device=dev, dtype=torch.bfloat16, generator=g)
    y = rmsnorm(x, w)
    torch.testing.assert_close(y.float(), reference.rmsnorm(x, w).float(), atol=2e-2, rtol=2e-2)
    gu = torch.randn(257, 2 * 688, device=dev, dtype=torch.bfloat16, generator=g)
    want = reference.swiglu(gu).float()
    torch.testing.assert_close(swiglu(gu).float(), want, atol=2e-2, rtol=2e-2)
    logits = torch.randn(64, 500, device=dev, generator=g)
    labels = torch.randint(0, 500, (64,), device=dev, generator=g)
    m, s, _ = ce_stats(logits, labels, 0, 500)
    torch.testing.assert_close(m, logits.max(dim=1).values)
    p = torch.randn(4096, device=dev, generator=g)
    grad, ea, eas = torch.randn_like(p), torch.zeros_like(p), torch.zeros_like(p)
    ref = [t.clone() for t in (p, grad, ea, eas)]
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=1)
    fused_adamw(p, grad, ea, eas, **kw)
    reference.adamw(*ref, **kw)
    torch.cuda.synchronize(dev)
    torch.testing.assert_close(p, ref[0])
    assert torch.cuda.current_device() == 0  # the guard restores the caller's device
