"""The benchmark scripts' own arithmetic and row plumbing (bench_train, bench_parallel,
bench_pipeline, bench_pretokenize, bench_attention), pinned against numbers worked out by hand.

Every timing here is FAKE (a made-up clock or a stand-in measurement) to test the arithmetic,
the rows and the files written; nothing is a measurement. Expected numbers are computed in the
test from the formulas' definitions, never by calling the function under test.
"""

import json
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from bench import bench_attention, bench_parallel, bench_pipeline, bench_pretokenize, bench_train
from bench.harness import Row

GiB = 2**30
MiB = 2**20


# -- bench_train ------------------------------------------------------------------------------

# The CPU plumbing shape: 2 layers of h64 (4 heads of 16 over 2 KV heads), FFN 160, rows of 256.
CPU_SHAPE = bench_train.Shape(
    layers=2, seq=256, micro_batches=2, hidden=64, ffn=160, heads=4, kv_heads=2
)
PADDED_VOCAB = 32128
# matmul parameters by hand: per layer wqkv 64 x (4 + 2*2) * 16, wo 64 x 64, w13 64 x 2*160,
# w2 160 x 64; and the output head 64 x 32128 (the embedding is a lookup, not a matmul)
MATMUL_PARAMS = 2 * (64 * 128 + 64 * 64 + 64 * 320 + 160 * 64) + 64 * PADDED_VOCAB
CASE_TIMES = [10.0, 20.0, 30.0, 40.0, 100.0]  # FAKE ms of one case's 5 steps; case k: x (k + 1)


class _FakeTrainer:
    """Stands in for train.loop.Trainer in rows_for: records what each case set."""

    def __init__(self, rc, dims, tok, device):
        self.calls = []
        self.stages = [SimpleNamespace(set_recompute=lambda r: self.calls.append(("rc", r)))]
        self.grads = SimpleNamespace(set_fuse_weight_grads=lambda f: self.calls.append(("fuse", f)))
        self.dtype = torch.bfloat16
        self.padded_vocab = PADDED_VOCAB


