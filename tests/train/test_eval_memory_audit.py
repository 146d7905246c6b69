"""Audit of validation (train.evaluate through Trainer.evaluate), the activation measurement and
peak estimate (train.memory), the state footprint (train.footprint) and the profiler window
(train.profile) against what the trainer really does."""

import math
import sys

import pytest
import torch
import torch.distributed as dist

from tests.train.helpers import SyntheticLoader, tiny_run
from train.footprint import bytes_per_param, footprint, rank_params
from train.loop import Trainer, build_stages, virtual_stages
from train.memory import activation_report, saved_bytes, state_bytes
from train.profile import StepProfiler

# ----------------------------------------------------------------------------------------------
# evaluation


def _eval_batches(seed: int, steps: int = 1) -> list[dict]:
    loader = SyntheticLoader(2, 64, 2, seed=seed)
    return [mb for _ in range(steps) for mb in loader.next_global_batch()]


@pytest.mark.parametrize("extra", [[], ["--lima_dropout"]])
def test_evaluation_leaves_training_bit_identical_with_dropout(extra):
    """Dropout off during validation (no mask drawn), train mode back after, the random stream
    untouched: a run that validates after every step trains exactly like one that never does."""

    def run(validate: bool):
        rc, dims, tok = tiny_run(["--hidden_dropout", "0.3", *extra])
        trainer = Trainer(rc, dims, tok)
        torch.manual_seed(1234)
        loader = SyntheticLoader(2, 64, 2, seed=3)
        losses, evals = [], []
        for _ in range(3):
            losses.append(trainer.train_step(loader.next_global_batch(), lr=1e-3).loss)
            if validate:
                evals.append(trainer.evaluate(_eval_batches(9)))
                assert all(m.training for s in trainer.stages for m in s.modules())
        weights = [p.detach().clone() for p in trainer.params]
        return losses, weights, torch.get_rng_state(), evals

    plain_losses, plain_w, plain_rng, _ = run(False)
    losses, weights, rng, evals = run(True)
    assert losses == plain_losses
    assert all(torch.equal(a, b) for a, b in zip(weights, plain_w))
    assert torch.equal(rng, plain_rng)
    # dropout is active in training (the losses differ from a dropout-free run), and validation
    # of unchanged weights is deterministic: two evaluations in a row agree
    rc, dims, tok = tiny_run(["--hidden_dropout", "0.3", *extra])
    trainer = Trainer(rc, dims, tok)
    assert trainer.evaluate(_eval_batches(9)) == trainer.evaluate(_eval_batches(9))


def test_eval_loss_is_the_token_weighted_mean_and_ppl_its_exp():
    """Over micro-batches with different loss-token counts: the loss is sum / tokens over the
    whole evaluation (not a mean of per-batch means), the perplexity exp of it (not a mean of
    per-batch perplexities), accuracies likewise pooled."""
    rc, dims, tok = tiny_run()
    trainer = Trainer(rc, dims, tok)
    a, b = _eval_batches(5)
    b = {**b, "loss_mask": b["loss_mask"].clone()}
    b["loss_mask"][:, 40:] = 0.0  # fewer loss tokens in the second micro-batch
    ra, rb = trainer.evaluate([a]), trainer.evaluate([b])
    both = trainer.evaluate([a, b])
    na, nb = ra["loss_tokens"], rb["loss_tokens"]
    assert na != nb and both["loss_tokens"] == na + nb
    pooled = (ra["loss"] * na + rb["loss"] * nb) / (na + nb)
    assert both["loss"] == pytest.approx(pooled, rel=1e-9)
    assert both["ppl"] == pytest.approx(math.exp(pooled), rel=1e-9)
    assert both["accuracy"] == pytest.approx(
        (ra["accuracy"] * na + rb["accuracy"] * nb) / (na + nb), rel=1e-9
    )
    # differs from the means of per-batch values (the test can tell them apart)
    assert abs(both["loss"] - (ra["loss"] + rb["loss"]) / 2) > 1e-6


