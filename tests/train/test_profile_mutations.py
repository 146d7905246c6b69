"""StepProfiler (train/profile.py) driven directly, as the loop drives it, pinned where a hand
mutation pass found the end-to-end profile tests (one rank, rank 0) blind: --profile_ranks, the
rank in the file names, the paths handed back for the log, shapes in the trace, the order of the
top table on CPU and CUDA activity on a GPU."""

import json

import torch

from train.config import LogConfig
from train.profile import StepProfiler


def _log(run_dir, window, ranks) -> LogConfig:
    return LogConfig(
        log_interval=1, tensorboard_dir=None, log_timers=False, wandb=False, wandb_project="p",
        wandb_entity=None, wandb_id=None, run_dir=str(run_dir), activation_memory_report=False,
        profile=window, profile_ranks=ranks,
    )  # fmt: skip


def _drive(prof: StepProfiler, iterations: int) -> dict[int, list]:
    """The loop's calls: before_step(i), the step, after_step(i); what each after_step gave."""
    small, big = torch.ones(4), torch.randn(192, 192)
    written = {}
    for i in range(1, iterations + 1):
        prof.before_step(i)
        small.add(1.0)  # a cheap op first: the table's order is not the order ops ran in
        for _ in range(3):
            big = (big @ big).tanh()
        written[i] = prof.after_step(i)
    return written


def test_only_the_chosen_ranks_profile_each_under_its_own_name(tmp_path):
    """--profile_ranks 1 2: rank 0 writes nothing; ranks 1 and 2 write into one shared
    <run_dir>/profile under names that do not collide, and after_step hands back exactly those
    paths (the loop logs them) at the window's last iteration."""
    files = {}
    for rank in (0, 1, 2):
        written = _drive(StepProfiler(_log(tmp_path, (2, 4), (1, 2)), rank, torch.device("cpu")), 5)
        assert all(written[i] == [] for i in (1, 2, 4, 5)), written
        files[rank] = written[3]
    out = tmp_path / "profile"
    assert files[0] == []
    for rank in (1, 2):
        assert files[rank] == [
            out / f"rank{rank}-iter2-4.json",
            out / f"rank{rank}-iter2-4-top.txt",
        ]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in files[1] + files[2])


def test_the_trace_has_shapes_and_the_cpu_table_is_by_self_cpu_time(tmp_path):
    """The trace records input shapes (which matmul was slow); on CPU the top table is sorted by
    self CPU time (there is no device time to sort by)."""
    prof = StepProfiler(_log(tmp_path, (1, 2), (0,)), 0, torch.device("cpu"))
    trace, top = _drive(prof, 1)[1]
    events = json.loads(trace.read_text())["traceEvents"]
    dims = [e["args"]["Input Dims"] for e in events if e.get("name") == "aten::mm"]
    assert dims and dims[0] == [[192, 192], [192, 192]]
    lines = top.read_text().splitlines()
    header = next(x for x in lines if "Self CPU %" in x)
    rows = [x for x in lines[lines.index(header) + 2 :] if "%" in x]
    self_cpu = [float(x.split()[1].rstrip("%")) for x in rows]
    assert len(self_cpu) > 3 and self_cpu == sorted(self_cpu, reverse=True), rows


def test_on_a_gpu_the_profiler_records_cuda_activity(tmp_path, monkeypatch):
    """On a GPU the kernels are where the time goes: CUDA activity is traced besides the CPU's
    (checked on the profiler's arguments: this machine may have no GPU)."""
    made = []

    class Recorder:
        def __init__(self, **kwargs):
            made.append(kwargs)

        def __enter__(self):
            return self

    monkeypatch.setattr(torch.profiler, "profile", Recorder)
    StepProfiler(_log(tmp_path, (3, 5), (0,)), 0, torch.device("cuda", 0)).before_step(3)
    (kwargs,) = made
    assert set(kwargs["activities"]) == {torch.profiler.ProfilerActivity.CPU,
                                         torch.profiler.ProfilerActivity.CUDA}  # fmt: skip
    assert kwargs["record_shapes"]
