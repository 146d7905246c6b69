"""CUDA-only paths checked on the CPU with a simulated device stream.

The offloaded optimizer's chunk pipeline (`ShardedAdamW._step_on_host`) issues its device<->host
copies with non_blocking=True and orders them with CUDA events, which on a CPU run are never
made: there every copy is synchronous. Here the "device" buffers (the gradient buffer and the
model weights) claim to be CUDA tensors, and every non_blocking copy touching them is queued
instead of run; it runs only when an event recorded after it is synchronized, as late as a real
stream may run it. A host read of a copy that was not waited for then reads the poisoned pinned
buffer, and a pinned buffer overwritten before its copy ran sends the wrong weights: either way
the result differs from the synchronous CPU update."""

import pytest
import torch
import torch.nn as nn

from parallel.data_parallel import GradBuffer
from train.config import OptimizerConfig
from train.optimizer import ShardedAdamW, param_order

SHAPES = {"a.w": (7, 13), "n1": (13,), "b.w": (5, 3), "n2": (11,), "c.w": (17, 4)}  # 198 values
KW = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, clip_grad=1.0)


class _Stream:
    """The simulated device stream: queued copies, run in order when an event is waited."""

    def __init__(self):
        self.ops: list = []
        self.done = 0

    def run_to(self, pos: int) -> None:
        while self.done < pos:
            self.ops[self.done]()
            self.done += 1


STREAM = _Stream()


class _OnDevice(torch.Tensor):
    """A CPU tensor that says it is on the GPU; its non_blocking copies go to STREAM."""

    @property
    def is_cuda(self):
        return True

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.copy_ and kwargs.get("non_blocking"):
            dst, src = (t.as_subclass(torch.Tensor) for t in args[:2])

            def copy():
                with torch._C.DisableTorchFunctionSubclass():
                    dst.copy_(src)  # reads the source when the stream gets to it

            STREAM.ops.append(copy)
            return args[0]
        return super().__torch_function__(func, types, args, kwargs)


class _Event:
    def __init__(self, *args, **kwargs):
        self.pos = None

    def record(self, stream=None):
        self.pos = len(STREAM.ops)

    def synchronize(self):
        STREAM.run_to(self.pos)


def _optimizer() -> tuple[ShardedAdamW, GradBuffer]:
    g = torch.Generator().manual_seed(0)
    named = param_order([(n, nn.Parameter(torch.randn(s, generator=g))) for n, s in SHAPES.items()])
    buf = GradBuffer([p for _, p in named], shard_over_dp=True)
    cfg = OptimizerConfig(**KW, distributed=True, cpu_offload=True)
    return ShardedAdamW(named, cfg, buf), buf


@pytest.mark.parametrize("chunk", [16, 50, 1 << 22])  # 13 chunks, 4 (both slots reused), 1
def test_offloaded_step_waits_for_every_async_copy(monkeypatch, chunk):
    monkeypatch.setattr(ShardedAdamW, "OFFLOAD_CHUNK", chunk)
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: None)
    ref, ref_buf = _optimizer()  # the plain CPU path: synchronous copies
    sim, sim_buf = _optimizer()
    sim_buf.local_grad = sim_buf.buffer.as_subclass(_OnDevice)
    sim.model_out = sim.model_flat.as_subclass(_OnDevice)  # DP 1: weights straight to the model
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        grads = torch.randn(ref_buf.buffer.numel(), generator=gen)
        for opt, buf in ((ref, ref_buf), (sim, sim_buf)):
            buf.zero()
            buf.buffer.copy_(grads)
            for t in (*opt._grad_host, *opt._out_host):
                t.fill_(float("nan"))  # what a host read of an unfinished copy would see
            opt.step(lr=1e-2, grad_scale=0.5 if step == 1 else 1.0)
        assert STREAM.done == len(STREAM.ops)  # every queued copy was waited for
        assert torch.equal(sim.model_flat, ref.model_flat), step
        assert torch.equal(sim.master, ref.master) and torch.equal(sim.exp_avg_sq, ref.exp_avg_sq)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices"
)
def test_offloaded_step_on_a_device_that_is_not_current(monkeypatch):
    """The offload events wait on the stream the copies went to (the gradients' device's), not
    the current device's: the model on cuda:1 while cuda:0 is current updates as on the CPU."""
    monkeypatch.setattr(ShardedAdamW, "OFFLOAD_CHUNK", 50)
    torch.cuda.set_device(0)
    ref, ref_buf = _optimizer()
    g = torch.Generator().manual_seed(0)
    named = [(n, nn.Parameter(torch.randn(s, generator=g))) for n, s in SHAPES.items()]
    named = param_order([(n, nn.Parameter(p.detach().to("cuda:1"))) for n, p in named])
    buf = GradBuffer([p for _, p in named], shard_over_dp=True)
    opt = ShardedAdamW(named, OptimizerConfig(**KW, distributed=True, cpu_offload=True), buf)
    grads = torch.randn(ref_buf.buffer.numel(), generator=torch.Generator().manual_seed(1))
    for o, b in ((ref, ref_buf), (opt, buf)):
        b.zero()
        b.buffer.copy_(grads)
        o.step(lr=1e-2)
    torch.testing.assert_close(opt.model_flat.cpu(), ref.model_flat, rtol=0, atol=0)
