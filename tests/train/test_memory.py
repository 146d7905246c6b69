"""train.memory's start-up estimate of a step's peak: states allocated, activations of the
micro-batches in flight (from the measured bytes per token and layer), and the last stage's
logits; the benchmark compares it with the measured peak on a GPU (bench_train)."""

import pytest
import torch

from tests.train.helpers import tiny_run
from train.loop import Trainer
from train.memory import peak_estimate, peak_line

PER_TOKEN = {"none": 1000.0, "selective": 600.0, "full": 40.0}  # bytes per token and layer


def _trainer(extra=()):
    rc, dims, tok = tiny_run(list(extra))
    return Trainer(rc, dims, tok)


def test_one_stage_holds_one_micro_batch_and_the_logits():
    t = _trainer(["--recompute_granularity", "selective"])
    rc = t.rc
    tokens = rc.data.micro_batch_size * rc.data.seq_length
    est = peak_estimate(t, PER_TOKEN)
    assert est.in_flight == 1 and est.mode == "selective"
    assert est.layers == rc.model.num_layers
    # each layer keeps 600 B a token; the one in its backward rebuilds 400 more
    assert est.activations == 600.0 * tokens * rc.model.num_layers + 400.0 * tokens
    assert est.logits == 3 * tokens * t.padded_vocab * 4  # fp32 on the CPU
    weights = sum(p.numel() * 4 for p in t.params)
    assert est.states == weights + t.grads.buffer.numel() * 4 + t.optimizer.state_bytes()
    assert est.total == est.states + est.activations + est.logits
    none = peak_estimate(t, PER_TOKEN, mode="none")
    assert none.activations == 1000.0 * tokens * rc.model.num_layers  # nothing recomputed
    line, too_big = peak_line(est, "cpu")
    assert "GiB" in line and "1 micro-batch chunk(s) in flight" in line and not too_big


def test_block_recompute_mixes_full_and_stored_layers():
    t = _trainer(["--recompute_granularity", "full", "--recompute_method", "block",
                  "--recompute_num_layers", "1"])  # fmt: skip
    tokens = t.rc.data.micro_batch_size * t.rc.data.seq_length
    layers = t.rc.model.num_layers
    est = peak_estimate(t, PER_TOKEN)
    # the recomputed layer rebuilds its 960 B a token during its backward
    assert est.activations == pytest.approx((40.0 + (layers - 1) * 1000.0 + 960.0) * tokens)


def test_block_recompute_of_more_layers_than_held_recomputes_them_all():
    t = _trainer(["--recompute_granularity", "full", "--recompute_method", "block",
                  "--recompute_num_layers", "5"])  # fmt: skip
    tokens = t.rc.data.micro_batch_size * t.rc.data.seq_length
    layers = t.rc.model.num_layers
    assert layers < 5
    est = peak_estimate(t, PER_TOKEN)
    assert est.activations == pytest.approx((40.0 * layers + 960.0) * tokens)


def test_peak_line_warns_above_92_percent_of_the_card(monkeypatch):
    from train.memory import PeakEstimate

    gib = 2**30
    card = type("P", (), {"total_memory": 100 * gib})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: card)
    for total, too_big in ((90, False), (95, True)):
        est = PeakEstimate(total * gib, 0.0, 0.0, 1, 2, "none")
        line, warn = peak_line(est, "cuda:0")
        assert warn == too_big and line.endswith(f"= {total:.2f} GiB of 100.0 GiB on cuda:0")


def test_state_line_names_the_offloaded_host_memory():
    from train.memory import state_memory_line

    t = _trainer(["--use_distributed_optimizer", "--optimizer_cpu_offload"])
    host = t.optimizer.host_state_bytes()
    assert f"; {host / 2**30:.3f} GiB more in host memory" in state_memory_line(t)


def test_a_storage_saved_twice_counts_once():
    """The measurement counts each saved storage once, however many backward nodes keep it:
    here every node saves the block's input alone (x * x keeps it twice, sin once more), so the
    bytes are exactly the input's, a count by hand independent of the model. Counting each save
    would report three times what the backward holds, and the start-up estimate with it."""
    from types import SimpleNamespace

    from train.memory import saved_bytes

    class Saver(torch.nn.Module):
        def __init__(self, hidden):
            super().__init__()
            self.attention_norm = SimpleNamespace(weight=torch.ones(hidden))
            self.attention = SimpleNamespace(recompute_core=False)
            self.mlp = SimpleNamespace(recompute_act=False)
            self.recompute_norms = False

        def forward(self, h, positions, cu_seqlens, max_seqlen):
            return h * h + h.sin()

    tokens, hidden = 10, 24
    got = saved_bytes(Saver(hidden), tokens, "none", "cpu", torch.float32)
    assert got == tokens * hidden * 4
