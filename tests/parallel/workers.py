"""Rank-side bodies of the TP/SP/DP tests (run by tests.parallel._harness.launch).

Each takes the rank's ParallelDims first; references computed in one process by the launching
test come in as arguments.
"""

import pytest
import torch
import torch.nn.functional as F

from kernels.linear import Linear
from model.config import param_count
from parallel import comm
from parallel.cross_entropy import argmax, cross_entropy
from parallel.data_parallel import GradBuffer
from parallel.dims import ParallelDims
from parallel.grad_norm import global_grad_norm
from parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    SequenceParallelDropout,
    VocabParallelEmbedding,
)
from parallel.parallelize import gather_full, parallelize, sync_check, take_shard
from tests.parallel._harness import (
    CFG,
    STEPS,
    Trainer,
    assert_close,
    build,
    full_model,
    gathered_grads,
    microbatch,
)


def _same_everywhere(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.clone().requires_grad_(True)


# ---------------------------------------------------------------------------------------------
# communication functions and the fused linear layers


def comm_worker(dims: ParallelDims) -> None:
    """Every comm function's forward and backward against the single-process computation: the
    ranks' inputs X[r] and upstream grads G[r] are known to all, so each rank computes the
    expected result itself (float64, so equality is exact up to summation order)."""
    g, n, r = dims.tp_group, dims.tp, dims.tp_rank
    T, d = 4 * n, 6 * n
    X = _same_everywhere((n, T, d), 1)  # per-rank inputs
    G = _same_everywhere((n, T, d), 2)  # per-rank upstream gradients (full-size outputs)
    rows, cols = slice(r * T // n, (r + 1) * T // n), slice(r * d // n, (r + 1) * d // n)
    tol = dict(rtol=1e-12, atol=1e-12)

    def check(name, fn, x, upstream, want_y, want_dx):
        y = fn(x, g)
        torch.testing.assert_close(y, want_y, **tol, msg=lambda m: f"{name} forward: {m}")
        y.backward(upstream)
        torch.testing.assert_close(x.grad, want_dx, **tol, msg=lambda m: f"{name} backward: {m}")

    # fwd: identity / bwd: all-reduce
    check("copy_to_tp", comm.copy_to_tp, _leaf(X[0]), G[r], X[0], G.sum(0))
    # fwd: all-reduce / bwd: identity
    check("reduce_from_tp", comm.reduce_from_tp, _leaf(X[r]), G[r], X.sum(0), G[r])
    # fwd: split last dim / bwd: all-gather last dim
    want_dx = torch.cat([G[s][:, s * d // n : (s + 1) * d // n] for s in range(n)], dim=1)
    check("scatter_to_tp", comm.scatter_to_tp, _leaf(X[0]), G[r][:, cols], X[0][:, cols], want_dx)
    # fwd: all-gather last dim / bwd: split
    check("gather_from_tp", comm.gather_from_tp, _leaf(X[0][:, cols]), G[r], X[0], G[r][:, cols])
    # fwd: split tokens / bwd: all-gather tokens
    want_dx = torch.cat([G[s][s * T // n : (s + 1) * T // n] for s in range(n)])
    check("scatter_to_sp", comm.scatter_to_sp, _leaf(X[0]), G[r][rows], X[0][rows], want_dx)
    # fwd: all-gather tokens / bwd: reduce-scatter
    check("gather_from_sp", comm.gather_from_sp, _leaf(X[0][rows]), G[r], X[0], G.sum(0)[rows])
    # fwd: reduce-scatter tokens / bwd: all-gather
    want_dx = torch.cat([G[s][s * T // n : (s + 1) * T // n] for s in range(n)])
    check(
        "reduce_scatter_to_sp",
        comm.reduce_scatter_to_sp,
        _leaf(X[r]),
        G[r][rows],
        X.sum(0)[rows],
        want_dx,
    )
    t = torch.full((3,), float(r + 1))
    comm.all_reduce_sum(t, g)
    assert torch.equal(t, torch.full((3,), float(n * (n + 1) // 2)))
    with pytest.raises(ValueError, match="not divisible"):
        comm.reduce_scatter_to_sp(torch.zeros(n + 1, 2), g)
    # the all-reduce leaves its input as it was (autograd may hold it)
    x = X[r].clone()
    comm.reduce_from_tp(x, g)
    assert torch.equal(x, X[r])

    _linear_layers(dims, X[0], G)


def _linear_layers(dims: ParallelDims, x_full: torch.Tensor, G: torch.Tensor) -> None:
    """Column- and row-parallel linear (with and without SP) against F.linear on the full
    weight: output, input gradient and the gathered weight gradient."""
    g, n, r = dims.tp_group, dims.tp, dims.tp_rank
    T, d = x_full.shape
    rows = slice(r * T // n, (r + 1) * T // n)
    tol = dict(rtol=1e-10, atol=1e-10)
    segments = [2 * n, n, n]  # a fused [q | k | v]-like output: rank r holds a slice of each
    W = _same_everywhere((sum(segments), d), 3)
    W2 = _same_everywhere((d, 4 * n), 4)
    for sp in (False, True):
        # column-parallel: y_local = x W_localᵀ, local columns = this rank's pieces
        col = ColumnParallelLinear(d, segments, g, sp, dtype=torch.float64)
        with torch.no_grad():
            col.weight.copy_(take_shard(W, col.weight))
        x_ref, W_ref = _leaf(x_full), _leaf(W)
        dY = _same_everywhere((T, sum(segments)), 5)
        F.linear(x_ref, W_ref).backward(dY)
        pieces = col.weight.tp_pieces
        mine = lambda t, pieces=pieces: torch.cat([t[:, s : s + k] for s, k in pieces], dim=1)
        x = _leaf(x_full[rows] if sp else x_full)
        y = col(x)
        torch.testing.assert_close(y, mine(F.linear(x_full, W)), **tol)
        y.backward(mine(dY))
        torch.testing.assert_close(x.grad, x_ref.grad[rows] if sp else x_ref.grad, **tol)
        torch.testing.assert_close(gather_full(col.weight.grad, col.weight, g), W_ref.grad, **tol)

        # row-parallel: y = Σ_r x_r W_rᵀ, all-reduced (TP) or reduce-scattered (SP)
        row = RowParallelLinear(4 * n, d, g, sp, dtype=torch.float64)
        with torch.no_grad():
            row.weight.copy_(take_shard(W2, row.weight))
        x2_full = G[1][:, : 4 * n]
        x_ref, W_ref = _leaf(x2_full), _leaf(W2)
        F.linear(x_ref, W_ref).backward(G[0])
        x = _leaf(x2_full[:, r * 4 : (r + 1) * 4])
        y = row(x)
        want = F.linear(x2_full, W2)
        torch.testing.assert_close(y, want[rows] if sp else want, **tol)
        y.backward(G[0][rows] if sp else G[0])
        torch.testing.assert_close(x.grad, x_ref.grad[:, r * 4 : (r + 1) * 4], **tol)
        torch.testing.assert_close(gather_full(row.weight.grad, row.weight, g), W_ref.grad, **tol)


# ---------------------------------------------------------------------------------------------
# TP / SP / DP layouts versus one process


def layout_worker(dims: ParallelDims, sequence_parallels: tuple, n_micro: int, ref: dict) -> None:
    """Forward loss (rtol 1e-5), gathered first-step gradients (rtol 1e-4) and STEPS training
    losses (rtol 1e-5) of this layout against the one-process reference `ref`."""
    for sp in sequence_parallels:
        model = build(dims, sp)
        if dims.tp > 1:
            block = model.layers["0"].attention
            assert (block.n_heads, block.n_kv_heads) == (8 // dims.tp, 4 // dims.tp)
        trainer = Trainer(model, dims)
        tag = f"tp={dims.tp} dp={dims.dp} sp={sp}"
        batch0 = [microbatch(0, i) for i in range(n_micro)]
        calls = _count_fused_calls(model)
        loss0 = trainer.forward_backward(batch0)
        # every linear weight took the fused path (TP layers and plain ones), once per local
        # micro-batch
        kinds = (ColumnParallelLinear, RowParallelLinear, Linear)
        linears = [n for n, m in model.named_modules() if isinstance(m, kinds)]
        assert linears and {n: calls.get(f"{n}.weight") for n in linears} == {
            n: n_micro // dims.dp for n in linears
        }, calls
        want0 = torch.tensor(ref["losses"][0])
        assert_close(f"{tag} step-0 loss", torch.tensor(loss0), want0, 1e-5)
        grads = gathered_grads(model, dims, CFG.vocab_size)
        for name, want in ref["grads"].items():
            scale = float(want.abs().max())
            assert_close(f"{tag} grad {name}", grads[name], want, 1e-4, atol=1e-6 * scale)
        trainer = Trainer(build(dims, sp), dims)  # fresh, then the full run
        run = [trainer.step([microbatch(s, i) for i in range(n_micro)]) for s in range(STEPS)]
        losses, norms = (torch.tensor(v) for v in zip(*run))
        assert_close(f"{tag} losses", losses, torch.tensor(ref["losses"]), 1e-5)
        assert_close(f"{tag} grad norms", norms, torch.tensor(ref["norms"]), 1e-4)
        sync_check(trainer.model, dims.tp_group)  # replicated norm weights stayed identical


def _count_fused_calls(model) -> dict[str, int]:
    """Wrap every parameter's fused accumulator to count its calls, by parameter name."""
    calls: dict[str, int] = {}
    for name, p in model.named_parameters():
        inner = getattr(p, "accumulate_weight_grad", None)
        if inner is None:
            continue

        def spy(dy, x, name=name, inner=inner):
            calls[name] = calls.get(name, 0) + 1
            inner(dy, x)

        p.accumulate_weight_grad = spy
    return calls


def grad_norm_worker(dims: ParallelDims, cfg, sequence_parallel: bool) -> None:
    """Every main grad = 1: the norm is sqrt(parameter count of the TP=1 model)."""
    model = parallelize(full_model(cfg), dims, sequence_parallel)
    params = list(model.parameters())
    buf = GradBuffer(params, dims.dp_group, tp_group=dims.tp_group)
    buf.buffer.fill_(1.0)
    norm = global_grad_norm(params, (dims.tp_group, dims.pp_group))
    want = param_count(cfg, cfg.padded_vocab_size(1)) ** 0.5
    assert abs(norm - want) <= 1e-5 * want, f"tp={dims.tp}: norm {norm} != sqrt(count) {want}"


def cross_entropy_worker(dims: ParallelDims) -> None:
    """Vocab-parallel CE and argmax against F.cross_entropy / torch.argmax on the full logits
    (padding columns excluded), with a loss mask; out-of-range labels and ids raise."""
    g, n, r = dims.tp_group, dims.tp, dims.tp_rank
    vocab = 300
    padded = CFG.padded_vocab_size(n)  # 512: at TP 4 the last rank holds only padding
    T = 37
    gen = torch.Generator().manual_seed(7)
    full = torch.randn(T, padded, generator=gen) * 3
    full[:, vocab:] = 50.0  # padding logits large: must not leak into the loss
    labels = torch.randint(0, vocab, (T,), generator=gen)
    mask = (torch.rand(T, generator=gen) < 0.6).float()
    cols = slice(r * padded // n, (r + 1) * padded // n)

    ref_in = _leaf(full)
    ref = F.cross_entropy(ref_in[:, :vocab], labels, reduction="none")
    (ref * mask).sum().div(mask.sum()).backward()

    local = _leaf(full[:, cols])
    loss = cross_entropy(local, labels, g, vocab_size=vocab)
    assert loss.dtype == torch.float32 and loss.shape == (T,)
    assert_close("vocab-parallel CE", loss.detach(), ref.detach(), 1e-5)
    (loss * mask).sum().div(mask.sum()).backward()
    assert_close("vocab-parallel CE grad", local.grad, ref_in.grad[:, cols], 1e-5, atol=1e-8)
    assert torch.equal(argmax(full[:, cols], g, vocab), full[:, :vocab].argmax(-1))
    # Every real logit negative (about -100; padding -50, excluded): a rank of padding only (TP 4)
    # bids -inf, never a value that would beat them. No vocab_size: every column is real, the
    # padding's 50 wins at column 300. All equal: the tie goes to the lowest id, rank 0's column
    # 0, as torch.argmax.
    low = full - 100.0
    assert torch.equal(argmax(low[:, cols], g, vocab), low[:, :vocab].argmax(-1))
    assert torch.equal(argmax(full[:, cols], g), full.argmax(-1))
    assert torch.equal(
        argmax(torch.zeros(T, padded // n), g, vocab), torch.zeros(T, dtype=torch.long)
    )

    bad = labels.clone()
    bad[5] = vocab
    with pytest.raises(ValueError, match="labels must lie in"):
        cross_entropy(full[:, cols], bad, g, vocab_size=vocab)
    emb = VocabParallelEmbedding(padded, 8, vocab, g)
    torch.nn.init.normal_(emb.weight)
    for wrong in (vocab, padded, -1):
        ids = torch.tensor([1, 2, wrong, 4])
        with pytest.raises(ValueError, match="outside the model's vocabulary"):
            emb(ids)


# ---------------------------------------------------------------------------------------------
# dropout streams


def dropout_worker(dims: ParallelDims) -> None:
    g, n = dims.tp_group, dims.tp
    cfg = CFG.replace(hidden_dropout=0.2)

    # SP dropout: different masks per TP rank, generators left in lock-step across ranks.
    torch.manual_seed(0)
    drop = SequenceParallelDropout(0.5, dims.tp_rank)
    keep = (drop(torch.ones(64, 16)) != 0).to(torch.uint8)
    every = comm.all_gather_dim0(keep.unsqueeze(0), g)
    assert not torch.equal(every[0], every[1]), "SP dropout drew the same mask on two TP ranks"
    state = torch.get_rng_state()
    states = comm.all_gather_dim0(state.unsqueeze(0), g)
    assert all(torch.equal(states[0], s) for s in states), "CPU RNG states diverged across TP"

    def run(sp: bool, recompute: str, steps: int, seed: int = 5):
        torch.manual_seed(seed)
        model = parallelize(full_model(cfg), dims, sp)
        model.set_recompute(recompute)
        trainer = Trainer(model, dims)
        losses = [trainer.step([microbatch(s, i) for i in range(2)])[0] for s in range(steps)]
        return losses, trainer

    # Without SP the hidden dropout acts on replicated activations: the masks must be the same on
    # every TP rank, or the replicas drift apart (the norm weights would differ after a step).
    _, trainer = run(False, "none", 2)
    sync_check(trainer.model, g)
    # With SP: the same seed gives the same run, and full recompute redraws the same masks.
    a, ta = run(True, "none", 3)
    # the embedding's dropout (hidden_dropout, as Megatron-LLM) runs on the token shard too
    assert isinstance(ta.model.embed_dropout, SequenceParallelDropout)
    b, _ = run(True, "none", 3)
    assert a == b, f"same seed, different SP runs: {a} vs {b}"
    c, tc = run(True, "full", 3)
    assert_close("recompute vs stored, SP dropout", torch.tensor(c), torch.tensor(a), 1e-6)
    assert n > 1


def bucket_overlap_worker(dims: ParallelDims, fuse: bool = False) -> None:
    """On the synced micro-batch every bucket's all-reduce is launched from the backward (hooks,
    or fused weight-gradient accumulation), before finish(); finish() then gives the DP mean of
    per-rank gradients."""
    model = build(dims, False)
    params = list(model.parameters())
    buf = GradBuffer(params, dims.dp_group, bucket_mb=0.02, fuse_weight_grads=fuse)
    assert buf.num_buckets > 3
    mb = microbatch(0, dims.dp_rank)
    total = mb["loss_mask"].sum()
    buf.zero()
    with buf.no_sync():
        from tests.parallel._harness import micro_loss

        micro_loss(model, mb, None, total).backward()
    assert not any(buf._launched), "a bucket was reduced inside no_sync()"
    local = buf.buffer.clone() * 2  # what this rank accumulates over the two passes
    micro_loss(model, mb, None, total).backward()
    assert all(buf._launched), "the last backward did not launch every bucket"
    with pytest.raises(RuntimeError, match="in flight"):
        buf.zero()  # would clear the buffer under the running all-reduces
    buf.finish()
    every = comm.all_gather_dim0(local.unsqueeze(0), dims.dp_group)
    assert_close("DP sum of main grads", buf.buffer, every.sum(0), 1e-6, atol=1e-9)
    with pytest.raises(RuntimeError, match="call zero"):
        micro_loss(model, mb, None, total).backward()  # a backward after the reduction


def meta_worker(dims: ParallelDims) -> None:
    """A model built on the meta device parallelizes without materialising any full tensor;
    `materialize` keeps the layout attributes, and loading the full state gives the same
    parameters as parallelizing the materialised model."""
    from model.llama import Llama
    from parallel.parallelize import load_full_state_dict, materialize
    from tests.parallel._harness import full_state

    with torch.device("meta"):
        model = Llama(CFG)
    model = parallelize(model, dims, sequence_parallel=True)
    assert all(p.is_meta for p in model.parameters())
    materialize(model, "cpu")
    load_full_state_dict(model, full_state())
    want = build(dims, True)
    for (name, p), q in zip(model.named_parameters(), want.parameters()):
        assert torch.equal(p, q), name
        assert (p.tp_dim, p.tp_pieces, p.global_shape) == (q.tp_dim, q.tp_pieces, q.global_shape)
    embed = model.embed.weight
    assert embed.global_shape == (CFG.padded_vocab_size(dims.tp), CFG.hidden_size)
    assert model.layers["0"].attention_norm.weight.sequence_parallel