def test_dp_padding_rows_and_micro_batches_count_in_no_metric():
    """A DP rank's padding (rows with loss mask 0, num_rows not counting them; whole padding
    micro-batches with num_rows 0) leaves every metric, count_loss_mask included, unchanged."""
    rc, dims, tok = tiny_run()
    trainer = Trainer(rc, dims, tok)
    real = _eval_batches(6)
    ref = trainer.evaluate(real)
    pad_mb = {**real[0], "loss_mask": torch.zeros_like(real[0]["loss_mask"]), "num_rows": 0}
    # a micro-batch whose second row is a padding row
    half = {**real[1], "loss_mask": real[1]["loss_mask"].clone(), "num_rows": 1}
    half["loss_mask"][1] = 0.0
    one_row = {**real[1], "loss_mask": real[1]["loss_mask"].clone()}
    one_row["loss_mask"][1] = 0.0
    padded = trainer.evaluate([real[0], real[1], pad_mb])
    assert padded == ref
    r_half = trainer.evaluate([real[0], half])
    r_rows = trainer.evaluate([real[0], one_row])  # without num_rows: both rows counted
    assert r_half["loss"] == r_rows["loss"] and r_half["loss_tokens"] == r_rows["loss_tokens"]
    assert r_half["count_loss_mask"] == pytest.approx(r_half["loss_tokens"] / 3)
    assert r_rows["count_loss_mask"] == pytest.approx(r_rows["loss_tokens"] / 4)


# ----------------------------------------------------------------------------------------------
# activation memory


def test_activation_report_counts_the_dropout_masks_of_lima_layers():
    """With --lima_dropout the bottom layer's rate is 0 (no masks saved) and every other layer's
    is positive (two masks saved): the report is the mean over the local blocks, not the first
    block's bytes, which would leave the masks out on the first pipeline stage -- the one with
    the most micro-batches in flight."""
    rc, dims, tok = tiny_run(["--hidden_dropout", "0.25", "--lima_dropout", "--num_layers", "4"])
    trainer = Trainer(rc, dims, tok)
    blocks = list(trainer.model.layers.values())
    tokens = 64
    rep = activation_report(trainer.model, tokens, "cpu", torch.float32)
    for mode in ("none", "selective", "full"):
        each = [saved_bytes(b, tokens, mode, "cpu", torch.float32) for b in blocks]
        if mode != "full":  # full recompute keeps only the inputs, masks or not
            assert each[0] < each[1] == each[2] == each[3]
        assert rep[mode] == pytest.approx(sum(each) / (len(each) * tokens))
    # without dropout, or with the same rate everywhere, every block saves the same
    rc, dims, tok = tiny_run(["--hidden_dropout", "0.25", "--num_layers", "4"])
    trainer = Trainer(rc, dims, tok)
    first = next(iter(trainer.model.layers.values()))
    rep = activation_report(trainer.model, tokens, "cpu", torch.float32)
    assert rep["none"] == saved_bytes(first, tokens, "none", "cpu", torch.float32) / tokens


def test_activation_report_of_an_interleaved_ranks_chunks_is_their_blocks_mean():
    """An interleaved rank holds several chunks (here layers 0-1 and 2-3 of 4, LIMA): the
    report over the list of chunks is the one of all four blocks, not chunk 0's alone (whose
    rate-0 layer 0 weighs twice as much there)."""
    from model.llama import Llama

    rc, _, _ = tiny_run(["--hidden_dropout", "0.25", "--lima_dropout", "--num_layers", "4"])
    cfg = rc.model
    torch.manual_seed(0)
    whole = Llama(cfg)
    chunks = [Llama(cfg, layer_ids=range(0, 2), post=False),
              Llama(cfg, layer_ids=range(2, 4), pre=False)]  # fmt: skip
    tokens = 64
    rep = activation_report(chunks, tokens, "cpu", torch.float32)
    assert rep == pytest.approx(activation_report(whole, tokens, "cpu", torch.float32))
    assert rep["none"] > activation_report(chunks[0], tokens, "cpu", torch.float32)["none"]


