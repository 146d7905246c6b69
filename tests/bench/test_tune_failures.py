"""bench.tune's sweep when a sweep cannot even start (its inputs or its heuristic's run raise, as
a kernel never run on the card may): that sweep is an error row and the others are still tuned.
Plain CPU, fake kernels and a fake timer: no timing here is a measurement."""

from typing import NamedTuple

import torch

from bench import tune
from bench.harness import OURS, Timing


class _Cfg(NamedTuple):
    block: int


def _timer(fn):
    fn()
    return Timing(1.0, 1.0, 1.0)  # FAKE


def _sweep(op: str, make) -> tune.Sweep:
    return tune.Sweep(op, "k=1", "4x4", 64, [_Cfg(1), _Cfg(2)], make)


def test_a_sweep_that_fails_to_start_loses_only_itself():
    def good():
        x = torch.ones(4)
        return lambda cfg: [x * 2]

    def bad_inputs():
        raise RuntimeError("CUDA out of memory (fake)")

    def bad_heuristic():
        def run(cfg):
            raise RuntimeError("out of resources: shared memory (fake)")

        return run

    todo = [_sweep("a", bad_inputs), _sweep("b", bad_heuristic), _sweep("c", good)]
    ops, rows = tune.run_sweeps(todo, {}, timer=_timer)
    assert ops == {"c": {"k=1": {"block": 1}}}
    chosen = {r.shape: r for r in rows if r.impl == OURS}
    assert "out of memory" in chosen["a k=1"].error
    assert "shared memory" in chosen["b k=1"].error
    assert chosen["c k=1"].error is None and chosen["c k=1"].ms == 1.0
    # a sweep that could not start times none of its candidates
    assert not [r for r in rows if r.impl != OURS and r.shape != "c k=1"]
