"""SequenceParallelDropout in one process (it needs no process group): inverted dropout."""

import torch

from parallel.layers import SequenceParallelDropout


def test_sp_dropout_scales_the_kept_values_and_is_identity_in_eval():
    """Kept activations are divided by (1 - p), as nn.Dropout, so a layer sees the same expected
    activation in training and in evaluation; without the scale, training under sequence
    parallelism would shrink the residual stream by (1 - p) and the TP-only run (nn.Dropout)
    would no longer be the same model. The multi-rank tests check only the masks' streams."""
    torch.manual_seed(0)
    drop = SequenceParallelDropout(0.25, tp_rank=1)
    x = torch.full((64, 32), 2.0)
    y = drop(x)
    kept = y != 0
    assert 0 < kept.sum() < x.numel()
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 2.0 / 0.75))
    drop.eval()
    assert torch.equal(drop(x), x)