def test_in_flight_bound_matches_the_schedules():
    """peak_estimate's micro-batches in flight (pp - stage for 1F1B, the warm-up + 1 of the
    interleaved table) is the most forwards awaiting their backward in the real schedule."""
    from parallel.pipeline_schedule import BACKWARD, FORWARD, max_in_flight, schedule

    def flatten(actions):
        for a in actions:
            yield from flatten(a) if isinstance(a, list) else (a,)

    checked = 0
    for pp in (1, 2, 4):
        for v in (1, 2, 3):
            for m in (1, 2, 3, 4, 8):
                if v > 1 and (pp == 1 or m % pp):
                    continue
                for rank in range(pp):
                    now = most = 0
                    for a in flatten(schedule(pp, rank, m, v)):
                        now += (a.kind == FORWARD) - (a.kind == BACKWARD)
                        most = max(most, now)
                    assert most == max_in_flight(pp, rank, m, v), (pp, v, m, rank)
                    checked += 1
    assert checked > 50


# ----------------------------------------------------------------------------------------------
# footprint against real allocations: ranks of a TP x DP layout built in one process, the
# groups stood in for by objects that know their size and this rank's index


class _Group:
    def __init__(self, size: int, rank: int):
        self.n, self.r = size, rank


@pytest.fixture
def fake_groups(monkeypatch):
    import parallel.comm as comm

    size0, rank0 = comm.group_size, comm.group_rank
    size = lambda g: g.n if isinstance(g, _Group) else size0(g)  # noqa: E731
    rank = lambda g: g.r if isinstance(g, _Group) else rank0(g)  # noqa: E731
    for name, mod in list(sys.modules.items()):
        if name.startswith(("parallel", "train", "model")) and mod is not None:
            if getattr(mod, "group_size", None) is size0:
                monkeypatch.setattr(mod, "group_size", size)
            if getattr(mod, "group_rank", None) is rank0:
                monkeypatch.setattr(mod, "group_rank", rank)
    get_rank, get_size = dist.get_rank, dist.get_world_size
    monkeypatch.setattr(dist, "get_rank", lambda g=None: g.r if isinstance(g, _Group) else
                        get_rank(g))  # fmt: skip
    monkeypatch.setattr(dist, "get_world_size", lambda g=None: g.n if isinstance(g, _Group) else
                        get_size(g))  # fmt: skip


def _dims(tp: int, pp: int, dp: int, tp_rank: int = 0, dp_rank: int = 0, pp_rank: int = 0):
    from parallel.dims import ParallelDims

    return ParallelDims(tp=tp, pp=pp, dp=dp, rank=pp_rank * tp * dp + dp_rank * tp + tp_rank,
                        tp_group=_Group(tp, tp_rank) if tp > 1 else None,
                        dp_group=_Group(dp, dp_rank) if dp > 1 else None,
                        pp_group=_Group(pp, pp_rank) if pp > 1 else None)  # fmt: skip


@pytest.mark.parametrize("tp, pp, extra", [
    (2, 1, []), (1, 4, []), (2, 2, ["--sequence_parallel"]),
    (2, 2, ["--num_layers_per_virtual_pipeline_stage", "1"]),
])  # fmt: skip
def test_rank_params_equal_the_built_stages(fake_groups, tp, pp, extra):
    from tests.parallel3d.common import run_config

    rc, _ = run_config(tp, pp, tp * pp, 16, extra)
    padded = rc.model.padded_vocab_size(tp)
    for r in range(pp):
        for t in range(tp):
            stages = build_stages(rc, _dims(tp, pp, 1, t, 0, r), "cpu", torch.float32)
            held = sum(p.numel() for s in stages for p in s.parameters())
            assert held == rank_params(rc.model, padded, tp, pp, r, virtual_stages(rc))
            assert all(s.padded_vocab == padded for s in stages)


