"""Optimizer behaviour the trainer-level tests leave open (found by mutating train/optimizer.py):
a bf16 model's weights following the fp32 masters through steps, loads and weights-only loads
(the CPU tests otherwise run fp32 models, whose masters are the weights themselves); gradients
laid out in another order than `params_in_order()`; checkpoint tensors of the wrong shape; a
model with one kind of parameter only; ShardedAdamW refusing a gradient buffer it cannot adopt."""

import pytest
import torch
import torch.nn as nn

from parallel.data_parallel import GradBuffer
from train.config import OptimizerConfig
from train.optimizer import FlatAdamW, ShardedAdamW, param_order

SHAPES = {"a.w": (7, 13), "n1": (13,), "b.w": (5, 3), "n2": (11,), "c.w": (17, 4)}  # 198 values
KW = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, clip_grad=1.0)


def _params(seed: int = 0, dtype=torch.float32) -> list[tuple[str, nn.Parameter]]:
    """The parameters in SHAPES order: matrices and norm weights interleaved."""
    g = torch.Generator().manual_seed(seed)
    return [(n, nn.Parameter(torch.randn(s, generator=g).to(dtype))) for n, s in SHAPES.items()]


def _grads(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def _bf16_optimizers():
    """FlatAdamW and ShardedAdamW at DP 1 over bf16 parameters, each with its GradBuffer."""
    flat = FlatAdamW(_params(dtype=torch.bfloat16), OptimizerConfig(**KW))
    named = param_order(_params(dtype=torch.bfloat16))
    buf = GradBuffer([p for _, p in named], shard_over_dp=True)
    sharded = ShardedAdamW(named, OptimizerConfig(**KW, distributed=True), buf)
    return [(flat, GradBuffer(flat.params_in_order())), (sharded, buf)]


@pytest.mark.parametrize("which", ["flat", "sharded"])
def test_bf16_weights_follow_the_fp32_masters(which):
    """A bf16 model keeps fp32 masters: each step writes the new masters, rounded, into the
    model's weights; a loaded state refreshes the weights from the loaded masters; after a
    weights-only load, `sync_master_from_model` takes the masters from the weights. Each of
    the three, left out, leaves the model and its masters apart: steps that never reach the
    weights, a resumed run on the old weights, or masters that undo the loaded weights."""
    opt, buf = _bf16_optimizers()[which == "sharded"]

    def masters() -> dict[str, torch.Tensor]:
        return opt.state_tensors()["master"]

    named = dict(opt.named_params())
    for n, p in named.items():
        assert p.dtype == torch.bfloat16 and masters()[n].dtype == torch.float32
        assert torch.equal(masters()[n], p.float()), n
    for step in range(2):
        buf.zero()
        for n, g in _grads(step).items():
            named[n].main_grad.copy_(g)
        before = {n: m.clone() for n, m in masters().items()}
        opt.step(lr=1e-2)
        for n, p in named.items():
            assert not torch.equal(masters()[n], before[n]), n
            assert torch.equal(p, masters()[n].bfloat16()), (step, n)

    state = {k: {n: t.clone() + 0.25 for n, t in d.items()} for k, d in opt.state_tensors().items()}
    opt.load_state_tensors(lambda kind, name, p: state[kind][name])
    for n, p in named.items():
        assert torch.equal(masters()[n], state["master"][n]), n
        assert torch.equal(p, state["master"][n].bfloat16()), n

    with torch.no_grad():
        for p in named.values():
            p.copy_(torch.full_like(p, 0.5))
    opt.sync_master_from_model()
    for n in named:
        assert torch.equal(masters()[n], torch.full(SHAPES[n], 0.5)), n


def test_flat_adamw_reads_gradients_laid_out_in_another_order():
    """A GradBuffer over the parameters in their own order (matrices and norm weights
    interleaved), not `params_in_order()`: each group's gradients are not back to back in it,
    so they are gathered -- the same steps as with the buffer in the optimizer's order, where
    they are read in place. Read as one run from the group's first gradient, the matrices would
    take the norm weights' gradients."""
    runs = []
    for in_order in (True, False):
        named = _params()
        opt = FlatAdamW(named, OptimizerConfig(**KW))
        buf = GradBuffer(opt.params_in_order() if in_order else [p for _, p in named])
        for step in range(2):
            buf.zero()
            for n, p in opt.named_params():
                p.main_grad.copy_(_grads(step)[n])
            opt.step(lr=1e-2, grad_scale=0.5)
        runs.append(dict(opt.named_params()))
    for n, p in runs[0].items():
        assert torch.equal(runs[1][n], p), n


@pytest.mark.parametrize("which", ["flat", "sharded"])
def test_a_state_tensor_of_another_shape_is_refused(which):
    """A checkpoint's optimizer tensor is checked against the parameter's shape, not only its
    size: a transposed (5, 3) -> (3, 5) tensor holds the same number of values and would load
    silently into the wrong places."""
    opt, _ = _bf16_optimizers()[which == "sharded"]
    state = opt.state_tensors()

    def read(kind: str, name: str, p: nn.Parameter) -> torch.Tensor:
        return state[kind][name].t() if name == "b.w" else state[kind][name]

    with pytest.raises(ValueError, match=r"optimizer state master/b\.w: shape \(3, 5\)"):
        opt.load_state_tensors(read)


@pytest.mark.parametrize("kinds", [("a.w", "b.w"), ("n1", "n2")])
def test_flat_adamw_over_one_kind_of_parameter(kinds):
    """Only matrices, or only norm weights (a model part without the other kind): one group,
    the empty one left out, and the update AdamW's with the group's weight decay. (FlatAdamW
    used to build both groups before dropping the empty one, and an empty group raised
    IndexError on its first parameter.)"""
    named = [(n, p) for n, p in _params() if n in kinds]
    opt = FlatAdamW(named, OptimizerConfig(**{**KW, "weight_decay": 0.5}))
    assert len(opt.groups) == 1 and opt.groups[0].weight_decay == (0.5 if "a.w" in kinds else 0.0)
    ref = [nn.Parameter(p.detach().clone()) for _, p in named]
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=opt.groups[0].weight_decay)  # fmt: skip
    GradBuffer(opt.params_in_order())
    for (n, p), q in zip(named, ref):
        p.main_grad.copy_(_grads(0)[n])
        q.grad = _grads(0)[n]
    opt.step(lr=1e-2)
    torch_opt.step()
    for (n, p), q in zip(named, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7, msg=n)


def test_sharded_adamw_refuses_a_buffer_it_cannot_adopt():
    """ShardedAdamW takes over the gradient buffer's layout: a buffer over the parameters in
    another order, or one not sharded over DP, is an error naming the fix -- not weights laid
    out against the wrong gradients (at DP 1 an unsharded buffer would even seem to work)."""
    named = param_order(_params())
    cfg = OptimizerConfig(**KW, distributed=True)
    other_order = GradBuffer([p for _, p in reversed(named)], shard_over_dp=True)
    with pytest.raises(ValueError, match="same parameters in the same order"):
        ShardedAdamW(named, cfg, other_order)
    named = param_order(_params())
    with pytest.raises(ValueError, match="shard_over_dp=True"):
        ShardedAdamW(named, cfg, GradBuffer([p for _, p in named]))
