"""LR schedule: warm-up start/end, mid-decay, end of decay and after, against the formula."""

import math

import pytest

from train.config import ScheduleConfig
from train.lr import lr_at

COS = ScheduleConfig(
    lr=1e-5, min_lr=1e-6, decay_style="cosine", warmup_iters=100, decay_iters=12000
)


def test_warmup_is_linear_to_lr():
    assert lr_at(COS, 1) == pytest.approx(1e-5 / 100, rel=1e-12)
    assert lr_at(COS, 50) == pytest.approx(0.5e-5, rel=1e-12)
    assert lr_at(COS, 100) == pytest.approx(1e-5, rel=1e-12)


def test_cosine_decay_points():
    mid = 100 + (12000 - 100) // 2  # ratio 0.5 exactly: cos(pi/2) = 0 -> halfway
    assert lr_at(COS, mid) == pytest.approx(1e-6 + 0.5 * (1e-5 - 1e-6), rel=1e-12)
    s = 3000
    ratio = (s - 100) / (12000 - 100)
    want = 1e-6 + 0.5 * (math.cos(math.pi * ratio) + 1) * (1e-5 - 1e-6)
    assert lr_at(COS, s) == pytest.approx(want, rel=1e-12)
    assert lr_at(COS, 12000) == pytest.approx(1e-6, rel=1e-12)
    assert lr_at(COS, 12001) == 1e-6
    assert lr_at(COS, 50000) == 1e-6
    # monotone after warm-up
    values = [lr_at(COS, s) for s in range(100, 12001, 37)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_linear_constant_and_isr():
    lin = ScheduleConfig(lr=1.0, min_lr=0.1, decay_style="linear", warmup_iters=10, decay_iters=110)
    assert lr_at(lin, 60) == pytest.approx(0.1 + 0.5 * 0.9)
    assert lr_at(lin, 200) == 0.1
    const = ScheduleConfig(
        lr=2.0, min_lr=0.0, decay_style="constant", warmup_iters=4, decay_iters=8
    )
    assert [lr_at(const, s) for s in (1, 4, 5, 100)] == [0.5, 2.0, 2.0, 2.0]
    isr = ScheduleConfig(lr=1.0, min_lr=0.01, decay_style="inverse-square-root", warmup_iters=16,
                         decay_iters=100)  # fmt: skip
    assert lr_at(isr, 64) == pytest.approx(0.5)
    assert lr_at(isr, 10**9) == 0.01


def test_no_warmup_starts_at_lr():
    s = ScheduleConfig(lr=3e-4, min_lr=3e-5, decay_style="cosine", warmup_iters=0, decay_iters=10)
    assert lr_at(s, 0) == pytest.approx(3e-4)
    assert lr_at(s, 10) == pytest.approx(3e-5)


def test_warmup_ending_at_the_decay_end_reaches_lr():
    """The warm-up's last step runs at lr even when it is also the decay's last (warmup_iters ==
    decay_iters): the warm-up case comes first, as in Megatron's get_lr."""
    s = ScheduleConfig(lr=1.0, min_lr=0.1, decay_style="cosine", warmup_iters=10, decay_iters=10)
    assert lr_at(s, 10) == 1.0
    assert lr_at(s, 11) == 0.1


def test_inverse_square_root_is_floored_at_min_lr_within_the_decay():
    """Inverse-square-root is max(min_lr, lr * sqrt(W) / sqrt(s)), as Megatron: with lr 1,
    warm-up 4 and min_lr 0.5 the formula reaches 0.5 at step 16 and would fall to 0.25 by step
    64 -- the floor holds it at min_lr for the rest of the decay, not only after it."""
    isr = ScheduleConfig(lr=1.0, min_lr=0.5, decay_style="inverse-square-root", warmup_iters=4,
                         decay_iters=100)  # fmt: skip
    assert lr_at(isr, 9) == pytest.approx(2 / 3, rel=1e-12)
    assert lr_at(isr, 16) == pytest.approx(0.5, rel=1e-12)
    assert [lr_at(isr, s) for s in (17, 64, 100, 101)] == [0.5] * 4
