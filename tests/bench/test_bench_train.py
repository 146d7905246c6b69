"""The whole-step benchmark's plumbing on CPU: its micro-batches come from the loader's packing and
padding, every case runs real training steps, and a spent budget skips loudly. No timing here is
a measurement (tiny model, CPU)."""

import time

import pytest
import torch

from bench.bench_train import VOCAB, Shape, gpu_rows, micro_batches

CEILINGS = {"copy_gbps": 10.0, "matmul_tflops": 0.1}  # fake


@pytest.mark.parametrize("packed", [True, False])
def test_micro_batches_are_the_loaders_rows(packed):
    shape = Shape(layers=1, seq=4096, micro_batches=3)
    mbs, useful = micro_batches(shape, packed, VOCAB)
    assert len(mbs) == 3
    for mb in mbs:
        assert mb["tokens"].shape == (1, 4096) and int(mb["tokens"].max()) < VOCAB
        cu = mb["cu_seqlens"]
        assert int(cu[0]) == 0 and int(cu[-1]) == 4096 and bool((cu[1:] >= cu[:-1]).all())
        docs = len(cu) - 1
        # packed: several samples a row (the mix's mean is 473.5); padded: one sample + padding
        assert docs >= 5 if packed else docs <= 2
        assert float(mb["loss_mask"].sum()) > 0
    tokens = 3 * 4096
    if packed:
        assert 0.9 * tokens < useful <= tokens
    else:
        assert useful < 0.5 * tokens  # the point of packing


def test_every_case_trains_on_cpu():
    rows = gpu_rows(CEILINGS, True, device="cpu")
    assert [(r.op, r.impl) for r in rows] == [
        ("train_step", "ours"),
        ("train_step", "ours[no wgrad fusion]"),
        ("train_step_padded", "ours"),
        ("train_step", "ours[no recompute]"),
        ("train_step", "ours[full recompute]"),
        ("optimizer_step", "ours"),
        ("optimizer_step", "ours[cpu offload]"),
    ]
    for r in rows:
        assert r.error is None, r.error
    for r in rows[:5]:
        assert r.ms > 0 and r.flops > 0 and r.tflops > 0 and "tokens/s" in r.note
    for r in rows[5:]:
        assert r.ms > 0 and "s per billion parameters" in r.note
    assert "host link" in rows[6].note and "ours[cpu offload]" in rows[5].ratio_vs
    assert set(rows[0].ratio_vs) == {
        "ours[no wgrad fusion]",
        "ours[no recompute]",
        "ours[full recompute]",
    }
    assert "packed runs" in rows[2].note


def test_a_spent_budget_skips_every_case():
    rows = gpu_rows(CEILINGS, True, deadline=time.time() - 1, device="cpu")
    assert len(rows) == 7 and all(r.error and "skipped" in r.error for r in rows)
    assert all(r.ms is None for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_refuses_without_a_gpu():
    with pytest.raises(RuntimeError, match="no CUDA device"):
        gpu_rows(CEILINGS, True)


def test_a_slow_first_case_does_not_skip_the_cases_that_fit(monkeypatch):
    """The first case compiles and autotunes for every case: the later ones are judged by their
    own steps, not by that. FAKE clock and timings around real tiny CPU steps."""
    from types import SimpleNamespace

    from bench import bench_train

    clock = {"now": 0.0}
    monkeypatch.setattr(
        bench_train,
        "time",
        SimpleNamespace(time=lambda: clock["now"], perf_counter=time.perf_counter),
    )
    real = bench_train.measure

    def measure(trainer, batch, device, warmup, steps):
        m = real(trainer, batch, device, warmup, steps)
        clock["now"] += 20.0 if warmup > 1 else 1.0  # the first case's compiles: 20 s
        m["times"] = [100.0] * steps  # 0.1 s a step
        return m

    monkeypatch.setattr(bench_train, "measure", measure)
    shape = Shape(layers=1, seq=256, micro_batches=2, hidden=64, ffn=160, heads=4, kv_heads=2)
    rows = bench_train.rows_for(shape, CEILINGS, "cpu", warmup=2, steps=2, deadline=22.5)
    # cases start at 0, 20, 21 and 22 s (each ~0.3 s by its steps); the fifth would end past 22.5
    assert [r.ms is not None for r in rows] == [True, True, True, True, False]
    assert "skipped" in rows[4].error
