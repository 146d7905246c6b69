"""train.footprint: the per-rank parameter count and state bytes predicted from the configuration
equal what the trainer allocates (TP 1 here; TP 2 x PP 2 in the distributed-optimizer gloo test)."""

import pytest

from model.config import PRESETS
from tests.train.helpers import tiny_run
from train.footprint import GIB, Footprint, bytes_per_param, footprint, rank_params
from train.loop import Trainer


@pytest.mark.parametrize("distributed", [False, True])
def test_one_process_prediction_equals_the_allocation(distributed):
    rc, dims, tok = tiny_run(["--use_distributed_optimizer"] if distributed else [])
    trainer = Trainer(rc, dims, tok)
    params = sum(p.numel() for p in trainer.params)
    padded = rc.model.padded_vocab_size(1)
    assert rank_params(rc.model, padded, 1, 1, 0) == params
    fp = footprint(rc.model, padded, 1, 1, 1, bf16=False, distributed=distributed)
    assert fp.params == params
    weights = sum(p.numel() * p.element_size() for p in trainer.params)
    assert fp.params * fp.weights == weights
    assert fp.params * fp.gradients == trainer.grads.buffer.numel() * 4
    assert fp.params * fp.optimizer == trainer.optimizer.state_bytes()
    assert "GiB" in fp.line()


def test_pipeline_stages_split_the_layers_and_put_embedding_and_head_at_the_ends():
    m = PRESETS["llama2-7b"]
    padded = m.padded_vocab_size(2)
    whole = rank_params(m, padded, 1, 1, 0)
    per_tp = [rank_params(m, padded, 2, 4, r) for r in range(4)]
    norms = 2 * m.num_layers * m.hidden_size + m.hidden_size  # whole on every TP rank
    assert sum(per_tp) == (whole - norms) // 2 + norms
    embed = padded * m.hidden_size // 2
    assert per_tp[0] - per_tp[1] == embed and per_tp[3] - per_tp[1] == embed + m.hidden_size
    interleaved = [rank_params(m, padded, 2, 4, r, virtual_stages=2) for r in range(4)]
    assert interleaved == per_tp  # the same number of layers per rank


def test_the_distributed_optimizer_divides_the_state_by_dp():
    assert bytes_per_param(True, 8, False) == (2, 4, 12, 0)
    assert bytes_per_param(True, 8, True) == (2, 4.5, 1.75, 0)
    assert bytes_per_param(True, 1, True) == (2, 4, 12, 0)  # nothing to share at DP 1
    assert bytes_per_param(False, 4, False) == (4, 4, 8, 0)
    assert bytes_per_param(True, 1, True, offload=True) == (2, 4, 0, 12)
    assert bytes_per_param(True, 8, True, offload=True) == (2, 4.5, 0.25, 1.5)
    m = PRESETS["llama2-7b"]
    rep = footprint(m, m.padded_vocab_size(1), 1, 1, 8, bf16=True, distributed=False)
    dist = footprint(m, m.padded_vocab_size(1), 1, 1, 8, bf16=True, distributed=True)
    assert 112 < rep.total_bytes / GIB < 114  # 6.74e9 x 18 B, the README's 121 GB
    assert 51 < dist.total_bytes / GIB < 52  # 6.74e9 x 8.25 B, the README's 56 GB


def test_dry_run_description_prints_the_footprint_and_the_distributed_alternative():
    from tests.parallel3d.common import run_config
    from train.describe import describe

    rc, _ = run_config(1, 2, 8, 16)  # DP 4
    text = describe(rc)
    line = next(x for x in text.splitlines() if x.startswith("states on the largest rank"))
    assert "--use_distributed_optimizer would make it" in line
    rc, _ = run_config(1, 2, 8, 16, ["--use_distributed_optimizer"])
    line = next(x for x in describe(rc).splitlines() if x.startswith("states on the largest"))
    assert "would make it" not in line
    fp = footprint(rc.model, rc.model.padded_vocab_size(1), 1, 2, 4, False, True)
    assert f"= {fp.total_bytes / GIB:.2f} GiB" in line


def test_offloaded_one_process_prediction_equals_the_allocation():
    rc, dims, tok = tiny_run(["--use_distributed_optimizer", "--optimizer_cpu_offload"])
    trainer = Trainer(rc, dims, tok)
    fp = footprint(rc.model, rc.model.padded_vocab_size(1), 1, 1, 1, bf16=False,
                   distributed=True, offload=True)  # fmt: skip
    assert fp.params * fp.optimizer == trainer.optimizer.state_bytes() == 0
    pinned = sum(t.numel() * t.element_size() for t in
                 trainer.optimizer._grad_host + trainer.optimizer._out_host)  # fmt: skip
    assert fp.params * fp.host == trainer.optimizer.host_state_bytes() - pinned
    assert "GiB of host memory" in fp.line()


def test_line_and_total_leave_host_memory_apart():
    # 2**30 parameters offloaded at DP 2, by hand: weights 2 B (bf16),
    # gradients 4 + 4 / 2 = 6 B, device optimizer the staging copy 2 / 2 = 1 B; host 12 / 2 = 6 B.
    fp = Footprint(GIB, *bytes_per_param(True, 2, True, offload=True))
    assert fp.total_bytes == GIB * (2 + 6 + 1)  # the host bytes are not device bytes
    assert fp.line() == (
        "weights 2.00 + gradients 6.00 + optimizer 1.00 = 9.00 GiB (and 6.00 GiB of host memory)"
    )
