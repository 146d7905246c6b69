"""bench.tune's choice and bookkeeping pinned where a mutation pass found it unguarded: the
margin's boundary, refusing wrong (or NaN) results, a heuristic that fails to time, a budget
spent before a sweep starts, the chosen row's spread and rates, the table's merge and types, and
the byte counts each sweep divides by.

Plain CPU with fake kernels and a FAKE timer (scripted times per setting): nothing here is a
measurement.
"""

import json
import math
from typing import NamedTuple

import pytest
import torch

from bench import tune
from bench.harness import OURS, Timing
from kernels import tuning


class _Cfg(NamedTuple):
    block: int
    flat: bool = False


def _sweep(times: dict[int, float], wrong: dict[int, torch.Tensor] | None = None) -> tune.Sweep:
    """A sweep over blocks 1..len(times) whose run returns ones (or `wrong[block]`)."""
    wrong = wrong or {}

    def make():
        return lambda cfg: [wrong.get(cfg.block, torch.ones(4))]

    cands = [_Cfg(b) for b in sorted(times)]
    return tune.Sweep("op", "k=1", "4x4", 8 * 10**9, cands, make)


def _timer(times: dict[int, float], spread: float = 0.0):
    """FAKE timer: each setting's scripted median, p20/p80 at median -/+ spread."""
    calls = []

    def timer(fn):
        cfg = fn.__defaults__[0]  # run_sweeps binds the setting as the lambda's default
        calls.append(cfg.block)
        fn()
        ms = times[cfg.block]
        if ms is None:
            raise RuntimeError("out of resources (fake)")
        return Timing(ms, ms - spread, ms + spread)

    timer.calls = calls
    return timer


def _chosen(rows):
    (row,) = [r for r in rows if r.impl == OURS]
    return row


def test_a_candidate_exactly_margin_faster_replaces_the_heuristic():
    """best * (1 + MARGIN) == heuristic: clearly (enough) faster, so it is chosen."""
    times = {1: 1.0 + tune.MARGIN, 2: 1.0}
    assert times[2] * (1 + tune.MARGIN) == times[1]  # the boundary itself, in floats
    ops, rows = tune.run_sweeps([_sweep(times)], {}, timer=_timer(times))
    assert ops == {"op": {"k=1": {"block": 2, "flat": False}}}
    assert _chosen(rows).ratio_vs["heuristic"] == pytest.approx(1.0 + tune.MARGIN)


@pytest.mark.parametrize("bad", [torch.full((4,), 2.0), torch.full((4,), math.nan)])
def test_a_wrong_or_nan_result_is_never_timed_or_chosen(bad):
    """The fastest setting computes a wrong (or NaN) result: it is reported with an error and
    not timed, and the table keeps a correct setting. The wrong one is the last candidate, so
    the reference must come from the heuristic (the first), not from any other."""
    times = {1: 1.0, 2: 0.9, 3: 0.1}
    timer = _timer(times)
    ops, rows = tune.run_sweeps([_sweep(times, wrong={3: bad})], {}, timer=timer)
    assert ops["op"]["k=1"]["block"] == 2 and 3 not in timer.calls
    (failed,) = [r for r in rows if r.error]
    assert failed.impl == "block=3,flat=0" and "differs from the heuristic" in failed.error


def test_a_heuristic_that_fails_to_time_leaves_no_entry():
    """The heuristic runs but its timing raises: there is no baseline to beat, so the sweep
    writes no entry (another candidate must not win by default) and says why."""
    times = {1: None, 2: 0.5}
    ops, rows = tune.run_sweeps([_sweep(times)], {}, timer=_timer(times))
    assert ops == {}
    assert "the heuristic's settings failed" in _chosen(rows).error


def test_a_budget_spent_before_a_sweep_starts_is_reported():
    """Past the deadline nothing is timed, and every sweep says it was skipped (a silent gap
    would read as tuned)."""
    times = {1: 1.0, 2: 0.5}
    ops, rows = tune.run_sweeps(
        [_sweep(times), _sweep(times)], {}, deadline=0.0, timer=_timer(times)
    )
    assert ops == {} and len(rows) == 2
    assert all(r.impl == OURS and r.error == "skipped: budget spent" for r in rows)


def test_rows_carry_rates_and_the_chosen_settings_spread():
    """Every timed candidate and the chosen row have GB/s and % of copy from the sweep's bytes;
    the chosen row's p20/p80 are its own timing's. 8e9 B (FAKE) in 2 ms = 4000 GB/s."""
    times = {1: 4.0, 2: 2.0}
    ops, rows = tune.run_sweeps(
        [_sweep(times)], {"copy_gbps": 8000.0}, timer=_timer(times, spread=0.5)
    )
    chosen = _chosen(rows)
    assert (chosen.ms, chosen.ms_p20, chosen.ms_p80) == (2.0, 1.5, 2.5)
    assert chosen.bytes == 8 * 10**9
    assert chosen.gbps == pytest.approx(4000.0) and chosen.pct_of_ceiling == pytest.approx(50.0)
    heuristic = next(r for r in rows if r.impl == "block=1,flat=0")
    assert heuristic.gbps == pytest.approx(2000.0) and heuristic.pct_of_ceiling == 25.0


def test_write_table_merges_keys_of_one_op_and_keeps_bools(tmp_path):
    """A sweep of one op at one shape adds its key to that op's existing entries (it must not
    drop the other shapes'), and bool fields stay JSON booleans, which `tuning.apply` needs for
    a bool field."""
    tune.write_table({"op": {"k=1": {"block": 2, "flat": False}}}, "Fake Card", tmp_path)
    times = {1: 1.0, 2: 0.5}
    sw = _sweep(times)
    sw.key = "k=2"
    sw.candidates = [_Cfg(1), _Cfg(2, True)]
    ops, _ = tune.run_sweeps([sw], {}, timer=_timer(times))
    path = tune.write_table(ops, "Fake Card", tmp_path)
    entries = json.loads(path.read_text())["ops"]["op"]
    assert entries == {"k=1": {"block": 2, "flat": False}, "k=2": {"block": 2, "flat": True}}
    assert tuning.apply(_Cfg(1), entries["k=2"], "src") == _Cfg(2, True)


def test_sweeps_divide_by_each_ops_minimum_bytes():
    """The sweeps' GB/s denominators, by hand at the CPU shapes (bf16, 2 bytes):
    rmsnorm 6x96 fwd 2*6*96*2 + 96*2 + 4*6 = 2520, bwd 3*6*96*2 + 2*96*2 + 4*6 = 3864;
    swiglu 4x200 fwd 3*4*200*2 = 4800, bwd 5*4*200*2 = 8000; rotary 5 tokens 4/2 heads of 16:
    2*5*6*16*2 + 8*5 = 1960; cross-entropy 4x384 stats 4*384*2 = 3072, grad twice that."""
    got = {sw.op: sw.nbytes for sw in tune.sweeps(full=False, device="cpu")}
    assert got == {
        "rmsnorm_fwd": 2520,
        "rmsnorm_bwd": 3864,
        "swiglu_fwd": 4800,
        "swiglu_bwd": 8000,
        "rotary": 1960,
        "cross_entropy_stats": 3072,
        "cross_entropy_grad": 6144,
    }
