"""Where a step's time goes: per-phase times of every step, and a torch.profiler window.

PhaseClock marks the end of each phase of one step (forward/backward, gradient reduction,
optimizer). On CUDA it records events on the current stream, so marking never waits for the
device; the times are read after the loop's end-of-step synchronize. On CPU it reads the clock.
The loop logs their means as `timers/<phase>_ms` with --log_timers_to_tensorboard.

StepProfiler records iterations [--profile_step_start, --profile_step_end) of the ranks in
--profile_ranks with torch.profiler (CPU and, on a GPU, CUDA activity, with shapes) and writes
`<run_dir>/profile/rank<R>-iter<S>-<E>.json` (a Chrome / Perfetto trace) and `...-top.txt`, the
ops by self device time (CPU time on CPU).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from train.config import LogConfig


class PhaseClock:
    """End marks of named phases of one step, in order; `ms()` after the device is synced."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []
        self.mark("start")

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def mark(self, phase: str) -> None:
        """`phase` ends here (it began at the previous mark)."""
        self.marks.append((phase, self._now()))

    def ms(self) -> dict[str, float]:
        """Milliseconds of each phase. On CUDA: call after the events completed (a synchronize)."""
        out: dict[str, float] = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            dt = a.elapsed_time(b) if self.cuda else 1000.0 * (b - a)
            out[name] = out.get(name, 0.0) + dt
        return out


class StepProfiler:
    """torch.profiler over a window of iterations on the chosen ranks (module docstring)."""

    def __init__(self, log: LogConfig, rank: int, device: torch.device):
        self.window = log.profile if log.profile and rank in log.profile_ranks else None
        self.rank, self.device = rank, device
        self.dir = Path(log.run_dir or ".") / "profile"
        self.prof = None
        self.written: list[Path] = []

    def before_step(self, iteration: int) -> None:
        """Called with the iteration about to run (1-based)."""
        if self.window is None or self.prof is not None or iteration != self.window[0]:
            return
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=acts, record_shapes=True)
        self.prof.__enter__()

    def after_step(self, iteration: int) -> list[Path]:
        """Called with the iteration that just ran; returns the files written (if any)."""
        if self.prof is None or iteration != self.window[1] - 1:
            return []
        return self._write(iteration + 1)

    def finish(self, iteration: int) -> list[Path]:
        """At the end of the loop: write a window the run ended inside (or [])."""
        return self._write(iteration + 1) if self.prof is not None else []

    def _write(self, end: int) -> list[Path]:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        self.dir.mkdir(parents=True, exist_ok=True)
        stem = self.dir / f"rank{self.rank}-iter{self.window[0]}-{end}"
        trace, top = stem.with_suffix(".json"), stem.with_name(stem.name + "-top.txt")
        self.prof.export_chrome_trace(str(trace))
        key = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        top.write_text(self.prof.key_averages().table(sort_by=key, row_limit=30) + "\n")
        self.prof = None
        self.written = [trace, top]
        return self.written
