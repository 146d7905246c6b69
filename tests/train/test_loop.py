"""The training step: loss normalisation by hand, AdamW equivalence, skipped steps, the loop."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.train.helpers import VOCAB, SyntheticLoader, make_doc, pack_micro_batch, tiny_run
from train.loop import Trainer, build_model
from train.optimizer import FlatAdamW
from train.run import run_training


def _uneven_micro_batches():
    """Three micro-batches with very different loss-token counts (one with very few)."""
    g = torch.Generator().manual_seed(3)
    mbs = []
    for n_docs, length in ((6, 20), (2, 60), (1, 10)):
        mbs.append(pack_micro_batch([make_doc(g, length) for _ in range(n_docs)], 2, 64))
    counts = [float(mb["loss_mask"].sum()) for mb in mbs]
    assert len(set(counts)) == 3
    return mbs


def _reference_copy(trainer):
    """The same model and weights, without the flat buffers and gradient hooks."""
    ref = build_model(trainer.rc, trainer.dims, "cpu", torch.float32)
    ref.load_state_dict(trainer.model.state_dict())
    return ref


def _hand_loss(model, mbs, vocab, mode):
    """The definition, computed directly: full-vocabulary logits trimmed to the real vocabulary."""
    per_mb = []
    for mb in mbs:
        logits = model(mb["tokens"], mb["position_ids"], mb["cu_seqlens"], mb["max_seqlen"])
        ce = F.cross_entropy(logits[:, :vocab].float(), mb["labels"].reshape(-1), reduction="none")
        m = mb["loss_mask"].reshape(-1)
        per_mb.append(((ce * m).sum(), m.sum()))
    if mode == "global":
        return sum(s for s, _ in per_mb) / sum(c for _, c in per_mb)
    return sum(s / c for s, c in per_mb) / len(per_mb)


@pytest.mark.parametrize("mode", ["global", "microbatch"])
def test_loss_normalisation_equals_hand_computation(mode):
    rc, dims, tok = tiny_run(["--loss_reduction", mode, "--clip_grad", "0"])
    trainer = Trainer(rc, dims, tok)
    mbs = _uneven_micro_batches()
    # reference: a copy of the model, the loss by hand, autograd
    ref = _reference_copy(trainer)
    hand = _hand_loss(ref, mbs, VOCAB, mode)
    hand.backward()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    res = trainer.train_step(mbs, lr=0.0)
    assert res.loss == pytest.approx(hand.item(), rel=1e-6)
    assert res.loss_tokens == sum(int(mb["loss_mask"].sum()) for mb in mbs)
    for (n, p), (_, q) in zip(trainer.model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.main_grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)
        # lr 0 and weight decay: nothing moves (the step still ran)
        assert torch.equal(p.detach(), before[n])
    assert trainer.optimizer.step_count == 1
    # the two reductions differ on uneven micro-batches
    other = _hand_loss(ref, mbs, VOCAB, "microbatch" if mode == "global" else "global")
    assert abs(other.item() - hand.item()) > 1e-3


def test_flat_adamw_matches_torch_adamw_with_no_decay_for_norms():
    # eps 1e-3: Adam's first steps are ~lr * sign(g), which magnifies summation-order noise in
    # near-zero gradients; a large eps keeps the comparison well conditioned. Weight decay 1.0
    # makes a wrongly decayed (or undecayed) parameter visible.
    rc, dims, tok = tiny_run(["--clip_grad", "0", "--weight_decay", "1.0", "--adam_eps", "1e-3"])
    trainer = Trainer(rc, dims, tok)
    ref = _reference_copy(trainer)
    decay = [p for n, p in ref.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in ref.named_parameters() if p.ndim < 2]
    assert len(no_decay) == 2 * rc.model.num_layers + 1  # the norms, and nothing else
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 1.0},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), eps=1e-3, foreach=False)  # fmt: skip
    loader = SyntheticLoader(2, 64, 2)
    for step in range(3):
        mbs = loader.next_global_batch()
        trainer.train_step(mbs, lr=1e-3)
        opt.zero_grad()
        _hand_loss(ref, mbs, VOCAB, "global").backward()
        opt.step()
        for (n, p), (_, q) in zip(trainer.model.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(
                p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=f"{step} {n}"
            )


def test_params_are_views_of_the_flat_buffers():
    rc, dims, tok = tiny_run()
    trainer = Trainer(rc, dims, tok)
    opt: FlatAdamW = trainer.optimizer
    for g in opt.groups:
        base = g.model_flat.untyped_storage().data_ptr()
        assert all(p.untyped_storage().data_ptr() == base for p in g.params)
        assert g.master is g.model_flat  # fp32 on CPU: no master copy
        # gradients are read in place from the GradBuffer
        assert (
            g.grads().untyped_storage().data_ptr()
            == trainer.grads.buffer.untyped_storage().data_ptr()
        )


@pytest.mark.parametrize("fusion", [True, False])
def test_non_finite_gradients_skip_the_step(fusion):
    rc, dims, tok = tiny_run([] if fusion else ["--no_gradient_accumulation_fusion"])
    trainer = Trainer(rc, dims, tok)
    mbs = SyntheticLoader(2, 64, 2).next_global_batch()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    # NaN into the gradient of layer 0's MLP output (an activation: with fused weight-gradient
    # accumulation a weight's own .grad is never made, so a hook there would see nothing)
    def poison(module, inputs, out) -> None:
        out.register_hook(lambda g: g * float("nan"))

    h = trainer.model.layers["0"].mlp.register_forward_hook(poison)
    res = trainer.train_step(mbs, lr=1e-2)
    h.remove()
    assert res.skipped and not math.isfinite(res.grad_norm)
    assert trainer.optimizer.step_count == 0 and trainer.skipped_total == 1
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    res = trainer.train_step(mbs, lr=1e-2)
    assert not res.skipped and trainer.optimizer.step_count == 1


def test_infinite_gradient_norm_skips_the_step():
    """An infinite (not NaN) gradient norm skips the update too: the check is `isfinite`, not
    `isnan`. Here only the final norm weight's gradient is +inf (a leaf: nothing else turns
    NaN), so the norm is exactly inf; applying the step would write inf/NaN into the weights."""
    rc, dims, tok = tiny_run()
    trainer = Trainer(rc, dims, tok)
    mbs = SyntheticLoader(2, 64, 2).next_global_batch()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    h = trainer.model.norm.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    res = trainer.train_step(mbs, lr=1e-2)
    h.remove()
    assert res.grad_norm == math.inf and res.skipped
    assert trainer.optimizer.step_count == 0 and trainer.skipped_total == 1
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


def test_clipping_bounds_the_update():
    rc, dims, tok = tiny_run(["--clip_grad", "1e-3", "--lr", "1.0", "--adam_beta1", "0.0",
                              "--adam_beta2", "0.0", "--weight_decay", "0"])  # fmt: skip
    trainer = Trainer(rc, dims, tok)
    mbs = SyntheticLoader(2, 64, 2).next_global_batch()
    res = trainer.train_step(mbs, lr=1.0)
    assert res.grad_norm > 1e-3  # clipping was active; the norm logged is the pre-clip norm


def test_clipping_scales_the_gradients_the_update_sees():
    """--clip_grad below the gradient norm: the update is AdamW's on the gradients times
    max_norm / (norm + 1e-6), the logged norm the norm before clipping. eps 1e-3 dwarfs the
    clipped gradients, so the update follows their scale: unclipped, the same step would move
    each weight by about lr / 2, hundreds of times further."""
    rc, dims, tok = tiny_run(["--clip_grad", "1e-2", "--weight_decay", "0", "--adam_eps", "1e-3"])
    trainer = Trainer(rc, dims, tok)
    ref = _reference_copy(trainer)
    mbs = SyntheticLoader(2, 64, 2).next_global_batch()
    res = trainer.train_step(mbs, lr=1e-3)
    _hand_loss(ref, mbs, VOCAB, "global").backward()
    norm = math.sqrt(sum(q.grad.double().pow(2).sum().item() for q in ref.parameters()))
    assert res.grad_norm == pytest.approx(norm, rel=1e-5) and norm > 1.0
    for q in ref.parameters():
        q.grad.mul_(1e-2 / (norm + 1e-6))
    torch.optim.AdamW(ref.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-3, weight_decay=0.0,
                      foreach=False).step()  # fmt: skip
    for (n, p), (_, q) in zip(trainer.model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=n)


def test_tiny_loop_lowers_the_loss(tmp_path):
    rc, dims, tok = tiny_run(["--train_iters", "60", "--log_interval", "10"], tmp_path)
    trainer = Trainer(rc, dims, tok)
    history = run_training(rc, dims, trainer, SyntheticLoader(2, 64, 2), {}, None)
    losses = [r["lm_loss"] for r in history if r["type"] == "train"]
    assert len(losses) == 6
    assert losses[-1] < 0.7 * losses[0], losses  # about 4.3 -> 2.3 (uniform: ln 97 = 4.57)
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "60"


def test_distributed_optimizer_at_dp1_equals_the_replicated_one():
    """One process with --use_distributed_optimizer (DP 1: the shard is the whole buffer) takes
    the same steps as FlatAdamW, bit for bit with clipping off (the two gradient norms sum in
    another order, so a clip factor may differ in its last bit)."""
    runs = []
    for extra in ([], ["--use_distributed_optimizer"]):
        rc, dims, tok = tiny_run(
            ["--train_iters", "6", "--weight_decay", "0.1", "--clip_grad", "0", *extra]
        )
        torch.manual_seed(0)
        trainer = Trainer(rc, dims, tok)
        history = run_training(rc, dims, trainer, SyntheticLoader(2, 32, 2), {}, None)
        runs.append((trainer, history))
    (plain, want), (dist, got) = runs
    assert type(dist.optimizer).__name__ == "ShardedAdamW" and dist.grads.sharded
    rows = [[r["lm_loss"] for r in h if r["type"] == "train"] for h in (want, got)]
    assert rows[0] == rows[1] and len(rows[0]) == 6
    norms = [[r["grad_norm"] for r in h if r["type"] == "train"] for h in (want, got)]
    assert norms[1] == pytest.approx(norms[0], rel=1e-6)
    a, b = plain.optimizer.state_tensors(), dist.optimizer.state_tensors()
    for kind in a:
        assert set(a[kind]) == set(b[kind])
        for name, t in a[kind].items():
            assert torch.equal(b[kind][name], t), (kind, name)


def test_optimizer_cpu_offload_at_dp1_follows_the_replicated_optimizer():
    """--optimizer_cpu_offload: masters and moments in host memory, updated by the host AdamW
    in chunks (several here, and a chunk cut across the decay / no-decay boundary): the same
    losses and state as FlatAdamW's kernel to fp32 rounding; no state left on the device side."""
    from train.optimizer import ShardedAdamW

    runs = []
    for extra in ([], ["--use_distributed_optimizer", "--optimizer_cpu_offload"]):
        rc, dims, tok = tiny_run(["--train_iters", "6", "--weight_decay", "0.1", *extra])
        torch.manual_seed(0)
        old = ShardedAdamW.OFFLOAD_CHUNK
        ShardedAdamW.OFFLOAD_CHUNK = 10_007  # 12 chunks over the model's 100,672 values
        try:
            trainer = Trainer(rc, dims, tok)
            history = run_training(rc, dims, trainer, SyntheticLoader(2, 32, 2), {}, None)
        finally:
            ShardedAdamW.OFFLOAD_CHUNK = old
        runs.append((trainer, [r["lm_loss"] for r in history if r["type"] == "train"]))
    (plain, want), (off, got) = runs
    assert off.optimizer.offload and off.optimizer.model_out is off.optimizer.model_flat
    assert off.optimizer.state_bytes() == 0
    n = off.grads.shard_numel
    assert off.optimizer.host_state_bytes() == 12 * n + 2 * 2 * 4 * 10_007
    assert len(got) == 6 and got == pytest.approx(want, rel=1e-5)
    a, b = plain.optimizer.state_tensors(), off.optimizer.state_tensors()
    for kind in a:
        for name, t in a[kind].items():
            torch.testing.assert_close(b[kind][name], t, rtol=1e-4, atol=1e-6, msg=name)
    for (name, p), (_, q) in zip(plain.named_parameters(), off.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)


def test_optimizer_cpu_offload_needs_the_distributed_optimizer():
    from train.args import ArgsError

    with pytest.raises(ArgsError, match="--optimizer_cpu_offload needs --use_distributed_optim"):
        tiny_run(["--optimizer_cpu_offload"])
