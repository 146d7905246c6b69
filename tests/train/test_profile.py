"""Per-phase step times (--log_timers_to_tensorboard) and the torch.profiler window (--profile)."""

import json
import time

import pytest
import torch

from tests.train.helpers import SyntheticLoader, tiny_run
from train.args import ArgsError
from train.loop import Trainer
from train.profile import PhaseClock
from train.run import run_training


def test_phase_clock_on_cpu():
    clock = PhaseClock(torch.device("cpu"))
    time.sleep(0.01)
    clock.mark("a")
    clock.mark("b")
    time.sleep(0.005)
    clock.mark("a")  # a phase marked twice: its times add up
    ms = clock.ms()
    assert list(ms) == ["a", "b"]
    assert ms["a"] >= 14.0 and 0.0 <= ms["b"] < ms["a"]


def _train(tmp_path, extra):
    rc, dims, tok = tiny_run(extra, tmp_path=tmp_path)
    trainer = Trainer(rc, dims, tok)
    history = run_training(rc, dims, trainer, SyntheticLoader(2, 64, 2), {}, None)
    return rc, [r for r in history if r["type"] == "train"]


def test_timers_split_the_step_into_phases(tmp_path):
    _, rows = _train(tmp_path, ["--train_iters", "4", "--log_interval", "2",
                                "--log_timers_to_tensorboard"])  # fmt: skip
    assert len(rows) == 2
    for r in rows:
        phases = [r[f"timers/{k}_ms"] for k in ("fwd_bwd", "grad_sync", "optimizer")]
        assert all(v >= 0.0 for v in phases) and r["timers/fwd_bwd_ms"] > 0.0
        # the phases are the step minus moving the batch and counting its tokens
        assert sum(phases) <= r["timers/step_ms"] * 1.01 + 0.5


def test_no_timers_unless_asked(tmp_path):
    _, rows = _train(tmp_path, ["--train_iters", "2", "--log_interval", "1"])
    assert not any(k.startswith("timers/") for r in rows for k in r)


def test_profile_window_writes_a_trace_and_a_table(tmp_path):
    rc, _ = _train(tmp_path, ["--train_iters", "5", "--profile", "--profile_step_start", "2",
                              "--profile_step_end", "4"])  # fmt: skip
    out = tmp_path / "ckpt" / "profile"
    assert sorted(p.name for p in out.iterdir()) == ["rank0-iter2-4-top.txt", "rank0-iter2-4.json"]
    trace = json.loads((out / "rank0-iter2-4.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any("linear" in n or "addmm" in n or "mm" in n for n in names)
    assert "Self CPU" in (out / "rank0-iter2-4-top.txt").read_text()


def test_profile_window_cut_short_by_the_end_of_training(tmp_path):
    _train(tmp_path, ["--train_iters", "3", "--profile", "--profile_step_start", "2",
                      "--profile_step_end", "9"])  # fmt: skip
    assert (tmp_path / "ckpt" / "profile" / "rank0-iter2-4.json").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--profile_step_start", "5", "--profile_step_end", "5"], "want 1 <= start < end"),
        (["--profile_step_start", "30", "--profile_step_end", "32"], "past --train_iters 20"),
    ],
)
def test_profile_flags_are_checked(tmp_path, extra, message):
    with pytest.raises(ArgsError, match=message):
        tiny_run(["--profile", *extra], tmp_path=tmp_path)


def test_profile_needs_somewhere_to_write():
    with pytest.raises(ArgsError, match="give --run_dir or --save"):
        tiny_run(["--profile"])
