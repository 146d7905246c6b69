"""bf16 training on a GPU: bf16 weights as views of one flat buffer written by the fused AdamW
kernel from fp32 masters, fp32 gradients, and a falling loss (`make test-gpu`)."""

import pytest
import torch

from tests.train.helpers import SyntheticLoader, tiny_run
from train.loop import Trainer, build_model
from train.run import run_training

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_bf16_training_on_gpu():
    rc, dims, tok = tiny_run(["--bf16", "--train_iters", "60", "--log_interval", "10"])
    trainer = Trainer(rc, dims, tok, device="cuda")
    assert trainer.dtype == torch.bfloat16
    for g in trainer.optimizer.groups:
        assert g.model_flat.dtype == torch.bfloat16 and g.master.dtype == torch.float32
        assert all(p.dtype == torch.bfloat16 and p.is_cuda for p in g.params)
        assert g.grads().dtype == torch.float32
    history = run_training(rc, dims, trainer, SyntheticLoader(2, 64, 2), {}, None)
    losses = [r["lm_loss"] for r in history if r["type"] == "train"]
    assert losses[-1] < 0.7 * losses[0], losses
    assert history[-1]["tflops"] is not None
    for g in trainer.optimizer.groups:
        # the kernel's bf16 copy is the rounded master, element for element
        assert torch.equal(g.model_flat, g.master.to(torch.bfloat16))


def test_weights_are_drawn_on_the_gpu_reproducibly():
    """build_stages draws on the CUDA device (a host generator is ~5 ns a value): the same seed
    gives the same weights, with the initialisation's spread."""
    rc, dims, _ = tiny_run()
    a, b = (build_model(rc, dims, "cuda", torch.float32) for _ in range(2))
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert p.is_cuda and torch.equal(p, q), name
    w = dict(a.named_parameters())["layers.0.attention.wqkv.weight"]
    assert abs(w.std().item() / rc.model.init_std - 1) < 0.05


def _bf16_runs(*variants: list[str]) -> list[tuple[Trainer, list[float]]]:
    """(trainer, losses) of 8 bf16 steps on the GPU per variant's extra flags, from the same
    seed, clipping off (the gradient norms of the optimizers sum in different orders)."""
    runs = []
    for extra in variants:
        rc, dims, tok = tiny_run(["--bf16", "--train_iters", "8", "--clip_grad", "0", *extra])
        torch.manual_seed(0)
        trainer = Trainer(rc, dims, tok, device="cuda")
        history = run_training(rc, dims, trainer, SyntheticLoader(2, 64, 2), {}, None)
        runs.append((trainer, [r["lm_loss"] for r in history if r["type"] == "train"]))
    return runs


def test_distributed_optimizer_at_dp1_trains_bf16_like_the_replicated_one():
    """--use_distributed_optimizer on one GPU (its DP 1 path: the shard is the whole padded
    buffer, masters upcast, the kernel writing the bf16 weights in place): the same losses and
    the same bf16 weights as the replicated optimizer, bit for bit."""
    (plain, want), (dist, got) = _bf16_runs([], ["--use_distributed_optimizer"])
    assert dist.grads.sharded and dist.optimizer.model_flat.dtype == torch.bfloat16
    assert got == want
    for (name, p), (_, q) in zip(plain.named_parameters(), dist.named_parameters()):
        assert torch.equal(p, q), name


def test_optimizer_cpu_offload_trains_bf16_on_gpu_like_the_device_optimizer(monkeypatch):
    """--optimizer_cpu_offload on a GPU: masters and moments in host memory, the gradients
    brought over and the bf16 weights sent back in pinned chunks (12 here, both slots reused,
    the copies overlapping the host update): the losses and masters follow the device
    optimizer's (bf16 rounding steers the two runs apart a little), and the bf16 weights are
    exactly the rounded masters."""
    from train.optimizer import ShardedAdamW

    monkeypatch.setattr(ShardedAdamW, "OFFLOAD_CHUNK", 10_007)
    offload = ["--use_distributed_optimizer", "--optimizer_cpu_offload"]
    (plain, want), (off, got) = _bf16_runs([], offload)
    opt = off.optimizer
    assert opt.offload and not opt.master.is_cuda and opt._grad_host[0].is_pinned()
    assert opt.model_flat.is_cuda and opt.model_flat.dtype == torch.bfloat16
    assert got == pytest.approx(want, rel=1e-2)
    assert torch.equal(opt.model_flat.cpu(), opt.master.to(torch.bfloat16))
    a, b = plain.optimizer.state_tensors(), opt.state_tensors()
    for name, t in a["master"].items():
        torch.testing.assert_close(b["master"][name], t.cpu(), rtol=1e-2, atol=2e-3, msg=name)
