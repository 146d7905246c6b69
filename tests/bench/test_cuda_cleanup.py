"""Failure paths of the GPU run that a CPU can stage: a poisoned CUDA context and a reused
--log-dir.

A sticky CUDA error (an illegal address in a kernel) makes every later CUDA call fail,
torch.cuda.empty_cache included. Every family releases the allocator's cache in the `finally` of
each measurement; here that call fails as it would there (FAKE: no GPU, no measurement), and the
section must still return its rows, the failed one with its error. And bench.gpu_check must not
report an earlier run's rows or test counts, left in a reused --log-dir, as this run's.
"""

import json

import pytest
import torch

from bench import bench_attention, bench_kernels, bench_train, gpu_check, harness
from bench.harness import OURS, Row
from tests.bench.test_bench_scripts_mutations import CPU_SHAPE, fake_gpu_train  # noqa: F401

POISONED = "CUDA error: an illegal memory access was encountered"
# What a sticky CUDA error raises: torch.AcceleratorError from torch 2.8 (a RuntimeError), a plain
# RuntimeError before (the project's floor is torch 2.4)
CUDA_ERROR = getattr(torch, "AcceleratorError", RuntimeError)


@pytest.fixture
def poisoned(monkeypatch) -> list:
    """torch.cuda.empty_cache as it behaves after a sticky error; returns its calls."""
    calls = []

    def empty_cache():
        calls.append(1)
        raise CUDA_ERROR(POISONED)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    return calls


def _crash(*args):
    raise CUDA_ERROR(POISONED)


def test_release_cached_memory_survives_a_poisoned_context(poisoned):
    harness.release_cached_memory()
    assert poisoned == [1]


def test_kernel_measurement_keeps_its_error_row(poisoned):
    case = bench_kernels.Case(
        "rmsnorm", "4x8", "fwd", lambda: [torch.ones(4, 8)], {OURS: _crash}, (0,), 64
    )
    timing = dict(warmup=1, rep=5, cuda=False)
    row, result = bench_kernels._measure(case, OURS, _crash, None, {}, timing, None)
    assert result is None and row.error == f"{CUDA_ERROR.__name__}: {POISONED}"
    assert poisoned == [1]


def test_adamw_rows_survive_the_cleanup(poisoned):
    rows = bench_kernels.adamw_rows({}, 1 << 10, "cpu", variants=False)
    assert [(r.impl, r.error) for r in rows] == [(OURS, None), (OURS, None)]
    assert all(r.ms is not None for r in rows) and len(poisoned) == 2


def test_attention_measurement_keeps_its_error_row(poisoned):
    b = bench_attention._Bench({}, "cpu", True, None)
    row = Row("attn", "B1", "bf16", "fwd", OURS)
    assert b.measure(row, _crash, "fwd", None, []) is None
    assert b.rows == [row] and row.error == f"{CUDA_ERROR.__name__}: {POISONED}"
    assert poisoned == [1]


def test_train_cases_survive_the_cleanup(fake_gpu_train, poisoned):  # noqa: F811
    fake_gpu_train["fail"] = 1  # the second case fails; the cleanup after each one fails too
    rows = bench_train.rows_for(CPU_SHAPE, {}, "cuda", warmup=2, steps=5)
    assert [r.error for r in rows] == [None, "RuntimeError: boom", None, None, None]
    assert len(poisoned) == 5


def test_optimizer_rows_survive_the_cleanup(poisoned):
    rows = bench_train.optimizer_rows(1 << 12, "cpu", steps=2)
    assert [(r.impl, r.error) for r in rows] == [("ours", None), ("ours[cpu offload]", None)]
    assert len(poisoned) == 2


def test_a_dead_section_child_is_not_given_the_last_runs_rows(tmp_path, monkeypatch):
    stale = Row("kernels", "old", "bf16", "fwd", OURS, ms=1.0)
    (tmp_path / "kernels-rows.json").write_text(json.dumps([stale.to_dict()]))

    def killed(cmd, timeout_s, log, env=None):  # FAKE child: SIGKILLed before writing its rows
        return {"returncode": -9, "timed_out": True, "seconds": 1.0, "tail": ""}

    monkeypatch.setattr(gpu_check, "_run", killed)
    rec = gpu_check.run_section("kernels", "bench.bench_kernels", 30, {}, True, tmp_path, "cpu")
    assert rec["rows"] == [] and not rec["ok"]


