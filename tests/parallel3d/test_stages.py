"""build_stages: each rank's chunks are exact slices of the seed's full model, layers split as
stage_spec says, no rank allocating more than its own parameters (no process group needed)."""

import pytest
import torch

from model.llama import Llama
from parallel.dims import ParallelDims
from tests.parallel3d.common import run_config
from train.loop import build_stages


@pytest.mark.parametrize(
    ("pp", "extra"), [(2, []), (4, ["--num_layers_per_virtual_pipeline_stage", "1"])]
)
def test_stages_are_slices_of_the_full_model(pp, extra):
    rc, _ = run_config(1, pp, pp, 8, extra)
    full = Llama(rc.model, rc.model.padded_vocab_size(1))
    full.init_weights(torch.Generator().manual_seed(rc.loop.seed))
    want = dict(full.named_parameters())
    seen: dict[str, int] = {}
    for r in range(pp):
        stages = build_stages(rc, ParallelDims(tp=1, pp=pp, dp=1, rank=r), "cpu", torch.float32)
        assert len(stages) == (2 if extra else 1)
        for c, stage in enumerate(stages):
            block = c * pp + r  # the stage's position in the chain
            per = rc.model.num_layers // (pp * len(stages))
            assert [int(k) for k in stage.layers] == list(range(block * per, (block + 1) * per))
            assert (stage.embed is not None) == (block == 0)
            assert (stage.output is not None) == (block == pp * len(stages) - 1)
            for n, p in stage.named_parameters():
                assert n not in seen, f"{n} on two stages"
                seen[n] = r
                assert torch.equal(p, want[n]), n
    assert set(seen) == set(want)


def test_load_skips_the_seed_draws():
    rc, _ = run_config(1, 2, 2, 8, ["--load", "somewhere"])
    stages = build_stages(rc, ParallelDims(tp=1, pp=2, dp=1, rank=1), "cpu", torch.float32)
    assert all(not p.any() for s in stages for p in s.parameters())  # zeros, then overwritten
