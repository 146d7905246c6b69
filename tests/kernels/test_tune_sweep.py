"""bench.tune's sweep logic on tiny shapes in the interpreter, with a fake timer: every candidate
runs and is checked, the fastest clear winner is chosen, noise-level wins keep the heuristic, and
the table it writes is what the kernels then read."""

import json
from types import SimpleNamespace

import pytest

from bench import tune
from bench.harness import OURS, Timing
from kernels import rmsnorm, tuning
from kernels._triton import INTERPRET

pytestmark = pytest.mark.skipif(
    not INTERPRET, reason="runs Triton kernels on CPU: needs TRITON_INTERPRET=1"
)


def _timer(times):
    it = iter(times)

    def timer(fn):
        fn()  # a timer runs the call; the fake one reports a scripted time
        ms = next(it)
        return Timing(ms, ms, ms)

    return timer


def test_sweep_chooses_clear_winner_and_writes_table(tmp_path):
    sw = tune._rmsnorm_sweeps([(6, 96)], "cpu")[1]  # rmsnorm_bwd, hidden 96
    n = len(sw.candidates)
    assert n > 3 and sw.op == "rmsnorm_bwd" and sw.key == rmsnorm.tune_key(96)
    times = [1.0] + [2.0] * (n - 1)
    times[2] = 0.5  # clearly faster than the heuristic
    ops, rows = tune.run_sweeps([sw], {"copy_gbps": 100.0}, timer=_timer(times))
    assert ops == {"rmsnorm_bwd": {"hidden=96": sw.candidates[2]._asdict()}}
    per_candidate = [r for r in rows if r.impl != OURS]
    assert len(per_candidate) == n and all(
        r.error is None and r.rel_err < 1e-2 for r in per_candidate
    )
    (chosen,) = [r for r in rows if r.impl == OURS]
    assert chosen.ms == 0.5 and chosen.ratio_vs["heuristic"] == 2.0

    path = tune.write_table(ops, "NVIDIA Test Card", tmp_path, {"commit": "abc"})
    assert path.name == "nvidia-test-card.json"
    doc = json.loads(path.read_text())
    assert doc["card"] == "NVIDIA Test Card" and doc["commit"] == "abc"
    # merging: a second sweep's entries join the first's
    tune.write_table(
        {"swiglu_fwd": {"ffn=200": {"block": 256, "warps": 2}}}, "NVIDIA Test Card", tmp_path
    )
    ops_read = tuning.load_table(path)
    assert set(ops_read) == {"rmsnorm_bwd", "swiglu_fwd"}
    cfg = tuning.apply(rmsnorm.BwdConfig(1, 1, 1), ops_read["rmsnorm_bwd"]["hidden=96"], str(path))
    assert cfg == sw.candidates[2]


def test_noise_level_win_keeps_heuristic():
    sw = tune._swiglu_sweeps([(4, 200)], "cpu", passes=("fwd",))[0]
    n = len(sw.candidates)
    times = [1.0] + [0.99] * (n - 1)  # 1% faster: inside the margin
    ops, rows = tune.run_sweeps([sw], {}, timer=_timer(times))
    assert ops["swiglu_fwd"]["ffn=200"] == sw.candidates[0]._asdict()
    (chosen,) = [r for r in rows if r.impl == OURS]
    assert "(the heuristic)" in chosen.note


def test_failing_candidate_is_reported_not_chosen():
    sw = tune._swiglu_sweeps([(4, 200)], "cpu", passes=("bwd",))[0]
    real = sw.make

    def make():
        run = real()
        bad = sw.candidates[1]
        return lambda cfg: (
            (_ for _ in ()).throw(RuntimeError("out of resources")) if cfg == bad else run(cfg)
        )

    sw.make = make
    times = [1.0] + [0.1] * (len(sw.candidates) - 2)
    ops, rows = tune.run_sweeps([sw], {}, timer=_timer(times))
    failed = [r for r in rows if r.error]
    assert len(failed) == 1 and "out of resources" in failed[0].error
    assert ops["swiglu_bwd"]["ffn=200"] != sw.candidates[1]._asdict()


def test_cpu_sweeps_cover_every_family():
    ops = {sw.op for sw in tune.sweeps(full=False, device="cpu")}
    assert ops == {"rmsnorm_fwd", "rmsnorm_bwd", "swiglu_fwd", "swiglu_bwd", "rotary",
                   "cross_entropy_stats", "cross_entropy_grad"}  # fmt: skip


def test_schedule_times_every_sweeps_head_first():
    sweeps = [tune.Sweep(f"op{n}", "k", "s", 1, list(range(n)), None) for n in (8, 3, 10)]
    order = tune._schedule(sweeps, first_pass=2)
    assert order[:6] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert order[6:] == [(0, j) for j in range(2, 8)] + [(1, 2)] + [(2, j) for j in range(2, 10)]


def test_a_short_budget_still_tunes_every_sweep(monkeypatch):
    """The budget runs out during the second pass: every sweep has its heuristic and the next
    candidate timed and a table entry; the first sweep's later candidates are not reached."""
    todo = [sw for sw in tune.sweeps(full=False, device="cpu") if sw.op in ("rmsnorm_bwd",
            "swiglu_fwd")]  # fmt: skip
    clock = {"now": 0.0}
    monkeypatch.setattr(tune, "time", SimpleNamespace(time=lambda: clock["now"]))

    def timer(fn):
        fn()
        clock["now"] += 1.0  # each timing takes a second of the budget
        return Timing(1.0, 1.0, 1.0)

    ops, rows = tune.run_sweeps(todo, {}, deadline=4.5, timer=timer, first_pass=2)
    assert set(ops) == {"rmsnorm_bwd", "swiglu_fwd"}
    timed = [r.impl for r in rows if r.impl != OURS and r.shape.startswith("rmsnorm_bwd")]
    assert len(timed) == 3  # two in the first pass, one in the second before the deadline
    chosen = [r for r in rows if r.impl == OURS and r.shape.startswith("rmsnorm_bwd")]
    assert "not reached" in chosen[0].note
