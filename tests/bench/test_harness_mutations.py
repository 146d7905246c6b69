"""bench.harness arithmetic pinned where a mutation pass found it unguarded: rates, % of
ceiling, relative error, goal verdicts, ratios, the CPU and graph timers' quantiles, the
measured ceilings' unit factors, and the tables/JSON around them.

Every time and rate below is FAKE (a scripted clock or a made-up number chosen so the expected
value is worked out by hand); nothing here is a measurement.
"""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from bench import harness
from bench.harness import Row, Timing, add_ratios, format_summary, read_json, write_json


def _row(impl="ours", **kw) -> Row:
    return Row("op", "s", "bf16", "fwd", impl, **kw)


def test_pct_of_ceiling_of_a_row_with_bytes_and_flops_is_against_copy():
    """A row that counts both bytes and FLOPs is memory-bound by convention: its % of ceiling
    is GB/s over copy, not TFLOP/s over matmul (the two would report different verdicts)."""
    r = _row(ms=2.0, bytes=4 * 10**9, flops=10**12).fill_rates(
        {"copy_gbps": 4000.0, "matmul_tflops": 4000.0}
    )
    assert r.gbps == pytest.approx(2000.0) and r.tflops == pytest.approx(500.0)
    assert r.pct_of_ceiling == pytest.approx(50.0)  # 2000 / 4000, not 500 / 4000


@pytest.mark.parametrize("ms", [0.0, -1.0])
def test_no_rates_from_a_zero_or_negative_time(ms):
    """A time of zero or below is not a measurement: no rate (and no division by zero), so
    no row can claim an infinite or negative bandwidth."""
    r = _row(ms=ms, bytes=10**9, flops=10**12).fill_rates({"copy_gbps": 1.0, "matmul_tflops": 1.0})
    assert r.gbps is None and r.tflops is None and r.pct_of_ceiling is None


def test_check_result_limit_is_inclusive_and_nan_is_refused():
    """rel_err == limit passes (the documented `<=`); a NaN result is an error, never a pass:
    a kernel that writes NaNs must not be timed and reported as correct."""
    ref = [torch.ones(4)]
    at_limit = _row()
    assert at_limit.check_result([torch.full((4,), 2.0)], ref, 1.0, "ref")  # rel err exactly 1
    assert at_limit.rel_err == 1.0 and at_limit.error is None
    nan = _row()
    assert not nan.check_result([torch.full((4,), math.nan)], ref, 1e-2, "ref")
    assert "differs from ref" in nan.error


def test_rel_err_is_relative_to_the_reference_and_the_worst_pair():
    """||out - ref|| / ||ref|| (not / ||out||), the maximum over output pairs (a good second
    output must not hide a wrong first one)."""
    ref = [torch.ones(4), torch.ones(4)]
    assert harness.rel_err([torch.full((4,), 2.0), torch.ones(4)], ref) == pytest.approx(1.0)
    assert harness.rel_err([torch.full((4,), 3.0), torch.ones(4)], ref) == pytest.approx(2.0)


def test_goal_met_exactly_is_met_and_nan_rate_is_missed():
    """A rate equal to its goal meets it; a NaN rate (a failed rate computation) misses it."""
    assert _row(pct_of_ceiling=90.0, goals={"pct_of_ceiling": 90}).missed_goals() == []
    missed = _row(pct_of_ceiling=math.nan, goals={"pct_of_ceiling": 90}).missed_goals()
    assert missed == ["pct_of_ceiling nan < 90"]


def test_ratios_skip_failed_ours_and_keep_dtypes_apart():
    """add_ratios pairs rows of the same op, shape, dtype and pass only: AdamW's two dtypes at
    one shape must not be compared with each other's baselines; an `ours` row without a time
    gets no ratio (and does not crash the table)."""
    rows = [
        Row("adamw", "n=1", "fp32 grads", "step", "ours", ms=1.0),
        Row("adamw", "n=1", "fp32 grads", "step", "torch_fused", ms=2.0),
        Row("adamw", "n=1", "fp32 grads+bf16 copy", "step", "ours", ms=None, error="x"),
        Row("adamw", "n=1", "fp32 grads+bf16 copy", "step", "torch_fused+copy", ms=3.0),
    ]
    add_ratios(rows)
    assert rows[0].ratio_vs == {"torch_fused": 2.0}
    assert rows[2].ratio_vs == {}


def _clock(monkeypatch, durations_ms):
    """A fake harness clock: each call of the returned fn advances it by the next duration."""
    now = {"t": 0.0}
    it = iter(durations_ms)
    monkeypatch.setattr(harness, "time", SimpleNamespace(perf_counter=lambda: now["t"]))

    def fn():
        now["t"] += next(it) / 1e3

    return fn


