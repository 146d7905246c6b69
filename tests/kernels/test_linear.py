"""Fused weight-gradient accumulation (kernels/linear.py): the product lands in the fp32 buffer,
no `.grad` is made, every fused weight is counted once per backward, and a weight without an
accumulator (or under no_grad) is plain F.linear. The GPU test checks the bf16 -> fp32 path."""

import pytest
import torch
import torch.nn.functional as F

from kernels.linear import Linear, accumulate_weight_grad, fp32_out_addmm, fused, linear
from model.config import get_preset
from model.llama import Llama
from parallel.data_parallel import GradBuffer


def _randn(*shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=device).to(dtype)


@pytest.mark.parametrize("lead", [(7,), (2, 5)])
def test_accumulate_adds_the_product(lead):
    main = _randn(6, 4, seed=1)
    dy, x = _randn(*lead, 6, seed=2), _randn(*lead, 4, seed=3)
    want = main + dy.reshape(-1, 6).t() @ x.reshape(-1, 4)
    accumulate_weight_grad(main, dy, x)
    torch.testing.assert_close(main, want, rtol=1e-6, atol=1e-6)


def test_accumulate_bf16_product_into_fp32_on_cpu():
    """The two-step path (no fused op on CPU): the product in bf16, added in fp32."""
    assert not fp32_out_addmm(torch.device("cpu"))
    main = _randn(8, 16, seed=1)
    dy, x = _randn(33, 8, dtype=torch.bfloat16, seed=2), _randn(33, 16, dtype=torch.bfloat16)
    want = main + (dy.t() @ x).float()
    accumulate_weight_grad(main, dy, x)
    assert main.dtype == torch.float32
    torch.testing.assert_close(main, want)


def test_linear_without_an_accumulator_is_f_linear():
    layer = Linear(4, 3)
    assert layer.bias is None and not fused(layer.weight)
    x = _randn(5, 4, seed=1).requires_grad_()
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, layer.weight))
    y.sum().backward()
    assert layer.weight.grad is not None and x.grad is not None


def _tiny_model() -> Llama:
    cfg = get_preset("tiny").replace(hidden_dropout=0.0)
    torch.manual_seed(0)
    model = Llama(cfg, cfg.padded_vocab_size(1))
    model.init_weights(torch.Generator().manual_seed(0))
    return model


def _backward(model: Llama) -> None:
    ids = torch.arange(24) % model.cfg.vocab_size
    pos = torch.cat([torch.arange(10), torch.arange(14)])
    cu = torch.tensor([0, 10, 24], dtype=torch.int32)
    model(ids, pos, cu, 14).float().square().mean().backward()


def test_fused_buffer_matches_unfused_and_counts_each_weight_once():
    fused_model, plain_model = _tiny_model(), _tiny_model()
    fused_buf = GradBuffer(list(fused_model.parameters()), None, fuse_weight_grads=True)
    plain_buf = GradBuffer(list(plain_model.parameters()), None)
    calls: dict[str, int] = {}
    for name, p in fused_model.named_parameters():
        inner = p.accumulate_weight_grad

        def spy(dy, x, name=name, inner=inner):
            calls[name] = calls.get(name, 0) + 1
            inner(dy, x)

        p.accumulate_weight_grad = spy
    for model in (fused_model, plain_model):
        _backward(model)
    # every parameter arrived (fused or through the hooks): the backward launched every bucket
    assert all(fused_buf._launched) and all(plain_buf._launched)
    fused_buf.finish()
    plain_buf.finish()
    torch.testing.assert_close(fused_buf.buffer, plain_buf.buffer, rtol=1e-6, atol=1e-7)
    linears = {n for n, m in fused_model.named_modules() if isinstance(m, Linear)}
    assert calls == {f"{n}.weight": 1 for n in linears}, calls
    assert all(p.grad is None for p in fused_model.parameters())


def test_accumulator_removed_before_the_backward_falls_back_to_autograd():
    model = _tiny_model()
    buf = GradBuffer(list(model.parameters()), None, fuse_weight_grads=True)
    w = model.layers["0"].mlp.w2.weight
    x = _randn(5, w.shape[1]).requires_grad_()
    y = linear(x, w)
    buf.set_fuse_weight_grads(False)
    y.sum().backward()  # dW went back to autograd, and the buffer's hook took it from there
    assert w.grad is None
    torch.testing.assert_close(w.main_grad, torch.ones(5, w.shape[0]).t() @ x.detach())


def test_no_grad_forward_takes_the_plain_path():
    model = _tiny_model()
    GradBuffer(list(model.parameters()), None, fuse_weight_grads=True)
    w = model.layers["0"].attention.wqkv.weight
    assert fused(w)
    with torch.no_grad():
        assert not fused(w)
        x = _randn(3, w.shape[1])
        torch.testing.assert_close(linear(x, w), F.linear(x, w))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_product_accumulates_into_fp32_on_gpu():
    """One call when this torch has addmm's out_dtype (reported), else the two-step path; either
    way the fp32 buffer gets the product within bf16 input rounding, twice over two calls."""
    dev = torch.device("cuda")
    print(f"fused bf16 -> fp32 addmm available: {fp32_out_addmm(dev)}")
    main = torch.zeros(256, 192, device=dev)
    dy = _randn(1000, 256, dtype=torch.bfloat16, device="cuda", seed=2)
    x = _randn(1000, 192, dtype=torch.bfloat16, device="cuda", seed=3)
    for _ in range(2):
        accumulate_weight_grad(main, dy, x)
    want = 2 * (dy.float().t() @ x.float())
    torch.testing.assert_close(main, want, rtol=2e-2, atol=2e-2 * want.abs().max().item() / 100)
