"""Gaps found by mutation testing of parallel/layers.py that one process can check:
SequenceParallelDropout's drop rate, its p = 0 and p = 1 edges."""

import pytest
import torch

from parallel.layers import SequenceParallelDropout


def test_sp_dropout_drops_a_fraction_p():
    """p is the probability of dropping, as nn.Dropout's: at p = 0.1 about 10% of the values
    are zeroed (not 90%: bernoulli takes the keep probability 1 - p)."""
    torch.manual_seed(0)
    x = torch.ones(256, 64)
    for p in (0.1, 0.7):
        dropped = (SequenceParallelDropout(p, tp_rank=0)(x) == 0).float().mean().item()
        assert dropped == pytest.approx(p, abs=0.02), p


def test_sp_dropout_at_p_zero_is_the_identity_and_draws_nothing():
    """LIMA's first layer has rate 0: no mask, the input itself, and the CPU generator left
    where it was (it seeds every other dropout's stream in lock-step over the TP ranks)."""
    torch.manual_seed(3)
    before = torch.get_rng_state()
    x = torch.randn(8, 4)
    state = torch.get_rng_state()
    assert SequenceParallelDropout(0.0, tp_rank=1)(x) is x
    assert torch.equal(torch.get_rng_state(), state) and not torch.equal(state, before)


def test_sp_dropout_refuses_p_one():
    """p = 1 would divide by zero in the 1 / (1 - p) scale (and drop everything)."""
    with pytest.raises(ValueError, match=r"dropout probability 1.0 must be in \[0, 1\)"):
        SequenceParallelDropout(1.0, tp_rank=0)
    with pytest.raises(ValueError, match="must be in"):
        SequenceParallelDropout(-0.1, tp_rank=0)