def test_cpu_timer_median_and_20th_80th_percentiles(monkeypatch):
    """On a scripted clock (timed calls of 1..10 ms) the CPU timer reports the median 5.5 and
    the inclusive 20th/80th percentiles 2.8 and 8.2, the spread the tables print."""
    fn = _clock(monkeypatch, [0.0] + list(range(1, 11)))  # the untimed first call, then 10
    t = harness.time_quantiles(fn, warmup=0, rep=54.9, cuda=False)
    assert (t.ms, t.p20, t.p80) == pytest.approx((5.5, 2.8, 8.2))


def test_cpu_timer_takes_three_samples_even_with_no_time(monkeypatch):
    """rep=0 still times three calls: quantiles need samples, and one call is no median."""
    fn = _clock(monkeypatch, [0.0, 1.0, 2.0, 3.0])
    assert harness.time_quantiles(fn, warmup=0, rep=0, cuda=False).ms == pytest.approx(2.0)


class _FakeCuda:
    """Just enough of torch.cuda for time_graph: a replay of the captured graph advances a fake
    event clock by `calls` x PER_CALL_MS (FAKE time)."""

    PER_CALL_MS = 0.25

    def __init__(self):
        self.now, self.captured = 0.0, 0
        cuda = self

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self):
                self.t = cuda.now

            def synchronize(self):
                pass

            def elapsed_time(self, other):
                return other.t - self.t

        class Graph:
            def replay(self):
                cuda.now += cuda.captured * cuda.PER_CALL_MS

        self.Event, self.CUDAGraph = Event, Graph

    def current_stream(self):
        return None

    def synchronize(self):
        pass

    def graph(self, g, stream=None):
        cuda = self

        class Capture:
            def __enter__(self):
                cuda.capturing = True

            def __exit__(self, *a):
                cuda.capturing = False

        return Capture()


def test_graph_timer_reports_time_per_call_not_per_replay(monkeypatch):
    """time_graph divides each replay's time by the number of calls captured in it: a graph of
    10 calls at 0.25 ms each (FAKE) is 0.25 ms per call, not 2.5 (a 10x error in every rate)."""
    fake = _FakeCuda()
    monkeypatch.setattr(harness, "torch", SimpleNamespace(cuda=fake))

    def fn():
        if getattr(fake, "capturing", False):
            fake.captured += 1

    t = harness.time_graph(fn, calls=10, rep=5)
    assert fake.captured == 10
    assert (t.ms, t.p20, t.p80) == pytest.approx((0.25, 0.25, 0.25))


def test_measured_ceilings_count_read_plus_write_and_two_flops_per_mac(monkeypatch):
    """copy_gbps = 2 x buffer bytes (read + write) / ms / 1e6 on a copy_mib MiB (2**20) buffer;
    matmul_tflops = 2 n^3 / ms / 1e9. Timer FAKE: every timing is 2 ms."""
    seen = []

    def fake_timer(fn, warmup=25, rep=100, cuda=None):
        out = fn()
        seen.append(out.numel() * out.element_size())
        return Timing(2.0, 2.0, 2.0)

    monkeypatch.setattr(harness, "time_quantiles", fake_timer)
    c = harness.measure_ceilings("cpu", copy_mib=1, matmul_n=8)
    assert seen == [2**20, 8 * 8 * 4]  # the copied buffer is 1 MiB; an 8x8 fp32 product
    assert c["copy_bytes"] == 2 * 2**20
    assert c["copy_gbps"] == pytest.approx(2 * 2**20 / 2.0 / 1e6)
    assert c["matmul_tflops"] == pytest.approx(2 * 8**3 / 2.0 / 1e9)


def test_summary_verdicts_and_rates():
    """The short table: a row without goals has no verdict (not "ok"), a row with both rates
    shows GB/s, and NaN prints as "-"."""
    rows = [
        Row("a", "s", "bf16", "fwd", "ours", ms=1.0, bytes=10**9, flops=10**12),
        Row("b", "s", "bf16", "fwd", "ours", ms=1.0, pct_of_ceiling=math.nan),
    ]
    rows[0].fill_rates({})
    lines = format_summary(rows).splitlines()[2:]
    assert "1000 GB/s" in lines[0] and "TF/s" not in lines[0]
    assert not lines[0].rstrip().endswith("ok") and not lines[1].rstrip().endswith("ok")
    assert harness._fmt(math.nan) == "-"


def test_read_json_ignores_fields_it_does_not_know(tmp_path):
    """A results file from a later version (an extra row field) still reads: old results stay
    comparable."""
    path = write_json([_row(ms=1.0)], {}, tmp_path / "r.json")
    doc = json.loads(path.read_text())
    doc["rows"][0]["added_later"] = 1
    path.write_text(json.dumps(doc))
    (back,), _ = read_json(path)
    assert back.ms == 1.0 and back.impl == "ours"