@pytest.fixture
def fake_gpu_train(monkeypatch):
    """rows_for on a pretend GPU: no trainer, no data, FAKE step times and memory."""
    seen = {"warmup": [], "trainer": []}

    def trainer(*args, **kwargs):
        t = _FakeTrainer(*args, **kwargs)
        seen["trainer"].append(t)
        return t

    def measure(tr, batch, device, warmup, steps):
        k = len(seen["warmup"])
        seen["warmup"].append(warmup)
        if seen.get("fail") == k:
            raise RuntimeError("boom")
        result = SimpleNamespace(tokens=512, pairs=10_000)
        times = [t * (k + 1) for t in CASE_TIMES]
        if "clock" in seen:
            seen["clock"]["now"] += seen["clock"]["case_s"][k]
        return {
            "times": times,
            "result": result,
            "states": 5 * GiB,
            "peak": 12 * GiB,
            "phases": {"fwd_bwd": 7.0, "optimizer": 1.5},
        }

    monkeypatch.setattr(bench_train, "Trainer", trainer)
    monkeypatch.setattr(bench_train, "peak_flops_per_gpu", lambda: 1e12)  # FAKE 1 TFLOP/s
    monkeypatch.setattr(bench_train, "activation_report", lambda *a: 1.0)
    monkeypatch.setattr(bench_train, "peak_estimate", lambda *a: SimpleNamespace(total=3 * GiB))
    monkeypatch.setattr(
        bench_train, "micro_batches", lambda s, packed, v: ([], 3000 if packed else 1000)
    )
    monkeypatch.setattr(bench_train, "measure", measure)
    monkeypatch.setattr(bench_train, "fp32_out_addmm", lambda dev: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    return seen


def test_train_rows_arithmetic_on_a_pretend_gpu(fake_gpu_train):
    rows = bench_train.rows_for(CPU_SHAPE, {"matmul_tflops": 0.1}, "cuda", warmup=2, steps=5)
    assert [(r.op, r.impl, r.dtype, r.error) for r in rows] == [
        ("train_step", "ours", "bf16", None),
        ("train_step", "ours[no wgrad fusion]", "bf16", None),
        ("train_step_padded", "ours", "bf16", None),
        ("train_step", "ours[no recompute]", "bf16", None),
        ("train_step", "ours[full recompute]", "bf16", None),
    ]
    assert rows[0].shape == "h64 x2 layers, 2 x 1x256 packed"
    assert rows[2].shape == "h64 x2 layers, 2 x 1x256 padded rows"
    # one trainer; each case sets its recomputation and weight-gradient fusion
    (tr,) = fake_gpu_train["trainer"]
    assert tr.calls == [("rc", "selective"), ("fuse", True), ("rc", "selective"), ("fuse", False),
                        ("rc", "selective"), ("fuse", True), ("rc", "none"), ("fuse", True),
                        ("rc", "full"), ("fuse", True)]  # fmt: skip
    # the first case warms up (compiles); the later ones take one step
    assert fake_gpu_train["warmup"] == [2, 1, 1, 1, 1]
    flops = 6 * MATMUL_PARAMS * 512 + 12 * 2 * 64 * 10_000  # 6 N tokens + causal pairs
    for k, r in enumerate(rows):
        s = k + 1
        # median, and the inclusive 20th and 80th percentiles of 10, 20, 30, 40, 100 (x s):
        # 10 + 0.8 x 10 and 40 + 0.2 x 60
        assert (r.ms, r.ms_p20, r.ms_p80) == pytest.approx((30 * s, 18 * s, 52 * s))
        assert r.flops == flops
        assert r.tflops == pytest.approx(flops / (30e-3 * s) / 1e12)
        notes = r.note.split("; ")
        assert notes[0] == f"{512 / (30e-3 * s):.0f} tokens/s"
        useful = 3000 if k != 2 else 1000
        assert notes[1] == f"{useful / (30e-3 * s):.0f} sample tokens/s"
        mfu = flops / (30e-3 * s) / 1e12 * 100
        assert f"MFU {mfu:.1f}% of 1" in notes
        assert (
            "; peak 12.0 GiB (weights, grads and optimizer 5.0 GiB; train.memory predicted 3.0);"
            in r.note
        )
        assert "phases (ms) fwd_bwd 7.0, optimizer 1.5" in notes
        fused = "weight grads accumulate into fp32 in one cuBLAS call"
        assert (fused in notes) == (k != 1)
        assert "cpu plumbing check, not a measurement" not in notes
    # padded: 1000 sample tokens in 90 ms against the packed "ours" case's 3000 in 30 ms
    assert "packed runs 9.00x the sample tokens/s" in rows[2].note.split("; ")
    assert sum("packed runs" in r.note for r in rows) == 1
    assert rows[0].ratio_vs == pytest.approx(
        {"ours[no wgrad fusion]": 2.0, "ours[no recompute]": 4.0, "ours[full recompute]": 5.0}
    )


def test_a_failed_train_case_is_a_row_and_the_others_run(fake_gpu_train):
    fake_gpu_train["fail"] = 1
    rows = bench_train.rows_for(CPU_SHAPE, {}, "cuda", warmup=2, steps=5)
    assert rows[1].error == "RuntimeError: boom" and rows[1].ms is None
    assert [r.ms is not None for r in rows] == [True, False, True, True, True]


def test_a_case_that_would_end_past_the_deadline_does_not_start(fake_gpu_train, monkeypatch):
    """The next case is predicted to take (1 + steps) x the slowest step of the last one. FAKE
    clock: the first case takes 20 s (compiling), the others 0.6 s; case k's steps are
    CASE_TIMES x k, so its slowest is 0.1 s x k and it predicts 6 x 0.1 s x k for the next."""
    clock = {"now": 0.0, "case_s": [20.0, 0.6, 0.6, 0.6, 0.6]}
    fake_gpu_train["clock"] = clock
    monkeypatch.setattr(
        bench_train,
        "time",
        SimpleNamespace(time=lambda: clock["now"], perf_counter=time.perf_counter),
    )
    monkeypatch.setattr(bench_train, "CASES", bench_train.CASES[:1] + [bench_train.CASES[3]] * 4)
    # the cases start at 0, 20, 20.6 and 21.2 s; the second is predicted to end at 20 + 0.6,
    # the third at 20.6 + 1.2 (its predecessor's steps were 2x), the fourth at 21.2 + 1.8 = 23.0
    # > 22.85: skipped although it would start before the deadline (and 21.2 + 5 x 0.3 = 22.7,
    # counting the timed steps only, would not skip it)
    rows = bench_train.rows_for(CPU_SHAPE, {}, "cuda", warmup=2, steps=5, deadline=22.85)
    assert [r.error for r in rows] == [None, None, None, bench_train.SKIPPED, bench_train.SKIPPED]


def test_micro_batch_sample_tokens_and_roles():
    """`useful` is every sample token the rows hold (ids are >= 1, padding is 0); a third of
    each sample is the prompt. At the CPU shape's rows of 256 the mix's mean scales to 29.6, so
    every sample is the shortest (34): seven a packed row, one a padded row."""
    for packed, per_row in ((True, 7 * 34), (False, 34)):
        mbs, useful = bench_train.micro_batches(CPU_SHAPE, packed, bench_train.VOCAB)
        assert [int((mb["tokens"] != 0).sum()) for mb in mbs] == [per_row, per_row]
        assert useful == 2 * per_row
    ds = bench_train.MixDataset([9, 3], vocab=50)
    tokens, roles = ds.sample(0)
    assert tokens.shape == (9,) and 1 <= tokens.min() and tokens.max() < 50
    from data.chat import Role

    assert roles.tolist() == [int(Role.USER)] * 3 + [int(Role.ASSISTANT)] * 6


def _fake_perf_counter(rows_durations_s):
    """perf_counter for optimizer_rows' loop, which reads it once in the first (untimed) step
    and twice in each timed one: the timed steps of each row last rows_durations_s[row]."""
    ticks = []
    for durations in rows_durations_s:
        ticks.append(0.0)
        for i, d in enumerate(durations, 1):
            ticks += [10.0 * i, 10.0 * i + d]
    it = iter(ticks)
    return lambda: next(it)


def test_optimizer_rows_rates_and_offload(monkeypatch):
    """2^20 parameters; FAKE step times 2, 4 and 12 ms after an untimed first step
    (allocation, page faults): median 4 ms = 4e-3 * 1e9 / 2^20 = 3.81 s per billion
    parameters; the host link moves 6 B a parameter: 6 * 2^20 B / 4 ms = 1.6 GB/s."""
    seen = []
    real_adamw = bench_train.ShardedAdamW

    def adamw(params, cfg, grads):
        seen.append(cfg.cpu_offload)
        return real_adamw(params, cfg, grads)

    monkeypatch.setattr(bench_train, "ShardedAdamW", adamw)
    clock = _fake_perf_counter([[2e-3, 4e-3, 12e-3]] * 2)
    monkeypatch.setattr(bench_train, "time", SimpleNamespace(time=time.time, perf_counter=clock))
    numel = 1 << 20
    got = bench_train.optimizer_rows(numel, "cpu", steps=3)
    assert [(r.impl, r.dtype, r.error) for r in got] == [
        ("ours", "fp32", None),
        ("ours[cpu offload]", "fp32", None),
    ]
    assert seen == [False, True]
    for r in got:
        assert (r.ms, r.ms_p20, r.ms_p80) == pytest.approx((4.0, 2.8, 8.8))
        assert r.note.startswith(f"{4e-3 * 1e9 / numel:.2f} s per billion parameters")
        assert r.note.endswith("; cpu plumbing check, not a measurement")
    assert f"host link {6 * numel / 4e-3 / 1e9:.1f} GB/s" in got[1].note
    assert "host link" not in got[0].note


def test_optimizer_rows_skip_when_the_budget_is_nearly_spent():
    rows = bench_train.optimizer_rows(1 << 12, "cpu", steps=2, deadline=time.time() + 5)
    assert [r.error for r in rows] == [bench_train.SKIPPED] * 2


def test_train_gpu_rows_shapes_and_steps(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        bench_train,
        "rows_for",
        lambda shape, c, d, warmup, steps, deadline: (
            calls.append(
                ("train", shape.layers, shape.seq, shape.micro_batches, shape.hidden, warmup, steps)
            )
            or []
        ),
    )
    monkeypatch.setattr(
        bench_train, "optimizer_rows",
        lambda numel, d, steps, deadline: calls.append(("adamw", numel, steps)) or [],
    )  # fmt: skip
    bench_train.gpu_rows({}, quick=True)
    bench_train.gpu_rows({}, quick=False)
    assert calls == [
        ("train", 8, 4096, 4, None, 2, 4),
        ("adamw", 1 << 27, 5),
        ("train", 16, 4096, 4, None, 2, 10),
        ("adamw", 1 << 27, 5),
    ]


def test_train_main_passes_its_arguments_and_writes_json(monkeypatch, tmp_path):
    from bench import harness

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(harness, "measure_ceilings", lambda: {"matmul_tflops": 1.0})

    def rows_for(shape, ceilings, device, warmup, steps):
        calls.append((shape.layers, shape.micro_batches, ceilings, device, warmup, steps))
        return [Row("train_step", "s", "bf16", "step", "ours", ms=1.0, note="FAKE")]

    monkeypatch.setattr(bench_train, "rows_for", rows_for)
    out = tmp_path / "r.json"
    args = ["--layers", "3", "--micro-batches", "2", "--steps", "7", "--json", str(out)]
    assert bench_train.main(args) == 0
    assert calls == [(3, 2, {"matmul_tflops": 1.0}, "cuda", 2, 7)]
    doc = json.loads(out.read_text())
    assert [r["note"] for r in doc["rows"]] == ["FAKE"]


# -- bench_parallel ---------------------------------------------------------------------------


def test_tp_sp_bytes_of_the_seed_layout():
    """The module docstring's numbers: S = 8192 tokens x 8192 x 2 B = 128 MiB, t = 8; TP moves
    4 all-reduces = 8 x 7/8 x S = 896 MiB, TP + SP 6 all-gathers + 4 reduce-scatters = 10 x 7/8
    x S = 1120 MiB per GPU per layer; 80 layers: 70 and 87.5 GiB per micro-batch."""
    s = 8192 * 8192 * 2
    assert s == 128 * MiB
    sp = bench_parallel.collectives_per_layer(8192, 8192, 8, True)
    tp = bench_parallel.collectives_per_layer(8192, 8192, 8, False)
    for ops, want in ((sp, {"all-gather": 6, "reduce-scatter": 4}), (tp, {"all-reduce": 4})):
        counts = {}
        for c in ops:
            counts[c["op"]] = counts.get(c["op"], 0) + c["count"]
            assert c["tensor_bytes"] == s
        assert counts == want
    assert [c["bytes_per_gpu"] for c in tp] == [2 * 2 * 7 * s // 8] * 2
    assert [c["bytes_per_gpu"] for c in sp] == [2 * 7 * s // 8] * 5
    assert bench_parallel.bytes_per_layer(8192, 8192, 8, False) == 896 * MiB
    assert bench_parallel.bytes_per_layer(8192, 8192, 8, True) == 1120 * MiB
    assert bench_parallel.bytes_per_layer(8192, 8192, 1, True) == 0
    assert bench_parallel.bytes_per_layer(10, 16, 2, True, elem_bytes=4) == 10 * 10 * 16 * 4 // 2
    rows = bench_parallel.byte_rows()
    assert [(r.op, r.shape, r.bytes) for r in rows] == [
        ("tp_comm", "tokens=8192,hidden=8192,tp=8", 896 * MiB),
        ("tp_sp_comm", "tokens=8192,hidden=8192,tp=8", 1120 * MiB),
    ]
    assert rows[0].note.startswith("896 MiB/GPU/layer, 80 layers: 70.0 GiB per micro-batch")
    assert rows[1].note.startswith("1120 MiB/GPU/layer, 80 layers: 87.5 GiB per micro-batch")


def test_link_note_is_the_link_speed_matching_the_layer_time():
    """896 MiB moved in a layer measured at 2.5 ms: 939,524,096 B / 2.5e-3 s = 375.8 GB/s."""
    row = Row("comm", "s", "bf16", "fwd", "model", bytes=896 * MiB, note="bytes")
    bench_parallel.add_link_notes([row], 2.5)
    assert row.note == "bytes; 376 GB/s per GPU equals the measured layer time"


def test_layer_flops_of_a_tp8_rank():
    """70B at TP 8: hidden 8192, 8 query heads + 1 KV head of 128, FFN 3584 local.
    GEMM parameters 8192 x 10 x 128 (wqkv) + 1024 x 8192 (wo) + 3 x 8192 x 3584 (w13, w2);
    attention 2 s^2 x 128 x 8 per document of s = 4096, two documents in 8192 tokens."""
    cfg = bench_parallel.get_preset("llama2-70b")
    params = 8192 * 10 * 128 + 1024 * 8192 + 3 * 8192 * 3584
    assert params == 106_954_752
    gemm = 2 * 8192 * params
    attn = 2 * (2 * 4096 * 4096 * 128 * 8)
    assert bench_parallel.layer_flops(cfg, 8, 8192, 4096) == (gemm + attn, 3 * gemm + 3.5 * attn)


def test_parallel_cpu_rows_flops_errors_and_skips(monkeypatch):
    """The CPU layer: hidden 256, 16 heads of 16 (2 + 1 KV local), FFN 512 (64 local), 128
    tokens as two documents of 64. FAKE timing: 2 ms, the layer run once."""
    params = 256 * 4 * 16 + 32 * 256 + 3 * 256 * 64
    gemm, attn = 2 * 128 * params, 2 * (2 * 64 * 64 * 16 * 2)
    calls = []

    def fake_time(fn, warmup, rep, cuda):
        calls.append(fn)
        fn()
        if len(calls) == 1 and "fail" in calls_mode:
            raise RuntimeError("first pass broke")
        return SimpleNamespace(ms=2.0, p20=1.5, p80=2.5)

    calls_mode = set()
    monkeypatch.setattr(bench_parallel, "time_quantiles", fake_time)
    rows = bench_parallel.gpu_rows({}, True, device="cpu")
    assert [(r.op, r.pass_) for r in rows] == [
        ("tp_comm", "fwd+bwd"),
        ("tp_sp_comm", "fwd+bwd"),
        ("layer70b_tp8", "fwd"),
        ("layer70b_tp8", "fwd+bwd"),
    ]
    fwd, step = rows[2:]
    assert fwd.shape == "tokens=128,hidden=256,heads=2+1kv,ffn=64" and fwd.dtype == "fp32"
    assert (fwd.flops, step.flops) == (gemm + attn, 3 * gemm + 3.5 * attn)
    assert fwd.tflops == pytest.approx((gemm + attn) / 2e-3 / 1e12) and fwd.ms_p80 == 2.5
    assert fwd.error is None and step.error is None
    assert "GB/s" not in rows[0].note  # no link speed from a CPU plumbing check
    calls.clear()
    calls_mode.add("fail")
    rows = bench_parallel.gpu_rows({}, True, device="cpu")
    assert rows[2].error == "RuntimeError: first pass broke" and rows[2].ms is None
    assert rows[3].error is None and rows[3].ms == 2.0
    rows = bench_parallel.gpu_rows({}, True, deadline=time.time() - 1, device="cpu")
    assert [r.error for r in rows[2:]] == ["skipped: section time budget spent"] * 2
    assert rows[2].ms is None and rows[0].bytes == 896 * MiB


def test_parallel_main_writes_the_byte_rows(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "p.json"
    assert bench_parallel.main(["--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [(r["op"], r["bytes"]) for r in doc["rows"]] == [
        ("tp_comm", 896 * MiB),
        ("tp_sp_comm", 1120 * MiB),
    ]
    assert "total 1120 MiB/GPU/layer" in capsys.readouterr().out


# -- bench_pipeline ---------------------------------------------------------------------------


def test_pipeline_config_parsing():
    assert bench_pipeline._parse("2x4,4x8x2") == [(2, 4, 1), (4, 8, 2)]


def test_pp1_overhead_is_per_micro_batch_in_microseconds(monkeypatch):
    """FAKE clock: every read 1 s later, so each timed loop takes 1 s: 1 s / 4 micro-batches
    = 250,000 us a micro-batch, for the executor and the plain loop alike."""
    ticks = iter(range(10**6))
    monkeypatch.setattr(
        bench_pipeline, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks)))
    )
    threads = torch.get_num_threads()
    try:
        got = bench_pipeline._pp1_overhead(m=4)
    finally:
        torch.set_num_threads(threads)
    assert got == {"executor_us": 250_000.0, "plain_loop_us": 250_000.0}


@pytest.mark.slow
def test_pipeline_worker_rows(tmp_path):
    """Two gloo ranks, p=2 and m=4 with v=2 virtual stages: forward 8 ms and backward 16 ms a
    whole stage, so each chunk sleeps half of that. Ideal: busy 4 x 24 = 96 ms a rank, bubble
    (1/2) / (4 + 1/2) = 1/9, step 96 / (8/9) = 108 ms. The rows' busy time ((1 - idle) x step)
    is the sleeping, whatever the machine's load adds around it."""
    import torch.multiprocessing as mp

    from parallel.pipeline_schedule import schedule

    out = tmp_path / "rows.json"
    args = {"tokens": 4, "hidden": 8, "fwd_ms": 8.0, "bwd_ms": 16.0, "repeats": 2}
    mp.spawn(
        bench_pipeline._worker,
        args=(2, str(tmp_path / "store"), [(2, 4, 2)], args, str(out)),
        nprocs=2,
    )
    (row,) = json.loads(out.read_text())
    assert (row["p"], row["m"], row["v"]) == (2, 4, 2)
    assert row["ideal_bubble"] == pytest.approx(1 / 9)
    assert row["ideal_step_ms"] == pytest.approx(108.0)
    assert row["actions_per_rank"] == len(schedule(2, 0, 4, 2))
    assert len(row["steps_ms"]) == 2 and row["step_ms"] in row["steps_ms"]
    assert len(row["measured_bubble_per_rank"]) == 2
    for idle in row["measured_bubble_per_rank"]:
        busy_ms = (1 - idle) * row["step_ms"]
        # up to 1.7x: 16 sleeps a rank may each overshoot on a loaded machine; a chunk time
        # not divided by v would double it
        assert 96.0 * 0.98 <= busy_ms <= 96.0 * 1.7, row
    assert row["message_latency_ms"] > 0


# -- bench_pretokenize ------------------------------------------------------------------------


def test_pretokenize_mix_counts_and_config(tmp_path):
    """7 samples: int(7 x share) = 3, 2, 0, 1 by the shares; megacode2 takes the one left."""
    import pyarrow.parquet as pq
    import yaml

    config, texts = bench_pretokenize.make_mix(tmp_path, 7)
    assert len(texts) == 7
    assert pq.read_metadata(tmp_path / "megacode2.parquet").num_rows == 4
    lines = {n: len((tmp_path / f).read_text().splitlines()) for n, f in
             (("orca", "orca.jsonl"), ("leet", "leet.jsonl"), ("dolly", "en.jsonl"))}  # fmt: skip
    assert lines == {"orca": 2, "leet": 0, "dolly": 1}
    cfg = yaml.safe_load(config.read_text())["bench"]
    got = {k: v for d in cfg["datasets"] for k, v in d.items()}
    assert {k: (v["val_split"], v.get("filter_words", True)) for k, v in got.items()} == {
        "megacode2": (0.01, False),
        "orca-chat": (0.01, True),
        "oa_leet10k": (0.05, False),
        "dolly15k_multilingual": (0.05, False),
    }


def test_pretokenize_row_keeps_the_best_run():
    runs = [
        {"seconds": 4.0, "tokens": 100},
        {"seconds": 2.0, "tokens": 90},
        {"seconds": 3.0, "tokens": 80},
    ]
    assert bench_pretokenize._row("w", runs, 7, 2, 10.0) == {
        "what": "w",
        "samples": 7,
        "workers": 2,
        "seconds": 2.0,
        "all_seconds": [4.0, 2.0, 3.0],
        "tokens": 90,
        "tokens_per_s": 45.0,
        "text_mb_per_s": 5.0,
    }


def test_pretokenize_main_ratios_rss_sweep_and_json(monkeypatch, tmp_path):
    """FAKE runs: bare whole text 2 s then 1 s (1000 tokens), turn contents 3 s then 4 s (800),
    ours 2.5 s then 2 s (700 tokens, 7 samples); the RSS sweep's other size (3) 0.5 s for 300.
    ours/this: whole 1 / 2 = 0.5, contents 3 / 2 = 1.5; tokens/s ours 350 against 1000 and
    800 / 3."""
    seen = {"bare": []}
    bare_s = iter([(2.0, 1000), (3.0, 800), (1.0, 1000), (4.0, 800)])
    ours_s = iter([2.5, 2.0])

    def bare(texts, workers, model):
        seen["bare"].append(list(texts))
        s, n = next(bare_s)
        return {"seconds": s, "tokens": n}

    def ours(config, workers, model):
        if "rss3" in str(config):
            return {
                "seconds": 0.5,
                "tokens": 300,
                "samples": 3,
                "main_rss_mb": 1.0,
                "worker_rss_mb": 2.0,
            }
        return {"seconds": next(ours_s), "tokens": 700, "samples": seen.get("kept", 7),
                "main_rss_mb": 3.0, "worker_rss_mb": 4.0}  # fmt: skip

    monkeypatch.setattr(bench_pretokenize, "bare", bare)
    monkeypatch.setattr(bench_pretokenize, "ours", ours)
    monkeypatch.setattr(bench_pretokenize, "RESULTS", tmp_path / "results")
    argv = ["bench_pretokenize", "--samples", "7", "--workers", "1", "--repeats", "2",
            "--sizes", "3", "--work-dir", str(tmp_path / "work")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    bench_pretokenize.main()
    (out,) = (tmp_path / "results").glob("pretokenize-*.json")
    doc = json.loads(out.read_text())
    whole, contents, mine = doc["throughput"]
    assert (whole["seconds"], contents["seconds"], mine["seconds"]) == (1.0, 3.0, 2.0)
    assert whole["ours_time_ratio"] == pytest.approx(0.5)
    assert contents["ours_time_ratio"] == pytest.approx(1.5)
    assert whole["ours_tokens_per_s_ratio"] == pytest.approx(350 / 1000)
    assert contents["ours_tokens_per_s_ratio"] == pytest.approx(350 / (800 / 3))
    assert "ours_time_ratio" not in mine
    assert [(r["samples"], r["seconds"], r["tokens_per_s"]) for r in doc["rss"]] == [
        (3, 0.5, 600.0),
        (7, 2.0, 350.0),
    ]
    # what bare SentencePiece encoded: the whole ChatML texts, then the turn contents alone
    texts, turns = seen["bare"][0], seen["bare"][1]
    assert doc["meta"]["text_mb"] == sum(len(t.encode()) for t in texts) / 1e6
    assert len(turns) == sum(t.count("<|im_start|>") for t in texts)
    assert not any("<|im_start|>" in t or "<|im_end|>" in t for t in turns)
    # the pretokenizer must keep every sample
    seen["kept"] = 6
    seen["bare"].clear()
    bare_s = iter([(2.0, 1000), (3.0, 800)])
    ours_s = iter([2.0])
    monkeypatch.setattr(sys, "argv", argv[:6] + ["1"] + argv[7:])
    with pytest.raises(RuntimeError, match="kept 6 of 7 samples"):
        bench_pretokenize.main()


def test_pretokenize_ours_counts_train_and_val(tmp_path):
    """`ours` runs the real pretokenizer in a fresh process: every sample, train and val."""
    from data.tokenizer import DEFAULT_TOKENIZER_PATH

    config, texts = bench_pretokenize.make_mix(tmp_path / "mix", 60)
    got = bench_pretokenize.ours(config, 1, str(DEFAULT_TOKENIZER_PATH))
    assert got["rc"] == 0 and got["samples"] == 60 and got["tokens"] > 0


def test_bare_counts_every_chunks_tokens():
    import sentencepiece as spm

    from data.tokenizer import DEFAULT_TOKENIZER_PATH

    texts = ["hello world", "a b c", "the quick brown fox", "x"]
    sp = spm.SentencePieceProcessor(model_file=str(DEFAULT_TOKENIZER_PATH))
    want = sum(len(sp.Encode(t)) for t in texts)
    got = bench_pretokenize.bare(texts, 1, str(DEFAULT_TOKENIZER_PATH), chunk=2)
    assert got["tokens"] == want


# -- bench_attention --------------------------------------------------------------------------


def test_mix_lengths_hold_the_seeds_mean_and_bounds():
    lens = bench_attention.mix_lengths()
    assert len(lens) == 35 and min(lens) == 34 and max(lens) <= 4096
    assert sum(lens) / 35 == pytest.approx(473.5, abs=0.1)
    assert bench_attention.mix_lengths() == lens  # deterministic


class _Timed:
    """Stands in for _Bench: records the rows with FAKE times (ms by impl), returns a result."""

    def __init__(self, ms, result=None):
        self.device, self.rows, self.ms, self.result = "cpu", [], ms, result

    def measure(self, row, fn, pass_, refs, inputs, dout=None):
        row.ms = self.ms[row.impl]
        row.fill_rates({})
        self.rows.append(row)
        return self.result


def test_attention_mix_rows_goal_and_tokens_note():
    b = _Timed({"ours": 0.004, "ours_padded": 0.008})
    bench_attention.mix_rows(b)
    tokens = sum(bench_attention.mix_lengths(docs=4, seq=256, mean=100))
    assert tokens == 400
    padded, packed = b.rows
    assert (padded.impl, packed.impl) == ("ours_padded", "ours")
    assert packed.goals == {"sdpa_flash_padded": 1.0} and padded.goals == {}
    # 400 tokens in 4 us = 100 M tokens/s; in 8 us 50 M
    assert packed.note.endswith("; 100.00 M useful tokens/s")
    assert padded.note.endswith("; 50.00 M useful tokens/s")


def test_attention_speed_rows_time_the_kernels_after_the_backward(monkeypatch):
    calls = []

    def kernel_rows(b, q, k, v, shape, dt, fwd_flops):
        calls.append(([r.pass_ for r in b.rows], shape, dt, fwd_flops))

    monkeypatch.setattr(bench_attention, "kernel_rows", kernel_rows)
    b = _Timed({"ours": 1.0}, result=["the gradients"])
    bench_attention.speed_rows(b, quick=True)
    fwd = 2 * 4 * 4 * 128 * 128**2 / 2  # B2 S128 H4 D128, causal
    # on CPU the kernel rows exist only under the interpreter, and say so
    assert calls == [(["fwd", "bwd"], "B2 S128 H4/2 D128", "bf16 (interpreter)", fwd)]
    assert [r.dtype for r in b.rows] == ["bf16 (cpu ref)"] * 2


def test_attention_gpu_rows_compare_padded_with_packed(monkeypatch):
    def measure(self, row, fn, pass_, refs, inputs, dout=None):
        row.ms = {"ours": 2.0, "ours_padded": 4.0}[row.impl]
        self.rows.append(row)
        return None

    monkeypatch.setattr(bench_attention._Bench, "measure", measure)
    rows = bench_attention.gpu_rows({}, True, device="cpu")
    (mix,) = [r for r in rows if r.op == "attn_mix" and r.impl == "ours"]
    assert mix.ratio_vs == {"ours_padded": 2.0}


def test_attention_bench_measure_skips_fails_checks_and_times(monkeypatch):
    b = bench_attention._Bench({}, "cpu", True, deadline=time.time() - 1)
    row = Row("attn", "s", "bf16", "fwd", "ours")
    assert b.measure(row, lambda x: x, "fwd", None, [torch.ones(2)]) is None
    assert b.rows == [row] and row.error == bench_attention.SKIPPED

    b = bench_attention._Bench({}, "cpu", True, deadline=None)

    def broken(x):
        raise ValueError("bad input\nsecond line")

    row = Row("attn", "s", "bf16", "fwd", "ours")
    assert b.measure(row, broken, "fwd", None, [torch.ones(2)]) is None
    assert b.rows == [row] and row.error == "ValueError: bad input"

    x = torch.ones(4)
    row = Row("attn", "s", "bf16", "fwd", "sdpa_flash")
    b.measure(row, lambda x: 2 * x, "fwd", [3 * x], [x])
    assert row.error.startswith("result differs from the first impl")

    # bwd times the backward alone: the forward runs once, not once a timed call
    n = {"fwd": 0}

    def fwd(x):
        n["fwd"] += 1
        return x * x

    row = Row("attn", "s", "bf16", "bwd", "ours")
    (grad,) = b.measure(row, fwd, "bwd", None, [torch.full((4,), 3.0)], dout=torch.ones(4))
    assert n["fwd"] == 1 and row.error is None and row.ms is not None
    torch.testing.assert_close(grad, torch.full((4,), 6.0))

    # a slow first call (compiling, autotuning) is noted: FAKE clock, every read 3 s later
    ticks = iter(range(0, 300, 3))
    monkeypatch.setattr(
        bench_attention,
        "time",
        SimpleNamespace(time=time.time, perf_counter=lambda: float(next(ticks))),
    )
    row = Row("attn", "s", "bf16", "fwd", "ours")
    b.measure(row, lambda x: x, "fwd", None, [x])
    assert row.note == "first call 3.0 s (compile/autotune)"


@pytest.mark.slow
def test_attention_mix_rows_packed_result_matches_padded():
    """The packed documents' gradients are checked against the padded rows' (the documents'
    part of them): a wrong cut of the padded layout would fail the packed row."""
    b = bench_attention._Bench({}, "cpu", True, deadline=None)
    bench_attention.mix_rows(b)
    assert [(r.impl, r.error) for r in b.rows] == [("ours_padded", None), ("ours", None)]
    assert b.rows[1].rel_err is not None and b.rows[1].rel_err < 1e-2


def test_attention_main_writes_where_asked(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("OUT", raising=False)
    rows = [Row("attn", "s", "bf16", "fwd", "ours", ms=1.0, note="FAKE")]
    monkeypatch.setattr(bench_attention, "gpu_rows", lambda c, quick, device: rows)
    out = tmp_path / "a.json"
    monkeypatch.setattr(sys, "argv", ["bench_attention", "--json", str(out)])
    bench_attention.main()
    doc = json.loads(out.read_text())
    assert doc["meta"]["card"] == "cpu" and [r["note"] for r in doc["rows"]] == ["FAKE"]


def test_train_rows_on_cpu_are_a_plumbing_check(fake_gpu_train, monkeypatch):
    """device="cpu": fp32 rows, no MFU (no datasheet peak), the predicted peak instead of a
    measured one, no cuBLAS weight-gradient note, and the plumbing disclaimer on every row."""
    real = bench_train.measure

    def measure(tr, batch, device, warmup, steps):
        return {**real(tr, batch, device, warmup, steps), "states": None, "peak": None}

    monkeypatch.setattr(bench_train, "measure", measure)
    rows = bench_train.rows_for(CPU_SHAPE, {}, "cpu", warmup=2, steps=5)
    for r in rows:
        notes = r.note.split("; ")
        assert r.dtype == "fp32" and r.error is None
        assert notes[-1] == "cpu plumbing check, not a measurement"
        assert "train.memory predicts a peak of 3.00 GiB" in notes
        assert not any(n.startswith(("MFU", "peak ", "weight grads")) for n in notes), notes


def test_pretokenize_ours_refuses_a_failed_run(monkeypatch, tmp_path):
    """A pretokenizer that exits 0 but returns a non-zero code from main() (or exits non-zero)
    is an error, not a row. FAKE child processes."""
    done = {"rc": 1, "seconds": 1.0, "tokens": 0, "samples": 0}
    for returncode, stdout in ((0, json.dumps(done)), (1, "")):
        proc = SimpleNamespace(returncode=returncode, stdout=stdout, stderr="the child's stderr")
        monkeypatch.setattr(bench_pretokenize.subprocess, "run", lambda *a, proc=proc, **k: proc)
        with pytest.raises(RuntimeError, match="the child's stderr"):
            bench_pretokenize.ours(tmp_path / "bench.yaml", 1, "tok.model")