@pytest.mark.parametrize("tp, dp, extra", [
    (2, 1, []), (2, 2, []), (1, 2, ["--use_distributed_optimizer"]),
    (2, 4, ["--use_distributed_optimizer"]),
    (1, 4, ["--use_distributed_optimizer", "--optimizer_cpu_offload"]),
])  # fmt: skip
def test_footprint_is_what_a_rank_allocates_up_to_the_bucket_padding(fake_groups, tp, dp, extra):
    """Weights, gradients and optimizer state of a real Trainer rank against the prediction.
    With the distributed optimizer at DP > 1 each gradient bucket (and the weight buffer laid
    out like it) is padded to a multiple of 128 x DP, and each rank's piece of a bucket may be up
    to 127 elements longer than a DP-th: the footprint leaves that out (below 1 MiB per 100
    buckets at DP 8 against GiBs), so allocated - predicted stays inside that bound."""
    from tests.parallel3d.common import run_config

    rc, tok = run_config(tp, 1, tp * dp, 16, extra)
    trainer = Trainer(rc, _dims(tp, 1, dp), tok)
    fp = footprint(rc.model, rc.model.padded_vocab_size(tp), tp, 1, dp, bf16=False,
                   distributed=rc.optim.distributed, offload=rc.optim.cpu_offload)  # fmt: skip
    weights, grads, optim = state_bytes(trainer)
    assert fp.params == sum(p.numel() for p in trainer.params)
    assert weights == fp.params * fp.weights
    buckets = len(trainer.grads.bucket_pieces())
    sharded = rc.optim.distributed and dp > 1
    pad_buffer = buckets * (128 * dp - 1) if sharded else 0  # elements
    pad_piece = buckets * 127 if sharded else 0
    assert fp.params * fp.gradients <= grads
    assert grads <= fp.params * fp.gradients + 4 * (pad_buffer + pad_piece)
    assert fp.params * fp.optimizer <= optim <= fp.params * fp.optimizer + 16 * pad_piece
    if rc.optim.cpu_offload:
        staging = trainer.optimizer._grad_host + trainer.optimizer._out_host
        pinned = sum(t.numel() * t.element_size() for t in staging)
        host = trainer.optimizer.host_state_bytes() - pinned
        assert fp.params * fp.host <= host <= fp.params * fp.host + 12 * pad_piece
    if sharded:  # the bound is tight enough to mean something
        assert grads - fp.params * fp.gradients < 0.01 * grads
    assert bytes_per_param(False, dp, rc.optim.distributed, rc.optim.cpu_offload) == (
        fp.weights, fp.gradients, fp.optimizer, fp.host)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# profiler window


@pytest.mark.parametrize("rank, writes", [(0, False), (1, True)])
def test_profiler_traces_only_the_chosen_ranks_and_the_window(tmp_path, rank, writes):
    rc, _, _ = tiny_run(["--profile", "--profile_step_start", "2", "--profile_step_end", "4",
                         "--profile_ranks", "1", "--run_dir", str(tmp_path)])  # fmt: skip
    prof = StepProfiler(rc.log, rank, torch.device("cpu"))
    written = []
    for it in range(1, 6):
        prof.before_step(it)
        assert (prof.prof is not None) == (writes and 2 <= it < 4)
        torch.ones(8) @ torch.ones(8)
        written += prof.after_step(it)
    written += prof.finish(5)
    names = sorted(p.name for p in written)
    assert names == (["rank1-iter2-4-top.txt", "rank1-iter2-4.json"] if writes else [])
    on_disk = sorted(p.name for p in (tmp_path / "profile").glob("*"))
    assert on_disk == names