def test_a_dead_test_shard_is_not_given_the_last_runs_counts(tmp_path, monkeypatch):
    (tmp_path / "tests-junit.xml").write_text(
        '<testsuites><testsuite tests="3" failures="0" errors="0" skipped="0">'
        '<testcase classname="t" name="a"/></testsuite></testsuites>'
    )

    def killed(cmd, timeout_s, log, env=None):  # FAKE pytest: killed before its report
        return {"returncode": -9, "timed_out": True, "seconds": 1.0, "tail": ""}

    monkeypatch.setattr(gpu_check, "_run", killed)
    rec = gpu_check.run_tests(30, tmp_path, "tests", shards=1)
    assert rec["passed"] is None and rec["failed"] is None and not rec["ok"]


def test_a_child_that_outlives_sigkill_is_left_behind(tmp_path, monkeypatch, capsys):
    """A child stuck in the driver (uninterruptible) survives SIGKILL: after KILLED_WAIT_S the
    run leaves it and goes on to the next section, with the section marked timed out (FAKE
    process: nothing is started)."""
    signals, waits = [], []

    class Stuck:
        pid = 12345

        def __init__(self, *args, **kwargs):
            pass

        def wait(self, timeout=None):
            waits.append(timeout)
            raise gpu_check.subprocess.TimeoutExpired("child", timeout)

    monkeypatch.setattr(gpu_check.subprocess, "Popen", Stuck)
    monkeypatch.setattr(gpu_check.os, "killpg", lambda pid, sig: signals.append((pid, sig)))
    rec = gpu_check._run(["python3", "-c", "pass"], 30.0, tmp_path / "stuck.log")
    sig = gpu_check.signal
    assert signals == [(12345, sig.SIGINT), (12345, sig.SIGKILL)]
    assert waits == [30.0 - gpu_check.INTERRUPT_S, gpu_check.INTERRUPT_S, gpu_check.KILLED_WAIT_S]
    assert rec["timed_out"] and rec["returncode"] == -sig.SIGKILL and rec["left_running"]
    assert "stuck.log outlived SIGKILL" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke mode")
def test_a_section_left_running_is_named_in_the_results(tmp_path, monkeypatch):
    """The record and the section's error row say the child outlived SIGKILL: the sections
    after it may fail for the memory it still holds (FAKE section record: nothing runs)."""

    def stuck(name, *args):
        return dict(returncode=-9, timed_out=True, left_running=True, ok=False, seconds=4, tail="x")

    monkeypatch.setattr(gpu_check, "SECTIONS", [("kernels", "bench.bench_kernels", 60)])
    monkeypatch.setattr(gpu_check, "run_section", lambda *a: {**stuck(*a), "rows": []})
    monkeypatch.delenv("OUT", raising=False)
    args = ["--cpu-smoke", "--out-dir", str(tmp_path / "res"), "--log-dir", str(tmp_path / "l")]
    assert gpu_check.main(args) == 1
    [json_path] = (tmp_path / "res").glob("*-cpu-smoke.json")
    rows, doc = harness.read_json(json_path)
    assert doc["sections"]["kernels"]["left_running"] is True
    [row] = [r for r in rows if r.op == "kernels"]
    assert "timed out (still running after SIGKILL" in row.error


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke mode")
def test_a_log_dir_holding_files_is_refused_and_kept(tmp_path, monkeypatch, capsys):
    """An earlier run's files in --log-dir would travel in this run's log archive: the run is
    refused before measuring anything, and the files stay as they were."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "train-rows.json").write_text("[]")
    monkeypatch.setattr(gpu_check, "SECTIONS", [])  # were the refusal gone, nothing long runs
    rc = gpu_check.main(["--cpu-smoke", "--out-dir", str(tmp_path / "r"), "--log-dir", str(logs)])
    err = capsys.readouterr().err
    assert rc == 2 and f"--log-dir {logs} already holds files" in err
    assert [p.name for p in logs.iterdir()] == ["train-rows.json"]
    assert not (tmp_path / "r").exists()  # refused before anything is written
    rc = gpu_check.main(["--cpu-smoke", "--log-dir", str(logs / "train-rows.json")])
    assert rc == 2 and "or is a file" in capsys.readouterr().err
