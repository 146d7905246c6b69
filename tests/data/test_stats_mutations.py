"""data/stats.py behaviour that a hand mutation pass found unpinned (the pretokenizer's tests
cover the rest): each test names the mistake it catches."""

import numpy as np

from data.stats import TokenStats


def test_a_batch_with_every_sample_skipped_counts_without_a_minimum():
    """A batch in which every sample is skipped (too few assistant tokens) is counted as skipped
    and leaves min/max alone; it must not take the min of an empty array (a crash that would
    abort the pretokenizer on a dataset of short answers)."""
    s = TokenStats("d")
    s.add(np.array([5, 7]), np.array([0, 0]), np.array([False, False]))
    assert (s.skipped_samples, s.skipped_tokens, s.min_tokens, s.max_tokens) == (2, 12, None, 0)
    s.add(np.array([9, 3]), np.array([4, 1]), np.array([True, False]))
    assert (s.accepted_samples, s.min_tokens, s.max_tokens, s.skipped_tokens) == (1, 9, 9, 15)
    assert "Min tokens per sample: 9" in s.block()


def test_token_sums_do_not_wrap_around_in_int32():
    """Token counts arrive as int32 arrays; their sums are taken in int64, so a batch of more
    than 2**31 tokens is counted, not wrapped to a negative number."""
    s = TokenStats("d")
    sizes = np.array([2**30, 2**30, 2**30], dtype=np.int32)
    s.add(sizes, sizes, np.array([True, True, False]))
    assert s.accepted_tokens == 2**31 and s.accepted_assistant_tokens == 2**31
    assert s.skipped_tokens == 2**30


def test_default_fraction_is_the_whole_dataset():
    """A block made without a fraction (the total, a val split) reads "(100.0%)", the share of
    the dataset it stands for."""
    assert "(0 samples (100.0%))" in TokenStats("total").block()


def test_to_dict_has_the_average():
    """The JSON stats carry every figure of the text block, the average included."""
    s = TokenStats("d")
    s.add(np.array([4, 6]), np.array([1, 1]), np.array([True, True]))
    assert s.to_dict()["avg_tokens"] == 5.0 and s.to_dict()["min_tokens"] == 4
    assert TokenStats("empty").to_dict()["min_tokens"] is None  # no accepted sample: no minimum
