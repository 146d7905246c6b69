"""Global batches of samples (--global_batch_unit samples) as the trainer's configuration sees
them: the micro-batch count a step can run, which the start-up memory estimate bounds."""

import pytest

from parallel.pipeline_schedule import max_in_flight
from tests.train.helpers import TINY_ARGS
from train.args import parse_args
from train.resolve import resolve


def _loop(extra: list[str], world: int):
    ns, given = parse_args([*TINY_ARGS, "--num_layers", "4", *extra])
    return resolve(ns, given, world_size=world).loop


@pytest.mark.parametrize(
    ("extra", "world", "most"),
    [
        ([], 1, 2),  # 4 samples, at worst a row each: 2 micro-batches of 2
        (["--global_batch_size", "2", "--micro_batch_size", "4"], 2, 1),  # G < micro x dp
        (["--global_batch_size", "6"], 2, 2),  # 3 samples a rank: at most 2 micro-batches
        (["--pipeline_model_parallel_size", "2", "--micro_batch_size", "4"], 2, 1),  # 1F1B
        # interleaved: one real micro-batch and a filler (train_step rounds up to pp)
        (["--pipeline_model_parallel_size", "2", "--micro_batch_size", "4",
          "--num_layers_per_virtual_pipeline_stage", "1"], 2, 2),
        (["--pipeline_model_parallel_size", "2", "--global_batch_size", "6",
          "--num_layers_per_virtual_pipeline_stage", "1"], 2, 4),
    ],
)  # fmt: skip
def test_num_microbatches_bounds_what_a_step_runs(extra, world, most):
    """Each row holds at least one sample, so a DP rank's G / dp samples fill at most
    ceil(G / (micro x dp)) micro-batches, and interleaved 1F1B runs that rounded up to a multiple
    of pp (fillers). The memory estimate's in-flight count reads this bound; before, it was 1
    where the interleaved step runs 2 micro-batches, so the estimate held 2 chunks in flight on
    the first stage instead of 4."""
    loop = _loop(extra, world)
    assert loop.num_microbatches == most
    if most == 2 and "--num_layers_per_virtual_pipeline_stage" in extra:
        assert max_in_flight(2, 0, loop.num_microbatches, 2) == 4  # the step's first stage
