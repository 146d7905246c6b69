"""When the loop stops early: --exit_interval, --exit_duration_in_mins and, under
--exit_signal_handler, SIGTERM (a cluster's pre-emption or time-limit warning).

Every rank must stop after the same iteration, or the ones still stepping hang in their next
collective: the interval is the same everywhere by construction; the clock and a signal differ
per rank, so after each iteration the ranks agree by an all-reduce of the flags (max: any rank's
reason stops all), as Megatron-LLM does. That costs one 2-element all-reduce per iteration, and
only when one of the two flags is given.
"""

from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

from train.config import LoopConfig


class StopCheck:
    """Context manager over the training loop: installs the SIGTERM handler (when asked) on
    entry and puts the previous one back on exit. `reason(iteration)` says why to stop after
    that iteration, or None."""

    def __init__(self, loop: LoopConfig, started: float, device: torch.device):
        self.loop = loop
        self.started = started  # time.time() at the run's start (set-up included, as Megatron)
        self.device = device
        self.received = False
        self._previous = None

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002 (signal handler signature)
        # Only a flag: the iteration in flight finishes, then every rank saves together.
        self.received = True

    def __enter__(self) -> StopCheck:
        if self.loop.exit_signal_handler:
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def reason(self, iteration: int) -> str | None:
        loop = self.loop
        late = signalled = False
        if loop.exit_duration_in_mins is not None or loop.exit_signal_handler:
            minutes = (time.time() - self.started) / 60
            flags = torch.tensor(
                [float(loop.exit_duration_in_mins is not None
                       and minutes > loop.exit_duration_in_mins),
                 float(self.received)],
                device=self.device,
            )  # fmt: skip
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            late, signalled = (bool(x) for x in flags.tolist())
        if signalled:
            return "SIGTERM received (--exit_signal_handler)"
        if late:
            return f"the run has lasted over --exit_duration_in_mins {loop.exit_duration_in_mins}"
        if loop.exit_interval is not None and iteration % loop.exit_interval == 0:
            return f"--exit_interval {loop.exit_interval}"
        return None