def test_count_loss_mask_is_per_sample_with_or_without_packing(tmp_path):
    """Megatron-LLM's count_loss_mask is loss tokens per sequence, and there a row was one
    sample. Packed rows hold several: the count must divide by samples, not rows, or it grows
    with seq_length (76 against 25.3 on this split before)."""
    from tests.train.helpers import tiny_run, write_split
    from train.data import eval_batches
    from train.loop import Trainer

    ds = write_split(tmp_path, "mix-val", [20, 30, 9, 12, 25, 18], {})
    got = {}
    for packing in ("--packing", "--no-packing"):
        rc, dims, tok = tiny_run(["--seq_length", "64", "--micro_batch_size", "2",
                                  "--global_batch_size", "6", packing])  # fmt: skip
        trainer = Trainer(rc, dims, tok)
        mbs = list(eval_batches(ds, rc.data, 0, 1, None, 1))
        got[packing] = trainer.evaluate(mbs)["count_loss_mask"]
    # every token of these samples is an assistant token; each loses one label (the last)
    want = sum(n - 1 for n in [20, 30, 9, 12, 25, 18]) / 6
    assert got["--packing"] == pytest.approx(want) and got["--no-packing"] == pytest.approx(want)


def test_peak_estimate_of_an_interleaved_tensor_parallel_last_stage(fake_groups, monkeypatch):
    """The last stage of TP 2 x PP 2 with four chunks of one layer each: layers are counted per
    chunk, and the logits are the rank's vocabulary shard. (The stages alone: a Trainer at PP 2
    wants a real process group; the states are what the CUDA allocator reports.)"""
    from types import SimpleNamespace

    from tests.parallel3d.common import run_config
    from train.memory import peak_estimate

    rc, _ = run_config(2, 2, 4, 16, ["--num_layers_per_virtual_pipeline_stage", "1"])
    assert rc.model.num_layers == 8
    dims = _dims(2, 2, 1, pp_rank=1)
    trainer = SimpleNamespace(rc=rc, dims=dims, device=torch.device("cuda"), dtype=torch.float32,
                              stages=build_stages(rc, dims, "cpu", torch.float32),
                              padded_vocab=rc.model.padded_vocab_size(2))  # fmt: skip
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 123)
    est = peak_estimate(trainer, {"none": 1000.0, "selective": 600.0, "full": 40.0})
    tokens = rc.data.micro_batch_size * rc.data.seq_length
    assert est.layers == 1 and est.states == 123  # 8 layers / (2 stages x 4 chunks)
    assert est.logits == 3 * tokens * (rc.model.padded_vocab_size(2) // 2) * 4  # fp32 shard


def test_saved_bytes_count_activations_not_parameters():
    """Full recompute keeps the block's inputs alone: hidden states, positions (int64) and
    cu_seqlens (3 x int32). The other modes' bytes grow with the tokens only (a quadratic term
    from the CPU attention's probabilities): a parameter would add a constant."""
    from model.llama import Llama

    rc, _, _ = tiny_run()
    torch.manual_seed(0)
    block = next(iter(Llama(rc.model).layers.values()))
    h = rc.model.hidden_size
    assert saved_bytes(block, 64, "full", "cpu", torch.float32) == 64 * h * 4 + 64 * 8 + 3 * 4
    for mode in ("none", "selective"):
        s64, s128, s192 = (
            saved_bytes(block, n, mode, "cpu", torch.float32) for n in (64, 128, 192)
        )
        assert 3 * s64 - 3 * s128 + s192 in (0, 12), mode  # a T^2 + b T (+ cu_seqlens) at T = 0


def test_parallelize_refuses_a_tp_group_of_another_size(fake_groups):
    from model.llama import Llama
    from parallel.dims import ParallelDims
    from parallel.parallelize import parallelize

    rc, _, _ = tiny_run()
    dims = ParallelDims(tp=2, pp=1, dp=1, rank=0, tp_group=_Group(4, 0))
    with pytest.raises(ValueError, match="tp=2 but its tp_group has 4 ranks"):
        parallelize(Llama(rc.model), dims)
